"""A Hugging Face Hub cache written by the tests, in the hub's own layout, so that Hub model ids
resolve offline (`HF_HUB_OFFLINE=1`, tests/conftest.py) without any download.

The layout is huggingface_hub's documented cache structure:

    <cache>/models--<org>--<name>/blobs/<hash>                  file contents
    <cache>/models--<org>--<name>/snapshots/<commit>/<path>     relative symlinks to the blobs
    <cache>/models--<org>--<name>/refs/<branch or tag>          the commit hash, no newline
"""
from __future__ import annotations

import hashlib
import os


def add_snapshot(cache: str, repo_id: str, files: dict[str, str], *, commit: str | None = None,
                 refs: tuple[str, ...] = ("main",)) -> str:
    """Put `files` ({path in the repo: local file to copy}) in `cache` as commit `commit` of
    `repo_id` (default: a hash of the contents), pointed at by `refs`; returns the snapshot
    folder."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    if commit is None:
        digest = hashlib.sha1()
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + open(files[path], "rb").read())
        commit = digest.hexdigest()
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    for path, source in files.items():
        data = open(source, "rb").read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        if not os.path.exists(blob):
            with open(blob, "wb") as fh:
                fh.write(data)
        link = os.path.join(snapshot, path)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as fh:
            fh.write(commit)
    return snapshot


def add_directory(cache: str, repo_id: str, directory: str, prefix: str = "", **kwargs) -> str:
    """`add_snapshot` of every file under `directory`, at `prefix` inside the repository."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.join(prefix, os.path.relpath(path, directory))] = path
    return add_snapshot(cache, repo_id, files, **kwargs)


def published_cache(cache: str, names: str) -> dict[str, str]:
    """The README's stand-in checkpoints (`names`: the folder of tests/test_readme.py's
    `_build_standins`) cached under the ids their model cards give; the Sana pipeline also gets
    its model_index.json and a text encoder that nothing may read. Returns {id: snapshot}."""
    pipeline = os.path.join(cache, "_sana_pipeline_extra")
    os.makedirs(pipeline, exist_ok=True)
    index = os.path.join(pipeline, "model_index.json")
    with open(index, "w") as fh:
        fh.write('{"_class_name": "SanaPipeline", "transformer": ["diffusers", '
                 '"SanaTransformer2DModel"], "vae": ["diffusers", "AutoencoderDC"], '
                 '"text_encoder": ["transformers", "Gemma2Model"]}')
    junk = os.path.join(pipeline, "junk.safetensors")
    with open(junk, "wb") as fh:
        fh.write(b"not a safetensors file")
    sana = os.path.join(names, "Sana_1600M_512px_diffusers", "transformer")
    files = {os.path.join("transformer", f): os.path.join(sana, f) for f in os.listdir(sana)}
    files.update({"model_index.json": index, "text_encoder/model.safetensors": junk})
    return {
        "Qwen/Qwen2.5-VL-3B-Instruct": add_directory(
            cache, "Qwen/Qwen2.5-VL-3B-Instruct", os.path.join(names, "Qwen2.5-VL-3B-Instruct")),
        "Efficient-Large-Model/Sana_1600M_512px_diffusers": add_snapshot(
            cache, "Efficient-Large-Model/Sana_1600M_512px_diffusers", files),
        "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers": add_directory(
            cache, "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers",
            os.path.join(names, "dc-ae-f32c32-sana-1.0-diffusers")),
        "TencentBAC/TBAC-UniImage-3B": add_directory(
            cache, "TencentBAC/TBAC-UniImage-3B", os.path.join(names, "TBAC-UniImage-3B")),
    }
