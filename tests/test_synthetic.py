"""The synthetic compositional dataset and its deterministic scorer: ground truth scores (almost)
perfectly, noise and blank images do not, samples are deterministic by index, edits are applied."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter

from uniimage_jax.data import synthetic as S
from uniimage_jax.data import synthetic_scenes as scenes
from uniimage_jax.eval import synthetic_scorer as sc


@pytest.mark.parametrize("image_size,n", [(64, 300), (256, 96)])
def test_ground_truth_scores_high(image_size, n):
    ds = S.SyntheticCompositionalDataset(10_000, image_size=image_size, seed=3)
    samples = [ds[i] for i in range(n)]
    scores = sc.score_images((s["image"], s["metadata"]) for s in samples)
    assert set(scores) == set(S.CATEGORIES) | {"overall"}
    assert scores["overall"] >= 0.95, scores
    assert min(scores[c] for c in S.CATEGORIES) >= 0.9, scores


def test_smallest_size_renders_and_mostly_scores():
    ds = S.SyntheticCompositionalDataset(1000, image_size=32, seed=1)
    samples = [ds[i] for i in range(60)]
    assert all(s["image"].shape == (32, 32, 3) for s in samples)
    assert sc.score_images((s["image"], s["metadata"]) for s in samples)["overall"] >= 0.85
    big = S.SyntheticCompositionalDataset(10, image_size=512)[0]["image"]
    assert big.shape == (512, 512, 3)


@pytest.mark.parametrize("image_size", [64, 256])
def test_noise_and_blank_images_score_low(image_size):
    g = np.random.default_rng(0)
    metas = [m for _, m in S.prompts(36, seed=5)]
    n_noise = 24 if image_size <= 64 else 12  # a few noise images at 256 px keep the test quick
    noise = [g.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
             for _ in metas[:n_noise]]
    assert sc.score_images(zip(noise, metas))["overall"] <= 0.2
    blanks = [np.full((image_size, image_size, 3), v, np.uint8) for v in (0, 128, 255)]
    blanks.append(np.zeros((image_size, image_size, 3), np.uint8) + np.uint8(scenes.PALETTE["red"]))
    blank_pairs = [(blanks[i % len(blanks)], m) for i, m in enumerate(metas)]
    assert sc.score_images(blank_pairs)["overall"] <= 0.2


def test_wrong_attributes_are_rejected():
    """Swapping the colour, the class, the count or the relation of a true scene fails."""
    ds = S.SyntheticCompositionalDataset(1000, image_size=64, seed=7)
    checked = set()
    for i in range(120):
        s = ds[i]
        meta, image = s["metadata"], s["image"]
        inc = meta["include"]
        wrong = json.loads(json.dumps(meta))
        if meta["tag"] in ("colors", "color_attr"):
            wrong["include"][0]["color"] = next(c for c in scenes.COLORS if c != inc[0]["color"])
        elif meta["tag"] == "counting":
            wrong["include"][0]["count"] += 1
            wrong["exclude"][0]["count"] += 1
        elif meta["tag"] == "position":
            flip = {"left of": "right of", "right of": "left of",
                    "above": "below", "below": "above"}
            wrong["include"][1]["position"][0] = flip[inc[1]["position"][0]]
        else:
            wrong["include"][0]["class"] = next(c for c in scenes.SHAPES if c not in
                                                {r["class"] for r in inc})
        assert sc.score_image(image, meta), s["caption"]
        assert not sc.score_image(image, wrong), (s["caption"], wrong)
        checked.add(meta["tag"])
    assert checked == set(S.CATEGORIES)


def test_deterministic_by_index_and_seed():
    a = S.SyntheticCompositionalDataset(1000, image_size=64, seed=11)
    b = S.SyntheticCompositionalDataset(1000, image_size=64, seed=11)
    for i in (0, 5, 999, 5):  # any order, repeated reads
        sa, sb = a[i], b[i]
        assert sa["image"].tobytes() == sb["image"].tobytes()
        assert sa["caption"] == sb["caption"] and sa["metadata"] == sb["metadata"]
        assert sa["index"] == i
    other = S.SyntheticCompositionalDataset(1000, image_size=64, seed=12)
    assert any(a[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(5))
    e1, e2 = S.SyntheticEditDataset(100, seed=4), S.SyntheticEditDataset(100, seed=4)
    for i in (3, 0, 3):
        assert e1[i]["source_image"].tobytes() == e2[i]["source_image"].tobytes()
        assert e1[i]["target_image"].tobytes() == e2[i]["target_image"].tobytes()
        assert e1[i]["instruction"] == e2[i]["instruction"]
    assert S.prompts(12, seed=2) == S.prompts(12, seed=2)


def test_samples_are_well_formed_and_json_able():
    ds = S.SyntheticCompositionalDataset(50, image_size=96, seed=0, category_mix={"counting": 1.0})
    s = ds[7]
    assert s["image"].dtype == np.uint8 and s["image"].shape == (96, 96, 3)
    assert s["metadata"]["tag"] == "counting" and s["metadata"]["prompt"] == s["caption"]
    json.dumps(s["metadata"]), json.dumps(s["objects"])
    colours = {tuple(c) for c in s["image"].reshape(-1, 3)}
    assert colours <= {tuple(v) for v in scenes.PALETTE.values()} | {scenes.BACKGROUND}  # no anti-aliasing
    assert len(ds) == 50 and ds[-1]["index"] == 49
    pr = S.prompts(12)
    assert [m["tag"] for _, m in pr[:6]] == list(S.CATEGORIES)
    assert all(c == m["prompt"] for c, m in pr)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="image_size"):
        S.SyntheticCompositionalDataset(10, image_size=16)
    with pytest.raises(ValueError, match="unknown categories"):
        S.SyntheticCompositionalDataset(10, category_mix={"counting": 1, "typo": 1})
    with pytest.raises(IndexError):
        S.SyntheticCompositionalDataset(10)[10]
    with pytest.raises(ValueError, match="uint8"):
        sc.score_image(np.zeros((64, 64, 3), np.float32), {"include": []})
    with pytest.raises(ValueError, match="class"):
        sc.score_image(np.zeros((64, 64, 3), np.uint8), {"include": [{"class": "cat", "count": 1}]})


def test_edit_pairs_apply_the_instruction():
    ds = S.SyntheticEditDataset(1000, image_size=64, seed=9)
    kinds = set()
    for i in range(80):
        s = ds[i]
        kinds.add(s["edit"])
        assert sc.score_image(s["target_image"], s["metadata"]), (s["instruction"], s["metadata"])
        assert not sc.score_image(s["source_image"], s["metadata"]), s["instruction"]
    assert kinds == set(S.EDITS)


def test_main_scores_a_geneval_folder(tmp_path, capsys):
    ds = S.SyntheticCompositionalDataset(100, image_size=64, seed=0)
    for i in range(12):
        s = ds[i]
        d = tmp_path / f"{i:05d}"
        os.makedirs(d / "samples")
        (d / "metadata.jsonl").write_text(json.dumps(s["metadata"]) + "\n")
        Image.fromarray(s["image"]).save(d / "samples" / "0000.png")
        Image.fromarray(np.zeros_like(s["image"])).save(d / "samples" / "0001.png")
    scores = sc.main([str(tmp_path), "--json", str(tmp_path / "scores.json")])
    assert scores["overall"] == pytest.approx(0.5)  # every true image passes, every blank fails
    assert "overall" in capsys.readouterr().out
    assert json.loads((tmp_path / "scores.json").read_text()) == scores


def test_scorer_tolerates_mild_degradation():
    """Generated images are not flat: blur, pixel noise and JPEG must not break detection."""
    ds = S.SyntheticCompositionalDataset(1000, image_size=128, seed=2)
    g = np.random.default_rng(0)

    def degrade(image):
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.0)))
        image = np.clip(image.astype(int) + g.integers(-20, 21, image.shape), 0, 255)
        buffer = io.BytesIO()
        Image.fromarray(image.astype(np.uint8)).save(buffer, "JPEG", quality=80)
        return np.asarray(Image.open(buffer))

    samples = [ds[i] for i in range(36)]
    assert sc.score_images((degrade(s["image"]), s["metadata"]) for s in samples)["overall"] >= 0.9


def test_works_as_a_grain_source():
    import grain  # a dependency of the package; imported here to keep the other tests light

    ds = S.SyntheticCompositionalDataset(16, image_size=32, seed=0)
    batches = (grain.MapDataset.source(ds)
               # keep the fields to train on: the metadata lists are ragged
               .map(lambda s: {"image": s["image"], "caption": s["caption"]})
               .batch(4))
    batch = batches[1]
    assert batch["image"].shape == (4, 32, 32, 3)
    np.testing.assert_array_equal(batch["image"][0], ds[4]["image"])
    assert list(batch["caption"]) == [ds[i]["caption"] for i in range(4, 8)]


def test_verdicts_say_what_was_detected_and_what_failed():
    """judge_image: the objects found with colour and place, and the first claim not met."""
    scene = [scenes.SceneObject("circle", "red", 0.2, 0.2, 0.25),      # top left
             scenes.SceneObject("square", "blue", 0.8, 0.8, 0.3)]      # bottom right
    image = scenes.render(scene, 64)
    detected = "blue square (bottom right), red circle (top left)"   # largest first
    right = {"include": [{"class": "square", "count": 1},
                         {"class": "circle", "count": 1, "color": "red",
                          "position": ["left of", 0]}]}
    assert sc.judge_image(image, right) == {"correct": True, "detected": detected,
                                            "failed": None}
    wrong_side = json.loads(json.dumps(right))
    wrong_side["include"][1]["position"][0] = "below"
    assert sc.judge_image(image, wrong_side) == {
        "correct": False, "detected": detected,
        "failed": "1 red circle below the square: found it above and left of the square"}
    counting = {"include": [{"class": "circle", "count": 2}],
                "exclude": [{"class": "square", "count": 1}]}
    assert sc.judge_image(image, counting)["failed"] == "2 circles: found 1"
    assert sc.failed_claims(sc.detect_objects(image), counting) == [
        "2 circles: found 1", "fewer than 1 square: found 1"]
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert sc.judge_image(blank, right)["detected"] == "nothing"


def test_every_category_checks_the_colours_its_prompt_names():
    """A true scene of every category, recoloured (same shapes, counts and places, every object
    another colour), fails the prompt's own metadata: the colours in "a photo of a yellow
    circle and a white diamond" are checked as much as the shapes."""
    import dataclasses

    shift = {c: scenes.COLORS[(i + 1) % len(scenes.COLORS)] for i, c in enumerate(scenes.COLORS)}
    checked = set()
    for i, (caption, meta) in enumerate(S.prompts(24, seed=1000)):
        # the prompt's scene, drawn again from the prompt's own random stream
        drawn, drawn_caption, _ = S.sample_scene(np.random.default_rng([1000, i, 2]), meta["tag"])
        assert drawn_caption == caption
        assert sc.score_image(scenes.render(drawn, 64), meta), caption
        recoloured = [dataclasses.replace(o, color=shift[o.color]) for o in drawn]
        assert not sc.score_image(scenes.render(recoloured, 64), meta), caption
        checked.add(meta["tag"])
    assert checked == set(S.CATEGORIES)
