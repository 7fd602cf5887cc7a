"""Our parameters -> the official TBAC-UniImage state dict (safetensors), loadable by the official
PyTorch code.

    uniimage-convert export-tbac --src CHECKPOINT_DIR [--keys-from CONVERTED_TBAC_DIR] --dst OUT

CHECKPOINT_DIR is a converted TBAC-UniImage directory or a training stage directory (its latest
step, with the frozen towers from the weights it was trained from; its EMA weights when it kept
them, unless `--weights raw`; the choice is printed). The official key names, shapes,
dtypes and the embedding-table row layout come from the record (`source_keys.json`) written when
the official checkpoint was converted: from CHECKPOINT_DIR itself, else from `--keys-from` (by
default the `pretrained.tbac` directory a training stage started from). Each tensor is written
back in its original dtype and layout, so a converted-then-exported checkpoint equals the
original bit for bit; the record also carries the source's `config.json` and safetensors header
metadata, written back unchanged (a record from before it did gives
`{"num_metaqueries": N}` and no metadata).
"""

from __future__ import annotations

import json
import os

import numpy as np

from uniimage_jax import storage
from uniimage_jax.checkpoints import converted
from uniimage_jax.errors import ConversionError
from uniimage_jax.models import param_tree
from uniimage_jax.paths import absolute

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
           "I32": np.int32, "BOOL": np.bool_}
SHARD_BYTES = 4 << 30


def _np_dtype(name: str):
    if name == "BF16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if name not in _DTYPES:
        raise ValueError(f"cannot export tensors of safetensors dtype {name}")
    return _DTYPES[name]


def inverse_default_transform(leaf: str, x: np.ndarray) -> np.ndarray:
    """Inverse of `key_plan.default_transform`."""
    if leaf != "kernel" or x.ndim < 2:
        return x
    if x.ndim == 2:
        return x.T
    n = x.ndim  # Flax (*spatial, I, O) -> PyTorch (O, I, *spatial)
    return np.transpose(x, (n - 1, n - 2, *range(n - 2)))


def export_state_dict(params, record: list[dict]) -> dict[str, np.ndarray]:
    """{official key: array} from our parameter tree and a conversion record."""
    flat = {"/".join(p): v for p, v in param_tree.flatten(params).items()}
    missing = sorted({r["path"] for r in record} - set(flat))
    if missing:
        raise ConversionError("parameters", missing=missing)
    out: dict[str, np.ndarray] = {}
    for r in record:
        x = inverse_default_transform(r["path"].rsplit("/", 1)[-1], np.asarray(flat[r["path"]]))
        dtype = _np_dtype(r["dtype"])
        if r["rows"] is None:
            if list(x.shape) != r["shape"]:
                raise ValueError(f"{r['path']} has shape {list(x.shape)}, the record says "
                                 f"{r['shape']} for {r['key']}")
            out[r["key"]] = x.astype(dtype)
        else:
            buf = out.setdefault(r["key"], np.zeros(r["shape"], dtype))
            start, stop = r["rows"]
            buf[start:stop] = x.astype(dtype)
    return out


def write_safetensors(tensors: dict[str, np.ndarray], dst: str, overwrite: bool = False,
                      json_files: dict[str, dict] | None = None,
                      metadata: dict[str, str] | None = None) -> str:
    """`model.safetensors`, or 4 GiB shards + `model.safetensors.index.json`, and `json_files`
    (name -> content), written atomically into the directory `dst`; `metadata` is every
    safetensors header's `__metadata__`."""
    from safetensors.numpy import save_file

    with converted.atomic_directory(dst, overwrite) as tmp:
        shards, current, size = [], {}, 0
        for k in sorted(tensors):
            if current and size + tensors[k].nbytes > SHARD_BYTES:
                shards.append(current)
                current, size = {}, 0
            current[k] = np.ascontiguousarray(tensors[k])
            size += tensors[k].nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, name), metadata=metadata)
                weight_map.update({k: name for k in shard})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
                json.dump({"metadata": {}, "weight_map": weight_map}, fh, indent=2)
        for name, content in (json_files or {}).items():
            with open(os.path.join(tmp, name), "w") as fh:
                json.dump(content, fh, indent=2)
    return absolute(dst)


def read_record(path: str) -> dict:
    """{"tensors": per-tensor layout, "config_json": dict | None, "safetensors_metadata": dict |
    None} from a converted directory (a bare list of tensors is the record of older versions)."""
    f = storage.join(path, converted.SOURCE_KEYS_FILE)
    if not storage.exists(f):
        raise FileNotFoundError(f"{path} has no {converted.SOURCE_KEYS_FILE}: pass --keys-from "
                                "with the directory `uniimage-convert tbac` wrote")
    record = json.loads(storage.read_text(f))
    if isinstance(record, list):
        record = {"tensors": record}
    return {"config_json": None, "safetensors_metadata": None, **record}
