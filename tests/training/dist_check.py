"""Run under torchrun (CPU, gloo) by test_distributed.py; not collected by pytest itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/training/dist_check.py OUT.pt

Every rank takes its half of one global batch, encodes it with a DDP-wrapped tiny MLP,
computes the gathered hardness-weighted loss and backpropagates; rank 0 saves the mean
loss over ranks and the (DDP-averaged) parameter gradients for three variants: plain,
gradient-cached (DDP sync on the last chunk only) and plain with duplicate masking.
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


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, 32), nn.GELU(), nn.Linear(32, 8))


def make_batch():
    g = torch.Generator().manual_seed(1)
    queries = torch.randn(N_GLOBAL, D_IN, generator=g)
    targets = torch.randn(N_GLOBAL, D_IN, generator=g)
    keys = torch.tensor([0, 1, 2, 0, 3, 1, 4, 5])  # pairs 0/3 and 1/5 duplicate (across ranks)
    return queries, targets, keys


def run_variant(ctx, variant: str) -> dict:
    model = DistributedDataParallel(make_model())
    queries, targets, keys = make_batch()
    n = N_GLOBAL // ctx.world_size
    rows = slice(ctx.rank * n, (ctx.rank + 1) * n)
    q_in, t_in, local_keys = queries[rows], targets[rows], keys[rows]
    if variant == "cached":
        loss = grad_cache_step(
            model,
            split_rows(q_in, 3),
            split_rows(t_in, 3),
            lambda q, t: gathered_hardness_weighted_loss(q, t, alpha=ALPHA),
            model=model,
        )
    else:
        pair_keys = local_keys if variant == "masked" else None
        loss = gathered_hardness_weighted_loss(model(q_in), model(t_in), alpha=ALPHA, pair_keys=pair_keys)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.module.named_parameters()}
    return {"loss": all_reduce_mean(loss), "local_loss": loss.detach().clone(), "grads": grads}


def main() -> None:
    out = Path(sys.argv[1])
    ctx = init_distributed(device="cpu")  # gloo on CPU, even where CUDA exists
    assert ctx.world_size > 1, "run me under torchrun with at least 2 processes"
    results = {v: run_variant(ctx, v) for v in ("plain", "cached", "masked")}
    results["world_size"] = ctx.world_size
    if is_main_process():
        torch.save(results, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
