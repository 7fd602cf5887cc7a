"""Which field of a published set's sample holds what, and how its values become raw records.

The layouts differ (tar members, table columns, JSON fields) but the question is the same: which
image is the target, which text the caption or instruction, which images the sources. The data
config answers it with five fields (`pipeline.default_data_config`), '' meaning the layout's
default:

    field                 wds (tar members)                  hf (columns) / json_images (fields)
    image_field           first of jpg, jpeg, png, webp      'image'
    caption_field         the txt member; NAME: that field   'caption'
                          of the json member
    source_image_field    'source_image' (comma-separated for several, each required)
    instruction_field     as caption_field                   'instruction', else 'caption'
    target_image_field    'target_image'

A wds image field NAME matches the member whose extension is NAME or NAME.<jpg|jpeg|png|webp>.

Values: a text is a string, or a list of strings of which the last is used (the official loader's
rule for edit sets whose caption is a conversation); an image is a path (relative to the
set's image root unless absolute or a URL), encoded bytes, a Hugging Face image cell
`{"bytes": ..., "path": ...}`, or for source images a list of those. A sample whose image or
text is missing, null or of another type is skipped, counted and named by the pipeline
(`BadRecordError`), never filled in.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from uniimage_jax import storage
from uniimage_jax.data.images import UnreadableImageError
from uniimage_jax.paths import is_url

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FIELD_NAMES = ("image_field", "caption_field", "source_image_field", "instruction_field",
               "target_image_field")


@dataclasses.dataclass(frozen=True)
class Missing:
    """The value of a field a record does not have (told apart from an explicit null)."""

    field: str


def _absent(value: Any) -> str:
    if isinstance(value, Missing):
        return f"no field {value.field!r}"
    return "null" if value is None else repr(value)[:40]


class BadRecordError(UnreadableImageError):
    """A sample the pipeline skips and counts like an unreadable image (a missing or malformed
    image or text); `.path` names the sample, `.reason` what is wrong."""


def config_value(cfg: Any, name: str, default: Any = "") -> Any:
    """`cfg.name`, or `default` when the config node has no such field (a mixture component
    may give only the fields it needs)."""
    try:
        return cfg.get(name, default)
    except AttributeError:
        return getattr(cfg, name, default)


@dataclasses.dataclass(frozen=True)
class Fields:
    """The fields of one layout (see the module docstring); '' where the layout decides."""

    image: str = ""
    caption: str = ""
    source_images: tuple[str, ...] = ()
    instruction: str = ""
    target_image: str = ""

    @classmethod
    def from_config(cls, cfg: Any) -> "Fields":
        sources = str(config_value(cfg, "source_image_field") or "source_image")
        return cls(image=str(config_value(cfg, "image_field") or ""),
                   caption=str(config_value(cfg, "caption_field") or ""),
                   source_images=tuple(s.strip() for s in sources.split(",") if s.strip()),
                   instruction=str(config_value(cfg, "instruction_field") or ""),
                   target_image=str(config_value(cfg, "target_image_field") or "target_image"))


def text_value(value: Any, name: str, what: str) -> str:
    """A caption / instruction value as a string (see the module docstring)."""
    if isinstance(value, (list, tuple)) and value:
        value = value[-1]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecordError(name, f"{what} is not UTF-8 text") from None
    if not isinstance(value, str):
        raise BadRecordError(name, f"no {what} ({_absent(value)})")
    return value


def resolve_path(root: str, path: str) -> str:
    """`path` relative to `root` (a directory, local or URL) unless absolute or a URL."""
    if os.path.isabs(path) or is_url(path):
        return path
    if is_url(root):
        return storage.join(root, path)
    return os.path.normpath(os.path.join(root, path))


def image_value(value: Any, root: str, name: str, what: str):
    """One image value as a path or encoded bytes (see the module docstring)."""
    if isinstance(value, dict):  # a Hugging Face Image cell, not decoded
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    if isinstance(value, str) and value:
        return resolve_path(root, value)
    raise BadRecordError(name, f"no {what} ({_absent(value)})")


def image_list(value: Any, root: str, name: str, what: str) -> list:
    """Source images: one value or a non-empty list of them."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise BadRecordError(name, f"no {what} (empty list)")
    return [image_value(v, root, name, what) for v in values]
