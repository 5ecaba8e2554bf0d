"""The project's video path against the LLaVE authors' own code.

``authors_reference/video/`` holds five clips written with PyAV and what the authors' video
retrieval path (their MSVD loader, ``process_video_with_decord``, their SigLIP processor,
``get_2dPool``, ``add_token_per_grid``, the splice and cut, ``encode_multimodal_embeddings``)
computed for them on the reference checkpoint: the frame indices decord read, hashes of the
frames and pixels, the visual-token layout, and float32 embeddings of each clip and of its
caption queries (recipe: ``authors_reference/README.md``, "Video"). Nothing there was written
by this project. Each step is compared on its own, so a failure says which step differs.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache

import av
import numpy as np
import pytest
import torch

from model import load_embedder
from model.errors import InputTooLongError
from model.onevision import count_video_tokens, pack_video_features
from model.video import decode_video, frames_to_pixels, probe_video
from tests.model.test_authors_reference import CHECKPOINT, REF, TOL, embedder

VIDEO = REF / "video"
CROP, PATCH = 64, 16  # the reference checkpoint's tower (64 px, patch 16: 4x4 -> 2x2 per frame)


@cache
def reference() -> tuple[dict, dict[str, np.ndarray]]:
    cases = json.loads((VIDEO / "cases.json").read_text())
    with np.load(VIDEO / "expected.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return cases, arrays


def clips() -> list[dict]:
    return reference()[0]["videos"]


def with_video(inp: dict) -> dict:
    """The case's input with the clip's file name replaced by the file's bytes."""
    out = dict(inp)
    if "video" in out:
        out["video"] = (VIDEO / out["video"]).read_bytes()
    return out


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@cache
def cut_embedder(video_max_length: int, attn: str):
    return load_embedder(
        CHECKPOINT, device="cpu", dtype="float32", video_max_length=video_max_length, attn_implementation=attn
    )


def test_the_clips_cover_the_sampling_rules():
    rules = {c["sampling"] for c in clips()}
    assert rules == {"stride", "linspace"}
    assert any(c["stride_indices_count"] == 32 for c in clips())  # exactly 32 stays on the stride
    assert len({c["decord_avg_fps"] for c in clips()}) == 5  # 19.5 (round half to even) .. 30


# ------------------------------------------------------------------ frames and pixels
@pytest.mark.parametrize("name", [c["name"] for c in clips()])
def test_frames_and_pixels_match_the_authors(name):
    c = next(x for x in clips() if x["name"] == name)
    data = (VIDEO / c["file"]).read_bytes()
    info = probe_video(data)
    assert (info.frames, info.avg_fps) == (c["decord_frame_count"], pytest.approx(c["decord_avg_fps"]))
    decoded = decode_video(data, size=CROP)
    assert decoded.indices == c["frame_indices"], name
    # The frames at those indices are decord's, byte for byte (decoded here by PyAV in full,
    # independently of the project's lazy seek-and-decode).
    with av.open(str(VIDEO / c["file"])) as container:
        every = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert sha256(np.stack([every[i] for i in decoded.indices])) == c["frames_uint8_sha256"], name
    # Squashed to the crop, rescaled and normalised as their SigLIP processor does: same bits.
    pixels = frames_to_pixels(decoded.frames, [0.5] * 3, [0.5] * 3)
    assert list(pixels.shape) == c["pixel_values_shape"]
    assert sha256(pixels) == c["pixel_values_sha256"], name
    # ... and so are the pixels the embedder prepares for the model.
    prep = embedder(str(CHECKPOINT), "eager").preprocess(with_video(c["input"]))
    assert prep.pixel_values.dtype == np.float32 and sha256(prep.pixel_values) == c["pixel_values_sha256"]
    assert prep.video_frames == [c["num_frames"]]


# ------------------------------------------------------------------ tokens and layout
@pytest.mark.parametrize("kind", ["videos", "captions"])
def test_prompts_and_token_layout_match_the_authors(kind):
    emb = embedder(str(CHECKPOINT), "eager")
    for c in reference()[0][kind]:
        inp = with_video(c["input"])
        assert emb.prompt(inp) == c["authors_prompt"], c["name"]
        prep = emb.preprocess(inp)
        visual = c.get("visual_tokens", 0)
        if visual:
            assert count_video_tokens(c["num_frames"], crop=CROP, patch=PATCH) == visual
            assert visual == c["num_frames"] * c["visual_tokens_per_frame"]
        expanded: list[int] = []
        for tok in c["input_ids"]:
            expanded += [emb.image_token_id] * visual if tok == -200 else [tok]
        assert prep.input_ids == expanded, c["name"]
        assert prep.cost == c["sequence_length"] == c["pooled_position"] + 1
        if visual:
            assert prep.input_ids.index(emb.image_token_id) == c["visual_start"]
        assert not prep.truncated and prep.cut_image_tokens is None


def test_pooling_and_newlines_match_the_authors_at_the_real_geometry():
    """27x27 -> 14x14 bilinear with a newline after every row: where bilinear and 2x2
    average pooling differ (the tiny tower's 4x4 -> 2x2 cannot tell them apart)."""
    _, arrays = reference()
    grid = pack_video_features(
        torch.from_numpy(arrays["pool27_input"]), torch.from_numpy(arrays["pool27_newline"])
    )
    assert grid.shape == arrays["pool27_grid"].shape == (2 * 14 * 15, 4)
    np.testing.assert_allclose(grid.numpy(), arrays["pool27_grid"], rtol=0, atol=1e-6)
    pooled = grid.view(2, 14, 15, 4)[:, :, :14].reshape(2, 196, 4)
    np.testing.assert_allclose(pooled.numpy(), arrays["pool27_pooled"], rtol=0, atol=1e-6)


def test_newlines_sit_where_the_authors_put_them_on_the_tiny_tower():
    c = next(x for x in clips() if x["name"].startswith("c24fps"))
    frames, dim = c["num_frames"], 8
    features = torch.randn(frames, (CROP // PATCH) ** 2, dim, generator=torch.Generator().manual_seed(0))
    newline = torch.full((dim,), 7.0)  # no pooled feature can equal it
    grid = pack_video_features(features, newline)
    assert grid.shape[0] == c["visual_tokens"]
    offsets = [i for i in range(grid.shape[0]) if torch.equal(grid[i], newline)]
    assert offsets == c["newline_offsets"]


# ------------------------------------------------------------------ embeddings
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_clip_and_caption_embeddings_match_the_authors(attn):
    cases, arrays = reference()
    emb = embedder(str(CHECKPOINT), attn)
    rows = [*cases["videos"], *cases["captions"]]
    assert sorted(c["index"] for c in rows) == list(range(len(arrays["names"])))
    # One input at a time, as the authors' loader fed them; unnormalised first (their
    # pooled norm), then the unit vectors against their rows.
    raw = np.stack([emb.embed([with_video(c["input"])], normalize=False)[0] for c in rows])
    norms = np.linalg.norm(raw, axis=1)
    np.testing.assert_allclose(norms, [c["pooled_norm_before_l2"] for c in rows], rtol=1e-5)
    got = raw / norms[:, None]
    expected = arrays[attn][[c["index"] for c in rows]]
    diff = np.abs(got - expected).max(axis=1)
    worst = int(diff.argmax())
    assert diff.max() <= TOL, f"{rows[worst]['name']} ({attn}) differs from the authors' by {diff[worst]:.3g}"
    # Their retrieval scores follow (dot products of unit vectors).
    clips_n = len(cases["videos"])
    scores = got[:clips_n] @ got[clips_n:].T
    order = sorted(range(len(rows)), key=lambda i: rows[i]["index"])
    assert [rows[i]["name"] for i in order] == list(arrays["names"])
    np.testing.assert_allclose(scores, arrays["video_caption_scores"], rtol=0, atol=2 * TOL)


def test_batched_like_the_authors_loader_matches_the_lone_rows():
    """Their loader batches the seven captions together and their seven videos (a clip once
    per caption) together; batched rows equal the lone ones there (0.0 in eager)."""
    cases, arrays = reference()
    emb = embedder(str(CHECKPOINT), "eager")
    by_name = {c["name"]: c for c in cases["videos"]}
    captions = cases["captions"]
    videos = [by_name[c["video"]] for c in captions]
    for batch in (captions, videos):
        got = emb.embed([with_video(c["input"]) for c in batch], batch_size=len(batch))
        expected = arrays["eager"][[c["index"] for c in batch]]
        assert np.abs(got - expected).max() <= TOL


# ------------------------------------------------------------------ cuts inside a video
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cuts_inside_a_video_match_the_authors(attn):
    cases, arrays = reference()
    assert {c["pooled_is_newline"] for c in cases["video_cuts"]} == {True, False}  # mid-frame and frame end
    for c in cases["video_cuts"]:
        emb = cut_embedder(c["tokenizer_model_max_length_at_eval"], attn)
        inp = with_video(c["input"])
        prep = emb.preprocess(inp)
        assert prep.truncated and prep.cost == c["sequence_length"] == c["pooled_position"] + 1
        assert prep.cut_image_tokens == c["visual_tokens_kept"], c["name"]
        assert prep.input_ids.count(emb.image_token_id) == c["visual_tokens_kept"]
        assert prep.cost - 1 - prep.input_ids.index(emb.image_token_id) == c["pooled_visual_offset"]
        got = emb.embed([inp])[0]
        diff = np.abs(got - arrays[f"cut_{attn}"][c["index"]]).max()
        assert diff <= TOL, f"{c['name']} ({attn}) differs from the authors' by {diff:.3g}"
        with pytest.raises(InputTooLongError):
            emb.preprocess(inp, truncate=False)
