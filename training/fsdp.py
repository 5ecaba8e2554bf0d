"""Sharded data parallelism with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

``shard_model`` wraps every transformer block (each LLM decoder layer and each vision
encoder block) as its own FSDP unit and the whole model as the root unit (embeddings,
projector, final norm): parameters, gradients and, through the optimizer built on the
sharded parameters, AdamW's moments are split over the ranks (dim 0 of each tensor).
Master weights stay fp32; with ``compute_dtype=bfloat16`` each unit is all-gathered in
bf16 for its forward/backward and gradients are reduce-scattered in fp32
(``MixedPrecisionPolicy``).

Checkpoints: ``save_sharded``/``load_sharded`` write and read a resumable
``torch.distributed.checkpoint`` folder (every rank writes its own shards, and it loads
back at any world size); ``full_state_dict`` gathers the whole model on rank 0 (on CPU)
for the final HF-layout checkpoint, and ``plain_copy`` builds an unsharded module from it.

Gradient sync: FSDP2 reduce-scatters in every backward; gradient caching turns that off
for all but the last chunk with ``gradient_sync`` (as ``no_sync`` does for DDP).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

SHARDED_DIR = "sharded"  # the DCP folder inside a checkpoint-N folder


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one: LLM decoder layers and vision blocks."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # older transformers: match by class name
        GradientCheckpointingLayer = None  # noqa: N806
    blocks = []
    for module in model.modules():
        if GradientCheckpointingLayer is not None and isinstance(module, GradientCheckpointingLayer):
            blocks.append(module)
        elif type(module).__name__.endswith(("DecoderLayer", "EncoderLayer")):
            blocks.append(module)
    return blocks


def shard_model(model: nn.Module, device: torch.device, *, compute_dtype: torch.dtype | None) -> nn.Module:
    """Shard ``model`` in place over all ranks (needs a process group); returns it.

    ``compute_dtype`` None computes in the parameters' dtype (fp32 in the CPU tests).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside: FSDP reduce-scatters gradients only if ``enabled`` (else accumulates them
    unsharded locally, to be reduced with the next synced backward)."""
    model.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """What this rank holds of the training state: parameters, gradients (where
    present) and optimizer state, in bytes, and the number of parameters of the model."""
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    size = lambda ts: sum(_local(t).numel() * _local(t).element_size() for t in ts)  # noqa: E731
    return {
        "params": size(params),
        "grads": size(grads),
        "optimizer": size(states),
        "n_params": sum(p.numel() for p in params),
        "n_trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state on rank 0, on CPU; empty on the other ranks.
    Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def plain_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded module of ``model``'s original class holding ``state`` (no copy of
    the tensors), built on the meta device and filled in with ``assign``."""
    cls = next(c for c in type(model).__mro__ if c.__module__.startswith("transformers"))
    with torch.device("meta"):
        plain = cls(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    for name, buffer in plain.named_buffers():  # non-persistent buffers (rotary inv_freq)
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            original = model.get_buffer(name)
            plain.get_submodule(owner).register_buffer(
                leaf, original.detach().cpu().clone(), persistent=False
            )
    return plain


def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer shards of every rank into ``folder/sharded`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / SHARDED_DIR))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what ``save_sharded`` wrote into the sharded model and its optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(folder / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
