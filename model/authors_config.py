"""The authors' ``config.json``, field by field: what each field becomes in transformers.

Published LLaVE checkpoints are saved by the authors' toolchain (a LLaVA-NeXT fork on
transformers 4.39): ``model_type: "llava_qwen"``, the Qwen2 fields under their 4.x names
(``rope_theta``, ``rope_scaling``, ``use_sliding_window`` ...), LLaVA-NeXT's ``mm_*``
fields, LLaVE's own loss settings and transformers' generic bookkeeping. Installed
transformers (5.x) names several of them differently (the RoPE base lives in
``rope_parameters``), so nothing here is copied by matching names: every field the
toolchain can write is listed in :data:`FIELDS` with one of three actions.

* ``map``: becomes the named setting of the converted model.
* ``require``: only the listed values are honoured; anything else refuses the checkpoint
  with a :class:`CheckpointError` naming the field (the authors' code would build a
  different model, or one this project cannot reproduce).
* ``ignore``: read by nothing that computes an embedding; the reason says why.

A field in none of these is logged as a warning, never dropped in silence.
``python -m model.authors_config`` prints the table (the README holds the same one).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import CheckpointError

log = logging.getLogger(__name__)

# transformers 4.39's Qwen2Config defaults: what the authors' code uses when a field is absent.
AUTHORS_QWEN2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: as many as the attention heads
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "max_window_layers": 28,
    "attention_dropout": 0.0,
}

# Qwen2 fields whose name and meaning are the same in the authors' transformers and ours.
_SAME_NAME = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
)


@dataclass(frozen=True)
class Rule:
    """What the converter does with one field of the authors' config."""

    action: str  # "map" | "require" | "ignore"
    target: str  # what it becomes (map), or the accepted values (require), in words
    reason: str = ""
    allowed: tuple[Any, ...] = ()  # require: the honoured values (compared with ==)


def _text(name: str, why: str = "") -> Rule:
    return Rule("map", f"text_config.{name}", why)


FIELDS: dict[str, Rule] = {
    # -- Qwen2 language model -----------------------------------------------------------
    **{k: _text(k) for k in _SAME_NAME},
    "sliding_window": _text(
        "sliding_window",
        "refused when below the sequence cut: the authors' eager attention applies the window even with "
        "use_sliding_window false, their sdpa and flash attention do not",
    ),
    "vocab_size": Rule(
        "map",
        "text_config.vocab_size",
        "must equal the rows of model.embed_tokens.weight (the authors' loader fails otherwise)",
    ),
    "rope_theta": Rule(
        "map",
        "text_config.rope_parameters.rope_theta",
        "transformers 5 keeps the RoPE base in rope_parameters (rope_type 'default')",
    ),
    "rope_scaling": Rule(
        "ignore",
        "",
        "the authors' LlavaQwenForCausalLM sets it to None when it builds the model, so no scaling ever "
        "applies (measured: linear x2 changes nothing); a non-null value is logged",
    ),
    "pruned_heads": Rule("require", "empty", "pruned attention heads are not supported", ({}, None)),
    # -- vision tower and projector -----------------------------------------------------
    "mm_vision_tower": Rule(
        "map",
        "vision_config (SigLIP shape from the folder's config.json, or so400m's known shape)",
        "the authors build a SigLIP tower only when the name contains 'siglip'",
    ),
    "vision_tower": Rule(
        "map", "vision_config", "older LLaVA name of mm_vision_tower, used when that is absent"
    ),
    "mm_hidden_size": Rule("require", "the vision tower's hidden size", "the projector's input width"),
    "mm_projector_type": Rule(
        "require", "mlp2x_gelu", "LLaVE's projector: Linear, GELU, Linear", ("mlp2x_gelu",)
    ),
    "mm_vision_select_layer": Rule(
        "ignore",
        "",
        "the authors' SigLIP tower never reads it: the saved tower lacks its last layer and the output of "
        "the last remaining one is used (measured: -3 and -1 change nothing)",
    ),
    "mm_vision_select_feature": Rule(
        "ignore",
        "",
        "the authors' SigLIP tower never reads it: SigLIP has no CLS token and every patch is used "
        "(measured: cls_patch changes nothing)",
    ),
    "mm_resampler_type": Rule("require", "null", "a resampler between tower and projector", (None, "")),
    "use_mm_proj": Rule("require", "true", "the projector is always used", (True,)),
    "s2": Rule(
        "require", "false", "multi-scale (S2) towers are CLIP-only in the authors' code", (False, None)
    ),
    "mm_use_im_start_end": Rule(
        "require", "false", "would wrap each image in extra tokens that LLaVE never uses", (False, None)
    ),
    "mm_use_im_patch_token": Rule(
        "require", "false", "would add an image patch token that LLaVE never uses", (False, None)
    ),
    # -- image tiling ---------------------------------------------------------------------
    "mm_patch_merge_type": Rule(
        "require",
        "spatial_unpad",
        "base crop, then the unpadded grid with a newline feature per row",
        ("spatial_unpad",),
    ),
    "image_aspect_ratio": Rule(
        "map",
        "vision_aspect_ratio (anyres_max_N only)",
        "other tilings (pad, square, anyres without a maximum, highres, crop_split) are refused",
    ),
    "image_grid_pinpoints": Rule("map", "image_grid_pinpoints (model and image processor)", ""),
    "tokenizer_model_max_length": Rule(
        "map",
        "the sequence cut (text plus image tokens)",
        "the authors cut the spliced sequence here; null or absent: no cut in their code, so the "
        "tokenizer's own limit (else max_position_embeddings) applies",
    ),
    # -- ignored: no effect on an embedding -----------------------------------------------
    "image_crop_resolution": Rule("ignore", "", "read only by the 'highres'/'crop_split' tilings (refused)"),
    "image_split_resolution": Rule("ignore", "", "read only by the 'highres'/'crop_split' tilings (refused)"),
    "mm_newline_position": Rule("ignore", "", "video frames only; images get a newline per grid row"),
    "mm_spatial_pool_mode": Rule("ignore", "", "video frame pooling only"),
    "mm_spatial_pool_stride": Rule("ignore", "", "video frame pooling only"),
    "mm_spatial_pool_out_channels": Rule("ignore", "", "video frame pooling only"),
    "add_faster_video": Rule("ignore", "", "video only"),
    "faster_token_stride": Rule("ignore", "", "video only"),
    "force_sample": Rule("ignore", "", "video frame sampling only"),
    "add_time_instruction": Rule("ignore", "", "video prompts only"),
    "tokenizer_padding_side": Rule(
        "ignore",
        "",
        "the pooled position comes from the attention mask, so either side gives the same vector",
    ),
    "image_token_index": Rule("ignore", "", "the tokenizer's `<image>` id is used"),
    "alpha": Rule("ignore", "", "LLaVE's loss weighting (training only)"),
    "logit_scale": Rule("ignore", "", "LLaVE's loss temperature (training only)"),
    "mm_tunable_parts": Rule("ignore", "", "training only"),
    "mm_projector_lr": Rule("ignore", "", "training only"),
    "mm_vision_tower_lr": Rule("ignore", "", "training only"),
    "tune_mm_mlp_adapter": Rule("ignore", "", "training only"),
    "freeze_mm_mlp_adapter": Rule("ignore", "", "training only"),
    "tune_mm_vision_resampler": Rule("ignore", "", "training only"),
    "freeze_mm_vision_resampler": Rule("ignore", "", "training only"),
    "unfreeze_mm_vision_tower": Rule("ignore", "", "training only"),
    "vision_tower_pretrained": Rule("ignore", "", "training only (weights are in the checkpoint)"),
    "pos_skipping_range": Rule("ignore", "", "position skipping, applied in training only"),
    "use_pos_skipping": Rule("ignore", "", "position skipping, applied in training only"),
    "initializer_range": Rule("ignore", "", "weight initialisation only"),
    "use_cache": Rule("ignore", "", "an embedding forward never keeps a KV cache"),
    "torch_dtype": Rule(
        "ignore", "", "the dtype is chosen at load (--dtype); the weights' own dtype otherwise"
    ),
    "dtype": Rule("ignore", "", "as torch_dtype"),
    "bos_token_id": Rule("ignore", "", "the tokenizer's own special tokens are used"),
    "eos_token_id": Rule("ignore", "", "the tokenizer's own special tokens are used"),
    "pad_token_id": Rule("ignore", "", "the tokenizer's own special tokens are used"),
    "architectures": Rule("ignore", "", "layout detection only (LlavaQwenForCausalLM)"),
    "model_type": Rule("ignore", "", "layout detection only (llava_qwen, or llava in older saves)"),
    "transformers_version": Rule("ignore", "", "bookkeeping"),
    "_name_or_path": Rule("ignore", "", "bookkeeping"),
    "delay_load": Rule("ignore", "", "when the authors load the tower, not which one"),
}

# transformers' generic PretrainedConfig fields (generation defaults, heads, export flags):
# none is read by the model's embedding forward.
GENERIC_FIELDS = frozenset(
    {
        "return_dict",
        "output_hidden_states",
        "output_attentions",
        "torchscript",
        "use_bfloat16",
        "tf_legacy_loss",
        "chunk_size_feed_forward",
        "is_encoder_decoder",
        "is_decoder",
        "cross_attention_hidden_size",
        "add_cross_attention",
        "tie_encoder_decoder",
        "max_length",
        "min_length",
        "do_sample",
        "early_stopping",
        "num_beams",
        "num_beam_groups",
        "diversity_penalty",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size",
        "bad_words_ids",
        "num_return_sequences",
        "output_scores",
        "return_dict_in_generate",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "remove_invalid_values",
        "exponential_decay_length_penalty",
        "suppress_tokens",
        "begin_suppress_tokens",
        "finetuning_task",
        "id2label",
        "label2id",
        "num_labels",
        "tokenizer_class",
        "prefix",
        "sep_token_id",
        "decoder_start_token_id",
        "task_specific_params",
        "problem_type",
        "attn_implementation",
        "_attn_implementation",
    }
)


@dataclass(frozen=True)
class AuthorsConfig:
    """The effective settings read from an authors'-layout ``config.json``."""

    text: dict[str, Any]  # keyword arguments for transformers 5's Qwen2Config
    vision_tower: str
    mm_hidden_size: int | None
    image_grid_pinpoints: Any  # raw value: a list of [h, w] pairs or LLaVA-NeXT's range string
    vision_aspect_ratio: str  # anyres_max_N
    max_length: int | None  # None: the authors do not cut (see tokenizer_model_max_length)


def _refuse(where: str, field: str, value: Any, rule: Rule) -> CheckpointError:
    return CheckpointError(
        f"{where}: config field {field}={value!r} is not supported (only {rule.target}): {rule.reason}"
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_authors_config(config: Mapping[str, Any], *, where: str = "config.json") -> AuthorsConfig:
    """Check every field of an authors'-layout config and return the effective settings.

    Raises :class:`CheckpointError` naming the field for a value that cannot be honoured;
    logs a warning for fields it does not know.
    """
    unknown = sorted(k for k in config if k not in FIELDS and k not in GENERIC_FIELDS)
    if unknown:
        log.warning("%s: fields not known to the LLaVE converter, ignored: %s", where, ", ".join(unknown))

    for field, rule in FIELDS.items():
        if rule.action == "require" and rule.allowed and field in config:
            if config[field] not in rule.allowed:
                raise _refuse(where, field, config[field], rule)

    if config.get("rope_scaling") is not None:
        log.warning(
            "%s: rope_scaling=%r is ignored, as the authors' code ignores it", where, config["rope_scaling"]
        )

    def get(name: str) -> Any:
        value = config.get(name)
        return AUTHORS_QWEN2_DEFAULTS[name] if value is None else value

    text = {k: get(k) for k in _SAME_NAME}
    if text["num_key_value_heads"] is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    text["vocab_size"] = get("vocab_size")
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not _is_int(text[name]) or text[name] <= 0:
            raise CheckpointError(f"{where}: config field {name}={text[name]!r} must be a positive integer")
    if text["hidden_size"] % text["num_attention_heads"]:
        raise CheckpointError(
            f"{where}: hidden_size {text['hidden_size']} is not a multiple of "
            f"num_attention_heads {text['num_attention_heads']}"
        )
    if text["num_attention_heads"] % text["num_key_value_heads"]:
        raise CheckpointError(
            f"{where}: num_attention_heads {text['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {text['num_key_value_heads']}"
        )
    if "head_dim" in config and config["head_dim"] != text["hidden_size"] // text["num_attention_heads"]:
        raise CheckpointError(
            f"{where}: config field head_dim={config['head_dim']!r} differs from hidden_size / "
            "num_attention_heads, which the authors' Qwen2 always uses"
        )
    theta = get("rope_theta")
    if (
        not isinstance(theta, (int, float))
        or isinstance(theta, bool)
        or not math.isfinite(theta)
        or theta <= 1
    ):
        raise CheckpointError(f"{where}: config field rope_theta={theta!r} must be a number above 1")
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(theta)}
    eps = text["rms_norm_eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 1:
        raise CheckpointError(f"{where}: config field rms_norm_eps={eps!r} must be a number in (0, 1)")

    max_length = config.get("tokenizer_model_max_length")
    if max_length is not None and (not _is_int(max_length) or max_length <= 0):
        raise CheckpointError(
            f"{where}: config field tokenizer_model_max_length={max_length!r} must be a positive integer"
        )
    # The authors' eager attention masks with the window whatever use_sliding_window says;
    # their sdpa and flash-attention paths (and transformers 5, per layer) differ. All of
    # them agree only when the window covers every sequence that can reach the model.
    window = text["sliding_window"]
    longest = max_length if max_length is not None else text["max_position_embeddings"]
    if window is not None and (not _is_int(window) or window < longest):
        raise CheckpointError(
            f"{where}: config field sliding_window={window!r} is below the longest sequence ({longest}): "
            "the authors' eager attention applies the window even with use_sliding_window false, their "
            "sdpa and flash attention do not, so the intended model is ambiguous"
        )
    if not text["use_sliding_window"]:
        text["sliding_window"] = None

    aspect = config.get("image_aspect_ratio")
    aspect = "anyres_max_9" if aspect is None else aspect
    if not (isinstance(aspect, str) and re.fullmatch(r"anyres_max_[1-9]\d*", aspect)):
        raise CheckpointError(
            f"{where}: config field image_aspect_ratio={aspect!r} is not supported (only anyres_max_N): "
            + FIELDS["image_aspect_ratio"].reason
        )

    tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower or not isinstance(tower, str):
        raise CheckpointError(f"{where}: config has no mm_vision_tower")
    if "siglip" not in tower.lower():
        raise CheckpointError(
            f"{where}: config field mm_vision_tower={tower!r} is not supported: the authors' code builds a "
            "SigLIP tower only when the name contains 'siglip' (any other name selects a CLIP tower)"
        )
    mm_hidden = config.get("mm_hidden_size")
    if mm_hidden is not None and not _is_int(mm_hidden):
        raise CheckpointError(f"{where}: config field mm_hidden_size={mm_hidden!r} must be an integer")
    return AuthorsConfig(
        text=text,
        vision_tower=tower,
        mm_hidden_size=mm_hidden,
        image_grid_pinpoints=config.get("image_grid_pinpoints"),
        vision_aspect_ratio=aspect,
        max_length=max_length,
    )


def markdown_table() -> str:
    """The field table as markdown (kept in the README)."""
    rows = ["| field | action | becomes / accepted | why |", "|---|---|---|---|"]
    for field, rule in FIELDS.items():
        rows.append(f"| `{field}` | {rule.action} | {rule.target} | {rule.reason} |")
    rows.append(
        "| transformers' generic fields (`return_dict`, generation defaults, `id2label`, ...) | ignore | "
        " | not read by an embedding forward |"
    )
    rows.append("| any other field | warning in the log | | never dropped in silence |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
