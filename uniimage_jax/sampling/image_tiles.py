"""Equally sized pictures tiled into one (PIL): sample sheets and training sample grids."""
from __future__ import annotations

import io
import math

from PIL import Image


def tile_images(images, cols: int | None = None, pad: int = 2, background=(255, 255, 255)):
    """Tile equally sized PIL images row-major into one image."""
    if not images:
        raise ValueError("tile_images needs at least one image")
    w, h = images[0].size
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), background)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im, (c * (w + pad), r * (h + pad)))
    return grid


def save_tiled(images, path: str, cols: int | None = None, pad: int = 2) -> str:
    """The tiled PNG at `path`, a local path or a URL `etils.epath` writes (a `gs://` workdir's
    sample grids)."""
    from etils import epath

    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    tile_images(images, cols, pad).save(buffer, format="PNG")
    target.write_bytes(buffer.getvalue())
    return path
