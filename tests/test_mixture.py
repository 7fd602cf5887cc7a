"""Mixtures of sources (`data.mixture`): shares per epoch follow the weights, the plain
concatenation without weights, the config checked field by field, exact resume and independence
from the process count (with length grouping and aspect buckets on), and mixtures of latent
caches."""
import collections
import json
import os

import numpy as np
import pytest

from uniimage_jax.data import latent_records
from uniimage_jax.data.mixture import MixtureSource, largest_remainder
from uniimage_jax.data.pipeline import (check_training_data, default_data_config,
                                        make_train_iterator)
from uniimage_jax.errors import ConfigError
from uniimage_jax.processing.prompt_buckets import TBAC_PROMPT_BUCKETS

from tests.test_length_groups import Captions, WordCount


def _cfg(**overrides):
    cfg = default_data_config("t2i")
    cfg.read_threads, cfg.prefetch_buffer_size, cfg.image_size = 2, 16, 4
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _take(cfg, source, batch, steps, process=0, count=1, state=None, **kw):
    it = make_train_iterator(cfg, task="t2i", batch_size=batch, seed=5, process_index=process,
                             process_count=count, source=source, count_caption_tokens=WordCount(),
                             size_multiple=4, **kw)
    with it:
        if state is not None:
            it.set_state(state)
        batches = [next(it) for _ in range(steps)]
        return batches, json.loads(json.dumps(it.get_state())), it.bucket_plan


def _words(n, lo, hi, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(["w"] * int(k)) for k in rng.integers(lo, hi + 1, n)]


def test_each_epoch_gives_every_component_its_weighted_share():
    """Tolerance: per epoch a component gives exactly its share of the epoch's examples rounded
    to a whole example (largest remainder); a component drawn less than its size shows a new
    subset each epoch, one drawn more shows every example the same number of times +-1."""
    assert largest_remainder(23, (0.5, 0.3, 0.2)).tolist() == [11, 7, 5]
    a, b = Captions(_words(30, 1, 3, 0)), Captions(_words(10, 1, 3, 1))
    source = MixtureSource([a, b], weights=(1, 3))
    assert source.counts.tolist() == [10, 30] and len(source) == 40
    batches, _, _ = _take(_cfg(), source, 8, 25)   # 5 epochs of 40
    seen = np.concatenate([x["index"] for x in batches]).reshape(5, 40)
    subsets = set()
    for epoch in seen:
        from_a = epoch[epoch < 30]
        assert len(from_a) == 10 == len(set(from_a.tolist()))       # 10 of A, none twice
        counts = collections.Counter(epoch[epoch >= 30].tolist())
        assert sorted(counts) == list(range(30, 40)) and set(counts.values()) == {3}
        subsets.add(tuple(sorted(from_a.tolist())))
    assert len(subsets) == 5
    # names and captions are the components' own
    by_index = {int(i): c for x in batches for i, c in zip(x["index"], x["caption"]) if c}
    assert all(by_index[i] == (a.captions[i] if i < 30 else b.captions[i - 30])
               for i in by_index)


def test_unreadable_examples_of_a_component_are_skipped_counted_and_named():
    from tests.test_length_groups import Flaky

    source = MixtureSource([Captions(_words(5, 1, 3, 6)), Flaky(_words(10, 1, 3, 7))])
    it = make_train_iterator(_cfg(), task="t2i", batch_size=4, seed=1, source=source)
    with it:
        seen = np.concatenate([next(it)["index"] for _ in range(4)])  # 16 of 13 readable
    assert it.skipped_files() == ["flaky:3", "flaky:7"] and it.num_skipped == 2
    assert set(seen.tolist()) == set(range(15)) - {5 + 3, 5 + 7}


def _manifest(tmp_path, name, n, color):
    from PIL import Image

    d = tmp_path / name
    d.mkdir()
    for i in range(n):
        Image.new("RGB", (6, 6), (color, 10 * i, 0)).save(d / f"{i}.png")
    path = d / "m.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.png", "caption": f"{name} {i}"}) + "\n"
                            for i in range(n)))
    return path


def test_a_mixture_from_the_config_is_the_concatenation_and_its_errors_name_the_field(
        tmp_path, monkeypatch):
    from uniimage_jax.train.config import base_config
    from uniimage_jax.train.config_paths import make_paths_absolute
    from uniimage_jax.train.latent_cache import cache_latents

    one, two = _manifest(tmp_path, "one", 5, 200), _manifest(tmp_path, "two", 3, 50)
    cfg = _cfg(source="jsonl", mixture=({"path": str(one)}, {"path": str(two)}),
               caption_dropout=0.0)
    batches, _, _ = _take(cfg, None, 4, 2)
    assert sorted(np.concatenate([b["index"] for b in batches]).tolist()) == list(range(8))
    names = {str(n) for b in batches for n in b["name"]}
    assert names == {f"{one}:{i + 1}" for i in range(5)} | {f"{two}:{i + 1}" for i in range(3)}
    captions = {c for b in batches for c in b["caption"]}
    assert captions == {f"one {i}" for i in range(5)} | {f"two {i}" for i in range(3)}

    config = base_config(stage="s", task="t2i", preset="tiny")
    config.data.source = "jsonl"
    monkeypatch.chdir(tmp_path)  # relative component paths become absolute when a run starts
    config.data.mixture = ({"path": "one/m.jsonl"}, {"path": "two/m.jsonl", "weight": 1})
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight: give a weight"):
        check_training_data(config)
    config.data.mixture = ({"path": "one/m.jsonl"}, {"path": "two/m.jsonl"})
    make_paths_absolute(config)
    assert config.data.mixture[1]["path"] == str(two)
    check_training_data(config)
    # a latent cache of a mixture is its concatenation: weights belong to training
    config.data.mixture = ({"path": str(one), "weight": 1}, {"path": str(two), "weight": 2})
    with pytest.raises(ConfigError, match="data.mixture weights: a latent cache holds every"):
        cache_latents(config, str(tmp_path / "cache"))
    for mixture, message in [
            (("one.jsonl",), r"data.mixture\[0\] must be a non-empty dict"),
            (({"path": str(one)},), r"data.mixture has one component"),
            (({"path": str(one)}, {"pth": "x"}), r"data.mixture\[1\].pth: no such data field"),
            (({"path": str(one)}, {"caption_dropout": 0.5}),
             r"data.mixture\[1\].caption_dropout: set for the whole mixture"),
            (({"path": str(one), "weight": 1}, {"path": str(two), "weight": -1}),
             r"data.mixture\[1\].weight must be a positive number"),
            (({"path": str(one)}, {"path": str(tmp_path / "absent.jsonl")}),
             r"data.mixture\[1\]: .*absent.jsonl"),
            (({"path": str(one)}, {"source": "jsonl", "path": ""}),
             r"data.mixture\[1\]: data.source='jsonl' needs data.path"),
            (({"path": str(one)}, {"synthetic_num_samples": "many"}),
             r"data.mixture\[1\].synthetic_num_samples='many'")]:
        config.data.mixture = mixture
        with pytest.raises((ConfigError, FileNotFoundError), match=message):
            check_training_data(config)


def test_a_weighted_mixture_resumes_exactly_and_ignores_the_process_count():
    """Weights, length grouping and aspect buckets together: 2 processes see the 1-process
    global batches, a resume from the JSON state mid-epoch continues them, every batch has one
    shape, and grouping leaves each epoch's examples as they were."""
    rng = np.random.default_rng(0)
    shapes = [(32, 32), (32, 64), (64, 32)]  # three buckets at image size 32
    sizes = [[shapes[k] for k in rng.integers(0, 3, n)] for n in (40, 24)]
    source = MixtureSource([Captions(_words(40, 1, 60, 2), sizes[0]),
                            Captions(_words(24, 1, 60, 3), sizes[1])], weights=(1, 1))
    cfg = _cfg(prompt_buckets=TBAC_PROMPT_BUCKETS["t2i"], length_group_window=2,
               aspect_buckets="sana_512", image_size=32)
    whole, _, plan = _take(cfg, source, 8, 16)
    assert len({b["target"].shape for b in whole}) == 3
    hosts = [_take(cfg, source, 4, 16, process=p, count=2)[0] for p in range(2)]
    for step, batch in enumerate(whole):
        parts = [hosts[p][step] for p in range(2)]
        np.testing.assert_array_equal(batch["index"], np.concatenate([x["index"] for x in parts]))
        np.testing.assert_array_equal(batch["target"],
                                      np.concatenate([x["target"] for x in parts]))
    first, state, _ = _take(cfg, source, 8, 5)
    resumed, _, _ = _take(cfg, source, 8, 11, state=state)
    for x, y in zip(whole, first + resumed):
        np.testing.assert_array_equal(x["index"], y["index"])
        assert list(x["caption"]) == list(y["caption"])
    ungrouped, _, _ = _take(_cfg(aspect_buckets="sana_512", image_size=32), source, 8, 16)
    order = [np.concatenate([b["index"] for b in bs]) for bs in (whole, ungrouped)]
    epoch = plan.epoch_length  # the bucketed epoch: whole global batches of each bucket
    assert 2 * epoch <= len(order[0])
    for e in range(2):
        assert sorted(order[0][e * epoch:(e + 1) * epoch]) == sorted(
            order[1][e * epoch:(e + 1) * epoch])
    assert not np.array_equal(order[0], order[1])  # grouping did reorder


def _latent_cache(directory, records, task="t2i", image_size=4):
    """A complete latent cache written with the cache's own record and shard functions."""
    os.makedirs(directory)
    encoded = [latent_records.encode_record(np.full((1, 1, 2), i, np.float32), c, f"r{i}", i)
               for i, c in records]
    n = latent_records.write_shard(str(directory), 0, encoded)
    latent_records.write_json(str(directory / latent_records.METADATA_FILE), {
        "format": latent_records.FORMAT, "task": task, "image_size": image_size,
        "source_image_size": None, "shards": [{"file": latent_records.shard_file(0),
                                               "start": 0, "stop": n, "examples": n,
                                               "skipped": []}],
        "num_shards": 1, "num_examples": n, "num_skipped": 0, "complete": True})
    return str(directory)


def test_a_mixture_of_latent_caches_gives_the_batches_of_the_mixture_it_encoded(tmp_path):
    captions = [_words(6, 1, 3, 4), _words(4, 1, 3, 5)]
    images = MixtureSource([Captions(c) for c in captions], weights=(2, 1))
    caches = tuple({"path": _latent_cache(tmp_path / f"c{k}", list(enumerate(c)))}
                   for k, c in enumerate(captions))
    cfg = _cfg(source="latents", mixture=tuple({**c, "weight": w}
                                                for c, w in zip(caches, (2, 1))))
    from_caches, _, _ = _take(cfg, None, 2, 10)
    from_images, _, _ = _take(_cfg(), images, 2, 10)
    for x, y in zip(from_caches, from_images):
        np.testing.assert_array_equal(x["index"], y["index"])
        assert list(x["caption"]) == list(y["caption"])
        np.testing.assert_array_equal(x["latents"][:, 0, 0, 0],
                                      [i if i < 6 else i - 6 for i in x["index"]])
    with pytest.raises(ConfigError, match="latent caches with image sources"):
        MixtureSource([Captions(captions[0]), latent_records.LatentRecordSource(caches[0]["path"])])
    with pytest.raises(ConfigError, match="aspect buckets with a latent cache"):
        _take(_cfg(source="latents", mixture=caches, aspect_buckets="sana_512"), None, 2, 1)
