"""The compiled training step: one `jax.jit` over (state, frozen tree, batch) with explicit
shardings and the state donated. The per-step RNG is `fold_in(state.rng, step)`, so a resumed run
draws what the uninterrupted one would have drawn."""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax

from uniimage_jax.checkpoints.partition import merge_params
from uniimage_jax.models import lora
from uniimage_jax.models.uniimage import UniImage
from uniimage_jax.train import captioning
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
    the batch keep the shardings they arrive with; the image grid (ti2i) is static."""
    return jax.jit(make_train_step(model, tx, config),
                   in_shardings=(state_shardings, None, None),
                   out_shardings=(state_shardings, None), donate_argnums=(0,),
                   static_argnums=(3,))


def make_train_step(model: UniImage, tx, config):
    split_prompt = config.split_prompt
    scheme = config.timestep_sampling
    captioning_task = config.task == "caption"

    def train_step(state: TrainState, frozen, batch, grid=None):
        rng = jax.random.fold_in(state.rng, state.step)
        batch = dict(batch)
        if grid is not None:
            pv = batch["pixel_values"]
            batch["pixel_values"] = pv.reshape(-1, pv.shape[-1])
            batch["image_grid_thw"] = grid

        def loss_fn(trainable):
            params = merge_params(trainable, frozen)
            if captioning_task:
                with lora.adapters(model.config.lora):
                    return captioning.caption_loss(model.mllm, params["mllm"], batch)
            loss, _ = model.loss(params, batch, rng, split_prompt=split_prompt,
                                 timestep_sampling=scheme)
            return loss

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, loss=loss)
        params = apply_updates_or_skip(state.params, updates, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
                   **spike_metrics(opt_state)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step
