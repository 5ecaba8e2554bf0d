"""Every limit of the service, defined once.

Limits an operator may change are ``Settings`` fields (``service/settings.py``) whose
defaults come from here; limits of the stored data and of the API's shapes are fixed
constants used by the request schemas (so the OpenAPI document states them), the stores
and the CLIs alike. Nothing else in ``service/`` writes a limit's number.
"""

from __future__ import annotations

# --- requests (defaults of operator settings) --------------------------------------------
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_INPUTS_PER_REQUEST = 128
MAX_IMAGES_PER_INPUT = 8
MAX_IMAGE_PIXELS = 4096 * 4096  # width x height of one decoded image
MAX_IMAGE_BYTES = 32 * 1024 * 1024  # encoded bytes of one image in a request
IMAGE_URL_MAX_BYTES = 16 * 1024 * 1024
IMAGE_URL_MAX_REDIRECTS = 3  # redirects followed when fetching one image URL
# Videos (model/video.py), checked before the work each bounds: encoded bytes (also of a
# fetched URL), length, frames in the stream, pixels of one frame, and all the pixels
# decoded to reach the kept frames (lazy decoding seeks from key frame to key frame).
MAX_VIDEOS_PER_INPUT = 1
MAX_VIDEO_BYTES = 32 * 1024 * 1024
MAX_VIDEO_SECONDS = 600.0
MAX_VIDEO_STREAM_FRAMES = 36_000
MAX_VIDEO_FRAME_PIXELS = 3840 * 2160
MIN_VIDEO_SIDE = 16  # pixels; a smaller stream holds nothing to embed
MAX_VIDEO_DECODED_PIXELS = 2_000_000_000
# The length cut of an input holding a video (the authors' retrieval script raises it to
# 8192: 32 frames are 6,720 visual tokens at 384px), instead of the model's 4096.
VIDEO_MAX_TOKENS = 8192
MAX_QUEUE = 1024
MAX_VECTOR_DOCUMENTS_PER_REQUEST = 10_000  # documents that bring their own vector (no inference)
# Memory of one front end, bounded by bytes (429 with Retry-After when full):
# - decoded pixels: float32 crops from decoding to the engine's answer (a request reserves
#   its images' largest possible crops before decoding, then what they really took);
MAX_PIXEL_BYTES = 2 * 1024 * 1024 * 1024
# - request bodies held from their first byte until the answer is sent.
MAX_BUFFERED_BODY_BYTES = 256 * 1024 * 1024
# Searches: hits that carry sources ("include": text or thumbnail) and the bytes of those
# sources in one answer (413 beyond either).
MAX_K_WITH_SOURCES = 100
MAX_SEARCH_RESPONSE_BYTES = 32 * 1024 * 1024

# --- stored data and API shapes (fixed) --------------------------------------------------
MAX_K = 1000  # hits one search may ask for
MAX_DIM = 65536  # dimension of a collection's vectors
MAX_ID_CHARS = 512  # characters in a document id
MAX_COLLECTION_NAME_CHARS = 128
# A collection name: a letter or digit, then letters, digits, "_", "." or "-".
COLLECTION_NAME_PATTERN = rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_COLLECTION_NAME_CHARS - 1}}}"
MAX_METADATA_BYTES = 64 * 1024  # one document's metadata, as compact UTF-8 JSON
# Metadata filters: fields in one filter, characters in a field name, values in all clauses.
MAX_FILTER_KEYS, MAX_FILTER_KEY_CHARS, MAX_FILTER_VALUES = 32, 256, 1024
MAX_IDS_PER_LOOKUP = 10_000  # ids in one POST /collections/{name}/existing
MAX_PAGE_SIZE = 1000  # documents in one page of GET /collections/{name}/documents
INDEX_TYPES = ("flat", "hnsw", "ivf")
# A reduced-precision index (sq8 in FAISS, halfvec in pgvector) finds candidates and their
# exact scores pick the k returned: RESCORE_FACTOR x k candidates, at least RESCORE_MIN.
RESCORE_FACTOR, RESCORE_MIN = 4, 40
# A binary index (sign bits, Hamming distance) ranks coarsely: BINARY_RESCORE_FACTOR x k
# candidates (at least RESCORE_MIN) are rescored (30: recall@10 ~0.98 on clustered 896-d
# vectors, bench/README.md; 10 gave 0.93). A filter the embedded store answers by a scan of
# its matches rescores up to BINARY_EXACT_RESCORE of them, the nearest by Hamming distance
# (all of a small subset: its true top k are farther off, where sign bits rank worse).
BINARY_RESCORE_FACTOR = 30
BINARY_EXACT_RESCORE = 2048
# Documents' sources (service/storage/sources.py). Per document: the text as UTF-8, and all
# its thumbnails together; a thumbnail of the largest side is at most a few hundred KB, so
# these only stop abuse.
MIN_THUMBNAIL_SIZE, MAX_THUMBNAIL_SIZE = 16, 1024  # longest side, pixels
MAX_SOURCE_TEXT_BYTES = 1024 * 1024
MAX_THUMBNAIL_BYTES_PER_DOCUMENT = 8 * 1024 * 1024
MAX_THUMBNAILS_PER_DOCUMENT = 64
MAX_PAYLOAD_INDEXES = 32  # metadata keys one collection may index (service/storage/payload.py)
PAYLOAD_INDEX_TYPES = ("keyword", "integer", "float", "datetime")

# --- filtered search planner (service/storage/planner.py; both backends) ------------------
# A filter matching at most this many vector components (rows x dim: ~18k rows at 896-d) is
# answered by an exact scan of the matching rows: cheap, and an exact answer.
EXACT_SCAN_BUDGET = 16 * 1024 * 1024
# Otherwise the approximate index proposes candidates and the filter checks them: this many
# times k / selectivity of them (a match's expected rank, with room for the spread).
POSTFILTER_OVERSAMPLE = 2.0
# Past this many (a rare filter on a huge collection): the graph walk. Reduced indexes ask
# for their rescoring candidates (binary: 30 x k), so 50% of a binary index wants 1,200.
POSTFILTER_MAX_CANDIDATES = 4096
MAX_EF_SEARCH = 1000  # the search beam a filtered HNSW walk may grow to (pgvector's maximum)
# Hybrid search (service/storage/hybrid.py): hits each ranking contributes (at least k), and
# reciprocal rank fusion's constant (60, as in Cormack et al. and most search engines).
HYBRID_CANDIDATES = 100
RRF_K = 60
MAX_QUERY_WORDS = 64  # distinct words of a keyword query kept (the rest are ignored)


def image_limits(settings: object | None = None) -> dict[str, int | float]:
    """Keyword arguments of ``model.load_embedder`` for the image and video limits in force.

    The server, ``service.ingest`` and the demo all load models through this, so an image
    or a video one of them accepts is accepted by all (``settings``: a ``Settings`` or an
    ``EngineConfig``, or None for the defaults).
    """
    return {
        "max_image_pixels": getattr(settings, "max_image_pixels", MAX_IMAGE_PIXELS),
        "max_images_per_input": getattr(settings, "max_images_per_input", MAX_IMAGES_PER_INPUT),
        "max_image_bytes": MAX_IMAGE_BYTES,
        **video_limits(settings),
    }


def video_limits(settings: object | None = None) -> dict[str, int | float]:
    """The video part of ``image_limits`` (names as ``model.load_embedder`` takes them)."""
    return {
        "max_video_bytes": getattr(settings, "max_video_bytes", MAX_VIDEO_BYTES),
        "max_video_seconds": getattr(settings, "max_video_seconds", MAX_VIDEO_SECONDS),
        "max_video_stream_frames": getattr(settings, "max_video_stream_frames", MAX_VIDEO_STREAM_FRAMES),
        "max_video_frame_pixels": getattr(settings, "max_video_frame_pixels", MAX_VIDEO_FRAME_PIXELS),
        "max_video_decoded_pixels": getattr(settings, "max_video_decoded_pixels", MAX_VIDEO_DECODED_PIXELS),
        "video_max_length": getattr(settings, "video_max_tokens", VIDEO_MAX_TOKENS),
    }
