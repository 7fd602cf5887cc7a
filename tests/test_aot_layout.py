"""The ahead-of-time path lays out the abstract train state exactly as the trainer lays out the
real one (4 fake CPU devices, fsdp x data mesh, the tiny preset): same tree, shapes, dtypes and
shardings for the trainable parameters, the optimiser state, the step, the RNG and the frozen
towers. Runs without libtpu."""
import os
import subprocess
import sys

from tests.xla_env import with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CODE = """
import jax, jax.numpy as jnp
from uniimage_jax.bench import aot
from uniimage_jax.train import sharding, trainer
from uniimage_jax.train import stage_setup
from uniimage_jax.train import step as train_step
from uniimage_jax.train.optimizer import make_optimizer

config = aot.stage_config("tiny", "t2i", overrides=["mesh.data=2", "mesh.fsdp=2",
                                                     "frozen_dtype='bfloat16'"])
model = stage_setup.build_model(config)
mesh = sharding.make_mesh(config.mesh)
rules = sharding.rules_from_config(config.logical_rules)
tx = make_optimizer(config.optimizer)
with jax.set_mesh(mesh):
    # What trainer.train does with real arrays.
    trainable, frozen = stage_setup.split_params(stage_setup.base_params(config, model, mesh, rules),
                                             config, model)
    state = stage_setup.initial_state(trainable, tx, mesh, seed=config.seed, ema=False)
    abstract_state, abstract_frozen = aot.abstract_train_state(config, model, mesh, tx)

def layout(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, [(x.shape, jnp.dtype(x.dtype), x.sharding.spec, x.sharding.mesh.shape)
                     for x in leaves]

for name, real, abstract in (("state", state, abstract_state), ("frozen", frozen, abstract_frozen)):
    (t1, l1), (t2, l2) = layout(real), layout(abstract)
    assert t1 == t2, (name, t1, t2)
    bad = [(i, a, b) for i, (a, b) in enumerate(zip(l1, l2)) if a != b]
    assert not bad, (name, bad[:5])
sharded = [s for _, _, s, _ in layout(abstract_state.params)[1] if any(s)]
assert sharded, "no trainable leaf is sharded: the check would be vacuous"
assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(abstract_frozen)
        if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}
print("OK", len(jax.tree.leaves(abstract_state)), len(sharded))
"""


def test_abstract_state_matches_the_trainers_real_state():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=with_devices(4))
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.startswith("OK"), out.stdout
