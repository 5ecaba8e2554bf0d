"""Checkpoint loading in both layouts, conversion, and clear errors for bad ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model import load_embedder
from model.errors import CheckpointError
from tests.conftest import b64, make_png


def _inputs():
    return [
        {"text": "a red circle"},
        {"image": b64(make_png(64, 64))},
        {
            "image": b64(make_png(47, 123, (0, 200, 0))),
            "text": "what is it?",
            "instruction": "Represent the image",
        },
        {
            "content": [
                {"type": "image", "image": b64(make_png(30, 40))},
                {"type": "text", "text": " vs "},
                {"type": "image", "image": b64(make_png(90, 20, (0, 0, 255)))},
            ]
        },
    ]


def test_authors_layout_embeds_identically_to_hf_layout(tiny_checkpoint, tiny_llava_checkpoint):
    hf = load_embedder(tiny_checkpoint, device="cpu")
    llava = load_embedder(tiny_llava_checkpoint, device="cpu")
    assert hf.dim == llava.dim == 64
    np.testing.assert_allclose(hf.embed(_inputs()), llava.embed(_inputs()), atol=1e-6)


def test_convert_cli_writes_a_loadable_hf_checkpoint(tiny_checkpoint, tiny_llava_checkpoint, tmp_path):
    out = tmp_path / "converted"
    subprocess.run([sys.executable, "-m", "model.convert", str(tiny_llava_checkpoint), str(out)], check=True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llava_onevision"
    assert cfg["vision_feature_select_strategy"] == "full" and cfg["vision_feature_layer"] == -1
    assert cfg["image_grid_pinpoints"] == [[64, 64], [64, 128], [128, 64], [128, 128]]
    converted = load_embedder(out, device="cpu")
    np.testing.assert_allclose(
        converted.embed(_inputs()), load_embedder(tiny_checkpoint, device="cpu").embed(_inputs()), atol=1e-6
    )


def test_hf_layout_loads_with_stock_auto_classes(tiny_checkpoint):
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    assert AutoConfig.from_pretrained(tiny_checkpoint).model_type == "llava_onevision"
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert tok.convert_tokens_to_ids("<image>") == model.config.image_token_id
    assert tok.chat_template
    proc = AutoImageProcessor.from_pretrained(tiny_checkpoint)
    assert proc.image_grid_pinpoints == [[64, 64], [64, 128], [128, 64], [128, 128]]


def test_same_seed_same_weights_both_layouts(tiny_checkpoint, tiny_llava_checkpoint, tmp_path):
    a = load_embedder(tiny_checkpoint, device="cpu").model.state_dict()
    b = load_embedder(tiny_llava_checkpoint, device="cpu").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    from model.tiny import build_checkpoint

    other = load_embedder(build_checkpoint(tmp_path / "s1", seed=1), device="cpu").model.state_dict()
    assert any(not torch.equal(a[k], other[k]) for k in a)


def test_llave_05b_preset_has_the_real_shapes():
    from model.tiny import PRESETS, build_config, build_tokenizer

    cfg = build_config(PRESETS["llave-0.5b"], build_tokenizer())
    assert cfg.text_config.hidden_size == 896 and cfg.text_config.num_hidden_layers == 24
    assert cfg.vision_config.hidden_size == 1152 and cfg.vision_config.num_hidden_layers == 26
    assert cfg.vision_config.image_size == 384 and cfg.vision_config.patch_size == 14
    assert cfg.image_grid_pinpoints == [[384, 384], [384, 768], [768, 384], [768, 768]]


def test_dtype_bfloat16_on_cpu(tiny_checkpoint):
    emb = load_embedder(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert emb.dtype == "bfloat16"
    vec = emb.embed([{"text": "a red circle"}, {"image": b64(make_png(64, 64))}])
    ref = load_embedder(tiny_checkpoint, device="cpu").embed(
        [{"text": "a red circle"}, {"image": b64(make_png(64, 64))}]
    )
    assert vec.dtype == np.float32
    assert np.all(np.sum(vec * ref, axis=1) > 0.98)


# ----------------------------------------------------------------------------- bad checkpoints


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_embedder(tmp_path / "nope", device="cpu")


def test_missing_config(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path / "c")
    (ck / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_embedder(ck, device="cpu")


def test_unknown_architecture(tiny_checkpoint, tmp_path):
    ck = _copy(tiny_checkpoint, tmp_path / "c")
    (ck / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        load_embedder(ck, device="cpu")


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_llava_checkpoint"])
def test_missing_weights_file(fixture, request, tmp_path):
    ck = _copy(request.getfixturevalue(fixture), tmp_path / "c")
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="safetensors"):
        load_embedder(ck, device="cpu")


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_llava_checkpoint"])
def test_missing_key(fixture, request, tmp_path):
    ck = _copy(request.getfixturevalue(fixture), tmp_path / "c")
    weights = load_file(ck / "model.safetensors")
    victim = next(k for k in weights if "layers.1" in k and "mlp" in k)
    del weights[victim]
    save_file(weights, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_embedder(ck, device="cpu")


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "tiny_llava_checkpoint"])
def test_mismatched_shape(fixture, request, tmp_path):
    ck = _copy(request.getfixturevalue(fixture), tmp_path / "c")
    weights = load_file(ck / "model.safetensors")
    victim = next(k for k in weights if "layers.0" in k and "q_proj.weight" in k and "vision" not in k)
    weights[victim] = torch.zeros(weights[victim].shape[0] + 1, weights[victim].shape[1])
    save_file(weights, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape|size"):
        load_embedder(ck, device="cpu")


@pytest.mark.parametrize(
    ("tower", "match"),
    [
        ("someone/else-vit", "only when the name contains 'siglip'"),  # the authors would build CLIP
        ("someone/siglip-base-patch16-224", "unknown vision tower"),  # SigLIP, but no known shape
    ],
)
def test_llava_layout_unknown_vision_tower(tiny_llava_checkpoint, tmp_path, tower, match):
    ck = _copy(tiny_llava_checkpoint, tmp_path / "c")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["mm_vision_tower"] = tower
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_embedder(ck, device="cpu")


def test_hub_id_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError, match="not in the local HF cache"):
        load_embedder("zhibinlan/LLaVE-0.5B", device="cpu")


def test_unknown_device_and_dtype(tiny_checkpoint):
    with pytest.raises(CheckpointError, match="dtype"):
        load_embedder(tiny_checkpoint, device="cpu", dtype="int3")
    with pytest.raises(CheckpointError, match="device"):
        load_embedder(tiny_checkpoint, device="tpu:7")


@pytest.mark.parametrize("layout", ["hf", "llava"])
def test_preprocessor_without_weights_equals_the_embedders(layout, tiny_checkpoint, tiny_llava_checkpoint):
    """load_preprocessor reads no weights yet prepares inputs exactly as load_embedder's."""
    from model import load_preprocessor

    path = tiny_checkpoint if layout == "hf" else tiny_llava_checkpoint
    embedder = load_embedder(path, device="cpu", dtype="float32", max_image_pixels=5000)
    pre = load_preprocessor(path, max_image_pixels=5000)
    assert (pre.max_length, pre.limits) == (embedder.max_length, embedder.limits)
    for inp in ({"text": "a caption"}, {"image": make_png(70, 40), "text": "x", "instruction": "Find:"}):
        a, b = embedder.preprocess(inp), pre.preprocess(inp)
        assert a.input_ids == b.input_ids and a.image_sizes == b.image_sizes
        assert (a.pixel_values is None) == (b.pixel_values is None)
        if a.pixel_values is not None:
            np.testing.assert_array_equal(a.pixel_values, b.pixel_values)
