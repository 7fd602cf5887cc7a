"""Converted checkpoint directories: an Orbax parameter tree plus the model config (and, for a
converted official checkpoint, the record of its source keys), written atomically and read back
per component kind ('mllm', 'dit', 'vae', 'tbac'). A directory may be local or on Cloud Storage
(`gs://`); there it is written locally first and uploaded with its JSON files last, and a
directory without `uniimage_config.json` (an interrupted upload) is not a converted checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from uniimage_jax import storage
from uniimage_jax.paths import absolute

CONFIG_FILE = "uniimage_config.json"
PARAMS_DIR = "params"
SOURCE_KEYS_FILE = "source_keys.json"


def save_converted(dst: str, params: Mapping[str, Any], config: Mapping[str, Any],
                   overwrite: bool = False, keys: list[dict[str, Any]] | None = None) -> str:
    """Write `params` (Orbax), `config` (JSON) and optionally the source key record to `dst`
    atomically.

    Everything is written to a temporary sibling directory first and renamed into place at the
    end, so an interrupted or failed conversion never leaves a half-written `dst`.
    """
    import orbax.checkpoint as ocp

    with atomic_directory(dst, overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as fh:
            json.dump(dict(config), fh, indent=2, sort_keys=True)
        if keys is not None:
            with open(os.path.join(tmp, SOURCE_KEYS_FILE), "w") as fh:
                json.dump(keys, fh)
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, PARAMS_DIR), dict(params))
        ckptr.wait_until_finished()
    return absolute(dst)


@contextlib.contextmanager
def atomic_directory(dst: str, overwrite: bool = False):
    """Yield a temporary sibling directory of `dst`; on success it replaces `dst` in one rename,
    on any error it is removed, so `dst` is never left half-written. On Cloud Storage, where a
    directory cannot be renamed into place, the temporary directory is local and uploaded on
    success (the JSON files last, see `storage.upload_dir`), after an old `dst` is deleted."""
    dst = absolute(dst)
    if storage.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    if storage.is_remote(dst):
        with _uploaded_directory(dst) as tmp:
            yield tmp
        return
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _uploaded_directory(dst: str):
    tmp = tempfile.mkdtemp(prefix="uniimage_upload_")
    try:
        yield tmp
        storage.remove_tree(dst)
        storage.upload_dir(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_converted(src: str, abstract_params=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config dict, params) from a directory written by `save_converted`.

    With `abstract_params` (e.g. `jax.eval_shape` of an init, possibly carrying shardings), the
    restore is checked against it and placed accordingly.
    """
    import orbax.checkpoint as ocp

    src = absolute(src)  # Orbax restores from absolute paths only
    cfg_path = storage.join(src, CONFIG_FILE)
    if not storage.exists(cfg_path):
        raise FileNotFoundError(f"{src} is not a converted checkpoint: {CONFIG_FILE} is missing")
    config = json.loads(storage.read_text(cfg_path))
    ckptr = ocp.StandardCheckpointer()
    params = ckptr.restore(storage.path(storage.join(src, PARAMS_DIR)), abstract_params)
    return config, params


def load_kind(src: str, kind: str, abstract_params=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the `kind` part of the config, params) of a converted directory; an error names the kind
    found when it is not `kind` ('mllm', 'dit', 'vae', 'tbac')."""
    meta, params = load_converted(src, abstract_params)
    if meta.get("kind") != kind:
        raise ValueError(f"{src} holds a {meta.get('kind')!r} checkpoint, not {kind!r}")
    return meta[kind], params



def load_qwen(src: str, abstract_params=None):
    """(Qwen2_5_VLConfig, params) of a converted MLLM. With `abstract_params` (an abstract tree
    carrying shardings) the restore is checked against it and placed by it."""
    from uniimage_jax.models.qwen2_5_vl import Qwen2_5_VLConfig

    config, params = load_kind(src, "mllm", abstract_params)
    return Qwen2_5_VLConfig.from_dict(config), params


def load_sana(path: str, abstract=None):
    """(SanaConfig, params) of a converted DiT; `abstract` as for `load_qwen`."""
    from uniimage_jax.models.sana import SanaConfig

    config, params = load_kind(path, "dit", abstract)
    return SanaConfig.from_dict(config), params


def load_dc_ae(src: str):
    """(DCAEConfig, params) of a converted DC-AE."""
    from uniimage_jax.models.dc_ae import DCAEConfig

    config, params = load_kind(src, "vae")
    return DCAEConfig.from_dict(config), params


def load_tbac(path: str):
    """(UniImageConfig, params) of a converted TBAC-UniImage."""
    from uniimage_jax.models.uniimage import UniImageConfig

    config, params = load_kind(path, "tbac")
    return UniImageConfig.from_dict(config), params
