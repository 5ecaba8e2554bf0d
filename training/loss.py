"""LLaVE's hardness-weighted contrastive loss, as pure functions of embeddings.

Notation (docs/architecture.md, "Loss"): a micro-batch holds N query/target pairs gathered
over all ranks; a rank owns n of them (its "local" rows). With cosine similarities
``s_ij = cos(q_i, t_j)`` and temperature ``tau = 1 / logit_scale`` (0.02 for the default
logit scale 50), the query->target loss of pair i is

    L_i = -log( exp(s_ii / tau) / (exp(s_ii / tau) + sum_{j != i} w_ij exp(s_ij / tau)) )
    w_ij = exp(alpha * sg(s_ij))        (sg = stop-gradient; no normalisation)

i.e. cross-entropy over ``logits_ij = s_ij / tau + alpha * sg(s_ij)`` for j != i and
``logits_ii = s_ii / tau`` (the positive keeps weight 1). The target->query direction is
the same with the roles of q and t swapped, and the loss is the mean of both directions.
``alpha = 0`` is exactly InfoNCE (``alpha = 9`` in the paper).

Hard negatives from the data (``neg_*`` targets, ``--hard-negatives``): M extra target
embeddings are appended to the candidate columns of the query->target direction, scored
with the same hardness weights (``logits = s / tau + alpha * sg(s)``); every query sees
all gathered targets plus all gathered hard negatives (its own row's among them). The
target->query direction is unchanged (hard negatives are not queries).

Distributed convention: every rank scores its n local rows against all N gathered
columns, in both directions, with labels ``offset + arange(n)`` (``offset = rank * n``
when every rank holds n pairs) and takes the mean over its local rows. The gather used
by ``training.distributed`` sums gradients across ranks in its backward pass, so with
DDP's gradient *averaging* the parameter gradient equals that of the full-batch loss
(the mean over ranks of the per-rank losses) with no extra scaling. No gathering happens
here; see ``training.distributed.gathered_hardness_weighted_loss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_ALPHA = 9.0
DEFAULT_LOGIT_SCALE = 50.0  # tau = 1 / 50 = 0.02


def hardness_weighted_ce(
    rows: Tensor,
    cols: Tensor,
    labels: Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    exclude: Tensor | None = None,
) -> Tensor:
    """One direction of the loss: mean over rows of the hardness-weighted cross-entropy.

    Args:
        rows: (n, d) L2-normalised embeddings being classified (e.g. local queries).
        cols: (N, d) L2-normalised candidates (e.g. all gathered targets).
        labels: (n,) long, index in ``cols`` of each row's positive.
        alpha: hardness weight; negatives get ``+ alpha * sg(s_ij)`` on their logit.
        logit_scale: 1 / tau.
        exclude: optional (n, N) bool, True where column j must not count as a negative
            for row i (it is dropped from the softmax). The positive is never excluded.

    Returns:
        scalar tensor (mean over the n rows).
    """
    sim = rows @ cols.T  # (n, N) cosine similarities
    logits = logit_scale * sim  # (n, N)
    n, num_cols = sim.shape
    positive = torch.zeros(n, num_cols, dtype=torch.bool, device=sim.device)  # (n, N)
    positive[torch.arange(n, device=sim.device), labels] = True
    if alpha != 0.0:
        # log w_ij = alpha * sg(s_ij) on negatives only; the positive keeps log w = 0.
        log_weight = (alpha * sim.detach()).masked_fill(positive, 0.0)  # (n, N)
        logits = logits + log_weight
    if exclude is not None:
        logits = logits.masked_fill(exclude & ~positive, float("-inf"))
    return F.cross_entropy(logits, labels)


def hardness_weighted_loss(
    q: Tensor,
    t: Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    labels: Tensor | None = None,
    target_mask: Tensor | None = None,
    q_all: Tensor | None = None,
    t_all: Tensor | None = None,
    negatives: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """Symmetric hardness-weighted contrastive loss (LLaVE), mean of q->t and t->q.

    Single process: ``hardness_weighted_loss(q, t)`` with q, t of shape (N, d), row i of
    ``q`` paired with row i of ``t``. Across ranks: pass this rank's pairs as ``q``/``t``
    (n, d), the gathered ones as ``q_all``/``t_all`` (N, d) and ``labels = offset +
    arange(n)`` (their positions in the gathered tensors).

    Embeddings are L2-normalised here (cosine similarity); inputs in bf16/fp16 are
    computed in fp32, fp64 stays fp64.

    Args:
        q: (n, d) local query embeddings.
        t: (n, d) local target embeddings, paired row by row with ``q``.
        alpha: hardness weight (9 in the paper; 0 gives InfoNCE exactly).
        logit_scale: 1 / tau (50, i.e. tau = 0.02).
        labels: (n,) long, the positions of the local pairs in ``q_all``/``t_all``;
            default ``arange(n)``.
        target_mask: optional (n, N) bool, True where pair j must not be a negative for
            local pair i (e.g. both pairs have the same target text); applied in both
            directions. Entries at the labels are ignored. Off (None) by default.
        q_all: (N, d) queries of all ranks; default ``q``.
        t_all: (N, d) targets of all ranks; default ``t``.
        negatives: optional (M, d) extra (hard negative) target embeddings, of all
            ranks; extra columns of the query->target direction for every local query.
        negative_mask: optional (n, M) bool, True where negative m must not count for
            local query i (padding, or a copy of that query's positive).

    Returns:
        scalar tensor.
    """
    q_all = q if q_all is None else q_all
    t_all = t if t_all is None else t_all
    if q.shape != t.shape or q_all.shape != t_all.shape:
        raise ValueError(
            f"queries and targets must pair up: q {tuple(q.shape)}, t {tuple(t.shape)}, "
            f"q_all {tuple(q_all.shape)}, t_all {tuple(t_all.shape)}"
        )
    if labels is None:
        labels = torch.arange(q.shape[0], device=q.device)  # (n,)
    q, t, q_all, t_all = (F.normalize(_at_least_fp32(x), dim=-1) for x in (q, t, q_all, t_all))
    kwargs = {"alpha": alpha, "logit_scale": logit_scale, "exclude": target_mask}
    columns, q2t_exclude = t_all, target_mask
    if negatives is not None and negatives.shape[0] > 0:
        columns = torch.cat([t_all, F.normalize(_at_least_fp32(negatives), dim=-1)])  # (N + M, d)
        n, big_n, m = q.shape[0], t_all.shape[0], negatives.shape[0]
        if target_mask is not None or negative_mask is not None:
            no = torch.zeros(n, big_n, dtype=torch.bool, device=q.device)
            q2t_exclude = torch.cat(
                [
                    no if target_mask is None else target_mask,
                    torch.zeros(n, m, dtype=torch.bool, device=q.device)
                    if negative_mask is None
                    else negative_mask,
                ],
                dim=1,
            )  # (n, N + M)
    loss_q2t = hardness_weighted_ce(
        q, columns, labels, **{**kwargs, "exclude": q2t_exclude}
    )  # vs all targets
    loss_t2q = hardness_weighted_ce(t, q_all, labels, **kwargs)  # local targets vs all queries
    return (loss_q2t + loss_t2q) / 2


def duplicate_pair_mask(keys: Tensor, keys_all: Tensor, labels: Tensor | None = None) -> Tensor:
    """Mask of pairs that share content, for ``target_mask``.

    Args:
        keys: (n,) or (n, k) integer keys of the local pairs (e.g. stable hashes of the
            query and of the target); two pairs clash when any key column is equal.
        keys_all: (N,) or (N, k) the same for all gathered pairs.
        labels: (n,) positions of the local pairs in ``keys_all``; default ``arange(n)``.

    Returns:
        (n, N) bool, True where pair j duplicates local pair i (j != labels[i]).
    """
    if keys.dim() == 1:
        keys, keys_all = keys[:, None], keys_all[:, None]  # (n, 1), (N, 1)
    clash = (keys[:, None, :] == keys_all[None, :, :]).any(dim=-1)  # (n, N)
    if labels is None:
        labels = torch.arange(keys.shape[0], device=keys.device)
    clash[torch.arange(keys.shape[0], device=keys.device), labels] = False
    return clash


def _at_least_fp32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()
