"""Payload-index upkeep of the PostgreSQL store: declarations and background builds.

A mixin of ``PostgresCollectionStore`` (the SQL is in ``postgres_filters.py``). The
declaration lives in ``llave_collections.payload_indexes`` as ``{key: {"type", "ready"}}``,
so every server sharing the database plans with the same indexes. Changing it drops the
indexes of removed or retyped keys in the same transaction; the new ones are created
``CONCURRENTLY`` (writes go on meanwhile) by a thread of the process that made the change,
followed by ``ANALYZE`` (the planner's estimates of each expression), then marked ready. A
build cut short (the process died) leaves the key unready; the next ``open`` of any store
process builds it again, replacing an invalid leftover index.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from service.storage.background import wait_for_threads
from service.storage.postgres_filters import create_index_sql, index_name

logger = logging.getLogger("llave.store.postgres")


def declared(state: dict[str, dict[str, Any]] | None) -> dict[str, str]:
    return {key: entry["type"] for key, entry in (state or {}).items()}


def ready(state: dict[str, dict[str, Any]] | None) -> dict[str, str]:
    return {key: entry["type"] for key, entry in (state or {}).items() if entry["ready"]}


class PostgresPayloadIndexes:
    _conn: Callable[..., Any]
    _write: Callable[[str, Any], Any]
    _table: Callable[[dict[str, Any]], str]
    _require: Callable[..., dict[str, Any]]
    _builds: set[threading.Thread]
    _builds_lock: threading.Lock

    def _declare_payload(self, conn: Any, row: dict[str, Any], indexes: dict[str, str]) -> bool:
        """Replace the declaration inside the caller's transaction (the collection row is locked);
        True when indexes are left to build (``_build_payload`` after the commit)."""
        current = row.get("payload") or {}
        if declared(current) == indexes:
            return False
        table = self._table(row)
        empty = row["count"] == 0
        state = {}
        for key, kind in indexes.items():
            if key in current and current[key]["type"] == kind:
                state[key] = current[key]
                continue
            if empty:  # nothing to index yet: created here, ready at once
                conn.execute(create_index_sql(table, key, kind).replace(" CONCURRENTLY", ""))
            state[key] = {"type": kind, "ready": empty}
        for key, entry in current.items():
            if state.get(key) is not entry:
                conn.execute(f"DROP INDEX IF EXISTS {index_name(table, key, entry['type'])}")
        conn.execute(
            "UPDATE llave_collections SET payload_indexes = %s::jsonb WHERE name = %s",
            (json.dumps(state), row["name"]),
        )
        row["payload"] = state
        return not all(entry["ready"] for entry in state.values())

    def _build_payload(self, name: str) -> None:
        """Build the collection's unready payload indexes in a background thread."""
        thread = threading.Thread(target=self._build_payload_now, args=(name,), daemon=True,
                                  name=f"store-payload-{name}")  # fmt: skip
        with self._builds_lock:
            self._builds.add(thread)
        thread.start()

    def _build_payload_now(self, name: str) -> None:
        started = time.monotonic()
        try:
            with self._conn("build the payload indexes") as conn:
                row = self._require(conn, name)
                table = self._table(row)
                todo = {k: e["type"] for k, e in (row.get("payload") or {}).items() if not e["ready"]}
                for key, kind in todo.items():
                    index = index_name(table, key, kind)
                    valid = conn.execute(
                        "SELECT i.indisvalid FROM pg_index AS i WHERE i.indexrelid = to_regclass(%s)",
                        (index,),
                    ).fetchone()
                    if valid is not None and not valid[0]:  # a build that was cut short
                        conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
                    conn.execute(create_index_sql(table, key, kind))
                conn.execute(f"ANALYZE {table}")

            def mark(conn: Any) -> None:
                row = self._require(conn, name, "FOR UPDATE")
                state = row.get("payload") or {}
                for key, kind in todo.items():
                    if key in state and state[key]["type"] == kind:
                        state[key]["ready"] = True
                conn.execute(
                    "UPDATE llave_collections SET payload_indexes = %s::jsonb WHERE name = %s",
                    (json.dumps(state), name),
                )

            self._write("mark the payload indexes ready", mark)
            logger.info("payload indexes of %r built in %.1f s", name, time.monotonic() - started)
        except Exception:
            logger.exception("building the payload indexes of %r failed; their filters scan", name)
        finally:
            with self._builds_lock:
                self._builds.discard(threading.current_thread())

    def _resume_payload_builds(self, conn: Any) -> None:
        """At open: build what a previous process left unready."""
        for (name,) in conn.execute(
            "SELECT name FROM llave_collections WHERE payload_indexes IS NOT NULL AND "
            "jsonb_path_exists(payload_indexes, '$.* ? (@.ready == false)')"
        ).fetchall():
            self._build_payload(name)

    def wait_for_maintenance(self, timeout: float | None = None) -> bool:
        """Wait for background payload-index builds; True when none is left running."""
        return wait_for_threads(self._builds_lock, self._builds, timeout)
