"""The caption grammar of the synthetic scenes, both ways.

Writing: each caption template (`objects_caption`, `count_caption`, `relation_caption`) builds the
caption's words and the claims they make (GenEval-style metadata: every class, colour, count and
relative position the caption states) from the same phrases, so a prompt and the metadata that
scores it cannot drift apart.

Reading: `caption_metadata` parses a caption in this grammar back into its claims (for scoring
what an MLLM says about an image). It is written apart from the templates on purpose: the tests
check that it reads every template's caption back to that template's metadata."""

from __future__ import annotations

from typing import Sequence

from uniimage_jax.data.synthetic_scenes import PALETTE, SHAPES, SceneObject

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of",
                    "above": "above", "below": "below"}
MOVE_DIRECTIONS = {"left of": "to the left", "right of": "to the right", "above": "up",
                   "below": "down"}


def with_article(word: str) -> str:
    """The word with its indefinite article ("a red circle", "an orange square")."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


CAPTION_START = "a photo of"


def _object_phrase(shape: str, color: str, color_after: bool = False) -> tuple[str, dict]:
    """("a red circle" or "a circle that is red", its claim: one object of that class and colour)."""
    words = (f"{with_article(shape)} that is {color}" if color_after
             else with_article(f"{color} {shape}"))
    return words, {"class": shape, "count": 1, "color": color}


def objects_caption(objects: Sequence[tuple[str, str]], color_after: bool = False
                    ) -> tuple[str, dict]:
    """(caption, metadata) naming each (shape, colour) in turn, joined by "and":
    "a photo of a red circle and a blue square"; with `color_after` (one object),
    "a photo of a circle that is red"."""
    phrases = [_object_phrase(shape, color, color_after) for shape, color in objects]
    return (f"{CAPTION_START} {' and '.join(words for words, _ in phrases)}",
            {"include": [claim for _, claim in phrases]})


def count_caption(shape: str, color: str, count: int) -> tuple[str, dict]:
    """(caption, metadata) of exactly `count` objects of one class and colour: "a photo of three
    red circles" claims three red circles and not four (GenEval's counting rule)."""
    return (f"{CAPTION_START} {NUMBER_WORDS[count]} {color} {shape}s",
            {"include": [{"class": shape, "count": count, "color": color}],
             "exclude": [{"class": shape, "count": count + 1}]})


def relation_caption(subject: tuple[str, str], relation: str, reference: tuple[str, str]
                     ) -> tuple[str, dict]:
    """(caption, metadata) of the (shape, colour) `subject` standing in `relation` to
    `reference`: "a photo of a red circle to the left of a blue square". The metadata lists the
    reference first and the subject's position relative to it (GenEval's layout)."""
    subject_words, subject_claim = _object_phrase(*subject)
    reference_words, reference_claim = _object_phrase(*reference)
    return (f"{CAPTION_START} {subject_words} {RELATION_PHRASES[relation]} {reference_words}",
            {"include": [reference_claim, {**subject_claim, "position": [relation, 0]}]})


def scene_caption(objects: Sequence[SceneObject]) -> str:
    """"a photo of" each object with its colour, joined by "and" (the edit pairs' captions)."""
    if not objects:
        return f"{CAPTION_START} nothing"
    return objects_caption([(o.shape, o.color) for o in objects])[0]


# What may join two object phrases of a caption: (relation or "and", its words).
_CAPTION_LINKS = [("and", ["and"])] + [(r, p.split()) for r, p in RELATION_PHRASES.items()]


def caption_metadata(caption: str) -> dict | None:
    """The claims of a caption in this dataset's grammar, as GenEval-style metadata with every
    stated colour (and relation, and for counts the exclusion of one more), or None when the
    caption is not in the grammar. The inverse of the caption templates above, for scoring what
    an MLLM says about an image (`uniimage_jax.eval.caption_scorer`):

      "a photo of a red circle" | "a photo of a circle that is red"
      "a photo of a red circle and a blue square" (any number of objects)
      "a photo of three red circles"
      "a photo of a red circle to the left of a blue square"

    A class may be named more than once ("a purple square and a red square"): the dataset never
    draws such a scene, but the caption is well formed and its claims are judged like any
    other's (each phrase then stands for another object of that class).
    """
    words = caption.strip().rstrip(".").lower().split()
    if words[:3] != ["a", "photo", "of"]:
        return None
    words = words[3:]
    counts = {w: n for n, w in NUMBER_WORDS.items() if n > 1}
    if len(words) == 3 and words[0] in counts and words[1] in PALETTE and \
            words[2].endswith("s") and words[2][:-1] in SHAPES:
        n, shape = counts[words[0]], words[2][:-1]
        return {"include": [{"class": shape, "count": n, "color": words[1]}],
                "exclude": [{"class": shape, "count": n + 1}]}
    phrases, links, i = [], [], 0
    while True:
        parsed = _parse_object_phrase(words, i)
        if parsed is None:
            return None
        (shape, color), i = parsed
        phrases.append({"class": shape, "count": 1, "color": color})
        if i == len(words):
            break
        for link, phrase in _CAPTION_LINKS:
            if words[i:i + len(phrase)] == phrase:
                break
        else:
            return None
        links.append(link)
        i += len(phrase)
    if links == [] or all(link == "and" for link in links):
        return {"include": phrases}
    if len(links) == 1:  # "A <relation> B": B is the reference, A stands in the relation to it
        return {"include": [phrases[1], {**phrases[0], "position": [links[0], 0]}]}
    return None


def _parse_object_phrase(words: Sequence[str], i: int):
    """((shape, colour), next index) for "a/an COLOUR SHAPE" or "a/an SHAPE that is COLOUR"."""
    if i >= len(words) or words[i] not in ("a", "an"):
        return None
    rest = words[i + 1:]
    if len(rest) >= 2 and rest[0] in PALETTE and rest[1] in SHAPES:
        return (rest[1], rest[0]), i + 3
    if len(rest) >= 4 and rest[0] in SHAPES and rest[1:3] == ["that", "is"] and \
            rest[3] in PALETTE:
        return (rest[0], rest[3]), i + 5
    return None
