"""Command-line entry points: thin wrappers over the library (each module has `main(argv)`).

Importing this package (every command does, first) silences one known start-up line that is no
error: transformers' "PyTorch was not found" notice (only its tokenizers and processors are used
here). It is a logging filter on that one message, so every other transformers warning still
shows. JAX's "Unable to initialize backend 'tpu'" is an INFO record, hidden by the commands that
log at INFO by keeping the `jax` logger at WARNING.
"""

import logging


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    return "PyTorch was not found" not in record.getMessage()


logging.getLogger("transformers").addFilter(_not_the_torch_notice)
