"""The three places where transformers differs from the LLaVE authors' code."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

from model import load_embedder
from model.errors import InputTooLongError
from model.onevision import ImageProcessor, count_image_tokens
from tests.conftest import b64, make_png

LLAVE_PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768]]
TINY_PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128]]


def authors_unpad(tensor: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The authors' ``unpad_image`` (LLaVA-NeXT), written out independently: it takes
    ``original_size`` as PIL's (width, height) and truncates with ``int``."""
    cur_h, cur_w = tensor.shape[1:]
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        pad = (cur_h - new_h) // 2
        return tensor[:, pad : cur_h - pad, :]
    new_w = int(width * (cur_h / height))
    pad = (cur_w - new_w) // 2
    return tensor[:, :, pad : cur_w - pad]


def authors_token_count(width: int, height: int, crop: int, patch: int, pinpoints) -> int:
    side = crop // patch
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    grid = torch.zeros(1, side * best_h // crop, side * best_w // crop)
    rows, cols = authors_unpad(grid, width, height).shape[1:]
    return side * side + rows * cols + rows


def transformers_token_count(height: int, width: int, crop: int, patch: int, pinpoints) -> int:
    """transformers' own count, called on its processor method."""
    fake = types.SimpleNamespace(
        image_processor=types.SimpleNamespace(image_grid_pinpoints=pinpoints),
        num_image_tokens=(crop // patch) ** 2,
        vision_aspect_ratio="anyres_max_9",
    )
    fake._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, fake)
    return LlavaOnevisionProcessor._get_number_of_features(fake, height, width, crop, crop)


@pytest.mark.parametrize(("width", "height"), [(47, 423), (94, 846), (700, 840), (1482, 1235)])
def test_llave_geometry_counts_truncate_like_the_authors(width, height):
    ours = count_image_tokens(height, width, crop=384, patch=14, grid_pinpoints=LLAVE_PINPOINTS)
    assert ours == authors_token_count(width, height, 384, 14, LLAVE_PINPOINTS)
    # These sizes are exactly where transformers keeps extra rows or columns.
    assert transformers_token_count(height, width, 384, 14, LLAVE_PINPOINTS) > ours


def test_47x423_gets_the_authors_1053_tokens():
    assert count_image_tokens(423, 47, crop=384, patch=14, grid_pinpoints=LLAVE_PINPOINTS) == 1053
    assert transformers_token_count(423, 47, 384, 14, LLAVE_PINPOINTS) == 1161


def test_counts_agree_with_transformers_elsewhere():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(x) for x in rng.integers(1, 2000, size=2))
        ours = count_image_tokens(h, w, crop=384, patch=14, grid_pinpoints=LLAVE_PINPOINTS)
        assert ours == authors_token_count(w, h, 384, 14, LLAVE_PINPOINTS)
        assert ours <= transformers_token_count(h, w, 384, 14, LLAVE_PINPOINTS)


# (height, width) at the tiny geometry where rounding and truncation disagree.
TINY_DIFFERING = [(392, 49), (49, 392), (147, 392)]


@pytest.mark.parametrize(("height", "width"), TINY_DIFFERING)
def test_model_packing_truncates_and_matches_the_count(tiny_embedder, height, width):
    emb = tiny_embedder
    assert transformers_token_count(height, width, 64, 16, TINY_PINPOINTS) != emb.image_tokens(height, width)
    assert emb.image_tokens(height, width) == authors_token_count(width, height, 64, 16, TINY_PINPOINTS)
    prep = emb.preprocess({"image": b64(make_png(width, height))})
    n_image = prep.input_ids.count(emb.image_token_id)
    assert n_image == emb.image_tokens(height, width)
    # The model packs exactly that many features (masked_scatter would fail otherwise).
    tensors = emb.collate([prep])
    with torch.no_grad():
        feats = emb.model.get_image_features(
            pixel_values=tensors["pixel_values"],
            image_sizes=tensors["image_sizes"],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        ).pooler_output
    assert feats[0].shape[0] == n_image
    vec = emb.embed([{"image": b64(make_png(width, height))}])
    assert np.isfinite(vec).all()


def test_packing_override_is_identical_to_transformers_when_counts_agree(tiny_embedder):
    emb = tiny_embedder
    model = emb.model
    gen = torch.Generator().manual_seed(0)
    side = 4
    for height, width in [(64, 64), (50, 120), (120, 50), (128, 128), (33, 77)]:
        grid_h, grid_w = (x // 64 for x in select_best_resolution((height, width), TINY_PINPOINTS))
        feats = [torch.randn(1 + grid_h * grid_w, side * side, 64, generator=gen)]
        sizes = torch.tensor([[height, width]])
        ours, ours_len = model.pack_image_features(feats, sizes, image_newline=model.image_newline)
        ref, ref_len = LlavaOnevisionModel.pack_image_features(
            model, feats, sizes, image_newline=model.image_newline
        )
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours_len, ref_len)


def test_length_cut_mirrors_the_authors(tiny_checkpoint):
    emb = load_embedder(tiny_checkpoint, device="cpu", max_length=40)
    long_text = {"text": "red green blue " * 40}
    prep = emb.preprocess(long_text)
    assert prep.cost == 40 and prep.truncated
    full = load_embedder(tiny_checkpoint, device="cpu")
    uncut = full.preprocess(long_text)
    assert prep.input_ids == uncut.input_ids[:40]
    # The embedding is the model's state at the last kept token, as in the authors' code.
    with torch.no_grad():
        ids = torch.tensor([uncut.input_ids[:40]])
        ref = full.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, -1]
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    np.testing.assert_allclose(emb.embed([long_text])[0], ref, atol=1e-5)
    with pytest.raises(InputTooLongError, match="limit is 40"):
        emb.preprocess(long_text, truncate=False)


def _state_at(embedder, prepared, position: int) -> np.ndarray:
    """The normalised final hidden state at ``position`` of an uncut forward pass."""
    with torch.no_grad():
        hidden = embedder.model(**embedder.collate([prepared]), use_cache=False).last_hidden_state
    return torch.nn.functional.normalize(hidden[0, position], dim=-1).numpy()


def _content(*parts) -> dict:
    return {
        "content": [
            {"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": b64(p)}
            for p in parts
        ]
    }


@pytest.mark.parametrize(
    ("name", "parts", "kept_images"),
    [
        # 1 image: moved to the front, so the text is what is cut.
        ("text then one image", ("red green blue " * 30, make_png(64, 64)), 1),
        # 2 images stay in place; the cut falls before both: neither is decoded.
        (
            "text then two images, cut before both",
            ("red green blue " * 30, make_png(64, 64), make_png(70, 40)),
            0,
        ),
        # The cut falls inside the first of two images.
        ("cut inside the first image", ("a b c " * 3, make_png(128, 128), make_png(64, 64)), 1),
        # The cut falls inside the second image.
        ("cut inside the second image", ("a", make_png(64, 64), "b", make_png(128, 128)), 2),
    ],
)
def test_cuts_after_and_inside_images_equal_the_uncut_state_at_the_limit(
    tiny_checkpoint, name, parts, kept_images
):
    """The authors splice all image features, then cut the sequence. A causal model's state
    at the last kept position does not depend on what follows, so the embedding of the cut
    input must equal the uncut forward's state at position limit-1 (computed here with
    transformers' own splicing of whole images, no cut logic of ours)."""
    limit = 60
    emb = load_embedder(tiny_checkpoint, device="cpu", max_length=limit)
    full = load_embedder(tiny_checkpoint, device="cpu")
    inp = _content(*parts)
    uncut = full.preprocess(inp)
    assert uncut.cost > limit, name
    prep = emb.preprocess(inp)
    assert prep.cost == limit and prep.truncated
    assert prep.num_images == kept_images
    assert prep.input_ids == uncut.input_ids[:limit]
    np.testing.assert_allclose(emb.embed([inp])[0], _state_at(full, uncut, limit - 1), atol=1e-5)
    # In a padded batch beside other inputs, the same vector.
    batch = emb.embed([{"text": "x"}, inp, {"image": b64(make_png(64, 64))}], batch_size=3)
    np.testing.assert_allclose(batch[1], _state_at(full, uncut, limit - 1), atol=1e-5)
    with pytest.raises(InputTooLongError):
        emb.preprocess(inp, truncate=False)


def test_images_after_the_cut_are_never_decoded(tiny_checkpoint):
    emb = load_embedder(tiny_checkpoint, device="cpu", max_length=40)
    broken = b64(make_png(64, 64)[:60])  # a valid header, truncated pixel data
    inp = _content("red green blue " * 30, make_png(64, 64), make_png(64, 64))
    inp["content"][2] = {"type": "image", "image": broken}
    prep = emb.preprocess(inp)  # decoding the image after the cut would raise
    assert prep.num_images == 0 and prep.cost == 40


def test_pil_backend_is_used(tiny_embedder, tiny_llava_checkpoint):
    assert type(tiny_embedder.image_processor) is ImageProcessor
    assert ImageProcessor.__name__ == "LlavaOnevisionImageProcessorPil"
    assert type(load_embedder(tiny_llava_checkpoint, device="cpu").image_processor) is ImageProcessor


@pytest.mark.parametrize(("height", "width"), [(768, 768), (1500, 1500), (384, 768), (3000, 1400)])
def test_anyres_max_9_never_shrinks_llave_grids(height, width):
    """LLaVE's grid is at most 2x2 crops, under anyres_max_9's limit: the unpadded grid is
    kept whole (a 2x2 grid of 27x27 features plus a newline per row), where a 3x3 grid
    allowance of 1 would shrink it."""
    full = count_image_tokens(height, width, crop=384, patch=14, grid_pinpoints=LLAVE_PINPOINTS)
    shrunk = count_image_tokens(
        height, width, crop=384, patch=14, grid_pinpoints=LLAVE_PINPOINTS, vision_aspect_ratio="anyres_max_1"
    )
    best_h, best_w = select_best_resolution((height, width), LLAVE_PINPOINTS)
    rows, cols = 27 * best_h // 384, 27 * best_w // 384
    if height * best_w == width * best_h:  # same aspect: nothing to unpad
        assert full == 729 + rows * cols + rows
    assert full <= 729 + rows * cols + rows
    if rows * cols > 729 * 1.21:
        assert shrunk < full
