"""The trainer's per-device memory line reads the executable a step call compiled, from jit's
cache: no second compile (for the published model that would be minutes), whatever the
arguments' shardings, donation, weak types and static arguments."""
import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from uniimage_jax.train import compiled_memory

_compiles = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: _compiles.append(name) if "backend_compile" in name else None)


def _step(state, frozen, batch, grid):
    """A stand-in for the train step: state donated, a frozen tree, a batch, a static grid."""
    scale = 2.0 if grid is None else float(sum(grid))
    new = {"w": state["w"] * scale + frozen.sum() * state["lr"], "lr": state["lr"]}
    return new, {"loss": jnp.mean(batch @ state["w"])}


def test_the_memory_of_a_called_step_is_read_without_compiling_again():
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    state = {"w": jax.device_put(np.ones((64, 64), np.float32), rep),
             "lr": jax.device_put(jnp.asarray(0.5), rep)}   # a weakly typed scalar
    assert state["lr"].weak_type
    frozen = jax.device_put(np.ones((32,), np.float32), rep)
    batch = jax.device_put(np.ones((8, 64), np.float32), rows)
    step = jax.jit(_step, in_shardings=(jax.tree.map(lambda x: x.sharding, state), None, None),
                   donate_argnums=(0,), static_argnums=(3,))
    for grid in (None, (1, 2, 2)):
        abstract = compiled_memory.abstract_like((state, frozen, batch))
        before = len(_compiles)
        state, _ = step(state, frozen, batch, grid)
        assert len(_compiles) == before + 1     # the call compiled the step
        memory = compiled_memory.executable_memory(step, abstract, grid)
        assert len(_compiles) == before + 1     # ... and reading its memory did not
        assert memory["argument"] >= 64 * 64 * 4 + 8 * 64 * 4
        assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    line = compiled_memory.describe_memory(memory, limit=2 * 1024 ** 3)
    assert line.startswith(f"{memory['total'] / 1024 ** 2:.1f} MiB per device of 2.00 GiB")
