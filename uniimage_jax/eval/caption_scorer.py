"""Scoring what an MLLM says about synthetic images (the understanding half of the demo).

A caption of a `uniimage_jax.data.synthetic` scene is correct when, read in the dataset's caption
grammar (`synthetic_captions.caption_metadata`), every claim holds for the drawn scene under
GenEval's rules (`synthetic_scorer.evaluate_objects`: classes, colours, counts, relative positions)
and it names every object of the scene. The scene is known exactly, so no image analysis is involved:
"a photo of a red circle and a blue square" is correct for exactly that pair in either order, a
caption that misses, adds or mis-colours an object is not, and so is anything off the grammar.
A well-formed caption that names a class twice ("a purple square and a red square", which the
dataset never draws) is judged claim by claim like any other.
`judge_caption` also says which claim failed first, for people reading the verdicts.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from uniimage_jax.data.synthetic_captions import caption_metadata
from uniimage_jax.eval.synthetic_scorer import accuracy_by_tag, failed_claims


def judge_caption(caption: str, objects: Sequence[Mapping]) -> dict:
    """{"correct": bool, "failed": the first claim of the caption that does not hold for the scene
    `objects` ({class, color, box} each), or None}. Claims are checked in the caption's order;
    naming every object of the scene is the last one."""
    metadata = caption_metadata(caption)
    if metadata is None:
        return {"correct": False, "failed": "not a caption of the dataset's grammar"}
    failures = failed_claims(objects, metadata)
    named = sum(req["count"] for req in metadata["include"])
    if named != len(objects):
        failures.append(f"names {named} object{'s' * (named != 1)}, the image has "
                        f"{len(objects)}")
    return {"correct": not failures, "failed": failures[0] if failures else None}


def caption_is_correct(caption: str, objects: Sequence[Mapping]) -> bool:
    """Whether `caption` describes the scene `objects` ({class, color, box} each) fully."""
    return judge_caption(caption, objects)["correct"]


def score_captions(items: Iterable[tuple[str, Sequence[Mapping], str]]) -> dict[str, float]:
    """(caption, scene objects, category tag) triples -> accuracy per tag and `overall` (the
    mean over tags, as for images)."""
    return accuracy_by_tag((tag, caption_is_correct(caption, objects))
                           for caption, objects, tag in items)
