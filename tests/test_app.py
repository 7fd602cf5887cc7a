"""`uniimage-app` in a real browser (Debian's chromium driven by Playwright, `tests/browser.py`).

A tiny demo workdir (a copy of the session's `uniimage-demo --quick` run: the demo's generation
stage next to its `tiny_processor`) is made here and the app is started from its parent folder
without --checkpoint, as a user would after `uniimage-demo`. The browser then types a prompt, sets
a seed, clicks Generate, downloads the PNGs and compares their pixels bitwise with what
`uniimage-sample` writes for the same settings (the command stored in the PNG's metadata); does the
same for an edit; asks a question and compares the answer with `uniimage-understand`'s; and submits
every bad input the page must refuse, checking the message and that the next request is served. The
compiled programs are shared between the app (a thread of this process) and the CLI runs.

Set UNIIMAGE_APP_SCREENSHOT=docs/app.png to refresh the README's screenshot.
"""
import contextlib
import os
import re
import shlex
import shutil
import socket
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from tests.browser import browser_page
from uniimage_jax.app.engine import MAX_IMAGES, png_settings
from uniimage_jax.cli import app as app_cli
from uniimage_jax.cli import demo
from uniimage_jax.cli import sample as sample_cli
from uniimage_jax.cli import understand

PROMPT = "a red circle above a blue square"
SEED, STEPS, GUIDANCE, IMAGE_GUIDANCE = 7, 3, 4.0, 1.5
QUESTION, FOLLOW_UP, MAX_NEW_TOKENS = "Describe the image.", "What colour is it?", 8
TIMEOUT_MS = 600_000   # a request that compiles on a busy 2-core machine
ERROR_TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def demo_parent(quick_demo_run, tmp_path_factory):
    """A folder holding `uniimage_demo/{demo,tiny_processor}` as `uniimage-demo` lays them out: a
    copy of the session's `uniimage-demo --quick` run (shared with other tests, so not served in
    place)."""
    assert quick_demo_run["returncode"] == 0, quick_demo_run["stderr"][-3000:]
    parent = tmp_path_factory.mktemp("app")
    workdir = demo.build_parser().get_default("workdir")
    for name in ("demo", "tiny_processor"):
        shutil.copytree(os.path.join(quick_demo_run["dir"], workdir, name),
                        os.path.join(parent, workdir, name), symlinks=True)
    return parent


@contextlib.contextmanager
def _cwd(path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(demo_parent, tmp_path_factory):
    """The app on the demo checkpoint it finds by itself, served from a thread of this process."""
    out = str(tmp_path_factory.mktemp("app_out"))
    with _cwd(demo_parent):
        args = app_cli.build_parser().parse_args(["--port", str(_free_port()), "--out", out])
        app_cli._check_args(args)
        assert os.path.abspath(args.checkpoint) == os.path.join(demo_parent, "uniimage_demo",
                                                                 "demo")
        page = app_cli.serve(args, block=False)
    try:
        yield {"url": page.local_url, "checkpoint": os.path.join(demo_parent, "uniimage_demo",
                                                                 "demo"),
               "processor": os.path.join(demo_parent, "uniimage_demo", "tiny_processor"),
               "parent": demo_parent}
    finally:
        page.close()


# ----------------------------------------------------------------------------- page helpers
def _fill(page, elem_id: str, value) -> None:
    """Types `value` into a field and waits until the field holds it."""
    from playwright.sync_api import expect

    field = page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    field.fill(str(value))
    expect(field).to_have_value(str(value))


def _tab(page, name: str) -> None:
    """Opens a tab and waits for its fields: a tab's components mount on its first opening, and
    a value typed while they mount could be overwritten by their defaults."""
    page.locator(f"#tab-{name}-button").click()
    page.locator({"generate": "#gen-run", "edit": "#edit-run", "ask": "#ask-run"}[name]).wait_for()
    page.wait_for_timeout(1000)


def _upload(page, elem_id: str, path) -> None:
    """Puts a file in an image input (removing the one it shows, if any)."""
    clear = page.locator(f"#{elem_id} button[aria-label='Remove Image']")
    if clear.count():
        clear.first.click()
    if path is not None:
        page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))


def _served(page, prefix: str, request: int) -> str:
    """Clicks the tab's button and returns the status line of request number `request`."""
    page.locator(f"#{prefix}-run").click()
    status = page.locator(f"#{prefix}-status")
    status.get_by_text(f"request {request}: took").wait_for(timeout=TIMEOUT_MS)
    return status.inner_text()


def _refused(page, prefix: str, message: str) -> None:
    """Clicks the tab's button and waits for the error toast naming the problem."""
    page.locator(f"#{prefix}-run").click()
    toast = page.locator(".toast-body").filter(has_text=message)
    toast.first.wait_for(timeout=ERROR_TIMEOUT_MS)
    assert "Traceback" not in toast.first.inner_text()
    for close in page.locator(".toast-close").all():
        close.click()


def _compile_seconds(status: str) -> float:
    return float(re.search(r"\(compile ([0-9.]+) s\)", status).group(1))


def _download_all(page, prefix: str, folder) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    links = page.locator(f"#{prefix}-files a[download]")
    paths = []
    for i in range(links.count()):
        with page.expect_download() as download:
            links.nth(i).click()
        path = os.path.join(folder, f"{prefix}_{i}_{download.value.suggested_filename}")
        download.value.save_as(path)
        paths.append(path)
    return paths


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _rerun_stored_command(png: str, out) -> np.ndarray:
    """Runs the `uniimage-sample` command a PNG's metadata holds; the pixels it writes there."""
    settings = png_settings(png)
    argv = shlex.split(settings["command"])
    assert argv[0] == "uniimage-sample" and argv[-2:] == ["--out", "OUT"]
    assert sample_cli.main(argv[1:-1] + [str(out)]) == 0
    return _pixels(os.path.join(out, f"00000_{settings['sample_index']:02d}.png"))


def _bot_answers(page) -> list[str]:
    """The raw text of each answer in the chat (its aria-label holds the unrendered message)."""
    labels = [m.get_attribute("aria-label") for m in page.locator("#ask-chat [data-testid=bot]")
              .all()]
    prefix = "bot's message: "
    assert all(label.startswith(prefix) for label in labels), labels
    return [label[len(prefix):] for label in labels]


# ----------------------------------------------------------------------------- the test
def test_app_in_a_real_browser(app, tmp_path, capsys):
    files = _inputs(tmp_path)
    with browser_page() as page:
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(app["url"])
        generated = _check_generate(page, app, tmp_path, capsys)
        edited = _check_edit(page, app, files["source"], tmp_path, generated)
        _check_ask(page, app, files["source"], capsys)
        _check_bad_inputs(page, files, tmp_path, edited, served=5)

    # Nothing left the machine: every request went to the app itself.
    assert requested and all(u.startswith(app["url"]) or u.startswith(("data:", "blob:"))
                             for u in requested), sorted({u.split("/")[2] for u in requested})

    # `uniimage-app --check` (the start-up test for scripts) finds the demo checkpoint, serves
    # the page once and exits 0. Here rather than in a test of its own: under pytest-xdist a
    # second test could land on another worker and rebuild the checkpoint.
    capsys.readouterr()
    with _cwd(app["parent"]):
        assert app_cli.main(["--check", "--port", str(_free_port())]) == 0
    out = capsys.readouterr().out
    assert "served the page; --check done" in out and "http://127.0.0.1:" in out
    # A port in use (the app's own): one line naming it, exit 2.
    port = urllib.parse.urlparse(app["url"]).port
    with _cwd(app["parent"]):
        assert app_cli.main(["--check", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"uniimage-app: error: cannot serve on --host 127.0.0.1 --port {port}" in err, err
    assert "Traceback" not in err and "GRADIO_SERVER_PORT" not in err


def _inputs(folder) -> dict:
    """An input image, a corrupt one and one over the pixel cap (4100 x 4100, a few KB)."""
    paths = {name: folder / f"{name}.png" for name in ("source", "corrupt", "huge")}
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), np.uint8)).save(paths["source"])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\nnot really a PNG")
    Image.new("RGB", (4100, 4100), (30, 60, 90)).save(paths["huge"])
    return paths


def _check_generate(page, app, tmp_path, capsys) -> list[str]:
    """Requests 1-2. The first compiles and says so, an identical second compiles nothing; the
    PNGs are bitwise uniimage-sample's with the same settings, typed out here and as stored in
    each PNG's metadata."""
    _fill(page, "gen-prompt", PROMPT)
    _fill(page, "gen-seed", SEED)
    _fill(page, "gen-steps", STEPS)
    _fill(page, "gen-num", 2)
    _fill(page, "gen-guidance", GUIDANCE)
    page.locator("#gen-run").click()
    page.get_by_text("compiling, first request only").first.wait_for(timeout=TIMEOUT_MS)
    status = page.locator("#gen-status")
    status.get_by_text("request 1: took").wait_for(timeout=TIMEOUT_MS)
    first = status.inner_text()
    again = _served(page, "gen", 2)
    with capsys.disabled():
        print(f"\ngenerate: {first!r}, then {again!r}")
    assert _compile_seconds(first) > 0 and _compile_seconds(again) == 0.0
    pngs = _download_all(page, "gen", tmp_path)
    assert len(pngs) == 2 and page.locator("#gen-gallery img").count() >= 2
    if os.environ.get("UNIIMAGE_APP_SCREENSHOT"):
        _save_screenshot(page, os.environ["UNIIMAGE_APP_SCREENSHOT"])

    cli_out = tmp_path / "cli"
    assert sample_cli.main(["--checkpoint", app["checkpoint"], "--prompt", PROMPT,
                            "--seed", str(SEED), "--steps", str(STEPS), "--guidance",
                            str(GUIDANCE), "--num-images", "2", "--out", str(cli_out)]) == 0
    for i, png in enumerate(pngs):
        np.testing.assert_array_equal(_pixels(png), _pixels(cli_out / f"00000_{i:02d}.png"))
        settings = png_settings(png)
        assert {k: settings[k] for k in ("prompt", "negative_prompt", "seed", "steps",
                                         "guidance", "scheduler", "sample_index")} == {
            "prompt": PROMPT, "negative_prompt": "", "seed": SEED, "steps": STEPS,
            "guidance": GUIDANCE, "scheduler": "dpm_solver", "sample_index": i}
        assert settings["checkpoint"] == app["checkpoint"]
    assert not np.array_equal(_pixels(pngs[0]), _pixels(pngs[1]))
    np.testing.assert_array_equal(_rerun_stored_command(pngs[1], tmp_path / "stored"),
                                  _pixels(pngs[1]))
    return pngs


def _check_edit(page, app, source, tmp_path, generated) -> str:
    """Request 3: image + instruction with image and text guidance, bitwise
    `uniimage-sample --image` with the same settings."""
    _tab(page, "edit")
    _upload(page, "edit-image", source)
    _fill(page, "edit-prompt", PROMPT)
    _fill(page, "edit-seed", SEED)
    _fill(page, "edit-steps", STEPS)
    _fill(page, "edit-num", 1)
    _fill(page, "edit-guidance", GUIDANCE)
    _fill(page, "edit-image-guidance", IMAGE_GUIDANCE)
    _served(page, "edit", 3)
    [edited] = _download_all(page, "edit", tmp_path)
    assert png_settings(edited)["image_guidance"] == IMAGE_GUIDANCE
    edit_out = tmp_path / "cli_edit"
    assert sample_cli.main(["--checkpoint", app["checkpoint"], "--prompt", PROMPT,
                            "--image", str(source), "--image-guidance", str(IMAGE_GUIDANCE),
                            "--seed", str(SEED), "--steps", str(STEPS), "--guidance",
                            str(GUIDANCE), "--num-images", "1", "--out", str(edit_out)]) == 0
    np.testing.assert_array_equal(_pixels(edited), _pixels(edit_out / "00000_00.png"))
    assert not np.array_equal(_pixels(edited), _pixels(generated[0]))  # the image matters
    return edited


def _check_ask(page, app, source, capsys) -> None:
    """Requests 4-5: the answer is uniimage-understand's (greedy); a follow-up sees the first
    turn (the library's answer with that history)."""
    _tab(page, "ask")
    _upload(page, "ask-image", source)
    _fill(page, "ask-question", QUESTION)
    _fill(page, "ask-max-new", MAX_NEW_TOKENS)
    _served(page, "ask", 4)
    capsys.readouterr()
    assert understand.main(["--checkpoint", app["checkpoint"], "--processor", app["processor"],
                            "--image", str(source), "--question", QUESTION,
                            "--max-new-tokens", str(MAX_NEW_TOKENS)]) == 0
    cli_answer = capsys.readouterr().out.removesuffix("\n")
    assert _bot_answers(page) == [cli_answer]
    _fill(page, "ask-question", FOLLOW_UP)
    _served(page, "ask", 5)
    assert _bot_answers(page) == [cli_answer, _library_answer(app, source, cli_answer)]


def _check_bad_inputs(page, files, tmp_path, edited, served: int) -> None:
    """Each bad input gets its message in the page, and the next request is served."""
    _tab(page, "generate")
    for elem_id, value, message in [
            ("gen-prompt", "  ", "the prompt is empty"),
            ("gen-num", 0, f"number of images must be between 1 and {MAX_IMAGES}, got 0"),
            ("gen-steps", 0, "steps must be between 1 and"),
            ("gen-steps", 10_000, "steps must be between 1 and")]:
        _fill(page, elem_id, value)
        _refused(page, "gen", message)
        _fill(page, "gen-prompt", PROMPT)
        _fill(page, "gen-num", 2)
        _fill(page, "gen-steps", STEPS)
        served += 1
        assert _compile_seconds(_served(page, "gen", served)) == 0.0
    _tab(page, "edit")
    for upload, message in [(None, "no input image: upload or paste one first"),
                            (files["corrupt"], "corrupt.png is not an image this app can read"),
                            (files["huge"], "huge.png is 4100 x 4100 pixels, over the limit")]:
        _upload(page, "edit-image", upload)
        _refused(page, "edit", message)
        _upload(page, "edit-image", files["source"])
        served += 1
        _served(page, "edit", served)
    [again] = _download_all(page, "edit", tmp_path / "after_bad_inputs")
    np.testing.assert_array_equal(_pixels(again), _pixels(edited))


def _library_answer(app, image_path, first_answer: str) -> str:
    """The follow-up's answer from the library with the conversation so far (greedy)."""
    from uniimage_jax.checkpoints.loader import load_for_inference
    from uniimage_jax.sampling.text_generation import answer

    model, params, processor = load_for_inference(app["checkpoint"])
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    return answer(model.mllm, params["mllm"], processor, [[image]], [FOLLOW_UP],
                  max_new_tokens=MAX_NEW_TOKENS, histories=[[(QUESTION, first_answer)]])[0]


def _save_screenshot(page, path: str) -> None:
    """The page as the README shows it, in at most 256 colours (a few tens of KB)."""
    shot = path + ".full.png"
    page.screenshot(path=shot, full_page=True)
    with Image.open(shot) as im:
        im.convert("RGB").quantize(colors=256).save(path, optimize=True)
    os.remove(shot)


def test_no_demo_checkpoint_names_the_command(tmp_path, capsys):
    with _cwd(tmp_path):
        assert app_cli.main(["--port", str(_free_port())]) == 2
    err = capsys.readouterr().err
    assert "run `uniimage-demo` here first" in err and "Traceback" not in err
    assert app_cli.main(["--checkpoint", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    assert app_cli.main(["--checkpoint", str(tmp_path), "--port", "0"]) == 2
    assert "--port" in capsys.readouterr().err


def test_a_taken_port_is_named_before_the_model_loads(tmp_path, capsys, monkeypatch):
    """One line naming the flag, at once (nothing is loaded: the checkpoint here is an empty
    folder), without Gradio's advice about its own settings."""
    from uniimage_jax.app import engine

    monkeypatch.setattr(engine.Engine, "load", lambda *a, **k: pytest.fail("loaded a model"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app_cli.main(["--checkpoint", str(tmp_path), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err == (f"uniimage-app: error: cannot serve on --host 127.0.0.1 --port {port}: the "
                   "port is in use (another program listens there: choose another --port)\n")
    assert "loading" not in out
