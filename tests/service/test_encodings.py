"""Output encodings (service/http/encodings.py): each checked against a reference written
here bit by bit or with torch's own bfloat16, then end to end on the real server."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch

from service.http.encodings import encode


def _vectors(dim: int, n: int = 5, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    x[0, :3] = 0.0  # zeros are not positive: bit 0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bits_reference(row: np.ndarray) -> list[int]:
    """Bytes of sign bits, first dimension in the highest bit, zero-padded: by hand."""
    out = []
    for start in range(0, len(row), 8):
        byte = 0
        for j, value in enumerate(row[start : start + 8]):
            if value > 0:
                byte |= 1 << (7 - j)
        out.append(byte)
    return out


@pytest.mark.parametrize("dim", [13, 64, 896])
def test_binary_and_ubinary_pack_sign_bits(dim):
    x = _vectors(dim)
    ubinary, binary = encode(x, "ubinary"), encode(x, "binary")
    for row, u, b in zip(x, ubinary, binary, strict=True):
        assert u == _bits_reference(row)
        assert b == [v - 128 for v in u] and min(b) >= -128 and max(b) <= 127
        assert len(u) == -(-dim // 8)
    # Hamming distance between the bits ranks neighbours like the angle does (roughly)
    bits = np.unpackbits(np.array(ubinary, np.uint8), axis=1)[:, :dim]
    assert (bits == (x > 0)).all()


@pytest.mark.parametrize("dim", [13, 896])
def test_int8_and_uint8_scale_each_vector_to_127(dim):
    x = _vectors(dim) * np.array([[1.0], [3.0], [0.01], [1.0], [1.0]], np.float32)  # scale-free
    codes = np.array(encode(x, "int8"))
    unsigned = np.array(encode(x, "uint8"))
    assert (np.abs(codes).max(axis=1) == 127).all()
    assert (unsigned == codes + 128).all() and unsigned.min() >= 0 and unsigned.max() <= 255
    peak = np.abs(x).max(axis=1, keepdims=True)
    assert np.abs(codes - 127 * x / peak).max() <= 0.5 + 1e-6  # rounding only
    restored = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    cosine = (restored * (x / np.linalg.norm(x, axis=1, keepdims=True))).sum(axis=1)
    assert cosine.min() > 0.999
    assert encode(np.zeros((1, 4), np.float32), "int8") == [[0, 0, 0, 0]]  # no division by zero


def test_base64_and_dtypes_round_trip():
    x = _vectors(896)
    decoded = [np.frombuffer(base64.b64decode(s), "<f4") for s in encode(x, "base64")]
    np.testing.assert_array_equal(np.stack(decoded), x)
    half = [np.frombuffer(base64.b64decode(s), "<f2") for s in encode(x, "base64", "float16")]
    np.testing.assert_array_equal(np.stack(half), x.astype(np.float16))
    reference = torch.from_numpy(x).to(torch.bfloat16)  # torch's own rounding to bfloat16
    bf16 = [np.frombuffer(base64.b64decode(s), "<u2") for s in encode(x, "base64", "bfloat16")]
    np.testing.assert_array_equal(np.stack(bf16), reference.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(
        np.array(encode(x, "float", "bfloat16"), np.float32), reference.float().numpy()
    )
    np.testing.assert_array_equal(np.array(encode(x, "float", "float16"), np.float32), x.astype(np.float16))


def test_every_encoding_over_http(server):
    texts = ["a photo of a cat", "a red square", "x"]
    with server.client() as client:
        floats = np.array(
            client.post("/embed", json={"inputs": [{"text": t} for t in texts]}).json()["embeddings"]
        )
        for fmt in ("base64", "int8", "uint8", "binary", "ubinary"):
            r = client.post("/embed", json={"inputs": [{"text": t} for t in texts], "encoding_format": fmt})
            assert r.status_code == 200, r.text
            assert r.json()["embeddings"] == encode(floats.astype(np.float32), fmt)
            r = client.post("/v1/embeddings", json={"input": texts, "encoding_format": fmt})
            assert r.status_code == 200, r.text
            assert [d["embedding"] for d in r.json()["data"]] == encode(floats.astype(np.float32), fmt)
        r = client.post(
            "/embed", json={"inputs": [{"text": "x"}], "encoding_format": "base64", "embed_dtype": "float16"}
        )
        assert np.frombuffer(base64.b64decode(r.json()["embeddings"][0]), "<f2").shape == (floats.shape[1],)
        for bad in ({"encoding_format": "int4"}, {"embed_dtype": "fp8"}, {"encoding_format": 1}):
            r = client.post("/embed", json={"inputs": [{"text": "x"}], **bad})
            assert r.status_code == 422 and r.json()["error"]["type"]
