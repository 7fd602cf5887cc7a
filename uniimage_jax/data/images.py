"""Robust image decoding and the official target transform (resize shorter side, centre crop, [-1, 1]).

The official dataset opens every file with `PIL.Image.open(path).convert("RGB")` and, when that
fails, silently trains on a black placeholder. Here a file that cannot be fully decoded raises
`UnreadableImageError` (naming the file and the reason) so that the pipeline can skip and count it.
A path may be local or `gs://...` (read through the storage layer; a missing object is "file not
found" like a missing file).

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
- Reduced decoding: given `min_size` (the side the model needs, e.g. the target `image_size`), a
  JPEG whose shorter side is at least `REDUCE_FACTOR` times `min_size` is decoded at 1/2, 1/4 or
  1/8 scale by libjpeg (`Image.draft`), never below `REDUCE_FACTOR / 2` times `min_size` on the
  shorter side; other formats are decoded in full, then shrunk by an integer factor
  (`Image.reduce`, a box filter) before any colour conversion, under the same rule. A
  100-megapixel camera JPEG then costs ~1/64 of its full decode in host memory. The antialiased
  resize to the model's size follows as before, so the result differs from the full decode only
  by the filter's rounding (a few levels out of 255, tested); images below the threshold decode
  exactly as before.
- Decompression bombs: an image declaring more than 2 x `PIL.Image.MAX_IMAGE_PIXELS` pixels
  (~179 megapixels by default; Pillow refuses it when opening, before decoding) is unreadable:
  skipped, counted and named like any corrupt file. Between 1x and 2x Pillow only warns; that
  warning is silenced here because such images are decoded reduced when that is allowed.
- Multi-frame files (GIF, TIFF) use their first frame. EXIF orientation is NOT applied, as in the
  official code (the model was trained on pixels as stored).

The transform is the official torchvision v2 `Resize(size)` + `CenterCrop(size)` on a PIL image:
Pillow bilinear (which always antialiases when shrinking), the long side to int(size * long / short),
crop offsets int(round((dim - size) / 2)). Aspect-ratio buckets use the same rule towards a
(height, width) target: resize to cover it, centre crop (`resize_cover_crop`).
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from uniimage_jax import storage
from uniimage_jax.errors import UserError

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]

_SIXTEEN_BIT_GREY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Reduce only images at least this many times the needed side; keep >= half of it after reducing.
REDUCE_FACTOR = 4

_BOMB = ("exceeds the decompression-bomb limit of 2 x PIL.Image.MAX_IMAGE_PIXELS (raise that "
         "limit to accept it)")


class UnreadableImageError(UserError):
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
            if storage.is_remote(source):  # gs://... (a data set's image on a bucket)
                data = storage.read_bytes(source)
            else:
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


def _reduction(width: int, height: int, min_size: int | None) -> int:
    """The integer shrink factor allowed for an image of this size (1: decode as is)."""
    if not min_size or min(width, height) < REDUCE_FACTOR * min_size:
        return 1
    factor = 1
    while min(width, height) // (factor * 2) >= (REDUCE_FACTOR // 2) * min_size:
        factor *= 2
    return factor


def _decode(img: Image.Image, name: str, min_size: int | None) -> Image.Image:
    """Fully decode `img` (truncation and corrupt entropy data fail here), reduced when allowed."""
    factor = _reduction(*img.size, min_size)
    if factor > 1 and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
        w, h = img.size
        img.draft(img.mode, (-(-w // factor), -(-h // factor)))  # libjpeg scales 1/2 .. 1/8
        factor = _reduction(*img.size, min_size)
    img.load()
    if factor > 1 and img.mode not in _SIXTEEN_BIT_GREY_MODES + ("F", "P", "PA", "1"):
        img = img.reduce(factor)  # box filter; palettes would mix indices, so never reduced
    return img


def load_image(source: PathOrBytes, *, name: str | None = None,
               min_size: int | None = None) -> np.ndarray:
    """Decode a whole image file (path or encoded bytes) to RGB uint8 (H, W, 3).

    min_size: the shorter side the caller will resize to; a much larger image is decoded reduced
      (module docstring). None: always full size.
    Raises `UnreadableImageError` naming `name` (default: the path) for a missing, empty,
    non-image, truncated, too large or otherwise undecodable file.
    """
    name = _describe(source, name)
    data = _read_bytes(source, name)
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True somewhere in this process: "
                           "truncated images would decode silently; set it back to False")
    try:
        with warnings.catch_warnings():
            # Between MAX_IMAGE_PIXELS and the limit Pillow only warns; _check_pixels decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                rgb = _to_rgb_uint8(_decode(img, name, min_size))
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError(name, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImageError(name, f"{e}; it {_BOMB}") from None
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
            raise UserError(f"{name} must be a positive integer, got {v!r}")
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
            fh = contextlib.nullcontext(io.BytesIO(bytes(source)))
        elif storage.is_remote(source):  # the header is in the first bytes: range reads
            fh = storage.open_file(source)
        else:
            fh = open(source, "rb")
        with fh as f, Image.open(f) as img:
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


def open_rgb(path: str) -> Image.Image:
    """An input image for inference (`uniimage-sample --image`, `uniimage-understand --image`)
    as the official code opens it, `Image.open(path).convert("RGB")` at full size, with errors
    (missing, corrupt, decompression bomb) raised as `UnreadableImageError` naming the file."""
    data = _read_bytes(path, str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return _decode(img, str(path), None).convert("RGB")
    except UnreadableImageError:
        raise
    except UnidentifiedImageError:
        raise UnreadableImageError(str(path), "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise UnreadableImageError(str(path), f"{e}; it {_BOMB}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise UnreadableImageError(str(path), f"decode failed ({e})") from None
