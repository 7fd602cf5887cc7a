"""Argument definitions several commands share: the model to load (`--checkpoint`, `--processor`)
and its compute dtype, so the flags read the same in every command that loads a model; and the
parsing of a training config given as `--config FILE[:PRESET] --config.KEY=VALUE ...` (absl +
ml_collections, for `uniimage-train` and `uniimage-cache-latents`) with one-line errors."""

from __future__ import annotations

import os
import sys

COMPUTE_DTYPES = ("float32", "bfloat16")
# Said by every --processor flag: a Hugging Face model id works too (uniimage_jax/hub.py).
PROCESSOR_HUB_HELP = ("; or a Hugging Face model id such as Qwen/Qwen2.5-VL-3B-Instruct[@REVISION] "
                      "(fetched into the Hub cache once, read from it offline)")


def add_model_arguments(parser, *, checkpoint_help: str, processor_help: str,
                        required: bool = False, dtype: bool = True,
                        backend_dtype: bool = False) -> None:
    """On an argparse parser or argument group: `--checkpoint DIR` and `--processor DIR`
    (required, or default None), and `--dtype` unless dtype=False (a command that keeps the dtype
    of its recipe). With `backend_dtype` the default is None: the caller picks the backend's
    (bfloat16 on GPU/TPU, float32 on CPU), as image sampling does."""
    parser.add_argument("--checkpoint", required=required, default=None, help=checkpoint_help)
    parser.add_argument("--processor", required=required, default=None,
                        help=processor_help + PROCESSOR_HUB_HELP)
    if dtype:
        add_dtype_argument(parser, backend_dtype=backend_dtype)


def add_dtype_argument(parser, *, backend_dtype: bool = False) -> None:
    """`--dtype float32|bfloat16`: float32 by default, or with `backend_dtype` None (the caller
    picks the backend's: bfloat16 on GPU/TPU, float32 on CPU)."""
    if backend_dtype:
        parser.add_argument("--dtype", default=None, choices=COMPUTE_DTYPES,
                            help="compute dtype (parameters stay float32; default bfloat16 on "
                                 "GPU/TPU, float32 on CPU)")
    else:
        parser.add_argument("--dtype", default="float32", choices=COMPUTE_DTYPES,
                            help="compute dtype (parameters stay float32)")


def parse_config_flags(prog: str, argv):
    """absl's flag parsing (the command's flags, `--config` among them) with errors as one line
    on stderr and exit status 2 (absl: usage and exit 1); `--debug` keeps the traceback."""
    from absl import flags

    from uniimage_jax.cli.errors import DEBUG_ENV

    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        if debug:
            raise
        # A config file that fails to load is reported with its traceback inside the message.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        _fail(prog, lines[-1] if lines[-1:] and len(lines) > 2 else " ".join(lines))
    except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
        if debug:
            raise
        _fail(prog, _unknown_field(e, argv))


def loaded_config(holder, flag_name: str = "config"):
    """The value of a `config_flags.DEFINE_config_file` flag. ml_collections defers a failure to
    load the file to the first access of the config, made here so that it becomes a one-line
    error."""
    from absl import flags
    from ml_collections import config_flags

    from uniimage_jax.errors import ConfigError

    try:
        config = holder.value
        # Reading a field raises if the file failed to load.
        config.stage  # noqa: B018
        return config
    except OSError as e:
        path = config_flags.get_config_filename(flags.FLAGS[flag_name])
        path = path if os.path.isfile(path) else path.rsplit(":", 1)[0]  # FILE[:PRESET]
        if not os.path.isfile(path):
            raise ConfigError(f"--config {path}: no such file (the stage configs are configs/*.py "
                              "of the source checkout)") from e
        raise ConfigError(f"--config {path}: {' '.join(str(e).split())}") from e


def _fail(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _unknown_field(e: Exception, argv) -> str:
    name = str(e).strip("\"' ")
    given = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    culprit = [g for g in given if g.split(".")[-1] == name] or given
    return (f"{', '.join(culprit)}: no such config field {name!r}; every field is documented in "
            "uniimage_jax/train/config.py")
