"""The shard files that one `data.path` names, in order, with their sizes (local or `gs://`).

A WebDataset set is given the way its users already write it:
- a brace pattern, `shards/{00000..01023}.tar` or `{a,b}/{0..9}.tar` (expanded with
  `braceexpand`, what the `webdataset` package itself uses), in its order;
- a glob, `shards/*.tar`, in name order;
- a directory: every `*.tar` directly inside it, in name order (a published set as downloaded);
- a list file (any file not ending in `.tar`): one shard per line, relative to the list file's
  directory unless absolute or a URL; blank lines and `#` comments ignored;
- one `.tar` file.

Sizes come from one listing per directory (not one request per shard), so a thousand shards on a
bucket resolve in a second or two; they key the member-index cache (tar_index.py).
"""

from __future__ import annotations

import os
import posixpath

from uniimage_jax import storage
from uniimage_jax.errors import ConfigError
from uniimage_jax.paths import is_url

SHARD_SUFFIX = ".tar"
_GLOB_CHARS = set("*?[")


def _parent(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def _sizes(paths: list[str], field: str, spec: str) -> list[tuple[str, int]]:
    """(path, size) of each of `paths`, listing each parent directory once."""
    listed: dict[str, dict[str, int]] = {}
    out, missing = [], []
    for p in paths:
        parent = _parent(p)
        if parent not in listed:
            try:
                listed[parent] = storage.list_files(parent or ".")
            except FileNotFoundError:
                listed[parent] = {}
        files = listed[parent]
        key = p if parent else os.path.join(".", p)
        size = files.get(key, files.get(os.path.normpath(key)))
        if size is None:
            missing.append(p)
        else:
            out.append((p, size))
    if missing:
        raise ConfigError(f"{field}={spec!r}: {len(missing)} of {len(paths)} shards not found, "
                          f"e.g. {missing[0]}")
    return out


def _list_file(path: str, field: str) -> list[str]:
    base = _parent(path)
    shards = []
    for lineno, raw in enumerate(storage.read_text(path).splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not (os.path.isabs(line) or is_url(line)):
            line = storage.join(base, line) if is_url(base) else os.path.join(base, line)
        shards.append(line)
    if not shards:
        raise ConfigError(f"{field}={path!r}: the shard list file names no shard")
    return shards


def resolve_shards(spec: str, field: str = "data.path") -> list[tuple[str, int]]:
    """[(shard path, size in bytes), ...] that `spec` names (see the module docstring);
    ConfigError naming `field` when it names nothing or a shard is missing."""
    spec = os.fspath(spec).strip()
    if not spec:
        raise ConfigError(f"{field} is empty: give the shards (a directory, a brace pattern "
                          "such as 'shards/{00000..00099}.tar', a glob or a list file)")
    if "{" in spec:
        from braceexpand import braceexpand

        paths = list(braceexpand(spec))
        if not paths:
            raise ConfigError(f"{field}={spec!r}: the brace pattern expands to nothing")
        return _sizes(paths, field, spec)
    if _GLOB_CHARS & set(spec.split("://", 1)[-1]):
        found = storage.glob_files(spec)
        if not found:
            raise ConfigError(f"{field}={spec!r}: no file matches the glob")
        return list(found.items())
    target = storage.path(spec)
    if target.is_dir():
        found = {p: s for p, s in storage.list_files(spec).items() if p.endswith(SHARD_SUFFIX)}
        if not found:
            raise ConfigError(f"{field}={spec!r}: the directory holds no {SHARD_SUFFIX} file")
        return list(found.items())
    if not target.exists():
        raise ConfigError(f"{field}={spec!r} does not exist")
    if spec.endswith(SHARD_SUFFIX):
        return _sizes([spec], field, spec)
    return _sizes(_list_file(spec, field), field, spec)
