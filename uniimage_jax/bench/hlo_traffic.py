"""Memory traffic of a compiled program's operations, read from its optimized HLO text, grouped
by the model code that made them: where the time that is not matrix multiplication goes.

XLA's cost analysis gives a program's totals only. This reads `compiled.as_text()` (the program
after fusion, as the chip would run it) and, for every operation outside a fusion body, counts
the bytes it reads and writes (its operands' and its result's sizes) and classes it:

  matmul      a dot or convolution, or a fusion around one (the model's matrix work)
  collective  all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
  layout      copy and transpose: data moved to another layout, nothing computed
  prefetch    an asynchronous copy between HBM and the chip's on-chip memory (a memory space
              `S(n)` on either side): XLA staging an operand next to the compute units, not a
              layout change; counted at the bytes it moves through HBM (the operand once)
  other       everything else: elementwise and reduction fusions, slices, gathers, scatters

At the chip's HBM bandwidth (`HBM_BYTES_PER_S`) a non-matmul operation takes at least its bytes
over the bandwidth: the floor of what it costs. Where the TPU compiler annotates an operation
with its own time estimate (`estimated_cycles` in its backend config), the record carries it as
`cycles`, so a group's share of a program's cycles is its share of XLA's per-operation
estimates. (Their sum is not the program's `optimal_seconds`, which overlaps operations: for
the tbac_3b stage-1 step on v5p at probe depth the sum at 1.75 GHz was 0.97x of it for the
query pass alone and 1.43x for the whole step.) Operations are grouped by the `op_name` the JAX
trace left on them (the Flax module path and the primitive), so a group names the model code.
Our own reader: no library exposes per-operation costs of a compiled XLA program. Scanned
layers run as while loops whose bodies are counted once; read unrolled programs (the `aot`
depth probes) for per-layer figures.
"""

from __future__ import annotations

import collections
import re

# Per-chip HBM bandwidth in bytes/s (Cloud TPU's published figures).
HBM_BYTES_PER_S = {"v4": 1228e9, "v5p": 2765e9, "v5e": 819e9, "v6e": 1640e9}

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
               "partition-id", "replica-id", "while", "conditional", "call", "iota",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
               "async-done", "async-update", "opt-barrier", "add-dependency"}
# A layout in a memory space other than HBM's default, e.g. `{1,0:T(8,128)S(1)}`.
_MEMORY_SPACE = re.compile(r"S\(\d+\)\}")
_COMMENT = re.compile(r"/\*.*?\*/")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_COLLECTIVE = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _bytes(text: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return total


def _first_array(shape: str) -> str:
    """The first array of a result shape (a copy-start's destination), with its layout."""
    m = re.search(r"\w+\[[\d,]*\](\{[^}]*\})?", shape)
    return m.group(0) if m else ""


def _computations(hlo: str) -> dict[str, list[str]]:
    out, name = {}, None
    for line in hlo.splitlines():
        if name is None:
            # A header has no "=" before its body's brace (an instruction has), once the
            # `/*index=N*/` comments of long parameter lists are taken out.
            m = _HEADER.match(line)
            if m and "=" not in _COMMENT.sub("", line).split("{")[0]:
                name = m.group(2)
                out[name] = []
            continue
        if line.strip() == "}":
            name = None
        else:
            out[name].append(line)
    return out


def _op_group(attrs: str) -> str:
    """The op_name without the jit wrappers; a backward pass is marked [bwd]."""
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return "?"
    name = m.group(1)
    backward = "transpose(" in name
    name = re.sub(r"\b(jit|jvp|transpose|checkpoint|remat|vmap|pjit)\(([^()]*)\)", r"\2", name)
    name = re.sub(r"\b(jit|jvp|transpose|checkpoint|remat|vmap|pjit)\(([^()]*)\)", r"\2", name)
    parts = [p for p in name.split("/") if p and p not in ("main", "run")]
    if len(parts) > 1:
        parts = parts[:-1]   # the module path; the primitive (mul, add, slice ...) left out
    return "/".join(parts[-4:]) + (" [bwd]" if backward else "")


def traffic(hlo: str) -> list[dict]:
    """One record per operation outside fusion bodies: name, opcode, class, bytes, group."""
    comps = _computations(hlo)
    fused = set()
    for lines in comps.values():
        for line in lines:
            fused.update(re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line))
    matmul_bodies = {name for name in fused
                     if any(re.search(r"\s(dot|convolution)\(", ln) for ln in comps.get(name, []))}
    records = []
    for comp, lines in comps.items():
        if comp in fused:
            continue
        sizes, shapes = {}, {}
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            _, name, shape, opcode, rest = m.groups()
            sizes[name], shapes[name] = _bytes(shape), shape
            if opcode in _NO_TRAFFIC:
                continue
            operands = rest.split("),", 1)[0] if ")," in rest else rest.rsplit(")", 1)[0]
            names = re.findall(r"%([\w.\-]+)", operands)
            read, written = sum(sizes.get(o, 0) for o in names), sizes[name]
            if opcode in ("copy", "copy-start") and any(
                    _MEMORY_SPACE.search(s) for s in (_first_array(shape),
                                                      *(shapes.get(o, "") for o in names))):
                kind, written = "prefetch", 0
            elif opcode.startswith(_COLLECTIVE):
                kind = "collective"
            elif opcode in ("dot", "convolution") or (
                    opcode == "fusion" and set(re.findall(r"calls=%?([\w.\-]+)", rest))
                    & matmul_bodies):
                kind = "matmul"
            elif opcode in ("copy", "copy-start", "transpose"):
                kind = "layout"
            else:
                kind = "other"
            cycles = _CYCLES.search(rest)
            records.append({"name": name, "opcode": opcode, "kind": kind, "shape": shape,
                            "bytes": read + written, "group": _op_group(rest),
                            "cycles": int(cycles.group(1)) if cycles else None})
    return records


def summary(records: list[dict], hbm_bytes_per_s: float, top: int = 10) -> dict:
    """Bytes and floor seconds by class, and the `top` non-matmul groups by bytes."""
    by_kind = collections.Counter()
    groups = collections.Counter()
    for r in records:
        by_kind[r["kind"]] += r["bytes"]
        if r["kind"] != "matmul":
            groups[(r["kind"], r["group"])] += r["bytes"]
    return {"bytes_by_kind": dict(by_kind),
            "floor_s_by_kind": {k: v / hbm_bytes_per_s for k, v in by_kind.items()},
            "top_non_matmul": [{"kind": k, "group": g, "bytes": v,
                                "floor_s": v / hbm_bytes_per_s}
                               for (k, g), v in groups.most_common(top)]}
