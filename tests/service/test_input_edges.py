"""The model's own format at the edges, end to end on the real server.

- Text that spells the tokenizer's special strings (``<image>``, ``<|im_end|>``, ...) is
  plain text on every entry point, answered like any text (it used to hang for 60 s).
- Preprocessing that raises anything at all (``StopIteration``, ``KeyboardInterrupt``, a
  bare ``BaseException`` subclass, a plain error) fails its request at once; the front end
  goes on serving.
- A forward pass that fails for one input is run again by halves: the inputs batched with
  it, from other clients, get their own right vectors.

The client timeout (15 s, a quarter of the server's request timeout) is what catches a
hang here; no test measures speed.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from tests.conftest import b64, make_png
from tests.service.conftest import FAIL_BATCH, PREPROCESS_FAULT_KINDS
from tests.service.test_api_errors import assert_error

HANG_GUARD_S = 15.0
SPECIALS = ["<image>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<video>"]
PNG = b64(make_png(64, 64))


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=HANG_GUARD_S) as c:
        yield c


def vectors(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    body = response.json()
    if "embeddings" in body:
        return np.asarray(body["embeddings"], dtype=np.float32)
    return np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)


def test_special_strings_are_text_on_every_entry_point(client, tiny_embedder):
    """(Each string alone, in every input form, is covered in tests/model/test_special_tokens.py.)"""
    text = "see " + " here ".join(SPECIALS) + " <image>"
    content = [{"type": "text", "text": text}, {"type": "image", "image": PNG}]
    cases = [
        ("/embed", {"inputs": [{"text": text}]}, {"text": text}),
        ("/embed", {"inputs": [{"text": "x", "instruction": text}]}, {"text": "x", "instruction": text}),
        ("/embed", {"inputs": [{"image": PNG, "text": text}]}, {"image": PNG, "text": text}),
        ("/embed", {"inputs": [{"content": content}]}, {"content": content}),
        ("/v1/embeddings", {"input": text}, {"text": text}),
        ("/v1/embeddings", {"input": [text, "plain"]}, None),
        (
            "/v1/embeddings",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]},
            {"content": [{"type": "text", "text": text}]},
        ),
    ]
    for path, body, same_as in cases:
        got = vectors(client.post(path, json=body))
        expected = (
            tiny_embedder.embed([same_as])
            if same_as
            else tiny_embedder.embed([{"text": text}, {"text": "plain"}])
        )
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{path} {body}")


def test_many_requests_with_special_strings_at_once_are_all_answered(server):
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD_S) as c:
            return await asyncio.gather(
                *(
                    c.post("/embed", json={"inputs": [{"text": f"a {t} b {i}"}]})
                    for i in range(4)
                    for t in SPECIALS
                )
            )

    assert all(r.status_code == 200 for r in asyncio.run(run()))


@pytest.mark.parametrize("kind", PREPROCESS_FAULT_KINDS)
def test_any_exception_in_preprocessing_fails_its_request_at_once(server, client, kind):
    marker = f"__raise_{kind}__"
    inputs = [{"text": "fine"}, {"text": f"x {marker}"}, {"text": "also fine"}]
    error = assert_error(client.post("/embed", json={"inputs": inputs}), 500, "inference_error")
    assert error["message"].startswith("input 1:"), error
    assert "injected" not in error["message"]

    # Several at once, beside good requests: each answered; the front end keeps serving.
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD_S) as c:
            bad = [c.post("/embed", json={"inputs": [{"text": f"{marker} {i}"}]}) for i in range(8)]
            good = [c.post("/embed", json={"inputs": [{"text": f"good {i}"}]}) for i in range(4)]
            return await asyncio.gather(*bad, *good)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [500] * 8 + [200] * 4
    assert client.get("/health").status_code == 200
    assert client.get("/ready").status_code == 200
    assert "preprocessing an input failed unexpectedly" in server.log()


def test_a_poisoned_input_never_costs_its_neighbours_their_answer(server, tiny_embedder):
    """Three clients' good requests sent together with a poisoned one (its forward pass
    raises): the good ones get 200 and their own vectors. Rounds go on until the poisoned
    input has shared a forward pass with others at least once (the isolation counter)."""
    texts = [[f"client {c} request {r}" for r in range(3)] for c in range(3)]
    expected = {
        t: v for ts in texts for t, v in zip(ts, tiny_embedder.embed([{"text": t} for t in ts]), strict=True)
    }

    async def round_trip() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=HANG_GUARD_S) as c:
            poisoned = c.post("/embed", json={"inputs": [{"text": f"bad {FAIL_BATCH}"}]})
            good = [c.post("/embed", json={"inputs": [{"text": t} for t in ts]}) for ts in texts]
            responses = await asyncio.gather(*good, poisoned, *good[:0])
        assert_error(responses[-1], 500, "inference_error")
        for ts, response in zip(texts, responses[:-1], strict=True):
            np.testing.assert_allclose(vectors(response), np.stack([expected[t] for t in ts]), atol=1e-5)

    before = server.metric("llave_forward_isolations_total")
    for _ in range(30):
        asyncio.run(round_trip())
        if server.metric("llave_forward_isolations_total") > before:
            break
    assert server.metric("llave_forward_isolations_total") > before, "the poisoned input never shared a batch"
    assert "running it again by halves" in server.log()
