"""Closeness with a tolerance that scales with the magnitude of the compared values.

Two computations of the same float quantity that reduce in a different order (one process vs
an all-reduce across ranks, chunked vs whole-batch matmuls, a batched vs a single forward
pass) differ by rounding errors proportional to the largest terms in the reductions, not to
each output element. An element that happens to be near zero in a gradient of magnitude 30
carries errors of order 30 * eps, so a fixed ``atol=1e-6`` fails on it on some machines, while
on a large element the same ``atol`` is meaningless. So here ``atol = rtol * max|expected|``
(the tensor's own scale), plus the usual elementwise ``rtol``: a real bug (a missing gather, a
wrong scaling) moves values by a sizeable fraction of the scale and still fails.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor of any dtype (bfloat16 too) on any device
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close_scaled(actual: Any, expected: Any, *, rtol: float, what: str = "") -> None:
    """Assert ``|actual - expected| <= rtol * (max|expected| + |expected|)`` elementwise.

    Takes torch tensors, numpy arrays, lists or scalars (compared in float64), of equal shapes.
    Non-finite values must match exactly. An all-zero ``expected`` requires an all-zero
    ``actual``. On failure the message gives the largest difference, where it is, and the scale.
    """
    a, e = _as_float64(actual), _as_float64(expected)
    label = f"{what}: " if what else ""
    assert a.shape == e.shape, f"{label}shape {a.shape} != expected {e.shape}"
    finite = np.isfinite(e)
    assert np.array_equal(np.isfinite(a), finite), f"{label}finite in one, not in the other"
    assert np.array_equal(a[~finite], e[~finite], equal_nan=True), f"{label}non-finite values differ"
    a, e = a[finite], e[finite]
    if e.size == 0:
        return
    scale = float(np.abs(e).max())
    diff = np.abs(a - e)
    bad = diff > rtol * (scale + np.abs(e))
    if bad.any():
        worst = int(np.argmax(diff))
        where = tuple(int(i) for i in np.argwhere(finite)[worst])
        raise AssertionError(
            f"{label}{int(bad.sum())} of {e.size} elements not within rtol {rtol:g} * (scale + |expected|), "
            f"scale = max|expected| = {scale:.4g}; largest difference {diff[worst]:.4g} "
            f"({diff[worst] / scale if scale else np.inf:.3g} of the scale) at {where}: "
            f"actual {a[worst]:.8g}, expected {e[worst]:.8g}"
        )
