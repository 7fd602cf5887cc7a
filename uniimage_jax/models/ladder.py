"""Which MLLM hidden state feeds which SANA block (the "ladder").

Indices follow HF `output_hidden_states`: 0 = embeddings, k = output of decoder layer k-1 (k < L),
L = final-normed output of the last layer, for an MLLM of L layers. Block j of the DiT (n blocks)
cross-attends to hidden state `indices[j]`.

  official  indices L-n .. L-1, i.e. `hidden_states[-n-1:-1]` as the official code slices them
            (block j <- output of decoder layer L-n-1+j; the final-normed state is not used)
  final     L for every block (MetaQuery / BLIP3-o: the final-normed state only)
  uniform   n evenly spaced decoder-layer outputs from 1 to L-1 (rounded)
  [i, ...]  an explicit list of n indices in 0..L
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ladder_indices(selection: str | Sequence[int], num_mllm_layers: int,
                   num_dit_blocks: int) -> tuple[int, ...]:
    """Validated hidden-state index for each DiT block; raises ValueError naming the problem."""
    L, n = int(num_mllm_layers), int(num_dit_blocks)
    if isinstance(selection, str):
        if selection == "official":
            if n > L:
                raise ValueError(f"ladder 'official' needs at least as many MLLM layers as DiT "
                                 f"blocks: {L} MLLM layers < {n} DiT blocks")
            return tuple(range(L - n, L))
        if selection == "final":
            return (L,) * n
        if selection == "uniform":
            if L < 2:
                raise ValueError(f"ladder 'uniform' needs an MLLM of at least 2 layers, got {L}")
            return tuple(int(i) for i in np.round(np.linspace(1, L - 1, n)).astype(int))
        raise ValueError(f"unknown ladder selection {selection!r}: expected 'official', 'final', "
                         "'uniform' or a list of hidden-state indices")
    indices = tuple(int(i) for i in selection)
    if len(indices) != n:
        raise ValueError(f"ladder lists {len(indices)} hidden-state indices but the DiT has {n} "
                         "blocks: give exactly one index per block")
    bad = [i for i in indices if not 0 <= i <= L]
    if bad:
        raise ValueError(f"ladder indices {bad} are out of range: an MLLM of {L} layers has hidden "
                         f"states 0..{L} (0 = embeddings, {L} = final-normed)")
    return indices
