"""The magnitude-scaled comparison: passes float32 reordering noise, catches real mismatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.tolerance import assert_close_scaled


def _sums_in_two_orders() -> tuple[np.ndarray, np.ndarray]:
    """Row sums of float32 terms of magnitude ~30, added front to back and back to front
    (cumsum: sequential, so the same on every machine). The first rows cancel to ~0."""
    rng = np.random.default_rng(0)
    terms = (rng.standard_normal((16, 256)) * 30).astype(np.float32)
    terms[:4, 128:] = -terms[:4, rng.permutation(128)]
    forward = np.cumsum(terms, axis=1, dtype=np.float32)[:, -1]
    backward = np.cumsum(terms[:, ::-1], axis=1, dtype=np.float32)[:, -1]
    return forward, backward


def test_reordered_float32_sums_pass_where_a_fixed_atol_fails():
    forward, backward = _sums_in_two_orders()
    # The near-zero sums differ by ~1e-5..1e-4: far over atol=1e-6, far under the scale (~900).
    assert not np.allclose(backward, forward, rtol=1e-4, atol=1e-6)
    assert_close_scaled(backward, forward, rtol=1e-5)
    assert_close_scaled(torch.from_numpy(backward), torch.from_numpy(forward), rtol=1e-5)


def _one_element_off(g: torch.Tensor) -> torch.Tensor:
    g[2, 3] += 1e-3 * g.abs().max()  # 100 times the tolerance, on one element
    return g


@pytest.mark.parametrize(
    "change",
    [
        _one_element_off,
        lambda g: g / 2,  # a missing or extra factor (e.g. averaging where a sum was due)
        lambda g: g.flip(0),  # rows from the wrong rank
    ],
)
def test_real_mismatches_fail_with_where_and_how_much(change):
    expected = torch.randn(8, 5, generator=torch.Generator().manual_seed(0)) * 30
    actual = change(expected.clone())
    with pytest.raises(AssertionError, match=r"grad: .*largest difference .* at \(\d+, \d+\)"):
        assert_close_scaled(actual, expected, rtol=1e-5, what="grad")


def test_shapes_zeros_non_finite_and_dtypes():
    with pytest.raises(AssertionError, match="shape"):
        assert_close_scaled(np.zeros(3), np.zeros((3, 1)), rtol=1e-5)
    with pytest.raises(AssertionError):  # all-zero expected: no scale, so exact zeros only
        assert_close_scaled([0.0, 1e-30], [0.0, 0.0], rtol=1e-5)
    with pytest.raises(AssertionError, match="finite in one"):
        assert_close_scaled([1.0, float("nan")], [1.0, 1.0], rtol=1e-5)
    assert_close_scaled([1.0, float("inf")], [1.0, float("inf")], rtol=0)
    assert_close_scaled(torch.ones(4, dtype=torch.bfloat16), np.ones(4), rtol=0)
    assert_close_scaled(torch.tensor(40.0), 40.0 * (1 + 1e-7), rtol=1e-6, what="a scalar loss")
