"""One training step's pieces: encoding through the (possibly DDP) model, the step
itself (plain or gradient-cached), the learning-rate schedule and what is trained."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.embedder import last_token_pool
from training.data import PairBatch
from training.distributed import gathered_hardness_weighted_loss
from training.grad_cache import grad_cache_step


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    alpha: float = 9.0
    logit_scale: float = 50.0
    mask_duplicates: bool = False
    chunk_size: int = 0  # gradient-cache chunk (0 = whole micro-batch in one pass)


def lr_multiplier(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_encode(
    module: nn.Module, dtype: torch.dtype, autocast: Callable[[], Any]
) -> Callable[[dict], torch.Tensor]:
    """``encode(tensors) -> (n, d)`` pooled, unnormalised embeddings through ``module``,
    which may be the DDP wrapper (so that its gradient hooks run)."""

    def encode(tensors: dict) -> torch.Tensor:
        if "pixel_values" in tensors:
            tensors = dict(tensors, pixel_values=tensors["pixel_values"].to(dtype))
        with autocast():
            hidden = module(**tensors, use_cache=False).last_hidden_state  # (n, L, d)
        return last_token_pool(hidden, tensors["attention_mask"])

    return encode


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def encode_distinct(encode, embedder, inputs: Sequence, keys: torch.Tensor, device) -> torch.Tensor:
    """``encode(collate(inputs))`` computing each distinct input once: rows with the same
    content key (same text and image) share one forward pass and, through the indexing,
    sum their gradients, which is exactly the gradient of encoding every copy (the models
    trained here have no dropout). Synthetic captions and MMEB's class-name targets repeat
    a lot within a batch."""
    slot: dict[int, int] = {}
    index = [slot.setdefault(k, len(slot)) for k in keys.tolist()]
    if len(slot) == len(inputs):
        return encode(embedder.collate(inputs, device))
    distinct: list = [None] * len(slot)
    for item, j in zip(inputs, index, strict=True):
        if distinct[j] is None:
            distinct[j] = item
    return encode(embedder.collate(distinct, device))[torch.tensor(index, device=device)]


def train_step(
    batch: PairBatch, *, embedder, encode, ddp: nn.Module | None, device, config: StepConfig
) -> torch.Tensor:
    """Forward and backward of one micro-batch (accumulates ``.grad``); returns this
    rank's loss, detached."""
    keys = batch.keys.to(device) if config.mask_duplicates else None
    with_negatives = bool(batch.negatives)
    valid = batch.negative_valid.to(device) if with_negatives else None
    negative_keys = batch.negative_keys.to(device) if with_negatives and config.mask_duplicates else None

    def loss_fn(q: torch.Tensor, t: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        return gathered_hardness_weighted_loss(
            q, t, alpha=config.alpha, logit_scale=config.logit_scale, pair_keys=keys,
            negatives=negatives, negative_valid=valid, negative_keys=negative_keys,
        )  # fmt: skip

    size = config.chunk_size
    if 0 < size < len(batch) or (size > 0 and with_negatives):
        q_chunks = [embedder.collate(c, device) for c in _chunks(batch.queries, size)]
        t_chunks = [embedder.collate(c, device) for c in _chunks(batch.targets, size)]
        n_chunks = [embedder.collate(c, device) for c in _chunks(batch.negatives, size)]
        return grad_cache_step(encode, q_chunks, t_chunks, loss_fn, model=ddp, negative_chunks=n_chunks)
    q = encode_distinct(encode, embedder, batch.queries, batch.keys[:, 0], device)  # (n, d)
    t = encode_distinct(encode, embedder, batch.targets, batch.keys[:, 1], device)  # (n, d)
    negatives = encode(embedder.collate(batch.negatives, device)) if with_negatives else None  # (n * k, d)
    loss = loss_fn(q, t, negatives)
    loss.backward()
    return loss.detach()


# ----------------------------------------------------------------------------- what trains

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def configure_trainable(
    model: nn.Module, *, freeze_vision_tower: bool = True, lora_rank: int = 0, lora_alpha: int = 32
) -> None:
    """Freeze what the paper freezes (the vision tower); with ``lora_rank > 0`` train
    LoRA adapters (peft) on the LLM's linear layers instead of the LLM itself. The
    projector and ``image_newline`` are always trained."""
    model.requires_grad_(True)
    if freeze_vision_tower:
        model.vision_tower.requires_grad_(False)
    if lora_rank > 0:
        from peft import LoraConfig, inject_adapter_in_model

        model.language_model.requires_grad_(False)
        config = LoraConfig(
            r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)
        )
        inject_adapter_in_model(config, model.language_model)  # adapters are created trainable


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing (fine with frozen inputs and DDP)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # e.g. transformers 5.17 on the GPU hosts
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def lora_merged(model: nn.Module) -> Iterator[None]:
    """Inside: LoRA adapters (if any) are merged into plain linear layers, so the model
    saves under the plain key names and serves without peft; restored exactly after."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        yield
        return
    swapped = []
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoraLayer):
                    base = child.get_base_layer()
                    original = base.weight.detach().clone()
                    base.weight += child.get_delta_weight("default").to(base.weight.dtype)
                    setattr(parent, name, base)
                    swapped.append((parent, name, child, base, original))
    try:
        yield
    finally:
        with torch.no_grad():
            for parent, name, child, base, original in swapped:
                base.weight.copy_(original)
                setattr(parent, name, child)


ADAPTERS_FILE = "adapters.safetensors"


def save_adapters(model: nn.Module, folder) -> None:
    """The LoRA adapters' weights (``lora_*`` parameters, unmerged) into ``folder``, so a
    resumed run continues with the same adapters its optimizer moments belong to."""
    from safetensors.torch import save_file

    adapters = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "lora_" in n}
    save_file(adapters, str(folder / ADAPTERS_FILE))


def load_adapters(model: nn.Module, folder) -> None:
    """Undo a checkpoint's merge: load the saved adapters into ``model`` (which was loaded
    from that checkpoint's merged weights and given fresh adapters) and subtract their
    delta from each base weight, so base and adapters are again those of the run that
    saved it (up to fp32 rounding of the merge)."""
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    saved = load_file(str(folder / ADAPTERS_FILE))
    own = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if set(saved) != set(own):
        raise ValueError(
            f"{folder / ADAPTERS_FILE}: adapters do not match this model's "
            f"({len(saved)} saved, {len(own)} here; same --lora-rank and targets?)"
        )
    with torch.no_grad():
        for name, p in own.items():
            if saved[name].shape != p.shape:
                raise ValueError(
                    f"{name}: saved {tuple(saved[name].shape)}, here {tuple(p.shape)} (--lora-rank?)"
                )
            p.copy_(saved[name])
        for module in model.modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                base.weight -= module.get_delta_weight("default").to(base.weight.dtype)
