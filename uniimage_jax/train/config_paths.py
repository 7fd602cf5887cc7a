"""The path fields of a training config, made absolute when a run starts.

A run's config is stored with every checkpoint and read back by the sampler, the exporter and
later stages (`init_from`, `pretrained.mllm` naming a stage), possibly from another directory:
relative paths in it would silently point elsewhere, and Orbax refuses them outright.
"""

from __future__ import annotations

from uniimage_jax import hub
from uniimage_jax.errors import UserError
from uniimage_jax.paths import absolute

# Every config field that names a file or directory ('' = not set).
PATH_FIELDS = ("init_from", "processor_dir", "pretrained.tbac", "pretrained.mllm",
               "pretrained.dit", "pretrained.vae", "data.path", "data.tfds_data_dir",
               "data.image_root", "eval.data.path", "eval.data.tfds_data_dir",
               "eval.data.image_root")


# Fields that may name a Hugging Face model id instead (uniimage_jax/hub.py): kept as typed, so the
# stored config means the same model on another machine; resolved where they are read.
HUB_FIELDS = ("processor_dir",)


def make_paths_absolute(config) -> None:
    """Rewrite `config`'s path fields (in place) as absolute paths; URLs and Hugging Face model
    ids (in HUB_FIELDS) stay as they are."""
    for name in PATH_FIELDS:
        *parents, leaf = name.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf in node and isinstance(node[leaf], str):
            node[leaf] = (hub.entered if name in HUB_FIELDS else absolute)(node[leaf])
    # the path fields that a data mixture's components set (each replaces data fields)
    data_leaves = {name.split(".", 1)[1] for name in PATH_FIELDS if name.startswith("data.")}
    for data in (config.get("data"), config.get("eval", {}).get("data")):
        if data is not None and data.get("mixture"):
            data.mixture = tuple(
                {k: absolute(v) if k in data_leaves and isinstance(v, str) else v
                 for k, v in component.items()} if isinstance(component, dict) else component
                for component in data.mixture)


# Checked at start-up (local paths; a URL is only read when used). Data paths are checked by
# the data sources, which also parse them.
MUST_EXIST = ("init_from", "processor_dir", "pretrained.tbac", "pretrained.mllm",
              "pretrained.dit", "pretrained.vae")


def check_paths_exist(config) -> None:
    """ValueError naming the first path field whose (local) path does not exist: seconds after
    the start rather than after the model is built. A Hugging Face model id is fetched (or found
    in the Hub cache) here, for the same reason."""
    import os

    from uniimage_jax.paths import is_url

    for name in MUST_EXIST:
        node = config
        for part in name.split("."):
            node = node[part]
        if name in HUB_FIELDS and hub.is_hub_id(node):
            hub.resolve(node, files=hub.PROCESSOR, what=f"config.{name}")
        elif node and not is_url(node) and not os.path.exists(node):
            raise UserError(f"config.{name}={node!r} does not exist")
