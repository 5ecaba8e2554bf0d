"""Index maintenance of ``CollectionStore``: loading indexes from SQLite or a saved
snapshot, saving snapshots, background rebuilds, and the integrity check.

A mixin: ``CollectionStore`` (service/storage/store.py) owns the state used here (the SQLite
connections, the write lock, the collections and the rebuild threads).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.storage import snapshots as index_snapshot
from service.storage.vector_index import ApproximateIndex, LiveIndex, VectorIndex, new_index

logger = logging.getLogger("llave.store")


@dataclass(eq=False)
class _Collection:
    name: str
    dim: int
    kind: str
    options: dict[str, Any]
    created_at: float
    live: LiveIndex

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": len(self.live.index),
            "dim": self.dim,
            "index": self.kind,
            "created_at": self.created_at,
        }


def _is_bug(exc: BaseException) -> bool:
    """SQLite errors that mean a bug in our SQL rather than a disk or lock problem."""
    return isinstance(exc, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError)


class IndexMaintenance:
    data_dir: Path
    read_only: bool
    index_snapshots: bool
    background_rebuild: bool
    tombstone_rebuild_ratio: float
    _collections: dict[str, _Collection]
    _write_lock: threading.Lock
    _threads: set[threading.Thread]
    _threads_lock: threading.Lock
    _stop: threading.Event
    _check_open: Callable[[], sqlite3.Connection]

    # --- index maintenance -----------------------------------------------------------------------

    def _load_index(self, name: str, dim: int, kind: str, options: dict[str, Any]) -> VectorIndex:
        """A collection's index built from SQLite (approximate ones in exact mode, built later)."""
        conn = self._check_open()
        index = new_index(dim, kind, options, tombstone_ratio=self.tombstone_rebuild_ratio, exact=True)
        cursor = conn.execute(
            "SELECT row_id, vector FROM documents WHERE collection = ? ORDER BY row_id", (name,)
        )
        while rows := cursor.fetchmany(8192):
            good = [row for row in rows if len(row[1]) == 4 * dim]
            if len(good) != len(rows):
                logger.error(
                    "%d documents of %r have a vector of the wrong size; left out of the index",
                    len(rows) - len(good),
                    name,
                )
            if good:
                index.add(
                    np.fromiter((row[0] for row in good), np.int64, len(good)),
                    np.frombuffer(b"".join(row[1] for row in good), np.float32).reshape(-1, dim),
                )
        return index

    def _load_snapshot(self, name: str, dim: int, kind: str, options: dict[str, Any]) -> VectorIndex | None:
        """The index saved at the last clean close, when it still matches the table exactly."""
        if not self.index_snapshots or kind not in ("hnsw", "ivf"):
            return None
        if not index_snapshot.snapshot_path(self.data_dir, name).is_dir():
            return None
        started = time.monotonic()
        rows = self._check_open().execute(
            "SELECT row_id FROM documents WHERE collection = ? ORDER BY row_id", (name,)
        )
        live = np.fromiter((row[0] for row in rows), np.int64)
        index = index_snapshot.load(
            self.data_dir, name, dim, kind, options, live, tombstone_ratio=self.tombstone_rebuild_ratio
        )
        if index is not None:
            logger.info(
                "loaded the saved %s index of %r (%d vectors) in %.1f s",
                kind,
                name,
                len(index),
                time.monotonic() - started,
            )
        return index

    def _save_snapshots(self) -> None:
        """Save each built approximate index; drop snapshots of deleted collections (never raises)."""
        try:
            for coll in self._collections.values():
                index = coll.live.index
                if not isinstance(index, ApproximateIndex) or index.mode == "exact" or coll.live.retired:
                    continue
                started = time.monotonic()
                with coll.live.lock.read():
                    index_snapshot.save(self.data_dir, coll.name, index)
                logger.info(
                    "saved the %s index of %r (%d vectors) in %.1f s",
                    coll.kind,
                    coll.name,
                    len(index),
                    time.monotonic() - started,
                )
            index_snapshot.remove_stale(self.data_dir, set(self._collections))
        except Exception:  # e.g. a full disk: the next start rebuilds instead
            logger.exception("saving index snapshots failed; the next start rebuilds the indexes")

    def _maybe_rebuild(self, coll: _Collection) -> None:
        """Start a rebuild if the index asks for one (caller holds the write lock)."""
        if not coll.live.needs_rebuild():
            return
        coll.live.rebuilding = True
        if not self.background_rebuild:
            self._rebuild(coll, self._stop)
            return
        thread = threading.Thread(
            target=self._rebuild, args=(coll, self._stop), daemon=True, name=f"store-rebuild-{coll.name}"
        )
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    def _rebuild(self, coll: _Collection, stop: threading.Event) -> None:
        started = time.monotonic()
        try:
            fresh = coll.live.rebuild(stop.is_set)
            if fresh is not None:
                logger.info(
                    "rebuilt the %s index of %r (%d vectors) in %.1f s",
                    coll.kind,
                    coll.name,
                    len(fresh),
                    time.monotonic() - started,
                )
        except Exception:
            logger.exception("rebuilding the index of %r failed; the current index stays in use", coll.name)
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    # --- checks --------------------------------------------------------------------------------

    def integrity_check(self) -> list[str]:
        """Problems found (empty when fine): SQLite's integrity_check, then index vs table."""
        problems: list[str] = []
        with self._write_lock:
            conn = self._check_open()
            try:
                result = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
                if result != ["ok"]:
                    problems += [f"sqlite: {line}" for line in result]
                stored = {
                    row[0]: row[1:]
                    for row in conn.execute("SELECT name, dim, index_type FROM collections").fetchall()
                }
                orphans = conn.execute(
                    "SELECT count(*) FROM documents WHERE collection NOT IN (SELECT name FROM collections)"
                ).fetchall()[0][0]
                if orphans:
                    problems.append(f"{orphans} documents belong to no collection")
                for name in sorted(set(stored) | set(self._collections)):
                    coll = self._collections.get(name)
                    if coll is None or name not in stored:
                        problems.append(
                            f"collection {name!r} is {'missing from' if coll is None else 'only in'} memory"
                        )
                        continue
                    if stored[name] != (coll.dim, coll.kind):
                        problems.append(
                            f"collection {name!r}: SQLite says {stored[name]}, memory {(coll.dim, coll.kind)}"
                        )
                    with coll.live.lock.read():
                        row_ids = np.array(
                            [
                                row[0]
                                for row in conn.execute(
                                    "SELECT row_id FROM documents WHERE collection = ?", (name,)
                                ).fetchall()
                            ],
                            np.int64,
                        )
                        bad_size = conn.execute(
                            "SELECT count(*) FROM documents WHERE collection = ? AND length(vector) != ?",
                            (name, 4 * coll.dim),
                        ).fetchall()[0][0]
                        labels = coll.live.index.labels()
                    if bad_size:
                        problems.append(f"collection {name!r}: {bad_size} vectors of the wrong size")
                    if len(labels) != len(row_ids):
                        problems.append(
                            f"collection {name!r}: {len(row_ids)} documents in SQLite, "
                            f"{len(labels)} in the index"
                        )
                    if len(np.unique(labels)) != len(labels):
                        problems.append(f"collection {name!r}: duplicate entries in the index")
                    for what, extra in (
                        ("missing from the index", np.setdiff1d(row_ids, labels)),
                        ("in the index but not in SQLite", np.setdiff1d(labels, row_ids)),
                    ):
                        if len(extra):
                            problems.append(f"collection {name!r}: {len(extra)} documents {what}")
            except sqlite3.Error as exc:
                if _is_bug(exc):
                    raise
                problems.append(f"sqlite error: {exc}")
        return problems
