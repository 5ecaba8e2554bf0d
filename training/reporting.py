"""What a run reports: metrics lines, the loss curve and the model card."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def truncate_jsonl(path: Path, *, after_step: int) -> None:
    """Keep only the lines with ``step <= after_step`` (all gone for 0)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= after_step
    ]
    path.write_text("".join(line + "\n" for line in kept))


def plot_loss(metrics_path: Path, png_path: Path) -> None:
    """Loss against step from metrics.jsonl (with a running mean once there are enough).
    Skipped, with a warning, where matplotlib is not installed (it is a train extra)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no %s", png_path.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=1, label="loss")
    if len(losses) >= 20:
        k = max(5, len(losses) // 20)
        ax.plot(steps[k - 1 :], np.convolve(losses, np.ones(k) / k, mode="valid"), lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("hardness-weighted contrastive loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def write_model_card(out: Path, info: dict[str, Any]) -> None:
    """A short README.md: what was trained from what, how, and how to serve it."""
    loss = info.get("final_loss")
    evaluation = info.get("eval")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: feature-extraction",
        "tags: [llave, llava-onevision, embeddings, multimodal]",
        "---",
        "",
        f"# {out.name}",
        "",
        f"A LLaVE multimodal embedding model fine-tuned from `{info['base_model']}` with the",
        "hardness-weighted contrastive loss (Lan et al., 2025, arXiv 2503.04812).",
        "Embeddings are the L2-normalised last hidden state of the final token of the",
        "LLaVE ChatML prompt.",
        "",
        "## Training",
        "",
        f"- data: {', '.join(f'`{d}`' for d in info['train_data'])} ({info.get('pairs', '?')} pairs)",
        f"- steps: {info['step']} of {info['total_steps']}, global batch {info['global_batch_size']}"
        f" ({info['world_size']} process(es) x {info['per_device_batch_size']})",
        f"- loss: alpha {info['alpha']}, logit scale {info['logit_scale']} (tau {1 / info['logit_scale']:g})"
        + (", duplicate pairs masked" if info.get("mask_duplicates") else ""),
        f"- optimiser: AdamW, lr {info['learning_rate']:g}, cosine schedule, warmup {info['warmup_steps']} steps,"
        f" weight decay {info['weight_decay']:g}, precision {info['precision']}",
        f"- vision tower {'frozen' if info['freeze_vision_tower'] else 'trained'}",
    ]
    if loss is not None:
        lines.append(f"- final training loss: {loss:.4f}")
    if evaluation:
        lines.append(
            f"- evaluation Precision@1: {evaluation['precision_at_1']:.4f} ({evaluation['rows']} rows)"
        )
    lines += [
        "",
        "## Use",
        "",
        "```",
        f"python -m service --model {out}",
        f"python -m training.evaluate --model {out} --data eval.jsonl --image-root DIR",
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
