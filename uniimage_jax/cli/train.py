"""`uniimage-train`: run (or resume) one training stage.

    uniimage-train --config configs/t2i_pretrain.py:tiny --workdir /tmp/w --config.max_steps=20

`--config FILE[:PRESET]` loads `get_config(PRESET)` from a config file; `--config.KEY=VALUE`
overrides any field (an unknown key is rejected before anything compiles). Rerunning the same
command resumes from the stage's latest checkpoint under `<workdir>/<stage>/`.
`--chain` runs the stage chain t2i_pretrain -> ti2i_pretrain -> finetune, each stage initialised
from the previous one (`init_from`), with the same overrides.
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

CHAIN = ("t2i_pretrain", "ti2i_pretrain", "finetune")


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
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
        print(f"{config.stage}: step {result.step}, checkpoints in {result.stage_dir}")
        return
    config_dir = os.path.dirname(os.path.abspath(
        config_flags.get_config_filename(flags.FLAGS["config"])))
    chain_from_config(config, _WORKDIR.value, config_dir, max_steps=_CHAIN_MAX_STEPS.value)


def chain_from_config(config, workdir: str, config_dir: str, max_steps: int | None = None):
    """Run the stage chain from `config.stage` on; later stages load `<config_dir>/<stage>.py`
    and take this config's model, weights, processor, mesh and seed."""
    import importlib.util

    from uniimage_jax.train.trainer import train

    if config.stage not in CHAIN:
        raise ValueError(f"--chain needs a config whose stage is one of {CHAIN}, got "
                         f"{config.stage!r}")
    here = config_dir
    previous = None
    for stage in CHAIN[CHAIN.index(config.stage):]:
        if stage == config.stage:
            c = config
        else:
            path = os.path.join(os.path.abspath(here), f"{stage}.py")
            spec = importlib.util.spec_from_file_location(stage, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            c = mod.get_config(config.model.preset)
            c.model = config.model
            c.pretrained = config.pretrained
            c.processor_dir = config.processor_dir
            c.mesh = config.mesh
            c.seed = config.seed
        if previous is not None:
            c.init_from = previous
        if max_steps is not None:
            c.max_steps = max_steps
        result = train(c, workdir)
        print(f"{stage}: step {result.step}, checkpoints in {result.stage_dir}")
        previous = result.stage_dir


def main(argv=None):
    app.run(_main, argv=argv if argv is not None else sys.argv)


if __name__ == "__main__":
    main()
