"""Per-device memory of a compiled program, from XLA's memory assignment
(`jax.stages.Compiled.memory_analysis()`): what the trainer logs when its step first compiles
for a batch shape, and what `uniimage-bench --aot` reports for a TPU topology."""

from __future__ import annotations

GIB = 1024 ** 3


def memory_figures(compiled) -> dict[str, int] | None:
    """Bytes per device by kind ("argument", "output" beyond the donated inputs, "temporary",
    "code") and their "total"; None where the backend gives no memory analysis."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    memory = {"argument": int(mem.argument_size_in_bytes),
              "output": int(mem.output_size_in_bytes - mem.alias_size_in_bytes),
              "temporary": int(mem.temp_size_in_bytes),
              "code": int(mem.generated_code_size_in_bytes)}
    memory["total"] = sum(memory.values())
    return memory


def device_memory_limit(device) -> int | None:
    """The memory XLA may use on `device` (its allocator's limit), where the backend says (GPUs
    and TPUs do, CPUs do not)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001: backends without the query raise different errors
        return None
    return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


def format_bytes(n: float | None) -> str:
    """GiB from 1 GiB up, MiB below; "?" for an unknown size."""
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def describe_memory(memory: dict[str, int], limit: int | None = None) -> str:
    """One line: the figures, against the device's limit when known."""
    parts = ", ".join(f"{kind} {format_bytes(memory[kind])}" for kind in
                      ("argument", "output", "temporary", "code"))
    total = f"{format_bytes(memory['total'])} per device"
    if limit:
        total += f" of {format_bytes(limit)} ({100 * memory['total'] / limit:.0f}%)"
    return f"{total} ({parts})"


def abstract_like(tree):
    """`tree`'s arrays as ShapeDtypeStructs with their shardings and weak types: what
    `jitted.lower` takes to find the executable that a call with `tree` compiled."""
    import jax

    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding,
                                                       weak_type=a.weak_type), tree)


def executable_memory(jitted, abstract_args: tuple, *static) -> dict[str, int] | None:
    """`memory_figures` of the executable `jitted` runs for these arguments. After a call with
    the same shapes, shardings and static arguments, jit finds that executable in its cache:
    nothing compiles again."""
    return memory_figures(jitted.lower(*abstract_args, *static).compile())
