"""The XLA flags of the test processes and of every subprocess they start.

The suite checks values, never speed, and compiles thousands of tiny programs (each training
subprocess recompiles its own: JAX's persistent cache serves the second process of a
multi-process job nothing, since only process 0 writes it and the CPU topology each process
hashes into its keys differs). LLVM's optimisation level 0 makes them cheaper to compile (a cold
tiny training run: 51 -> 37 s here) and changes how fast the code runs, not what it computes:
XLA's CPU backend enables no fast-math, so no level may reorder floating-point operations (the
suite's bitwise and parity assertions hold under it).
"""
import os

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_fast_compile(flags: str) -> str:
    """`flags` with FAST_COMPILE added (once)."""
    return flags if FAST_COMPILE in flags else f"{flags} {FAST_COMPILE}".strip()


def with_devices(count: int) -> str:
    """XLA_FLAGS for a subprocess with `count` CPU devices (and this suite's other flags)."""
    return with_fast_compile(f"--xla_force_host_platform_device_count={count}")


os.environ["XLA_FLAGS"] = with_fast_compile(os.environ.get("XLA_FLAGS", ""))
