"""The parameters a training step reads, and the frozen ones left out of its arguments.

The frozen towers hold more than a t2i or ti2i step reads:
* the MLLM's decoder layers above the deepest one the ladder reads (hidden state k is the output
  of layer k-1: the official ladder of the 3B model reads states 16..35, so its 36th layer is
  never run); the prompt pass and the query pass run only the layers the tree holds
  (`UniImage._conditioning_mllm`);
* the vision tower, in a text-to-image stage (no prompt holds an image);
* the autoencoder's decoder (training never decodes), and its encoder when the batches carry
  cached latents (`data.source='latents'`);
* the two unused embedding rows a converted checkpoint keeps for its export.

Left in the step's arguments they cost HBM on every chip (the 3B model's vision tower alone is
1.3 GB in bf16) and, where they are laid out like trained weights, collectives. `for_stage` is
what a stage loads and keeps on device (the step's parameters, plus the decoder when the stage
draws sample sheets); `for_step` is what the step is given. Caption stages train the MLLM
through its language-model head and keep everything.
"""

from __future__ import annotations

from uniimage_jax.models.qwen2_5_vl import keep_layers


def _trims(config) -> bool:
    return config.task in ("t2i", "ti2i")


def for_stage(params, config, model):
    """`params` (a whole model tree: arrays, host arrays or ShapeDtypeStructs) without what
    neither the step nor the stage's sample sheets read."""
    if not _trims(config):
        return params
    out = {k: v for k, v in params.items() if k != "extra_embedding_rows"}
    mllm = dict(out["mllm"])
    model_part = dict(mllm["model"])
    if config.task != "ti2i":
        model_part.pop("visual", None)
    mllm["model"] = model_part
    out["mllm"] = keep_layers(mllm, model.config.conditioning_depth)
    vae = dict(out.get("vae", {}))
    if config.data.source == "latents":
        vae.pop("encoder", None)
    if not config.sample_every:
        vae.pop("decoder", None)
    out["vae"] = vae
    return out


def for_step(params, config):
    """The part of a `for_stage` tree (or its frozen half) the step reads: without the
    autoencoder's decoder, which only sample sheets use."""
    if not _trims(config) or "decoder" not in params.get("vae", {}):
        return params
    return {**params, "vae": {k: v for k, v in params["vae"].items() if k != "decoder"}}
