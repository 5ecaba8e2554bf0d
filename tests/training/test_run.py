"""training/run.py end to end on a tiny checkpoint: outputs, resume, equivalences, torchrun."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.tolerance import assert_close_scaled
from training import synthetic
from training.run import main
from training.step import lr_multiplier, make_encode

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    synthetic.generate(out, n=96, seed=0, eval_n=8, image_size=32, tasks=["t2i", "i2t"], num_candidates=3)
    return out


def _args(model, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model), "--train-data", str(data / "train.jsonl"), "--image-root", str(data),
        "--output-dir", str(out), "--per-device-batch-size", "8", "--learning-rate", "1e-3",
        "--warmup-steps", "1", "--no-gradient-checkpointing", "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_run_writes_metrics_plot_card_and_a_servable_checkpoint(tiny_checkpoint, shapes, tmp_path):
    out = tmp_path / "run"
    main(_args(tiny_checkpoint, shapes, out, "--max-steps", "3", "--eval-data", str(shapes / "eval.jsonl")))
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(isinstance(m["loss"], float) and m["lr"] > 0 and m["pairs_per_s"] > 0 for m in metrics)
    assert (out / "loss.png").stat().st_size > 0
    card = (out / "README.md").read_text()
    assert str(tiny_checkpoint) in card and "alpha 9.0" in card and "Precision@1" in card
    assert json.loads((out / "eval.jsonl").read_text().splitlines()[-1])["step"] == 3

    from transformers import LlavaOnevisionForConditionalGeneration

    from model import load_embedder

    before = load_embedder(tiny_checkpoint, device="cpu", dtype="float32").embed(["a red circle"])
    after = load_embedder(out, device="cpu", dtype="float32").embed(["a red circle"])
    assert not torch.allclose(torch.from_numpy(before), torch.from_numpy(after))
    # Stock transformers loads it with nothing missing, and the LM head is the original.
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    original, trained = _weights(tiny_checkpoint), _weights(out)
    assert set(original) == set(trained)
    head = next(k for k in original if k.endswith("lm_head.weight"))
    assert torch.equal(original[head], trained[head])
    frozen = next(k for k in original if "vision_tower" in k)
    assert torch.equal(original[frozen], trained[frozen])  # vision tower frozen by default


def test_resume_continues_exactly_where_it_stopped(tiny_checkpoint, shapes, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(_args(tiny_checkpoint, shapes, straight, "--max-steps", "4", "--save-steps", "2"))
    assert (straight / "checkpoint-2" / "optimizer.pt").is_file()
    main(
        _args(
            tiny_checkpoint, shapes, resumed, "--max-steps", "4", "--resume", str(straight / "checkpoint-2")
        )
    )
    assert [m["step"] for m in _metrics(resumed)] == [3, 4]
    for a, b in zip(_metrics(straight)[2:], _metrics(resumed), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["lr"] == pytest.approx(b["lr"])
    for key, value in _weights(straight).items():
        assert_close_scaled(_weights(resumed)[key], value, rtol=1e-5, what=key)
    # 'latest' in the same folder (as after a crash): the lines past step 2 are replaced.
    first = _metrics(straight)
    main(_args(tiny_checkpoint, shapes, straight, "--max-steps", "4", "--resume", "latest"))
    again = _metrics(straight)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    assert again[3]["loss"] == pytest.approx(first[3]["loss"], rel=1e-6)


def test_grad_cache_and_checkpointing_give_the_plain_updates(tiny_checkpoint, shapes, tmp_path):
    """Step 1's loss is the same batch and weights; step 2's shows the update was too."""
    runs = {
        "plain": [],
        "grad_cache": ["--grad-cache-chunk-size", "3"],
        "checkpointing": ["--gradient-checkpointing"],
    }
    losses = {}
    for name, extra in runs.items():
        out = tmp_path / name
        main(_args(tiny_checkpoint, shapes, out, "--max-steps", "2", "--mask-duplicates", *extra))
        losses[name] = [m["loss"] for m in _metrics(out)]
    for name in ("grad_cache", "checkpointing"):
        assert losses[name] == pytest.approx(losses["plain"], rel=1e-4), name


def test_lr_schedule_warms_up_then_decays_to_zero():
    values = [lr_multiplier(s, warmup=3, total=10) for s in range(10)]
    assert values[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert values[3] == 1.0 and all(a > b for a, b in zip(values[3:], values[4:], strict=False))
    assert 0 < values[-1] < 0.05


def test_training_encode_pools_like_the_embedder(tiny_embedder):
    """The trainer's encode (training.step.make_encode) on a padded batch gives, row by
    row, the final state of each input's last token run alone, as the embedder does."""
    prepared = [tiny_embedder.preprocess({"text": t}) for t in ("a red circle", "a much longer text " * 3)]
    tensors = tiny_embedder.collate(prepared, "cpu")
    encode = make_encode(tiny_embedder.model, torch.float32, contextlib.nullcontext)
    with torch.no_grad():
        got = encode(tensors)
        served = tiny_embedder.encode(tensors)
        alone = [
            tiny_embedder.model(**tiny_embedder.collate([p], "cpu"), use_cache=False).last_hidden_state[0, -1]
            for p in prepared
        ]
    assert tensors["attention_mask"][0].sum() < tensors["attention_mask"].shape[1]  # row 0 is padded
    assert_close_scaled(got, torch.stack(alone), rtol=1e-5, what="training pooled state")
    assert torch.equal(got, served)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one(tiny_checkpoint, shapes, tmp_path):
    """Two gloo ranks with batch 4 each see the same global batches as one process with
    batch 8, gather each other's negatives, and so log the same losses."""
    single, double = tmp_path / "single", tmp_path / "double"
    main(_args(tiny_checkpoint, shapes, single, "--max-steps", "2", "--grad-cache-chunk-size", "3"))
    args = _args(tiny_checkpoint, shapes, double, "--max-steps", "2", "--grad-cache-chunk-size", "3")
    args[args.index("--per-device-batch-size") + 1] = "4"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(
        OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GLOO_SOCKET_IFNAME=env.get("GLOO_SOCKET_IFNAME", "lo")
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "training/run.py", *args]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _metrics(single), _metrics(double)
    assert [m["step"] for m in two] == [1, 2]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-3)
    assert (double / "model.safetensors").is_file() and not list(double.glob("rng_state_*"))
    # DDP: every rank holds the whole training state (compare test_fsdp's halves).
    memory = json.loads((double / "memory.json").read_text())
    assert not memory["fsdp"] and len(memory["per_rank"]) == 2
    for rank in memory["per_rank"]:
        assert rank["params"] == 4 * rank["n_params"] and rank["optimizer"] == 8 * rank["n_trainable"]


def test_lora_adapters_merge_into_a_plain_checkpoint(tiny_checkpoint, tmp_path):
    """Adapters train, save merged under the plain key names (the checkpoint serves
    without peft) and are restored exactly after saving. peft comes with the dev extra
    (``lora``), so its absence fails here rather than skipping."""
    from model import load_embedder
    from training.checkpoint import save_hf_checkpoint
    from training.step import configure_trainable, lora_merged

    embedder = load_embedder(tiny_checkpoint, device="cpu", dtype="float32")
    model = embedder.model
    configure_trainable(model, lora_rank=4, lora_alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("multi_modal_projector" in n for n in trainable)
    assert not any("language_model" in n and "lora_" not in n for n in trainable)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # as if trained: B starts at zero
    texts = ["a red circle", "a blue star"]
    with_adapters = embedder.embed(texts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / "merged"
    with lora_merged(model):
        merged = embedder.embed(texts)
        save_hf_checkpoint(
            model, embedder.tokenizer, embedder.image_processor, out, source=Path(tiny_checkpoint)
        )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    torch.testing.assert_close(
        torch.from_numpy(merged), torch.from_numpy(with_adapters), rtol=1e-4, atol=1e-5
    )
    assert set(_weights(out)) == set(_weights(tiny_checkpoint))  # no lora_* keys
    reloaded = load_embedder(out, device="cpu", dtype="float32").embed(texts)
    torch.testing.assert_close(
        torch.from_numpy(reloaded), torch.from_numpy(with_adapters), rtol=1e-4, atol=1e-5
    )


def test_lora_run(tiny_checkpoint, shapes, tmp_path):
    out = tmp_path / "lora"
    main(
        _args(
            tiny_checkpoint,
            shapes,
            out,
            "--max-steps",
            "3",
            "--save-steps",
            "2",
            "--lora",
            "--lora-rank",
            "4",
        )
    )
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3]
    original, trained = _weights(tiny_checkpoint), _weights(out)
    assert set(original) == set(trained)
    changed = [k for k in original if "q_proj.weight" in k and not torch.equal(original[k], trained[k])]
    assert changed  # the adapters' deltas were merged in


def test_hard_negatives_are_trained_on_and_cached_like_plain(tiny_checkpoint, shapes, tmp_path):
    """--hard-negatives 1 adds each row's neg_* target (the synthetic rows have one):
    the loss rises (more, and harder, candidates), and gradient caching gives the same
    losses as the plain step, so the extra targets flow through the cache too."""
    losses = {}
    for name, extra in {
        "none": [],
        "plain": ["--hard-negatives", "1"],
        "cached": ["--hard-negatives", "1", "--grad-cache-chunk-size", "3"],
    }.items():
        out = tmp_path / name
        main(_args(tiny_checkpoint, shapes, out, "--max-steps", "2", "--mask-duplicates", *extra))
        losses[name] = [m["loss"] for m in _metrics(out)]
    assert_close_scaled(losses["cached"], losses["plain"], rtol=1e-4, what="cached vs plain")
    assert losses["plain"][0] > losses["none"][0] + 0.05


def test_lora_resume_continues_with_the_same_adapters(tiny_checkpoint, shapes, tmp_path):
    """An interrupted LoRA run resumes to the uninterrupted one: the checkpoint holds the
    merged weights plus the adapters, which are loaded and un-merged, and the optimizer
    moments belong to them (fresh adapters with the old moments would diverge)."""
    lora = ["--lora", "--lora-rank", "4", "--max-steps", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(_args(tiny_checkpoint, shapes, straight, *lora, "--save-steps", "2"))
    assert (straight / "checkpoint-2" / "adapters.safetensors").is_file()
    main(_args(tiny_checkpoint, shapes, resumed, *lora, "--resume", str(straight / "checkpoint-2")))
    assert [m["step"] for m in _metrics(resumed)] == [3, 4]
    assert_close_scaled(
        [m["loss"] for m in _metrics(resumed)],
        [m["loss"] for m in _metrics(straight)[2:]],
        rtol=1e-5,
        what="loss",
    )
    base = _weights(tiny_checkpoint)
    for key, value in _weights(straight).items():
        got = _weights(resumed)[key]
        assert_close_scaled(got, value, rtol=1e-5, what=key)
        if "q_proj.weight" in key:  # and the change made by training is reproduced on its own scale
            assert_close_scaled(got - base[key], value - base[key], rtol=1e-3, what=f"update of {key}")
