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


# Checked at start-up (a local path, or one stat of a gs:// object or prefix). Data paths are
# checked by the data sources, which also parse them.
MUST_EXIST = ("init_from", "processor_dir", "pretrained.tbac", "pretrained.mllm",
              "pretrained.dit", "pretrained.vae")


def check_paths_exist(config) -> None:
    """UserError naming the first path field whose path (local or gs://) does not exist, or that
    is on a bucket where only a local path can be read: seconds after the start rather than
    after the model is built."""
    from uniimage_jax import storage

    data = config.data
    if data.source == "tfds" and data.tfds_data_dir and storage.is_remote(data.tfds_data_dir):
        # ArrayRecord's reader has no Cloud Storage driver: against a bucket it fails or hangs.
        raise UserError(f"config.data.tfds_data_dir={data.tfds_data_dir!r}: TFDS datasets are "
                        "read with ArrayRecord, which opens local files only; copy the dataset "
                        "to a local disk or mount the bucket (gcsfuse) and give the local path")
    for name in MUST_EXIST:
        node = config
        for part in name.split("."):
            node = node[part]
        if node and not storage.exists(node):
            raise UserError(f"config.{name}={node!r} does not exist")
