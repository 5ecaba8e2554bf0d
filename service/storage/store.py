"""The durable collection store: SQLite is the source of truth, FAISS a derived index.

One SQLite file (``data_dir/store.sqlite3``, WAL, ``synchronous=FULL``) holds every
collection and document; an upsert is acknowledged only after its transaction commits,
so it survives ``kill -9``. The in-memory indexes (``service/storage/vector_index.py``) are
rebuilt from SQLite at ``open`` (or loaded from the snapshot a clean close saved, when it
still matches: ``service/storage/snapshots.py``) and updated only after a commit succeeded.
Index loading, rebuilds and the integrity check live in ``service/storage/maintenance.py``.

Concurrency: all writes are serialised by one lock and one writer connection; each
collection has a readers-writer lock, held exclusively only for COMMIT plus the index
update, so searches run in parallel and always see SQLite and the index in step.
Readers take read-only SQLite connections from a small pool. Approximate indexes are
compacted, trained or (after ``open``) built in a background thread while searches go on.
One process per data directory (an flock on ``data_dir/store.lock``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from service.storage import sqlite_payload, sqlite_text
from service.storage.background import wait_for_threads
from service.storage.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DimensionMismatchError,
    DocumentNotFoundError,
    InvalidNameError,
    InvalidParameterError,
    StoreUnavailableError,
)
from service.storage.hybrid import fts5_query, query_words
from service.storage.maintenance import IndexMaintenance, _Collection, _is_bug
from service.storage.payload import check_payload_indexes
from service.storage.planner import search_filtered
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
from service.storage.vector_index import (
    OPTION_DEFAULTS,
    PRECISIONS,
    LiveIndex,
    new_index,
    normalised_rows,
    rescore,
)

logger = logging.getLogger("llave.store")

DB_FILE = "store.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY, dim INTEGER NOT NULL, index_type TEXT NOT NULL,
    options TEXT NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    row_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS label; never reused
    collection TEXT NOT NULL, id TEXT NOT NULL, metadata TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL,
    vector BLOB NOT NULL,  -- float32, unit norm
    UNIQUE (collection, id));
-- covering index for metadata filters: they never read the (page-sized) vector rows
CREATE INDEX IF NOT EXISTS documents_metadata ON documents (collection, metadata);
"""
# Sources (service/storage/sources.py), added to databases of earlier versions at open:
# the collection's source options (JSON; NULL for a collection created before them), and
# per document (by row_id) its text and thumbnails, outside the documents table so that
# index rebuilds and filters never read them. The trigger drops them with their document
# in the same transaction (replace, delete, collection delete).
_SOURCE_COLUMN = "ALTER TABLE collections ADD COLUMN source TEXT"
_SOURCE_SCHEMA = """
CREATE TABLE IF NOT EXISTS document_sources (row_id INTEGER PRIMARY KEY, text TEXT);
CREATE TABLE IF NOT EXISTS document_thumbnails (
    row_id INTEGER NOT NULL, idx INTEGER NOT NULL, media_type TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (row_id, idx));
CREATE TRIGGER IF NOT EXISTS documents_source_gone AFTER DELETE ON documents BEGIN
    DELETE FROM document_sources WHERE row_id = old.row_id;
    DELETE FROM document_thumbnails WHERE row_id = old.row_id;
END;
"""


def _unavailable(exc: BaseException, action: str) -> StoreUnavailableError:
    return StoreUnavailableError(f"the collection store could not {action}: {exc}")


class CollectionStore(IndexMaintenance, sqlite_payload.PayloadMaintenance):
    """Named collections of (id, unit vector, JSON metadata) with cosine-similarity search.

    Thread-safe; every method is synchronous (the HTTP layer calls them from a threadpool).
    ``background_rebuild=False`` runs index compaction/training inline in the writing call.
    ``read_only`` opens SQLite read-only (writes then fail with StoreUnavailableError);
    ``max_db_bytes`` caps the database file (writes past it fail as on a full disk).
    """

    precisions = PRECISIONS  # index precisions this backend offers (service.migrate maps them)

    def __init__(
        self,
        data_dir: str | Path,
        *,
        max_k: int = MAX_K,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 128,
        ivf_nlist: int | None = None,
        tombstone_rebuild_ratio: float = 0.2,
        max_metadata_bytes: int = MAX_METADATA_BYTES,
        background_rebuild: bool = True,
        read_only: bool = False,
        max_db_bytes: int | None = None,
        index_snapshots: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.index_snapshots = index_snapshots
        self.path = self.data_dir / DB_FILE
        self.max_k, self.max_metadata_bytes = max_k, max_metadata_bytes
        self.tombstone_rebuild_ratio = tombstone_rebuild_ratio
        self.background_rebuild, self.read_only, self.max_db_bytes = (
            background_rebuild,
            read_only,
            max_db_bytes,
        )
        self._defaults = {
            "flat": {},
            "hnsw": {**OPTION_DEFAULTS["hnsw"], "m": hnsw_m, "ef_search": hnsw_ef_search},
            "ivf": {**OPTION_DEFAULTS["ivf"], "nlist": ivf_nlist},
        }
        self._write_lock = threading.Lock()  # serialises every write; taken before any collection lock
        self._collections: dict[str, _Collection] = {}
        self._source_options: dict[str, dict[str, Any]] = {}  # per collection (sources.py)
        self._payload: dict[str, dict[str, dict[str, Any]]] = {}  # per collection (sqlite_payload.py)
        self._has_sources = False  # the database has the source tables (read-only: maybe not)
        self._has_text_index = False  # ... and the FTS5 index of the texts (sqlite_text.py)
        self._writer: sqlite3.Connection | None = None
        self._readers: list[sqlite3.Connection] = []  # every read-only connection opened
        self._idle_readers: list[sqlite3.Connection] = []  # the pool: one per concurrent reader at most
        self._readers_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()

    # --- lifecycle ------------------------------------------------------------------------

    def open(self) -> None:
        """Create the data directory, open SQLite and rebuild every collection's index."""
        if self._writer is not None:
            return
        self._stop = threading.Event()
        try:
            if not self.read_only:
                self.data_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = self._lock_data_dir()
            self._writer = self._connect(read_only=self.read_only)
            if not self.read_only:
                self._writer.executescript(_SCHEMA)
                self._migrate_sources(self._writer)
                sqlite_payload.migrate(self._writer)
            self._has_sources = self._source_schema_present(self._writer)
            if self._has_sources and not self.read_only:
                sqlite_text.migrate(self._writer)
            self._has_text_index = self._has_sources and sqlite_text.present(self._writer)
            source_column = "source" if self._has_sources else "NULL"
            columns = {row[1] for row in self._writer.execute("PRAGMA table_info(collections)").fetchall()}
            payload_column = "payload_indexes" if "payload_indexes" in columns else "NULL"
            with self._write_lock:
                for name, dim, kind, options, created_at, source, payload in self._writer.execute(
                    f"SELECT name, dim, index_type, options, created_at, {source_column}, {payload_column} "
                    "FROM collections"
                ).fetchall():
                    options = json.loads(options)
                    self._payload[name] = sqlite_payload.load(payload)
                    self._source_options[name] = (
                        LEGACY_SOURCE_OPTIONS
                        if source is None
                        else resolve_source_options(json.loads(source))
                    )
                    index = self._load_snapshot(name, dim, kind, options) or self._load_index(
                        name, dim, kind, options
                    )
                    self._collections[name] = _Collection(
                        name, dim, kind, options, created_at, LiveIndex(index)
                    )
                for coll in self._collections.values():
                    self._maybe_rebuild(coll)
                    self._maybe_fill_payload(coll.name)
        except (OSError, sqlite3.Error) as exc:
            self._release()
            if _is_bug(exc):
                raise
            raise _unavailable(exc, f"open {self.path}") from exc
        except BaseException:
            self._release()
            raise

    def close(self) -> None:
        """Stop background rebuilds, save built approximate indexes (``index_snapshots``) and
        close every connection. Call once traffic has stopped."""
        self._stop.set()
        self.wait_for_maintenance()
        with self._write_lock:
            if self._writer is not None and self.index_snapshots and not self.read_only:
                self._save_snapshots()
            self._release()

    def __enter__(self) -> CollectionStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_maintenance(self, timeout: float | None = None) -> bool:
        """Wait for background index rebuilds; True when none is left running."""
        return wait_for_threads(self._threads_lock, self._threads, timeout)

    def _release(self) -> None:
        for conn in [*self._readers, *([self._writer] if self._writer else [])]:
            try:
                conn.close()
            except sqlite3.Error:
                logger.exception("closing a SQLite connection failed")
        self._readers, self._idle_readers, self._writer = [], [], None
        self._collections.clear()
        self._source_options.clear()
        self._payload.clear()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _lock_data_dir(self) -> int | None:
        """One process per data directory: a second one would hold a stale index."""
        path = self.data_dir / "store.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            if not self.read_only:
                raise
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                return None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnavailableError(f"{self.data_dir} is in use by another store (process)") from None
        return fd

    def _connect(self, *, read_only: bool) -> sqlite3.Connection:
        uri = self.path.resolve().as_uri() + ("?mode=ro" if read_only else "")
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10.0)
        sqlite_payload.register_functions(conn)
        if not read_only:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()[0][0]
            if mode != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journaling (got {mode!r})")
            conn.execute("PRAGMA synchronous = FULL")
            if self.max_db_bytes is not None:
                page_size = conn.execute("PRAGMA page_size").fetchall()[0][0]
                conn.execute(f"PRAGMA max_page_count = {max(1, self.max_db_bytes // page_size)}")
        return conn

    @staticmethod
    def _migrate_sources(conn: sqlite3.Connection) -> None:
        """Add the source column and tables to a database of an earlier version (idempotent)."""
        columns = {row[1] for row in conn.execute("PRAGMA table_info(collections)").fetchall()}
        if "source" not in columns:
            conn.execute(_SOURCE_COLUMN)
        conn.executescript(_SOURCE_SCHEMA)

    @staticmethod
    def _source_schema_present(conn: sqlite3.Connection) -> bool:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(collections)").fetchall()}
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name IN ('document_sources', 'document_thumbnails')"
            ).fetchall()
        }
        return "source" in columns and len(tables) == 2

    def _check_open(self) -> sqlite3.Connection:
        if self._writer is None:
            raise StoreUnavailableError("the collection store is not open")
        return self._writer

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query on a pooled read-only connection (fully fetched: no snapshot stays open).

        A pool rather than thread-locals: the HTTP threadpool retires idle threads, and their
        connections would otherwise stay open until ``close``.
        """
        self._check_open()
        with self._readers_lock:
            conn = self._idle_readers.pop() if self._idle_readers else None
        try:
            if conn is None:
                conn = self._connect(read_only=True)
                with self._readers_lock:
                    self._readers.append(conn)
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            if _is_bug(exc):
                raise
            raise _unavailable(exc, "read the database") from exc
        finally:
            if conn is not None:
                with self._readers_lock:
                    if conn in self._readers:  # not closed by close() meanwhile
                        self._idle_readers.append(conn)

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE on the writer; the body COMMITs. Rolled back on any error or if left open."""
        conn = self._check_open()
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield conn
        except BaseException as exc:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    logger.exception("rollback failed")
            if isinstance(exc, sqlite3.Error) and not _is_bug(exc):
                raise _unavailable(exc, action) from exc
            raise
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    # --- collections ------------------------------------------------------------------------

    def _resolve_options(self, kind: str, options: dict[str, Any] | None) -> dict[str, Any]:
        resolved = resolve_index_options(kind, options, self._defaults, PRECISIONS)
        if kind == "ivf" and resolved["precision"] == "binary":
            raise InvalidParameterError("precision 'binary' is for hnsw collections (FAISS IndexBinaryHNSW)")
        return resolved

    def _get(self, name: str) -> _Collection:
        self._check_open()
        coll = self._collections.get(check_collection_name(name))
        if coll is None:
            raise CollectionNotFoundError(f"collection {name!r} does not exist")
        return coll

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
        """Create a collection; an existing one is returned if dim, type and given options agree.

        ``source``: source options (``service/storage/sources.py``); on an existing collection
        the ones given are changed (they do not concern the index). ``indexes``: the payload
        indexes (``service/storage/payload.py``), ``{key: type}``; on an existing collection
        they replace its declaration, and the new ones are built in the background."""
        self._check_open()
        check_collection_name(name)
        if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim <= MAX_DIM:
            raise InvalidParameterError(f"dim must be an integer from 1 to {MAX_DIM}")
        resolved = self._resolve_options(index, options)
        resolve_source_options(source)  # checked before anything is written
        if indexes is not None:
            indexes = check_payload_indexes(indexes)
        with self._write_lock:
            coll = self._collections.get(name)
            if coll is not None:
                if (
                    not exist_ok
                    or coll.dim != dim
                    or coll.kind != index
                    or any(coll.options.get(key) != resolved[key] for key in options or {})
                ):
                    raise CollectionExistsError(
                        f"collection {name!r} exists (dim {coll.dim}, index {coll.kind}, "
                        f"options {coll.options})"
                    )
                current = self._source_options.get(name, LEGACY_SOURCE_OPTIONS)
                wanted = resolve_source_options(source, current)
                if wanted != current:
                    if not self._has_sources:
                        raise StoreUnavailableError("this read-only database has no source tables")
                    with self._transaction("change the source options") as conn:
                        conn.execute(
                            "UPDATE collections SET source = ? WHERE name = ?", (json.dumps(wanted), name)
                        )
                        conn.execute("COMMIT")
                    self._source_options[name] = wanted
                if indexes is not None:
                    self._declare_payload(name, indexes)
                return self.describe(name)
            with self._transaction("create the collection") as conn:
                coll = self._insert_collection(conn, name, dim, index, resolved, source)
                if indexes:
                    state = {
                        key: {"type": kind, "ready": True, "upto": 0, "done": 0}
                        for key, kind in indexes.items()
                    }
                    conn.execute(
                        "UPDATE collections SET payload_indexes = ? WHERE name = ?", (json.dumps(state), name)
                    )
                    self._payload[name] = state
                conn.execute("COMMIT")
            self._collections[name] = coll
            return self.describe(name)

    def _insert_collection(
        self,
        conn: sqlite3.Connection,
        name: str,
        dim: int,
        kind: str,
        options: dict[str, Any],
        source: dict[str, Any] | None = None,
    ) -> _Collection:
        now = time.time()
        sources = resolve_source_options(source)
        conn.execute(
            "INSERT INTO collections (name, dim, index_type, options, created_at, source) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (name, dim, kind, json.dumps(options), now, json.dumps(sources)),
        )
        self._source_options[name] = sources  # a rolled-back create leaves no _collections entry
        self._payload[name] = {}
        index = new_index(dim, kind, options, tombstone_ratio=self.tombstone_rebuild_ratio)
        return _Collection(name, dim, kind, options, now, LiveIndex(index))

    def list_collections(self) -> list[dict[str, Any]]:
        self._check_open()
        return [
            self.describe(coll.name)
            for coll in sorted(list(self._collections.values()), key=lambda c: c.name)
        ]

    def describe(self, name: str) -> dict[str, Any]:
        """``{"name", "count", "dim", "index", "created_at"}``, the source options
        (``store_source``, ``thumbnail_size``, ``thumbnail_format``), the payload ``indexes``
        (``{key: type}``) and ``indexing`` (the keys whose index is still being built)."""
        state = self._payload.get(name, {})
        return {
            **self._get(name).describe(),
            **self._source_options.get(name, LEGACY_SOURCE_OPTIONS),
            "indexes": sqlite_payload.declared(state),
            "indexing": sorted(key for key, entry in state.items() if not entry["ready"]),
        }

    def source_options(self, name: str) -> dict[str, Any]:
        """The collection's source options (``service/storage/sources.py``)."""
        self._get(name)
        return dict(self._source_options.get(name, LEGACY_SOURCE_OPTIONS))

    def delete_collection(self, name: str) -> None:
        with self._write_lock:
            coll = self._get(name)
            with self._transaction("delete the collection") as conn:
                conn.execute("DELETE FROM documents WHERE collection = ?", (name,))
                conn.execute("DELETE FROM collections WHERE name = ?", (name,))
                with coll.live.lock.write():
                    conn.execute("COMMIT")
                    coll.live.retired = True
                    del self._collections[name]
                    self._source_options.pop(name, None)
                    self._payload.pop(name, None)

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
        """Store documents all or nothing; an existing id gets the new vector and metadata.

        Creates the collection with this batch's dimension (and ``index``, default flat) if
        it does not exist. ``sources``: one ``Source`` (or None) per document, kept when the
        collection's ``store_source`` is on, in the same transaction; a replaced document
        keeps only its new source. Returns the stored ids once they are durable.
        """
        self._check_open()
        ids, vectors, texts = check_upsert_batch(name, ids, vectors, metadata, self.max_metadata_bytes)
        if not ids:
            return []
        kept = check_sources(sources, len(ids))
        if index is not None:
            self._resolve_options(index, None)
        dim = vectors.shape[1]
        with self._write_lock:
            coll = self._collections.get(name)
            if coll is not None and coll.dim != dim:
                raise DimensionMismatchError(f"collection {name!r} holds {coll.dim}-d vectors, got {dim}-d")
            if coll is not None and index is not None and index != coll.kind:
                raise CollectionExistsError(f"collection {name!r} exists with index type {coll.kind!r}")
            if coll is None and dim > MAX_DIM:
                raise InvalidParameterError(f"vectors have {dim} dimensions, over the limit of {MAX_DIM}")
            now = time.time()
            with self._transaction("store the documents") as conn:
                created = coll is None
                if coll is None:
                    kind = index or "flat"
                    coll = self._insert_collection(conn, name, dim, kind, self._resolve_options(kind, None))
                old = self._existing_rows(conn, name, ids)
                removed = np.array([old[doc_id][0] for doc_id in ids if doc_id in old], np.int64)
                conn.executemany("DELETE FROM documents WHERE row_id = ?", [(int(r),) for r in removed])
                labels = np.arange(len(ids), dtype=np.int64) + self._next_row_id(conn)
                conn.executemany(
                    "INSERT INTO documents (row_id, collection, id, metadata, created_at, updated_at, vector) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            int(label),
                            name,
                            doc_id,
                            text,
                            old[doc_id][1] if doc_id in old else now,
                            now,
                            vector.tobytes(),
                        )
                        for label, doc_id, text, vector in zip(labels, ids, texts, vectors, strict=True)
                    ],
                )
                if self._source_options.get(name, LEGACY_SOURCE_OPTIONS)["store_source"]:
                    self._insert_sources(conn, labels, kept)
                sqlite_payload.fill(
                    conn, name, sqlite_payload.declared(self._payload.get(name, {})), int(labels[0])
                )
                with coll.live.lock.write():
                    conn.execute("COMMIT")
                    self._apply_committed(coll, removed, labels, vectors)
            if created:
                self._collections[name] = coll
            self._maybe_rebuild(coll)
        return ids

    @staticmethod
    def _insert_sources(conn: sqlite3.Connection, labels: np.ndarray, sources: list[Source | None]) -> None:
        rows = [(int(label), src) for label, src in zip(labels, sources, strict=True) if src is not None]
        conn.executemany(
            "INSERT INTO document_sources (row_id, text) VALUES (?, ?)", [(r, src.text) for r, src in rows]
        )
        conn.executemany(
            "INSERT INTO document_thumbnails (row_id, idx, media_type, data) VALUES (?, ?, ?, ?)",
            [(r, i, t.stored_type, t.data) for r, src in rows for i, t in enumerate(src.thumbnails)],
        )

    def _existing_rows(
        self, conn: sqlite3.Connection, name: str, ids: list[str]
    ) -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for doc_id, row_id, created_at in conn.execute(
                f"SELECT id, row_id, created_at FROM documents WHERE collection = ? AND id IN "
                f"({', '.join('?' * len(chunk))})",
                [name, *chunk],
            ).fetchall():
                found[doc_id] = (row_id, created_at)
        return found

    @staticmethod
    def _next_row_id(conn: sqlite3.Connection) -> int:
        # AUTOINCREMENT's counter: ids of deleted rows are never handed out again.
        seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'documents'").fetchall()
        top = conn.execute("SELECT max(row_id) FROM documents").fetchall()[0][0]
        return max(seq[0][0] if seq else 0, top or 0) + 1

    def _apply_committed(
        self, coll: _Collection, removed: np.ndarray, labels: np.ndarray, vectors: np.ndarray
    ) -> None:
        try:
            coll.live.apply(removed, labels, vectors)
        except Exception:
            logger.exception("index update of %r failed after commit; reloading it from SQLite", coll.name)
            coll.live.replace(self._load_index(coll.name, coll.dim, coll.kind, coll.options))

    def get(self, name: str, doc_id: str, *, with_vector: bool = False) -> dict[str, Any]:
        """``{"id", "metadata", "created_at", "updated_at", "text", "thumbnails", "videos"}``
        (the source's text or None, how many thumbnails it has, and which are videos'
        posters with the videos' durations) plus ``"vector"`` (unit norm) if asked."""
        coll = self._get(name)
        check_doc_id(doc_id)
        source = (
            "(SELECT text FROM document_sources AS s WHERE s.row_id = d.row_id), "
            "(SELECT json_group_array(media_type) FROM "
            "(SELECT media_type FROM document_thumbnails AS t WHERE t.row_id = d.row_id ORDER BY idx))"
            if self._has_sources
            else "NULL, '[]'"
        )
        rows = self._read(
            f"SELECT d.metadata, d.created_at, d.updated_at, d.vector, {source} FROM documents AS d "
            "WHERE d.collection = ? AND d.id = ?",
            (name, doc_id),
        )
        if not rows:
            raise DocumentNotFoundError(f"document {shown(doc_id)} is not in collection {name!r}")
        meta, created_at, updated_at, blob, text, thumbnail_types = rows[0]
        types = json.loads(thumbnail_types)
        doc = {
            "id": doc_id,
            "metadata": None if meta is None else json.loads(meta),
            "created_at": created_at,
            "updated_at": updated_at,
            "text": text,
            "thumbnails": len(types),
            "videos": video_durations(types),
        }
        if with_vector:
            doc["vector"] = np.frombuffer(blob, np.float32).reshape(coll.dim).copy()
        return doc

    def thumbnail(self, name: str, doc_id: str, index: int = 0) -> Thumbnail:
        """The document's ``index``-th thumbnail (0: its first image's)."""
        self._get(name)
        check_doc_id(doc_id)
        if self._has_sources:
            rows = self._read(
                "SELECT t.media_type, t.data FROM documents AS d LEFT JOIN document_thumbnails AS t "
                "ON t.row_id = d.row_id AND t.idx = ? WHERE d.collection = ? AND d.id = ?",
                (int(index), name, doc_id),
            )
        else:
            rows = self._read(
                "SELECT NULL, NULL FROM documents WHERE collection = ? AND id = ?", (name, doc_id)
            )
        if not rows:
            raise DocumentNotFoundError(f"document {shown(doc_id)} is not in collection {name!r}")
        if rows[0][0] is None:
            raise ThumbnailNotFoundError(f"document {shown(doc_id)} has no thumbnail {index}")
        return Thumbnail.from_stored(rows[0][0], rows[0][1])

    def delete(self, name: str, doc_id: str) -> None:
        check_doc_id(doc_id)
        with self._write_lock:
            coll = self._get(name)
            with self._transaction("delete the document") as conn:
                rows = conn.execute(
                    "SELECT row_id FROM documents WHERE collection = ? AND id = ?", (name, doc_id)
                ).fetchall()
                if not rows:
                    raise DocumentNotFoundError(f"document {shown(doc_id)} is not in collection {name!r}")
                conn.execute("DELETE FROM documents WHERE row_id = ?", (rows[0][0],))
                with coll.live.lock.write():
                    conn.execute("COMMIT")
                    self._apply_committed(
                        coll,
                        np.array([rows[0][0]], np.int64),
                        np.empty(0, np.int64),
                        np.empty((0, coll.dim), np.float32),
                    )
            self._maybe_rebuild(coll)

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        """Which of ``ids`` are stored (for resumable ingest); empty if the collection is absent."""
        self._check_open()
        if isinstance(ids, str):
            raise InvalidNameError("ids must be a list of strings, not one string")
        ids = [check_doc_id(doc_id) for doc_id in ids]
        if check_collection_name(name) not in self._collections:
            return set()
        found: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            found.update(
                row[0]
                for row in self._read(
                    f"SELECT id FROM documents WHERE collection = ? AND id IN ({', '.join('?' * len(chunk))})",
                    [name, *chunk],
                )
            )
        return found

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
        coll = self._get(name)
        if cursor is not None:
            check_doc_id(cursor)
        rows = self._read(
            "SELECT id, metadata, created_at, updated_at, vector, row_id FROM documents "
            "WHERE collection = ? AND (? IS NULL OR id > ?) ORDER BY id LIMIT ?",
            (name, cursor, cursor, limit + 1),
        )
        more, rows = len(rows) > limit, rows[:limit]
        sources = self._sources_of([row[5] for row in rows]) if with_source else {}
        docs = []
        for doc_id, meta, created_at, updated_at, blob, row_id in rows:
            doc = {
                "id": doc_id,
                "metadata": None if meta is None else json.loads(meta),
                "created_at": created_at,
                "updated_at": updated_at,
            }
            if with_vector:
                doc["vector"] = np.frombuffer(blob, np.float32).reshape(coll.dim).copy()
            if with_source:
                doc["source"] = sources.get(row_id)
            docs.append(doc)
        return docs, (docs[-1]["id"] if more else None)

    def _sources_of(self, row_ids: list[int]) -> dict[int, Source]:
        """The sources of these rows (one read: a consistent snapshot)."""
        if not self._has_sources or not row_ids:
            return {}
        marks = ", ".join("?" * len(row_ids))
        texts: dict[int, str | None] = {}
        thumbs: dict[int, list[Thumbnail]] = {}
        for kind, row_id, text, _idx, media_type, data in self._read(
            f"SELECT 0, row_id, text, 0, NULL, NULL FROM document_sources WHERE row_id IN ({marks}) "
            f"UNION ALL SELECT 1, row_id, NULL, idx, media_type, data FROM document_thumbnails "
            f"WHERE row_id IN ({marks}) ORDER BY 1, 2, 4",
            [*row_ids, *row_ids],
        ):
            if kind == 0:
                texts[row_id] = text
            else:
                thumbs.setdefault(row_id, []).append(Thumbnail.from_stored(media_type, data))
        return {
            row_id: Source(texts.get(row_id), tuple(thumbs.get(row_id, ()))) for row_id in {*texts, *thumbs}
        }

    def collection_options(self, name: str) -> dict[str, Any]:
        """The collection's index options as stored (for migration)."""
        return dict(self._get(name).options)

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
        """Up to ``k`` hits ``{"id", "score", "metadata"}``, best first; score = cosine similarity.
        ``include`` ``"text"``: each hit has its source's ``"text"`` (or None); ``"thumbnail"``:
        its first ``Thumbnail`` (or None)."""
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
        """``search`` for each row of ``queries`` (n, dim), with one filter for all."""
        include = check_include(include)
        coll = self._get(name)
        check_k(k, self.max_k)
        q = normalised_rows(queries, what="query vector")
        if q.shape[1] != coll.dim:
            raise DimensionMismatchError(
                f"collection {name!r} holds {coll.dim}-d vectors, the query is {q.shape[1]}-d"
            )
        where, params, _ = self._compile_filter(name, filter)
        with coll.live.lock.read():
            if coll.live.retired:
                raise CollectionNotFoundError(f"collection {name!r} does not exist")
            index = coll.live.index
            if where:
                (scores, labels), _plan = self._search_filtered(
                    name, index, q, index.candidates(k), where, params, filter
                )
            else:
                scores, labels = index.search(q, index.candidates(k))
            if index.reduced:  # sq8: exact cosine of the candidates from SQLite's float32 vectors
                scores, labels = rescore(q, labels, k, self._stored_vectors)
            return self._hits(scores, labels, include)

    def keyword_search(
        self,
        name: str,
        text: str,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        *,
        include: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Up to ``k`` hits whose stored text holds any word of ``text``, best first by BM25
        (``"score"``: FTS5's ``-bm25``, higher is better); as ``search`` otherwise."""
        include = check_include(include)
        self._get(name)
        check_k(k, self.max_k)
        words = query_words(text)
        where, params, _ = self._compile_filter(name, filter)
        if not words or not self._has_text_index:
            return []
        rows = self._read(
            sqlite_text.search_sql(where or "d.collection = ?"), [fts5_query(words), *(params or [name]), k]
        )
        scores = np.array([[row[1] for row in rows]], np.float32)
        labels = np.array([[row[0] for row in rows]], np.int64)
        return self._hits(scores, labels, include)[0]

    def _compile_filter(
        self, name: str, filter: Any, per_row: bool = False
    ) -> tuple[str, list[Any], list[str]]:
        ready = sqlite_payload.ready(self._payload.get(name, {}))
        return sqlite_payload.compile_filter(name, filter, ready, per_row=per_row)

    def search_plan(self, name: str, filter: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"scanned": [keys]}``: the filter's keys that no ready payload index serves."""
        self._get(name)
        return {"scanned": self._compile_filter(name, filter)[2]}

    def _search_filtered(
        self, name: str, index: Any, q: np.ndarray, k: int, where: str, params: list[Any], filter: Any
    ) -> tuple[tuple[np.ndarray, np.ndarray], str]:
        """``planner.search_filtered`` with the filter read from SQLite (caller holds the read lock)."""
        matching: list[np.ndarray] = []
        select = f"FROM documents AS d WHERE {where}"

        def allowed() -> np.ndarray:
            if not matching:
                rows = self._read(f"SELECT d.row_id {select}", params)
                matching.append(np.fromiter((row[0] for row in rows), np.int64, len(rows)))
            return matching[0]

        def count() -> int:
            if matching or "json_each" in where:  # a scan: keep what it found
                return len(allowed())
            ready = sqlite_payload.ready(self._payload.get(name, {}))
            bounds = [
                self._read(sql, args)[0][0] for sql, args in sqlite_payload.count_queries(name, filter, ready)
            ]
            return int(min(bounds)) if bounds else int(self._read(f"SELECT count(*) {select}", params)[0][0])

        def members(labels: np.ndarray) -> np.ndarray:
            if matching:
                return np.isin(labels, matching[0])
            wanted = [int(x) for x in np.unique(labels[labels >= 0])]
            row_where, row_params, _ = self._compile_filter(name, filter, per_row=True)
            found = {
                row[0]
                for start in range(0, len(wanted), 500)
                for row in self._read(
                    f"SELECT d.row_id FROM documents AS d WHERE d.row_id IN "
                    f"({', '.join('?' * len(wanted[start : start + 500]))}) AND {row_where}",
                    [*wanted[start : start + 500], *row_params],
                )
            }
            return np.isin(labels, np.fromiter(found, np.int64, len(found)))

        return search_filtered(index, q, k, count, allowed, members)

    def _stored_vectors(self, labels: np.ndarray) -> np.ndarray:
        """The float32 vectors of rows ``labels`` (sorted, all present: the caller holds the read lock)."""
        found: dict[int, bytes] = {}
        for start in range(0, len(labels), 500):
            chunk = [int(x) for x in labels[start : start + 500]]
            for row_id, blob in self._read(
                f"SELECT row_id, vector FROM documents WHERE row_id IN ({', '.join('?' * len(chunk))})", chunk
            ):
                found[row_id] = blob
        return np.frombuffer(b"".join(found[int(x)] for x in labels), np.float32).reshape(len(labels), -1)

    def _hits(
        self, scores: np.ndarray, labels: np.ndarray, include: tuple[str, ...] = ()
    ) -> list[list[dict[str, Any]]]:
        wanted = sorted({int(label) for label in labels.ravel() if label >= 0})
        docs: dict[int, tuple[str, str | None]] = {}
        extra: dict[int, dict[str, Any]] = {}
        sources = self._has_sources and bool(include)
        columns = (
            "d.row_id, d.id, d.metadata, s.text, t.media_type, t.data FROM documents AS d "
            "LEFT JOIN document_sources AS s ON s.row_id = d.row_id "
            "LEFT JOIN document_thumbnails AS t ON t.row_id = d.row_id AND t.idx = 0"
            if sources
            else "d.row_id, d.id, d.metadata, NULL, NULL, NULL FROM documents AS d"
        )
        for start in range(0, len(wanted), 500):
            chunk = wanted[start : start + 500]
            for row_id, doc_id, meta, text, media_type, data in self._read(
                f"SELECT {columns} WHERE d.row_id IN ({', '.join('?' * len(chunk))})", chunk
            ):
                docs[row_id] = (doc_id, meta)
                if include:
                    extra[row_id] = {
                        **({"text": text} if "text" in include else {}),
                        **(
                            {"thumbnail": None if data is None else Thumbnail.from_stored(media_type, data)}
                            if "thumbnail" in include
                            else {}
                        ),
                    }
        results = []
        for row_scores, row_labels in zip(scores, labels, strict=True):
            hits = []
            for score, label in zip(row_scores, row_labels, strict=True):
                doc = docs.get(int(label))
                if doc is not None:  # label -1 (no hit); a missing row would be a bug: the lock is held
                    hits.append(
                        {
                            "id": doc[0],
                            "score": float(score),
                            "metadata": None if doc[1] is None else json.loads(doc[1]),
                            **extra.get(int(label), {}),
                        }
                    )
            results.append(hits)
        return results
