"""Which step of which stage a stage was initialised from, and whether that still holds.

A stage started with `init_from` writes `<stage dir>/INIT_FROM.json` = {"init_from": dir,
"step": the step of that directory it took}. The stage chain checks it before resuming a stage:
a stage whose source has since trained further (e.g. the source was preempted, the chain went on
from the partial source in an older version, then a rerun completed the source) was trained from
the wrong parameters, and resuming it would give a chain result that is silently wrong.

Runs older than the record are judged by file times instead: a source whose latest checkpoint
was written after the stage's oldest kept checkpoint cannot be the state the stage began from.
"""

from __future__ import annotations

import json
import logging
import os

from etils import epath

from uniimage_jax.errors import UserError
from uniimage_jax.paths import is_url

log = logging.getLogger("uniimage_jax.train")

RECORD_FILE = "INIT_FROM.json"


def checkpoint_steps(stage_dir) -> list[int]:
    """The finalised steps saved in a stage directory (sorted; [] if none or absent)."""
    import orbax.checkpoint as ocp

    path = epath.Path(stage_dir)
    return sorted(ocp.utils.checkpoint_steps(path)) if path.exists() else []


def source_step(init_from: str) -> int | None:
    """The step `init_from` (a stage dir, a step dir or a step's `state` dir) resolves to."""
    path = epath.Path(init_from)
    if path.name == "state":
        path = path.parent
    if path.name.isdigit():
        return int(path.name)
    steps = checkpoint_steps(path)
    return steps[-1] if steps else None


def _stored_max_steps(stage_dir, step: int) -> int | None:
    config_dir = epath.Path(stage_dir) / str(step) / "config"
    for name in ("metadata", "config"):
        f = config_dir / name
        if f.exists():
            try:
                return int(json.loads(f.read_text()).get("max_steps"))
            except (ValueError, TypeError, AttributeError):
                return None
    return None


def record(stage_dir: str, init_from: str) -> None:
    """Note (process 0) the step of `init_from` this stage starts from; warn when that stage had
    not reached its own max_steps."""
    step = source_step(init_from)
    path = epath.Path(stage_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / RECORD_FILE).write_text(json.dumps({"init_from": str(init_from), "step": step}))
    if step is not None and not epath.Path(init_from).name.isdigit():
        planned = _stored_max_steps(init_from, step)
        if planned is not None and step < planned:
            log.warning("init_from %s is at step %d of its max_steps=%d: this stage starts from "
                        "an unfinished stage", init_from, step, planned)


def _mtime(step_dir: epath.Path) -> float:
    """When a step directory was written. A bucket has no directories, so there it is when its
    checkpoint metadata (written when the step is finalised) was."""
    if not is_url(os.fspath(step_dir)):
        return os.path.getmtime(os.fspath(step_dir))
    return float((step_dir / "_CHECKPOINT_METADATA").stat().mtime)


def check(stage_dir: str, source_dir: str) -> None:
    """Raise ValueError if `stage_dir` holds checkpoints trained from another state of
    `source_dir` than its current latest step. A stage without checkpoints passes."""
    steps = checkpoint_steps(stage_dir)
    if not steps:
        return
    latest = source_step(source_dir)
    stage, source = epath.Path(stage_dir), epath.Path(source_dir)
    fix = (f"delete {stage_dir} to train it again from the finished {source.name}, or run it on "
           "its own (without --chain) to keep it")
    rec_file = stage / RECORD_FILE
    if rec_file.exists():
        rec = json.loads(rec_file.read_text())
        if rec.get("step") != latest:
            raise UserError(f"{stage_dir} was initialised from {rec.get('init_from')} at step "
                             f"{rec.get('step')}, but {source.name} is now at step {latest}: "
                             f"it trained from an unfinished {source.name}; {fix}")
        return
    if latest is None:
        return
    began = _mtime(stage / str(steps[0]))
    source_done = _mtime(source / str(latest))
    if source_done > began:
        raise UserError(f"{stage_dir} (an older run without {RECORD_FILE}) has checkpoints "
                         f"from before {source.name} reached its step {latest}: it trained from "
                         f"an unfinished {source.name}; {fix}")
