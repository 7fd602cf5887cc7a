"""Labelled contact sheets: each row a prompt written out beside its samples, enlarged.

A sheet is for looking at samples without a JSON file beside it: the prompt (and its category) in
a text column, then the samples before training and after, each enlarged with nearest-neighbour
scaling (a 32 px sample stays a 32 px sample, only bigger) and framed green when the scorer calls
it correct, red when not, with the word under it for readers who do not tell the colours apart.

Text is drawn with DejaVu Sans as shipped inside matplotlib (a dependency, so the same font file on
every machine, independent of system fonts) and falls back to Pillow's built-in scalable font.
"""
from __future__ import annotations

import functools
import os
import textwrap
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from uniimage_jax.eval import writers

MIN_SIDE = 128              # enlarged samples are at least this many pixels on a side
LABEL_WIDTH = 340           # the prompt column
PAD = 8
FRAME = 4                   # the verdict's coloured frame around each sample
HEADER = 64                 # the title band: title, then the column names
VERDICT_LINE = 18           # the verdict's word under each sample
CORRECT_COLOR = (30, 150, 60)
WRONG_COLOR = (200, 40, 40)
UNSCORED_COLOR = (200, 200, 200)
INK, GREY, PAPER = (20, 20, 20), (110, 110, 110), (255, 255, 255)


@functools.lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans at `size` px from matplotlib's data, else Pillow's default font."""
    try:
        import matplotlib

        path = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
        return ImageFont.truetype(path, size)
    except (ImportError, OSError):
        return ImageFont.load_default(size=size)


def enlarge(image, min_side: int = MIN_SIDE) -> Image.Image:
    """`image` (PIL or uint8 array) scaled by the smallest whole factor that makes both sides at
    least `min_side`, nearest-neighbour (each pixel becomes a square block)."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image = image.convert("RGB")
    factor = max(1, -(-min_side // min(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def _verdict_color(correct: bool | None):
    return UNSCORED_COLOR if correct is None else CORRECT_COLOR if correct else WRONG_COLOR


def _framed(image, correct: bool | None, side: int) -> Image.Image:
    tile = Image.new("RGB", (side + 2 * FRAME, side + 2 * FRAME), _verdict_color(correct))
    tile.paste(enlarge(image, side).resize((side, side), Image.NEAREST), (FRAME, FRAME))
    return tile


def _wrap(text: str, width_px: int, size: int) -> list[str]:
    """Lines of `text` that fit `width_px` (greedy on words, measured in the sheet's font)."""
    chars = max(8, int(width_px / (0.55 * size)))
    lines = textwrap.wrap(text, chars)
    while chars > 8 and any(font(size).getlength(line) > width_px for line in lines):
        chars -= 2
        lines = textwrap.wrap(text, chars)
    return lines


def row_height(side: int = MIN_SIDE) -> int:
    """Pixels from one row's top to the next's."""
    return side + 2 * FRAME + VERDICT_LINE + PAD


def render_sheet(rows: Sequence[dict], columns: Sequence[str], title: str,
                 side: int = MIN_SIDE) -> Image.Image:
    """One sheet. `rows`: {"prompt", "tag" (optional), and per column name a list of
    (image, correct or None)}; `columns`: the column groups in order, e.g. ("before training",
    "after training"), each as wide as its longest row."""
    if not rows:
        raise ValueError("a sheet needs at least one row")
    tile = side + 2 * FRAME
    counts = [max(len(r[c]) for r in rows) for c in columns]
    width = LABEL_WIDTH + sum(n * (tile + PAD) + 2 * PAD for n in counts) + PAD
    row_h = row_height(side)
    sheet = Image.new("RGB", (width, HEADER + len(rows) * row_h + PAD), PAPER)
    draw = ImageDraw.Draw(sheet)
    draw.text((PAD, PAD), title, fill=INK, font=font(20))
    x = LABEL_WIDTH
    for name, n in zip(columns, counts):
        draw.text((x + PAD, 40), name, fill=GREY, font=font(15))
        x += n * (tile + PAD) + 2 * PAD
    for i, row in enumerate(rows):
        y = HEADER + i * row_h
        lines = _wrap(row["prompt"], LABEL_WIDTH - 2 * PAD, 17)
        for j, line in enumerate(lines):
            draw.text((PAD, y + j * 21), line, fill=INK, font=font(17))
        if row.get("tag"):
            draw.text((PAD, y + len(lines) * 21 + 4), row["tag"], fill=GREY, font=font(14))
        x = LABEL_WIDTH
        for name, n in zip(columns, counts):
            for k, (image, correct) in enumerate(row[name]):
                left = x + PAD + k * (tile + PAD)
                sheet.paste(_framed(image, correct, side), (left, y))
                if correct is not None:
                    draw.text((left + FRAME, y + tile + 1), "correct" if correct else "wrong",
                              fill=_verdict_color(correct), font=font(13))
            x += n * (tile + PAD) + 2 * PAD
    return sheet


def save_sheets(rows: Sequence[dict], columns: Sequence[str], out_dir: str, prefix: str,
                title: str, rows_per_sheet: int = 12) -> list[str]:
    """`rows` over as many sheets as needed, `<out_dir>/<prefix>_01.png`, ...; returns the paths.
    The title gets "prompts a-b of n" appended."""
    paths = []
    for start in range(0, len(rows), rows_per_sheet):
        chunk = rows[start:start + rows_per_sheet]
        path = os.path.join(out_dir, f"{prefix}_{start // rows_per_sheet + 1:02d}.png")
        writers.save_image(render_sheet(chunk, columns, f"{title}: prompts {start + 1}-"
                                                        f"{start + len(chunk)} of {len(rows)}"),
                           path, optimize=True)
        paths.append(path)
    return paths
