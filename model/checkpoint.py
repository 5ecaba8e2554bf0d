"""Find a checkpoint (local folder or hub id), detect its layout and load it.

Two layouts load: transformers' ``LlavaOnevisionForConditionalGeneration`` (HF layout)
and the LLaVE authors' ``LlavaQwenForCausalLM`` (converted in memory, see
``model/convert.py``). Only the base model is kept: an embedder never needs the LM head.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .logs import quiet_transformers

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedCheckpoint:
    model: Any  # LlavaOnevisionModel
    tokenizer: Any
    image_processor: Any
    path: Path
    layout: str  # "hf" | "llava"
    max_length: int


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CheckpointError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


def resolve_path(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; a hub id through the HF cache (downloads where allowed).

    Fails fast with a clear message when the id is not cached and the hub is offline or
    unreachable, instead of hanging on the network.
    """
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        return local
    text = str(path_or_id)
    if local.exists():
        raise CheckpointError(f"{text}: not a checkpoint folder")
    if not HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such checkpoint folder (and not a hub id like org/name)")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not cached: fall through to the network, unless offline
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise CheckpointError(f"{text}: not in the local HF cache and HF_HUB_OFFLINE is set")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    try:
        return Path(snapshot_download(text, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:
        raise CheckpointError(
            f"{text}: cannot download from the hub ({type(exc).__name__}); "
            "check the id and the network, or pass a local folder"
        ) from exc


def read_config(path: Path) -> dict[str, Any]:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}/config.json: invalid JSON ({exc})") from exc


def detect_layout(config: dict[str, Any], path: Path) -> str:
    from .convert import is_llava_layout

    archs = config.get("architectures") or []
    if config.get("model_type") == "llava_onevision" or "LlavaOnevisionForConditionalGeneration" in archs:
        return "hf"
    if is_llava_layout(config):
        return "llava"
    raise CheckpointError(
        f"{path}: unknown architecture {archs or config.get('model_type')!r}; expected "
        "LlavaOnevisionForConditionalGeneration (HF layout) or LlavaQwenForCausalLM (LLaVE authors' layout)"
    )


def _max_length(tokenizer, default: int = 4096) -> int:
    value = getattr(tokenizer, "model_max_length", None)
    return int(value) if isinstance(value, int) and 0 < value < 1_000_000 else default


def _load_hf(path: Path, dtype: torch.dtype, attn: str) -> LoadedCheckpoint:
    from transformers import AutoTokenizer, LlavaOnevisionModel

    from .onevision import ImageProcessor

    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise CheckpointError(f"{path}: no weight files (*.safetensors)")
    try:
        with quiet_transformers():
            model, info = LlavaOnevisionModel.from_pretrained(
                str(path), dtype=dtype, attn_implementation=attn, output_loading_info=True
            )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load the model weights: {exc}") from exc
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.endswith(("inv_freq", "position_ids")))
    if missing:
        raise CheckpointError(f"{path}: missing keys in the checkpoint: {missing[:5]}")
    if info.get("mismatched_keys"):
        raise CheckpointError(
            f"{path}: weights with mismatched shapes: {sorted(info['mismatched_keys'])[:5]}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        image_processor = ImageProcessor.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer or image processor: {exc}") from exc
    return LoadedCheckpoint(model, tokenizer, image_processor, path, "hf", _max_length(tokenizer))


def _load_llava(path: Path, config: dict[str, Any], dtype: torch.dtype, attn: str) -> LoadedCheckpoint:
    from transformers import LlavaOnevisionModel

    from .authors_config import read_authors_config
    from .convert import (
        build_image_processor,
        build_tokenizer,
        llava_to_hf_config,
        load_weights_into,
        read_llava_weights,
        token_ids,
    )

    # Check the config before reading gigabytes of weights.
    settings = read_authors_config(config, where=str(path / "config.json"))
    tokenizer = build_tokenizer(path, settings.max_length, fallback=settings.text["max_position_embeddings"])
    weights = read_llava_weights(path)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    hf_config, _ = llava_to_hf_config(config, path, shapes, settings=settings, **token_ids(tokenizer))
    hf_config._attn_implementation = attn
    model = LlavaOnevisionModel(hf_config)
    load_weights_into(model, weights, path)
    model = model.to(dtype)
    return LoadedCheckpoint(
        model, tokenizer, build_image_processor(hf_config), path, "llava", _max_length(tokenizer)
    )


def load_checkpoint(
    path_or_id, *, device: str = "auto", dtype: str | torch.dtype = "auto", attn_implementation: str = "sdpa"
) -> LoadedCheckpoint:
    """Load either layout onto ``device`` in ``dtype``, in eval mode, with the authors'
    feature packing installed."""
    from .onevision import install_authors_packing

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    path = resolve_path(path_or_id)
    config = read_config(path)
    layout = detect_layout(config, path)
    if layout == "hf":
        loaded = _load_hf(path, torch_dtype, attn_implementation)
    else:
        loaded = _load_llava(path, config, torch_dtype, attn_implementation)
    loaded.model.to(dev).eval()
    install_authors_packing(loaded.model)
    # Pin the PIL backend and right padding regardless of what the files say.
    loaded.tokenizer.padding_side = "right"
    return loaded


@dataclass
class PreprocessingFiles:
    """What preprocessing needs from a checkpoint, read without its weights."""

    tokenizer: Any
    image_processor: Any
    config: Any  # the HF LlavaOnevisionConfig
    max_length: int


def load_preprocessing(path_or_id) -> PreprocessingFiles:
    """Tokenizer, image processor and model config of either layout, weights never read
    (the authors' layout takes tensor shapes from the safetensors headers), so a process that
    only preprocesses (a batch job's CPU stage) does not load the model."""
    path = resolve_path(path_or_id)
    config = read_config(path)
    if detect_layout(config, path) == "hf":
        from transformers import AutoConfig, AutoTokenizer

        from .onevision import ImageProcessor

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            image_processor = ImageProcessor.from_pretrained(str(path))
            with quiet_transformers():
                hf_config = AutoConfig.from_pretrained(str(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load the tokenizer or image processor: {exc}") from exc
    else:
        from .authors_config import read_authors_config
        from .convert import build_image_processor, build_tokenizer, llava_to_hf_config, read_weight_shapes
        from .convert import token_ids as _token_ids

        settings = read_authors_config(config, where=str(path / "config.json"))
        tokenizer = build_tokenizer(
            path, settings.max_length, fallback=settings.text["max_position_embeddings"]
        )
        hf_config, _ = llava_to_hf_config(
            config, path, read_weight_shapes(path), settings=settings, **_token_ids(tokenizer)
        )
        image_processor = build_image_processor(hf_config)
    tokenizer.padding_side = "right"
    return PreprocessingFiles(tokenizer, image_processor, hf_config, _max_length(tokenizer))
