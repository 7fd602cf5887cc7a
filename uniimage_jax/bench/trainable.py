"""What trains, and the optimiser state it costs: the full recipe vs LoRA, counted analytically.

    python -m uniimage_jax.bench.trainable --preset tbac_3b --lora-rank 32

Counts come from the abstract parameter tree (`jax.eval_shape` of the model's init: nothing is
allocated), split by the same patterns the trainer uses. The full recipe trains `dit/.*`,
`connector/.*` and `metaquery/.*`; the LoRA recipe trains the adapters (default targets: the
DiT's attention projections) plus the connector and the metaqueries. Adam keeps two fp32 moments
per trainable parameter (8 bytes); an EMA (`config.ema`) would add 4 bytes per trainable
parameter. Compiled-program memory (activations, temporaries) is the ahead-of-time compile's
business, not this count's.
"""

from __future__ import annotations

import argparse
import json
import sys

ADAM_BYTES = 8          # mu and nu, fp32
LORA_EXTRAS = ("connector/.*", "metaquery/.*")


def trainable_summary(preset: str, lora_rank: int = 0, lora_alpha: float | None = None) -> dict:
    """Parameter counts and Adam state bytes of one recipe on `preset` (lora_rank 0: full)."""
    import jax
    import numpy as np

    from uniimage_jax.models import lora
    from uniimage_jax.train import stage_setup
    from uniimage_jax.train.config import base_config
    from uniimage_jax.checkpoints.partition import partition_params

    c = base_config(stage="count", task="t2i", preset=preset)
    if lora_rank:
        c.lora.rank, c.lora.alpha = lora_rank, float(lora_alpha or lora_rank)
        c.trainable = LORA_EXTRAS
    model = stage_setup.build_model(c)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    trainable, frozen = partition_params(abstract, stage_setup.trainable_patterns(c, model))

    def count(tree) -> int:
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

    n = count(trainable)
    base, adapters = lora.split_adapters(abstract)
    return {"preset": preset, "lora_rank": lora_rank, "trainable_params": n,
            "adapter_params": count(adapters), "frozen_params": count(frozen),
            "dit_params": count(base["dit"]), "adam_state_bytes": ADAM_BYTES * n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m uniimage_jax.bench.trainable",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tbac_3b", choices=("tiny", "tbac_3b"))
    p.add_argument("--lora-rank", type=int, default=32)
    args = p.parse_args(argv)
    if args.lora_rank < 1:
        print("--lora-rank must be >= 1", file=sys.stderr)
        return 2
    rows = [trainable_summary(args.preset, 0), trainable_summary(args.preset, args.lora_rank)]
    print(f"{'recipe':<12} {'trainable':>15} {'adam state':>12} {'frozen':>15}")
    for r in rows:
        name = f"lora r={r['lora_rank']}" if r["lora_rank"] else "full"
        print(f"{name:<12} {r['trainable_params']:>15,} {r['adam_state_bytes'] / 2**30:>9.2f} GiB "
              f"{r['frozen_params']:>15,}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
