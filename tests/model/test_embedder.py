"""Embedding behaviour: batching, pooling, normalisation, costs and bad inputs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from model import load_embedder
from model.embedder import last_token_pool
from model.errors import (
    EmptyInputError,
    ImageDecodeError,
    ImageTooLargeError,
    InvalidInputError,
    TooManyImagesError,
)
from tests.conftest import b64, make_png
from tests.tolerance import assert_close_scaled


def _mixed():
    return [
        {"text": "a red circle"},
        {"text": "a much longer description of a small blue square in the upper left corner " * 3},
        {"image": b64(make_png(64, 64))},
        {"image": b64(make_png(200, 60, (0, 0, 200))), "text": "wide"},
        {"image": make_png(60, 200), "instruction": "Represent the given image."},  # raw bytes
        {"image": Image.new("RGB", (100, 100), (0, 255, 0))},  # a PIL image
        {"image": "data:image/png;base64," + b64(make_png(33, 33))},  # a data: URI
        {
            "content": [
                {"type": "image", "image": b64(make_png(30, 40))},
                {"type": "text", "text": "and"},
                {"type": "image", "image": b64(make_png(90, 20))},
            ],
            "instruction": "Compare",
        },
        "a bare string is text",
    ]


def test_batched_equals_one_by_one(tiny_embedder):
    batched = tiny_embedder.embed(_mixed(), batch_size=16)
    single = np.stack([tiny_embedder.embed([x])[0] for x in _mixed()])
    assert np.abs(batched - single).max() < 1e-4


def test_rows_are_unit_norm_and_unnormalised_is_the_same_direction(tiny_embedder):
    normed = tiny_embedder.embed(_mixed())
    raw = tiny_embedder.embed(_mixed(), normalize=False)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), normed, atol=1e-5)
    assert normed.dtype == np.float32 and normed.shape == (len(_mixed()), tiny_embedder.dim)


def test_pooling_picks_last_real_token_under_left_and_right_padding(tiny_embedder):
    emb = tiny_embedder
    short, long = emb.preprocess({"text": "hi"}), emb.preprocess({"text": "a long text " * 10})
    right = emb.collate([short, long])
    width = right["input_ids"].shape[1]
    left_ids = torch.full_like(right["input_ids"], emb.pad_token_id)
    left_mask = torch.zeros_like(right["attention_mask"])
    left_ids[0, width - short.cost :] = torch.tensor(short.input_ids)
    left_mask[0, width - short.cost :] = 1
    left_ids[1], left_mask[1] = right["input_ids"][1], right["attention_mask"][1]
    positions = (left_mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        r = emb.encode(right)
        hidden = emb.model(
            input_ids=left_ids, attention_mask=left_mask, position_ids=positions
        ).last_hidden_state
        l_pooled = last_token_pool(hidden, left_mask)  # the project's pooling, left-padded batch
        alone = emb.encode(emb.collate([short]))
    # Raw pooled states (before L2 normalisation): tolerances scale with their magnitude.
    assert_close_scaled(r[0], alone[0], rtol=1e-5, what="right-padded pooled state")
    assert_close_scaled(l_pooled[0], alone[0], rtol=1e-5, what="left-padded pooled state")
    # The naive "mask.sum() - 1" index lands on a pad position here: it would give another state.
    naive = hidden[0, int(left_mask[0].sum()) - 1]
    assert not torch.allclose(naive, alone[0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_last_token_pool_takes_each_rows_last_real_position(side):
    """Direct check of the index on states that name their own position (state = position)."""
    lengths = [1, 3, 5, 2]
    width = max(lengths)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n :] = 1
    hidden = torch.arange(width, dtype=torch.float32)[None, :, None].expand(len(lengths), width, 2)
    pooled = last_token_pool(hidden, mask)
    expected = [n - 1 if side == "right" else width - 1 for n in lengths]
    assert pooled[:, 0].tolist() == expected and pooled.shape == (len(lengths), 2)


def test_distinct_inputs_give_distinct_vectors(tiny_embedder):
    vecs = tiny_embedder.embed(_mixed())
    sims = vecs @ vecs.T
    off = sims[~np.eye(len(vecs), dtype=bool)]
    assert off.max() < 0.99999


@pytest.mark.parametrize("size", [(64, 64), (47, 123), (392, 49), (10, 300), (128, 128), (1, 1), (500, 20)])
def test_cost_estimate_matches_processor(tiny_embedder, size):
    w, h = size
    inp = {"image": b64(make_png(w, h)), "text": "some words"}
    prep = tiny_embedder.preprocess(inp)
    assert tiny_embedder.estimate_cost(inp) == prep.cost == len(prep.input_ids)
    crops = prep.pixel_values.shape[0]
    assert crops >= 2  # base crop + grid


def test_cost_estimate_multi_image(tiny_embedder):
    inp = {
        "content": [
            {"type": "image", "image": b64(make_png(30, 40))},
            {"type": "image", "image": b64(make_png(128, 64))},
        ]
    }
    prep = tiny_embedder.preprocess(inp)
    assert tiny_embedder.estimate_cost(inp) == prep.cost
    # Several images are each tiled like a lone one (the authors' model code): 40x30 is a
    # base crop + one grid crop (16 + 4x4 grid + 4 newlines = 36 features), 64x128 a base
    # crop + two (16 + 4x8 grid + 4 newlines = 52). transformers would give 2 x (16 + 1).
    assert prep.pixel_values.shape[0] == 2 + 3
    assert prep.input_ids.count(tiny_embedder.image_token_id) == 36 + 52


# ----------------------------------------------------------------------------- bad inputs


def _png_bytes(w, h):
    return make_png(w, h)


@pytest.mark.parametrize(
    ("inp", "error", "match"),
    [
        ({}, EmptyInputError, "empty"),
        ({"text": ""}, EmptyInputError, "empty"),
        ({"content": []}, EmptyInputError, "empty"),
        ({"text": 5}, InvalidInputError, "string"),
        ({"text": "x", "colour": "red"}, InvalidInputError, "unknown field"),
        ({"content": [{"type": "audio", "audio": "x"}]}, InvalidInputError, "'text', 'image' or 'video'"),
        ({"content": "text"}, InvalidInputError, "list"),
        (["not", "a", "dict"], InvalidInputError, "object"),
        ({"image": "!!!not base64!!!"}, ImageDecodeError, "base64"),
        ({"image": base64.b64encode(b"plain bytes, not an image").decode()}, ImageDecodeError, "decoded"),
        ({"image": b64(_png_bytes(64, 64)[:60])}, ImageDecodeError, "decoded"),
        ({"image": "http://example.com/cat.png"}, ImageDecodeError, "URL"),
        ({"image": "data:image/png,rawnotb64"}, ImageDecodeError, "base64"),
        ({"image": 12}, ImageDecodeError, "base64"),
    ],
)
def test_bad_inputs_raise_typed_errors(tiny_embedder, inp, error, match):
    with pytest.raises(error, match=match):
        tiny_embedder.preprocess(inp)


def test_truncated_png_is_refused(tiny_embedder):
    data = make_png(300, 300)
    data = data[: len(data) // 2]
    with pytest.raises(ImageDecodeError):
        tiny_embedder.preprocess({"image": b64(data)})


def test_pixel_limit_and_image_count(tiny_checkpoint):
    emb = load_embedder(tiny_checkpoint, device="cpu", max_image_pixels=100 * 100, max_images_per_input=2)
    with pytest.raises(ImageTooLargeError, match="limit"):
        emb.preprocess({"image": b64(make_png(101, 100))})
    emb.preprocess({"image": b64(make_png(100, 100))})
    three = {"content": [{"type": "image", "image": b64(make_png(8, 8))}] * 3}
    with pytest.raises(TooManyImagesError, match="limit is 2"):
        emb.preprocess(three)


def test_decompression_bomb_is_refused_before_decoding(tiny_checkpoint):
    # A 1-bit 20000x20000 PNG is tiny on disk but 400 Mpx when decoded.
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    emb = load_embedder(tiny_checkpoint, device="cpu", max_image_pixels=10_000_000)
    with pytest.raises(ImageTooLargeError):
        emb.preprocess({"image": b64(buf.getvalue())})


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "P", "RGBA", "L", "LA"])
def test_unusual_modes_become_rgb(tiny_embedder, mode):
    img = Image.new(mode, (40, 30))
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode == "CMYK" else "PNG")
    vec = tiny_embedder.embed([{"image": b64(buf.getvalue())}])
    assert np.isfinite(vec).all()


def test_animated_gif_uses_first_frame(tiny_embedder):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    first = io.BytesIO()
    frames[0].convert("P").save(first, "GIF")
    a = tiny_embedder.embed([{"image": b64(buf.getvalue())}])
    b = tiny_embedder.embed([{"image": b64(first.getvalue())}])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_extreme_aspect_ratio_is_refused(tiny_embedder):
    with pytest.raises(ImageDecodeError, match="aspect ratio"):
        tiny_embedder.preprocess({"image": b64(make_png(2000, 2))})


@pytest.mark.parametrize("fmt", ["TGA", "PPM", "PCX"])
def test_formats_outside_the_allow_list_are_refused(tiny_embedder, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, fmt)
    with pytest.raises(ImageDecodeError, match="unknown or corrupt"):
        tiny_embedder.preprocess({"image": b64(buf.getvalue())})


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_common_formats_are_accepted(tiny_embedder, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, fmt)
    assert tiny_embedder.preprocess({"image": b64(buf.getvalue())}).num_images == 1
