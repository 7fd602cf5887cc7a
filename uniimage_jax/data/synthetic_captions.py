"""The caption grammar of the synthetic scenes: the words the captions are made of and
`caption_metadata`, the parser that turns a caption in that grammar back into the claims it makes
(for scoring what an MLLM says about an image)."""

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


def scene_caption(objects: Sequence[SceneObject]) -> str:
    """"a photo of" each object with its colour, joined by "and" (the edit pairs' captions)."""
    parts = [with_article(f"{o.color} {o.shape}") for o in objects]
    return "a photo of " + (" and ".join(parts) if parts else "nothing")


# What may join two object phrases of a caption: (relation or "and", its words).
_CAPTION_LINKS = [("and", ["and"])] + [(r, p.split()) for r, p in RELATION_PHRASES.items()]


def caption_metadata(caption: str) -> dict | None:
    """The claims of a caption in this dataset's grammar, as GenEval-style metadata with every
    stated colour (and relation, and for counts the exclusion of one more), or None when the
    caption is not in the grammar. The inverse of the caption templates of
    `uniimage_jax.data.synthetic`, for scoring what an MLLM says about an image
    (`uniimage_jax.eval.caption_scorer`):

      "a photo of a red circle" | "a photo of a circle that is red"
      "a photo of a red circle and a blue square" (classes distinct)
      "a photo of three red circles"
      "a photo of a red circle to the left of a blue square"
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
    if len({p["class"] for p in phrases}) != len(phrases):
        return None  # the grammar never names a class twice
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
