"""Argument definitions several commands share: the model to load (`--checkpoint`, `--processor`)
and its compute dtype, so the flags read the same in every command that loads a model."""

from __future__ import annotations

COMPUTE_DTYPES = ("float32", "bfloat16")


def add_model_arguments(parser, *, checkpoint_help: str, processor_help: str,
                        required: bool = False, dtype: bool = True,
                        backend_dtype: bool = False) -> None:
    """On an argparse parser or argument group: `--checkpoint DIR` and `--processor DIR`
    (required, or default None), and `--dtype` unless dtype=False (a command that keeps the dtype
    of its recipe). With `backend_dtype` the default is None: the caller picks the backend's
    (bfloat16 on GPU/TPU, float32 on CPU), as image sampling does."""
    parser.add_argument("--checkpoint", required=required, default=None, help=checkpoint_help)
    parser.add_argument("--processor", required=required, default=None, help=processor_help)
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
