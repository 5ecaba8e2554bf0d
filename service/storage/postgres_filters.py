"""Filters and payload indexes of the PostgreSQL store (``service/storage/payload.py``).

Undeclared keys are filtered on the jsonb column (containment ``@>`` served by the table's
GIN index, or a scan). A declared key gets an expression index on its typed value, btree,
so equality, any-of and ranges read only the matching entries, and PostgreSQL keeps
statistics of the expression (``ANALYZE``) from which the planner estimates how many
documents a filter selects:

- ``keyword``: ``CASE WHEN jsonb_typeof(metadata -> 'k') = 'string' THEN metadata ->> 'k' END``
- ``integer``/``float``: the same for ``'number'``, cast to ``numeric`` (exact; 1 = 1.0)
- ``datetime``: ``llave_epoch(...)`` of the string: seconds since 1970 for the ISO 8601 form
  of ``payload.ISO_DATETIME``, else NULL (an IMMUTABLE function with its time zone pinned
  to UTC, so an expression index may use it).

A query must spell an expression exactly as its index does for PostgreSQL to use the
index, so the key is written into the SQL as a quoted literal, never as a parameter.
Indexes are created ``CONCURRENTLY`` (writes go on) by a background thread of the process
that changed the declaration, then marked ready in ``llave_collections.payload_indexes``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from service.storage.payload import ISO_DATETIME, range_bounds, split_clauses
from service.storage.validation import RANGE_OPS, FilterClause, parse_filter

EPOCH_FUNCTION = f"""
CREATE OR REPLACE FUNCTION llave_epoch(t text) RETURNS double precision
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE SET TimeZone = 'UTC' AS $$
BEGIN
    IF t !~ '{ISO_DATETIME}' THEN RETURN NULL; END IF;
    RETURN extract(epoch FROM t::timestamptz);
EXCEPTION WHEN others THEN RETURN NULL;
END $$;
"""
COLUMN = "ALTER TABLE llave_collections ADD COLUMN IF NOT EXISTS payload_indexes jsonb"


def literal(text: str) -> str:
    """A SQL string literal (standard_conforming_strings; keys hold no control characters)."""
    return "'" + text.replace("'", "''") + "'"


def typed_value(key: str, kind: str) -> str:
    """The indexed expression of ``key`` for an index of ``kind``."""
    k = literal(key)
    if kind == "keyword":
        return f"(CASE WHEN jsonb_typeof(metadata -> {k}) = 'string' THEN metadata ->> {k} END)"
    if kind == "datetime":
        return f"llave_epoch(CASE WHEN jsonb_typeof(metadata -> {k}) = 'string' THEN metadata ->> {k} END)"
    return f"(CASE WHEN jsonb_typeof(metadata -> {k}) = 'number' THEN (metadata ->> {k})::numeric END)"


def index_name(table: str, key: str, kind: str) -> str:
    digest = hashlib.sha256(json.dumps([key, kind]).encode()).hexdigest()[:16]
    return f"{table}_p_{digest}"


def create_index_sql(table: str, key: str, kind: str) -> str:
    return (
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index_name(table, key, kind)} "
        f"ON {table} (({typed_value(key, kind)}))"
    )


def _indexed_clause(kind: str, clause: FilterClause, params: list[Any]) -> list[str]:
    key, equal, ranges, negated = clause
    value = typed_value(key, kind)
    cast = "text" if kind == "keyword" else "numeric"
    conds = []

    def any_of(values: list[Any]) -> str:
        params.append([v for v in values if not (isinstance(v, str) and "\x00" in v)])
        return f"{value} = ANY(%s::{cast}[])"

    if equal is not None:
        conds.append(any_of(equal))
    if ranges:
        dated, bounds = range_bounds(key, ranges)
        conds += [f"{value} {RANGE_OPS[op]} %s::{'float8' if dated else 'numeric'}" for op in bounds]
        params.extend(bounds.values())
    if negated is not None:
        conds.append(f"NOT coalesce({any_of(negated)}, false)")
    return conds


def _scan_clause(clause: FilterClause, params: list[Any]) -> list[str]:
    key, equal, ranges, negated = clause
    conds = []

    def equality(values: list[Any]) -> str:
        ors = []
        for v in values:
            if isinstance(v, str) and "\x00" in v:  # jsonb cannot hold it, so no stored value has it
                ors.append("false")
                continue
            ors.append("metadata @> %s::jsonb")
            params.append(json.dumps({key: v}, ensure_ascii=False))
        params.append(key)
        return f"(({' OR '.join(ors)}) AND jsonb_typeof(metadata -> %s) <> 'array')"

    if equal is not None:
        conds.append(equality(equal))
    if ranges:
        dated, bounds = range_bounds(key, ranges)
        if dated:
            value = "llave_epoch(metadata ->> %s)"
            conds.append(f"(jsonb_typeof(metadata -> %s) = 'string' AND "
                         f"{' AND '.join(f'{value} {RANGE_OPS[op]} %s' for op in bounds)})")  # fmt: skip
        else:
            value = "(metadata ->> %s)::numeric"
            conds.append(f"(jsonb_typeof(metadata -> %s) = 'number' AND "
                         f"{' AND '.join(f'{value} {RANGE_OPS[op]} %s' for op in bounds)})")  # fmt: skip
        params.append(key)
        for v in bounds.values():
            params += [key, v]
    if negated is not None:
        conds.append(f"NOT coalesce(({equality(negated)}), false)")
    return conds


def compile_filter(filter: Any, indexes: dict[str, str] | None = None) -> tuple[str, list[Any], list[str]]:
    """(SQL condition on the documents table, its parameters, the keys scanned).

    Same semantics as the embedded store's (``validation.scan_clause``): type-aware
    equality, ``null`` only matches an explicit null, numbers by value, a field holding an
    array never equal to a value. Clauses on ready payload indexes (``indexes``) use their
    expressions; the others use jsonb containment ``metadata @> {"field": value}`` (the GIN
    index) plus a check that the field is not an array (``@>`` would find a value inside one).
    """
    indexed, scanned = split_clauses(parse_filter(filter), indexes or {})
    params: list[Any] = []
    conds = [c for clause in indexed for c in _indexed_clause((indexes or {})[clause[0]], clause, params)]
    conds += [c for clause in scanned for c in _scan_clause(clause, params)]
    return " AND ".join(conds), params, sorted({clause[0] for clause in scanned})


def compile_jsonb_filter(filter: Any) -> tuple[str, list[Any]]:
    """``compile_filter`` without payload indexes."""
    where, params, _ = compile_filter(filter)
    return where, params


# --- keyword search (service/storage/hybrid.py) -------------------------------------------------

# The documents' text as a tsvector: the GIN index's expression, spelled the same in queries.
TEXT_VECTOR = "to_tsvector('simple', coalesce(source_text, ''))"


def create_text_index_sql(table: str) -> str:
    return f"CREATE INDEX IF NOT EXISTS {table}_text ON {table} USING gin ({TEXT_VECTOR})"


def keyword_sql(table: str, words: list[str], where: str) -> str:
    """Documents whose text holds any of ``words`` (one ``plainto_tsquery`` parameter each, ORed),
    ranked by ``ts_rank_cd``; parameters: the words, then ``where``'s, then the limit."""
    query = " || ".join(["plainto_tsquery('simple', %s)"] * len(words))
    cond = f"AND {where}" if where else ""
    return (
        f"SELECT id, metadata, ts_rank_cd({TEXT_VECTOR}, q.q) AS score FROM {table}, (SELECT {query} AS q) AS q "
        f"WHERE {TEXT_VECTOR} @@ q.q {cond} ORDER BY score DESC, id LIMIT %s"
    )
