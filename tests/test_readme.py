"""Every ```bash block of README.md runs as written, so the README cannot drift from the code.

Each block runs with bash (`set -e`) in its own temporary directory that looks like the user's
checkout (symlinks to `configs/`, `tests/`, `setup.py`, ...) plus the files the block names, made
tiny: `Qwen2.5-VL-3B-Instruct/`, `Sana_1600M_512px_diffusers/transformer/`,
`dc-ae-f32c32-sana-1.0-diffusers/` and `TBAC-UniImage-3B/` are small random checkpoints in the
published layouts (`tests/tbac_fixture.py`), also cached under their Hugging Face model ids in
the workspace's own Hub cache (offline; `tests/hub_cache.py`), `uniimage_demo/` is one
`uniimage-demo --quick` run shared by the blocks that use it, `ckpt/` holds their conversions,
the published training sets (`BLIP3o-Pretrain-Long-Caption/`, `GPT-Image-Edit-1.5M/`,
`ShareGPT-4o-Image/`, ...) are a few 32-48 px samples in their published layouts
(`tests/published_sets.py`), and the images and prompt files are small stand-ins.

The rules (the table `BLOCKS` holds one entry per block, keyed by its first command line):
- `uniimage-*` commands run this checkout's code (`python -m <module>`), with the entry's `tiny`
  arguments APPENDED (argparse and absl let a later flag win): fewer steps, fewer tokens. Nothing
  else of the command line is changed.
- `pip install ...` is not run (no network, no changes to the environment): each requirement is
  checked instead. `.` / `".[a,b]"` must be this checkout with extras that setup.py declares;
  `name==version` must be the installed version.
- `python -m pytest ...` is not run (it would run this test again): the paths it names must exist
  and pytest-xdist must be installed when `-n` is given.
- A block must exit with the entry's status (0 unless stated). An entry marked `xfail` names
  the fix it waits for (strict: once the fix lands the test fails until the mark is removed).
- A README block missing from the table fails `test_every_readme_block_is_registered` with the
  key to add.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.shared_runs import made_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
CHECKOUT = ("configs", "launch", "tests", "uniimage_jax", "setup.py", "README.md")
COMMANDS = {
    "uniimage-convert": "uniimage_jax.cli.convert",
    "uniimage-train": "uniimage_jax.cli.train",
    "uniimage-cache-latents": "uniimage_jax.cli.cache_latents",
    "uniimage-understand": "uniimage_jax.cli.understand",
    "uniimage-sample": "uniimage_jax.cli.sample",
    "uniimage-bench": "uniimage_jax.cli.bench",
    "uniimage-demo": "uniimage_jax.cli.demo",
    "uniimage-app": "uniimage_jax.cli.app",
}
SAMPLE_TINY = ("--steps", "2")
TRAIN_TINY = ("--config.max_steps=2", "--config.batch_size=2", "--config.log_every=1",
              "--config.checkpoint.async_save=False", "--chain_max_steps=2")
# Training blocks that set their own step count or batch keep it: only the cheap parts are cut.
TRAIN_QUICK = ("--config.log_every=1", "--config.checkpoint.async_save=False")
DEMO_BLOCK = "pip install -e . && uniimage-demo"
HUB_CACHE = ".hf_cache"  # a workspace's Hugging Face cache (the "hub" fixture fills it)


@dataclasses.dataclass(frozen=True)
class Block:
    """What one README block needs: fixtures (see `_workspace`; "demo" is the ./uniimage_demo
    that the demo block writes, run once per session), arguments appended per command, the
    expected exit status, and an xfail reason while a fix is pending."""

    fixtures: tuple[str, ...] = ()
    tiny: dict = dataclasses.field(default_factory=dict)
    status: int = 0
    xfail: str | None = None


BLOCKS = {
    DEMO_BLOCK: Block(tiny={"uniimage-demo": ("--quick",)}),
    "uniimage-understand --checkpoint uniimage_demo/demo_caption --processor "
    "uniimage_demo/tiny_processor": Block(
        fixtures=("demo", "images"),
        tiny={"uniimage-understand": ("--max-new-tokens", "4"),
              "uniimage-sample": SAMPLE_TINY + ("--num-images", "1")}),
    "uniimage-demo --report-only --checkpoint uniimage_demo/demo --caption-checkpoint "
    "uniimage_demo/demo_caption": Block(
        fixtures=("demo",),
        tiny={"uniimage-demo": ("--num-prompts", "2", "--num-images", "1", "--num-scenes", "2",
                                "--sample-steps", "2")}),
    # A server: `--check` starts it, fetches the page once and exits.
    "uniimage-app": Block(fixtures=("demo",), tiny={"uniimage-app": ("--check",)}),
    "pip install -e .": Block(),
    "uniimage-convert mllm --src Qwen/Qwen2.5-VL-3B-Instruct --dst ckpt/mllm": Block(
        fixtures=("standins", "hub")),
    "uniimage-understand --checkpoint ckpt/mllm --processor Qwen/Qwen2.5-VL-3B-Instruct": Block(
        fixtures=("standins", "converted", "images", "hub"),
        tiny={"uniimage-understand": ("--max-new-tokens", "4")}),
    "uniimage-sample --checkpoint ckpt/tbac --processor Qwen2.5-VL-3B-Instruct": Block(
        fixtures=("standins", "converted", "images", "prompts"),
        tiny={"uniimage-sample": SAMPLE_TINY}),
    "uniimage-train --help": Block(tiny={"uniimage-train": TRAIN_TINY}),
    "uniimage-train --config configs/t2i_pretrain.py:tiny --workdir runs_profiled "
    "--config.max_steps=4": Block(tiny={"uniimage-train": TRAIN_QUICK + ("--config.batch_size=2",)}),
    "uniimage-train --config configs/t2i_pretrain.py:tiny --workdir runs --config.max_steps=6":
        Block(tiny={"uniimage-train": TRAIN_TINY}),
    "uniimage-train --config configs/t2i_pretrain.py:tiny --workdir runs --config.stage=lora":
        Block(tiny={"uniimage-train": TRAIN_TINY}),
    "uniimage-train --config configs/t2i_pretrain.py:tiny --workdir buckets_run "
    "--config.max_steps=4": Block(tiny={"uniimage-train": TRAIN_QUICK + ("--config.max_steps=2",),
                                        "uniimage-sample": ("--steps", "2")}),
    "uniimage-cache-latents --config configs/t2i_pretrain.py:tiny --out latents_t2i": Block(
        tiny={"uniimage-train": TRAIN_QUICK + ("--config.max_steps=2", "--config.batch_size=2")}),
    "uniimage-bench --aot v5p:2x2x1 --preset tiny --task t2i --per-chip-batch 2 "
    "--mesh data=2,fsdp=2": Block(),
    # The published sets' folders are tiny stand-ins written by their publishers' writers.
    "ls BLIP3o-Pretrain-Long-Caption/*.tar BLIP3o-Pretrain-JourneyDB/*.tar > stage1_shards.txt":
        Block(fixtures=("published",), tiny={"uniimage-train": TRAIN_TINY}),
}


# ------------------------------------------------------------------------- README parsing


def readme_blocks(path: str = README) -> list[tuple[str, str]]:
    """(key, text) of every ```bash block; the key is its first command line without comment,
    continuation backslash and repeated spaces."""
    text = open(path, encoding="utf-8").read()
    out = []
    for body in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        lines = [re.sub(r"\s+#.*$", "", line).rstrip(" \\").strip()
                 for line in body.splitlines()]
        key = next(line for line in lines if line and not line.startswith("#"))
        out.append((re.sub(r"\s+", " ", key), body))
    return out


def registration_problems(keys: list[str]) -> list[str]:
    problems = []
    if len(keys) != len(set(keys)):
        problems.append(f"two README blocks start with the same line: {keys}")
    unknown = [k for k in keys if k not in BLOCKS]
    if unknown:
        problems.append("README.md has ```bash blocks that tests/test_readme.py does not know; "
                        "add an entry to BLOCKS for each (fixtures, tiny flags): "
                        + "; ".join(repr(k) for k in unknown))
    stale = [k for k in BLOCKS if k not in keys]
    if stale:
        problems.append(f"BLOCKS entries with no README block (remove them): {stale}")
    return problems


def test_every_readme_block_is_registered():
    problems = registration_problems([k for k, _ in readme_blocks()])
    assert not problems, "\n".join(problems)


def test_an_unregistered_block_is_reported(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(open(README, encoding="utf-8").read()
                      + "\n```bash\n# new\nuniimage-new --flag x \\\n    --more  # why\n```\n")
    keys = [k for k, _ in readme_blocks(str(readme))]
    assert keys[-1] == "uniimage-new --flag x"
    problems = registration_problems(keys)
    assert len(problems) == 1 and "'uniimage-new --flag x'" in problems[0]


# ------------------------------------------------------------------------- shims


_PIP = textwrap.dedent('''
    """`pip` of the README test: checks requirements, installs nothing."""
    import importlib.metadata, os, re, sys
    import setuptools

    declared = {}
    setuptools.setup = lambda **kw: declared.update(kw)
    exec(compile(open("setup.py").read(), "setup.py", "exec"), {"__name__": "__main__"})
    args = [a for a in sys.argv[1:] if a not in ("-q", "--quiet", "-U", "--upgrade")]
    if not args or args[0] != "install":
        sys.exit(f"pip shim: only 'pip install' is known, got {sys.argv[1:]}")
    for req in args[1:]:
        if req == "-e":
            continue
        m = re.fullmatch(r"\\.(?:\\[([\\w,-]+)\\])?", req)
        if m:
            for extra in filter(None, (m.group(1) or "").split(",")):
                if extra not in declared.get("extras_require", {}):
                    sys.exit(f"pip shim: setup.py declares no extra {extra!r}")
            continue
        m = re.fullmatch(r"([\\w.-]+)==([\\w.+-]+)", req)
        if m:
            have = importlib.metadata.version(m.group(1))
            if have.split("+")[0] != m.group(2):
                sys.exit(f"pip shim: {m.group(1)} {have} is installed, the README pins "
                         f"{m.group(2)}")
            continue
        sys.exit(f"pip shim: unknown requirement {req!r}")
''')

_PYTHON = textwrap.dedent('''
    """`python` of the README test: `-m pytest` checks its arguments, anything else runs."""
    import importlib.util, os, sys
    args = sys.argv[1:]
    if args[:2] != ["-m", "pytest"]:
        os.execv(REAL, [REAL, *args])
    if "-n" in args and importlib.util.find_spec("xdist") is None:
        sys.exit("python shim: pytest -n needs pytest-xdist")
    paths = [a for a in args[2:] if not a.startswith("-") and not a.isdigit()]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit(f"python shim: pytest paths do not exist: {missing}")
''')


def _write_script(path: str, body: str) -> None:
    with open(path, "w") as fh:
        fh.write(f"#!{sys.executable}\n{body}")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _shims(bin_dir: str, tiny: dict) -> None:
    os.makedirs(bin_dir, exist_ok=True)
    for command, module in COMMANDS.items():
        extra = list(tiny.get(command, ()))
        _write_script(os.path.join(bin_dir, command),
                      f"import sys\nsys.argv += {extra!r}\nfrom {module} import main\n"
                      "sys.exit(main())\n")
    _write_script(os.path.join(bin_dir, "pip"), _PIP)
    _write_script(os.path.join(bin_dir, "python"), f"REAL = {sys.executable!r}\n" + _PYTHON)


# ------------------------------------------------------------------------- fixtures


def _build_standins(root: str) -> dict:
    """Tiny checkpoints under the published names (HF Qwen2.5-VL with its processor files,
    diffusers SANA transformer and DC-AE, the official TBAC-UniImage state dict)."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from tests.tbac_fixture import build_tiny_tbac

    root = pathlib.Path(root)
    built = build_tiny_tbac(str(root / "build"))
    torch_model = built["torch"]
    out = root / "names"
    qwen = out / "Qwen2.5-VL-3B-Instruct"
    # The MLLM the TBAC checkpoint was made from (its table before the metaquery rows were added).
    config = AutoConfig.from_pretrained(str(root / "build" / "mllm"))
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(str(qwen))
    for f in os.listdir(built["processor"]):
        shutil.copy(os.path.join(built["processor"], f), qwen / f)
    torch_model.transformer.save_pretrained(str(out / "Sana_1600M_512px_diffusers" /
                                                "transformer"))
    torch_model.vae.save_pretrained(str(out / "dc-ae-f32c32-sana-1.0-diffusers"))
    shutil.copytree(built["src"], out / "TBAC-UniImage-3B")
    return {"names": str(out), "tbac": built["dst"], "processor": built["processor"]}


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """`_build_standins`, made once for all test workers (the blocks only read them)."""
    return made_once(tmp_path_factory, "readme_standins", _build_standins)


@pytest.fixture(scope="session")
def published_sets(tmp_path_factory):
    """Tiny stand-ins of the published training sets under their published names
    (`tests/published_sets.py`), made once for all test workers (the blocks only read them)."""
    from tests.published_sets import write_published_sets

    return made_once(tmp_path_factory, "readme_published_sets",
                     lambda folder: {"dir": write_published_sets(folder)["root"]})


def run_demo_block(folder: str) -> dict:
    """The demo block (`uniimage-demo --quick`) run as written in a checkout made in `folder`:
    {"dir": the checkout, holding ./uniimage_demo, "returncode", "stdout", "stderr"}. The session
    runs it once, as the `quick_demo_run` fixture of tests/conftest.py: its test here checks the
    status, the blocks using ./uniimage_demo copy the result, and the demo, report and app tests
    look at it."""
    body = dict(readme_blocks())[DEMO_BLOCK]
    d = _workspace(pathlib.Path(folder), None, BLOCKS[DEMO_BLOCK])
    p = _run_block(d, body, BLOCKS[DEMO_BLOCK])
    return {"dir": d, "returncode": p.returncode, "stdout": p.stdout, "stderr": p.stderr}


def _image(path: str, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)


def _prompt_files(d: str) -> None:
    with open(os.path.join(d, "prompts.txt"), "w") as fh:
        fh.write("a red circle\na blue square\n")
    with open(os.path.join(d, "evaluation_metadata.jsonl"), "w") as fh:
        fh.write(json.dumps({"tag": "single_object", "prompt": "a photo of a red circle"}) + "\n")
    os.makedirs(os.path.join(d, "dpg_bench", "prompts"))
    with open(os.path.join(d, "dpg_bench", "prompts", "item0.txt"), "w") as fh:
        fh.write("a red circle above a blue square")
    tiif = os.path.join(d, "TIIF-Bench", "data", "test_prompts")
    os.makedirs(tiif)
    with open(os.path.join(tiif, "color.jsonl"), "w") as fh:
        fh.write(json.dumps({"type": "color", "short_description": "a red circle",
                             "long_description": "a bright red circle on white"}) + "\n")


def _workspace(tmp_path, request, block: Block) -> str:
    d = str(tmp_path / "checkout")
    os.makedirs(d)
    for name in CHECKOUT:
        os.symlink(os.path.join(ROOT, name), os.path.join(d, name))
    _shims(os.path.join(d, ".bin"), block.tiny)
    for fixture in block.fixtures:
        if fixture == "standins":
            names = request.getfixturevalue("standins")["names"]
            for name in os.listdir(names):
                os.symlink(os.path.join(names, name), os.path.join(d, name))
        elif fixture == "converted":
            s = request.getfixturevalue("standins")
            os.makedirs(os.path.join(d, "ckpt"))
            os.symlink(s["tbac"], os.path.join(d, "ckpt", "tbac"))
            subprocess.run([sys.executable, "-m", COMMANDS["uniimage-convert"], "mllm", "--src",
                            os.path.join(d, "Qwen2.5-VL-3B-Instruct"), "--dst",
                            os.path.join(d, "ckpt", "mllm")], check=True, capture_output=True,
                           env=_env(d))
        elif fixture == "demo":
            demo = request.getfixturevalue("quick_demo_run")
            assert demo["returncode"] == 0, f"the demo block failed:\n{demo['stderr'][-3000:]}"
            shutil.copytree(os.path.join(demo["dir"], "uniimage_demo"),
                            os.path.join(d, "uniimage_demo"), symlinks=True)
        elif fixture == "hub":  # the stand-ins under their model ids, in a Hub cache (offline)
            from tests.hub_cache import published_cache

            names = request.getfixturevalue("standins")["names"]
            published_cache(os.path.join(d, HUB_CACHE), names)
        elif fixture == "images":
            for i, name in enumerate(("shapes.png", "photo.png", "input.png")):
                _image(os.path.join(d, name), i)
        elif fixture == "prompts":
            _prompt_files(d)
        elif fixture == "published":
            root = request.getfixturevalue("published_sets")["dir"]
            for name in os.listdir(root):
                if name != "reference":
                    os.symlink(os.path.join(root, name), os.path.join(d, name))
        else:
            raise KeyError(f"unknown README fixture {fixture!r}")
    return d


def _env(d: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "UNIIMAGE_DEBUG"}
    env["PATH"] = os.path.join(d, ".bin") + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = ROOT
    # Hugging Face model ids resolve from the workspace's own Hub cache, never the network.
    env["HF_HUB_CACHE"] = os.path.join(d, HUB_CACHE)
    env["HF_HUB_OFFLINE"] = "1"
    return env


# ------------------------------------------------------------------------- the blocks


def _run_block(d: str, body: str, block: Block) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", body], cwd=d, env=_env(d),
                          capture_output=True, text=True, timeout=1200)


def _params():
    out = []
    for key, body in readme_blocks():
        block = BLOCKS.get(key)
        marks = ([pytest.mark.xfail(reason=f"waits for {block.xfail}", strict=True)]
                 if block is not None and block.xfail else [])
        out.append(pytest.param(key, body, id=key[:60], marks=marks))
    return out


@pytest.mark.parametrize("key,body", _params())
def test_readme_block_runs_as_written(key, body, tmp_path, request):
    if key not in BLOCKS:
        pytest.fail(f"README block {key!r} is not in BLOCKS (see "
                    "test_every_readme_block_is_registered)")
    block = BLOCKS[key]
    if key == DEMO_BLOCK:
        run = request.getfixturevalue("quick_demo_run")
        p = subprocess.CompletedProcess(body, run["returncode"], run["stdout"], run["stderr"])
    else:
        p = _run_block(_workspace(tmp_path, request, block), body, block)
    assert p.returncode == block.status, (
        f"README block {key!r} exited {p.returncode}, expected {block.status}:\n"
        f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def _layout_section() -> dict[str, set[str]]:
    """{package: module file names} as README's Layout section lists them ('' for the top level)."""
    text = open(README).read()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, set[str]] = {}
    package = None
    for line in section.splitlines():
        m = re.match(r"^ {6}(\w+)/\s+(.*)$", line)
        if m:
            package = m.group(1)
        elif re.match(r"^ {6}\w+\.py\b", line):
            package = ""
        elif not re.match(r"^ {19}\S", line):
            package = None  # a line outside the package listing ends the current entry
            continue
        listed.setdefault(package, set()).update(re.findall(r"\b(\w+\.py)\b", line))
    return listed


def test_layout_section_matches_the_tree():
    package_dir = os.path.join(ROOT, "uniimage_jax")
    tree = {"": {f for f in os.listdir(package_dir) if f.endswith(".py") and f != "__init__.py"}}
    for name in os.listdir(package_dir):
        path = os.path.join(package_dir, name)
        if os.path.isfile(os.path.join(path, "__init__.py")):
            tree[name] = {f for f in os.listdir(path) if f.endswith(".py") and f != "__init__.py"}
    listed = _layout_section()
    assert set(listed) == set(tree), f"packages: README {sorted(listed)} != tree {sorted(tree)}"
    for package, files in tree.items():
        assert listed[package] == files, (
            f"uniimage_jax/{package}: missing from README {sorted(files - listed[package])}, "
            f"listed but absent {sorted(listed[package] - files)}")
