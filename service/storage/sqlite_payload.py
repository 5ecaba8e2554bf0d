"""Payload indexes of the embedded store (``service/storage/payload.py``) in SQLite.

A side table holds, for each declared key of a collection and each document whose metadata
has a value of the key's type there, one entry ``(collection, key, value, row_id)``:
``keyword`` keeps the string, ``integer``/``float`` the number, ``datetime`` seconds since
1970. Its index ``(collection, key, value, row_id)`` covers every lookup, so an indexed
clause becomes ``d.row_id IN (SELECT row_id FROM payload_values WHERE ... value ...)``:
SQLite reads the matching entries, then each matching document by its row id, and nothing
else (``EXPLAIN QUERY PLAN`` shows it; tests/service/test_payload_indexes.py).

Entries are written in the writer's transaction with their document (``fill``, by row-id
range) and deleted with it by a trigger, so they never disagree with the documents. A
newly declared key is filled in the background, one chunk of row ids per transaction
(``service/storage/store.py``); until the chunk holding the last row id present when the
declaration was made is done, filters on the key scan.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from service.storage.payload import datetime_epoch, range_bounds, split_clauses
from service.storage.validation import RANGE_OPS, FilterClause, parse_filter, scan_clause

logger = logging.getLogger("llave.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS payload_values (
    collection TEXT NOT NULL, key TEXT NOT NULL, value NOT NULL, row_id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS payload_values_lookup ON payload_values (collection, key, value, row_id);
CREATE INDEX IF NOT EXISTS payload_values_row ON payload_values (row_id);
CREATE TRIGGER IF NOT EXISTS documents_payload_gone AFTER DELETE ON documents BEGIN
    DELETE FROM payload_values WHERE row_id = old.row_id;
END;
"""
# The declaration and build state per collection: {"key": {"type": ..., "ready": bool}}.
COLUMN = "ALTER TABLE collections ADD COLUMN payload_indexes TEXT"
FILL_CHUNK = 20000  # row ids per background transaction

_VALUE = {
    "keyword": ("'text'", "j.atom"),
    "integer": ("'integer', 'real'", "j.atom"),
    "float": ("'integer', 'real'", "j.atom"),
    "datetime": ("'text'", "llave_epoch(j.atom)"),
}


def register_functions(conn: sqlite3.Connection) -> None:
    """``llave_epoch(text)``: seconds since 1970 of an ISO 8601 string, else NULL."""
    conn.create_function("llave_epoch", 1, datetime_epoch, deterministic=True)


def migrate(conn: sqlite3.Connection) -> None:
    """Add the side table and the declaration column to a database of an earlier version."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(collections)").fetchall()}
    if "payload_indexes" not in columns:
        conn.execute(COLUMN)
    conn.executescript(SCHEMA)


def fill(
    conn: sqlite3.Connection, name: str, indexes: dict[str, str], first: int, last: int | None = None
) -> None:
    """Write the entries of documents ``first <= row_id (<= last)`` for the declared keys."""
    for key, kind in indexes.items():
        types, value = _VALUE[kind]
        conn.execute(
            f"INSERT INTO payload_values (collection, key, value, row_id) "
            f"SELECT d.collection, j.key, {value}, d.row_id FROM documents AS d, json_each(d.metadata) AS j "
            f"WHERE d.collection = ? AND d.row_id >= ? AND (? IS NULL OR d.row_id <= ?) AND j.key = ? "
            f"AND j.type IN ({types}) AND {value} IS NOT NULL",
            (name, first, last, last, key),
        )


def drop(conn: sqlite3.Connection, name: str, keys: list[str]) -> None:
    for key in keys:
        conn.execute("DELETE FROM payload_values WHERE collection = ? AND key = ?", (name, key))


def load(text: str | None) -> dict[str, dict[str, Any]]:
    return json.loads(text) if text else {}


def declared(state: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {key: entry["type"] for key, entry in state.items()}


def ready(state: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {key: entry["type"] for key, entry in state.items() if entry["ready"]}


def _indexed_clause(
    name: str, kind: str, clause: FilterClause, params: list[Any], per_row: bool = False
) -> list[str]:
    key, equal, ranges, negated = clause
    if per_row:  # each document's own entries (index payload_values_row): for a few given rows
        lookup = (
            "SELECT 1 FROM payload_values AS p INDEXED BY payload_values_row "
            "WHERE p.row_id = d.row_id AND collection = ? AND key = ? AND "
        )
        has, has_not = "EXISTS (", "NOT EXISTS ("
    else:  # the matching entries, read from payload_values_lookup: for all the matches
        lookup = "SELECT row_id FROM payload_values WHERE collection = ? AND key = ? AND "
        has, has_not = "d.row_id IN (", "d.row_id NOT IN ("
    conds = []
    if equal is not None:
        conds.append(f"{has}{lookup}value IN ({', '.join('?' * len(equal))}))")
        params.extend([name, key, *equal])
    if ranges:
        _, bounds = range_bounds(key, ranges)
        conds.append(f"{has}{lookup}{' AND '.join(f'value {RANGE_OPS[op]} ?' for op in bounds)})")
        params.extend([name, key, *bounds.values()])
    if negated is not None:
        conds.append(f"{has_not}{lookup}value IN ({', '.join('?' * len(negated))}))")
        params.extend([name, key, *negated])
    return conds


def compile_filter(
    name: str, filter: Any, indexes: dict[str, str], *, per_row: bool = False
) -> tuple[str, list[Any], list[str]]:
    """(SQLite condition on ``documents AS d`` selecting the collection's documents that pass,
    its parameters, the keys scanned); "" for no filter. Clauses on a ready payload index read
    it; the others scan (``validation.scan_clause``). With an indexed clause, the collection
    test is written ``+d.collection`` so that SQLite cannot drive the query from the
    collection's rows: it starts from the index entries and fetches those documents by row id.
    ``per_row``: the form for checking a few known rows (``d.row_id IN (...)`` added by the
    caller): each row's own entries are looked up, where the default form would first collect
    every match (50 ms for 50,000 of them)."""
    clauses = parse_filter(filter)
    if not clauses:
        return "", [], []
    indexed, scanned = split_clauses(clauses, indexes)
    params: list[Any] = [name]
    conds = ["+d.collection = ?" if indexed else "d.collection = ?"]
    conds += [
        c for clause in indexed for c in _indexed_clause(name, indexes[clause[0]], clause, params, per_row)
    ]
    conds += [c for clause in scanned for c in scan_clause(clause, params)]
    return " AND ".join(conds), params, sorted({clause[0] for clause in scanned})


def count_queries(name: str, filter: Any, indexes: dict[str, str]) -> list[tuple[str, list[Any]]]:
    """One count query per equality or range clause on a ready payload index: how many
    entries of the covering index it selects (1.5 ms for 50,000, where counting the
    documents through ``compile_filter``'s condition takes ~60). Each is an upper bound of
    the whole filter's matches; none when no clause qualifies."""
    queries = []
    for key, equal, ranges, _ in split_clauses(parse_filter(filter), indexes)[0]:
        for part in ((key, equal, None, None), (key, None, ranges, None)):
            params: list[Any] = []
            for cond in _indexed_clause(name, indexes[key], part, params):
                queries.append((f"SELECT count(*) FROM ({cond.removeprefix('d.row_id IN (')}", params))
    return queries


class PayloadMaintenance:
    """``CollectionStore``'s payload-index upkeep: declarations and background fills.

    A mixin, like ``maintenance.IndexMaintenance``: the store owns the state used here.
    """

    read_only: bool
    background_rebuild: bool
    _payload: dict[str, dict[str, dict[str, Any]]]
    _write_lock: Any
    _threads: set[threading.Thread]
    _threads_lock: threading.Lock
    _stop: threading.Event
    _transaction: Callable[[str], Any]

    def _declare_payload(self, name: str, indexes: dict[str, str]) -> None:
        """Replace the collection's declaration (caller holds the write lock): keys dropped or
        retyped lose their entries; new or retyped keys are filled in the background."""
        current = self._payload.get(name, {})
        if declared(current) == indexes:
            return
        with self._transaction("change the payload indexes") as conn:
            top = conn.execute("SELECT max(row_id) FROM documents WHERE collection = ?", (name,)).fetchall()
            upto = top[0][0] or 0
            state = {}
            for key, kind in indexes.items():
                if key in current and current[key]["type"] == kind:
                    state[key] = current[key]
                else:
                    state[key] = {"type": kind, "ready": upto == 0, "upto": upto, "done": 0}
            drop(conn, name, [key for key in current if state.get(key) is not current[key]])
            conn.execute(
                "UPDATE collections SET payload_indexes = ? WHERE name = ?", (json.dumps(state), name)
            )
            conn.execute("COMMIT")
        self._payload[name] = state
        self._maybe_fill_payload(name)

    def _maybe_fill_payload(self, name: str) -> None:
        """Start filling the collection's unready keys (caller holds the write lock)."""
        if self.read_only or all(entry["ready"] for entry in self._payload.get(name, {}).values()):
            return
        if not self.background_rebuild:
            self._fill_payload(name)
            return
        thread = threading.Thread(
            target=self._fill_payload, args=(name,), daemon=True, name=f"store-payload-{name}"
        )
        with self._threads_lock:
            if any(t.name == thread.name for t in self._threads):
                return  # the running fill reads the declaration afresh at every chunk
            self._threads.add(thread)
        thread.start()

    def _fill_payload(self, name: str) -> None:
        started = time.monotonic()
        try:
            while not self._stop.is_set() and self._fill_payload_chunk(name):
                pass
            logger.info("payload indexes of %r filled in %.1f s", name, time.monotonic() - started)
        except Exception:
            logger.exception("filling the payload indexes of %r failed; their filters scan", name)
        finally:
            with self._threads_lock:
                self._threads.discard(threading.current_thread())

    def _fill_payload_chunk(self, name: str) -> bool:
        """Fill one chunk of row ids of every unready key in one transaction; False when done."""
        with self._write_lock:
            state = self._payload.get(name)
            todo = {key: entry for key, entry in (state or {}).items() if not entry["ready"]}
            if not todo:
                return False
            fresh = {key: dict(entry) for key, entry in state.items()}  # type: ignore[union-attr]
            with self._transaction("fill the payload indexes") as conn:
                for key, entry in todo.items():
                    last = min(entry["upto"], entry["done"] + FILL_CHUNK)
                    fill(conn, name, {key: entry["type"]}, entry["done"] + 1, last)
                    fresh[key].update(done=last, ready=last >= entry["upto"])
                conn.execute(
                    "UPDATE collections SET payload_indexes = ? WHERE name = ?", (json.dumps(fresh), name)
                )
                conn.execute("COMMIT")
            self._payload[name] = fresh
            return True
