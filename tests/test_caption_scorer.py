"""The understanding scorer: a caption is right when every claim holds for the drawn scene and it
names every object. Ground-truth captions must all pass; each kind of mistake must fail."""
import pytest

from uniimage_jax.data.synthetic import CATEGORIES, SyntheticCompositionalDataset
from uniimage_jax.data.synthetic_captions import caption_metadata
from uniimage_jax.eval.caption_scorer import caption_is_correct, judge_caption, score_captions
from uniimage_jax.processing.tiny import make_tiny_tokenizer


def _obj(shape, color, x, y, size=0.2):
    h = size / 2
    return {"class": shape, "color": color, "box": [x - h, y - h, x + h, y + h]}


RED_CIRCLE_LEFT = _obj("circle", "red", 0.2, 0.5)
BLUE_SQUARE_RIGHT = _obj("square", "blue", 0.8, 0.5)


def test_ground_truth_captions_are_all_correct():
    ds = SyntheticCompositionalDataset(600, image_size=32, seed=3)
    items = [(ds[i]["caption"], ds[i]["objects"], ds[i]["metadata"]["tag"]) for i in range(600)]
    scores = score_captions(items)
    assert set(scores) == set(CATEGORIES) | {"overall"}
    assert all(v == 1.0 for v in scores.values()), scores


@pytest.mark.parametrize("caption,correct", [
    ("a photo of a red circle and a blue square", True),
    ("a photo of a blue square and a red circle", True),            # order is free
    ("a photo of a red circle to the left of a blue square", True),
    ("a photo of a blue square to the right of a red circle", True),
    ("a photo of a blue square to the left of a red circle", False),   # wrong relation
    ("a photo of a red circle above a blue square", False),
    ("a photo of a red circle", False),                              # misses an object
    ("a photo of a red circle and a green square", False),           # wrong colour
    ("a photo of a red circle and a blue diamond", False),           # wrong shape
    ("a photo of a red circle and a blue square and a red triangle", False),   # extra object
    ("a photo of two red circles", False),                           # wrong count
    ("a red circle and a blue square", False),                       # off the grammar
    ("a photo of a red circle and a red circle", False),             # a class named twice
    ("", False),
])
def test_two_object_scene(caption, correct):
    assert caption_is_correct(caption, [RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT]) is correct


def test_single_object_and_counting_scenes():
    one = [_obj("triangle", "yellow", 0.5, 0.5)]
    assert caption_is_correct("a photo of a yellow triangle", one)
    assert caption_is_correct("a photo of a triangle that is yellow", one)
    assert not caption_is_correct("a photo of a triangle that is orange", one)
    three = [_obj("diamond", "white", x, 0.5, 0.15) for x in (0.2, 0.5, 0.8)]
    assert caption_is_correct("a photo of three white diamonds", three)
    assert not caption_is_correct("a photo of two white diamonds", three)
    assert not caption_is_correct("a photo of four white diamonds", three)
    assert not caption_is_correct("a photo of three green diamonds", three)


def test_caption_metadata_reads_the_grammar():
    assert caption_metadata("a photo of an orange square below a green diamond") == {
        "include": [{"class": "diamond", "count": 1, "color": "green"},
                    {"class": "square", "count": 1, "color": "orange", "position": ["below", 0]}]}
    assert caption_metadata("a photo of four purple circles") == {
        "include": [{"class": "circle", "count": 4, "color": "purple"}],
        "exclude": [{"class": "circle", "count": 5}]}
    for bad in ("a photo of", "a photo of a red", "a photo of a red circle below",
                "a photo of a red circle and", "a photo of one red circles",
                "a photo of a circle that is"):
        assert caption_metadata(bad) is None, bad


def test_every_caption_word_is_one_token_of_the_tiny_vocabulary():
    """The demo's MLLM reads captions word by word, as a real tokenizer's common words."""
    tok = make_tiny_tokenizer()
    ds = SyntheticCompositionalDataset(300, image_size=32, seed=1)
    for i in range(300):
        caption = ds[i]["caption"]
        assert len(tok(caption)["input_ids"]) == len(caption.split()), caption


@pytest.mark.parametrize("caption,failed", [
    ("a photo of a red circle and a blue square", None),
    ("a photo of a blue square to the left of a red circle",
     "1 blue square left of the circle: found it right of the circle"),
    ("a photo of a red circle and a green square", "1 green square: found blue"),
    ("a photo of a red circle and a blue diamond", "1 blue diamond: found 0"),
    ("a photo of a red circle", "names 1 object, the image has 2"),
    ("a red circle and a blue square", "not a caption of the dataset's grammar"),
])
def test_the_first_failed_claim_is_named(caption, failed):
    verdict = judge_caption(caption, [RED_CIRCLE_LEFT, BLUE_SQUARE_RIGHT])
    assert verdict == {"correct": failed is None, "failed": failed}


def test_a_count_too_low_fails_on_the_exclusion_first():
    three = [_obj("diamond", "white", x, 0.5) for x in (0.2, 0.5, 0.8)]
    assert judge_caption("a photo of two white diamonds", three)["failed"] == \
        "fewer than 3 diamonds: found 3"


def _claims(metadata):
    return {k: v for k, v in metadata.items() if k not in ("tag", "prompt")}


def test_every_template_claims_what_its_words_say():
    """Every caption template of the dataset (each category, every count and relation, the edit
    pairs' scene captions) is read back by the grammar's parser to exactly the metadata the
    generation scorer checks: no colour, count or relation stated in words goes unchecked, and
    the understanding grammar accepts every caption the dataset writes."""
    from uniimage_jax.data.synthetic import SyntheticEditDataset, prompts

    seen = set()
    held_out = prompts(240, seed=1000)  # the demo's held-out prompts come from this stream
    data = SyntheticCompositionalDataset(240, image_size=32, seed=0)
    for caption, metadata in held_out + [(s["caption"], s["metadata"]) for s in
                                         (data[i] for i in range(240))]:
        assert caption_metadata(caption) == _claims(metadata), caption
        include = metadata["include"]
        assert all("color" in claim for claim in include), caption
        seen.add((metadata["tag"], include[0]["count"], include[-1].get("position", [""])[0]))
    assert {tag for tag, _, _ in seen} == set(CATEGORIES)
    assert {n for tag, n, _ in seen if tag == "counting"} == {2, 3, 4}
    assert {r for tag, _, r in seen if tag == "position"} == {"left of", "right of", "above",
                                                              "below"}
    edits = SyntheticEditDataset(80, image_size=32, seed=0)
    for i in range(80):
        for caption in (edits[i]["source_caption"], edits[i]["target_caption"]):
            claims = caption_metadata(caption)
            assert claims is not None and all("color" in c for c in claims["include"]), caption


def test_a_class_named_twice_is_judged_claim_by_claim():
    """Well formed although the dataset never draws two objects of one class in two colours."""
    scene = [_obj("square", "purple", 0.2, 0.5), _obj("circle", "red", 0.8, 0.5)]
    assert judge_caption("a photo of a purple square and a red square", scene) == {
        "correct": False, "failed": "1 red square: found 0"}
    two_squares = [_obj("square", "purple", 0.2, 0.5, 0.25), _obj("square", "red", 0.8, 0.5)]
    assert caption_is_correct("a photo of a purple square and a red square", two_squares)
