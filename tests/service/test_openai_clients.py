"""The OpenAI-API clients people use, against a real server: vLLM's chat form, the official
OpenAI client, LangChain's ``OpenAIEmbeddings``; and what a client that sends token ids is told.

LangChain's default path tokenises with tiktoken, whose vocabulary is downloaded on first
use; offline, ``test_langchain_default_path_is_told_to_send_text`` gives tiktoken a
byte-level vocabulary built locally (a real ``tiktoken.Encoding``), so the real LangChain
code builds and sends its real token-id request; only the vocabulary differs.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import b64, make_png
from tests.service.test_api_errors import assert_error

openai = pytest.importorskip("openai")

PNG = b64(make_png(24, 16, (30, 160, 50)))
DATA_URI = "data:image/png;base64," + PNG


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def model_name(server):
    with server.client() as c:
        return c.get("/v1/models").json()["data"][0]["id"]


def embed(client, inputs) -> np.ndarray:
    response = client.post("/embed", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"], dtype=np.float64)


def chat(client, content, **extra) -> np.ndarray:
    body = {"messages": [{"role": "user", "content": content}], **extra}
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert len(data) == 1 and data[0]["index"] == 0  # the chat form is one input: one vector
    return np.asarray(data[0]["embedding"], dtype=np.float64)


def assert_same_vector(a: np.ndarray, b: np.ndarray) -> None:
    # Unit vectors: the same input embedded in a different batch may differ in the last bits.
    assert a.shape == b.shape
    assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, float(np.max(np.abs(b))))


# --- vLLM's chat form --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parts",
    [
        [("image", None), ("text", "Represent the given image.")],
        [("text", "Compare "), ("image", None), ("text", " with a red square.")],
        [("text", "only text")],
        [("image", None)],
    ],
)
def test_chat_form_equals_the_content_input(client, parts):
    chat_parts = [
        {"type": "text", "text": v} if k == "text" else {"type": "image_url", "image_url": {"url": DATA_URI}}
        for k, v in parts
    ]
    content_parts = [
        {"type": "text", "text": v} if k == "text" else {"type": "image", "image": DATA_URI} for k, v in parts
    ]
    expected = embed(client, [{"content": content_parts}])[0]
    assert_same_vector(chat(client, chat_parts), expected)


def test_chat_form_with_string_content_equals_the_text(client):
    assert_same_vector(chat(client, "a red circle"), embed(client, [{"text": "a red circle"}])[0])


def test_chat_form_image_as_bare_base64_and_detail(client):
    parts = [{"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]
    assert_same_vector(
        chat(client, parts), embed(client, [{"content": [{"type": "image", "image": PNG}]}])[0]
    )


def test_chat_form_is_not_the_shorthand(client):
    """The chat form is the interleaved prompt; the shorthand {image, text} is MMEB's layout
    (image on its own line), a different prompt, so a different vector: this is what makes
    the equality tests above able to fail."""
    parts = [{"type": "image_url", "image_url": {"url": DATA_URI}}, {"type": "text", "text": "a cat"}]
    shorthand = embed(client, [{"image": DATA_URI, "text": "a cat"}])[0]
    assert np.max(np.abs(chat(client, parts) - shorthand)) > 1e-4


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "user"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "messages",
            "exactly one user message",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "messages[0].content[0]",
            "image_url",
        ),
        ({"messages": [{"role": "user", "content": []}]}, "messages", "empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": DATA_URI}]}]},
            "messages[0].content[0].image_url",
            "object",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}], "chat_template": "{{x}}"},
            "chat_template",
            "field",
        ),
        ({"input": "a", "messages": [{"role": "user", "content": "a"}]}, "", "either 'input' or 'messages'"),
        ({}, "", "either 'input' or 'messages'"),
    ],
)
def test_chat_forms_that_do_not_map_are_refused_naming_the_field(client, body, field, words):
    error = assert_error(client.post("/v1/embeddings", json=body), 422, "invalid_request")
    assert error["message"].startswith(field or "the body"), error
    assert words in error["message"], error


def test_official_openai_client_chat_form_through_extra_body(server, client, model_name):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": DATA_URI}},
                {"type": "text", "text": "Represent the given image."},
            ],
        }
    ]
    # The client asks for base64 by default and decodes it: the vector must survive that too.
    response = oa.embeddings.create(
        model=model_name, input=getattr(openai, "omit", openai.NOT_GIVEN), extra_body={"messages": messages}
    )
    got = np.asarray(response.data[0].embedding, dtype=np.float64)
    content = [{"type": "image", "image": DATA_URI}, {"type": "text", "text": "Represent the given image."}]
    assert_same_vector(got, embed(client, [{"content": content}])[0])
    plain = oa.embeddings.create(model=model_name, input=["a red circle", "a blue star"])
    expected = embed(client, [{"text": "a red circle"}, {"text": "a blue star"}])
    for row, item in zip(expected, plain.data, strict=True):
        assert_same_vector(np.asarray(item.embedding), row)


# --- token ids -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[1, 2, 3], [[1, 2, 3]], [[5, 6], [7]]])
def test_token_ids_are_refused_with_the_reason_and_the_fix(client, ids):
    error = assert_error(client.post("/v1/embeddings", json={"input": ids}), 422, "invalid_request")
    message = error["message"]
    assert message.startswith("input ")
    assert "token ids" in message and "check_embedding_ctx_length=False" in message
    assert "union" not in message and "Input should" not in message


# --- every 422 names the field in one sentence --------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "start"),
    [
        ("/v1/embeddings", {"input": [{"text": 5}]}, "input[0].text must be a string, got 5"),
        ("/v1/embeddings", {"input": 5}, "input must be a string, got 5"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int4"}, "encoding_format must be 'float',"),
        ("/embed", {"inputs": [{"text": "a", "colour": "red"}]}, "inputs[0].colour is not a field"),
        ("/embed", {"inputs": [{"content": [{"type": "audio"}]}]}, "inputs[0].content[0] has type 'audio'"),
        ("/embed", {"inputs": [{"content": [{"type": "video"}]}]}, "inputs[0].content[0].video is required"),
        (
            "/embed",
            {"inputs": [{"content": [{"type": "text", "text": 5}]}]},
            "inputs[0].content[0].text must",
        ),
        ("/embed", {"inputs": [{"content": [{"type": "image"}]}]}, "inputs[0].content[0].image is required"),
        ("/embed", {"inputs": "just a string"}, "inputs must be a list"),
        ("/embed", {"inputs": [{"text": "a"}], "normalize": "yes"}, "normalize must be true or false"),
        ("/embed", {}, "inputs is required"),
        ("/search", {"query": {"text": 3}}, "query.text must be a string, got 3"),
        ("/search", {"query": {"vector": [1, 0]}, "k": 0}, "k must be greater than or equal to 1"),
    ],
)
def test_validation_messages_name_the_field_and_what_was_expected(client, path, body, start):
    error = assert_error(client.post(path, json=body), 422, "invalid_request")
    message = error["message"]
    assert message.startswith(start), message
    assert "Input should" not in message and "function-after" not in message and "union[" not in message
    assert message.count(";") <= 1 and "\n" not in message


# --- LangChain ------------------------------------------------------------------------------------


def test_langchain_embeds_documents_and_queries_like_embed(server, client, model_name):
    langchain_openai = pytest.importorskip("langchain_openai")
    embeddings = langchain_openai.OpenAIEmbeddings(
        model=model_name,
        base_url=server.url + "/v1",
        api_key="unused",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    texts = ["a red circle", "a blue star", "un carré vert"]
    documents = np.asarray(embeddings.embed_documents(texts), dtype=np.float64)
    expected = embed(client, [{"text": t} for t in texts])
    assert documents.shape == expected.shape
    for got, want in zip(documents, expected, strict=True):
        assert_same_vector(got, want)
    assert_same_vector(np.asarray(embeddings.embed_query("a red circle")), expected[0])


def test_langchain_default_path_is_told_to_send_text(server, model_name, monkeypatch):
    langchain_openai = pytest.importorskip("langchain_openai")
    tiktoken = pytest.importorskip("tiktoken")
    from langchain_openai.embeddings import base

    # tiktoken's real vocabularies are downloaded on first use: a byte-level one, built here.
    byte_level = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )
    monkeypatch.setattr(base.tiktoken, "encoding_for_model", lambda name: byte_level)
    monkeypatch.setattr(base.tiktoken, "get_encoding", lambda name: byte_level)
    embeddings = langchain_openai.OpenAIEmbeddings(
        model=model_name, base_url=server.url + "/v1", api_key="unused", max_retries=0
    )
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        embeddings.embed_documents(["a red circle"])
    error = caught.value.body if isinstance(caught.value.body, dict) else {}
    message = (error.get("error") or error).get("message", str(caught.value))
    assert "token ids" in message and "check_embedding_ctx_length=False" in message
