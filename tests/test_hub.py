"""Hugging Face Hub model ids (uniimage_jax/hub.py), offline against a Hub cache the tests write in
the hub's own layout (tests/hub_cache.py): a conversion by model ids gives what a conversion of
the same directories gives; a local directory wins over an id of the same spelling; revisions
pin snapshots; a model that is not cached is one line naming it and the command that fetches it
(exit 2); what would be fetched online is only the files that are read.
"""
import json
import os

import numpy as np
import pytest

from tests.hub_cache import add_snapshot, published_cache
from tests.shared_runs import made_once
from uniimage_jax import hub
from uniimage_jax.errors import UserError

IDS = {"tbac": "TencentBAC/TBAC-UniImage-3B", "mllm": "Qwen/Qwen2.5-VL-3B-Instruct",
       "dit": "Efficient-Large-Model/Sana_1600M_512px_diffusers",
       "vae": "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers"}


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    from tests.test_readme import _build_standins

    return made_once(tmp_path_factory, "readme_standins", _build_standins)


@pytest.fixture
def cache(tmp_path, monkeypatch, standins):
    """A Hub cache holding the stand-ins under their published ids; HF_HUB_OFFLINE is set by
    tests/conftest.py, so nothing can be downloaded."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    root = str(tmp_path / "hub")
    snapshots = published_cache(root, standins["names"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", root)
    monkeypatch.chdir(tmp_path)
    return root, snapshots


def _converted(path):
    from uniimage_jax.checkpoints.converted import load_converted

    config, params = load_converted(path)
    with open(os.path.join(path, "source_keys.json")) as fh:
        record = json.load(fh)
    return config, params, record


def test_convert_tbac_by_hub_ids_equals_converting_the_directories(cache, standins, tmp_path):
    """The stand-ins' own conversion (tests/test_readme.py) read the same files from their
    directories."""
    import jax

    from uniimage_jax.cli import convert as cli

    local = standins["tbac"]  # converted from the same files, given as directories
    by_id = str(tmp_path / "from_ids")
    # The Sana id is the pipeline's, as its model card gives it: its transformer/ is read.
    assert cli.main(["tbac", "--src", IDS["tbac"], "--mllm", IDS["mllm"], "--dit", IDS["dit"],
                     "--vae", IDS["vae"], "--dst", by_id]) == 0
    config_a, params_a, record_a = _converted(local)
    config_b, params_b, record_b = _converted(by_id)
    assert config_a == config_b and record_a == record_b
    leaves_a, tree_a = jax.tree.flatten(params_a)
    leaves_b, tree_b = jax.tree.flatten(params_b)
    assert tree_a == tree_b
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(leaves_a, leaves_b))


def test_processor_and_component_ids_resolve_from_the_cache(cache):
    from uniimage_jax.processing.qwen import load_processor

    _, snapshots = cache
    folder = hub.resolve(IDS["mllm"], files=hub.PROCESSOR)
    assert folder == snapshots[IDS["mllm"]]
    assert load_processor(folder).tokenizer is not None
    dit = hub.resolve(IDS["dit"], component="transformer")
    assert dit == os.path.join(snapshots[IDS["dit"]], "transformer")
    assert hub.resolve(f"hf://{IDS['dit']}/transformer", files=hub.CONFIG) == dit


def test_a_local_directory_wins_over_an_id_of_the_same_spelling(cache):
    os.makedirs(IDS["mllm"])  # ./Qwen/Qwen2.5-VL-3B-Instruct, relative to the current directory
    assert not hub.is_hub_id(IDS["mllm"])
    assert hub.resolve(IDS["mllm"], files=hub.PROCESSOR) == IDS["mllm"]
    assert hub.entered(IDS["mllm"]) == os.path.abspath(IDS["mllm"])
    assert hub.is_hub_id("hf://" + IDS["mllm"])  # hf:// always means the Hub
    assert hub.entered(IDS["tbac"]) == IDS["tbac"]  # no such folder: kept as the id


def test_revisions_pin_snapshots(cache, standins):
    root, snapshots = cache
    qwen = os.path.join(standins["names"], "Qwen2.5-VL-3B-Instruct")
    old = add_snapshot(root, IDS["mllm"], {"config.json": os.path.join(qwen, "config.json")},
                       commit="a" * 40, refs=("v1",))
    assert hub.resolve(f"{IDS['mllm']}@{'a' * 40}", files=hub.CONFIG) == old
    assert hub.resolve(f"{IDS['mllm']}@v1", files=hub.CONFIG) == old
    assert hub.resolve(IDS["mllm"], files=hub.CONFIG) == snapshots[IDS["mllm"]]  # main
    # That old snapshot has no weights: asking for them says what is missing and how to fetch.
    with pytest.raises(UserError, match=r"lacks any \*\.safetensors file; fetch it with "
                                        r"`hf download Qwen/Qwen2.5-VL-3B-Instruct --revision v1`"):
        hub.resolve(f"{IDS['mllm']}@v1", what="--src")


@pytest.mark.parametrize("spec, expected", [
    ("Qwen/Qwen2.5-VL-3B-Instruct", hub.HubRef("Qwen/Qwen2.5-VL-3B-Instruct", None, "")),
    ("hf://a/b@v1.0/transformer/", hub.HubRef("a/b", "v1.0", "transformer")),
    ("org/name@main/sub/dir", hub.HubRef("org/name", "main", "sub/dir")),
    ("Qwen2.5-VL-3B-Instruct", None), ("/abs/org/name", None), ("./org/name", None),
    ("gs://bucket/org", None), ("org--x/name", None), ("org/na..me", None), ("", None)])
def test_what_counts_as_a_hub_id(spec, expected):
    assert hub.parse(spec) == expected


def test_a_model_not_in_the_cache_is_one_line_naming_it(cache, tmp_path, capsys):
    from uniimage_jax.cli import convert as cli

    rc = cli.main(["mllm", "--src", "SomeOrg/Missing-Model@v2", "--dst", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "--src 'SomeOrg/Missing-Model@v2'" in err and "HF_HUB_OFFLINE is set" in err
    assert "`hf download SomeOrg/Missing-Model --revision v2`" in err
    assert not os.path.exists(tmp_path / "out")


def test_only_the_files_read_are_asked_for(cache, monkeypatch):
    """Online, snapshot_download is asked for the config JSON, then the shards the index names
    (not the fp16 copy beside them, not the rest of the pipeline); for a processor no weights."""
    import huggingface_hub

    root, snapshots = cache
    snapshot = snapshots[IDS["dit"]]
    with open(os.path.join(snapshot, "transformer", "m.safetensors.index.json"), "w") as fh:
        json.dump({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}, fh)
    for name in ("m-1.safetensors", "m-2.safetensors", "m.fp16.safetensors"):
        open(os.path.join(snapshot, "transformer", name), "wb").close()
    asked = []

    def fake_download(repo_id, *, revision, allow_patterns, ignore_patterns, local_files_only):
        asked.append((repo_id, allow_patterns, ignore_patterns, local_files_only))
        return snapshot
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.resolve(IDS["dit"], component="transformer")
    assert asked == [
        (IDS["dit"], ["config.json", "model_index.json", "*.safetensors.index.json"], None, False),
        (IDS["dit"], ["transformer/config.json", "transformer/model_index.json",
                      "transformer/*.safetensors.index.json"], None, False),
        (IDS["dit"], ["transformer/m-1.safetensors", "transformer/m-2.safetensors"],
         ["transformer/*/*"], False)]
    asked.clear()
    hub.resolve(IDS["mllm"], files=hub.PROCESSOR)
    assert [a[1] for a in asked] == [["*.json", "*.txt", "*.jinja", "*.model", "*.tiktoken"]]


def test_config_processor_dir_keeps_the_id_and_is_checked_at_start_up(cache):
    from uniimage_jax.train.config import base_config
    from uniimage_jax.train.config_paths import check_paths_exist, make_paths_absolute
    from uniimage_jax.train.stage_setup import build_model, load_processor_for

    c = base_config(stage="s", task="t2i", preset="tiny")
    c.processor_dir, c.eval.data.path = IDS["mllm"], "heldout.jsonl"
    make_paths_absolute(c)
    assert c.processor_dir == IDS["mllm"]  # stored as typed: the same model on another machine
    assert c.eval.data.path == os.path.abspath("heldout.jsonl")
    check_paths_exist(c)
    assert load_processor_for(c, build_model(c), ".").tokenizer is not None
    c.processor_dir = "SomeOrg/Missing-Processor"
    with pytest.raises(UserError, match=r"^config\.processor_dir 'SomeOrg/Missing-Processor': "
                                        r"no local directory"):
        check_paths_exist(c)
