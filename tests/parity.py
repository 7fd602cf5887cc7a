"""Helpers for parity tests against the PyTorch references."""
from __future__ import annotations

import numpy as np


def to_numpy(x) -> np.ndarray:
    """torch tensor / jax array / numpy -> float64 numpy (for comparisons)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the 'relative' error the acceptance criteria use."""
    a, e = to_numpy(actual), to_numpy(expected)
    assert a.shape == e.shape, f"shape {a.shape} != reference shape {e.shape}"
    assert np.isfinite(a).all(), "non-finite values in the result"
    return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-30))


def assert_rel_close(actual, expected, rtol: float = 1e-4, name: str = "") -> float:
    err = rel_err(actual, expected)
    assert err <= rtol, f"{name or 'value'}: relative error {err:.3g} exceeds {rtol:g}"
    return err
