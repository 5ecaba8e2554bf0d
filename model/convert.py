"""Convert the LLaVE authors' checkpoint layout (LLaVA-NeXT) to transformers' OneVision.

The published LLaVE checkpoints use ``LlavaQwenForCausalLM`` with ``mm_*`` config
fields and LLaVA-NeXT key names. This module builds the equivalent
``LlavaOnevisionConfig`` and loads each weight group into the matching submodule:

    model.vision_tower.vision_tower.vision_model.*  -> vision_tower (SigLIP, last layer already removed)
    model.mm_projector.0.* / .2.*                  -> multi_modal_projector.linear_1 / linear_2
    model.embed_tokens.*, model.layers.N.*, model.norm.*  -> language_model (Qwen2)
    model.image_newline                            -> image_newline
    lm_head.*                                      -> lm_head (cloned from the embeddings if absent)
    *.inv_freq                                     -> dropped

Loading per submodule (strictly) instead of renaming to one version's flat key names keeps
this working across transformers releases that rename the top-level prefixes.

CLI: ``python -m model.convert SRC DST`` writes a standard HF-layout checkpoint once.
"""

from __future__ import annotations

import argparse
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

from .authors_config import AuthorsConfig, read_authors_config
from .errors import CheckpointError
from .logs import quiet_transformers
from .onevision import ImageProcessor, parse_grid_pinpoints

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
DEFAULT_MAX_LENGTH = 4096
SIGLIP_MEAN = [0.5, 0.5, 0.5]
# Shape of google/siglip-so400m-patch14-384 (the tower every LLaVE model uses); the
# layer count comes from the weights, so no network call is needed.
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 384,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}
VISION_PREFIX = "model.vision_tower.vision_tower."
PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def is_llava_layout(config: dict[str, Any]) -> bool:
    archs = config.get("architectures") or []
    return "LlavaQwenForCausalLM" in archs or "mm_vision_tower" in config


def _weight_files(src: Path) -> list[Path]:
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{src}: no model.safetensors (or shards) in the LLaVE checkpoint")
    return files


def read_llava_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of an authors'-layout checkpoint (single or sharded safetensors)."""
    from safetensors.torch import load_file

    weights: dict[str, torch.Tensor] = {}
    for f in _weight_files(src):
        try:
            weights.update(load_file(str(f)))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{f}: cannot read safetensors file ({exc})") from exc
    return weights


def read_weight_shapes(src: Path) -> dict[str, tuple[int, ...] | None]:
    """Names (and shapes, where known) of the checkpoint's tensors without reading them.

    Shapes come from the safetensors headers; a sharded checkpoint whose shards are
    absent still names its tensors in ``model.safetensors.index.json`` (shape None).
    """
    index = src / "model.safetensors.index.json"
    files = sorted(src.glob("model*.safetensors"))
    if not files and index.is_file():
        try:
            names = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index ({exc})") from exc
        return {k: None for k in names}
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...] | None] = {}
    for f in _weight_files(src):
        try:
            with safe_open(str(f), framework="pt") as handle:
                for k in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[k] = tuple(handle.get_slice(k).get_shape())
        except Exception as exc:
            raise CheckpointError(f"{f}: cannot read safetensors file ({exc})") from exc
    return shapes


def _vision_config(
    settings: AuthorsConfig, src: Path, shapes: Mapping[str, tuple[int, ...] | None]
) -> SiglipVisionConfig:
    """The SigLIP tower as the authors build it: the named folder's config.json over the
    authors' defaults (so400m's shape), with the layer count that the weights hold."""
    name = settings.vision_tower
    layer_ids = {
        int(m.group(1))
        for k in shapes
        if (m := re.search(r"vision_tower\.vision_model\.encoder\.layers\.(\d+)\.", k))
    }
    if not layer_ids:
        raise CheckpointError(
            f"{src}: no vision tower weights ({VISION_PREFIX}vision_model.encoder.layers.*)"
        )
    folder = Path(name) if Path(name).is_absolute() else src / name
    fields: dict[str, Any] = dict(SIGLIP_SO400M)
    if (folder / "config.json").is_file():
        raw = json.loads((folder / "config.json").read_text())
        raw = raw.get("vision_config", raw)
        fields.update({k: raw[k] for k in (*SIGLIP_SO400M, "num_channels", "attention_dropout") if k in raw})
    elif "siglip-so400m-patch14-384" not in name:
        raise CheckpointError(
            f"{src}: unknown vision tower {name!r}: expected a local folder with config.json "
            "or google/siglip-so400m-patch14-384"
        )
    fields["num_hidden_layers"] = max(layer_ids) + 1
    vision = SiglipVisionConfig(**fields, vision_use_head=False)
    if settings.mm_hidden_size is not None and settings.mm_hidden_size != vision.hidden_size:
        raise CheckpointError(
            f"{src}: config field mm_hidden_size={settings.mm_hidden_size} differs from the vision "
            f"tower's hidden size {vision.hidden_size}"
        )
    return vision


def build_tokenizer(
    src: Path, max_length: int | None = DEFAULT_MAX_LENGTH, *, fallback: int = DEFAULT_MAX_LENGTH
):
    """The checkpoint's tokenizer with ``<image>``, right padding, the ChatML template and
    ``model_max_length`` set to the sequence cut: ``max_length``, or where that is None
    (the authors do not cut) the tokenizer's own limit, else ``fallback``."""
    try:
        # AutoTokenizer reads config.json to pick a class; its complaints about the
        # authors' model_type and 4.x field names are about that file, not the tokenizer.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as exc:
        raise CheckpointError(f"{src}: cannot load the tokenizer ({exc})") from exc
    missing = [t for t in (IMAGE_TOKEN, VIDEO_TOKEN) if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    if max_length is None:
        own = getattr(tok, "model_max_length", None)
        max_length = own if isinstance(own, int) and 0 < own < 1_000_000 else fallback
    tok.model_max_length = max_length
    tok.padding_side = "right"
    tok.chat_template = CHATML_TEMPLATE
    return tok


def llava_to_hf_config(
    config: Mapping[str, Any],
    src: Path,
    shapes: Mapping[str, tuple[int, ...] | None],
    *,
    image_token_id: int,
    video_token_id: int | None = None,
    settings: AuthorsConfig | None = None,
):
    """The ``LlavaOnevisionConfig`` equivalent to an authors'-layout config.

    ``shapes`` names the checkpoint's tensors (shapes where known, see
    :func:`read_weight_shapes`); every field of ``config`` goes through
    :func:`model.authors_config.read_authors_config` (mapped, required or ignored).
    """
    if settings is None:  # (callers that already read it pass it, so warnings come once)
        settings = read_authors_config(config, where=str(src / "config.json"))
    vision = _vision_config(settings, src, shapes)
    text_kwargs = dict(settings.text)
    if "model.embed_tokens.weight" not in shapes:
        raise CheckpointError(f"{src}: missing key model.embed_tokens.weight")
    embed = shapes["model.embed_tokens.weight"]
    if embed is not None:  # the shape is known
        if config.get("vocab_size") is not None and config["vocab_size"] != embed[0]:
            raise CheckpointError(
                f"{src}: config field vocab_size={config['vocab_size']} differs from the "
                f"{embed[0]} rows of model.embed_tokens.weight"
            )
        text_kwargs["vocab_size"] = embed[0]
    text = Qwen2Config(**text_kwargs)
    if image_token_id >= text.vocab_size:
        raise CheckpointError(
            f"{src}: <image> token id {image_token_id} is outside the embedding table ({text.vocab_size})"
        )
    if video_token_id is None or video_token_id >= text.vocab_size:
        video_token_id = image_token_id + 1 if image_token_id + 1 < text.vocab_size else image_token_id
    hf = LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image_token_id,
        video_token_index=video_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=parse_grid_pinpoints(settings.image_grid_pinpoints, vision.image_size),
        vision_aspect_ratio=settings.vision_aspect_ratio,
        tie_word_embeddings=bool(text.tie_word_embeddings),
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    hf.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return hf, settings


def token_ids(tokenizer) -> dict[str, int]:
    """``image_token_id`` and ``video_token_id`` keyword arguments from a tokenizer."""
    return {
        "image_token_id": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "video_token_id": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
    }


def build_image_processor(hf_config) -> ImageProcessor:
    """The PIL OneVision processor with the authors' preprocessing: their SigLIP processor
    is built with fixed values (mean and std 0.5, bicubic) and never reads a
    ``preprocessor_config.json``; the crop is the tower's image size (384 for so400m)."""
    crop = hf_config.vision_config.image_size
    return ImageProcessor(
        size={"height": crop, "width": crop},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_MEAN,
        image_grid_pinpoints=[list(p) for p in hf_config.image_grid_pinpoints],
        resample=3,  # bicubic, as SigLIP and the authors
        do_pad=True,
        do_convert_rgb=True,
    )


def _split_weights(weights: dict[str, torch.Tensor], src: Path) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {
        "vision": {},
        "projector": {},
        "llm": {},
        "newline": {},
        "lm_head": {},
    }
    unknown = []
    for key, value in weights.items():
        if key.endswith(".inv_freq"):
            continue
        if key.startswith(VISION_PREFIX):
            groups["vision"][key[len(VISION_PREFIX) :]] = value
        elif any(key.startswith(p) for p in PROJECTOR):
            prefix = next(p for p in PROJECTOR if key.startswith(p))
            groups["projector"][PROJECTOR[prefix] + key[len(prefix) :]] = value
        elif key.startswith(LLM_PREFIXES):
            groups["llm"][key[len("model.") :]] = value
        elif key == "model.image_newline":
            groups["newline"]["image_newline"] = value
        elif key.startswith("lm_head."):
            groups["lm_head"][key[len("lm_head.") :]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{src}: unexpected keys in the LLaVE checkpoint: {unknown[:5]}")
    if not groups["newline"]:
        raise CheckpointError(f"{src}: missing key model.image_newline")
    if not groups["projector"]:
        raise CheckpointError(f"{src}: missing keys model.mm_projector.*")
    return groups


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, src: Path) -> None:
    own = module.state_dict()
    # The tower may or may not sit under a ``vision_model.`` attribute in this version.
    if state and not any(k in own for k in state):
        stripped = {k.split(".", 1)[1]: v for k, v in state.items() if "." in k}
        if any(k in own for k in stripped):
            state = stripped
    # post_layernorm is never used (features come from hidden_states[-1]); tolerate its absence.
    for k, v in own.items():
        if k not in state and "post_layernorm" in k:
            state[k] = torch.ones_like(v) if k.endswith("weight") else torch.zeros_like(v)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: {what} weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise CheckpointError(
                f"{src}: {what} weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}"
            )
    module.load_state_dict(state, strict=True)


def load_weights_into(
    base, weights: dict[str, torch.Tensor], src: Path, lm_head: torch.nn.Module | None = None
) -> None:
    """Load authors'-layout weights into a ``LlavaOnevisionModel`` (and optional LM head)."""
    groups = _split_weights(weights, src)
    _load_strict(base.vision_tower, groups["vision"], "vision tower", src)
    _load_strict(base.multi_modal_projector, groups["projector"], "projector", src)
    _load_strict(base.language_model, groups["llm"], "language model", src)
    newline = groups["newline"]["image_newline"]
    if newline.shape != base.image_newline.shape:
        raise CheckpointError(
            f"{src}: image_newline has shape {tuple(newline.shape)}, expected {tuple(base.image_newline.shape)}"
        )
    with torch.no_grad():
        base.image_newline.copy_(newline)
        if lm_head is not None:
            head = groups["lm_head"].get("weight", groups["llm"]["embed_tokens.weight"])
            lm_head.weight.copy_(head)


def convert(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write the HF-layout equivalent of an authors'-layout checkpoint to ``dst``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    if not is_llava_layout(config):
        raise CheckpointError(f"{src}: not an authors'-layout (LlavaQwenForCausalLM) checkpoint")
    weights = read_llava_weights(src)
    settings = read_authors_config(config, where=str(src / "config.json"))
    tokenizer = build_tokenizer(src, settings.max_length, fallback=settings.text["max_position_embeddings"])
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    hf_config, _ = llava_to_hf_config(config, src, shapes, settings=settings, **token_ids(tokenizer))
    if dtype is None:
        dtype = next(iter(weights.values())).dtype
    hf_config.text_config.dtype = dtype
    model = LlavaOnevisionForConditionalGeneration(hf_config).to(dtype)
    load_weights_into(model.model, weights, src, lm_head=model.lm_head)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(dst))
    tokenizer.save_pretrained(str(dst))
    build_image_processor(hf_config).save_pretrained(str(dst))
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an authors'-layout LLaVE checkpoint to HF layout.")
    parser.add_argument("src", help="folder of the authors'-layout checkpoint (LlavaQwenForCausalLM)")
    parser.add_argument("dst", help="output folder (HF LlavaOnevisionForConditionalGeneration layout)")
    args = parser.parse_args(argv)
    out = convert(args.src, args.dst)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
