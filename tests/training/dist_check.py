"""Run under torchrun (CPU, gloo) by test_distributed.py; not collected by pytest itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/training/dist_check.py OUT.pt

Every rank takes its half of one global batch, encodes it with a DDP-wrapped tiny MLP,
computes the gathered hardness-weighted loss and backpropagates; rank 0 saves the mean
loss over ranks and the (DDP-averaged) parameter gradients for four variants: plain,
gradient-cached (DDP sync on the last chunk only), gradient-cached where a branch used
by the query chunks is unused in the last chunk, plain with duplicate masking, and
hard negatives (two slots per row, some padding, some copies of a positive masked by
key), plain and gradient-cached.
The test compares them with one process computing the loss on the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from training.distributed import (  # noqa: E402
    all_reduce_mean,
    destroy_distributed,
    gathered_hardness_weighted_loss,
    init_distributed,
    is_main_process,
)
from training.grad_cache import grad_cache_step, split_rows  # noqa: E402

N_GLOBAL, D_IN, ALPHA = 8, 12, 9.0
VARIANTS = ("plain", "cached", "cached_branch", "masked", "negatives", "cached_negatives")
K_NEG = 2  # hard negative slots per row


class Encoder(nn.Module):
    """A tiny MLP plus a branch only some inputs use (like LLaVE's projector, which
    text-only chunks never touch)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(D_IN, 32), nn.GELU(), nn.Linear(32, 8))
        self.branch = nn.Linear(D_IN, 8)

    def forward(self, x, use_branch=False):
        out = self.mlp(x)
        return out + self.branch(x) if use_branch else out


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Encoder()


def run_cached(model, queries, targets, *, branch_for_queries=False, ddp=None):
    """Gradient cache with chunks of 3; queries may use the branch, targets never do,
    so the branch is unused in the last chunk (the one where DDP syncs)."""
    return grad_cache_step(
        lambda chunk: model(*chunk),
        [(c, branch_for_queries) for c in split_rows(queries, 3)],
        [(c, False) for c in split_rows(targets, 3)],
        lambda q, t: gathered_hardness_weighted_loss(q, t, alpha=ALPHA),
        model=ddp,
    )


def make_batch():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(N_GLOBAL, D_IN, generator=g)
    targets = torch.randn(N_GLOBAL, D_IN, generator=g)
    keys = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])  # pairs 0/3 and 1/5 duplicate (across ranks)
    return queries, targets, keys


def make_negatives():
    """(N_GLOBAL * K_NEG, D_IN) inputs, validity (padding slots False) and content keys
    (slot 3 copies pair 6's content key 4, slot 12 copies pair 1's key 1)."""
    g = torch.Generator().manual_seed(2)
    negatives = torch.randn(N_GLOBAL * K_NEG, D_IN, generator=g)
    valid = torch.ones(N_GLOBAL * K_NEG, dtype=torch.bool)
    valid[[1, 6, 7, 15]] = False
    keys = torch.arange(100, 100 + N_GLOBAL * K_NEG)
    keys[3], keys[12] = 4, 1
    return negatives, valid, keys


def negatives_loss(model, queries, targets, keys, negs, valid, neg_keys, *, cached=False, ddp=None):
    def loss_fn(q, t, n):
        return gathered_hardness_weighted_loss(
            q, t, alpha=ALPHA, pair_keys=keys, negatives=n, negative_valid=valid, negative_keys=neg_keys
        )

    if cached:
        return grad_cache_step(
            lambda chunk: model(chunk), split_rows(queries, 3), split_rows(targets, 3), loss_fn,
            model=ddp, negative_chunks=split_rows(negs, 3),
        )  # fmt: skip
    loss = loss_fn(model(queries), model(targets), model(negs))
    loss.backward()
    return loss.detach()


def run_variant(ctx, variant: str) -> dict:
    # find_unused_parameters: the branch is unused in some forwards (as in run.py).
    model = DistributedDataParallel(make_model(), find_unused_parameters=True)
    queries, targets, keys = make_batch()
    n = N_GLOBAL // ctx.world_size
    rows = slice(ctx.rank * n, (ctx.rank + 1) * n)
    q_in, t_in, local_keys = queries[rows], targets[rows], keys[rows]
    if variant.endswith("negatives"):
        negs, valid, neg_keys = make_negatives()
        slots = slice(rows.start * K_NEG, rows.stop * K_NEG)
        loss = negatives_loss(
            model, q_in, t_in, local_keys, negs[slots], valid[slots], neg_keys[slots],
            cached=variant.startswith("cached"), ddp=model,
        )  # fmt: skip
    elif variant.startswith("cached"):
        loss = run_cached(model, q_in, t_in, branch_for_queries=variant == "cached_branch", ddp=model)
    else:
        pair_keys = local_keys if variant == "masked" else None
        loss = gathered_hardness_weighted_loss(model(q_in), model(t_in), alpha=ALPHA, pair_keys=pair_keys)
        loss.backward()
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.module.named_parameters()}
    return {"loss": all_reduce_mean(loss), "local_loss": loss.detach().clone(), "grads": grads}


def main() -> None:
    out = Path(sys.argv[1])
    ctx = init_distributed(device="cpu")  # gloo on CPU, even where CUDA exists
    assert ctx.world_size > 1, "run me under torchrun with at least 2 processes"
    results = {v: run_variant(ctx, v) for v in VARIANTS}
    results["world_size"] = ctx.world_size
    if is_main_process():
        torch.save(results, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
