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


# Checked at start-up (a local path, or one stat of a gs:// object or prefix). Data paths are
# checked by the data sources, which also parse them.
MUST_EXIST = ("init_from", "processor_dir", "pretrained.tbac", "pretrained.mllm",
              "pretrained.dit", "pretrained.vae")


def check_paths_exist(config) -> None:
    """UserError naming the first path field whose path (local or gs://) does not exist, or that
    is on a bucket where only a local path can be read: seconds after the start rather than
    after the model is built. A Hugging Face model id is fetched (or found in the Hub cache)
    here, for the same reason."""
    from uniimage_jax import storage

    for name in ("data", "eval.data"):
        data = config
        for part in name.split("."):
            data = data.get(part) if data is not None else None
        if data is not None and data.source == "tfds" and data.tfds_data_dir \
                and storage.is_remote(data.tfds_data_dir):
            # ArrayRecord's reader has no Cloud Storage driver: against a bucket it fails or
            # hangs.
            raise UserError(f"config.{name}.tfds_data_dir={data.tfds_data_dir!r}: TFDS datasets "
                            "are read with ArrayRecord, which opens local files only; copy the "
                            "dataset to a local disk or mount the bucket (gcsfuse) and give the "
                            "local path")
    for name in MUST_EXIST:
        node = config
        for part in name.split("."):
            node = node[part]
        if name in HUB_FIELDS and hub.is_hub_id(node):
            hub.resolve(node, files=hub.PROCESSOR, what=f"config.{name}")
        elif node and not storage.exists(node):
            raise UserError(f"config.{name}={node!r} does not exist")
