"""The keys of the examples and host batches the data pipeline yields that more than one layer
reads: the pipeline (which needs grain) and the trainer's batch assembly (which must not, so that
it runs where grain is not installed) both import them from here."""

# An example encoder's arrays (`uniimage_jax.train.batches.ExampleEncoder`): a dict of numpy
# arrays per example, stacked on a leading batch axis by the pipeline.
MODEL_INPUTS = "model_inputs"


def target_key(example_or_batch) -> str:
    """Which key holds the generation target of an example or a host batch: "latents" (a latent
    cache's scaled latents; the step skips the autoencoder) or "target" (images in [-1, 1])."""
    return "latents" if "latents" in example_or_batch else "target"
