"""Caption token counts for length-grouped batches (`data.group_by_length`): the count the
training prompt's caption takes, by the tokenizer the prompts are built with (its token ids
before `max_caption_tokens` cuts them, as `prompts.build_generation_inputs` counts them).

The data layer counts every record's caption once at start-up with this and caches the counts
keyed by `key`, a digest of the tokenizer's full definition (vocabulary, merges, normaliser,
added tokens), so another tokenizer never reads stale counts.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from typing import Any, Sequence

import numpy as np


def tokenizer_key(tokenizer: Any) -> str:
    """A digest of what decides a fast tokenizer's ids (its serialised definition without the
    padding and truncation settings, which calls change on the fly and counts do not use)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        definition = f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}"
    else:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        definition = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(definition.encode()).hexdigest()[:16]


class CaptionTokenCounter:
    """`counter(captions) -> int64 array` of token counts; callable from several threads at
    once (each thread uses its own copy of the tokenizer: a fast tokenizer is one Rust object
    that concurrent calls may find "Already borrowed")."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.key = tokenizer_key(tokenizer)
        self._per_thread = threading.local()

    def _tokenizer(self):
        tok = getattr(self._per_thread, "tokenizer", None)
        if tok is None:
            tok = self._per_thread.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def __call__(self, captions: Sequence[str]) -> np.ndarray:
        if not captions:
            return np.zeros(0, np.int64)
        ids = self._tokenizer()(list(captions), padding=False)["input_ids"]
        return np.array([len(x) for x in ids], np.int64)

    def __repr__(self) -> str:
        return f"CaptionTokenCounter({type(self.tokenizer).__name__}, key={self.key})"
