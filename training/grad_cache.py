"""Model-agnostic gradient caching (Gao et al., 2021; after luyug/GradCache).

A contrastive loss needs the whole (gathered) batch at once, but activations for the
whole batch do not fit in memory. Gradient caching splits the step in three passes:

1. encode every chunk without autograd, recording the RNG state before each chunk;
2. compute the loss on the detached embeddings and backpropagate only to them, which
   caches d(loss)/d(embedding) for every row;
3. encode every chunk again with autograd, replaying its recorded RNG state (so dropout
   draws the same masks), and backpropagate the surrogate ``sum(embedding * cached
   grad)`` (in fp32), whose parameter gradient is exactly that of the loss.

Peak activation memory is one chunk's. Under DDP the gradient all-reduce runs only in
the last chunk's backward (``model.no_sync()`` for the others), and under FSDP2 likewise
the reduce-scatter (``set_requires_gradient_sync(False)`` for the others): gradients
accumulate locally and are averaged once.

Hard negatives (extra targets per row) are a third group of chunks: ``loss_fn`` then
takes ``(q, t, negatives)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

EncodeFn = Callable[[Any], Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class RandState:
    """The CPU and CUDA RNG states at one point, to be replayed later."""

    cpu: Tensor
    cuda: tuple[Tensor, ...]

    @classmethod
    def capture(cls) -> RandState:
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Run the body from this RNG state; the global state is restored afterwards."""
        with torch.random.fork_rng(devices=range(len(self.cuda))):
            torch.set_rng_state(self.cpu)
            if self.cuda:
                torch.cuda.set_rng_state_all(list(self.cuda))
            yield


def grad_cache_step(
    encode: EncodeFn,
    query_chunks: Sequence[Any],
    target_chunks: Sequence[Any],
    loss_fn: LossFn,
    *,
    model: nn.Module | None = None,
    negative_chunks: Sequence[Any] = (),
) -> Tensor:
    """One cached forward/backward over a micro-batch; accumulates parameter ``.grad``.

    Args:
        encode: ``encode(chunk) -> (m, d)`` embeddings; runs the model (and any autocast).
            Called twice per chunk: once under ``no_grad``, once with grad.
        query_chunks: the micro-batch's queries, split into chunks ``encode`` accepts.
        target_chunks: its targets, chunked likewise; in total as many rows as queries.
        loss_fn: ``loss_fn(q (n, d), t (n, d)) -> scalar`` on this rank's embeddings; it
            does any cross-rank gathering (e.g.
            ``training.distributed.gathered_hardness_weighted_loss``).
        model: the module ``encode`` runs; when it has ``no_sync`` (DDP) or
            ``set_requires_gradient_sync`` (FSDP2), gradient sync is skipped for all
            chunks but the last one.
        negative_chunks: optional chunks of extra (hard negative) targets; when given,
            ``loss_fn(q, t, negatives (m, d))`` is called with their embeddings.

    Returns:
        the loss (detached scalar), as ``loss_fn`` returned it.

    Gradients equal those of ``loss_fn(cat(encode(c) for c in query_chunks),
    cat(encode(c) for c in target_chunks)).backward()`` run in that chunk order.
    """
    chunks = [*query_chunks, *target_chunks, *negative_chunks]
    states: list[RandState] = []
    reps: list[Tensor] = []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandState.capture())
            reps.append(encode(chunk))
    sizes = [r.shape[0] for r in reps]
    bounds = [0, len(query_chunks), len(query_chunks) + len(target_chunks), len(chunks)]

    # Loss on detached leaves in (at least) fp32: their .grad is the cache.
    leaves = [
        _at_least_fp32(torch.cat(reps[a:b])).requires_grad_()  # (n, d), (n, d), (m, d)
        for a, b in zip(bounds, bounds[1:], strict=False)
        if b > a
    ]
    del reps
    loss = loss_fn(*leaves)
    loss.backward()
    cached = []
    for leaf, a, b in zip(leaves, bounds, bounds[1:], strict=False):
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        cached += grad.split(sizes[a:b])

    for index, (chunk, state, grad) in enumerate(zip(chunks, states, cached, strict=True)):
        last = index == len(chunks) - 1
        with contextlib.nullcontext() if last else _no_sync(model):
            with state.replay():
                rep = encode(chunk)  # (m, d)
            if rep.shape != grad.shape:
                raise RuntimeError(
                    f"chunk {index} encoded to {tuple(rep.shape)} on replay, {tuple(grad.shape)} before"
                )
            # Surrogate whose gradient w.r.t. the parameters is d(loss)/d(params); fp32 so
            # the cached gradients are not rounded to the model's compute dtype.
            surrogate = (rep.to(grad.dtype) * grad).sum()
            surrogate.backward()
    return loss.detach()


@contextlib.contextmanager
def _no_sync(model: nn.Module | None) -> Iterator[None]:
    """No gradient communication inside (DDP ``no_sync``, FSDP2 gradient sync off)."""
    if model is not None and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif model is not None and hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def split_rows(batch: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, or a dict / list of tensors sharing dim 0, into row chunks."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size))
    if isinstance(batch, dict):
        keys = list(batch)
        parts = [batch[k].split(chunk_size) for k in keys]
        return [dict(zip(keys, values, strict=True)) for values in zip(*parts, strict=True)]
    if isinstance(batch, (list, tuple)):
        parts = [x.split(chunk_size) for x in batch]
        return [type(batch)(values) for values in zip(*parts, strict=True)]
    raise TypeError(f"cannot split a {type(batch).__name__}; pre-chunk it instead")
