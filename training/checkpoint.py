"""Training checkpoints: the model in HF layout (servable as is) plus resumable state.

A checkpoint folder holds what ``model.load_embedder`` and transformers' stock
``LlavaOnevisionForConditionalGeneration`` load (config, weights, tokenizer, image
processor, chat template) and, for intermediate checkpoints, the trainer state: ``optimizer.pt``, ``scheduler.pt``,
``trainer_state.json`` and one ``rng_state_{rank}.pt`` per rank.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Files a source checkpoint may hold that the tokenizer/processor savers do not write.
_EXTRA_FILES = (
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "generation_config.json",
)


def find_lm_head(source: Path) -> torch.Tensor | None:
    """The LM head weight stored in a checkpoint folder, if any (the embedder drops it)."""
    from safetensors import safe_open

    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if key.endswith("lm_head.weight"):
                    return f.get_tensor(key)
    return None


def save_hf_checkpoint(
    base: nn.Module, tokenizer, image_processor, out: Path, *, source: Path | None
) -> None:
    """Write ``base`` (a ``LlavaOnevisionModel``) as a full
    ``LlavaOnevisionForConditionalGeneration`` checkpoint in ``out``.

    The LM head is not trained (embeddings come from the last hidden state); it is copied
    from ``source`` when that holds one, tied when the config ties it, and otherwise a
    copy of the input embeddings (as the converter does for checkpoints without one).
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    config = base.config
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    with torch.device("meta"):
        full = LlavaOnevisionForConditionalGeneration(config)
    full.model = base  # shares the trained weights; nothing is copied
    embeddings = base.get_input_embeddings().weight
    head = nn.Linear(embeddings.shape[1], embeddings.shape[0], bias=False)
    if getattr(config, "tie_word_embeddings", False) or getattr(
        config.text_config, "tie_word_embeddings", False
    ):
        head.weight = embeddings
    else:
        stored = find_lm_head(source) if source is not None and source.is_dir() else None
        weight = stored if stored is not None and stored.shape == embeddings.shape else embeddings.detach()
        head.weight = nn.Parameter(weight.to(embeddings.dtype).clone(), requires_grad=False)
    full.lm_head = head
    full.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    image_processor.save_pretrained(str(out))
    if source is not None and source.is_dir() and _is_hf_layout(source):
        for name in _EXTRA_FILES:
            if (source / name).is_file() and not (out / name).exists():
                shutil.copy2(source / name, out / name)


def _is_hf_layout(path: Path) -> bool:
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == "llava_onevision"
    except (OSError, json.JSONDecodeError):
        return False


def save_training_state(out: Path, *, optimizer, scheduler, state: dict[str, Any], rank: int) -> None:
    """Optimizer, scheduler and counters (rank 0) and this rank's RNG states (every rank).

    ``optimizer`` None: its state is saved elsewhere (sharded, ``training.fsdp``)."""
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        if optimizer is not None:
            torch.save(optimizer.state_dict(), out / "optimizer.pt")
        torch.save(scheduler.state_dict(), out / "scheduler.pt")
        (out / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    torch.save(rng, out / f"rng_state_{rank}.pt")


def load_training_state(
    folder: Path, *, optimizer, scheduler, rank: int, device: torch.device
) -> dict[str, Any]:
    """Restore what ``save_training_state`` wrote; returns the counters."""
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    rng_file = folder / f"rng_state_{rank}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=False)  # our own file: python/numpy states are tuples
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((folder / "trainer_state.json").read_text())


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The ``checkpoint-N`` folder with the highest N that has a trainer state."""
    found = []
    for path in output_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and (path / "trainer_state.json").is_file():
            found.append((int(match.group(1)), path))
    return max(found)[1] if found else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` most recent ``checkpoint-N`` folders (0 keeps all)."""
    if keep <= 0:
        return
    found = sorted(
        (int(m.group(1)), p)
        for p in output_dir.glob("checkpoint-*")
        if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))
    )
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
