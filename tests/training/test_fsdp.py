"""--fsdp (FSDP2) under a real two-process torchrun (gloo, CPU): the same losses and updates
as one process on the whole batch (with gradient checkpointing, gradient caching,
duplicate masking and a hard negative per row, gathered across ranks), exact resume from a sharded checkpoint, one servable
HF checkpoint at the end, and each rank holding half of the training state."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.tolerance import assert_close_scaled
from training import synthetic
from training.run import main

REPO = Path(__file__).resolve().parents[2]


def _compared(key: str) -> bool:
    """The key bias's gradient is zero in exact arithmetic (a constant added to every key
    shifts a query's logits equally), so AdamW turns rounding noise into full-size steps
    there; every other parameter is compared."""
    return "k_proj.bias" not in key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model, data: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--train-data", str(data / "train.jsonl"), "--image-root", str(data),
        "--output-dir", str(out), "--per-device-batch-size", str(batch), "--learning-rate", "1e-3",
        "--warmup-steps", "1", "--no-progress", "--device", "cpu", "--max-steps", "4",
        "--mask-duplicates", "--grad-cache-chunk-size", "3", "--hard-negatives", "1", *extra,
    ]  # fmt: skip


def _torchrun(args: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo")
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "training/run.py", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "shapes"
    synthetic.generate(data, n=96, seed=0, eval_n=8, image_size=32, tasks=["t2i", "i2t"], num_candidates=3)
    paths = {name: root / name for name in ("single", "fsdp", "resumed")}
    # One process, the whole global batch of 8, no sharding.
    main(_args(tiny_checkpoint, data, paths["single"], 8, "--no-gradient-checkpointing"))
    # Two ranks of 4, sharded, with gradient checkpointing; a sharded checkpoint at step 2.
    _torchrun(_args(tiny_checkpoint, data, paths["fsdp"], 4, "--fsdp", "--save-steps", "2"))
    # Interrupted after step 2: a fresh launch resumes from the sharded checkpoint.
    resume = ["--fsdp", "--resume", str(paths["fsdp"] / "checkpoint-2")]
    _torchrun(_args(tiny_checkpoint, data, paths["resumed"], 4, *resume))
    return paths


def test_fsdp_two_ranks_match_one_process(runs):
    one, two = _metrics(runs["single"]), _metrics(runs["fsdp"])
    assert [m["step"] for m in two] == [1, 2, 3, 4]
    # The losses of steps 2-4 depend on the updates: equal losses mean equal updates.
    assert_close_scaled([m["loss"] for m in two], [m["loss"] for m in one], rtol=1e-4, what="losses")
    assert_close_scaled([m["grad_norm"] for m in two], [m["grad_norm"] for m in one], rtol=1e-4, what="norms")
    single = load_file(str(runs["single"] / "model.safetensors"))
    sharded = load_file(str(runs["fsdp"] / "model.safetensors"))
    assert set(single) == set(sharded)
    for key, value in single.items():
        if _compared(key):  # AdamW: a step is ~lr whatever the gradient's size (see below)
            assert_close_scaled(sharded[key], value, rtol=1e-3, what=key)


def test_fsdp_updates_are_the_single_process_updates(runs, tiny_checkpoint):
    """Parameter updates (trained minus initial), compared on their own scale: a sizeable
    difference in the update is not hidden by the much larger weights."""
    initial = load_file(str(Path(tiny_checkpoint) / "model.safetensors"))
    single = load_file(str(runs["single"] / "model.safetensors"))
    sharded = load_file(str(runs["fsdp"] / "model.safetensors"))
    updated = 0
    for key, start in initial.items():
        if "lm_head" in key or not _compared(key):
            continue
        delta_one, delta_two = single[key] - start, sharded[key] - start
        if delta_one.abs().max() == 0:
            assert torch.equal(delta_two, delta_one), key  # frozen (vision tower) stays frozen
            continue
        updated += 1
        # AdamW's step is about lr * g / |g| per element, so an element whose gradient is
        # at rounding level gets a step of rounding-level agreement only; 1% of the
        # largest update (about 4 x lr here) passes that, while a wrong reduction (a sum
        # instead of a mean, a missing shard) changes whole updates by tens of percent.
        assert_close_scaled(delta_two, delta_one, rtol=1e-2, what=f"update of {key}")
    assert updated > 10


def test_fsdp_resume_reproduces_the_uninterrupted_run(runs):
    straight, resumed = _metrics(runs["fsdp"]), _metrics(runs["resumed"])
    assert [m["step"] for m in resumed] == [3, 4]
    assert_close_scaled(
        [m["loss"] for m in resumed], [m["loss"] for m in straight[2:]], rtol=1e-5, what="loss"
    )
    a, b = (
        load_file(str(runs["fsdp"] / "model.safetensors")),
        load_file(str(runs["resumed"] / "model.safetensors")),
    )
    for key, value in a.items():
        if _compared(key):
            assert_close_scaled(b[key], value, rtol=1e-5, what=key)


def test_fsdp_checkpoints_sharded_then_one_servable_hf_checkpoint(runs, tiny_checkpoint):
    checkpoint = runs["fsdp"] / "checkpoint-2"
    assert (checkpoint / "sharded" / ".metadata").is_file()
    assert not (checkpoint / "model.safetensors").exists()  # no gathered copy during training
    assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == ["rng_state_0.pt", "rng_state_1.pt"]
    from model import load_embedder

    original, trained = (
        load_file(str(Path(tiny_checkpoint) / "model.safetensors")),
        load_file(str(runs["fsdp"] / "model.safetensors")),
    )
    assert set(original) == set(trained)
    head = next(k for k in original if k.endswith("lm_head.weight"))
    assert torch.equal(original[head], trained[head])
    embedder = load_embedder(runs["fsdp"], device="cpu", dtype="float32")
    assert embedder.embed(["a red circle"]).shape[0] == 1


def test_fsdp_each_rank_holds_half_of_the_training_state(runs):
    memory = json.loads((runs["fsdp"] / "memory.json").read_text())
    assert memory["fsdp"] and memory["world_size"] == 2
    ranks = memory["per_rank"]
    n_params, n_trainable = ranks[0]["n_params"], ranks[0]["n_trainable"]
    # fp32 parameters (4 bytes), fp32 gradients of the trained ones (4), AdamW's two moments (8).
    full = {"params": 4 * n_params, "grads": 4 * n_trainable, "optimizer": 8 * n_trainable}
    for kind, total in full.items():
        assert sum(r[kind] for r in ranks) == total, kind  # the shards partition the whole
        for rank in ranks:  # dim-0 shards of odd sizes differ by at most a row per tensor
            assert 0.45 * total <= rank[kind] <= 0.55 * total, (kind, rank[kind], total)


def test_fsdp_bf16_compute_keeps_fp32_master_weights(runs, tiny_checkpoint):
    """--precision bf16: units are gathered and computed in bf16 (MixedPrecisionPolicy),
    the weights stay fp32: the first loss agrees with fp32 to bf16 precision, is not
    bit-identical (bf16 was really used), and the saved checkpoint is fp32."""
    data, out = runs["single"].parent / "shapes", runs["single"].parent / "bf16"
    eval_data = ["--eval-data", str(data / "eval.jsonl")]  # evaluation runs on every rank (sharded)
    args = _args(tiny_checkpoint, data, out, 4, "--fsdp", "--precision", "bf16", *eval_data)
    args[args.index("--max-steps") + 1] = "1"
    _torchrun(args)
    got, fp32 = _metrics(out)[0]["loss"], _metrics(runs["single"])[0]["loss"]
    assert_close_scaled(got, fp32, rtol=1e-2, what="bf16 loss")
    assert got != fp32
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    evaluation = json.loads((out / "eval.jsonl").read_text().splitlines()[-1])
    assert evaluation["step"] == 1 and 0 <= evaluation["precision_at_1"] <= 1
