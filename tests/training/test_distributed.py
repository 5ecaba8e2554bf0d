"""A real two-process torchrun (gloo, CPU) run equals one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.tolerance import assert_close_scaled
from tests.training import dist_check
from training.distributed import (
    gather_with_grad,
    gathered_hardness_weighted_loss,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    is_main_process,
)

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process(variant: str) -> dict:
    model = dist_check.make_model()
    queries, targets, keys = dist_check.make_batch()
    if variant.endswith("negatives"):
        negs, valid, neg_keys = dist_check.make_negatives()
        loss = dist_check.negatives_loss(
            model, queries, targets, keys, negs, valid, neg_keys, cached=variant.startswith("cached")
        )
    elif variant.startswith("cached"):
        loss = dist_check.run_cached(model, queries, targets, branch_for_queries=variant == "cached_branch")
    else:
        pair_keys = keys if variant == "masked" else None
        loss = gathered_hardness_weighted_loss(
            model(queries), model(targets), alpha=dist_check.ALPHA, pair_keys=pair_keys
        )
        loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist") / "results.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(REPO / "tests" / "training" / "dist_check.py"),
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("variant", dist_check.VARIANTS)
def test_two_ranks_equal_one_process(torchrun_results, variant):
    assert torchrun_results["world_size"] == 2
    got = torchrun_results[variant]
    expected = _single_process(variant)
    # Tolerances relative to each tensor's largest magnitude: the two runs reduce in a different
    # order (float32 noise ~1e-6 of the scale); a missing gather, gradient sum or label offset,
    # or a DDP sync skipped, is off by more than 10% of the scale.
    # Loss: the mean over ranks of the per-rank losses is the full-batch loss.
    assert_close_scaled(got["loss"], expected["loss"], rtol=1e-5, what="loss")
    # Gradients: DDP's average over ranks equals the full-batch gradient, no rescaling.
    for name, grad in expected["grads"].items():
        if grad is None:  # the branch, in variants that never use it
            assert got["grads"][name] is None or not got["grads"][name].any(), name
            continue
        assert_close_scaled(got["grads"][name], grad, rtol=1e-5, what=name)


def test_rank_losses_differ_so_the_comparison_means_something(torchrun_results):
    """Rank 0's own loss is not the global one: the all-reduce in the check matters."""
    got = torchrun_results["plain"]
    assert not torch.allclose(got["local_loss"], got["loss"])


def test_masking_changes_the_distributed_loss(torchrun_results):
    assert not torch.allclose(torchrun_results["masked"]["loss"], torchrun_results["plain"]["loss"])


def test_hard_negatives_change_the_distributed_loss(torchrun_results):
    """The gathered negatives count: more candidates than masking alone gives."""
    assert torchrun_results["negatives"]["loss"] > torchrun_results["masked"]["loss"] + 0.01


def test_single_process_helpers_without_a_group(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
    assert not is_distributed() and get_rank() == 0 and get_world_size() == 1 and is_main_process()
    with pytest.raises(RuntimeError, match="process group"):
        gather_with_grad(torch.zeros(2, 3))


def test_negative_keys_mask_copies_of_a_rows_own_content(monkeypatch):
    """Single process: a negative whose key equals one of a row's keys is dropped for that
    row only, exactly as an explicit mask would."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    g = torch.Generator().manual_seed(0)
    q, t, negs = (
        torch.randn(3, 6, generator=g),
        torch.randn(3, 6, generator=g),
        torch.randn(4, 6, generator=g),
    )
    pair_keys = torch.tensor([[10, 20], [11, 21], [12, 22]])
    negative_keys = torch.tensor([21, 99, 10, 98])
    valid = torch.tensor([True, True, True, False])
    got = gathered_hardness_weighted_loss(
        q, t, pair_keys=pair_keys, negatives=negs, negative_valid=valid, negative_keys=negative_keys
    )
    mask = torch.tensor([[False, False, True, True], [True, False, False, True], [False, False, False, True]])
    from training.loss import duplicate_pair_mask, hardness_weighted_loss

    expected = hardness_weighted_loss(
        q, t, target_mask=duplicate_pair_mask(pair_keys, pair_keys), negatives=negs, negative_mask=mask
    )
    assert_close_scaled(got, expected, rtol=1e-6, what="loss")
    unmasked = hardness_weighted_loss(
        q, t, target_mask=duplicate_pair_mask(pair_keys, pair_keys), negatives=negs
    )
    assert not torch.allclose(got, unmasked)
