"""A model measured on the synthetic benchmark with every verdict kept: both halves of the model.

- generation: each prompt sampled `num_images` times, each sample judged by the deterministic
  GenEval-style scorer (`synthetic_scorer.judge_image`: correct or not, what was detected, the
  first claim that failed);
- understanding: the MLLM asked to caption held-out scenes, each caption judged against the drawn
  scene (`caption_scorer.judge_caption`).

Scores are accuracies per category and `overall` (the mean over categories, as GenEval reports),
computed from the same verdicts that are kept, so a table and the verdicts behind it never
disagree. `Evaluation` gathers both halves for several models (e.g. untrained and trained, with
the same prompts, scenes and noise); `prompt_records` / `caption_records` lay the verdicts out for
JSON and for the report; `format_table` prints a score table.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from uniimage_jax.errors import UserError
from uniimage_jax.eval.caption_scorer import judge_caption
from uniimage_jax.eval.synthetic_scorer import accuracy_by_tag, check_metadata, judge_image


@dataclasses.dataclass
class GenerationResult:
    scores: dict[str, float]
    images: list[list]           # per prompt, its PIL samples
    verdicts: list[list[dict]]   # per prompt, per sample: judge_image's verdict


@dataclasses.dataclass
class UnderstandingResult:
    scores: dict[str, float]
    captions: list[str]
    verdicts: list[dict]         # per scene: judge_caption's verdict


def evaluate_generation(model, params, processor, prompts: Sequence[tuple[str, Mapping]],
                        num_images: int, seed: int, cfg) -> GenerationResult:
    """Sample j of prompt i uses noise seed (seed * 100003 + i, j): the same noise for every
    model evaluated with the same `seed`, so before/after samples are comparable one by one."""
    import numpy as np
    from tqdm.auto import tqdm

    from uniimage_jax.sampling.sampler import generate

    images, verdicts = [], []
    for i, (caption, metadata) in enumerate(tqdm(prompts, desc="sampling", unit="prompt")):
        row = generate(model, params, processor, caption, num_images=num_images,
                       seed=seed * 100_003 + i, cfg=cfg)
        images.append(row)
        verdicts.append([judge_image(np.asarray(im), metadata) for im in row])
    scores = accuracy_by_tag((metadata.get("tag", "untagged"), v["correct"])
                             for (_, metadata), row in zip(prompts, verdicts) for v in row)
    return GenerationResult(scores, images, verdicts)


def evaluate_understanding(model, params, processor, scenes: Sequence[Mapping], question: str,
                           max_new_tokens: int) -> UnderstandingResult:
    """The MLLM's caption of each scene ({"image", "objects", "metadata"} as the synthetic dataset
    gives), greedy, and its verdict."""
    from PIL import Image

    from uniimage_jax.sampling.text_generation import answer

    captions = answer(model.mllm, params["mllm"], processor,
                      [[Image.fromarray(s["image"])] for s in scenes], [question] * len(scenes),
                      max_new_tokens=max_new_tokens)
    verdicts = [judge_caption(c, s["objects"]) for c, s in zip(captions, scenes)]
    scores = accuracy_by_tag((s["metadata"]["tag"], v["correct"])
                             for s, v in zip(scenes, verdicts))
    return UnderstandingResult(scores, captions, verdicts)


def prompt_records(prompts: Sequence[tuple[str, Mapping]],
                   results: Mapping[str, GenerationResult]) -> list[dict]:
    """Per prompt: {"caption", "metadata", and per result name (e.g. "untrained", "trained")
    "<name>_correct": [bool per sample], "<name>_verdicts": [verdict per sample]}."""
    records = []
    for i, (caption, metadata) in enumerate(prompts):
        record = {"caption": caption, "metadata": dict(metadata)}
        for name, result in results.items():
            record[f"{name}_correct"] = [v["correct"] for v in result.verdicts[i]]
            record[f"{name}_verdicts"] = result.verdicts[i]
        records.append(record)
    return records


def caption_records(scenes: Sequence[Mapping],
                    results: Mapping[str, UnderstandingResult]) -> list[dict]:
    """Per scene: {"truth", "tag", and per result name "<name>": the caption written,
    "<name>_verdict": its verdict}."""
    records = []
    for i, scene in enumerate(scenes):
        record = {"truth": scene["caption"], "tag": scene["metadata"]["tag"]}
        for name, result in results.items():
            record[name] = result.captions[i]
            record[f"{name}_verdict"] = result.verdicts[i]
        records.append(record)
    return records


@dataclasses.dataclass
class Evaluation:
    """Both halves measured for one or more models, each under a name ("untrained", "trained"),
    on the same prompts and scenes."""
    prompts: list                # (caption, metadata) pairs
    scenes: list                 # synthetic dataset records: image, caption, metadata, objects
    generation: dict = dataclasses.field(default_factory=dict)      # name -> GenerationResult
    understanding: dict = dataclasses.field(default_factory=dict)   # name -> UnderstandingResult

    def score(self, name: str, model, params, processor, *, num_images: int, seed: int,
              sampling, question: str, max_new_tokens: int, mllm=None) -> None:
        """Both halves of one model, under `name`; `mllm` = (model, params, processor) of another
        checkpoint captions instead when given."""
        cap_model, cap_params, cap_processor = mllm or (model, params, processor)
        self.understanding[name] = evaluate_understanding(
            cap_model, cap_params, cap_processor, self.scenes, question, max_new_tokens)
        self.generation[name] = evaluate_generation(model, params, processor, self.prompts,
                                                    num_images, seed, sampling)

    def tables(self) -> dict:
        """{"understanding": {name: scores}, "generation": {name: scores}}."""
        return {"understanding": {n: r.scores for n, r in self.understanding.items()},
                "generation": {n: r.scores for n, r in self.generation.items()}}

    def num_images(self) -> int:
        return len(next(iter(self.generation.values())).images[0])


def format_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    """category | one column per model (e.g. untrained, trained), with `overall` last."""
    names = list(scores)
    cats = [k for k in scores[names[-1]] if k != "overall"] + ["overall"]
    width = max(len(c) for c in cats + ["category"])
    widths = [max(len(n), 7) for n in names]
    rule = "-" * (width + sum(w + 2 for w in widths))
    lines = [f"{'category':<{width}}" + "".join(f"  {n:>{w}}" for n, w in zip(names, widths)),
             rule]
    for c in cats:
        if c == "overall":
            lines.append(rule)
        lines.append(f"{c:<{width}}" + "".join(
            f"  {scores[n].get(c, float('nan')):{w}.3f}" for n, w in zip(names, widths)))
    return "\n".join(lines)


def read_scorable_prompts(path: str) -> list[tuple[str, dict]]:
    """(prompt, metadata) per line of a GenEval-style JSONL file, every line checked now against
    what the synthetic scorer can judge (file:line in the error)."""
    from uniimage_jax.data.jsonl import read_json_objects

    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt metadata file {path!r} does not exist")
    prompts = []
    for n, _, metadata in read_json_objects(path):
        if not str(metadata.get("prompt", "")).strip():
            raise UserError(f"{path}:{n} has no \"prompt\" field")
        try:
            check_metadata(metadata)
        except ValueError as e:
            raise UserError(f"{path}:{n}: {e}") from None
        prompts.append((str(metadata["prompt"]), metadata))
    if not prompts:
        raise UserError(f"prompt metadata file {path!r} holds no prompts")
    return prompts
