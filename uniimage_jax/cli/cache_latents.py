"""`uniimage-cache-latents`: encode a stage's training images once with its frozen autoencoder.

    uniimage-cache-latents --config configs/t2i_pretrain.py:tiny --out latents/ [--batch N]
    uniimage-train --config configs/t2i_pretrain.py:tiny --workdir runs \\
        --config.data.source=latents --config.data.path=latents/

`--config FILE[:PRESET]` and `--config.KEY=VALUE` are those of `uniimage-train`: the stage's data
(`data.source`, `data.path`, ...), image size and autoencoder (`pretrained.vae` or
`pretrained.tbac`; the tiny preset's random init from `seed`) say what is encoded. The cache
holds the scaled latents of the official square crop, the raw captions (CFG dropout still
happens in training) and, for ti2i, the fixed-size source images; unreadable images are skipped
and counted. Rerunning the same command continues an interrupted cache
(`uniimage_jax/train/latent_cache.py`).

Errors in the command line, the config or the data print one line and exit with status 2;
`--debug` (or UNIIMAGE_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from uniimage_jax.cli.arguments import loaded_config, parse_config_flags
from uniimage_jax.cli.errors import run_command
from uniimage_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:preset] whose "
                                          "data and autoencoder are cached.", lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Directory of the latent cache (local, mounted or "
                           "gs://: shards are then written locally and uploaded one by one).")
_BATCH = flags.DEFINE_integer("batch", None, "Images per encoder call on each process, a "
                              "multiple of its device count (default: the per-process "
                              "training batch).")
_SHARD_SIZE = flags.DEFINE_integer("shard_size", 1024, "Source examples per shard (fixed for "
                                   "the life of a cache).")
_MAX_SHARDS = flags.DEFINE_integer("max_shards", None, "Stop after writing this many shards "
                                   "(a rerun continues).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a user error.")

PROG = "uniimage-cache-latents"


def _main(argv):
    code = run_command(PROG, lambda: _cache(argv), debug=_DEBUG.value, where=_OUT.value)
    if code:
        sys.exit(code)


def _cache(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or not _OUT.value:
        raise ConfigError("--config and --out are required (see uniimage-cache-latents --help)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("absl", "orbax", "jax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from uniimage_jax.train.latent_cache import cache_latents

    config = loaded_config(_CONFIG)
    result = cache_latents(config, _OUT.value, batch_size=_BATCH.value,
                           shard_size=_SHARD_SIZE.value, max_shards=_MAX_SHARDS.value)
    print(result.summary())


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv)
    if any(a in ("-h", "--help", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    app.run(_main, argv=argv, flags_parser=lambda a: parse_config_flags(PROG, a))


def help_text() -> str:
    return (f"usage: {PROG} --config FILE[:PRESET] --out DIR [--config.KEY=VALUE ...] "
            f"[--batch N] [--debug]\n\n{__doc__.strip()}\n\nflags:\n"
            + flags.FLAGS.module_help(__name__).split("\n", 2)[-1])


if __name__ == "__main__":
    main()
