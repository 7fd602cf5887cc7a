"""Batch answers (`uniimage-understand --questions`): a JSONL of questions about images answered
on every device of every process, resumable, the same answers on any topology.

Input (a local file): one JSON object per line with "question" and optionally "image" (a path)
or "images" (a list of paths), relative paths read from the JSONL file's folder; other fields
are kept. Output (local or `gs://`, through `writers.Output`): the same objects in the same
order, each with "answer" added.

As `uniimage-sample` (`sample_run`): the questions not yet answered are dealt to the processes
in turn; each process answers its share on a mesh of its own devices (weights replicated), a
call holding `questions_per_call` questions per device, each device running the single-device
generation loop (`text_generation.mesh_token_loop`). A question is encoded alone, left-padded to
its own length rounded up to `PROMPT_BUCKET` tokens; a call's questions share that length and
their images' grids (the compiled shape), a short call filled with copies. Sampling
(temperature > 0) draws question i's tokens from fold_in(PRNGKey(seed), i). So an answer depends
on (question, images, seed, settings) only. Each process keeps its answers in
`<out>.parts/<run>-process-<i>-of-<P>.jsonl`, rewritten after every call; a rerun answers only
what no part holds yet, and process 0 writes the output file once every question is answered.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uniimage_jax.data.jsonl import read_json_objects
from uniimage_jax.errors import UserError
from uniimage_jax.eval.sample_run import new_run_id, share
from uniimage_jax.eval.writers import Output
from uniimage_jax.sampling import text_generation as tg
from uniimage_jax.sampling.mesh_sampler import DeviceLayout
from uniimage_jax.train import distributed

PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class Question:
    line: int                 # from 1, in the input file
    record: dict              # the input object, unchanged
    question: str
    images: tuple[str, ...]   # absolute paths


def read_questions(path: str) -> list[Question]:
    """Every line of a questions JSONL, checked (the images must exist)."""
    if not os.path.isfile(path):
        raise UserError(f"--questions {path!r} does not exist")
    folder = os.path.dirname(os.path.abspath(path))
    out = []
    for n, _, record in read_json_objects(path, error=UserError):
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise UserError(f"{path}:{n} has no \"question\" (a non-empty string)")
        if "image" in record and "images" in record:
            raise UserError(f"{path}:{n} has both \"image\" and \"images\"; give one")
        images = record.get("images", [] if record.get("image") is None else [record["image"]])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise UserError(f"{path}:{n}: \"images\" must be a list of paths")
        paths = tuple(os.path.join(folder, p) for p in images)
        for p in paths:
            if not os.path.isfile(p):
                raise UserError(f"{path}:{n}: image {p!r} does not exist")
        out.append(Question(n, record, question, paths))
    if not out:
        raise UserError(f"--questions {path!r} has no questions")
    return out


def encode_question(model, processor, question: Question) -> dict:
    """One question's `token_loop` inputs (a batch of one row), left-padded to its own length
    rounded up to PROMPT_BUCKET."""
    from uniimage_jax.data.images import open_rgb
    from uniimage_jax.processing.prompts import left_pad
    from uniimage_jax.processing.qwen import encode_chat

    images = [open_rgb(p) for p in question.images]
    enc = encode_chat(processor, [question.question], [images] if images else None)
    length = -(-enc["input_ids"].shape[1] // PROMPT_BUCKET) * PROMPT_BUCKET
    enc.update(left_pad(enc["input_ids"], enc["attention_mask"], length,
                        processor.tokenizer.pad_token_id))
    return tg.prepare_inputs(model, enc)


def _key(x: dict) -> tuple:
    return x["input_ids"].shape, x["image_grid_thw"]


class MeshAnswerer:
    """Compiled answer calls over a replicated-weights `DeviceLayout`."""

    def __init__(self, model, params, layout: DeviceLayout, *, per_device: int,
                 max_new_tokens: int, temperature: float, top_p: float, seed: int,
                 eos_token_ids: Sequence[int], pad_token_id: int):
        self.model, self.params, self.layout = model, params, layout
        self.rows = layout.shards * per_device
        self.static = dict(model=model, max_new_tokens=int(max_new_tokens),
                           sample=temperature > 0, cache_dtype=jnp.dtype(model.dtype).name)
        self.scalars = (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                        jnp.asarray(np.asarray(eos_token_ids, np.int32)),
                        jnp.int32(pad_token_id))
        self.seed = seed
        self._loops: dict = {}

    def tokens(self, items: list[tuple[int, dict]]) -> np.ndarray:
        """Generated ids (len(items), max_new_tokens) of up to `rows` (index, inputs) pairs
        sharing one compiled shape; question `index` samples from fold_in(PRNGKey(seed), index)."""
        count = len(items)
        items = list(items) + [items[-1]] * (self.rows - count)
        per_device = self.rows // self.layout.shards
        grid = items[0][1]["image_grid_thw"]
        grid = None if grid is None else grid * per_device
        if grid not in self._loops:
            self._loops[grid] = tg.mesh_token_loop(self.layout, image_grid_thw=grid,
                                                   **self.static)

        def stacked(name, axis=0):
            return np.concatenate([x[name] for _, x in items], axis=axis)
        batch = self.layout.batch()
        args = [jax.device_put(stacked("input_ids"), batch),
                jax.device_put(stacked("attention_mask"), batch),
                jax.device_put(stacked("position_ids", 1), self.layout.batch(1)),
                jax.device_put(stacked("next_position"), batch),
                None if grid is None else jax.device_put(stacked("pixel_values"), batch),
                jax.device_put(np.stack([np.asarray(jax.random.fold_in(
                    jax.random.PRNGKey(self.seed), i)) for i, _ in items]), batch)]
        out = self._loops[grid](self.params, *args, *self.scalars)
        return np.asarray(out)[:count]


def answer_questions(questions: Sequence[Question], out_path: str, *, model, params, processor,
                     layout: DeviceLayout, per_device: int, max_new_tokens: int,
                     temperature: float, top_p: float, seed: int,
                     progress: Callable[[int, int], object] | None = None) -> dict:
    """Answer every question not yet answered (module docstring); returns a summary."""
    folder, _, name = out_path.rstrip("/").rpartition("/")  # a local path or a gs:// URL
    out = Output(folder)
    parts_dir = f"{name}.parts"
    answered = _answered(out, parts_dir)
    done = distributed.any_process_mask([q.line in answered for q in questions])
    mine = share([i for i in range(len(questions)) if not done[i]])
    run, pid, count = new_run_id(), jax.process_index(), jax.process_count()
    eos = tg.default_eos_token_ids(processor.tokenizer)
    pad = processor.tokenizer.pad_token_id
    answerer = MeshAnswerer(model, params, layout, per_device=per_device,
                            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, eos_token_ids=eos, pad_token_id=eos[0] if pad is None
                            else pad)
    encoded = {i: encode_question(model, processor, questions[i]) for i in mine}
    order = sorted(mine, key=lambda i: (repr(_key(encoded[i])), i))
    calls, current = [], []
    for i in order:  # calls of one compiled shape each
        if current and (len(current) == answerer.rows
                        or _key(encoded[current[0]]) != _key(encoded[i])):
            calls.append(current)
            current = []
        current.append(i)
    if current:
        calls.append(current)
    records = []
    part = f"{parts_dir}/{run}-process-{pid:05d}-of-{count:05d}.jsonl"
    for call in calls:
        ids = answerer.tokens([(questions[i].line, encoded[i]) for i in call])
        for i, text in zip(call, tg.decode_answers(processor.tokenizer, ids, eos)):
            records.append(json.dumps({"line": questions[i].line, "answer": text}))
        out.write(part, "".join(r + "\n" for r in records))
        if progress is not None:
            progress(len(records), len(mine))
    distributed.sync("uniimage_understand_done")
    summary = {"run": run, "questions": len(questions), "answered_before": int(done.sum()),
               "answered_now": len(records), "complete": None}
    if pid == 0:
        answered = _answered(out, parts_dir)
        summary["complete"] = all(q.line in answered for q in questions)
        if summary["complete"]:
            out.write(name, "".join(json.dumps({**q.record, "answer": answered[q.line]}) + "\n"
                                    for q in questions))
    return summary


def _answered(out: Output, parts_dir: str) -> dict[int, str]:
    """{input line: answer} from every part of every run (a later run's answer wins)."""
    answers = {}
    for name in out.list(parts_dir):
        for line in (out.read_text(f"{parts_dir}/{name}") or "").splitlines():
            record = json.loads(line)
            answers[record["line"]] = record["answer"]
    return answers
