"""The compiled training step: one `jax.jit` over (state, frozen tree, batch) with explicit
shardings and the state donated. The per-step RNG is `fold_in(state.rng, step)`, so a resumed run
draws what the uninterrupted one would have drawn."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import optax

from uniimage_jax.checkpoints.partition import merge_params
from uniimage_jax.models import lora
from uniimage_jax.models.uniimage import UniImage
from uniimage_jax.train import captioning, sharding
from uniimage_jax.train.optimizer import apply_updates_or_skip, spike_metrics


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any        # the trainable tree only
    opt_state: Any
    rng: jax.Array
    ema: Any = None    # EMA of `params` when config.ema.enabled (train/ema.py), else None


def jit_train_step(model: UniImage, tx, config, state_shardings):
    """The compiled step: the state laid out as `state_shardings` and donated; the frozen tree and
    the batch keep the shardings they arrive with; the image grid (ti2i) is static. The step is
    traced on the mesh of `state_shardings`, so the model's activation constraints act."""
    mesh = next((s.mesh for s in jax.tree.leaves(state_shardings)
                 if isinstance(s, jax.sharding.NamedSharding)), None)
    return jax.jit(make_train_step(model, tx, config, mesh),
                   in_shardings=(state_shardings, None, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,),
                   static_argnums=(3,))


def make_train_step(model: UniImage, tx, config, mesh=None):
    """The pure step. With `mesh` it is traced on that mesh under the config's logical-axis
    rules, so the activation constraints in the model code (`nn.with_logical_constraint`) act;
    without one they stay no-ops. The ti2i image grid is that of ONE row: the vision tower runs
    per row, each device on its own rows."""
    split_prompt = config.split_prompt
    scheme = config.timestep_sampling
    captioning_task = config.task == "caption"
    rules = sharding.rules_from_config(getattr(config, "logical_rules", ()))

    def train_step(state: TrainState, frozen, batch, grid=None):
        if mesh is None:
            return _step(state, frozen, batch, grid)
        # Flax reads the mesh of its constraints from the abstract-mesh context (a legacy
        # `with mesh:` around the call does not set it).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return _step(state, frozen, batch, grid)

    def _step(state: TrainState, frozen, batch, grid):
        rng = jax.random.fold_in(state.rng, state.step)
        batch = dict(batch)
        if grid is not None:
            batch["image_grid_thw"] = grid

        def loss_fn(trainable):
            params = merge_params(trainable, frozen)
            if captioning_task:
                with lora.adapters(model.config.lora):
                    return captioning.caption_loss(model.mllm, params["mllm"], batch)
            # Cached latents (the frozen autoencoder already applied, once per dataset)
            # replace the target images; otherwise the images are encoded here.
            loss, _ = model.loss(params, batch, rng, latents=batch.get("latents"),
                                 split_prompt=split_prompt, timestep_sampling=scheme)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
        params = apply_updates_or_skip(state.params, updates, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   **spike_metrics(opt_state)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
