"""`data.source = "wds"`: WebDataset tar shards read by index, local or on `gs://`.

The published BLIP3o sets (Long-Caption, Short-Caption, JourneyDB, 60k) are tar shards whose
samples are `<key>.jpg` + `<key>.txt` (some sets `.png` / `.webp`, a `.json` beside them). The
official code streams them through a shuffle buffer; here they are a random-access source like
the others, so the pipeline's one global order, per-host dealing and exact resume apply
unchanged:

- `data.path` names the shards (shard_lists.py: a directory, a brace pattern, a glob, a list
  file), local or `gs://`.
- At start-up every shard's tar headers are read once, in threads and shared across processes,
  into a member index cached under the workdir (tar_index.py). Sample i is then one ranged read
  of its bytes (`storage.read_range`: on `gs://` a single request) whose members are parsed
  from memory.
- Which member is what: record_fields.py (the image: the first of jpg, jpeg, png, webp, or
  `data.image_field`; the caption: the txt member or `data.caption_field` of the json member;
  ti2i: `data.source_image_field`, `data.instruction_field`, `data.target_image_field`).
- A sample without its image or text, with a truncated member (a shard cut short) or with an
  image that does not decode is skipped, counted and named `<shard>:<key>` by the pipeline;
  the official loader's black placeholder for a corrupt JPEG is not copied.
- Host memory: the index, 24 bytes a sample (27M samples: ~650 MB); grain's worker processes
  (`data.worker_count` > 0) each receive a copy with the source.

Written here rather than with the `webdataset` package's random-access reader (`wids`): `wids`
is no longer shipped in the `webdataset` 1.x wheels, it downloads whole remote shards to a
local cache before reading one sample (1,000 shards of a bucket set are ~1 TB), it indexes each
shard in every process that opens it (no shared, persistent index) and it stops on a malformed
sample with an assertion instead of skipping it. The tar reading is the standard library's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile

import numpy as np

from uniimage_jax import storage
from uniimage_jax.data.manifest import check_task
from uniimage_jax.data.record_fields import (IMAGE_EXTENSIONS, BadRecordError, Fields,
                                             text_value)
from uniimage_jax.data.shard_lists import resolve_shards
from uniimage_jax.data.tar_index import build_index, sample_key
from uniimage_jax.errors import UserError

log = logging.getLogger("uniimage_jax.data")


def parse_sample(data: bytes, shard: str, offset: int) -> tuple[str, dict[str, bytes]]:
    """(key, {extension: member bytes}) of one sample's tar bytes, read from `shard` at byte
    `offset`; BadRecordError naming `shard:key` for a truncated or duplicated member."""
    members: dict[str, bytes] = {}
    key = None
    name = f"{shard}@{offset}"  # until the sample's key is read
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except tarfile.ReadError as e:
        raise BadRecordError(name, f"no tar member in the sample's bytes ({e}; the shard "
                             "changed since it was indexed?)") from None
    while True:
        try:
            member = archive.next()
        except tarfile.ReadError:
            member = None
            if archive.offset < len(data):  # headers stop inside the bytes: a cut member
                raise BadRecordError(name, "truncated tar member (the shard ends inside "
                                     "this sample)") from None
        if member is None:
            break
        parts = sample_key(member.name) if member.isreg() else None
        if parts is None:
            continue
        key = key or parts[0]
        name = f"{shard}:{key}"
        end = member.offset_data + member.size
        if end > len(data):
            raise BadRecordError(name, f"truncated member {member.name} (the shard ends after "
                                 f"{max(0, len(data) - member.offset_data)} of its "
                                 f"{member.size} bytes)")
        if parts[1] in members:
            raise BadRecordError(name, f"two members named {member.name}")
        members[parts[1]] = data[member.offset_data:end]
    if key is None:
        raise BadRecordError(name, "no sample member in the sample's bytes (the shard "
                             "changed since it was indexed?)")
    return key, members


def _image_member(members: dict[str, bytes], field: str, name: str, what: str) -> bytes:
    if not field:
        for ext in IMAGE_EXTENSIONS:
            if ext in members:
                return members[ext]
        wanted = ", ".join(IMAGE_EXTENSIONS)
    else:
        for ext in (field, *(f"{field}.{e}" for e in IMAGE_EXTENSIONS)):
            if ext in members:
                return members[ext]
        wanted = f"{field} or {field}.<{'|'.join(IMAGE_EXTENSIONS)}>"
    raise BadRecordError(name, f"no {what} member ({wanted}) among {sorted(members)}")


def _text_member(members: dict[str, bytes], field: str, name: str, what: str) -> str:
    import json

    if not field:
        if "txt" not in members:
            raise BadRecordError(name, f"no {what}: no txt member among {sorted(members)}")
        return text_value(members["txt"], name, what)
    if "json" not in members:
        raise BadRecordError(name, f"no {what}: no json member (for field {field!r}) among "
                             f"{sorted(members)}")
    try:
        obj = json.loads(members["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRecordError(name, f"the json member is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or field not in obj:
        raise BadRecordError(name, f"no {what}: the json member has no field {field!r}")
    return text_value(obj[field], name, what)


class WebDatasetSource:
    """The samples of WebDataset tar shards by index (see the module docstring)."""

    def __init__(self, spec: str, task: str, fields: Fields = Fields(), *,
                 cache_dir: str | None = None, process_index: int = 0, process_count: int = 1,
                 threads: int = 16):
        self.spec, self.task, self.fields = str(spec), check_task(task), fields
        self.shards = resolve_shards(self.spec)
        index = build_index(self.shards, cache_dir=cache_dir, process_index=process_index,
                            process_count=process_count, threads=threads)
        for (path, _), shard in zip(self.shards, index):
            if shard.note:
                log.warning("%s: %s; %d samples of it are used", path, shard.note,
                            len(shard.offsets))
        self._paths = [p for p, _ in self.shards]
        counts = np.asarray([len(s.offsets) for s in index], np.int64)
        self._ends = np.cumsum(counts)
        self._offsets = np.concatenate([s.offsets for s in index])
        self._lengths = np.concatenate([s.lengths for s in index])
        self._text_starts = np.concatenate([s.text_starts for s in index])
        self._text_sizes = np.concatenate([s.text_sizes for s in index])
        if len(self) == 0:
            raise UserError(f"data.path={self.spec!r}: its {len(self.shards)} shards hold no "
                            "sample (see the warnings above)")

    def __len__(self) -> int:
        return int(self._ends[-1])

    def locate(self, index: int) -> tuple[str, int, int]:
        """(shard path, byte offset, byte length) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of {len(self)}")
        shard = int(np.searchsorted(self._ends, index, side="right"))
        return self._paths[shard], int(self._offsets[index]), int(self._lengths[index])

    def __getitem__(self, index: int) -> dict:
        path, offset, length = self.locate(int(index))
        data = storage.read_range(path, offset, length)
        key, members = parse_sample(data, path, offset)
        name = f"{path}:{key}"
        if self.task == "t2i":
            return {"image": _image_member(members, self.fields.image, name, "image"),
                    "caption": _text_member(members, self.fields.caption, name, "caption"),
                    "name": name}
        return {"source_images": [_image_member(members, f, name, "source image")
                                  for f in self.fields.source_images],
                "instruction": _text_member(members, self.fields.instruction, name,
                                            "instruction"),
                "target_image": _image_member(members, self.fields.target_image, name,
                                              "target image"),
                "name": name}

    def caption_text(self, index: int) -> str:
        """The caption (t2i) or instruction (ti2i) of sample `index` without reading its
        images: a txt member is one small ranged read. BadRecordError when it has none."""
        field = self.fields.caption if self.task == "t2i" else self.fields.instruction
        what = "caption" if self.task == "t2i" else "instruction"
        path, offset, _ = self.locate(int(index))
        start, size = int(self._text_starts[index]), int(self._text_sizes[index])
        if not field and start >= 0:
            data = storage.read_range(path, offset + start, size)
            if len(data) < size:
                raise BadRecordError(f"{path}@{offset}", "truncated txt member")
            return text_value(data, f"{path}@{offset}", what)
        key, members = parse_sample(storage.read_range(path, offset, self._lengths[index]),
                                    path, offset)
        return _text_member(members, field, f"{path}:{key}", what)

    def content_key(self) -> str:
        """Changes when a shard is added, removed, renamed or resized (the cached image sizes'
        key)."""
        digest = hashlib.sha256(repr((self.task, self.fields, self.shards)).encode())
        return digest.hexdigest()[:32]

    def __repr__(self) -> str:
        return (f"WebDatasetSource({self.spec!r}, task={self.task!r}, "
                f"{len(self.shards)} shards, {len(self)} samples)")
