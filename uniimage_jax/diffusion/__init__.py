"""Flow matching: the training noise/targets/loss and the samplers' schedulers."""
