"""Gradient caching reproduces the plain (uncached) loss and gradients exactly."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from tests.tolerance import assert_close_scaled
from training.distributed import gathered_hardness_weighted_loss
from training.grad_cache import RandState, grad_cache_step, split_rows
from training.loss import hardness_weighted_loss


class TinyEncoder(nn.Module):
    """An MLP with dropout: the second pass only matches if RNG states are replayed."""

    def __init__(self, d_in=12, d_hidden=32, d_out=8, p=0.3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(p), nn.Linear(d_hidden, d_out), nn.Dropout(p)
        )

    def forward(self, x):
        return self.net(x)


def _setup(seed=0, n=10, d_in=12):
    torch.manual_seed(seed)
    model = TinyEncoder(d_in=d_in).double().train()
    g = torch.Generator().manual_seed(seed + 1)
    queries = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    targets = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    return model, queries, targets


def _plain(model, q_chunks, t_chunks, loss_fn):
    """Uncached reference: same chunk order (so dropout draws match), one backward."""
    q = torch.cat([model(c) for c in q_chunks])
    t = torch.cat([model(c) for c in t_chunks])
    loss = loss_fn(q, t)
    loss.backward()
    return loss.detach()


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("q_chunk", "t_chunk"), [(3, 4), (10, 10), (1, 5)])
@pytest.mark.parametrize("alpha", [0.0, 9.0])
def test_cached_equals_plain(q_chunk, t_chunk, alpha):
    model, queries, targets = _setup()
    q_chunks, t_chunks = split_rows(queries, q_chunk), split_rows(targets, t_chunk)

    def loss_fn(q, t):
        return hardness_weighted_loss(q, t, alpha=alpha)

    torch.manual_seed(123)
    plain_loss = _plain(model, q_chunks, t_chunks, loss_fn)
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(123)
    cached_loss = grad_cache_step(model, q_chunks, t_chunks, loss_fn)
    cached_grads = _grads(model)

    torch.testing.assert_close(cached_loss, plain_loss, rtol=1e-12, atol=1e-12)
    for name in plain_grads:
        assert_close_scaled(cached_grads[name], plain_grads[name], rtol=1e-9, what=name)


def test_fp32_model_and_single_process_gathered_loss():
    """fp32 as in training, with the trainer's loss (no process group: plain loss)."""
    model, queries, targets = _setup(seed=5)
    model = model.float()
    queries, targets = queries.float(), targets.float()
    q_chunks, t_chunks = split_rows(queries, 4), split_rows(targets, 4)

    def loss_fn(q, t):
        return gathered_hardness_weighted_loss(q, t, alpha=9.0)

    torch.manual_seed(7)
    plain_loss = _plain(model, q_chunks, t_chunks, loss_fn)
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    cached_loss = grad_cache_step(model, q_chunks, t_chunks, loss_fn)
    torch.testing.assert_close(cached_loss, plain_loss)
    for name, grad in _grads(model).items():  # fp32 gradients up to ~40: tolerance relative to that
        assert_close_scaled(grad, plain_grads[name], rtol=1e-5, what=name)


def test_without_rng_replay_gradients_would_differ(monkeypatch):
    """Guards the test above: with ``RandState.replay`` doing nothing, grad_cache_step's
    second pass draws other dropout masks and its gradients leave the plain ones, so the
    equality above is owed to the replay."""
    model, queries, targets = _setup()
    q_chunks, t_chunks = split_rows(queries, 3), split_rows(targets, 4)
    torch.manual_seed(123)
    _plain(model, q_chunks, t_chunks, hardness_weighted_loss)
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(RandState, "replay", lambda self: contextlib.nullcontext())
    torch.manual_seed(123)
    grad_cache_step(model, q_chunks, t_chunks, hardness_weighted_loss)
    assert any(not torch.allclose(g, plain_grads[name]) for name, g in _grads(model).items())


def test_rand_state_replays_and_restores():
    state = RandState.capture()
    first = torch.rand(4)
    after = torch.get_rng_state()
    with state.replay():
        assert torch.equal(torch.rand(4), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_no_sync_for_all_but_the_last_chunk():
    class SyncRecorder(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.synced: list[bool] = []
            self._in_no_sync = False

        @contextlib.contextmanager
        def no_sync(self):
            self._in_no_sync = True
            try:
                yield
            finally:
                self._in_no_sync = False

        def forward(self, x):
            if torch.is_grad_enabled():
                self.synced.append(not self._in_no_sync)
            return self.inner(x)

    model, queries, targets = _setup()
    recorder = SyncRecorder(model)
    grad_cache_step(
        recorder, split_rows(queries, 4), split_rows(targets, 5), hardness_weighted_loss, model=recorder
    )
    assert recorder.synced == [False, False, False, False, True]  # 3 query chunks + 2 target chunks


def test_split_rows_handles_dicts_and_lists():
    batch = {"a": torch.arange(5), "b": torch.arange(10).view(5, 2)}
    chunks = split_rows(batch, 2)
    assert [c["a"].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert chunks[2]["b"].tolist() == [[8, 9]]
    pairs = split_rows([torch.arange(3), torch.arange(3)], 2)
    assert [p[0].tolist() for p in pairs] == [[0, 1], [2]]
    with pytest.raises(ValueError):
        split_rows(torch.arange(3), 0)


def test_bf16_autocast_with_fp32_cache_and_surrogate():
    """fp32 parameters, bf16 autocast in the encoder (as in training): the loss matches
    exactly; gradients agree to bf16 precision (chunked vs whole-batch matmuls round
    differently, so compare in norm)."""
    model, queries, targets = _setup(seed=9)
    model = model.float()

    def encode(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    q_chunks, t_chunks = split_rows(queries.float(), 4), split_rows(targets.float(), 4)
    torch.manual_seed(11)
    plain_loss = _plain(encode, q_chunks, t_chunks, hardness_weighted_loss)
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    cached_loss = grad_cache_step(encode, q_chunks, t_chunks, hardness_weighted_loss)
    assert cached_loss.dtype == torch.float32
    torch.testing.assert_close(cached_loss, plain_loss)
    for name, grad in _grads(model).items():
        assert grad.dtype == torch.float32
        error = (grad - plain_grads[name]).norm() / plain_grads[name].norm()
        assert error < 1e-2, (name, float(error))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_replay_with_dropout():
    """Dropout on the GPU draws from the CUDA generator: replay must restore it too."""
    device = torch.device("cuda")
    model, queries, targets = _setup(seed=9)
    model = model.float().to(device)
    q_chunks = split_rows(queries.float().to(device), 4)
    t_chunks = split_rows(targets.float().to(device), 4)
    torch.manual_seed(11)
    plain_loss = _plain(model, q_chunks, t_chunks, hardness_weighted_loss)
    plain_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    cached_loss = grad_cache_step(model, q_chunks, t_chunks, hardness_weighted_loss)
    torch.testing.assert_close(cached_loss, plain_loss)
    for name, grad in _grads(model).items():
        assert_close_scaled(grad, plain_grads[name], rtol=1e-4, what=name)
