"""Robust image decoding and the official target transform (resize shorter side, centre crop, [-1, 1]).

The official dataset opens every file with `PIL.Image.open(path).convert("RGB")` and, when that
fails, silently trains on a black placeholder. Here a file that cannot be fully decoded raises
`UnreadableImageError` (naming the file and the reason) so that the pipeline can skip and count it.

Decoding choices (all made once, here):
- The whole image is decoded (`Image.load()`), so a truncated JPEG fails now instead of becoming a
  grey-bottomed image. (Pillow's global `ImageFile.LOAD_TRUNCATED_IMAGES` must stay False.)
- CMYK JPEGs (Adobe-inverted or not; Pillow undoes the inversion) go through Pillow's CMYK -> RGB
  conversion; embedded ICC profiles are not applied.
- 16-bit greyscale (`I;16*`, and `I`, which PNG uses for 16 bits) is scaled with
  round(x * 255 / 65535), not clipped at 255 as `convert("RGB")` would. 16-bit RGB PNGs are reduced
  to 8 bits by Pillow's decoder (the high byte, within one level of the rounded scaling).
- Transparency (RGBA, LA, palette or greyscale with a tRNS colour) is composited onto WHITE: the
  colour under fully transparent pixels is arbitrary (often black), while logos / product shots
  with transparent backgrounds are meant to be seen on a light page. The official `convert("RGB")`
  drops alpha instead, exposing whatever colour those pixels hold.
- Multi-frame files (GIF, TIFF) use their first frame. EXIF orientation is NOT applied, as in the
  official code (the model was trained on pixels as stored).

The transform is the official torchvision v2 `Resize(size)` + `CenterCrop(size)` on a PIL image:
Pillow bilinear (which always antialiases when shrinking), the long side to int(size * long / short),
crop offsets int(round((dim - size) / 2)). Aspect-ratio buckets use the same rule towards a
(height, width) target: resize to cover it, centre crop (`resize_cover_crop`).
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]

_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class UnreadableImageError(ValueError):
    """A file (or byte string) that is not a fully decodable image; `.path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"unreadable image {path}: {reason}")
        self.path = path
        self.reason = reason


def _describe(source: PathOrBytes, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return os.fspath(source)


def _read_bytes(source: PathOrBytes, name: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise UnreadableImageError(name, "file not found") from None
        except IsADirectoryError:
            raise UnreadableImageError(name, "is a directory, not a file") from None
        except OSError as e:
            raise UnreadableImageError(name, f"cannot read file ({e.strerror or e})") from None
    if not data:
        raise UnreadableImageError(name, "empty file (0 bytes)")
    return data


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 4) straight alpha -> uint8 (H, W, 3) over a white background."""
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


def _has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def _to_rgb_uint8(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_GREY_MODES:
        grey = np.asarray(img).astype(np.float64)
        grey = np.rint(np.clip(grey, 0, 65535) * (255.0 / 65535.0)).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if img.mode == "F":  # 32-bit float greyscale (TIFF): values in [0, 1] by convention
        grey = np.rint(np.clip(np.asarray(img, np.float64), 0, 1) * 255.0).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if _has_transparency(img):
        return _composite_on_white(np.asarray(img.convert("RGBA")))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def load_image(source: PathOrBytes, *, name: str | None = None) -> np.ndarray:
    """Decode a whole image file (path or encoded bytes) to RGB uint8 (H, W, 3).

    Raises `UnreadableImageError` naming `name` (default: the path) for a missing, empty,
    non-image, truncated or otherwise undecodable file.
    """
    name = _describe(source, name)
    data = _read_bytes(source, name)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process: "
                           "truncated images would decode silently; set it back to False")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: truncation and corrupt entropy data fail here
            rgb = _to_rgb_uint8(img)
    except UnidentifiedImageError:
        raise UnreadableImageError(name, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImageError(name, f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow raises on bad data
        raise UnreadableImageError(name, f"decode failed ({e})") from None
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UnreadableImageError(name, f"decoded to an unusable array of shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def check_rgb_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """An already decoded image (synthetic or TFDS record) as RGB uint8 (H, W, 3), or an error."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise UnreadableImageError(
            name, f"expected a uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UnreadableImageError(name, f"empty image of shape {image.shape}")
    return image


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size`, as torchvision's Resize(int) computes it."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3): shorter side to `size` (bilinear, antialiased),
    then the centre `size` x `size` crop."""
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return resize_cover_crop(image, int(size), int(size))


def cover_shape(height: int, width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """The smallest (height, width) of the same aspect ratio that covers out_height x out_width:
    the side with the larger scale factor becomes exactly its target, the other is scaled and
    truncated as torchvision's Resize does (never below its target). For a square target this is
    `resized_shape`."""
    if out_height * width >= out_width * height:   # out_h / h >= out_w / w: height binds
        return out_height, max(out_width, int(out_height * width / height))
    return max(out_height, int(out_width * height / width)), out_width


def resize_cover_crop(image: np.ndarray, out_height: int, out_width: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (out_height, out_width, 3): resize (bilinear, antialiased) to the
    smallest size that covers the target (`cover_shape`), then the centre crop, offsets
    int(round((dim - out) / 2)). The aspect-ratio bucket transform; for a square target it is
    the official Resize + CenterCrop."""
    for name, v in (("out_height", out_height), ("out_width", out_width)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    image = check_rgb_uint8(image)
    h, w = image.shape[:2]
    new_h, new_w = cover_shape(h, w, int(out_height), int(out_width))
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR)
        image = np.asarray(pil)
    top = int(round((new_h - out_height) / 2.0))
    left = int(round((new_w - out_width) / 2.0))
    return np.ascontiguousarray(image[top:top + out_height, left:left + out_width])


def read_image_size(source: PathOrBytes, *, name: str | None = None) -> tuple[int, int]:
    """(height, width) from an image file's header, without decoding the pixels (what bucketing
    needs at start-up). Raises `UnreadableImageError` when even the header cannot be read."""
    name = _describe(source, name)
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            opened = Image.open(io.BytesIO(bytes(source)))
        else:
            opened = Image.open(source)
        with opened as img:
            width, height = img.size
    except FileNotFoundError:
        raise UnreadableImageError(name, "file not found") from None
    except IsADirectoryError:
        raise UnreadableImageError(name, "is a directory, not a file") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(name, "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnreadableImageError(name, f"header unreadable ({e})") from None
    if height < 1 or width < 1:
        raise UnreadableImageError(name, f"header gives an empty size {width}x{height}")
    return int(height), int(width)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1), the autoencoder's input range."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"to_model_range expects uint8 pixels, got {image.dtype}")
    return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
