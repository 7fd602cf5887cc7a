"""`uniimage-train`: run (or resume) one training stage.

    uniimage-train --config configs/t2i_pretrain.py:tiny --workdir /tmp/w --config.max_steps=20

`--config FILE[:PRESET]` loads `get_config(PRESET)` from a config file; `--config.KEY=VALUE`
overrides any field (an unknown key is rejected before anything compiles). Rerunning the same
command resumes from the stage's latest checkpoint under `<workdir>/<stage>/`.
`--chain` runs the stage chain t2i_pretrain -> ti2i_pretrain -> finetune, each stage initialised
from the previous one's final parameters (`init_from`); `--chain_config STAGE.KEY=VALUE` sets a
later stage's fields (its data, steps, ...); a preempted stage stops the chain
(`uniimage_jax/train/chain.py`). Relative paths are made absolute; a second run in the same stage
directory is refused (`uniimage_jax/train/workdir_lock.py`).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file[:preset].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory (local or gs://) for checkpoints, "
                               "TensorBoard logs and sample grids.")
_CHAIN = flags.DEFINE_bool("chain", False, "Run t2i_pretrain -> ti2i_pretrain -> finetune, "
                           "starting at the stage of --config.")
_CHAIN_MAX_STEPS = flags.DEFINE_integer("chain_max_steps", None, "With --chain: max_steps of "
                                        "every stage (default: each stage config's own).")
_CHAIN_CONFIG = flags.DEFINE_multi_string(
    "chain_config", None, "With --chain: STAGE.KEY=VALUE sets a field of one stage's config "
    "(repeatable), e.g. ti2i_pretrain.data.path=edits.jsonl; --config.KEY=VALUE sets the first "
    "stage's.")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if _CHAIN_CONFIG.value and not _CHAIN.value:
        raise app.UsageError("--chain_config is for --chain runs; use --config.KEY=VALUE here")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("absl", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from uniimage_jax.train.trainer import train

    config = _CONFIG.value
    if not _CHAIN.value:
        result = train(config, _WORKDIR.value)
        print(result.summary(config.max_steps))
        return
    from uniimage_jax.train import chain

    config_dir = os.path.dirname(os.path.abspath(
        config_flags.get_config_filename(flags.FLAGS["config"])))
    configs = chain.stage_configs(config, config_dir, overrides=_CHAIN_CONFIG.value or (),
                                  max_steps=_CHAIN_MAX_STEPS.value)
    chain.run_chain(configs, _WORKDIR.value, train)


def main(argv=None):
    app.run(_main, argv=argv if argv is not None else sys.argv)


if __name__ == "__main__":
    main()
