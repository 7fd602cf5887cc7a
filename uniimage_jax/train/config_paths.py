"""The path fields of a training config, made absolute when a run starts.

A run's config is stored with every checkpoint and read back by the sampler, the exporter and
later stages (`init_from`, `pretrained.mllm` naming a stage), possibly from another directory:
relative paths in it would silently point elsewhere, and Orbax refuses them outright.
"""

from __future__ import annotations

from uniimage_jax.errors import UserError
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
    # the path fields a data mixture's components set (each component replaces data fields)
    data_leaves = {name.split(".", 1)[1] for name in PATH_FIELDS if name.startswith("data.")}
    if "mixture" in config.get("data", {}) and config.data.mixture:
        config.data.mixture = tuple(
            {k: absolute(v) if k in data_leaves and isinstance(v, str) else v
             for k, v in component.items()} if isinstance(component, dict) else component
            for component in config.data.mixture)


# Checked at start-up (local paths; a URL is only read when used). Data paths are checked by
# the data sources, which also parse them.
MUST_EXIST = ("init_from", "processor_dir", "pretrained.tbac", "pretrained.mllm",
              "pretrained.dit", "pretrained.vae")


def check_paths_exist(config) -> None:
    """ValueError naming the first path field whose (local) path does not exist: seconds after
    the start rather than after the model is built."""
    import os

    from uniimage_jax.paths import is_url

    for name in MUST_EXIST:
        node = config
        for part in name.split("."):
            node = node[part]
        if node and not is_url(node) and not os.path.exists(node):
            raise UserError(f"config.{name}={node!r} does not exist")
