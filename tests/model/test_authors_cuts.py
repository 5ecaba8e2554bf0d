"""Cuts that fall before, inside or right after images, against the LLaVE authors' code.

``authors_reference/cuts.json`` + ``cuts.npz`` were computed with the authors' own model
classes and eval path on the reference checkpoint, with ``tokenizer_model_max_length``
lowered to each case's ``max_length`` (recipe: ``authors_reference/README.md``, "Cuts after
and inside images"). Their code splices every image's features into the sequence and then
cuts it: an image after the cut contributes nothing, an image the cut falls inside keeps its
first features, and the pooled token is whatever sits at the last kept position.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import pytest

from model import load_embedder
from model.errors import InputTooLongError
from tests.model.test_authors_reference import CHECKPOINT, REF, TOL, with_images


@cache
def cuts() -> tuple[list[dict], dict[str, np.ndarray]]:
    cases = json.loads((REF / "cuts.json").read_text())["cases"]
    with np.load(REF / "cuts.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    return cases, arrays


@cache
def embedder(max_length: int, attn: str):
    return load_embedder(
        CHECKPOINT, device="cpu", dtype="float32", max_length=max_length, attn_implementation=attn
    )


def case_names() -> list[str]:
    return [c["name"] for c in cuts()[0]]


def test_the_cases_cover_every_kind_of_cut():
    cases = cuts()[0]
    kept = [(im["features_kept_after_cut"], im["feature_tokens"]) for c in cases for im in c["images"]]
    assert any(k == 0 for k, _ in kept)  # an image entirely after the cut
    assert any(0 < k < n for k, n in kept)  # a cut inside an image
    assert any(k == n for k, n in kept)  # an image kept whole before the cut
    assert all(c["cut"] for c in cases)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", case_names())
def test_cut_matches_the_authors(name, attn):
    cases, arrays = cuts()
    c = next(x for x in cases if x["name"] == name)
    emb = embedder(c["max_length"], attn)
    inp = with_images(c["input"])
    assert emb.prompt(inp) == c["authors_prompt"], name
    prep = emb.preprocess(inp)
    # The authors' ids with each image expanded to its features, then cut.
    expanded: list[int] = []
    counts = iter(im["feature_tokens"] for im in c["images"])
    for tok in c["input_ids"]:
        expanded += [emb.image_token_id] * next(counts) if tok == -200 else [tok]
    assert prep.input_ids == expanded[: c["sequence_length"]], name
    assert prep.cost == c["pooled_position"] + 1
    kept = [im["features_kept_after_cut"] for im in c["images"]]
    assert prep.num_images == sum(1 for k in kept if k > 0), name
    partial = [k for k, im in zip(kept, c["images"], strict=True) if 0 < k < im["feature_tokens"]]
    assert prep.cut_image_tokens == (partial[0] if partial else None), name
    row = c["index"]
    got = emb.embed([inp])[0]
    assert np.abs(got - arrays[attn][row]).max() <= TOL, name
    with pytest.raises(InputTooLongError):
        emb.preprocess(inp, truncate=False)


def test_cut_cases_batched_together_match_the_authors():
    cases, arrays = cuts()
    same = [c for c in cases if c["max_length"] == 256]
    emb = embedder(256, "eager")
    got = emb.embed([with_images(c["input"]) for c in same], batch_size=len(same))
    expected = np.stack([arrays["eager"][c["index"]] for c in same])
    assert np.abs(got - expected).max() <= TOL
