"""Ladder layer selection: the official slicing, the baselines, and config-time validation."""
import numpy as np
import pytest

from uniimage_jax.models.ladder import ladder_indices


def test_official_equals_the_official_slice():
    for L, n in [(36, 20), (4, 3), (5, 5)]:
        hidden = list(range(L + 1))  # stand-ins for HF's L+1 hidden states
        assert ladder_indices("official", L, n) == tuple(hidden[-n - 1:-1])
    # The official ladder: for L=36, n=20 SANA block j receives decoder layer 15+j = hidden state 16+j
    assert ladder_indices("official", 36, 20) == tuple(16 + j for j in range(20))


def test_final_uniform_and_explicit():
    assert ladder_indices("final", 36, 20) == (36,) * 20
    u = ladder_indices("uniform", 36, 20)
    assert len(u) == 20 and u[0] == 1 and u[-1] == 35 and all(np.diff(u) > 0)
    assert ladder_indices([0, 3, 4], 4, 3) == (0, 3, 4)


@pytest.mark.parametrize("selection,L,n,needle", [
    ([1, 2], 4, 3, "one index per block"),
    ([1, 2, 5], 4, 3, "out of range"),
    ([-1, 2, 3], 4, 3, "out of range"),
    ("official", 2, 3, "2 MLLM layers < 3 DiT blocks"),
    ("ladder", 4, 3, "unknown ladder selection"),
])
def test_impossible_selections_fail_clearly(selection, L, n, needle):
    with pytest.raises(ValueError, match=needle):
        ladder_indices(selection, L, n)
