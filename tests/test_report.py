"""The demo's report page, looked at in a real browser (Debian's chromium via Playwright), and the
labelled sheets.

The report of a `--quick` demo run and of `--report-only` on its checkpoint are opened from disk:
every prompt and every verdict of the JSON summary must be on the page, under the right prompt and
in order; every image must have loaded, at least 128 px wide; the loss curves must be there as
SVG; nothing may be fetched from anywhere but the file itself. A screenshot is taken and must not
be blank. The demo run is the session's one `uniimage-demo --quick` (the `quick_demo_run` fixture),
copied before anything is written beside it.
"""
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from tests.browser import browser_page
from uniimage_jax.cli import demo
from uniimage_jax.eval import demo_experiment
from uniimage_jax.eval import sheets
from uniimage_jax.eval.report import REPORT_FILE


@pytest.fixture(scope="module")
def quick_demo(quick_demo_run):
    """(the quick demo's workdir, its JSON summary); shared by the session: read it only."""
    assert quick_demo_run["returncode"] == 0, quick_demo_run["stderr"][-3000:]
    workdir = pathlib.Path(quick_demo_run["dir"]) / "uniimage_demo"
    with open(workdir / demo_experiment.SCORES_FILE) as f:
        return workdir, json.load(f)


_PAGE_STATE = """() => ({
  prompts: [...document.querySelectorAll('.prompt')].map(p => ({
    title: p.querySelector('h3').innerText,
    phases: [...p.querySelectorAll('.phase')].map(ph => ({
      name: ph.querySelector('.phase-name').innerText,
      figures: [...ph.querySelectorAll('figure')].map(f => ({
        cls: f.className, text: f.querySelector('figcaption').innerText}))}))})),
  scenes: [...document.querySelectorAll('.scene')].map(s => ({
    text: s.innerText, said: [...s.querySelectorAll('.said')].map(p => p.innerText)})),
  images: [...document.images].map(i => [i.naturalWidth, i.naturalHeight, i.complete]),
  curves: [...document.querySelectorAll('.curves svg')].map(s => s.textContent),
  tables: [...document.querySelectorAll('table.scores')].map(t => t.innerText),
})"""


def _open(report_path, screenshot_path):
    """(page state, URLs requested other than the file and data: URIs) of the report."""
    requested = []
    with browser_page() as page:
        page.on("request", lambda r: requested.append(r.url))
        page.goto("file://" + str(report_path))
        page.wait_for_load_state("load")
        state = page.evaluate(_PAGE_STATE)
        page.screenshot(path=str(screenshot_path))
    url = "file://" + str(report_path)
    return state, [u for u in requested if u != url and not u.startswith("data:")]


def _assert_verdict_shown(text: str, verdict: dict):
    assert ("correct" if verdict["correct"] else "wrong") in text.split()
    if "detected" in verdict:
        assert f"detected: {verdict['detected']}" in text
    if verdict["failed"] is not None:
        assert f"failed: {verdict['failed']}" in text
    else:
        assert "failed:" not in text


def _assert_page_shows(state, summary, models, stage_titles):
    assert len(state["prompts"]) == len(summary["prompts"])
    for shown, record in zip(state["prompts"], summary["prompts"]):
        assert record["caption"] in shown["title"]
        assert [ph["name"] for ph in shown["phases"]] == models
        for phase in shown["phases"]:
            verdicts = record[f"{phase['name']}_verdicts"]
            assert len(phase["figures"]) == len(verdicts)
            for figure, verdict in zip(phase["figures"], verdicts):
                _assert_verdict_shown(figure["text"], verdict)
                assert figure["cls"] == ("correct" if verdict["correct"] else "wrong")
    assert len(state["scenes"]) == len(summary["captions"])
    for scene, record in zip(state["scenes"], summary["captions"]):
        assert record["truth"] in scene["text"]
        assert len(scene["said"]) == len(models)
        for said, name in zip(scene["said"], models):   # each model's caption, then its verdict
            # (HTML shows runs of whitespace in what a model wrote as one space)
            assert " ".join(said.split()).startswith(" ".join(f"{name}: {record[name]}".split()))
            _assert_verdict_shown(said, record[f"{name}_verdict"])
    n_images = sum(len(record[f"{m}_verdicts"]) for record in summary["prompts"] for m in models)
    assert len(state["images"]) == n_images + len(summary["captions"])
    for width, height, complete in state["images"]:
        assert complete and width >= 128 and height >= 128
    assert len(state["curves"]) == 1
    for title in stage_titles:
        assert title in state["curves"][0]
    tables = "\n".join(state["tables"])
    for half in ("understanding", "generation"):
        for model in models:
            assert f"{summary[half][model]['overall']:.3f}" in tables


def _assert_not_blank(screenshot_path):
    with Image.open(screenshot_path) as shot:
        assert shot.size == (1280, 900)
        colours = shot.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # text, tables and images drawn, not an empty or error page


def test_demo_report_in_a_browser(quick_demo, tmp_path):
    workdir, summary = quick_demo
    report_path = workdir / REPORT_FILE
    assert summary["report"] == str(report_path)
    html = report_path.read_text()
    assert 'src="http' not in html and "<script" not in html
    state, fetched = _open(report_path, tmp_path / "report.png")
    assert fetched == []
    _assert_page_shows(state, summary, ["untrained", "trained"],
                       ["understanding stage", "generation stage",
                        "(flow-matching loss): held-out loss", "t 0.8-1.0"])
    _assert_not_blank(tmp_path / "report.png")


def test_report_only_on_a_checkpoint(quick_demo, tmp_path, monkeypatch, capsys):
    shared, demo_summary = quick_demo
    workdir = tmp_path / "copy" / "demo"   # reports are written beside and inside the demo
    shutil.copytree(shared, workdir, symlinks=True)
    # Relative paths, from another working directory.
    monkeypatch.chdir(workdir.parent)
    metadata = tmp_path / "prompts.jsonl"
    chosen = demo_summary["prompts"][:2]
    metadata.write_text("".join(json.dumps(p["metadata"]) + "\n" for p in chosen))
    argv = ["--report-only", "--checkpoint", "demo/demo", "--caption-checkpoint",
            "demo/demo_caption", "--metadata", os.path.relpath(metadata), "--num-images", "2",
            "--num-scenes", "2", "--sample-steps", "2", "--report-dir", "report_out"]
    assert demo.main(argv) == 0
    out_dir = workdir.parent / "report_out"
    assert capsys.readouterr().out.splitlines()[-1].split() == [
        "report:", str(out_dir / REPORT_FILE)]
    with open(out_dir / demo_experiment.REPORT_ONLY_SCORES_FILE) as f:
        summary = json.load(f)
    assert [p["caption"] for p in summary["prompts"]] == [p["caption"] for p in chosen]
    assert set(summary["generation"]) == {"trained"}
    # The demo's settings, prompt indices and seed: the demo's trained samples and captions again.
    for record, demo_record in zip(summary["prompts"], chosen):
        assert record["trained_verdicts"][0] == demo_record["trained_verdicts"][0]
    for record, demo_record in zip(summary["captions"], demo_summary["captions"]):
        assert record["trained"] == demo_record["trained"]
    assert os.path.isfile(out_dir / f"{demo_experiment.REPORT_ONLY_SHEET_PREFIX}_01.png")
    state, fetched = _open(out_dir / REPORT_FILE, tmp_path / "report_only.png")
    assert fetched == []
    _assert_page_shows(state, summary, ["trained"], ["understanding stage", "demo"])
    _assert_not_blank(tmp_path / "report_only.png")

    # The default report directory is inside the (absolute) checkpoint.
    checkpoint = workdir / "demo"
    assert demo.main(["--report-only", "--checkpoint", str(checkpoint), "--num-prompts", "1",
                      "--num-images", "1", "--num-scenes", "1", "--sample-steps", "2"]) == 0
    assert os.path.isfile(checkpoint / "report" / REPORT_FILE)


def test_report_only_bad_input_is_named(tmp_path, capsys):
    """Named in one line, exit 2, before any checkpoint is read."""
    checkpoint = tmp_path / "stage"
    checkpoint.mkdir()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a photo of a dog", "tag": "single_object", '
                   '"include": [{"class": "circle", "count": 1}]}\n'
                   '{"prompt": "a photo of a dog", "tag": "single_object", '
                   '"include": [{"class": "dog", "count": 1}]}\n')
    assert demo.main(["--report-only", "--checkpoint", str(checkpoint),
                      "--metadata", str(bad)]) == 2
    assert f"{bad}:2: metadata class 'dog'" in capsys.readouterr().err
    assert demo.main(["--report-only", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert demo.main(["--report-only", "--checkpoint", str(checkpoint)]) == 2
    assert "is neither a converted checkpoint" in capsys.readouterr().err   # an empty folder
    assert demo.main(["--checkpoint", str(checkpoint)]) == 2
    assert "--checkpoint belongs to --report-only" in capsys.readouterr().err
    assert demo.main(["--report-only", "--checkpoint", str(checkpoint), "--steps", "3"]) == 2
    assert "--steps belongs to the demo's training" in capsys.readouterr().err


def _sample_image(seed):
    return np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def test_sheet_writes_each_prompt_beside_its_enlarged_samples():
    images = [_sample_image(i) for i in range(4)]
    rows = [{"prompt": "a photo of a red circle", "tag": "single_object",
             "before": [(images[0], False), (images[1], False)],
             "after": [(images[2], True), (images[3], False)]},
            {"prompt": "a photo of three blue squares to the left of a green triangle",
             "before": [(images[1], False), (images[0], False)],
             "after": [(images[3], True), (images[2], True)]}]
    sheet = np.asarray(sheets.render_sheet(rows, ["before", "after"], "title"))
    blank = np.asarray(sheets.render_sheet([{**r, "prompt": "", "tag": ""} for r in rows],
                                           ["before", "after"], "title"))
    assert sheet.shape == blank.shape
    tile = 128 + 2 * sheets.FRAME
    header, row_h = sheets.HEADER, sheets.row_height()
    for i in range(2):
        label = (slice(header + i * row_h, header + i * row_h + tile),
                 slice(0, sheets.LABEL_WIDTH))
        ink = (sheet[label] < 100).all(-1).sum()
        assert ink > 300                          # the prompt is written in its row's column
        assert (blank[label] < 100).all(-1).sum() == 0
    # The longer prompt wraps onto a second line; the first row's does not need to.
    second_line = (slice(header + row_h + 22, header + row_h + 42), slice(0, sheets.LABEL_WIDTH))
    assert (sheet[second_line] < 100).all(-1).sum() > 50
    # Sample 2 of row 1 (the first "after" sample): enlarged 4x nearest-neighbour, framed green.
    x0 = sheets.LABEL_WIDTH + 2 * (tile + sheets.PAD) + 2 * sheets.PAD + sheets.PAD
    y0 = header
    inner = sheets.FRAME
    shown = sheet[y0 + inner:y0 + inner + 128, x0 + inner:x0 + inner + 128]
    np.testing.assert_array_equal(shown, np.repeat(np.repeat(images[2], 4, 0), 4, 1))
    assert tuple(sheet[y0 + 1, x0 + 1]) == sheets.CORRECT_COLOR
    assert tuple(sheet[y0 + 1, sheets.LABEL_WIDTH + sheets.PAD + 1]) == sheets.WRONG_COLOR


def test_held_out_loss_records_are_plotted_beside_the_training_loss(tmp_path):
    """A stage that measured a held-out loss (train/eval_loss.py) gets its plot; its records
    (no "loss" key) are not training losses; a record of neither kind is named."""
    from uniimage_jax.errors import UserError
    from uniimage_jax.eval import report

    stage = tmp_path / "stage"
    stage.mkdir()
    held_out = {"eval/loss": 2.0, "eval/loss_t0.0-0.5": 1.5, "eval/loss_t0.5-1.0": 2.5,
                "eval/ema_loss": 2.1, "eval/ema_loss_t0.0-0.5": 1.6,
                "eval/ema_loss_t0.5-1.0": 2.6}
    lines = [{"step": 0, **held_out}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5},
             {"step": 2, **{k: v - 0.5 for k, v in held_out.items()}}]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    path = str(stage / "metrics.jsonl")
    assert report.read_loss_curve(path) == ([1, 2], [3.0, 2.5])
    curves = report.read_held_out_curves(path)
    assert curves["eval/loss"] == ([0, 2], [2.0, 1.5])
    assert curves["eval/ema_loss_t0.5-1.0"] == ([0, 2], [2.6, 2.1])
    svg, notes = report._curves({"stage A": str(stage)})
    assert notes == []
    for text in ("stage A", "stage A: held-out loss", "held-out loss", "training loss",
                 "t 0.0-0.5", "t 0.5-1.0", "ema loss"):
        assert text in svg, text
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": 3, "lr": 0.1}) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:5 has no"):
        report.read_loss_curve(path)
