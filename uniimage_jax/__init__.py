"""uniimage_jax: TBAC-UniImage in JAX/Flax.

Subpackages: models (Qwen2.5-VL, SANA, DC-AE, the unified model), convert (strict PyTorch ->
Flax conversion), processing (prompts, tokenizer, image preprocessing), data, train, sampling,
eval, storage (local and gs:// files).
"""

__version__ = "0.1.0"

import os as _os

# gs:// paths go through gcsfs, not TensorFlow's gfile (see uniimage_jax/storage): epath reads
# this variable each time it picks a backend, so setting it here, before any path is opened,
# covers Orbax and every other user of epath in the process. A user's own setting wins.
_os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs remembers a bucket's listings for the life of a process by default: what another process
# (another host) writes later stays invisible to exists(), iterdir() and Orbax's list of
# committed steps. Switched off, here and in the processes this one starts.
_os.environ.setdefault("FSSPEC_GCS", '{"use_listings_cache": false}')
if "fsspec.config" in __import__("sys").modules:  # read the variable above already
    __import__("sys").modules["fsspec.config"].conf.setdefault("gcs", {}).setdefault(
        "use_listings_cache", False)

from uniimage_jax.platform_guard import cpu_unless_accelerator as _cpu_unless_accelerator

_cpu_unless_accelerator()
