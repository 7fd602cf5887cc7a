"""LoRA adapters on the Dense layers of the DiT and of the MLLM's language model.

An adapted Dense computes `y = x W + b + (alpha / r) * dropout(x) A B` (PEFT's `LoraLayer`), with
A (in, r) initialised like PEFT (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and
B (r, out) zero, so a fresh adapter leaves the model's outputs bitwise unchanged.

How it is wired, and why:
* The adapters are parameters **beside the kernel they adapt**: `.../attn1/to_q/{kernel, bias,
  lora_A, lora_B}`. Module paths stay those of the base model (the converters, the sharding
  rules and the checkpoints see the same names), and under `scan_layers` `nn.scan` stacks and
  slices A and B with the kernel (A (L, in, r), B (L, r, out)) with no extra code.
* The forward adds the low-rank branch through a Flax method interceptor (`adapters(config)`)
  around every `nn.Dense.__call__` whose parameters hold `lora_A`: the model files are not
  touched, and which layers are adapted is decided by the parameter tree alone.
* We chose this over folding `W + (alpha/r) A B` into the kernel before each call: the folded
  form cannot apply dropout to the adapter's input, and its gradient goes through a full-size
  dW per adapted layer (the weight-gradient FLOPs of full fine-tuning); the activation form's
  gradients are rank-r products.
* `merge` folds the adapters into the kernels (for export and `uniimage-convert merge-lora`).

`UniImage` enters `adapters` around its own forward passes, so sampling from an adapter
checkpoint needs no merge; code that applies `model.mllm` / `model.dit` directly must enter it
itself (the trainer's loss does). Dropout draws from the `lora_dropout` RNG stream, given only in
training (`rngs={"lora_dropout": key}`); without it the adapters are deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uniimage_jax.errors import UserError

LORA_A, LORA_B = "lora_A", "lora_B"
DROPOUT_RNG = "lora_dropout"
# The parameter paths of every adapter (a `config.trainable`-style regex).
ADAPTER_PATTERN = r".*/lora_[AB]"
# Names of the subtrees whose leaves are stacked over layers under `scan_layers`.
STACKED_SUBTREES = ("transformer_blocks", "layers")
# The DiT's attention projections (diffusers' Sana LoRA scripts target q/k/v; we add the outputs).
DEFAULT_DIT_TARGETS = (r"transformer_blocks(_\d+)?/attn[12]/(to_q|to_k|to_v|to_out_0)",)
MLLM_LANGUAGE_MODEL = "model/language_model/"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale alpha / r, as PEFT), dropout on the adapter input (training only),
    and regexes (re.fullmatch) over Dense module paths of each component: `dit_targets` relative
    to the DiT (`transformer_blocks_3/attn1/to_q`), `mllm_targets` relative to the MLLM and inside
    its language model (`model/language_model/layers_0/self_attn/q_proj`)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    dit_targets: tuple[str, ...] = DEFAULT_DIT_TARGETS
    mllm_targets: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "dit_targets", tuple(self.dit_targets))
        object.__setattr__(self, "mllm_targets", tuple(self.mllm_targets))
        if self.rank < 1:
            raise UserError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise UserError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.dit_targets and not self.mllm_targets:
            raise UserError("lora: dit_targets and mllm_targets are both empty")
        for p in self.dit_targets + self.mllm_targets:
            try:
                re.compile(p)
            except re.error as e:
                raise UserError(f"lora target pattern {p!r}: {e}") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "dit_targets": list(self.dit_targets), "mllm_targets": list(self.mllm_targets)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoraConfig":
        return cls(**dict(d))


def from_training_config(c) -> LoraConfig | None:
    """`config.lora` of a training run (rank 0: no adapters; alpha 0: alpha = rank, i.e. scale
    1) -> LoraConfig or None."""
    if c is None or not c.get("rank", 0):
        return None
    return LoraConfig(rank=int(c.rank), alpha=float(c.alpha or c.rank), dropout=float(c.dropout),
                      dit_targets=tuple(c.dit_targets), mllm_targets=tuple(c.mllm_targets))


def trainable_patterns(trainable: Sequence[str], config: LoraConfig | None) -> list[str]:
    """What trains: the adapters (when there are any) plus `trainable`."""
    return list(trainable) + ([ADAPTER_PATTERN] if config is not None else [])


# ------------------------------------------------------------------------------ the tree


def _unbox(x):
    return x.unbox() if isinstance(x, nn.meta.AxisMetadata) else x


def _is_dense(path: tuple[str, ...], node: Mapping) -> bool:
    if "kernel" not in node:
        return False
    stacked = any(p in STACKED_SUBTREES for p in path)
    return len(_unbox(node["kernel"]).shape) == 2 + stacked


def _dense_modules(tree: Mapping, prefix=()) -> list[tuple[str, ...]]:
    out = []
    for k, v in tree.items():
        if isinstance(v, Mapping):
            if _is_dense((*prefix, k), v):
                out.append((*prefix, k))
            out += _dense_modules(v, (*prefix, k))
    return out


def target_modules(params: Mapping, config: LoraConfig) -> list[tuple[str, ...]]:
    """Full paths (`("dit", "transformer_blocks_0", "attn1", "to_q")`) of the adapted Dense
    layers. A pattern matching no Dense layer, or an MLLM pattern matching outside its language
    model, is an error naming it."""
    found, problems = [], []
    for part, patterns in (("dit", config.dit_targets), ("mllm", config.mllm_targets)):
        if not patterns:
            continue
        modules = ["/".join(m) for m in _dense_modules(params.get(part, {}))]
        for p in patterns:
            rx = re.compile(p)
            hits = [m for m in modules if rx.fullmatch(m)]
            if not hits:
                problems.append(f"lora.{part}_targets pattern {p!r} matches no Dense layer of "
                                f"the {part} (paths look like {modules[:3]})")
            outside = [m for m in hits if part == "mllm" and not m.startswith(MLLM_LANGUAGE_MODEL)]
            if outside:
                problems.append(f"lora.mllm_targets pattern {p!r} matches layers outside the "
                                f"language model: {outside[:3]}")
            found += [(part, *m.split("/")) for m in hits]
    if problems:
        raise UserError("; ".join(problems))
    return sorted(set(found))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def init_adapters(params: Mapping, config: LoraConfig, rng: jax.Array) -> dict:
    """The adapter tree `{path...: {lora_A, lora_B}}` for `params` (boxed, abstract or concrete
    kernels). A: PEFT's kaiming-uniform; B: zeros. Logical axes follow the kernel's: A (in, -),
    B (-, out), with the layer axis in front when stacked."""
    out: dict = {}
    for i, path in enumerate(target_modules(params, config)):
        kernel = _get(params, path)["kernel"]
        shape = _unbox(kernel).shape
        lead, (d_in, d_out) = shape[:-2], shape[-2:]
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, d_in, config.rank),
                               jnp.float32, -bound, bound)
        b = jnp.zeros((*lead, config.rank, d_out), jnp.float32)
        if isinstance(kernel, nn.Partitioned):  # the kernel's box (logical or mesh axes)
            names = kernel.names
            a = kernel.replace(value=a, names=(*names[:-1], None))
            b = kernel.replace(value=b, names=(*names[:-2], None, names[-1]))
        node = out
        for p in path:
            node = node.setdefault(p, {})
        node.update({LORA_A: a, LORA_B: b})
    return out


def split_adapters(tree: Mapping) -> tuple[dict, dict]:
    """(base tree, adapter tree) of a parameter tree; either may be empty."""
    base, adapters = {}, {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            b, a = split_adapters(v)
            if b:
                base[k] = b
            if a:
                adapters[k] = a
        elif k in (LORA_A, LORA_B):
            adapters[k] = v
        else:
            base[k] = v
    return base, adapters


def join(base: Mapping, adapters: Mapping) -> dict:
    """Inverse of `split_adapters`."""
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join(out.get(k, {}), v) if isinstance(v, Mapping) else v
    return out


def merge(params: Mapping, config: LoraConfig) -> dict:
    """`params` with every adapter folded into its kernel (kernel += scale * A B, computed in
    fp32 at the highest precision, stored in the kernel's dtype) and the adapters removed."""
    def fold(node):
        if not isinstance(node, Mapping):
            return node
        node = {k: fold(v) for k, v in node.items()}
        if LORA_A in node:
            a, b = node.pop(LORA_A), node.pop(LORA_B)
            kernel = node["kernel"]
            delta = jnp.einsum("...ir,...ro->...io", jnp.asarray(a, jnp.float32),
                               jnp.asarray(b, jnp.float32), precision="highest")
            node["kernel"] = (jnp.asarray(kernel, jnp.float32)
                              + jnp.float32(config.scale) * delta).astype(kernel.dtype)
        return node
    return fold(params)


# ------------------------------------------------------------------------------ forward

_active = threading.local()


@contextlib.contextmanager
def adapters(config: LoraConfig | None):
    """Within this context (at trace time), every `nn.Dense` whose parameters hold `lora_A` /
    `lora_B` adds its low-rank branch. Re-entering it is a no-op (the branch is added once)."""
    if config is None or getattr(_active, "on", False):
        yield
        return
    scale = config.scale

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (context.method_name != "__call__" or not isinstance(module, nn.Dense)
                or not module.has_variable("params", LORA_A)):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        x = args[0]
        a = module.get_variable("params", LORA_A)
        b = module.get_variable("params", LORA_B)
        if config.dropout and module.has_rng(DROPOUT_RNG):
            keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - config.dropout,
                                        x.shape)
            x = jnp.where(keep, x / (1.0 - config.dropout), 0.0).astype(x.dtype)
        x, a, b = nn.dtypes.promote_dtype(x, a, b, dtype=module.dtype)
        h = jnp.dot(x, a, precision=module.precision)
        return y + (jnp.dot(h, b, precision=module.precision) * scale).astype(y.dtype)

    _active.on = True
    try:
        with nn.intercept_methods(interceptor):
            yield
    finally:
        _active.on = False
