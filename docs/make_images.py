"""Makes README's pictures from a finished `uniimage-demo` run, with the code the tests use.

    python docs/make_images.py uniimage_demo

- docs/report.png: the top of `report.html` (what the run was, the score tables, the loss curves,
  the first prompts) as headless Debian Chromium draws it (`tests/browser.py`, as in
  tests/test_report.py), halved in size;
- docs/demo_sheet.png: the title and first six rows (one prompt of each category) of
  `demo_sheet_01.png`.
Both are stored with an adaptive 256-colour palette to stay small in the repository.
- docs/shapes.png: the first image the demo's MLLM captions (held-out scene 0 of seed 0's
  evaluation set, 32 px, drawn as the demo draws it; no run needed), which the README's
  `uniimage-understand` command asks about.
"""
from __future__ import annotations

import os
import sys

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.browser import browser_page  # noqa: E402
from uniimage_jax.eval import sheets  # noqa: E402
from uniimage_jax.eval.report import REPORT_FILE  # noqa: E402

SHEET_ROWS = 6
SCREENSHOT = (1280, 1500)


def _save_small(image: Image.Image, path: str) -> None:
    image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {image.size[0]}x{image.size[1]}, {os.path.getsize(path) // 1024} KiB")


def write_shapes(out: str) -> None:
    from uniimage_jax.eval.demo_experiment import held_out_scenes

    scene = held_out_scenes(1, image_size=32, seed=0)[0]
    path = os.path.join(out, "shapes.png")
    Image.fromarray(scene["image"]).save(path, optimize=True)
    print(f"{path}: {scene['caption']!r}")


def main(workdir: str) -> None:
    out = os.path.join(ROOT, "docs")
    write_shapes(out)
    shot = os.path.join(out, "report_full.png")
    with browser_page(viewport=SCREENSHOT) as page:
        page.goto("file://" + os.path.abspath(os.path.join(workdir, REPORT_FILE)))
        page.wait_for_load_state("load")
        page.screenshot(path=shot)
    with Image.open(shot) as im:
        _save_small(im.resize((im.width // 2, im.height // 2), Image.LANCZOS),
                    os.path.join(out, "report.png"))
    os.remove(shot)
    height = sheets.HEADER + SHEET_ROWS * sheets.row_height() + sheets.PAD
    with Image.open(os.path.join(workdir, "demo_sheet_01.png")) as sheet:
        _save_small(sheet.crop((0, 0, sheet.width, height)), os.path.join(out, "demo_sheet.png"))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "uniimage_demo")
