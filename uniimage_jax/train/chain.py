"""The stage chain t2i_pretrain -> ti2i_pretrain -> finetune (`uniimage-train --chain`).

Each stage starts from the previous stage's final trainable parameters (`init_from`) and takes
the first stage's model, weights, processor, mesh and seed; everything else comes from its own
file in the config directory (`<config dir>/<stage>.py`, same preset), changed by
`STAGE.KEY=VALUE` overrides (`--chain_config`), e.g.

    --chain_config=ti2i_pretrain.data.source=jsonl --chain_config=ti2i_pretrain.data.path=e.jsonl
    --chain_config=finetune.max_steps=2000

Every stage's config is built and checked before the first stage trains, so a typo in a later
stage's override stops the chain in seconds, not after the first stage. Data: a later stage never
quietly falls back to the built-in synthetic shapes when the first stage reads files: its data
must then be named (or `STAGE.data.source=synthetic` given explicitly).

Preemption: a stage stopped short of its max_steps (SIGTERM) stops the chain; rerunning the same
command resumes that stage and then runs the later ones from its final parameters. A later stage
that already has checkpoints is checked against the step of the stage it was initialised from
(`lineage.py`) and refused if that stage has trained since.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import logging
import os
from collections.abc import Callable, Sequence

import ml_collections

from uniimage_jax.errors import UserError
from uniimage_jax.train import lineage

log = logging.getLogger("uniimage_jax.train")

CHAIN = ("t2i_pretrain", "ti2i_pretrain", "finetune")
SHARED_FIELDS = ("model", "pretrained", "processor_dir", "mesh", "seed")


@dataclasses.dataclass
class ChainOutcome:
    results: list            # TrainResult of every stage that ran
    stopped_at: str | None   # the stage that stopped short (preempted), if any


def _load_stage_config(config_dir: str, stage: str, preset: str) -> ml_collections.ConfigDict:
    path = os.path.join(config_dir, f"{stage}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--chain: no config file for stage {stage!r} at {path}")
    spec = importlib.util.spec_from_file_location(f"uniimage_chain_{stage}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _parse_value(text: str, current, where: str):
    """A command-line value as the type of the field it replaces (strings stay verbatim)."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"{where}: expected true or false, got {text!r}")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"{where}: {text!r} is not a valid {type(current).__name__}") from None


def apply_override(configs: dict, override: str) -> tuple[str, str]:
    """Apply one 'STAGE.KEY=VALUE' to `configs` ({stage: config}); returns (stage, key)."""
    where = f"--chain_config={override}"
    target, sep, text = override.partition("=")
    stage, dot, key = target.partition(".")
    if not sep or not dot or not key:
        raise UserError(f"{where}: expected STAGE.KEY=VALUE, e.g. ti2i_pretrain.data.path=x.jsonl")
    if stage not in configs:
        raise UserError(f"{where}: stage {stage!r} is not in this chain {tuple(configs)}")
    *parents, leaf = key.split(".")
    node = configs[stage]
    try:
        for part in parents:
            node = node[part]
        current = node[leaf]
    except (KeyError, AttributeError, TypeError):
        close = difflib.get_close_matches(leaf, list(node.keys()) if hasattr(node, "keys")
                                          else [], n=1)
        hint = f" (did you mean {'.'.join([*parents, close[0]])!r}?)" if close else ""
        raise UserError(f"{where}: {stage} has no config field {key!r}{hint}") from None
    if isinstance(current, ml_collections.ConfigDict):
        raise UserError(f"{where}: {key!r} is a group of fields; set its fields one by one")
    try:
        node[leaf] = _parse_value(text, current, where)
    except TypeError as e:
        raise UserError(f"{where}: {e}") from None
    return stage, key


def stage_configs(first: ml_collections.ConfigDict, config_dir: str, *,
                  overrides: Sequence[str] = (), max_steps: int | None = None
                  ) -> list[ml_collections.ConfigDict]:
    """The configs of the chain's stages from `first.stage` on, overrides applied, checked."""
    if first.stage not in CHAIN:
        raise UserError(f"--chain needs a config whose stage is one of {CHAIN}, got "
                         f"{first.stage!r}")
    stages = CHAIN[CHAIN.index(first.stage):]
    configs = {}
    for stage in stages:
        if stage == first.stage:
            c = first
        else:
            c = _load_stage_config(config_dir, stage, first.model.preset)
            for field in SHARED_FIELDS:
                c[field] = first[field]
        if max_steps is not None:
            c.max_steps = max_steps
        configs[stage] = c
    given = {apply_override(configs, o) for o in overrides}
    _check_data(configs, given)
    return list(configs.values())


def _check_data(configs: dict, given: set) -> None:
    stages = list(configs)
    first = configs[stages[0]]
    if first.data.source == "synthetic":
        return
    for stage in stages[1:]:
        named = any(s == stage and k.startswith("data.") for s, k in given)
        if configs[stage].data.source == "synthetic" and not named:
            raise UserError(
                f"--chain: {stages[0]} reads data.source={first.data.source!r}, but {stage} "
                f"would train on the built-in synthetic shapes; name its data, e.g. "
                f"--chain_config={stage}.data.source=jsonl --chain_config={stage}.data.path="
                f"MANIFEST.jsonl (or --chain_config={stage}.data.source=synthetic to mean it)")


def run_chain(configs: Sequence[ml_collections.ConfigDict], workdir: str,
              train_fn: Callable, report: Callable[[str], None] = print) -> ChainOutcome:
    """Train the stages in order, each from the previous one's final parameters; stop at a
    stage that ends short of its max_steps."""
    from uniimage_jax.paths import absolute

    workdir = absolute(workdir)
    results, previous = [], None
    for c in configs:
        if previous is not None:
            c.init_from = previous
            lineage.check(os.path.join(workdir, c.stage), previous)
        result = train_fn(c, workdir)
        results.append(result)
        report(result.summary(c.max_steps))
        if result.step < c.max_steps:
            later = [x.stage for x in configs[len(results):]]
            if later:
                report(f"{c.stage} stopped at step {result.step} of {c.max_steps}: the chain "
                       f"stops before {', '.join(later)}; rerun the same command to resume")
            return ChainOutcome(results, c.stage)
        previous = result.stage_dir
    return ChainOutcome(results, None)
