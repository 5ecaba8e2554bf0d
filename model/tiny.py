"""Build small random LLaVE checkpoints offline, in either layout.

``python -m model.tiny OUT [--format hf|llava] [--seed N] [--preset tiny|llave-0.5b]``

* ``tiny``: 64px images, patch 16, SigLIP and Qwen2 of hidden 64 x 2 layers; loads in
  well under a second. For tests and demos.
* ``demo``: the offline demo model that ``make serve`` trains (Qwen2 hidden 128, one
  64px crop per image).
* ``llave-0.5b``: LLaVE-0.5B's real shapes (SigLIP-so400m with 26 layers, Qwen2-0.5B,
  384px crops, 2x2 grid) with random weights. For speed and memory benchmarks.

The tokenizer is a small byte-level BPE trained on a fixed corpus (no download), with
Qwen's ChatML specials and ``<image>``. The same seed and preset give the same weights,
tokenizer and image geometry in both layouts: the weights are generated once as an HF
model, and the authors' layout is written from that same state.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .convert import CHATML_TEMPLATE, DEFAULT_MAX_LENGTH, build_image_processor

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
_WORDS = (
    "a an the of with and or in on at to for from by is are this that these those image images picture photo "
    "represent given following question answer what which where who how many find retrieve caption text "
    "document query target positive negative embedding search similar describe object scene person people "
    "red green blue yellow purple orange black white gray grey pink brown cyan "
    "circle square triangle star cross diamond hexagon ellipse rectangle shape shapes "
    "small large big tiny left right top bottom center middle corner upper lower "
    "you helpful assistant system user hello world cat dog car tree house sky sea "
    "one two three four five six seven eight nine ten zero number numbers "
)


@dataclass(frozen=True)
class Preset:
    image_size: int
    patch_size: int
    vision: dict[str, Any]
    text: dict[str, Any]
    vocab_size: int | None  # None: the tokenizer's size rounded up
    dtype: torch.dtype
    siglip_name: str | None  # authors' layout: hub name of the tower (else a local folder)
    grid: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 1), (2, 2))  # pinpoints in crops (LLaVE's)


PRESETS = {
    "tiny": Preset(
        image_size=64,
        patch_size=16,
        vision={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        text={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        vocab_size=None,
        dtype=torch.float32,
        siglip_name=None,
    ),
    "llave-0.5b": Preset(
        image_size=384,
        patch_size=14,
        vision={
            "hidden_size": 1152,
            "intermediate_size": 4304,
            "num_hidden_layers": 26,
            "num_attention_heads": 16,
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu_pytorch_tanh",
        },
        text={
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "rope_theta": 1_000_000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
        vocab_size=151936,
        dtype=torch.bfloat16,
        siglip_name="google/siglip-so400m-patch14-384",
    ),
    # The offline demo model (`make serve`): small enough to train in a few minutes on
    # two CPU cores, one 64px crop per image (16 base + 16 grid + 4 newline = 36 tokens).
    "demo": Preset(
        image_size=64,
        patch_size=16,
        vision={
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        text={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        vocab_size=None,
        dtype=torch.float32,
        siglip_name=None,
        grid=((1, 1),),
    ),
}


def build_tokenizer(vocab_size: int = 640):
    """A deterministic byte-level BPE tokenizer with Qwen's specials (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    words = _WORDS.split()
    corpus = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    corpus += [w.capitalize() for w in words] + [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    ]
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, unk_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.add_tokens(SPECIAL_TOKENS, special_tokens=True)
    tok.model_max_length = DEFAULT_MAX_LENGTH
    tok.padding_side = "right"
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_config(preset: Preset, tokenizer):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vocab = preset.vocab_size or (len(tokenizer) + 63) // 64 * 64
    vision = SiglipVisionConfig(
        image_size=preset.image_size, patch_size=preset.patch_size, vision_use_head=False, **preset.vision
    )
    text_fields = dict(preset.text)
    theta = text_fields.pop("rope_theta", 1_000_000.0)  # every published LLaVE model: 1e6
    text = Qwen2Config(
        vocab_size=vocab,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        **text_fields,
    )
    crop = preset.image_size
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[h * crop, w * crop] for h, w in preset.grid],
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=preset.text["tie_word_embeddings"],
    )
    config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    return config


def build_model(preset_name: str = "tiny", seed: int = 0):
    """Return (model, tokenizer, image_processor) with random weights from ``seed``."""
    from transformers import LlavaOnevisionForConditionalGeneration

    preset = PRESETS[preset_name]
    tokenizer = build_tokenizer()
    config = build_config(preset, tokenizer)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    # transformers' init leaves some tensors (e.g. layer norms, biases) at constants; give
    # every float tensor seeded noise so tests cannot pass by symmetry.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias") or "image_newline" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model = model.to(preset.dtype).eval()
    return model, tokenizer, build_image_processor(config)


def _authors_state(model) -> dict[str, torch.Tensor]:
    """The model's weights under the LLaVE authors' (LLaVA-NeXT) key names."""
    base = model.model
    state: dict[str, torch.Tensor] = {}
    for k, v in base.vision_tower.state_dict().items():
        k = k.removeprefix("vision_model.")
        state[f"model.vision_tower.vision_tower.vision_model.{k}"] = v
    for k, v in base.multi_modal_projector.state_dict().items():
        idx = {"linear_1": "0", "linear_2": "2"}[k.split(".")[0]]
        state[f"model.mm_projector.{idx}.{k.split('.', 1)[1]}"] = v
    for k, v in base.language_model.state_dict().items():
        state[f"model.{k}"] = v
    state["model.image_newline"] = base.image_newline.data
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.lm_head.weight.data
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def authors_config(model, tokenizer, preset: Preset, tower: str) -> dict[str, Any]:
    """``config.json`` as the authors' toolchain writes it (LLaVA-NeXT's ``LlavaQwenConfig``
    saved by transformers 4.39): Qwen2 fields under their 4.x names, the ``mm_*`` fields
    LLaVE's training sets, LLaVE's loss settings. Written field by field here, not from
    transformers 5's config classes, so the converter cannot recognise its own output."""
    cfg = model.config
    text, vision = cfg.text_config, cfg.vision_config
    theta = (getattr(text, "rope_parameters", None) or {}).get("rope_theta", 1_000_000.0)
    config = {
        "alpha": 9,
        "architectures": ["LlavaQwenForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        "hidden_act": text.hidden_act,
        "hidden_size": text.hidden_size,
        "image_aspect_ratio": "anyres_max_9",
        "image_crop_resolution": None,
        "image_grid_pinpoints": [list(p) for p in cfg.image_grid_pinpoints],
        "image_split_resolution": None,
        "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size,
        "logit_scale": 50.0,
        "max_position_embeddings": text.max_position_embeddings,
        "max_window_layers": text.num_hidden_layers,
        "mm_hidden_size": vision.hidden_size,
        "mm_newline_position": "grid",
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_spatial_pool_mode": "bilinear",
        "mm_tunable_parts": "mm_mlp_adapter,mm_language_model",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": tower,
        "mm_vision_tower_lr": None,
        "model_type": "llava_qwen",
        "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads,
        "pos_skipping_range": 4096,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": float(theta),
        "sliding_window": 32768,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "tokenizer_model_max_length": DEFAULT_MAX_LENGTH,
        "tokenizer_padding_side": "right",
        "torch_dtype": str(preset.dtype).removeprefix("torch."),
        "transformers_version": "4.39.3",
        "use_cache": True,
        "use_mm_proj": True,
        "use_pos_skipping": False,
        "use_sliding_window": False,
        "vision_tower_pretrained": None,
        "vocab_size": text.vocab_size,
    }
    return config


def _write_tower_folder(vision, folder: Path) -> None:
    """A SigLIP tower folder as the hub ships one (its config names the full tower: one
    more layer than the LLaVE weights keep)."""
    folder.mkdir(parents=True, exist_ok=True)
    tower = {
        "architectures": ["SigLipVisionModel"],
        "model_type": "siglip_vision_model",
        "attention_dropout": 0.0,
        "image_mean": [0.5, 0.5, 0.5],
        "hidden_act": vision.hidden_act,
        "hidden_size": vision.hidden_size,
        "image_size": vision.image_size,
        "intermediate_size": vision.intermediate_size,
        "layer_norm_eps": vision.layer_norm_eps,
        "num_attention_heads": vision.num_attention_heads,
        "num_channels": 3,
        "num_hidden_layers": vision.num_hidden_layers + 1,
        "patch_size": vision.patch_size,
        "torch_dtype": "float32",
        "transformers_version": "4.39.3",
    }
    (folder / "config.json").write_text(json.dumps(tower, indent=2, sort_keys=True) + "\n")


def _write_llava(model, tokenizer, out: Path, preset: Preset) -> None:
    from safetensors.torch import save_file

    if preset.siglip_name:
        tower = preset.siglip_name
    else:
        tower = "siglip-tower"  # a folder relative to the checkpoint, as the authors allow
        _write_tower_folder(model.config.vision_config, out / tower)
    config = authors_config(model, tokenizer, preset, tower)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(_authors_state(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


def build_checkpoint(out: str | Path, *, fmt: str = "hf", seed: int = 0, preset: str = "tiny") -> Path:
    """Write a random checkpoint to ``out`` (created if needed) and return its path."""
    if fmt not in ("hf", "llava"):
        raise ValueError(f"format must be 'hf' or 'llava', got {fmt!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, image_processor = build_model(preset, seed)
    if fmt == "hf":
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        image_processor.save_pretrained(str(out))
    else:
        _write_llava(model, tokenizer, out, PRESETS[preset])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a random LLaVE checkpoint offline.")
    parser.add_argument("out", help="output folder (created if needed)")
    parser.add_argument(
        "--format",
        choices=["hf", "llava"],
        default="hf",
        help="hf: transformers LlavaOnevision layout; llava: the LLaVE authors' layout",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="weight seed (same seed, same weights in both layouts)"
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shapes")
    args = parser.parse_args(argv)
    path = build_checkpoint(args.out, fmt=args.format, seed=args.seed, preset=args.preset)
    print(f"wrote {args.preset} checkpoint ({args.format} layout, seed {args.seed}) to {path}")


if __name__ == "__main__":
    main()
