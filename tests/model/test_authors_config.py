"""The authors' config.json, converted field by field (model/authors_config.py).

The configs under ``tests/model/published/`` are written by hand in the shape of the three
published LLaVE checkpoints (transformers 4.x field names, ``model_type: llava_qwen``,
LLaVA-NeXT's ``mm_*`` fields); they are converted on the meta device, without weights, and
each test reads the values the built model actually runs with, not just that it loads.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlavaOnevisionModel

from model import load_embedder
from model.authors_config import FIELDS, GENERIC_FIELDS, read_authors_config
from model.convert import build_image_processor, llava_to_hf_config, read_weight_shapes
from model.errors import CheckpointError

PUBLISHED = Path(__file__).parent / "published"

# name -> (hidden, layers, heads, kv heads, intermediate, tied, image token id)
SHAPES = {
    "llave-0.5b": (896, 24, 14, 2, 4864, True, 151646),
    "llave-2b": (1536, 28, 12, 2, 8960, True, 151665),
    "llave-7b": (3584, 28, 28, 4, 18944, False, 151646),
}


def published_tensor_names(llm_layers: int, vision_layers: int, tied: bool) -> list[str]:
    """Tensor names of a published checkpoint (the authors' key layout)."""
    out = [
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.image_newline",
        *(f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
    ]
    if not tied:
        out.append("lm_head.weight")
    attn = [f"self_attn.{m}_proj.{p}" for m in "qkv" for p in ("weight", "bias")] + [
        "self_attn.o_proj.weight"
    ]
    mlp = [f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    norms = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    out += [f"model.layers.{i}.{s}" for i in range(llm_layers) for s in attn + mlp + norms]
    v = "model.vision_tower.vision_tower.vision_model."
    out += [v + s for s in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias")]
    out += [
        v + "embeddings.position_embedding.weight",
        v + "post_layernorm.weight",
        v + "post_layernorm.bias",
    ]
    mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"]
    mods += ["layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"]
    out += [
        f"{v}encoder.layers.{i}.{m}.{p}"
        for i in range(vision_layers)
        for m in mods
        for p in ("weight", "bias")
    ]
    return out


@pytest.fixture(params=sorted(SHAPES))
def published(request, tmp_path) -> tuple[str, Path]:
    """A copy of one published-shape checkpoint folder, with a weight index (the 7B one
    ships its own, as a sharded checkpoint; the others are single files, whose names
    are written here as an index because their weights are not in the repository)."""
    name = request.param
    folder = tmp_path / name
    shutil.copytree(PUBLISHED / name, folder)
    if not (folder / "model.safetensors.index.json").exists():
        _, layers, *_, tied, _ = SHAPES[name]
        names = published_tensor_names(layers, 26, tied)
        index = {"weight_map": {k: "model.safetensors" for k in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return name, folder


def convert_on_meta(folder: Path, config: dict | None = None):
    """(LlavaOnevisionModel on the meta device, its config, the authors' settings)."""
    config = config if config is not None else json.loads((folder / "config.json").read_text())
    added = json.loads((folder / "added_tokens.json").read_text())
    hf, settings = llava_to_hf_config(
        config, folder, read_weight_shapes(folder), image_token_id=added["<image>"]
    )
    with torch.device("meta"):
        model = LlavaOnevisionModel(hf)
    return model, hf, settings


def effective_inv_freq(model) -> torch.Tensor:
    """The rotary inverse frequencies the converted model computes (built on the CPU by
    the model's own rotary class from the model's own config)."""
    rotary = model.language_model.rotary_emb
    with torch.device("cpu"):
        return type(rotary)(config=model.language_model.config).inv_freq


def test_published_configs_run_with_the_published_settings(published):
    name, folder = published
    hidden, layers, heads, kv, inter, tied, image_id = SHAPES[name]
    model, hf, settings = convert_on_meta(folder)
    head_dim = hidden // heads
    lm = model.language_model

    expected = 1.0 / (1_000_000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    got = effective_inv_freq(model).double()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    # Norms: every RMSNorm in the LLM runs with the config's eps.
    eps = {m.variance_epsilon for m in lm.modules() if hasattr(m, "variance_epsilon")}
    assert eps == {1e-6}
    assert len(lm.layers) == layers
    attn = lm.layers[0].self_attn
    assert attn.q_proj.out_features == heads * head_dim
    assert attn.k_proj.out_features == kv * head_dim
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None  # Qwen2's biases
    assert lm.layers[0].mlp.up_proj.out_features == inter
    assert attn.scaling == pytest.approx(head_dim**-0.5)
    assert set(hf.text_config.layer_types) == {"full_attention"}
    assert hf.text_config.tie_word_embeddings is tied
    assert lm.embed_tokens.num_embeddings == json.loads((folder / "config.json").read_text())["vocab_size"]

    vision = model.vision_tower.config
    # (the tower's inner attribute names differ between transformers releases)
    vision_layers = next(m for n, m in model.vision_tower.named_modules() if n.endswith("encoder.layers"))
    assert len(vision_layers) == 26
    assert (vision.hidden_size, vision.image_size, vision.patch_size) == (1152, 384, 14)
    assert (vision.intermediate_size, vision.num_attention_heads) == (4304, 16)
    assert model.multi_modal_projector.linear_1.in_features == 1152
    assert model.multi_modal_projector.linear_2.out_features == hidden

    llave_grid = [[384, 384], [384, 768], [768, 384], [768, 768]]
    assert [list(p) for p in hf.image_grid_pinpoints] == llave_grid
    assert build_image_processor(hf).image_grid_pinpoints == llave_grid
    assert hf.image_token_id == image_id
    assert hf.vision_aspect_ratio == "anyres_max_9"
    assert settings.max_length == 4096


def test_published_configs_hold_no_unknown_field(published, caplog):
    _, folder = published
    config = json.loads((folder / "config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="model.authors_config"):
        read_authors_config(config)
    assert not caplog.records
    assert set(config) <= set(FIELDS) | GENERIC_FIELDS


def test_unknown_field_is_a_warning_not_silence(caplog):
    config = json.loads((PUBLISHED / "llave-0.5b" / "config.json").read_text())
    config["mm_brand_new_option"] = 3
    with caplog.at_level(logging.WARNING, logger="model.authors_config"):
        read_authors_config(config)
    assert "mm_brand_new_option" in caplog.text


# ----------------------------------------------------------------------------- the guard
# Every mapped field: a new value, and what to read off the converted model to see it.
# (The tuple's function takes (model, hf_config, settings).)
MAPPED_PROBES = {
    "rope_theta": (10_000.0, lambda m, hf, s: effective_inv_freq(m).tolist()),
    "rms_norm_eps": (1e-5, lambda m, hf, s: m.language_model.norm.variance_epsilon),
    "hidden_act": ("gelu", lambda m, hf, s: type(m.language_model.layers[0].mlp.act_fn).__name__),
    "hidden_size": (1792, lambda m, hf, s: m.language_model.embed_tokens.embedding_dim),
    "intermediate_size": (1000, lambda m, hf, s: m.language_model.layers[0].mlp.up_proj.out_features),
    "num_hidden_layers": (2, lambda m, hf, s: len(m.language_model.layers)),
    "num_attention_heads": (16, lambda m, hf, s: m.language_model.layers[0].self_attn.scaling),
    "num_key_value_heads": (1, lambda m, hf, s: m.language_model.layers[0].self_attn.k_proj.out_features),
    "max_position_embeddings": (8192, lambda m, hf, s: m.language_model.config.max_position_embeddings),
    "attention_dropout": (0.1, lambda m, hf, s: m.language_model.layers[0].self_attn.attention_dropout),
    "tie_word_embeddings": ("flip", lambda m, hf, s: hf.tie_word_embeddings),
    "vocab_size": (152000, lambda m, hf, s: m.language_model.embed_tokens.num_embeddings),
    # The window only exists with use_sliding_window (a window below the cut is refused).
    "use_sliding_window": (True, lambda m, hf, s: hf.text_config.sliding_window),
    "sliding_window": (65536, lambda m, hf, s: hf.text_config.sliding_window),
    "max_window_layers": (0, lambda m, hf, s: hf.text_config.max_window_layers),
    "image_grid_pinpoints": ([[384, 384]], lambda m, hf, s: [list(p) for p in hf.image_grid_pinpoints]),
    "image_aspect_ratio": ("anyres_max_4", lambda m, hf, s: hf.vision_aspect_ratio),
    "tokenizer_model_max_length": (2048, lambda m, hf, s: s.max_length),
    "mm_vision_tower": ("google/siglip-so400m-patch14-224", None),  # unknown shape: refused
    "vision_tower": ("google/siglip-so400m-patch14-224", None),
}
# Fields whose probe needs another field set first for the change to be observable.
CONTEXT = {"sliding_window": {"use_sliding_window": True}, "vision_tower": {"mm_vision_tower": None}}
# Every required field: one value the converter must refuse.
REFUSED = {
    "pruned_heads": {"0": [1]},
    "mm_hidden_size": 1024,
    "mm_projector_type": "linear",
    "mm_resampler_type": "spatial_pool",
    "use_mm_proj": False,
    "s2": True,
    "mm_use_im_start_end": True,
    "mm_use_im_patch_token": True,
    "mm_patch_merge_type": "flat",
}


def test_every_mapped_and_required_field_has_a_guard():
    mapped = {k for k, r in FIELDS.items() if r.action == "map"}
    required = {k for k, r in FIELDS.items() if r.action == "require"}
    assert mapped == set(MAPPED_PROBES), "a mapped field without a probe: add one to MAPPED_PROBES"
    assert required == set(REFUSED), "a required field without a refused value: add one to REFUSED"


@pytest.mark.parametrize("field", sorted(MAPPED_PROBES))
def test_changing_a_mapped_field_changes_the_converted_model(field):
    folder = PUBLISHED / "llave-7b"  # sharded: converts from its index, no weights needed
    base = json.loads((folder / "config.json").read_text())
    value, probe = MAPPED_PROBES[field]
    context = dict(CONTEXT.get(field, {}))
    before_cfg = {**base, **context}
    before_cfg = {k: v for k, v in before_cfg.items() if v is not None}
    after_cfg = dict(before_cfg)
    after_cfg[field] = (not before_cfg.get(field, False)) if value == "flip" else value
    if probe is None:
        with pytest.raises(CheckpointError, match="vision tower"):
            convert_on_meta(folder, after_cfg)
        return
    before = probe(*convert_on_meta(folder, before_cfg))
    after = probe(*convert_on_meta(folder, after_cfg))
    assert before != after, f"{field}: {before_cfg.get(field)!r} -> {after_cfg[field]!r} changed nothing"


@pytest.mark.parametrize("field", sorted(REFUSED))
def test_a_value_that_cannot_be_honoured_is_refused_by_name(field):
    folder = PUBLISHED / "llave-0.5b"
    config = json.loads((folder / "config.json").read_text())
    config[field] = REFUSED[field]
    shapes = {k: None for k in published_tensor_names(24, 26, True)}
    with pytest.raises(CheckpointError, match=field):
        llava_to_hf_config(config, folder, shapes, image_token_id=151646)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"image_aspect_ratio": "pad"}, "image_aspect_ratio"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
        ({"use_sliding_window": True, "sliding_window": 1024}, "sliding_window"),
        # The authors' eager attention applies a window even with the flag off.
        ({"use_sliding_window": False, "sliding_window": 1024}, "sliding_window"),
        ({"rope_theta": "1e6"}, "rope_theta"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"head_dim": 128}, "head_dim"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"tokenizer_model_max_length": -1}, "tokenizer_model_max_length"),
        ({"mm_vision_tower": "openai/clip-vit-large-patch14-336"}, "mm_vision_tower"),
    ],
)
def test_inconsistent_values_are_refused(changes, match):
    config = {**json.loads((PUBLISHED / "llave-0.5b" / "config.json").read_text()), **changes}
    with pytest.raises(CheckpointError, match=match):
        read_authors_config(config)


def test_a_missing_field_takes_the_authors_default_not_ours():
    """transformers 4.39's Qwen2 defaults apply when a 4.x field is absent (e.g. the
    RoPE base 10,000 and an eps of 1e-6), whatever transformers 5 defaults to."""
    config = json.loads((PUBLISHED / "llave-0.5b" / "config.json").read_text())
    del config["rope_theta"], config["rms_norm_eps"], config["num_key_value_heads"]
    settings = read_authors_config(config)
    assert settings.text["rope_parameters"]["rope_theta"] == 10_000.0
    assert settings.text["rms_norm_eps"] == 1e-6
    assert settings.text["num_key_value_heads"] == config["num_attention_heads"]


def test_vocab_size_must_match_the_embedding_rows(tiny_llava_checkpoint):
    config = json.loads((tiny_llava_checkpoint / "config.json").read_text())
    shapes = read_weight_shapes(tiny_llava_checkpoint)
    config["vocab_size"] += 64
    with pytest.raises(CheckpointError, match="vocab_size"):
        llava_to_hf_config(config, tiny_llava_checkpoint, shapes, image_token_id=3)


# ------------------------------------------------------------- end to end on a tiny model
@pytest.mark.parametrize(("field", "value"), [("rope_theta", 10_000.0), ("rms_norm_eps", 1e-2)])
def test_the_embedding_moves_when_a_mapped_field_moves(tiny_llava_checkpoint, tmp_path, field, value):
    inputs = [{"text": "a red circle in the upper left corner of the picture"}]
    reference = load_embedder(tiny_llava_checkpoint, device="cpu", dtype="float32").embed(inputs)
    changed = tmp_path / "c"
    shutil.copytree(tiny_llava_checkpoint, changed)
    config = json.loads((changed / "config.json").read_text())
    assert config[field] != value
    config[field] = value
    (changed / "config.json").write_text(json.dumps(config))
    moved = load_embedder(changed, device="cpu", dtype="float32").embed(inputs)
    assert np.abs(moved - reference).max() > 1e-3


def test_tiny_authors_layout_is_written_with_4x_names(tiny_llava_checkpoint, caplog):
    config = json.loads((tiny_llava_checkpoint / "config.json").read_text())
    # The same fields as a config.json that the authors' toolchain wrote (the reference).
    written_by_authors = json.loads(
        (Path(__file__).parent / "authors_reference/checkpoint/config.json").read_text()
    )
    assert set(config) == set(written_by_authors)
    assert config["model_type"] == "llava_qwen"
    assert config["rope_theta"] == 1_000_000.0 and "rope_parameters" not in config
    assert {"use_sliding_window", "sliding_window", "max_window_layers", "rope_scaling"} <= set(config)
    with caplog.at_level(logging.WARNING, logger="model.authors_config"):
        read_authors_config(config)
    assert not caplog.records


def test_readme_holds_the_field_table():
    from model.authors_config import markdown_table

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start, end = "<!-- field-table:start -->\n", "\n<!-- field-table:end -->"
    held = readme[readme.index(start) + len(start) : readme.index(end)]
    assert held == markdown_table(), "README's field table is stale: paste `python -m model.authors_config`"
