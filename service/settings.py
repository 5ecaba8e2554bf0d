"""Server configuration: one pydantic-settings class, read from ``LLAVE_*`` env vars and CLI flags.

Every field is both an environment variable (``LLAVE_`` + the upper-cased name, e.g.
``LLAVE_MAX_BATCH_SIZE``) and a command-line flag (``--`` + the name with dashes, e.g.
``--max-batch-size``); flags override env vars, which override the defaults
(``service/__main__.py`` builds the flags from this class, so the two cannot drift).
List fields take a comma-separated string (``LLAVE_CORS_ORIGINS=https://a,https://b``).

Nothing here is read at import time: ``Settings()`` reads the environment when called, and
the app gets its settings from ``create_app(settings)`` (routes read ``app.state.settings``).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service import limits
from service.inference.config import EngineConfig
from service.inference.hardware import parse_devices, resolve_devices

CommaList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Resolved server settings. Field descriptions double as ``--help`` text."""

    model_config = SettingsConfigDict(env_prefix="LLAVE_", extra="forbid", validate_default=True)

    # --- model -------------------------------------------------------------------------
    model: str = Field(description="Checkpoint to serve: a local folder or a hub id (required).")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N: the device of the one engine.")
    devices: str | None = Field(
        None,
        description="One engine process per device, each with its own model copy and batcher, "
        "requests sent to the least loaded: auto (every visible CUDA device, else the CPU), a "
        "list (cuda:0,cuda:2; cpu,cpu runs two CPU engines) or a count (the first N CUDA "
        "devices; N CPU engines on a host without CUDA). Unset: one engine on --device.",
    )
    require_all_devices: bool = Field(
        False,
        description="With several engines: /health and /ready answer 503 unless every engine "
        "serves, and the server exits when any engine is given up on. Default: 200 while at "
        "least one serves; the server exits when none is left.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and compute dtype."
    )
    served_model_name: str | None = Field(
        None,
        description="Name reported by /info, /v1/models and in responses (default: the last "
        "component of --model, its folder or hub name, never a full path).",
    )
    attn_implementation: str = Field("sdpa", description="Attention kernel passed to the model core.")

    # --- network -----------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 for all).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the server and uvicorn."
    )
    max_connections: int = Field(
        1000,
        ge=1,
        description="Most open client connections in this process (keep the open-file limit, "
        "ulimit -n, above it). At the cap an idle keep-alive connection is closed to make room; "
        "when none is idle the new connection is answered 503 and closed.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a request's line and headers, from connecting or "
        "from the request's first byte; then 408 and the connection is closed (closed silently "
        "when nothing was sent).",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time a client has to send a whole request body once its headers are in; "
        "then 408 and the connection is closed.",
    )
    keep_alive_timeout_s: int = Field(
        75,
        ge=1,
        description="An idle keep-alive connection is closed after this long (longer than "
        "clients' idle expiry, httpx: 5 s, so a client never reuses a closing connection).",
    )
    shutdown_timeout_s: float = Field(
        30.0,
        gt=0,
        description="On SIGTERM, time the requests in flight have to finish (new connections are "
        "refused at once); what is still running then is cancelled.",
    )
    data_dir: Path = Field(Path("./data"), description="Directory of the collection store.")
    store_url: str | None = Field(
        None,
        description="A postgresql:// URL: keep collections in PostgreSQL + pgvector instead of "
        "the embedded SQLite + FAISS store at --data-dir; several servers may share it.",
    )
    store_read_url: str | None = Field(
        None,
        description="With --store-url: a postgresql:// URL of a read replica (a streaming-"
        "replication hot standby). Searches and reads go there, writes to --store-url; a read "
        "falls back to the primary while the replica has not replayed this server's last write "
        "or cannot be reached.",
    )
    index_snapshots: bool = Field(
        True,
        description="Save built HNSW/IVF indexes at shutdown and reuse them at start-up when they "
        "still match the stored documents, instead of rebuilding (disk: about the size of the vectors).",
    )

    # --- processes ---------------------------------------------------------------------
    api_workers: int = Field(
        default_factory=lambda: default_api_workers(os.cpu_count() or 1),
        ge=1,
        le=64,
        description="HTTP front-end processes (HTTP, validation, image decoding, tokenising); the "
        "model runs in its own engine processes (one per device) that they all feed. Default: a quarter of the cores, "
        "from 2 to 8 (1 on a single core).",
    )
    engine_restarts: int = Field(
        3,
        ge=0,
        description="Times each engine process is restarted after it dies (each logged; the other "
        "engines keep serving). When no engine is left (with --require-all-devices: any one) the "
        "server exits non-zero for an orchestrator to restart it. 0: no restart.",
    )

    # --- batching and overload ---------------------------------------------------------
    max_batch_size: int = Field(32, ge=1, description="Most inputs in one forward pass.")
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Most padded tokens in one forward pass (longest input x batch size). "
        "An input longer than this runs alone.",
    )
    max_wait_ms: float = Field(
        50.0,
        ge=0,
        description="Longest the device is held idle per batch for inputs expected soon, when the "
        "batcher's measured cost curve says a fuller batch pays (a lone request never waits; "
        "0: never wait).",
    )
    batch_sort_window: int = Field(
        128, ge=1, description="Queued inputs looked at when grouping inputs of similar length."
    )
    max_queue: int = Field(
        limits.MAX_QUEUE,
        ge=1,
        description="Most inputs admitted and not yet on the device; beyond it requests get 429.",
    )
    request_timeout_s: float = Field(
        60.0, gt=0, description="A request not answered this long after admission gets 503."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After value sent with 429 and 503.")
    preprocess_workers: int = Field(
        default_factory=lambda: max(1, min(8, os.cpu_count() or 1)),
        ge=1,
        description="Threads that decode, tile and tokenise inputs (CPU; default: the cores, at most 8).",
    )
    gil_switch_interval_ms: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Python's thread switch interval (sys.setswitchinterval) in ms. Under heavy "
        "HTTP load the device thread waits up to this long for the interpreter lock between "
        "kernel launches; a shorter interval lets it launch sooner, at the cost of more thread "
        "switching. Default: 0.1 on CUDA, Python's 5 on CPU (measurements: bench/README.md).",
    )
    warmup_tokens: int = Field(
        256,
        ge=1,
        description="Length of the warm-up texts (max-batch-size of them, capped by "
        "max-batch-tokens and the model's maximum length).",
    )

    # --- request limits ----------------------------------------------------------------
    max_body_bytes: int = Field(limits.MAX_BODY_BYTES, ge=1, description="Largest request body (413).")
    max_inputs_per_request: int = Field(
        limits.MAX_INPUTS_PER_REQUEST,
        ge=1,
        description="Most inputs in one request (413). Left at its default, it is lowered to "
        "max-queue when that is smaller (with a warning).",
    )
    max_vector_documents_per_request: int = Field(
        limits.MAX_VECTOR_DOCUMENTS_PER_REQUEST,
        ge=1,
        description="Most documents in one upsert that bring their own vector (413); they cost "
        "no inference, so they are not counted against max-inputs-per-request. Their bytes are "
        "bounded by max-body-bytes.",
    )
    max_images_per_input: int = Field(
        limits.MAX_IMAGES_PER_INPUT, ge=1, description="Most images in one input (413)."
    )
    max_image_pixels: int = Field(
        limits.MAX_IMAGE_PIXELS, ge=1, description="Most pixels (width x height) in one image (413)."
    )
    max_video_bytes: int = Field(
        limits.MAX_VIDEO_BYTES, ge=1, description="Most encoded bytes of one video (413)."
    )
    max_video_seconds: float = Field(
        limits.MAX_VIDEO_SECONDS, gt=0, description="Longest video, in seconds (413)."
    )
    max_video_stream_frames: int = Field(
        limits.MAX_VIDEO_STREAM_FRAMES,
        ge=1,
        description="Most frames in a video's stream (413); at most 32 of them are embedded.",
    )
    max_video_frame_pixels: int = Field(
        limits.MAX_VIDEO_FRAME_PIXELS, ge=1, description="Most pixels in one frame of a video (413)."
    )
    max_video_decoded_pixels: int = Field(
        limits.MAX_VIDEO_DECODED_PIXELS,
        ge=1,
        description="Most pixels decoded to reach a video's kept frames (each is decoded from "
        "its key frame); a stream with key frames too far apart gets 413.",
    )
    video_max_tokens: int = Field(
        limits.VIDEO_MAX_TOKENS,
        ge=1,
        description="Length cut of an input holding a video, visual tokens included (the "
        "authors' 8192; 32 frames take 6,720 tokens at 384px).",
    )
    max_pixel_bytes: int = Field(
        limits.MAX_PIXEL_BYTES,
        ge=1,
        description="Bytes of decoded image crops (float32) one front end holds at once, from "
        "decoding until the engine answers. A request reserves its images' largest possible "
        "crops before decoding: 429 when they do not fit now, 413 when they never could.",
    )
    max_buffered_body_bytes: int = Field(
        limits.MAX_BUFFERED_BODY_BYTES,
        ge=1,
        description="Bytes of request bodies one front end holds at once, from their first byte "
        "until the answer is sent; beyond it requests get 429.",
    )
    max_search_response_bytes: int = Field(
        limits.MAX_SEARCH_RESPONSE_BYTES,
        ge=1,
        description="Most bytes of texts and thumbnails in one /search answer (413 beyond).",
    )
    max_input_tokens: int | None = Field(
        None,
        ge=1,
        description="Longest input in tokens, images included (default: the model's, 4096 for "
        "LLaVE). Longer inputs are cut, or refused with 413 when the request says truncate=false.",
    )

    # --- security ----------------------------------------------------------------------
    api_key: SecretStr | None = Field(
        None,
        description="When set, every endpoint but /health, /ready, /metrics, /docs and "
        "/openapi.json needs 'Authorization: Bearer <key>'.",
    )
    cors_origins: CommaList = Field(
        default_factory=list, description="Origins allowed by CORS, comma-separated (off when empty)."
    )
    image_url_allow_hosts: CommaList = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs are fetched, comma-separated; '*.example.com' "
        "matches subdomains. Empty: image URLs are refused.",
    )
    image_url_allow_private: bool = Field(
        False,
        description="Also fetch from private, loopback and link-local addresses (only for "
        "trusted internal networks).",
    )
    image_url_max_bytes: int = Field(limits.IMAGE_URL_MAX_BYTES, ge=1, description="Largest fetched image.")
    image_url_timeout_s: float = Field(10.0, gt=0, description="Time limit of one image fetch.")

    def engine_configs(
        self, embedder_factory: str | None = None, *, cuda_count: int | None = None
    ) -> list[EngineConfig]:
        """One configuration per engine process (``--devices``; else the one ``--device``).

        Engines that share the CPU split its cores between their torch thread pools."""
        one = self.engine_config(embedder_factory)
        if self.devices is None:
            return [one]
        names = resolve_devices(self.devices, cuda_count)
        on_cpu = sum(1 for name in names if name == "cpu")
        threads = max(1, (os.cpu_count() or 1) // on_cpu) if on_cpu > 1 else None
        return [
            replace(one, device=name, index=i, cpu_threads=threads if name == "cpu" else None)
            for i, name in enumerate(names)
        ]

    def engine_config(self, embedder_factory: str | None = None) -> EngineConfig:
        """The inference layer's configuration (it never sees the HTTP settings)."""
        return EngineConfig(
            model=self.model,
            device=self.device,
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            max_input_tokens=self.max_input_tokens,
            max_image_pixels=self.max_image_pixels,
            max_images_per_input=self.max_images_per_input,
            video_limits=limits.video_limits(self),
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_wait_ms=self.max_wait_ms,
            batch_sort_window=self.batch_sort_window,
            max_queue=self.max_queue,
            warmup_tokens=self.warmup_tokens,
            gil_switch_interval_ms=self.gil_switch_interval_ms,
            engine_restarts=self.engine_restarts,
            request_timeout_s=self.request_timeout_s,
            preprocess_workers=self.preprocess_workers,
            max_pixel_bytes=self.max_pixel_bytes,
            embedder_factory=embedder_factory,
        )

    @field_validator("cors_origins", "image_url_allow_hosts", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("image_url_allow_hosts")
    @classmethod
    def _lower_hosts(cls, value: list[str]) -> list[str]:
        return [host.lower().rstrip(".") for host in value]

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, value: str | None) -> str | None:
        if value is None or not value.strip():  # LLAVE_DEVICES= means one engine on --device
            return None
        parse_devices(value)  # raises ValueError with the reason
        return value.strip().lower()

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty LLAVE_API_KEY= means "no key", not "the empty key".
        if value is not None and not value.get_secret_value():
            return None
        return value

    @field_validator("store_url", "store_read_url")
    @classmethod
    def _check_store_url(cls, value: str | None) -> str | None:
        if not value:  # an empty LLAVE_STORE_URL= means the embedded store
            return None
        if not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("store_url must be a postgresql:// URL")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.devices is not None and self.device != "auto" and "device" in self.model_fields_set:
            raise ValueError(f"give either device ({self.device}) or devices ({self.devices}), not both")
        if self.store_read_url and not self.store_url:
            raise ValueError("store_read_url needs store_url: writes go to the primary at --store-url")
        # A request larger than the queue could never be admitted (413). Two explicit values
        # that say so contradict each other: refused. The default is adapted instead.
        if self.max_inputs_per_request > self.max_queue:
            if "max_inputs_per_request" in self.model_fields_set:
                raise ValueError(
                    f"max_inputs_per_request ({self.max_inputs_per_request}) must not exceed "
                    f"max_queue ({self.max_queue}): such a request could never be admitted"
                )
            self._adjustments.append(
                f"max_inputs_per_request lowered from its default {self.max_inputs_per_request} to "
                f"max_queue ({self.max_queue}): a larger request could never be admitted"
            )
            self.max_inputs_per_request = self.max_queue
        # A body of max_body_bytes must fit the bodies a front end holds at once.
        if self.max_buffered_body_bytes < self.max_body_bytes:
            if "max_buffered_body_bytes" in self.model_fields_set:
                raise ValueError(
                    f"max_buffered_body_bytes ({self.max_buffered_body_bytes}) must not be below "
                    f"max_body_bytes ({self.max_body_bytes}): a body of the largest size could "
                    "never be read"
                )
            self._adjustments.append(
                f"max_buffered_body_bytes raised from its default {self.max_buffered_body_bytes} "
                f"to max_body_bytes ({self.max_body_bytes}): a body of the largest size must fit"
            )
            self.max_buffered_body_bytes = self.max_body_bytes
        if self.max_inputs_per_request > -(-self.max_queue // self.api_workers):
            self._adjustments.append(
                f"each of the {self.api_workers} front ends admits up to max_inputs_per_request "
                f"({self.max_inputs_per_request}) inputs, more than its share of max_queue "
                f"({self.max_queue} / {self.api_workers}), so any request within the limit is "
                f"admitted; the engine still holds at most max_queue ({self.max_queue}) inputs and "
                "answers 429 beyond it (raise --max-queue or lower --api-workers to avoid this)"
            )
        return self

    @property
    def front_end_queue_share(self) -> int:
        """Inputs one front end admits at a time: its share of ``max_queue``, never below
        ``max_inputs_per_request`` (a request within the advertised limit is never refused
        forever because the server runs several front ends). The engine admits against the
        whole ``max_queue`` again, so the server never holds more than ``max_queue``."""
        share = -(-self.max_queue // self.api_workers)  # ceil
        return min(self.max_queue, max(share, self.max_inputs_per_request))

    # Settings changed, or combinations worth a warning, found by ``_check_consistency``: one
    # sentence each, logged at start-up.
    _adjustments: list[str] = PrivateAttr(default_factory=list)

    @property
    def adjustments(self) -> list[str]:
        """Defaults adapted to other settings, and combinations of settings that behave in a
        way worth knowing, to log at start-up (a warning each)."""
        return list(self._adjustments)

    @property
    def model_name(self) -> str:
        """The name this server answers to (``/info``, ``/v1/models``, responses)."""
        return self.served_model_name or default_served_name(self.model)

    def limits(self) -> dict[str, object]:
        """The request limits in force, as reported by ``/info`` (per front end where the
        setting says so: ``front_end_queue_share``, pixels, buffered bodies)."""
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_inputs_per_request": self.max_inputs_per_request,
            "max_images_per_input": self.max_images_per_input,
            "max_image_pixels": self.max_image_pixels,
            "max_input_tokens": self.max_input_tokens,
            "max_videos_per_input": limits.MAX_VIDEOS_PER_INPUT,
            "max_video_bytes": self.max_video_bytes,
            "max_video_seconds": self.max_video_seconds,
            "max_video_stream_frames": self.max_video_stream_frames,
            "max_video_frame_pixels": self.max_video_frame_pixels,
            "max_video_decoded_pixels": self.max_video_decoded_pixels,
            "video_max_tokens": self.video_max_tokens,
            "max_queue": self.max_queue,
            "front_end_queue_share": self.front_end_queue_share,
            "max_vector_documents_per_request": self.max_vector_documents_per_request,
            "max_pixel_bytes": self.max_pixel_bytes,
            "max_buffered_body_bytes": self.max_buffered_body_bytes,
            "max_search_response_bytes": self.max_search_response_bytes,
            "max_k": limits.MAX_K,
            "max_k_with_sources": limits.MAX_K_WITH_SOURCES,
            "max_metadata_bytes": limits.MAX_METADATA_BYTES,
            "max_payload_indexes": limits.MAX_PAYLOAD_INDEXES,
            "max_query_words": limits.MAX_QUERY_WORDS,
            "request_timeout_s": self.request_timeout_s,
            "image_urls": bool(self.image_url_allow_hosts),
            "max_connections": self.max_connections,
            "header_timeout_s": self.header_timeout_s,
            "body_timeout_s": self.body_timeout_s,
        }


def configure_logging(level: str) -> None:
    """The log format of every server process (the engine and store processes use it too)."""
    import logging

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def default_api_workers(cores: int) -> int:
    """A quarter of the cores, from 2 to 8 (1 on a single core): the engine processes, the
    preprocessing threads and the clients of a benchmark on the same host need the rest.
    At least two where there are two cores: one front end's CPU per request is about the
    engine's own, so a single one kept the engine's batches small (measured on 2 cores:
    bench/README.md, "Profile of one request")."""
    return max(min(2, cores), min(8, cores // 4))


def default_served_name(model: str) -> str:
    """The name a server of ``model`` answers to: a folder's name or a hub id's last part.

    Never the full path: /info and /v1/models are public, and a local path tells the
    deployment's layout (user names, mount points).
    """
    text = model.replace("\\", "/").rstrip("/")
    name = PurePosixPath(text).name
    if name in ("", ".", ".."):
        name = Path(model).expanduser().resolve().name
    return name or "model"
