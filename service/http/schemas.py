"""Request and response bodies (pydantic). Unknown fields are refused, types are strict:
every request model is ``Strict``, so a number given as ``"1"`` or ``true`` (a vector
component, ``k``, ``dim``) or a boolean given as ``"true"`` is a 422, never coerced.

Only the shape is checked here; limits that depend on settings (inputs per request,
images, pixels, tokens) are enforced by the routes and the model core.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service import limits
from service.http.encodings import EmbedDtype, EncodingFormat
from service.storage import sources as source_limits


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# --- inputs ----------------------------------------------------------------------------


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image"]
    image: str = Field(description="Base64 image bytes, a data: URI, or an allow-listed http(s) URL.")


VIDEO_DESCRIPTION = (
    "Base64 video bytes (MP4/MOV, WebM/Matroska, AVI or MPEG-TS), a data: URI, or an "
    "allow-listed http(s) URL. Embedded as the LLaVE authors embed a clip: up to 32 frames "
    "(3 a second), all under one <image> place."
)


class VideoPart(Strict):
    type: Literal["video"]
    video: str = Field(description=VIDEO_DESCRIPTION)


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


class InputObject(Strict):
    """Shorthand ``{text?, image? | video?, instruction?}`` or interleaved ``{content, instruction?}``."""

    text: str | None = None
    image: str | None = Field(
        None, description="Base64 image bytes, a data: URI, or an allow-listed http(s) URL."
    )
    video: str | None = Field(None, description=VIDEO_DESCRIPTION)
    instruction: str | None = Field(None, description="Task instruction, put before the text.")
    content: list[ContentPart] | None = Field(
        None, description="Interleaved text, image and video parts, in order."
    )

    @model_validator(mode="after")
    def _one_shape(self) -> InputObject:
        if self.content is not None:
            if self.text is not None or self.image is not None or self.video is not None:
                raise ValueError("give either 'content' or 'text'/'image'/'video', not both")
            if not self.content:
                raise ValueError("'content' is empty")
        elif self.image is not None and self.video is not None:
            raise ValueError("give 'image' or 'video', not both (a 'content' list can hold both)")
        elif self.image is None and self.video is None and not self.text and not self.instruction:
            raise ValueError("input is empty: give text, an image, a video or content parts")
        return self

    def to_input(self) -> dict[str, Any]:
        """The plain dict the model core takes."""
        return self.model_dump(exclude_none=True)


# --- /embed ----------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens embedded, image tokens included.")
    total_tokens: int
    images: int = 0
    videos: int = 0
    truncated: int = Field(0, description="Inputs cut to the model's maximum length.")


ENCODING_DESCRIPTION = (
    "float: numbers; base64: little-endian bytes of embed_dtype; int8: round(127 * v / max|v|) "
    "per vector; uint8: int8 + 128; binary: sign bits (1 where > 0) packed 8 per byte, first "
    "dimension highest, as byte - 128 (sentence-transformers, Cohere); ubinary: the same bytes "
    "unsigned. Details: service/http/encodings.py."
)
DTYPE_DESCRIPTION = "float32, float16 or bfloat16: the values of float and the bytes of base64 (vLLM)."


class EmbedRequest(Strict):
    inputs: list[InputObject] = Field(min_length=1)
    normalize: bool = Field(True, description="L2-normalise (false: the pooled hidden state as is).")
    truncate: bool = Field(True, description="Cut over-long inputs (false: refuse them with 413).")
    encoding_format: EncodingFormat = Field("float", description=ENCODING_DESCRIPTION)
    embed_dtype: EmbedDtype = Field("float32", description=DTYPE_DESCRIPTION)


class EmbedResponse(BaseModel):
    embeddings: list[list[float]] | list[list[int]] | list[str]
    model: str
    dim: int
    usage: Usage


# --- /v1/embeddings (OpenAI) -----------------------------------------------------------


TOKEN_IDS_MESSAGE = (
    "token ids are not accepted: ids from another tokenizer (an OpenAI client's tiktoken) mean "
    "nothing to LLaVE, so send the text itself (LangChain: OpenAIEmbeddings(..., "
    "check_embedding_ctx_length=False))"
)


def _is_token_ids(value: Any) -> bool:
    """``[1, 2, 3]`` or ``[[1, 2], [3]]``: what OpenAI clients send after tokenising."""

    def ints(items: Any) -> bool:
        return isinstance(items, list) and bool(items) and all(type(i) is int for i in items)

    return ints(value) or (isinstance(value, list) and bool(value) and all(ints(v) for v in value))


class ChatImageURL(Strict):
    url: str = Field(description="A data: URI, base64 image bytes, or an allow-listed http(s) URL.")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="Accepted and ignored.")


class ChatTextPart(Strict):
    type: Literal["text"]
    text: str


class ChatImagePart(Strict):
    type: Literal["image_url"]
    image_url: ChatImageURL


class ChatVideoURL(Strict):
    url: str = Field(
        description="A data: URI (data:video/mp4;base64,...), base64 video bytes, or an allow-listed http(s) URL."
    )


class ChatVideoPart(Strict):
    type: Literal["video_url"]
    video_url: ChatVideoURL


ChatPart = Annotated[ChatTextPart | ChatImagePart | ChatVideoPart, Field(discriminator="type")]


class ChatMessage(Strict):
    """One user turn of vLLM's chat form; its parts become an interleaved ``content`` input."""

    role: str
    content: str | list[ChatPart]

    @field_validator("role")
    @classmethod
    def _user_only(cls, value: str) -> str:
        if value != "user":
            raise ValueError(
                f"must be 'user', not {value!r}: LLaVE embeds one user turn under its own fixed system prompt"
            )
        return value

    def to_input(self) -> dict[str, Any]:
        if isinstance(self.content, str):
            return {"content": [{"type": "text", "text": self.content}]}
        return {"content": [_chat_part(part) for part in self.content]}


def _chat_part(part: ChatTextPart | ChatImagePart | ChatVideoPart) -> dict[str, str]:
    if isinstance(part, ChatTextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ChatVideoPart):
        return {"type": "video", "video": part.video_url.url}
    return {"type": "image", "image": part.image_url.url}


class OpenAIEmbeddingRequest(Strict):
    input: str | list[str | InputObject] | None = Field(
        None, description="A string, a list of strings, or a list of input objects (also mixed)."
    )
    messages: list[ChatMessage] | None = Field(
        None,
        description="vLLM's chat form instead of 'input': one user message whose content is a string "
        "or text, image_url and video_url parts; embedded as the same interleaved 'content' input "
        "(one vector).",
    )
    model: str | None = Field(None, description="Optional; must name the served model if given.")
    encoding_format: EncodingFormat = Field(
        "float", description="base64: each vector as little-endian float32 bytes. " + ENCODING_DESCRIPTION
    )
    embed_dtype: EmbedDtype = Field("float32", description=DTYPE_DESCRIPTION)
    dimensions: int | None = Field(None, description="Optional; must equal the model's dimension.")
    user: str | None = Field(None, description="Accepted for compatibility and ignored.")

    @field_validator("input", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        if _is_token_ids(value):
            raise ValueError(TOKEN_IDS_MESSAGE)
        return value

    @field_validator("messages")
    @classmethod
    def _one_user_message(cls, value: list[ChatMessage] | None) -> list[ChatMessage] | None:
        if value is not None and len(value) != 1:
            raise ValueError(f"give exactly one user message (LLaVE embeds one user turn), not {len(value)}")
        if value and isinstance(value[0].content, list) and not value[0].content:
            raise ValueError("the message's content is empty")
        return value

    @model_validator(mode="after")
    def _input_or_messages(self) -> OpenAIEmbeddingRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError(
                "give either 'input' or 'messages' (the chat form), not both or neither "
                "(with the OpenAI client: input=openai.omit, extra_body={'messages': [...]})"
            )
        return self

    def to_inputs(self) -> list[dict[str, Any]]:
        if self.messages is not None:
            return [message.to_input() for message in self.messages]
        items = [self.input] if isinstance(self.input, str) else (self.input or [])
        return [{"text": item} if isinstance(item, str) else item.to_input() for item in items]


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | list[int] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llave-server"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


# --- errors and probes -----------------------------------------------------------------


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class DeviceStatus(BaseModel):
    engine: int = Field(description="The engine's index (one engine process per device).")
    device: str = Field(description="Its device: cuda:0, cpu...")
    status: str = Field(description="starting, loading, warming, ready, dead, restarting, failed or stopped.")


class ProbeResponse(BaseModel):
    status: str
    devices: list[DeviceStatus] = Field(default_factory=list, description="Each engine's state.")
    error: ErrorDetail | None = None


# --- documentation examples ------------------------------------------------------------

PNG_8X8 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAIAAABLbSncAAAAFUlEQVR42mM8ISfHgA0wMeAAg1MCANDKARQfGKMRAAAAAElFTkSuQmCC"
)

EMBED_EXAMPLES: dict[str, dict[str, Any]] = {
    "text": {"summary": "One text", "value": {"inputs": [{"text": "a photo of a cat"}]}},
    "image": {"summary": "An image (base64 PNG)", "value": {"inputs": [{"image": PNG_8X8}]}},
    "image_text": {
        "summary": "Image and text with an instruction",
        "value": {
            "inputs": [
                {
                    "image": PNG_8X8,
                    "text": "What is in the image",
                    "instruction": "Represent the given image with the following question:",
                }
            ]
        },
    },
    "interleaved": {
        "summary": "Interleaved content",
        "value": {
            "inputs": [
                {
                    "content": [
                        {"type": "text", "text": "Compare "},
                        {"type": "image", "image": PNG_8X8},
                        {"type": "text", "text": " with a red square."},
                    ]
                }
            ],
            "normalize": True,
            "truncate": True,
        },
    },
}

OPENAI_EXAMPLES: dict[str, dict[str, Any]] = {
    "string": {"summary": "One string", "value": {"input": "a photo of a cat"}},
    "strings": {
        "summary": "Several strings, base64 output",
        "value": {"input": ["a cat", "a dog"], "encoding_format": "base64"},
    },
    "objects": {
        "summary": "Input objects (images)",
        "value": {"input": [{"image": PNG_8X8}, {"text": "a red square"}]},
    },
    "chat": {
        "summary": "vLLM's chat form (one vector)",
        "value": {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_8X8}},
                        {"type": "text", "text": "Represent the given image."},
                    ],
                }
            ]
        },
    },
}


# --- collections and search --------------------------------------------------------------

MetadataValue = str | int | float | bool | None


class DocumentIn(Strict):
    """A document: an ``id``, optional ``metadata``, and either a raw ``vector`` or the
    fields of an input object (embedded through the same batcher as ``/embed``)."""

    id: str = Field(min_length=1, max_length=limits.MAX_ID_CHARS)
    metadata: dict[str, Any] | None = None
    vector: list[float] | None = Field(None, description="A precomputed embedding (normalised on upsert).")
    text: str | None = None
    image: str | None = Field(None, description="Base64 image bytes, a data: URI, or an allow-listed URL.")
    video: str | None = Field(None, description=VIDEO_DESCRIPTION)
    instruction: str | None = None
    content: list[ContentPart] | None = None

    @model_validator(mode="after")
    def _vector_or_input(self) -> DocumentIn:
        has_input = any(v is not None for v in (self.text, self.image, self.video, self.content)) or bool(
            self.instruction
        )
        if self.vector is not None and has_input:
            raise ValueError(f"document {self.id!r}: give either 'vector' or input fields, not both")
        if self.vector is None and not has_input:
            raise ValueError(
                f"document {self.id!r}: give a 'vector' or input fields (text, image, video, content)"
            )
        if self.vector is not None and not self.vector:
            raise ValueError(f"document {self.id!r}: 'vector' is empty")
        if self.vector is None:
            # Check the input's shape here, as /embed does: found later it would be a 500.
            try:
                self.to_input()
            except ValidationError as exc:
                reasons = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in exc.errors())
                raise ValueError(f"document {self.id!r}: {reasons}") from None
        return self

    def to_input(self) -> dict[str, Any]:
        return InputObject.model_validate(
            self.model_dump(include={"text", "image", "video", "instruction", "content"}, exclude_none=True)
        ).to_input()


class UpsertRequest(Strict):
    documents: list[DocumentIn] = Field(min_length=1)
    truncate: bool = Field(True, description="Cut over-long inputs (false: refuse them with 413).")


class UpsertResponse(BaseModel):
    collection: str
    ids: list[str]
    count: int = Field(description="Documents in the collection after the upsert.")


class CreateCollectionRequest(Strict):
    dim: int | None = Field(
        None, ge=1, le=limits.MAX_DIM, description="Defaults to the served model's dimension."
    )
    index: Literal["flat", "hnsw", "ivf"] = "flat"
    options: dict[str, Any] | None = Field(
        None,
        description="hnsw: m, ef_search, ef_construction; ivf: nlist, nprobe, min_train; both: "
        "precision ('float32'; 'sq8' on the embedded store, 'halfvec' on PostgreSQL: the index "
        "ranks in reduced precision, the top candidates are rescored exactly).",
    )
    store_source: bool | None = Field(
        None,
        description="Keep each document's text and image thumbnails (default true). Unlike the "
        "index options, the source options of an existing collection can be changed.",
    )
    thumbnail_size: int | None = Field(
        None,
        ge=source_limits.MIN_THUMBNAIL_SIZE,
        le=source_limits.MAX_THUMBNAIL_SIZE,
        description=f"Longest side of a thumbnail in pixels (default "
        f"{source_limits.SOURCE_DEFAULTS['thumbnail_size']}); smaller images are not enlarged.",
    )
    thumbnail_format: Literal["webp", "jpeg"] | None = Field(None, description="Default webp.")
    indexes: dict[str, Literal["keyword", "integer", "float", "datetime"]] | None = Field(
        None,
        max_length=limits.MAX_PAYLOAD_INDEXES,
        description="Payload indexes: the metadata keys filters use, with their type, e.g. "
        '{"kind": "keyword", "price": "float", "date": "datetime"} (ISO 8601 strings). A filter on '
        "an indexed key reads only the matching documents; other keys are filtered by a scan. "
        "Replaces the collection's declaration; new indexes are built in the background.",
    )

    def source_options(self) -> dict[str, Any]:
        return self.model_dump(
            include={"store_source", "thumbnail_size", "thumbnail_format"}, exclude_none=True
        )


class CollectionInfo(BaseModel):
    name: str
    count: int
    dim: int
    index: str
    created_at: float | None = None
    store_source: bool = Field(description="Whether new documents keep their text and thumbnails.")
    thumbnail_size: int
    thumbnail_format: Literal["webp", "jpeg"]
    indexes: dict[str, str] = Field(default_factory=dict, description="Payload indexes: key -> type.")
    indexing: list[str] = Field(default_factory=list, description="Payload indexes still being built.")


class CollectionList(BaseModel):
    collections: list[CollectionInfo]


class DocumentOut(BaseModel):
    id: str
    metadata: dict[str, Any] | None = None
    created_at: float
    updated_at: float
    vector: list[float] | None = None


class VideoSource(BaseModel):
    thumbnail: int = Field(description="Index of the video's poster-frame thumbnail.")
    seconds: float = Field(description="The video's duration.")


class DocumentDetail(DocumentOut):
    text: str | None = Field(
        None, description="The input's text parts joined with newlines (null: none, or not kept)."
    )
    thumbnails: int = Field(
        0,
        description="Thumbnails kept, one per image or video of the input (a video's: its first "
        "frame): GET .../thumbnail?index=i.",
    )
    videos: list[VideoSource] = Field(
        default_factory=list,
        description="The thumbnails that are videos' posters, with the videos' durations.",
    )


class DocumentPage(BaseModel):
    documents: list[DocumentOut]
    next_cursor: str | None = Field(
        None, description="Pass as ?cursor= for the next page; null on the last page."
    )


class Deleted(BaseModel):
    deleted: str


class IdsRequest(Strict):
    ids: list[str] = Field(min_length=1, max_length=limits.MAX_IDS_PER_LOOKUP)


class IdsResponse(BaseModel):
    existing: list[str]


class VectorQuery(Strict):
    vector: list[float] = Field(min_length=1)


class HybridWeights(Strict):
    vector: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)
    keyword: float = Field(1.0, ge=0, le=100, allow_inf_nan=False)


class SearchInput(InputObject):
    """An input object to search with, and how: by its embedding, by its text's words, or both."""

    mode: Literal["vector", "keyword", "hybrid"] = Field(
        "vector",
        description="vector: nearest embeddings; keyword: the stored texts holding the query's words, "
        "ranked by BM25 (embedded) or ts_rank_cd (PostgreSQL); hybrid: both rankings fused by "
        "reciprocal rank fusion, score = w_vector / (60 + rank) + w_keyword / (60 + rank).",
    )
    weights: HybridWeights | None = Field(None, description="hybrid: the two rankings' weights (1, 1).")

    @model_validator(mode="after")
    def _words_to_search(self) -> SearchInput:
        if self.mode != "vector" and not (self.text or "").strip():
            raise ValueError(f"mode {self.mode!r} needs the query's 'text'")
        return self

    def to_input(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude={"mode", "weights"})


class SearchRequest(Strict):
    collection: str = "default"
    query: VectorQuery | SearchInput = Field(
        description="An input object (with 'mode' vector, keyword or hybrid), or {'vector': [...]}."
    )
    k: int = Field(10, ge=1, le=limits.MAX_K)
    filter: (
        dict[str, MetadataValue | list[MetadataValue] | dict[str, MetadataValue | list[MetadataValue]]] | None
    ) = Field(
        None,
        description="{field: value} matches equality; {field: [v1, v2]} matches any of the values; "
        '{field: {"gte": 10, "lt": 20}} a numeric range (gt, gte, lt, lte); {field: {"not": value or '
        "[values]}} every document that equality would not match (a missing field included). "
        "Fields combine with AND.",
    )
    truncate: bool = True
    include: list[Literal["text", "thumbnail"]] = Field(
        default_factory=list,
        description='Add to each hit its "text" and/or "thumbnail" (the first image\'s, as a data: '
        "URI), when the collection keeps sources; null where the document has none. With include, "
        f"k is at most {limits.MAX_K_WITH_SOURCES} and the answer's texts and thumbnails at most "
        "max_search_response_bytes (see /info); 413 beyond.",
    )

    @field_validator("filter")
    @classmethod
    def _check_operators(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # An operator object is checked here, so a bad one is a 422 before the collection is looked up.
        from service.storage.errors import InvalidFilterError
        from service.storage.validation import filter_operators

        for key, item in (value or {}).items():
            if isinstance(item, dict):
                try:
                    filter_operators(key, item)
                except InvalidFilterError as exc:
                    raise ValueError(str(exc)) from None
        return value


class Hit(BaseModel):
    id: str
    score: float = Field(
        description="Cosine similarity; keyword mode: the text rank (BM25 / ts_rank_cd); hybrid: the fused score."
    )
    vector_score: float | None = Field(None, description="hybrid: the cosine similarity, if ranked by it.")
    keyword_score: float | None = Field(None, description="hybrid: the text rank, if the words matched.")
    metadata: dict[str, Any] | None = None
    text: str | None = Field(None, description='With "include": ["text"]: the document\'s text or null.')
    thumbnail: str | None = Field(
        None,
        description='With "include": ["thumbnail"]: its first image\'s thumbnail as a data: URI '
        "(data:image/webp;base64,... or image/jpeg), or null.",
    )


class SearchResponse(BaseModel):
    hits: list[Hit]
    collection: str
    scanned_keys: list[str] = Field(
        default_factory=list,
        description="Filter keys no (ready) payload index serves: evaluated by a scan of every "
        "document. Declare them in the collection's indexes to make the filter cost what it selects.",
    )


UPSERT_EXAMPLES: dict[str, dict[str, Any]] = {
    "texts": {
        "summary": "Texts with metadata",
        "value": {
            "documents": [
                {"id": "doc-1", "text": "a red circle", "metadata": {"colour": "red"}},
                {"id": "doc-2", "text": "a blue square", "metadata": {"colour": "blue"}},
            ]
        },
    },
    "image": {"summary": "An image", "value": {"documents": [{"id": "img-1", "image": PNG_8X8}]}},
    "vectors": {"summary": "Raw vectors", "value": {"documents": [{"id": "v-1", "vector": [0.1, 0.2, 0.3]}]}},
}

SEARCH_EXAMPLES: dict[str, dict[str, Any]] = {
    "text": {
        "summary": "Text query",
        "value": {"collection": "default", "query": {"text": "a red circle"}, "k": 5},
    },
    "filtered": {
        "summary": "Filtered query",
        "value": {
            "collection": "default",
            "query": {"text": "a circle"},
            "k": 5,
            "filter": {"colour": ["red", "blue"]},
        },
    },
    "hybrid": {
        "summary": "Hybrid query (vector + keywords, fused)",
        "value": {"collection": "default", "query": {"text": "bolt AX-7731", "mode": "hybrid"}, "k": 5},
    },
    "vector": {
        "summary": "Raw vector query",
        "value": {"collection": "default", "query": {"vector": [0.1, 0.2, 0.3]}},
    },
}
