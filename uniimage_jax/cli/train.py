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

Configs: `configs/t2i_pretrain.py`, `configs/ti2i_pretrain.py`, `configs/finetune.py` (the
official stages) and `configs/demo.py`; PRESET is the model size (`tiny` for CPU, `tbac_3b` for
the published model). Every field, with its meaning and default, is documented in
`uniimage_jax/train/config.py` (nested fields with dots: `--config.data.source=jsonl`,
`--config.optimizer.lr=5e-5`, `--config.checkpoint.every_steps=500`).

Exit status: 0 when the stage (or the chain) reached max_steps; 42 when SIGTERM (a preemption,
a time limit) stopped it early after saving a checkpoint, i.e. "restart me": rerunning the same
command resumes it; 2 for errors in the command line, the config or the data files, which print
one line (`--debug` or UNIIMAGE_DEBUG=1 shows the traceback); 1 for other errors. Several
processes: see `uniimage_jax/train/distributed.py` (a lost process ends the others with 134).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

from uniimage_jax.cli.arguments import loaded_config, parse_config_flags
from uniimage_jax.cli.errors import quiet_disk_full_logs, run_command
from uniimage_jax.errors import ConfigError

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

_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a user error.")

PROG = "uniimage-train"


def _main(argv):
    from uniimage_jax.train import distributed

    try:
        code = run_command(PROG, lambda: _train(argv), debug=_DEBUG.value, where=_WORKDIR.value,
                           exit_at_once_if_disk_full=True)
    except Exception:  # a bug, or an error such as a bucket outage that outlasted the retries
        distributed.fail_fast(1, traceback.format_exc())
        raise
    if code:
        distributed.fail_fast(code)
        sys.exit(code)


def _train(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise ConfigError("--config and --workdir are required (see uniimage-train --help)")
    if _CHAIN_CONFIG.value and not _CHAIN.value:
        raise ConfigError("--chain_config is for --chain runs; use --config.KEY=VALUE here")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every file at INFO
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        force=True)
    for noisy in ("absl", "orbax", "jax"):  # jax: backend probing (libtpu) at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_disk_full_logs("absl", "orbax", debug=_DEBUG.value)
    from uniimage_jax.train.trainer import train

    config = _loaded_config(argv)
    if not _CHAIN.value:
        result = train(config, _WORKDIR.value)
        print(result.summary(config.max_steps))
        return _exit_code(result.step < config.max_steps)
    from uniimage_jax.train import chain

    config_dir = os.path.dirname(os.path.abspath(
        config_flags.get_config_filename(flags.FLAGS["config"])))
    configs = chain.stage_configs(config, config_dir, overrides=_CHAIN_CONFIG.value or (),
                                  max_steps=_CHAIN_MAX_STEPS.value)
    outcome = chain.run_chain(configs, _WORKDIR.value, train)
    return _exit_code(outcome.stopped_at is not None)


def _exit_code(stopped_early: bool) -> int:
    """0 when every stage reached its max_steps; EXIT_PREEMPTED when SIGTERM stopped one after
    it saved, so that a scheduler restarts the job (rerunning the command resumes it)."""
    if not stopped_early:
        return 0
    from uniimage_jax.train.distributed import EXIT_PREEMPTED

    print(f"stopped early by SIGTERM after saving a checkpoint: exit status {EXIT_PREEMPTED} "
          "(rerun the same command to resume)", file=sys.stderr, flush=True)
    return EXIT_PREEMPTED


def main(argv=None):
    argv = list(argv if argv is not None else sys.argv)
    if any(a in ("-h", "--help", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
        print(help_text())
        sys.exit(0)
    app.run(_main, argv=argv, flags_parser=_parse_flags)


def help_text() -> str:
    return (f"usage: {PROG} --config FILE[:PRESET] --workdir DIR [--config.KEY=VALUE ...] "
            f"[--chain] [--debug]\n\n{__doc__.strip()}\n\nflags:\n"
            + flags.FLAGS.module_help(__name__).split("\n", 2)[-1])


def _parse_flags(argv):
    return parse_config_flags(PROG, argv)


def _loaded_config(argv):
    return loaded_config(_CONFIG)


if __name__ == "__main__":
    main()
