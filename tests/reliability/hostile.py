"""Hostile requests: each case is (id, method, path, body bytes or JSON, content type, allowed statuses).

Shared by the fast test (``test_hostile_inputs.py``) and the soak runner
(``bench/reliability.py``). Statuses are the ones the server must answer; a 5xx is never one.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from tests.reliability.helpers import assert_clean_error

JSON = "application/json"


@dataclass(frozen=True)
class Case:
    id: str
    path: str
    body: Any  # bytes are sent as they are, anything else as JSON
    statuses: frozenset[int]
    content_type: str | None = JSON
    method: str = "POST"

    def content(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


def case(
    id: str, path: str, body: Any, *statuses: int, content_type: str | None = JSON, method: str = "POST"
) -> Case:
    return Case(id, path, body, frozenset(statuses), content_type, method)


# --- images --------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, pixels: bytes = b"") -> bytes:
    """A PNG whose header declares any size (even 0x0), with a tiny (or empty) pixel stream."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(pixels))
        + _chunk(b"IEND", b"")
    )


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (24, 24), (40 * i, 10, 200 - 30 * i)) for i in range(5)]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    return buf.getvalue()


def jpeg_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(width: int, height: int) -> bytes:
    screen = struct.pack("<HH", width, height) + b"\x00\x00\x00"
    image = b"," + struct.pack("<HHHH", 0, 0, width, height) + b"\x00"
    return b"GIF89a" + screen + image + b"\x02\x02D\x01\x00;"


def image_cases() -> list[tuple[str, bytes, frozenset[int]]]:
    """(name, bytes, statuses) with the server's ``--max-image-pixels 10000`` limit."""
    rgb = Image.new("RGB", (40, 30), (200, 10, 10))
    ok, bad, big = frozenset({200}), frozenset({422}), frozenset({413})
    png = encode(rgb, "PNG")
    return [
        ("bomb-png-100000x100000", png_declaring(100_000, 100_000, b"\0" * 1000), big),
        ("bomb-png-2^31x2^31", png_declaring(2**31 - 1, 2**31 - 1), big),
        ("bomb-jpeg-60000x60000", jpeg_declaring(60_000, 60_000), big),
        ("bomb-gif-65535x65535", gif_declaring(65_535, 65_535), big),
        (
            "bomb-tiff-g4-20000x20000",
            encode(Image.new("1", (20_000, 20_000)), "TIFF", compression="group4"),
            big,
        ),
        ("png-0x0", png_declaring(0, 0), bad),
        ("png-0x10", png_declaring(0, 10), bad),
        ("png-1x1", encode(Image.new("RGB", (1, 1)), "PNG"), ok),
        ("png-1x100-aspect-at-limit", encode(Image.new("RGB", (1, 100)), "PNG"), ok),
        ("png-1x101-aspect-over-limit", encode(Image.new("RGB", (1, 101)), "PNG"), bad),
        ("png-2x5000-extreme-aspect", encode(Image.new("RGB", (2, 5000)), "PNG"), bad),
        ("png-100x100-pixels-at-limit", encode(Image.new("RGB", (100, 100)), "PNG"), ok),
        ("png-101x100-pixels-over-limit", encode(Image.new("RGB", (101, 100)), "PNG"), big),
        ("gif-animated", animated("GIF"), ok),
        ("png-animated-apng", animated("PNG"), ok),
        ("webp-animated", animated("WEBP"), ok),
        ("jpeg-cmyk", encode(Image.new("CMYK", (30, 30), (0, 50, 100, 0)), "JPEG"), ok),
        ("png-16-bit-grey", encode(Image.new("I;16", (30, 30), 40000), "PNG"), ok),
        ("tiff-32-bit-int", encode(Image.new("I", (30, 30), 40000), "TIFF"), ok),
        ("tiff-float", encode(Image.new("F", (30, 30), -3.5), "TIFF"), ok),
        ("png-grey-alpha", encode(Image.new("LA", (30, 30)), "PNG"), ok),
        ("png-palette", encode(Image.new("P", (30, 30)), "PNG"), ok),
        ("png-1-bit", encode(Image.new("1", (30, 30)), "PNG"), ok),
        ("png-rgba", encode(Image.new("RGBA", (30, 30)), "PNG"), ok),
        ("bmp", encode(rgb, "BMP"), ok),
        ("ico", encode(rgb, "ICO"), ok),
        ("webp", encode(rgb, "WEBP"), ok),
        ("jpeg-truncated", encode(rgb, "JPEG")[:200], bad),
        ("png-truncated", png[:60], bad),
        ("png-cut-mid-pixels", png[: len(png) // 2], bad),
        ("eps-postscript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", bad),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', bad),
        ("pdf", b"%PDF-1.4\n%%EOF", bad),
        ("empty", b"", bad),
        ("zeros", b"\0" * 100, bad),
        ("png-signature-only", b"\x89PNG\r\n\x1a\n", bad),
    ]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- the cases -----------------------------------------------------------------------------


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


def hostile_cases(collection: str) -> list[Case]:
    """Every hostile request; ``collection`` already holds 2-d vectors (``a`` = [1, 0])."""
    search, docs = "/search", f"/collections/{collection}/documents"

    def vec(components: str, extra: bytes = b"") -> bytes:
        """A raw-vector search body, with raw JSON ``extra`` fields (``, "k": ...``)."""
        return (
            f'{{"collection": "{collection}", "query": {{"vector": [{components}]}}'.encode() + extra + b"}"
        )

    def up(doc_id: str, components: str) -> bytes:
        return f'{{"documents": [{{"id": "{doc_id}", "vector": [{components}]}}]}}'.encode()

    cases = [
        # structure and numbers
        case("nested-lists-100k", "/embed", b'{"inputs": ' + nested(100_000) + b"}", 400),
        case(
            "nested-objects-40k",
            "/embed",
            b'{"inputs": [{"text": "a"}], "x": ' + b'{"a":' * 40_000 + b"1" + b"}" * 40_000 + b"}",
            400,
        ),
        case(
            "nested-in-metadata-20k",
            docs,
            b'{"documents": [{"id": "n", "vector": [1, 0], "metadata": {"k": ' + nested(20_000) + b"}}]}",
            400,
        ),
        case("nested-in-filter-20k", search, vec("1, 0", b', "filter": {"k": ' + nested(20_000) + b"}"), 400),
        case("k-1e400", search, vec("1, 0", b', "k": 1e400'), 422),
        case("k-10^1000", search, vec("1, 0", b', "k": 1' + b"0" * 1000), 422),
        case("k-10^5000-digits-over-python-limit", search, vec("1, 0", b', "k": 1' + b"0" * 5000), 400),
        case("k-negative", search, vec("1, 0", b', "k": -1'), 422),
        case("k-fraction", search, vec("1, 0", b', "k": 1.5'), 422),
        case("k-over-max", search, vec("1, 0", b', "k": 100000'), 422),
        case("vector-1e400", docs, up("h1", "1e400, 1"), 422),
        case("vector-minus-1e400", search, vec("-1e400, 1"), 422),
        case("vector-10^1000-int", docs, up("h2", "1" + "0" * 1000 + ", 1"), 422),
        case("vector-1e39-float32-overflow", docs, up("h3", "1e39, 1"), 422),
        case("vector-NaN", docs, up("h4", "NaN, 1"), 400, 422),
        case("vector-Infinity", search, vec("Infinity, 1"), 400, 422),
        case("vector--Infinity", search, vec("-Infinity, 1"), 400, 422),
        case("vector-all-zero", search, vec("0, 0"), 422),
        case("vector-subnormal", search, vec("1e-45, 0"), 200, 422),
        case("vector-null-entry", search, vec("null, 0"), 422),
        case("vector-wrong-dim", search, vec("1, 0, 0"), 422),
        case("vector-70000-dims", docs, {"documents": [{"id": "h5", "vector": [1.0] * 70_000}]}, 413, 422),
        case(
            "metadata-NaN",
            docs,
            b'{"documents": [{"id": "h6", "vector": [1, 0], "metadata": {"k": NaN}}]}',
            400,
            422,
        ),
        case("filter-NaN", search, vec("1, 0", b', "filter": {"k": NaN}'), 400, 422),
        case("filter-huge-int", search, vec("1, 0", b', "filter": {"k": 1' + b"0" * 30 + b"}"), 422),
        case(
            "filter-33-fields",
            search,
            {
                "collection": collection,
                "query": {"vector": [1, 0]},
                "filter": {f"k{i}": 1 for i in range(33)},
            },
            422,
        ),
        case(
            "filter-1025-values",
            search,
            {"collection": collection, "query": {"vector": [1, 0]}, "filter": {"k": list(range(1025))}},
            422,
        ),
        # body encodings and shapes
        case("body-not-utf8", "/embed", b'{"inputs": [{"text": "\xff\xfe\xfa"}]}', 400),
        case("body-latin1", "/embed", '{"inputs": [{"text": "caf\xe9"}]}'.encode("latin-1"), 400),
        case("body-utf16", "/embed", '{"inputs": [{"text": "a"}]}'.encode("utf-16"), 200, 400),
        case("body-utf8-bom", "/embed", b'\xef\xbb\xbf{"inputs": [{"text": "a"}]}', 200, 400),
        case("body-trailing-garbage", "/embed", b'{"inputs": [{"text": "a"}]} }{', 400),
        case("body-truncated", "/embed", b'{"inputs": [{"text": "a"', 400),
        case("body-empty", "/embed", b"", 400, 422),
        case("body-null", "/embed", b"null", 422),
        case("body-array", "/embed", b"[]", 422),
        case("body-number", "/embed", b"123", 422),
        case("body-duplicate-keys", "/embed", b'{"inputs": [{"text": "a"}], "inputs": [{"text": "b"}]}', 200),
        case("body-over-limit", "/embed", {"inputs": [{"text": "x" * 310_000}]}, 413),
        case("body-nul-bytes", "/embed", b'{"inputs": [{"text": "a"}]}\x00\x00', 400),
        # content types
        case("ct-text-plain", "/embed", {"inputs": [{"text": "a"}]}, 415, content_type="text/plain"),
        case(
            "ct-form",
            "/embed",
            {"inputs": [{"text": "a"}]},
            415,
            content_type="application/x-www-form-urlencoded",
        ),
        case(
            "ct-multipart",
            "/embed",
            {"inputs": [{"text": "a"}]},
            415,
            content_type="multipart/form-data; boundary=x",
        ),
        case("ct-xml", "/search", {"query": {"vector": [1]}}, 415, content_type="application/xml"),
        case("ct-jsonx", "/embed", {"inputs": [{"text": "a"}]}, 415, content_type="application/jsonx"),
        case("ct-missing", docs, {"documents": [{"id": "c", "vector": [1, 0]}]}, 415, content_type=None),
        case(
            "ct-upper-case-json", "/embed", {"inputs": [{"text": "a"}]}, 200, content_type="APPLICATION/JSON"
        ),
        case(
            "ct-json-suffix",
            "/embed",
            {"inputs": [{"text": "a"}]},
            200,
            content_type="application/merge-patch+json",
        ),
        # text
        case("text-control-chars", "/embed", {"inputs": [{"text": "\x00\x01\x07\x1b[31m\x7f\x9f end"}]}, 200),
        case("text-only-nul", "/embed", {"inputs": [{"text": "\x00" * 64}]}, 200),
        case("text-bidi-zero-width", "/embed", {"inputs": [{"text": "\u202eabc\u200b\u200d\ufeff"}]}, 200),
        case("text-emoji-cjk", "/embed", {"inputs": [{"text": "日本語 🙂👩‍👩‍👧 𝔘𝔫𝔦"}]}, 200),
        case("text-lone-surrogate", "/embed", b'{"inputs": [{"text": "a\\ud800b"}]}', 422),
        case("text-lone-low-surrogate", "/v1/embeddings", b'{"input": "\\udfff"}', 422),
        case(
            "instruction-lone-surrogate",
            "/embed",
            b'{"inputs": [{"text": "a", "instruction": "\\udc00"}]}',
            422,
        ),
        case(
            "content-text-lone-surrogate",
            "/embed",
            b'{"inputs": [{"content": [{"type": "text", "text": "\\ud83d"}]}]}',
            422,
        ),
        case("document-text-lone-surrogate", docs, b'{"documents": [{"id": "s1", "text": "\\ud800"}]}', 422),
        case(
            "search-text-lone-surrogate",
            search,
            f'{{"collection": "{collection}", "query": {{"text": "\\ud800"}}}}'.encode(),
            422,
        ),
        case("id-lone-surrogate", docs, b'{"documents": [{"id": "\\ud800", "vector": [1, 0]}]}', 422),
        case(
            "metadata-lone-surrogate",
            docs,
            b'{"documents": [{"id": "s2", "vector": [1, 0], "metadata": {"k": "\\ud800"}}]}',
            422,
        ),
        case("filter-value-lone-surrogate", search, vec("1, 0", b', "filter": {"k": "\\ud800"}'), 422),
        case("filter-key-lone-surrogate", search, vec("1, 0", b', "filter": {"\\ud800": 1}'), 422),
        case(
            "collection-lone-surrogate",
            search,
            b'{"collection": "\\ud800", "query": {"vector": [1, 0]}}',
            422,
        ),
        case("existing-lone-surrogate", f"/collections/{collection}/existing", b'{"ids": ["\\ud800"]}', 422),
        case("image-lone-surrogate", "/embed", b'{"inputs": [{"image": "\\ud800"}]}', 422),
        case("model-lone-surrogate", "/v1/embeddings", b'{"input": "a", "model": "\\ud800"}', 404),
        # ids, names, metadata at and over their limits
        case("id-512-chars", docs, {"documents": [{"id": "i" * 512, "vector": [1, 0]}]}, 200),
        case("id-513-chars", docs, {"documents": [{"id": "i" * 513, "vector": [1, 0]}]}, 422),
        case("id-512-emoji", docs, {"documents": [{"id": "🙂" * 512, "vector": [0, 1]}]}, 200),
        case("id-control-char", docs, {"documents": [{"id": "a\x00b", "vector": [1, 0]}]}, 422),
        case("id-empty", docs, {"documents": [{"id": "", "vector": [1, 0]}]}, 422),
        case("id-not-string", docs, {"documents": [{"id": 7, "vector": [1, 0]}]}, 422),
        case("ids-10001", f"/collections/{collection}/existing", {"ids": ["a"] * 10_001}, 422),
        case(
            "metadata-at-limit",
            docs,
            {"documents": [{"id": "m1", "vector": [1, 0], "metadata": {"k": "v" * (65536 - 8)}}]},
            200,
        ),
        case(
            "metadata-over-limit",
            docs,
            {"documents": [{"id": "m2", "vector": [1, 0], "metadata": {"k": "v" * (65536 - 7)}}]},
            422,
        ),
        case(
            "metadata-not-object",
            docs,
            {"documents": [{"id": "m3", "vector": [1, 0], "metadata": [1, 2]}]},
            422,
        ),
        case(
            "metadata-4000-digit-int",
            docs,
            b'{"documents": [{"id": "m4", "vector": [1, 0], "metadata": {"k": ' + b"9" * 4000 + b"}}]}",
            200,
            422,
        ),
        case(
            "collection-name-128",
            "/collections/" + "c" * 128 + "/documents",
            {"documents": [{"id": "a", "vector": [1, 0]}]},
            200,
        ),
        case(
            "collection-name-129",
            "/collections/" + "c" * 129 + "/documents",
            {"documents": [{"id": "a", "vector": [1, 0]}]},
            422,
        ),
        case(
            "collection-name-unicode",
            "/collections/%C3%A9t%C3%A9/documents",
            {"documents": [{"id": "a", "vector": [1, 0]}]},
            422,
        ),
        case("document-empty-content", docs, {"documents": [{"id": "e1", "content": []}]}, 422),
        case("document-empty-text", docs, {"documents": [{"id": "e2", "text": ""}]}, 422),
        case(
            "document-text-and-content",
            docs,
            {"documents": [{"id": "e3", "text": "a", "content": [{"type": "text", "text": "b"}]}]},
            422,
        ),
        case("put-dim-0", f"/collections/{collection}-new", {"dim": 0}, 422, method="PUT"),
        case("put-dim-huge", f"/collections/{collection}-new", {"dim": 10**30}, 422, method="PUT"),
        case(
            "put-option-bool",
            f"/collections/{collection}-new",
            {"dim": 4, "index": "hnsw", "options": {"m": True}},
            422,
            method="PUT",
        ),
        case(
            "put-option-unknown",
            f"/collections/{collection}-new",
            {"dim": 4, "index": "hnsw", "options": {"evil": 1}},
            422,
            method="PUT",
        ),
    ]
    for name, data, statuses in image_cases():
        cases.append(Case(f"image-{name}", "/embed", {"inputs": [{"image": b64(data)}]}, statuses))
    # the same images through the other routes that take inputs (a sample)
    for name, data, statuses in image_cases()[::5]:
        cases.append(
            Case(
                f"openai-image-{name}",
                "/v1/embeddings",
                {"input": [{"image": "data:image/png;base64," + b64(data)}]},
                statuses,
            )
        )
        doc = {
            "documents": [
                {
                    "id": f"img-{name}",
                    "content": [{"type": "image", "image": b64(data)}, {"type": "text", "text": "x"}],
                }
            ]
        }
        cases.append(Case(f"upsert-image-{name}", f"/collections/{collection}-img/documents", doc, statuses))
    return cases


def check_case(client: httpx.Client, case: Case, public: tuple[str, ...] = ()) -> int:
    """Send one case: its expected status, a clean error body, and the server still alive."""
    headers = {"content-type": case.content_type} if case.content_type else {}
    response = client.request(case.method, case.path, content=case.content(), headers=headers)
    assert response.status_code in case.statuses, (case.id, response.status_code, response.text[:300])
    if response.status_code >= 400:
        assert_clean_error(response, public=public)
    else:
        assert response.json()
    health = client.get("/health")
    assert health.status_code == 200, (case.id, health.text)
    return response.status_code
