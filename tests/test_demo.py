"""`uniimage-demo --quick` end to end: untrained scoring, a few steps of each stage, trained
scoring, the four score tables printed, labelled sheets, report and JSON summary written, and the
generation stage built on the MLLM the caption stage trained. Whether training improves the
scores is measured by the full demo, not asserted here (a few steps learn nothing).

The run looked at is the session's one `uniimage-demo --quick` (the `quick_demo_run` fixture:
the README's demo block, run as a user types it, into the default ./uniimage_demo)."""
import json
import os
import shutil

import jax
import numpy as np
from PIL import Image

from uniimage_jax.cli import demo
from uniimage_jax.data.synthetic import CATEGORIES
from uniimage_jax.checkpoints.loader import load_uniimage
from uniimage_jax.eval import demo_experiment
from uniimage_jax.models.uniimage import UniImage


def _table(lines, title):
    """{category: (untrained, trained)} of the table printed after the line starting `title`."""
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    header = lines[start + 1]
    assert header.split() == ["category", "untrained", "trained"]
    rows = {}
    for line in lines[start + 3:]:
        if not line.strip() or line.startswith("  e.g."):
            break
        if set(line) <= {"-"}:
            continue
        name, untrained, trained = line.split()
        rows[name] = (float(untrained), float(trained))
    return rows


def test_quick_demo_end_to_end(quick_demo_run, tmp_path, capsys):
    assert quick_demo_run["returncode"] == 0, quick_demo_run["stderr"][-3000:]
    workdir = os.path.normpath(os.path.join(quick_demo_run["dir"],
                                            demo.build_parser().get_default("workdir")))
    lines = quick_demo_run["stdout"].splitlines()

    generation = _table(lines, "generation:")
    assert set(generation) == set(CATEGORIES) | {"overall"}
    understanding = _table(lines, "understanding:")
    assert "overall" in understanding and len(understanding) >= 2
    for untrained, trained in list(generation.values()) + list(understanding.values()):
        assert 0.0 <= untrained <= 1.0 and 0.0 <= trained <= 1.0

    n_prompts, n_images = demo_experiment.QUICK["num_prompts"], demo_experiment.QUICK["num_images"]
    report_path = os.path.join(workdir, "report.html")
    assert lines[-1].split() == ["report:", report_path]   # the report's path is printed last
    assert os.path.isfile(report_path)
    sheets = sorted(n for n in os.listdir(workdir) if n.startswith(demo_experiment.SHEET_PREFIX))
    assert sheets == [f"{demo_experiment.SHEET_PREFIX}_01.png"]      # 6 prompts fit one sheet of 12
    with Image.open(os.path.join(workdir, sheets[0])) as sheet:
        # a prompt column beside the untrained and trained samples, each >= 128 px
        assert sheet.width > 2 * n_images * 128 and sheet.height > n_prompts * 128

    with open(os.path.join(workdir, demo_experiment.SCORES_FILE)) as f:
        summary = json.load(f)
    for half in ("understanding", "generation"):
        assert set(summary[half]["untrained"]) == set(summary[half]["trained"])
    assert set(summary["generation"]["trained"]) == set(CATEGORIES) | {"overall"}
    assert summary["steps"] == {"caption": demo_experiment.QUICK["caption_steps"],
                                "generation": demo_experiment.QUICK["steps"]}
    assert len(summary["prompts"]) == n_prompts
    assert len(summary["captions"]) == demo_experiment.QUICK["num_scenes"]
    assert all(len(p["trained_correct"]) == n_images for p in summary["prompts"])
    assert all(p["trained_correct"] == [v["correct"] for v in p["trained_verdicts"]]
               for p in summary["prompts"])
    assert summary["report"] == report_path

    # The generation stage is built on the MLLM the caption stage trained, frozen: the same
    # weights in both stages, and not the random initialisation any more.
    _, caption_params, _ = load_uniimage(summary["stage_dirs"]["caption"])
    config, params, _ = load_uniimage(summary["stage_dirs"]["generation"])
    same = jax.tree.map(np.array_equal, caption_params["mllm"], params["mllm"])
    assert all(jax.tree.leaves(same))
    random_mllm = UniImage(config).init(jax.random.PRNGKey(0))["mllm"]
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), random_mllm, params["mllm"])
    assert all(jax.tree.leaves(moved))

    # A second run into the same workdir refuses instead of silently resuming (into a copy: the
    # run is shared with other tests).
    again = str(tmp_path / "again")
    shutil.copytree(workdir, again, symlinks=True)
    capsys.readouterr()
    assert demo.main(["--quick", "--workdir", again]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_arguments_are_named(capsys):
    assert demo.main(["--quick", "--num-prompts", "0"]) == 2
    assert "uniimage-demo: error: --num-prompts must be >= 1" in capsys.readouterr().err
    assert demo.main(["--quick", "--caption-steps", "0"]) == 2
    assert "--caption-steps must be >= 1" in capsys.readouterr().err
    assert demo.main(["--quick", "--guidance", "nan"]) == 2
    assert "--guidance must be a finite number >= 0, got nan" in capsys.readouterr().err
