"""Keyword and hybrid search (service/storage/hybrid.py) on both backends.

Two sets, both with given vectors, since the tests' tiny model has random weights and its
embeddings mean nothing; the vectors play an embedding's part as described:

- part numbers: 40 hex bolts whose texts differ only in their part number. The "embedding"
  blurs the part number: every bolt's vector is one centre plus noise, and so is the query's,
  so the vector ranking is arbitrary. The query is the part number a user types.
- meaning: 40 documents on different topics; each query's vector lies next to its document's
  (a synonym's embedding), and the query's words appear in no document's text.

Hybrid must find the part every time (vector search alone does not) and keep the vector
search's answers on the meaning set.
"""

from __future__ import annotations

import numpy as np
import pytest

from service.storage.hybrid import hybrid_search, query_words, rrf
from service.storage.sources import Source
from tests.service import test_store as contract
from tests.service.test_store import unit

backend, data_dir, make_store, store = (
    contract.backend,
    contract.data_dir,
    contract.make_store,
    contract.store,
)

DIM = 16


def _parts(rng: np.random.Generator) -> tuple[list[str], list[str], np.ndarray]:
    letters = rng.permutation([a + b for a in "ABCDEFGHJKLM" for b in "PQRSTVWXYZ"])[:40]
    digits = rng.permutation(9000)[:40] + 1000
    codes = [f"{p}-{d}" for p, d in zip(letters, digits, strict=True)]
    texts = [f"Hex bolt M8 x 40, zinc plated steel, part number {code}" for code in codes]
    centre = rng.standard_normal(DIM)
    vectors = unit(centre + 0.05 * rng.standard_normal((40, DIM)))
    return codes, texts, vectors


TOPICS = ["car engine repair", "baking sourdough bread", "tropical fish care", "guitar chord shapes",
          "mountain hiking boots", "tax return deadline", "chess opening theory", "violin bow rosin"]  # fmt: skip
QUERIES = ["automobile motor", "levain loaf", "aquarium", "fretboard", "trekking footwear", "IRS filing",
           "gambit", "string instrument"]  # fmt: skip


def _meaning(rng: np.random.Generator) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts = [f"{TOPICS[i % len(TOPICS)]} notes, volume {i}" for i in range(40)]
    vectors = unit(rng.standard_normal((40, DIM)))
    near = unit(vectors[: len(QUERIES)] + 0.15 * rng.standard_normal((len(QUERIES), DIM)))
    return texts, vectors, near


def test_rrf_fuses_ranks():
    a = [{"id": "x", "score": 0.9}, {"id": "y", "score": 0.8}]
    b = [{"id": "y", "score": 3.0}, {"id": "z", "score": 1.0}]
    fused = rrf([(1.0, a), (1.0, b)], 3)
    assert [h["id"] for h in fused] == ["y", "x", "z"]
    assert fused[0]["score"] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[0]["vector_score"] == 0.8 and fused[0]["keyword_score"] == 3.0
    assert fused[1]["keyword_score"] is None and fused[2]["vector_score"] is None
    assert [h["id"] for h in rrf([(0.0, a), (1.0, b)], 3)][:2] == ["y", "z"]  # weights
    assert query_words('Part "AX-7731" part') == ["part", "ax", "7731"]


def test_hybrid_wins_on_part_numbers_and_keeps_meaning(store):
    rng = np.random.default_rng(0)
    codes, texts, vectors = _parts(rng)
    ids = [f"part-{i}" for i in range(40)]
    meta = [{"shelf": i % 2} for i in range(40)]
    store.upsert("parts", ids, vectors, meta, sources=[Source(t) for t in texts])
    vector_top1 = keyword_top1 = hybrid_top1 = 0
    for i in range(0, 40, 2):
        q = unit(rng.standard_normal(DIM)[None] * 0.05 + vectors.mean(axis=0))[0]
        vector_top1 += store.search("parts", q, 1)[0]["id"] == ids[i]
        keyword = store.keyword_search("parts", codes[i], 5)
        keyword_top1 += keyword[0]["id"] == ids[i]
        hits = hybrid_search(store, "parts", q, codes[i], 5)
        hybrid_top1 += hits[0]["id"] == ids[i]
        assert hits[0]["keyword_score"] is not None and hits[0]["vector_score"] is not None
        filtered = hybrid_search(store, "parts", q, codes[i], 5, {"shelf": 1})  # filters apply to both
        assert all(h["metadata"]["shelf"] == 1 for h in filtered) and ids[i] not in {
            h["id"] for h in filtered
        }
    assert keyword_top1 == hybrid_top1 == 20
    assert vector_top1 <= 5  # the blurred embedding alone rarely finds the part

    texts, vectors, near = _meaning(rng)
    ids = [f"m-{i}" for i in range(40)]
    store.upsert("meaning", ids, vectors, sources=[Source(t) for t in texts])
    for j, words in enumerate(QUERIES):
        assert store.keyword_search("meaning", words, 10) == []  # no shared word
        by_vector = [h["id"] for h in store.search("meaning", near[j], 10)]
        by_hybrid = [h["id"] for h in hybrid_search(store, "meaning", near[j], words, 10)]
        assert by_vector[0] == ids[j] and by_hybrid == by_vector
    text_hit = store.keyword_search("meaning", "sourdough", 10, include=("text",))
    assert {h["id"] for h in text_hit} == {ids[i] for i in range(40) if i % len(TOPICS) == 1}
    assert all("sourdough" in h["text"] for h in text_hit)
    store.delete("meaning", ids[1])  # a deleted document leaves the keyword index too
    assert ids[1] not in {h["id"] for h in store.keyword_search("meaning", "sourdough", 10)}
    store.upsert("meaning", [ids[9]], vectors[9:10], sources=[Source("rye loaf")])  # replaced text
    assert ids[9] not in {h["id"] for h in store.keyword_search("meaning", "sourdough", 10)}
    assert [h["id"] for h in store.keyword_search("meaning", "rye", 10)] == [ids[9]]
    assert store.keyword_search("meaning", "  ", 10) == [] and store.keyword_search("meaning", '"*', 10) == []
