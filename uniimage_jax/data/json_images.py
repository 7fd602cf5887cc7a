"""`data.source = "json_images"`: JSON or JSON-lines metadata beside image folders.

The layout of ShareGPT-4o-Image (a JSON array per part, images in folders relative to it: the
text-to-image part `{"input_prompt": ..., "output_image": "..."}`, the text-and-image-to-image
part with `"input_image": [...]` as well, as its published training script reads them) and of
GPT-Image-Edit-1.5M as downloaded (JSON lines with `"input"`, `"output"`, `"instruction"`).

- `data.path`: the metadata file, `.jsonl` (one object a line) or `.json` (an array of objects),
  local or `gs://`; read and checked at construction (malformed JSON is an error naming
  file:line or file[index]).
- Which field is what: `data.image_field` / `data.caption_field` (t2i), `data.source_image_field`
  / `data.instruction_field` / `data.target_image_field` (ti2i); see record_fields.py.
- Image paths are relative to `data.image_root` (default: the metadata file's directory),
  local or `gs://`, unless absolute. Images are not opened here: a missing or undecodable one,
  and a record without its image or text, is skipped, counted and named by the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

from uniimage_jax import storage
from uniimage_jax.data.manifest import ManifestError, check_task
from uniimage_jax.data.record_fields import (BadRecordError, Fields, Missing, image_list,
                                             image_value, text_value)
from uniimage_jax.errors import ConfigError
from uniimage_jax.paths import is_url


def _objects(path: str, text: str) -> list[tuple[str, dict]]:
    """(name, object) of every record: `file:line` for JSON lines, `file[i]` for an array."""
    if path.endswith(".jsonl"):
        out = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{path}:{lineno}: expected a JSON object")
            out.append((f"{path}:{lineno}", obj))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON array of objects (or a .jsonl file), "
                            f"got a JSON {type(data).__name__}")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise ManifestError(f"{path}[{i}]: expected a JSON object")
    return [(f"{path}[{i}]", obj) for i, obj in enumerate(data)]


class JsonImagesSource:
    """Records of JSON / JSON-lines metadata with image paths (see the module docstring)."""

    def __init__(self, path: str, task: str, fields: Fields = Fields(), *, image_root: str = ""):
        self.path, self.task = str(path), check_task(task)
        if not storage.exists(self.path) or storage.path(self.path).is_dir():
            raise ConfigError(f"data.path={self.path!r}: expected the metadata file (.json or "
                              ".jsonl) of a json_images set")
        raw = storage.read_bytes(self.path)
        self._digest = hashlib.sha256(raw).hexdigest()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ManifestError(f"{self.path}: not UTF-8 text") from None
        parent = posixpath.dirname(self.path) if is_url(self.path) else \
            os.path.dirname(os.path.abspath(self.path))
        self.image_root = image_root or parent
        if self.task == "t2i":
            keys = {"image": fields.image or "image", "caption": fields.caption or "caption"}
        else:
            keys = {"source_images": ",".join(fields.source_images),
                    "instruction": fields.instruction, "target_image": fields.target_image}
        self._keys = keys
        # Only the fields used are kept: a 1.5M-line metadata file with long descriptions
        # would otherwise hold gigabytes of unused strings.
        self._records = [(name, self._pick(obj, fields)) for name, obj in _objects(self.path,
                                                                                    text)]
        if not self._records:
            raise ManifestError(f"{self.path}: the metadata has no records")

    def _pick(self, obj: dict, fields: Fields) -> tuple:
        def get(key):
            return obj.get(key, Missing(key))

        if self.task == "t2i":
            return get(self._keys["image"]), get(self._keys["caption"])
        instruction = fields.instruction or ("instruction" if "instruction" in obj
                                             else "caption")
        return [get(f) for f in fields.source_images], get(instruction), get(fields.target_image)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        name, values = self._records[int(index)]
        root = self.image_root
        if self.task == "t2i":
            image, caption = values
            return {"image": image_value(image, root, name, "image"),
                    "caption": text_value(caption, name, "caption"), "name": name}
        sources, instruction, target = values
        images = []
        for value in sources:
            images += image_list(value, root, name, "source image")
        if not images:
            raise BadRecordError(name, "no source image")
        return {"source_images": images,
                "instruction": text_value(instruction, name, "instruction"),
                "target_image": image_value(target, root, name, "target image"), "name": name}

    def caption_text(self, index: int) -> str:
        """The caption (t2i) or instruction (ti2i) of record `index` (no image is opened)."""
        name, values = self._records[int(index)]
        return text_value(values[1], name, "caption" if self.task == "t2i" else "instruction")

    def content_key(self) -> str:
        """Changes with the metadata's bytes, the image root and the fields read."""
        text = repr((self._digest, self.image_root, self.task, self._keys))
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"JsonImagesSource({self.path!r}, task={self.task!r}, len={len(self)})"
