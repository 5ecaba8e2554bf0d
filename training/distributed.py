"""torch.distributed plumbing for training: setup, teardown, and gathers.

Everything here also works in a plain single process (no ``torchrun``, no process group):
rank 0 of a world of one. Under ``torchrun`` the process group uses NCCL when CUDA is
available and gloo otherwise (CPU).

Gradient convention (see ``training.loss``): each rank computes the loss of its local
rows against all gathered columns. ``gather_with_grad`` sums the incoming gradients of
every rank into each rank's own slice in backward, so DDP's averaging of parameter
gradients yields the gradient of the mean over ranks of the per-rank losses, which is
the full-batch loss when every rank holds the same number of pairs (checked).
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from training.loss import DEFAULT_ALPHA, DEFAULT_LOGIT_SCALE, duplicate_pair_mask, hardness_weighted_loss


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: its rank, the world size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, backend: str | None = None) -> DistributedContext:
    """Set up this process from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (or with WORLD_SIZE=1) no process group is created. ``device``
    defaults to ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``backend`` to NCCL on
    CUDA and gloo on CPU. Call ``destroy_distributed()`` at the end.
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None or device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        if torch_device.index is None:
            torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not is_distributed():
        backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
        kwargs = {"device_id": torch_device} if backend == "nccl" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def destroy_distributed() -> None:
    """Tear the process group down, if there is one, once every rank got here.

    DDP wrappers sit in reference cycles; left to the interpreter's shutdown they are
    freed after the group and gloo aborts the process ("terminate called without an
    active exception", seen in about 1 run in 10). Collect them first.
    """
    if is_distributed():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if is_distributed():
        dist.barrier()


def _require_group() -> None:
    if not is_distributed():
        raise RuntimeError(
            "no torch.distributed process group: call training.distributed.init_distributed() "
            "under torchrun first (single-process code should not gather)"
        )


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient and returns this rank's slice.

    (torch.distributed.nn.functional.all_gather does the same but is deprecated; an
    all-reduce of the (N, d) embedding gradient is cheap and works on every backend.)
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = slice(dist.get_rank() * x.shape[0], (dist.get_rank() + 1) * x.shape[0])
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` (n, ...) from every rank into (world_size * n, ...), rank order.

    Differentiable: in backward each rank receives the sum over all ranks of the
    gradients for its own slice. Every rank must pass the same shape.
    """
    _require_group()
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` (n, ...) into (world_size * n, ...) without autograd."""
    _require_group()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks (a detached copy); ``x`` itself in a single process."""
    x = x.detach().clone()
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def _check_equal_local_sizes(n_local: int, device: torch.device) -> None:
    sizes = gather_no_grad(torch.tensor([n_local], device=device))
    if not bool((sizes == n_local).all()):
        raise ValueError(
            f"every rank must hold the same number of pairs per micro-batch, got {sizes.tolist()} "
            "(drop the last incomplete batch)"
        )


def gathered_hardness_weighted_loss(
    q: Tensor,
    t: Tensor,
    *,
    alpha: float = DEFAULT_ALPHA,
    logit_scale: float = DEFAULT_LOGIT_SCALE,
    pair_keys: Tensor | None = None,
    negatives: Tensor | None = None,
    negative_valid: Tensor | None = None,
    negative_keys: Tensor | None = None,
) -> Tensor:
    """The training loss: gather pairs from all ranks, score local rows against them.

    Args:
        q: (n, d) this rank's query embeddings (with grad).
        t: (n, d) this rank's target embeddings, paired with ``q``.
        alpha, logit_scale: see ``training.loss.hardness_weighted_loss``.
        pair_keys: optional (n,) or (n, k) int64 content keys of the local pairs; pairs
            sharing a key are not used as each other's negatives (duplicate masking,
            off when None).
        negatives: optional (m, d) this rank's hard negative embeddings (with grad),
            ``m`` the same on every rank (padded: see ``negative_valid``); gathered, they
            are extra candidates for every query.
        negative_valid: (m,) bool, False for padding slots (never candidates).
        negative_keys: (m,) int64 content keys of the negatives; with ``pair_keys``, a
            negative whose key equals one of a row's keys is not a negative of that row.

    Returns:
        scalar: this rank's loss (the mean over its n rows, both directions). In a
        single process it is the plain full-batch loss.
    """
    n = q.shape[0]
    labels = torch.arange(n, device=q.device)  # (n,)
    q_all, t_all, keys_all = q, t, pair_keys
    if is_distributed() and dist.get_world_size() > 1:
        _check_equal_local_sizes(n, q.device)
        q_all = gather_with_grad(q)  # (N, d), N = world_size * n
        t_all = gather_with_grad(t)  # (N, d)
        labels = labels + dist.get_rank() * n
        if pair_keys is not None:
            keys_all = gather_no_grad(pair_keys)  # (N,) or (N, k)
    mask = None if pair_keys is None else duplicate_pair_mask(pair_keys, keys_all, labels)  # (n, N)
    negative_mask = None
    if negatives is not None:
        valid = negative_valid if negative_valid is not None else torch.ones(len(negatives), dtype=torch.bool)
        valid, neg_keys = valid.to(q.device), negative_keys
        if is_distributed() and dist.get_world_size() > 1:
            negatives = gather_with_grad(negatives)  # (M, d), M = world_size * m
            valid = gather_no_grad(valid.to(torch.uint8)).bool()  # gloo has no bool all_gather
            neg_keys = gather_no_grad(neg_keys) if neg_keys is not None else None
        negative_mask = (~valid)[None, :].expand(n, -1)  # (n, M)
        if pair_keys is not None and neg_keys is not None:
            own = pair_keys if pair_keys.dim() == 2 else pair_keys[:, None]  # (n, k)
            negative_mask = negative_mask | (own[:, :, None] == neg_keys[None, None, :]).any(dim=1)
    return hardness_weighted_loss(
        q, t, alpha=alpha, logit_scale=logit_scale, labels=labels, target_mask=mask, q_all=q_all, t_all=t_all,
        negatives=negatives, negative_mask=negative_mask,
    )  # fmt: skip
