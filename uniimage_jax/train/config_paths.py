"""The path fields of a training config, made absolute when a run starts.

A run's config is stored with every checkpoint and read back by the sampler, the exporter and
later stages (`init_from`, `pretrained.mllm` naming a stage), possibly from another directory:
relative paths in it would silently point elsewhere, and Orbax refuses them outright.
"""

from __future__ import annotations

from uniimage_jax.paths import absolute

# Every config field that names a file or directory ('' = not set).
PATH_FIELDS = ("init_from", "processor_dir", "pretrained.tbac", "pretrained.mllm",
               "pretrained.dit", "pretrained.vae", "data.path", "data.tfds_data_dir")


def make_paths_absolute(config) -> None:
    """Rewrite `config`'s path fields (in place) as absolute paths; URLs stay as they are."""
    for name in PATH_FIELDS:
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf in node and isinstance(node[leaf], str):
            node[leaf] = absolute(node[leaf])
