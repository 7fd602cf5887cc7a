"""Where bytes live: one API for local paths and Cloud Storage (`gs://bucket/...`).

Every read and write of a path a user typed goes through here (or through `path(p)`, an
`etils.epath.Path`, the API Orbax uses too), so that a local directory, a bucket and a test's
local emulator are the same code path. `gs://` goes through `gcsfs` (fsspec), never through
TensorFlow's gfile: TensorFlow is installed alongside for TFDS sources, and epath would otherwise
prefer it, but gfile cannot be pointed at a local emulator (it always dials www.googleapis.com)
and retries differently. `uniimage_jax/__init__.py` makes that choice (EPATH_USE_TF=false) before
anything opens a path.

Atomicity: `write_bytes` / `write_text` never leave a half-written file under the final name. A
local file is written under a temporary name in the same directory and renamed; a Cloud Storage
object appears only when its upload completes, so it is written in place. Files are created with
the usual mode under the process's umask (0o666 & ~umask), never the 0o600 of `mkstemp`.

Transient errors of the bucket (429, 5xx, dropped connections) are retried by the clients
themselves: gcsfs retries a request 6 times with exponential backoff (about 30 s in all),
tensorstore (Orbax's arrays) by its own policy. A longer outage surfaces as an error.

Libraries that need a real local file (ArrayRecord readers, `safetensors.safe_open`) get one
from `local_copy`, which downloads a remote file once into a local cache and returns a local path
unchanged; `local_mirror` does the same for a whole directory (a memory-mapped Arrow table, a
tokenizer's files, a PyTorch checkpoint to convert). Data sets read pieces: `read_range` is one
ranged request (a tar shard's sample), `list_files` / `glob_files` give many files' sizes from
one listing.

Directories on Cloud Storage cannot appear in one step: `upload_dir` sends a locally written
directory file by file and its JSON files last, so a reader that checks for the JSON a complete
directory holds (a converted checkpoint's `uniimage_config.json`, an export's `config.json`)
never takes an interrupted upload for a finished one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import IO

from etils import epath

from uniimage_jax.paths import is_url


def is_remote(p: str | os.PathLike) -> bool:
    """Whether `p` names an object store location (gs://, s3://, ...), not a local file."""
    text = os.fspath(p)
    return is_url(text) and not text.startswith("file://")


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an `etils.epath.Path` (local or remote), for the operations not wrapped here
    (exists, iterdir, glob, mkdir, stat, unlink, rmtree, ...)."""
    return epath.Path(os.fspath(p))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` as a string, for local paths and URLs alike (`os.path.join` would also
    work on `gs://` strings on POSIX, but says nothing of the intent)."""
    out = os.fspath(base)
    for part in parts:
        out = out.rstrip("/") + "/" + part.lstrip("/") if out else part
    return out


def _fsspec(url: str):
    """The fsspec filesystem epath uses for `url` (gcsfs for gs://), for transfers that epath
    does not offer between a local file and a remote one."""
    from etils.epath import backend

    return backend.fsspec_backend.fs(url)


def exists(p: str | os.PathLike) -> bool:
    return path(p).exists()


def is_dir(p: str | os.PathLike) -> bool:
    """Whether `p` is a directory (on Cloud Storage: a prefix with objects under it)."""
    return path(p).is_dir()


def is_file(p: str | os.PathLike) -> bool:
    return path(p).is_file()


def listdir(p: str | os.PathLike) -> list[str]:
    """The sorted names of the entries directly under directory `p` ([] when it is absent)."""
    directory = path(p)
    if not directory.is_dir():
        return []
    return sorted(child.name for child in directory.iterdir())


def remove_tree(p: str | os.PathLike) -> None:
    """Delete directory `p` and everything under it (nothing when it is absent)."""
    directory = path(p)
    if directory.exists():
        directory.rmtree()


def read_bytes(p: str | os.PathLike) -> bytes:
    """The whole file. A remote object is fetched in one request (`cat_file`): a file object
    would read ahead in a background task that is still pending when a short-lived process
    exits, and asyncio then prints its traceback."""
    source = os.fspath(p)
    if is_remote(source):
        return _fsspec(source).cat_file(source)
    with open(source, "rb") as fh:
        return fh.read()


def read_text(p: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(p).decode(encoding)


def open_file(p: str | os.PathLike, mode: str = "rb") -> IO:
    """A file object; on Cloud Storage a read is seekable and fetches byte ranges on demand."""
    return path(p).open(mode)


def read_range(p: str | os.PathLike, start: int, length: int) -> bytes:
    """`length` bytes of file `p` from byte `start` (fewer where the file ends first): one
    ranged request on Cloud Storage, with no metadata request before it."""
    source = os.fspath(p)
    if is_remote(source):
        return _fsspec(source).cat_file(source, start=int(start), end=int(start) + int(length))
    with open(source, "rb") as fh:
        fh.seek(int(start))
        return fh.read(int(length))


def list_files(directory: str | os.PathLike) -> dict[str, int]:
    """{path: size in bytes} of the files directly inside `directory`, sorted by name (one
    listing on Cloud Storage). FileNotFoundError when it is not a directory."""
    source = os.fspath(directory)
    if is_remote(source):
        fs = _fsspec(source)
        entries = fs.ls(source.rstrip("/"), detail=True)
        files = {fs.unstrip_protocol(e["name"]): int(e["size"]) for e in entries
                 if e.get("type") == "file"}
        if not files and not fs.isdir(source):
            raise FileNotFoundError(source)
        return dict(sorted(files.items()))
    if not os.path.isdir(source):
        raise FileNotFoundError(source)
    return dict(sorted((e.path, e.stat().st_size) for e in os.scandir(source) if e.is_file()))


def glob_files(pattern: str | os.PathLike) -> dict[str, int]:
    """{path: size in bytes} of the files matching a glob `pattern` (`*`, `?`, `[...]`), sorted
    by name."""
    text = os.fspath(pattern)
    if is_remote(text):
        fs = _fsspec(text)
        found = fs.glob(text, detail=True)
        return dict(sorted((fs.unstrip_protocol(name), int(info["size"]))
                           for name, info in found.items() if info.get("type") == "file"))
    import glob

    return dict(sorted((p, os.path.getsize(p)) for p in glob.glob(text) if os.path.isfile(p)))


def makedirs(p: str | os.PathLike) -> None:
    """Create directory `p` and its parents (on Cloud Storage directories are implicit)."""
    if is_remote(p):
        return
    os.makedirs(os.fspath(p), exist_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `p` atomically (see the module docstring); the parent must exist
    locally (it is created if missing)."""
    target = os.fspath(p)
    if is_remote(target):
        path(target).write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_text(p: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(p, text.encode(encoding))


def upload(local_file: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy a local file to `dest` (local or remote) without ever showing a partial file."""
    src, target = os.fspath(local_file), os.fspath(dest)
    if is_remote(target):
        _fsspec(target).put_file(src, target)
        return
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(target)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def upload_dir(local_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy every file under `local_dir` to the same relative path under `dest` (remote: many
    transfers at once, each object appearing only when complete; local: file by file through
    `upload`). The JSON files go last, one by one in the order of their relative paths, after
    all the others are complete (see the module docstring)."""
    root = os.fspath(local_dir)
    files = sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    rest = [f for f in files if not f.endswith(".json")]
    targets = {f: join(dest, *os.path.relpath(f, root).split(os.sep)) for f in files}
    if is_remote(dest) and rest:
        _fsspec(os.fspath(dest)).put(rest, [targets[f] for f in rest])
    else:
        for f in rest:
            upload(f, targets[f])
    for f in sorted((f for f in files if f.endswith(".json")),
                    key=lambda f: os.path.relpath(f, root)):
        upload(f, targets[f])


def default_cache_dir() -> str:
    """Where remote files are copied for libraries that need local files:
    $UNIIMAGE_CACHE, else $XDG_CACHE_HOME/uniimage_jax, else ~/.cache/uniimage_jax."""
    root = os.environ.get("UNIIMAGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "uniimage_jax")
    return os.path.join(root, "remote")


def local_copy(p: str | os.PathLike, cache_dir: str | None = None) -> str:
    """A local path holding the bytes of `p`: `p` itself when local; for a remote file, a copy
    under `cache_dir` (default `default_cache_dir()`), downloaded once and reused while the
    object's size and modification time are unchanged (a changed object is fetched again)."""
    source = os.fspath(p)
    if not is_remote(source):
        return source
    info = path(source).stat()
    key = hashlib.sha256(f"{source}|{info.length}|{info.mtime}".encode()).hexdigest()[:24]
    target = os.path.join(cache_dir or default_cache_dir(), key,
                          source.rstrip("/").rsplit("/", 1)[-1])
    if os.path.exists(target) and os.path.getsize(target) == info.length:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
    os.close(fd)
    try:
        _fsspec(source).get_file(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def local_mirror(directory: str | os.PathLike, cache_dir: str | None = None,
                 suffixes: tuple[str, ...] | None = None) -> str:
    """A local directory holding the files under `directory` (recursively; only those whose
    names end with one of `suffixes`, when given): `directory` itself when local; for a remote
    one, a copy under `cache_dir` (default `default_cache_dir()`) made once and reused while no
    file under it changed (a changed listing makes a new copy; files already copied whole are
    kept when an interrupted copy is resumed)."""
    source = os.fspath(directory).rstrip("/")
    if not is_remote(source):
        return source
    fs = _fsspec(source)
    found = fs.find(source, detail=True)
    if not found:
        raise FileNotFoundError(source)
    listing = sorted((fs.unstrip_protocol(name), int(info["size"]),
                      str(info.get("generation") or info.get("mtime") or info.get("updated")))
                     for name, info in found.items()
                     if suffixes is None or name.endswith(suffixes))
    key = hashlib.sha256(repr((source, listing)).encode()).hexdigest()[:24]
    root = os.path.join(cache_dir or default_cache_dir(), key, source.rsplit("/", 1)[-1])
    for url, size, _ in listing:
        target = os.path.join(root, *url[len(source) + 1:].split("/"))
        if os.path.exists(target) and os.path.getsize(target) == size:
            continue
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".part")
        os.close(fd)
        try:
            fs.get_file(url, tmp)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
    return root
