"""The hardness-weighted loss against a slow reference, plus invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.tolerance import assert_close_scaled
from training.loss import duplicate_pair_mask, hardness_weighted_ce, hardness_weighted_loss


def reference_direction(rows, cols, labels, alpha, logit_scale, exclude=None):
    """The paper's formula written out pair by pair: weights multiply exp(s / tau).

    L_i = -log( e^{s_ii/tau} / (e^{s_ii/tau} + sum_{j != i} w_ij e^{s_ij/tau}) ),
    w_ij = exp(alpha * s_ij) taken as a constant (stop-gradient via float()).
    """
    total = 0
    for i in range(rows.shape[0]):
        r = rows[i] / rows[i].norm()
        positive = labels[i]
        numerator = None
        denominator = 0
        for j in range(cols.shape[0]):
            c = cols[j] / cols[j].norm()
            s = torch.dot(r, c)
            if j == positive:
                numerator = torch.exp(s * logit_scale)
                denominator = denominator + numerator
            elif exclude is None or not exclude[i][j]:
                weight = math.exp(alpha * float(s.detach()))  # a constant: no gradient through w
                denominator = denominator + weight * torch.exp(s * logit_scale)
        total = total - torch.log(numerator / denominator)
    return total / rows.shape[0]


def reference_loss(q, t, alpha, logit_scale, labels=None, q_all=None, t_all=None, exclude=None):
    q_all = q if q_all is None else q_all
    t_all = t if t_all is None else t_all
    labels = list(range(q.shape[0])) if labels is None else [int(x) for x in labels]
    q2t = reference_direction(q, t_all, labels, alpha, logit_scale, exclude)
    t2q = reference_direction(t, q_all, labels, alpha, logit_scale, exclude)
    return (q2t + t2q) / 2


def _leaves(*shape_seeds):
    out = []
    for shape, seed in shape_seeds:
        g = torch.Generator().manual_seed(seed)
        out.append(torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_())
    return out


@pytest.mark.parametrize("alpha", [0.0, 1.0, 9.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference_values_and_gradients(alpha, seed):
    g = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(2, 9, (1,), generator=g))
    d = int(torch.randint(3, 17, (1,), generator=g))
    logit_scale = [50.0, 20.0, 5.0][seed]
    q, t = _leaves(((n, d), seed), ((n, d), seed + 50))
    q_ref, t_ref = (x.detach().clone().requires_grad_() for x in (q, t))

    loss = hardness_weighted_loss(q, t, alpha=alpha, logit_scale=logit_scale)
    expected = reference_loss(q_ref, t_ref, alpha, logit_scale)
    loss.backward()
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    assert_close_scaled(q.grad, q_ref.grad, rtol=1e-8, what="q.grad")
    assert_close_scaled(t.grad, t_ref.grad, rtol=1e-8, what="t.grad")


@pytest.mark.parametrize("alpha", [0.0, 9.0])
def test_gathered_columns_with_offset_labels_match_reference(alpha):
    """One 'rank' of three: local rows against all columns, labels offset by rank."""
    n, world, d = 3, 3, 8
    q_all, t_all = _leaves(((n * world, d), 7), ((n * world, d), 8))
    rank = 1
    rows = slice(rank * n, (rank + 1) * n)
    labels = torch.arange(n) + rank * n
    loss = hardness_weighted_loss(
        q_all[rows], t_all[rows], alpha=alpha, labels=labels, q_all=q_all, t_all=t_all
    )
    expected = reference_loss(q_all[rows], t_all[rows], alpha, 50.0, labels, q_all, t_all)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    (g,) = torch.autograd.grad(loss, q_all)
    (g_ref,) = torch.autograd.grad(expected, q_all)
    assert_close_scaled(g, g_ref, rtol=1e-8, what="grad of q_all")


def test_mean_of_rank_losses_is_full_batch_loss():
    """The distributed convention: averaging per-rank losses (and so DDP-averaged
    gradients) reproduces the full-batch loss and its gradient, with no extra scaling."""
    n, world, d = 4, 2, 6
    q, t = _leaves(((n * world, d), 3), ((n * world, d), 4))
    full = hardness_weighted_loss(q, t, alpha=9.0)
    per_rank = [
        hardness_weighted_loss(
            q[r * n : (r + 1) * n],
            t[r * n : (r + 1) * n],
            alpha=9.0,
            labels=torch.arange(n) + r * n,
            q_all=q,
            t_all=t,
        )
        for r in range(world)
    ]
    mean = sum(per_rank) / world
    torch.testing.assert_close(mean, full, rtol=1e-12, atol=1e-12)
    g_full = torch.autograd.grad(full, (q, t))
    g_mean = torch.autograd.grad(mean, (q, t))
    for a, b in zip(g_full, g_mean, strict=True):
        assert_close_scaled(a, b, rtol=1e-10, what="grad")


@pytest.mark.parametrize("seed", range(5))
def test_alpha_zero_is_exactly_infonce(seed):
    """Bit for bit: alpha = 0 adds nothing to the logits (same op order as here)."""
    g = torch.Generator().manual_seed(seed)
    q, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    qn, tn = F.normalize(q, dim=-1), F.normalize(t, dim=-1)
    labels = torch.arange(6)
    q2t = F.cross_entropy(50.0 * (qn @ tn.T), labels)
    t2q = F.cross_entropy(50.0 * (tn @ qn.T), labels)
    assert torch.equal(hardness_weighted_loss(q, t, alpha=0.0), (q2t + t2q) / 2)
    # and to rounding, the usual one-matrix form (logits.T for the other direction)
    logits = 50.0 * qn @ tn.T
    infonce = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(hardness_weighted_loss(q, t, alpha=0.0), infonce)


def test_scalar_with_gradient_and_lower_for_matched_pairs():
    torch.manual_seed(0)
    q = torch.randn(16, 32, requires_grad=True)
    t_matched = q.detach() + 0.1 * torch.randn(16, 32)
    t_shuffled = t_matched[torch.randperm(16)]
    loss = hardness_weighted_loss(q, t_matched)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert loss < hardness_weighted_loss(q.detach(), t_shuffled)


def test_weighting_raises_the_loss_and_stops_gradient():
    """With positive similarities every negative weight exp(alpha * s) exceeds 1, so
    the loss grows with alpha; yet the weights carry no gradient of their own."""
    torch.manual_seed(1)
    q, t = torch.randn(8, 16) + 2.0, torch.randn(8, 16) + 2.0  # all cosines > 0
    assert (F.normalize(q, dim=-1) @ F.normalize(t, dim=-1).T).min() > 0
    values = [float(hardness_weighted_loss(q, t, alpha=a)) for a in (0.0, 1.0, 9.0)]
    assert values[0] < values[1] < values[2]
    rows = F.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    cols = F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.arange(4)
    loss = hardness_weighted_ce(rows, cols, labels, alpha=9.0, logit_scale=50.0)
    (grad,) = torch.autograd.grad(loss, rows)
    # Same gradient as plain CE whose negatives are shifted by the constant log-weights.
    sim = rows @ cols.T
    shift = (9.0 * sim.detach()).masked_fill(torch.eye(4, dtype=torch.bool), 0.0)
    (expected,) = torch.autograd.grad(F.cross_entropy(50.0 * sim + shift, labels), rows)
    assert_close_scaled(grad, expected, rtol=1e-5, what="grad")  # fp32, magnitude ~10 (logit scale 50)


def test_low_precision_inputs_are_computed_in_fp32():
    q, t = torch.randn(5, 8), torch.randn(5, 8)
    loss = hardness_weighted_loss(q.bfloat16(), t.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, hardness_weighted_loss(q.bfloat16().float(), t.bfloat16().float()))


def test_target_mask_drops_duplicates_from_the_negatives():
    q, t = _leaves(((5, 6), 11), ((5, 6), 12))
    keys = torch.tensor([0, 1, 0, 2, 1])
    mask = duplicate_pair_mask(keys, keys)
    assert mask.tolist()[0] == [False, False, True, False, False]
    assert not mask.diagonal().any()
    loss = hardness_weighted_loss(q, t, alpha=9.0, target_mask=mask)
    expected = reference_loss(q, t, 9.0, 50.0, exclude=mask.tolist())
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    assert loss < hardness_weighted_loss(q, t, alpha=9.0)  # fewer negatives, lower loss


def test_duplicate_mask_with_several_key_columns_and_offset_labels():
    keys_all = torch.tensor([[0, 10], [1, 11], [2, 10], [1, 12]])  # (N=4, k=2)
    local = keys_all[2:]  # rank 1 of 2
    mask = duplicate_pair_mask(local, keys_all, torch.tensor([2, 3]))
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False]]


def test_mismatched_pairs_are_refused():
    with pytest.raises(ValueError, match="pair up"):
        hardness_weighted_loss(torch.randn(3, 4), torch.randn(4, 4))


# ----------------------------------------------------------------------------- hard negatives


@pytest.mark.parametrize("alpha", [0.0, 9.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_hard_negatives_match_reference(alpha, seed):
    """Extra target columns for every query (q->t only), some masked per row, against the
    pair-by-pair formula with the negatives appended to the candidates; gradients reach
    the negatives."""
    n, m, d, logit_scale = 4, 6, 7, [50.0, 10.0][seed]
    q, t, neg = _leaves(((n, d), seed), ((n, d), seed + 10), ((m, d), seed + 20))
    q_ref, t_ref, neg_ref = (x.detach().clone().requires_grad_() for x in (q, t, neg))
    g = torch.Generator().manual_seed(seed)
    negative_mask = torch.rand(n, m, generator=g) < 0.3  # (n, m)
    target_mask = torch.zeros(n, n, dtype=torch.bool)
    target_mask[0, 2] = target_mask[2, 0] = True

    loss = hardness_weighted_loss(
        q, t, alpha=alpha, logit_scale=logit_scale, target_mask=target_mask,
        negatives=neg, negative_mask=negative_mask,
    )  # fmt: skip
    labels = list(range(n))
    exclude_q2t = torch.cat([target_mask, negative_mask], dim=1)  # (n, n + m)
    q2t = reference_direction(q_ref, torch.cat([t_ref, neg_ref]), labels, alpha, logit_scale, exclude_q2t)
    t2q = reference_direction(t_ref, q_ref, labels, alpha, logit_scale, target_mask)
    expected = (q2t + t2q) / 2
    loss.backward()
    expected.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    for got, want, name in ((q, q_ref, "q"), (t, t_ref, "t"), (neg, neg_ref, "negatives")):
        assert_close_scaled(got.grad, want.grad, rtol=1e-8, what=f"{name}.grad")
    assert neg.grad.abs().sum() > 0
    # A fully masked negative gets no gradient; without negatives the loss is lower.
    fully_masked = negative_mask.all(dim=0)
    assert not neg.grad[fully_masked].any()
    plain = hardness_weighted_loss(q, t, alpha=alpha, logit_scale=logit_scale, target_mask=target_mask)
    assert plain < loss


def test_hard_negatives_that_copy_the_positive_raise_the_loss_unless_masked():
    q, t = _leaves(((3, 5), 0), ((3, 5), 1))
    copies = t.detach().clone()  # negatives identical to each row's positive
    unmasked = hardness_weighted_loss(q, t, negatives=copies)
    masked = hardness_weighted_loss(q, t, negatives=copies, negative_mask=torch.ones(3, 3, dtype=torch.bool))
    assert unmasked > masked
    torch.testing.assert_close(masked, hardness_weighted_loss(q, t), rtol=1e-12, atol=0)
