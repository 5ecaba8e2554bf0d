"""The collection store on PostgreSQL + pgvector: the same contract as ``service/storage/store.py``.

Chosen with ``--store-url postgresql://...``. Several server processes may share one
database: nothing is cached between calls (each call reads the collection row), so an
upsert committed by one server is searchable from every other at once.

Layout: ``llave_collections`` (name, dim, index type, options, a document count kept in
step by every write) and one table per collection, ``llave_docs_<serial>`` (the serial,
never the name, appears in SQL: names cannot escape anything):
``id text primary key, metadata jsonb, created_at, updated_at, embedding vector(dim)``,
a GIN index (``jsonb_path_ops``) on metadata that the filters (``@>``) use, and for
approximate collections an HNSW (``vector_ip_ops``) or IVFFlat index on the unit vectors
(inner product = cosine). Over pgvector's 2,000-dimension index limit (or with option
``"precision": "halfvec"``) the index is an expression index on ``embedding::halfvec(dim)``
(4,000 at most); the full-precision vector is stored either way: the halfvec index proposes
``RESCORE_FACTOR`` x k candidates and their exact scores pick and order the k returned.

Read replica (``read_url``, ``--store-read-url``): reads (searches, get, list, describe) go
to a streaming-replication standby, writes to the primary. After each write the store
notes the primary's WAL position; until the replica has replayed that far, this process's
reads go to the primary (it sees its own writes at once), as they do when the replica
cannot be reached.

Writes: one transaction per call (all or nothing); the collection row is locked
``FOR UPDATE`` first, so writers of one collection - in any process - are serialised and
cannot deadlock on document rows. Searches never take that lock.

Filtered approximate search: pgvector 0.8 iterative index scans (``hnsw.iterative_scan =
relaxed_order``, ``ivfflat.iterative_scan``), results re-sorted by exact score; when the
index still yields fewer than ``k`` hits (a very selective filter, ``hnsw.max_scan_tuples``
reached) the query is answered by an exact scan of the rows the filter selects.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from service.limits import (
    BINARY_RESCORE_FACTOR,
    EXACT_SCAN_BUDGET,
    MAX_EF_SEARCH,
    RESCORE_FACTOR,
    RESCORE_MIN,
)
from service.storage import postgres_payload
from service.storage.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DimensionMismatchError,
    DocumentNotFoundError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidParameterError,
    StoreUnavailableError,
)
from service.storage.hybrid import query_words
from service.storage.payload import check_payload_indexes
from service.storage.postgres_filters import COLUMN as _PAYLOAD_COLUMN
from service.storage.postgres_filters import (
    EPOCH_FUNCTION,
    compile_filter,
    create_text_index_sql,
    keyword_sql,
)
from service.storage.postgres_filters import compile_jsonb_filter as compile_jsonb_filter
from service.storage.sources import (
    LEGACY_SOURCE_OPTIONS,
    Source,
    Thumbnail,
    ThumbnailNotFoundError,
    check_include,
    check_sources,
    resolve_source_options,
    video_durations,
)
from service.storage.validation import (
    MAX_DIM,
    MAX_K,
    MAX_METADATA_BYTES,
    check_collection_name,
    check_doc_id,
    check_k,
    check_upsert_batch,
    resolve_index_options,
    search_one,
    shown,
)

logger = logging.getLogger("llave.store.postgres")


PG_MAX_DIM = 16000  # pgvector's vector type
INDEX_MAX_DIM = 2000  # vector indexes; halfvec indexes go to 4000
HALFVEC_MAX_DIM = 4000
# Vectors up to this size stay in the table row (8 KB pages; the id and metadata can still
# be TOASTed); larger ones (LLaVE-7B: 3,584) are stored out of line by TOAST.
PLAIN_MAX_DIM = 1500
# precision "halfvec": the index holds 16-bit floats (half the size); the candidates it finds
# are rescored against the full-precision column. Above INDEX_MAX_DIM it is halfvec anyway.
# precision "binary": the index holds the sign bits (``binary_quantize(embedding)::bit(dim)``,
# Hamming distance ``<~>``, 1/32 of the vectors' size); BINARY_RESCORE_FACTOR x k candidates
# are rescored likewise.
PRECISIONS = ("float32", "halfvec", "binary")
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"m": 32, "ef_search": 128, "ef_construction": 160, "precision": "float32"},
    # nlist None: chosen from the collection size (sqrt(rows)) when the IVFFlat index is
    # built, which happens once the collection holds min_train documents.
    "ivf": {"nlist": None, "nprobe": None, "min_train": 1000, "precision": "float32"},
}
# pgvector's bounds, checked here so a bad option is a 422, not a database error.
_BOUNDS = {"m": (2, 100), "ef_construction": (4, 1000), "ef_search": (1, 1000), "nlist": (1, 32768)}
_EF_SEARCH_MAX = _BOUNDS["ef_search"][1]
_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS llave_collections (
    serial bigserial UNIQUE, name text PRIMARY KEY, dim integer NOT NULL, index_type text NOT NULL,
    options jsonb NOT NULL, created_at double precision NOT NULL, count bigint NOT NULL DEFAULT 0,
    ann_built boolean NOT NULL DEFAULT false);
"""
_RETRYABLE = ("40001", "40P01")  # serialization failure, deadlock
# Sources (service/storage/sources.py): the collection's source options (jsonb; NULL for a
# collection created before them) and, in each document row, its text and thumbnails
# (bytea[] and their media types, TOASTed out of line). Added to earlier databases at open.
_SOURCE_COLUMNS = "source_text text, thumbnails bytea[], thumbnail_types text[]"


def _unavailable(exc: BaseException, action: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"the collection store could not {action}: {exc}")


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class _Vec:
    """A float32 vector sent in pgvector's binary format (``%b``): no text formatting/parsing."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array


def _use_binary_vectors(conn: Any) -> None:
    """Register ``_Vec``'s binary dumper on ``conn`` (the vector type's oid is per database)."""
    import struct

    from psycopg import pq
    from psycopg.adapt import Dumper

    oid = conn.execute("SELECT 'vector'::regtype::oid").fetchone()[0]

    class VectorDumper(Dumper):
        format = pq.Format.BINARY

        def dump(self, obj: _Vec) -> bytes:
            a = obj.array
            return struct.pack(">HH", len(a), 0) + a.astype(">f4").tobytes()

    VectorDumper.oid = oid
    conn.adapters.register_dumper(_Vec, VectorDumper)


def _lsn(text: str) -> int:
    """A pg_lsn ("16/B374D848") as a number."""
    high, low = text.split("/")
    return (int(high, 16) << 32) | int(low, 16)


def _source_params(source: Source | None) -> tuple[Any, Any, Any]:
    """(source_text, thumbnails, thumbnail_types) of a document row."""
    if source is None:
        return None, None, None
    if not source.thumbnails:
        return source.text, None, None
    return source.text, [t.data for t in source.thumbnails], [t.stored_type for t in source.thumbnails]


# A document row as upserts write it (``_source_params`` gives the last three).
_ROW_COLUMNS = "id, metadata, created_at, updated_at, embedding, source_text, thumbnails, thumbnail_types"
_UPSERT_TAIL = (
    "ON CONFLICT (id) DO UPDATE SET "
    "metadata = excluded.metadata, updated_at = excluded.updated_at, "
    "embedding = excluded.embedding, source_text = excluded.source_text, "
    "thumbnails = excluded.thumbnails, thumbnail_types = excluded.thumbnail_types "
    "RETURNING (xmax = 0)"
)
# From this many rows an upsert streams them with COPY into a temporary table and upserts
# from there in one statement (bulk writers: service.batch, service.migrate pages); fewer go
# as one pipelined INSERT per row.
COPY_MIN_ROWS = 64


def _write_rows(conn: Any, table: str, rows: list[tuple[Any, ...]], dim: int) -> int:
    """Insert or replace document rows (in the caller's transaction); return how many were new."""
    with conn.cursor() as cur:
        if len(rows) < COPY_MIN_ROWS:
            cur.executemany(
                f"INSERT INTO {table} ({_ROW_COLUMNS}) VALUES (%s, %s::jsonb, %s, %s, %b, %s, %s, %s) "
                + _UPSERT_TAIL,
                rows,
                returning=True,
            )
            inserted = 0
            while True:
                inserted += sum(1 for (new,) in cur.fetchall() if new)
                if not cur.nextset():
                    return inserted
        # metadata travels as text and becomes jsonb in the INSERT (the same cast as above)
        cur.execute(
            "CREATE TEMP TABLE llave_upsert_rows (id text, metadata text, created_at double precision, "
            f"updated_at double precision, embedding vector({int(dim)}), source_text text, thumbnails bytea[], "
            "thumbnail_types text[]) ON COMMIT DROP"
        )
        types = ["text", "text", "float8", "float8", "vector", "text", "bytea[]", "text[]"]
        with cur.copy(f"COPY llave_upsert_rows ({_ROW_COLUMNS}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types([_vector_oid(conn) if t == "vector" else t for t in types])
            for row in rows:
                copy.write_row(row)
        cur.execute(
            f"INSERT INTO {table} ({_ROW_COLUMNS}) SELECT id, metadata::jsonb, created_at, updated_at, "
            "embedding, source_text, thumbnails, thumbnail_types FROM llave_upsert_rows ORDER BY id "
            + _UPSERT_TAIL
        )
        return sum(1 for (new,) in cur.fetchall() if new)


def _vector_oid(conn: Any) -> int:
    return conn.adapters.get_dumper(_Vec, "b").oid


def _parse_vec(text: str) -> np.ndarray:
    return np.array(json.loads(text), np.float32)


class PostgresCollectionStore(postgres_payload.PostgresPayloadIndexes):
    """``CollectionStore``'s contract on PostgreSQL (see the module docstring).

    Thread-safe; a small pool of connections (``pool_size`` kept idle at most).
    """

    precisions = PRECISIONS  # index precisions this backend offers (service.migrate maps them)

    backend = "postgres"

    def __init__(
        self,
        url: str,
        *,
        max_k: int = MAX_K,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
        ivf_nlist: int | None = None,
        max_metadata_bytes: int = MAX_METADATA_BYTES,
        pool_size: int = 8,
        connect_timeout: float = 10.0,
        read_url: str | None = None,
        **_ignored: Any,  # CollectionStore's SQLite/FAISS-only knobs
    ) -> None:
        self.url, self.read_url = url, read_url or None
        self.max_k, self.max_metadata_bytes = max_k, max_metadata_bytes
        self.pool_size, self.connect_timeout = pool_size, connect_timeout
        self._defaults = {
            "flat": {},
            "hnsw": {
                **OPTION_DEFAULTS["hnsw"],
                "m": hnsw_m,
                "ef_search": min(hnsw_ef_search, _EF_SEARCH_MAX),
            },
            "ivf": {**OPTION_DEFAULTS["ivf"], "nlist": ivf_nlist},
        }
        self._idle: dict[str, list[Any]] = {url: [], **({read_url: []} if read_url else {})}
        self._lock = threading.Lock()
        self._open = False
        # the primary's WAL position after this process's last write: a read goes to the
        # replica only once it has replayed that far (a server sees its own writes at once)
        self._written_lsn: str | None = None
        self._replica_down_logged = 0.0
        self._builds: set[threading.Thread] = set()  # payload-index builds (postgres_payload.py)
        self._builds_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        if self._open:
            return
        self._open = True
        try:
            with self._conn("open the database") as conn:
                (read_only,) = conn.execute(
                    "SELECT pg_is_in_recovery() OR current_setting('transaction_read_only') = 'on'"
                ).fetchone()
                if read_only:  # a streaming-replication standby: searches only; writes get 503
                    if conn.execute("SELECT to_regclass('llave_collections')").fetchone()[0] is None:
                        raise StoreUnavailableError(
                            "the database is read-only and has no collections yet (llave_collections)"
                        )
                    return
                with conn.transaction():
                    # one process at a time creates the schema (CREATE ... IF NOT EXISTS races)
                    conn.execute("SELECT pg_advisory_xact_lock(7305410242)")
                    conn.execute(_SCHEMA)
                    self._migrate_sources(conn)
                    conn.execute(EPOCH_FUNCTION)
                    conn.execute(_PAYLOAD_COLUMN)
                    for (serial,) in conn.execute("SELECT serial FROM llave_collections").fetchall():
                        conn.execute(create_text_index_sql(f"llave_docs_{int(serial)}"))  # keyword search
                self._resume_payload_builds(conn)
                _use_binary_vectors(conn)
        except BaseException:
            self._open = False
            raise

    def close(self) -> None:
        self._open = False
        with self._lock:
            idle = [conn for pool in self._idle.values() for conn in pool]
            for pool in self._idle.values():
                pool.clear()
        for conn in idle:
            try:
                conn.close()
            except Exception:
                logger.exception("closing a PostgreSQL connection failed")

    def __enter__(self) -> PostgresCollectionStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self, url: str) -> Any:
        """A pooled or new autocommit connection to ``url``."""
        import psycopg

        with self._lock:
            pool = self._idle[url]
            conn = pool.pop() if pool else None
        if conn is None:
            conn = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)))
            if conn.execute("SELECT to_regtype('vector')").fetchone()[0] is not None:
                _use_binary_vectors(conn)  # else open() creates the extension, then registers
        return conn

    def _release_conn(self, url: str, conn: Any) -> None:
        from psycopg import pq

        if (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == pq.TransactionStatus.IDLE  # not cut off mid-query
        ):
            with self._lock:
                if self._open and len(self._idle[url]) < self.pool_size:
                    self._idle[url].append(conn)
                    return
        conn.close()

    def _replica(self) -> Any | None:
        """A connection to the read replica when it has replayed this process's last write;
        None (use the primary) when it lags behind it or cannot be reached."""
        import psycopg

        assert self.read_url is not None
        try:
            conn = self._connect(self.read_url)
        except psycopg.Error as exc:
            if time.monotonic() - self._replica_down_logged > 60:
                self._replica_down_logged = time.monotonic()
                logger.warning("read replica %s unreachable, reading from the primary: %s",
                               redacted(self.read_url), exc)  # fmt: skip
            return None
        lsn = self._written_lsn
        try:
            # NULL on a server that is not a standby: nothing to wait for
            caught_up = (
                lsn is None
                or conn.execute(
                    "SELECT coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, true)", (lsn,)
                ).fetchone()[0]
            )
        except psycopg.Error:
            conn.close()
            return None
        if caught_up:
            return conn
        self._release_conn(self.read_url, conn)
        return None

    @contextmanager
    def _conn(self, action: str, *, read: bool = False) -> Iterator[Any]:
        """A pooled connection (autocommit; use ``conn.transaction()``): to the read replica
        for ``read`` when one is configured and has caught up with this process's writes, else
        to the primary. A connection that failed is discarded; database errors that are not
        bugs become StoreUnavailableError."""
        import psycopg

        if not self._open:
            raise StoreUnavailableError("the collection store is not open")
        conn = None
        url = self.url
        try:
            if read and self.read_url is not None:
                conn = self._replica()
                if conn is not None:
                    url = self.read_url
            if conn is None:
                conn = self._connect(self.url)
            yield conn
        except psycopg.Error as exc:
            broken = conn is None or conn.broken or conn.closed
            if conn is not None and broken:
                conn = None
            if isinstance(exc, psycopg.OperationalError | psycopg.errors.InsufficientResources) or broken:
                if conn is not None:
                    conn.close()
                    conn = None
                raise _unavailable(exc, action) from exc
            if isinstance(exc, psycopg.errors.ReadOnlySqlTransaction):
                raise _unavailable(exc, action) from exc
            raise
        finally:
            if conn is not None:
                self._release_conn(url, conn)

    def _write(self, action: str, body: Any) -> Any:
        """Run ``body(conn)`` in one transaction; retried on deadlock/serialization failure."""
        import psycopg

        for attempt in range(5):
            try:
                with self._conn(action) as conn:
                    with conn.transaction():
                        result = body(conn)
                    if self.read_url is not None:  # where the replica must be before it serves us
                        (lsn,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                        with self._lock:
                            if self._written_lsn is None or _lsn(lsn) > _lsn(self._written_lsn):
                                self._written_lsn = lsn
                    return result
            except psycopg.Error as exc:
                if exc.sqlstate in _RETRYABLE and attempt < 4:
                    time.sleep(0.01 * 2**attempt)
                    continue
                raise

    # --- collections ------------------------------------------------------------------------

    def _resolve_options(self, kind: str, options: dict[str, Any] | None) -> dict[str, Any]:
        resolved = resolve_index_options(
            kind, options, self._defaults, PRECISIONS, _BOUNDS, where=" with pgvector"
        )
        if kind == "hnsw" and resolved["ef_construction"] < 2 * resolved["m"]:
            raise InvalidParameterError("option 'ef_construction' must be at least 2 * m with pgvector")
        return resolved

    @staticmethod
    def _check_dim(dim: int, kind: str, options: dict[str, Any]) -> None:
        if dim > PG_MAX_DIM:
            raise InvalidParameterError(f"{dim} dimensions: over pgvector's limit of {PG_MAX_DIM}")
        if kind != "flat" and dim > HALFVEC_MAX_DIM and options.get("precision") != "binary":
            raise InvalidParameterError(
                f"{dim} dimensions: pgvector indexes at most {HALFVEC_MAX_DIM} (halfvec); use a flat collection"
            )

    @staticmethod
    def _halfvec(dim: int, options: dict[str, Any]) -> bool:
        # ("halfvec": true: how collections created before the precision option say it)
        return options.get("precision") == "halfvec" or bool(options.get("halfvec")) or dim > INDEX_MAX_DIM

    @staticmethod
    def _migrate_sources(conn: Any) -> None:
        """Add the source columns to a database of an earlier version (in open's transaction,
        under its advisory lock). Nothing is altered when they exist: no table lock taken."""
        if not conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = 'llave_collections'::regclass "
            "AND attname = 'source' AND NOT attisdropped"
        ).fetchone():
            conn.execute("ALTER TABLE llave_collections ADD COLUMN source jsonb")
        for (serial,) in conn.execute(
            "SELECT c.serial FROM llave_collections AS c "
            "WHERE to_regclass('llave_docs_' || c.serial) IS NOT NULL AND NOT EXISTS ("
            "SELECT 1 FROM pg_attribute AS a WHERE a.attrelid = to_regclass('llave_docs_' || c.serial) "
            "AND a.attname = 'source_text' AND NOT a.attisdropped)"
        ).fetchall():
            columns = ", ".join(f"ADD COLUMN {col}" for col in _SOURCE_COLUMNS.split(", "))
            conn.execute(f"ALTER TABLE llave_docs_{int(serial)} {columns}")

    def _row(self, conn: Any, name: str, lock: str = "") -> dict[str, Any] | None:
        row = conn.execute(
            "SELECT serial, dim, index_type, options, created_at, count, ann_built, source, "
            f"{'payload_indexes' if self._has_payload(conn) else 'NULL'} "
            f"FROM llave_collections WHERE name = %s {lock}",
            (name,),
        ).fetchone()
        if row is None:
            return None
        keys = ("serial", "dim", "kind", "options", "created_at", "count", "ann_built", "source", "payload")
        found = {"name": name, **dict(zip(keys, row, strict=True))}
        found["source"] = (
            LEGACY_SOURCE_OPTIONS if found["source"] is None else resolve_source_options(found["source"])
        )
        return found

    def _has_payload(self, conn: Any) -> bool:
        """The database has the payload-index column (a read-only one of an earlier version may not)."""
        if getattr(self, "_payload_column", None) is None:
            self._payload_column = bool(
                conn.execute(
                    "SELECT 1 FROM pg_attribute WHERE attrelid = 'llave_collections'::regclass "
                    "AND attname = 'payload_indexes' AND NOT attisdropped"
                ).fetchone()
            )
        return self._payload_column

    @staticmethod
    def _describe(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": row["name"],
            "count": row["count"],
            "dim": row["dim"],
            "index": row["kind"],
            "created_at": row["created_at"],
            **row["source"],
            "indexes": postgres_payload.declared(row.get("payload")),
            "indexing": sorted(k for k, e in (row.get("payload") or {}).items() if not e["ready"]),
        }

    def _require(self, conn: Any, name: str, lock: str = "") -> dict[str, Any]:
        row = self._row(conn, check_collection_name(name), lock)
        if row is None:
            raise CollectionNotFoundError(f"collection {name!r} does not exist")
        return row

    @staticmethod
    def _table(row: dict[str, Any]) -> str:
        return f"llave_docs_{int(row['serial'])}"

    def _create(
        self,
        conn: Any,
        name: str,
        dim: int,
        kind: str,
        options: dict[str, Any],
        source: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Insert the collection row and create its table (inside the caller's transaction);
        None's counterpart: the existing row when another process created it first."""
        created = conn.execute(
            "INSERT INTO llave_collections (name, dim, index_type, options, created_at, source) "
            "VALUES (%s, %s, %s, %s::jsonb, %s, %s::jsonb) ON CONFLICT (name) DO NOTHING RETURNING serial",
            (name, dim, kind, json.dumps(options), time.time(), json.dumps(resolve_source_options(source))),
        ).fetchone()
        row = self._require(conn, name, "FOR UPDATE")
        if created is None:
            return row
        row["created"] = True
        table = self._table(row)
        conn.execute(
            f"CREATE TABLE {table} (id text PRIMARY KEY, metadata jsonb, created_at double precision "
            f"NOT NULL, updated_at double precision NOT NULL, embedding vector({dim}) NOT NULL, "
            f"{_SOURCE_COLUMNS})"
        )
        if dim <= PLAIN_MAX_DIM:
            # in the row itself, not TOASTed: an exact scan reads ~2x faster (bench/README.md)
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN embedding SET STORAGE PLAIN")
        conn.execute(f"CREATE INDEX {table}_meta ON {table} USING gin (metadata jsonb_path_ops)")
        conn.execute(create_text_index_sql(table))
        if kind == "hnsw":
            expr, ops = self._index_expr(dim, options)
            conn.execute(
                f"CREATE INDEX {table}_ann ON {table} USING hnsw (({expr}) {ops}) "
                f"WITH (m = {int(options['m'])}, ef_construction = {int(options['ef_construction'])})"
            )
        return row

    def _index_expr(self, dim: int, options: dict[str, Any]) -> tuple[str, str]:
        if options.get("precision") == "binary":
            return f"(binary_quantize(embedding)::bit({dim}))", "bit_hamming_ops"
        if self._halfvec(dim, options):
            return f"embedding::halfvec({dim})", "halfvec_ip_ops"
        return "embedding", "vector_ip_ops"

    def create_collection(
        self,
        name: str,
        dim: int,
        index: str = "flat",
        options: dict[str, Any] | None = None,
        exist_ok: bool = True,
        *,
        source: dict[str, Any] | None = None,
        indexes: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """``CollectionStore.create_collection``: ``source`` options are set on a new collection
        and changed on an existing one; so is the ``indexes`` declaration (built in the background)."""
        check_collection_name(name)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= MAX_DIM:
            raise InvalidParameterError(f"dim must be an integer from 1 to {MAX_DIM}")
        resolved = self._resolve_options(index, options)
        self._check_dim(dim, index, resolved)
        resolve_source_options(source)
        if indexes is not None:
            indexes = check_payload_indexes(indexes)
        build: list[bool] = []

        def body(conn: Any) -> dict[str, Any]:
            row = self._row(conn, name)
            fresh = row is None
            if row is None:
                row = self._create(conn, name, dim, index, resolved, source)
                fresh = row["options"] == resolved and row["count"] == 0 and row.get("created")
            if not fresh:
                if (
                    not exist_ok
                    or row["dim"] != dim
                    or row["kind"] != index
                    or any(row["options"].get(key) != resolved[key] for key in options or {})
                ):
                    raise CollectionExistsError(
                        f"collection {name!r} exists (dim {row['dim']}, index {row['kind']}, "
                        f"options {row['options']})"
                    )
                wanted = resolve_source_options(source, row["source"])
                if wanted != row["source"]:
                    conn.execute(
                        "UPDATE llave_collections SET source = %s::jsonb WHERE name = %s",
                        (json.dumps(wanted), name),
                    )
                    row["source"] = wanted
            if indexes is not None:
                build.append(self._declare_payload(conn, row, indexes))
            return self._describe(row)

        described = self._write("create the collection", body)
        if any(build):
            self._build_payload(name)
        return described  # type: ignore[no-any-return]

    def list_collections(self) -> list[dict[str, Any]]:
        with self._conn("read the database", read=True) as conn:
            names = conn.execute('SELECT name FROM llave_collections ORDER BY name COLLATE "C"').fetchall()
            rows = [self._row(conn, name) for (name,) in names]
        return [self._describe(row) for row in rows if row is not None]

    def source_options(self, name: str) -> dict[str, Any]:
        """The collection's source options (``service/storage/sources.py``)."""
        with self._conn("read the database", read=True) as conn:
            return dict(self._require(conn, name)["source"])

    def describe(self, name: str) -> dict[str, Any]:
        check_collection_name(name)
        with self._conn("read the database", read=True) as conn:
            return self._describe(self._require(conn, name))

    def collection_options(self, name: str) -> dict[str, Any]:
        """The collection's index options as stored (for migration)."""
        with self._conn("read the database", read=True) as conn:
            return dict(self._require(conn, name)["options"])

    def delete_collection(self, name: str) -> None:
        def body(conn: Any) -> None:
            row = self._require(conn, name, "FOR UPDATE")
            conn.execute(f"DROP TABLE IF EXISTS {self._table(row)}")
            conn.execute("DELETE FROM llave_collections WHERE name = %s", (name,))

        self._write("delete the collection", body)

    # --- documents ---------------------------------------------------------------------------

    def upsert(
        self,
        name: str,
        ids: Sequence[str],
        vectors: Any,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        index: str | None = None,
        sources: Sequence[Source | None] | None = None,
    ) -> list[str]:
        """``CollectionStore.upsert``: sources in the same transaction, in each document's row."""
        ids, vectors, texts = check_upsert_batch(name, ids, vectors, metadata, self.max_metadata_bytes)
        if not ids:
            return []
        kept = check_sources(sources, len(ids))
        for text in texts:
            if text is not None and "\\u0000" in text:
                raise InvalidMetadataError("metadata strings cannot hold NUL (\\u0000) with PostgreSQL")
        if index is not None:
            self._resolve_options(index, None)
        dim = vectors.shape[1]
        order = sorted(range(len(ids)), key=lambda i: ids[i])  # one lock order for every writer

        def body(conn: Any) -> list[str]:
            row = self._row(conn, name, "FOR UPDATE")
            if row is not None and row["dim"] != dim:
                raise DimensionMismatchError(f"collection {name!r} holds {row['dim']}-d vectors, got {dim}-d")
            if row is not None and index is not None and index != row["kind"]:
                raise CollectionExistsError(f"collection {name!r} exists with index type {row['kind']!r}")
            if row is None:
                if dim > MAX_DIM:
                    raise InvalidParameterError(f"vectors have {dim} dimensions, over the limit of {MAX_DIM}")
                kind = index or "flat"
                options = self._resolve_options(kind, None)
                self._check_dim(dim, kind, options)
                row = self._create(conn, name, dim, kind, options)
                if row["dim"] != dim:  # another process created it meanwhile
                    raise DimensionMismatchError(
                        f"collection {name!r} holds {row['dim']}-d vectors, got {dim}-d"
                    )
            table = self._table(row)
            now = time.time()
            keep = [src if row["source"]["store_source"] else None for src in kept]
            rows = [(ids[i], texts[i], now, now, _Vec(vectors[i]), *_source_params(keep[i])) for i in order]
            inserted = _write_rows(conn, table, rows, dim)
            count = conn.execute(
                "UPDATE llave_collections SET count = count + %s WHERE name = %s RETURNING count",
                (inserted, name),
            ).fetchone()[0]
            return [count, row]

        count, row = self._write("store the documents", body)
        self._maybe_build_ivf(row, count)
        return ids

    def _maybe_build_ivf(self, row: dict[str, Any], count: int) -> None:
        """IVFFlat needs data to train its lists: built once the collection holds min_train rows."""
        if row["kind"] != "ivf" or row["ann_built"] or count < row["options"]["min_train"]:
            return
        options, dim, table = row["options"], row["dim"], self._table(row)
        # pgvector's advice is rows / 1000 (sqrt(rows) past 1M); the index is built at min_train rows
        # and keeps its lists as the collection grows, so sqrt leaves room for that growth
        lists = options.get("nlist") or max(1, min(32768, int(math.sqrt(count))))
        expr, ops = self._index_expr(dim, options)

        def body(conn: Any) -> None:
            current = self._row(conn, row["name"], "FOR UPDATE")
            if current is None or current["serial"] != row["serial"] or current["ann_built"]:
                return
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS {table}_ann ON {table} USING ivfflat (({expr}) {ops}) "
                f"WITH (lists = {int(lists)})"
            )
            conn.execute(
                "UPDATE llave_collections SET ann_built = true, options = options || %s::jsonb "
                "WHERE name = %s",
                (json.dumps({"lists_built": int(lists)}), row["name"]),
            )

        self._write("build the IVF index", body)

    def get(self, name: str, doc_id: str, *, with_vector: bool = False) -> dict[str, Any]:
        check_collection_name(name)
        check_doc_id(doc_id)
        with self._conn("read the database", read=True) as conn:
            row = self._require(conn, name)
            found = conn.execute(
                f"SELECT metadata, created_at, updated_at, embedding::text, source_text, "
                f"thumbnail_types FROM {self._table(row)} WHERE id = %s",
                (doc_id,),
            ).fetchone()
        if found is None:
            raise DocumentNotFoundError(f"document {shown(doc_id)} is not in collection {name!r}")
        meta, created_at, updated_at, vector, text, thumbnail_types = found
        doc = {
            "id": doc_id,
            "metadata": meta,
            "created_at": created_at,
            "updated_at": updated_at,
            "text": text,
            "thumbnails": len(thumbnail_types or ()),
            "videos": video_durations(thumbnail_types),
        }
        if with_vector:
            doc["vector"] = _parse_vec(vector)
        return doc

    def thumbnail(self, name: str, doc_id: str, index: int = 0) -> Thumbnail:
        """The document's ``index``-th thumbnail (0: its first image's)."""
        check_collection_name(name)
        check_doc_id(doc_id)
        position = int(index) + 1 if 0 <= int(index) < 2**31 - 1 else 0  # arrays are 1-based
        with self._conn("read the database", read=True) as conn:
            row = self._require(conn, name)
            found = conn.execute(
                f"SELECT thumbnails[%s], thumbnail_types[%s] FROM {self._table(row)} WHERE id = %s",
                (position, position, doc_id),
            ).fetchone()
        if found is None:
            raise DocumentNotFoundError(f"document {shown(doc_id)} is not in collection {name!r}")
        if found[0] is None:
            raise ThumbnailNotFoundError(f"document {shown(doc_id)} has no thumbnail {index}")
        return Thumbnail.from_stored(found[1], found[0])

    def delete(self, name: str, doc_id: str) -> None:
        check_doc_id(doc_id)

        def body(conn: Any) -> None:
            row = self._require(conn, name, "FOR UPDATE")
            gone = conn.execute(
                f"DELETE FROM {self._table(row)} WHERE id = %s RETURNING 1", (doc_id,)
            ).fetchone()
            if gone is None:
                raise DocumentNotFoundError(f"document {shown(doc_id)} is not in collection {name!r}")
            conn.execute("UPDATE llave_collections SET count = count - 1 WHERE name = %s", (name,))

        self._write("delete the document", body)

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        if isinstance(ids, str):
            raise InvalidNameError("ids must be a list of strings, not one string")
        ids = [check_doc_id(doc_id) for doc_id in ids]
        check_collection_name(name)
        with self._conn("read the database", read=True) as conn:
            row = self._row(conn, name)
            if row is None or not ids:
                return set()
            return {
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM {self._table(row)} WHERE id = ANY(%s)", (list(ids),)
                ).fetchall()
            }

    def list_documents(
        self,
        name: str,
        cursor: str | None = None,
        limit: int = 100,
        *,
        with_vector: bool = False,
        with_source: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Documents in id order (bytewise) after ``cursor``; the next cursor, or None at the end.
        ``with_source``: each has ``"source"``, a ``Source`` or None (for migration)."""
        if cursor is not None:
            check_doc_id(cursor)
        source = "source_text, thumbnails, thumbnail_types" if with_source else "NULL, NULL, NULL"
        with self._conn("read the database", read=True) as conn:
            row = self._require(conn, name)
            rows = conn.execute(
                f"SELECT id, metadata, created_at, updated_at, embedding::text, {source} "
                f"FROM {self._table(row)} "
                'WHERE %s::text IS NULL OR id COLLATE "C" > %s ORDER BY id COLLATE "C" LIMIT %s',
                (cursor, cursor, limit + 1),
            ).fetchall()
        docs = []
        for doc_id, meta, created_at, updated_at, vector, text, thumbs, types in rows[:limit]:
            doc = {"id": doc_id, "metadata": meta, "created_at": created_at, "updated_at": updated_at}
            if with_vector:
                doc["vector"] = _parse_vec(vector)
            if with_source:
                pairs = zip(thumbs or (), types or (), strict=True)
                found = Source(text, tuple(Thumbnail.from_stored(t, d) for d, t in pairs))
                doc["source"] = None if found.empty else found
            docs.append(doc)
        return docs, (docs[-1]["id"] if len(rows) > limit else None)

    # --- search --------------------------------------------------------------------------------

    def search(
        self,
        name: str,
        query: Any,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        *,
        include: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        return search_one(self.search_many, name, query, k, filter, include=include)

    def search_many(
        self,
        name: str,
        queries: Any,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        *,
        include: Sequence[str] = (),
    ) -> list[list[dict[str, Any]]]:
        from service.storage.vector_index import normalised_rows

        include = check_include(include)
        check_collection_name(name)
        check_k(k, self.max_k)
        q = normalised_rows(queries, what="query vector")
        with self._conn("search", read=True) as conn, conn.transaction():
            row = self._require(conn, name)
            where, params, _ = compile_filter(filter, postgres_payload.ready(row.get("payload")))
            if q.shape[1] != row["dim"]:
                raise DimensionMismatchError(
                    f"collection {name!r} holds {row['dim']}-d vectors, the query is {q.shape[1]}-d"
                )
            results = [self._search_one(conn, row, vec, k, where, params) for vec in q]
            if include:
                self._add_sources(conn, row, results, include)
            return results

    def _add_sources(
        self, conn: Any, row: dict[str, Any], results: list[list[dict[str, Any]]], include: tuple[str, ...]
    ) -> None:
        """Each hit's text and/or first thumbnail, read after ranking (never for every scanned row)."""
        ids = list({hit["id"] for hits in results for hit in hits})
        found = {
            doc_id: (text, data, media_type)
            for doc_id, text, data, media_type in conn.execute(
                f"SELECT id, {'source_text' if 'text' in include else 'NULL'}, "
                f"{'thumbnails[1], thumbnail_types[1]' if 'thumbnail' in include else 'NULL, NULL'} "
                f"FROM {self._table(row)} WHERE id = ANY(%s)",
                (ids,),
            ).fetchall()
        }
        for hits in results:
            for hit in hits:
                text, data, media_type = found.get(hit["id"], (None, None, None))
                if "text" in include:
                    hit["text"] = text
                if "thumbnail" in include:
                    hit["thumbnail"] = None if data is None else Thumbnail.from_stored(media_type, data)

    def _search_one(
        self, conn: Any, row: dict[str, Any], q: np.ndarray, k: int, where: str, params: list[Any]
    ) -> list[dict[str, Any]]:
        table, dim, options = self._table(row), row["dim"], row["options"]
        cond = f"WHERE {where}" if where else ""
        qv = _Vec(q)
        approximate = row["kind"] == "hnsw" or (row["kind"] == "ivf" and row["ann_built"])
        beam = int(options.get("ef_search") or 0)
        if approximate and where:
            # the planner (service/storage/planner.py): an exact scan of few matches, else the
            # index with its beam grown as the filter skips nodes (iterative scans do the rest)
            matching = max(1, self._estimate_rows(conn, table, cond, params))
            if matching * dim <= EXACT_SCAN_BUDGET:
                approximate = False
            beam = min(MAX_EF_SEARCH, math.ceil(beam * max(1.0, row["count"] / matching)))
        if approximate:
            binary = options.get("precision") == "binary"
            half = not binary and self._halfvec(dim, options)
            # halfvec/bits rank candidates; their exact scores (full-precision column) pick the k best
            factor = BINARY_RESCORE_FACTOR if binary else RESCORE_FACTOR
            want = min(_EF_SEARCH_MAX, max(factor * k, RESCORE_MIN)) if half or binary else k
            if row["kind"] == "hnsw":
                conn.execute(f"SET LOCAL hnsw.ef_search = {int(min(_EF_SEARCH_MAX, max(want, beam)))}")
                conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            else:
                lists = int(options.get("lists_built") or 1)
                probes = options.get("nprobe") or max(1, int(math.sqrt(lists)))
                conn.execute(f"SET LOCAL ivfflat.probes = {int(min(probes, lists))}")
                conn.execute("SET LOCAL ivfflat.iterative_scan = relaxed_order")
            if binary:
                order = f"binary_quantize(embedding)::bit({dim}) <~> binary_quantize(%b::vector)"
            elif half:
                order = f"embedding::halfvec({dim}) <#> %b::halfvec({dim})"
            else:
                order = "embedding <#> %b::vector"
            rows = conn.execute(
                f"SELECT id, metadata, -(embedding <#> %b::vector) FROM {table} {cond} "
                f"ORDER BY {order} LIMIT %s",
                [qv, *params, qv, want],
            ).fetchall()
            if len(rows) >= k:
                return self._hits(rows)[:k]
            # too few: a selective filter starved the index scan -> exact scan of the matches
        # exact: "+ 0" keeps the planner off the vector index (a sequential or GIN bitmap scan)
        rows = conn.execute(
            f"SELECT id, metadata, -(embedding <#> %b::vector) AS score FROM {table} {cond} "
            "ORDER BY (embedding <#> %b::vector) + 0, id LIMIT %s",
            [qv, *params, qv, k],
        ).fetchall()
        return self._hits(rows)

    def keyword_search(
        self,
        name: str,
        text: str,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        *,
        include: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """``CollectionStore.keyword_search`` on PostgreSQL full-text search (``simple``
        configuration, GIN index, ``ts_rank_cd`` as the score)."""
        include = check_include(include)
        check_collection_name(name)
        check_k(k, self.max_k)
        words = [w for w in query_words(text) if "\x00" not in w]
        with self._conn("search", read=True) as conn, conn.transaction():
            row = self._require(conn, name)
            where, params, _ = compile_filter(filter, postgres_payload.ready(row.get("payload")))
            if not words:
                return []
            rows = conn.execute(keyword_sql(self._table(row), words, where), [*words, *params, k]).fetchall()
            results = [self._hits(rows)]
            if include:
                self._add_sources(conn, row, results, include)
            return results[0]

    @staticmethod
    def _estimate_rows(conn: Any, table: str, cond: str, params: list[Any]) -> int:
        """PostgreSQL's estimate of the rows a filter selects (from the expression indexes'
        statistics for declared keys; a fixed guess for jsonb containment)."""
        (plan,) = conn.execute(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} {cond}", params).fetchone()
        plan = json.loads(plan) if isinstance(plan, str) else plan
        return int(plan[0]["Plan"]["Plan Rows"])

    def search_plan(self, name: str, filter: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"scanned": [keys]}``: the filter's keys that no ready payload index serves."""
        with self._conn("read the database", read=True) as conn:
            row = self._require(conn, name)
        return {"scanned": compile_filter(filter, postgres_payload.ready(row.get("payload")))[2]}

    @staticmethod
    def _hits(rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        hits = [{"id": doc_id, "score": float(score), "metadata": meta} for doc_id, meta, score in rows]
        hits.sort(key=lambda h: (-h["score"], h["id"]))  # relaxed order / halfvec ranking -> exact order
        return hits

    # --- checks --------------------------------------------------------------------------------

    def integrity_check(self) -> list[str]:
        """Problems found (empty when fine): each collection's table exists and its count matches."""
        problems: list[str] = []
        with self._conn("read the database") as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            for name, serial, dim, count in conn.execute(
                "SELECT name, serial, dim, count FROM llave_collections ORDER BY name"
            ).fetchall():
                table = f"llave_docs_{int(serial)}"
                exists = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0]
                if exists is None:
                    problems.append(f"collection {name!r}: table {table} is missing")
                    continue
                actual = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                if actual != count:
                    problems.append(f"collection {name!r}: {actual} documents stored, count says {count}")
                bad = conn.execute(f"SELECT count(*) FROM {table} WHERE vector_dims(embedding) != %s", (dim,))
                if bad.fetchone()[0]:
                    problems.append(f"collection {name!r}: vectors of the wrong size")
        return problems
