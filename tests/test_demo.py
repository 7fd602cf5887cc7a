"""`uniimage-demo --quick` end to end: untrained scoring, a few training steps, trained scoring,
both score tables printed, grid and JSON summary written. Whether training improves the scores is
measured by the full demo, not asserted here (a 3-step run learns nothing)."""
import json
import os

import pytest
from PIL import Image

from uniimage_jax.cli import demo
from uniimage_jax.data.synthetic import CATEGORIES


def test_quick_demo_end_to_end(tmp_path, capsys):
    workdir = str(tmp_path / "demo")
    assert demo.main(["--quick", "--workdir", workdir]) == 0
    out = capsys.readouterr().out

    header = next(line for line in out.splitlines() if line.startswith("category"))
    assert header.split() == ["category", "untrained", "trained"]
    for name in CATEGORIES + ("overall",):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        untrained, trained = (float(v) for v in row.split()[1:])
        assert 0.0 <= untrained <= 1.0 and 0.0 <= trained <= 1.0

    n_prompts, n_images = demo.QUICK["num_prompts"], demo.QUICK["num_images"]
    grid_path = os.path.join(workdir, demo.GRID_FILE)
    assert grid_path in out
    with Image.open(grid_path) as grid:   # rows = prompts, columns = samples, 2 px padding
        assert grid.size == (n_images * 32 + (n_images - 1) * 2,
                             n_prompts * 32 + (n_prompts - 1) * 2)
    assert os.path.isfile(os.path.join(workdir, demo.UNTRAINED_GRID_FILE))

    with open(os.path.join(workdir, demo.SCORES_FILE)) as f:
        summary = json.load(f)
    assert set(summary["untrained"]) == set(summary["trained"]) == set(CATEGORIES) | {"overall"}
    assert summary["steps"] == demo.QUICK["steps"]
    assert len(summary["prompts"]) == n_prompts
    assert all(len(p["trained_correct"]) == n_images for p in summary["prompts"])

    # A second run into the same workdir refuses instead of silently resuming.
    with pytest.raises(SystemExit, match="--overwrite"):
        demo.main(["--quick", "--workdir", workdir])


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit, match="--num-prompts must be >= 1"):
        demo.main(["--quick", "--num-prompts", "0"])
