"""Validation of what callers hand the collection store, shared by both backends:
collection names, document ids, metadata, upsert batches, metadata filters (checked once
here, then compiled to each backend's SQL), ``k`` and index options. Pure functions; they
raise the typed errors of ``service/storage/errors.py``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from service.limits import (  # noqa: F401  (MAX_DIM, MAX_METADATA_BYTES re-exported)
    COLLECTION_NAME_PATTERN,
    MAX_COLLECTION_NAME_CHARS,
    MAX_DIM,
    MAX_FILTER_KEY_CHARS,
    MAX_FILTER_KEYS,
    MAX_FILTER_VALUES,
    MAX_ID_CHARS,
    MAX_K,
    MAX_METADATA_BYTES,
)
from service.storage.errors import (
    DuplicateIdError,
    InvalidFilterError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidParameterError,
    InvalidVectorError,
)

_NAME_RE = re.compile(COLLECTION_NAME_PATTERN)
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # control chars, lone surrogates


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid collection name {shown(name)}: use 1-{MAX_COLLECTION_NAME_CHARS} characters from "
            "A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return name


def check_doc_id(doc_id: Any) -> str:
    if not isinstance(doc_id, str) or not 0 < len(doc_id) <= MAX_ID_CHARS or _FORBIDDEN_CHARS.search(doc_id):
        raise InvalidNameError(
            f"invalid document id {shown(doc_id)}: use a non-empty string of at most "
            f"{MAX_ID_CHARS} characters without control characters"
        )
    if doc_id.endswith("/thumbnail"):
        # .../documents/{id}/thumbnail is the HTTP API's thumbnail route.
        raise InvalidNameError(f"invalid document id {shown(doc_id)}: an id must not end in '/thumbnail'")
    return doc_id


def metadata_json(metadata: Any, max_bytes: int) -> str | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or not all(isinstance(key, str) for key in metadata):
        raise InvalidMetadataError("metadata must be a JSON object with string keys, or null")
    try:
        text = json.dumps(metadata, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidMetadataError(f"metadata is not JSON-serialisable: {exc}") from exc
    if size > max_bytes:
        raise InvalidMetadataError(f"metadata is {size} bytes as JSON, over the limit of {max_bytes}")
    return text


RANGE_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def check_unique_ids(ids: Sequence[str]) -> list[str]:
    """``ids`` as a list; DuplicateIdError naming the first id that appears twice."""
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise DuplicateIdError(f"document id {shown(doc_id)} appears more than once in the request")
        seen.add(doc_id)
    return list(ids)


def check_upsert_batch(
    name: Any, ids: Any, vectors: Any, metadata: Any, max_metadata_bytes: int
) -> tuple[list[str], Any, list[str | None]]:
    """The checks every backend runs on an upsert before it touches storage: the collection
    name, each id, no id twice, one finite non-zero vector (L2-normalised here) and one
    metadata entry per id. Returns (ids, vectors, metadata as JSON text); ids is empty (and
    vectors None) for an empty batch."""
    from service.vectors import normalised_rows

    check_collection_name(name)
    if isinstance(ids, str):
        raise InvalidNameError("ids must be a list of strings, not one string")
    ids = check_unique_ids([check_doc_id(doc_id) for doc_id in ids])
    if not ids:
        return [], None, []
    rows = normalised_rows(vectors)
    if len(rows) != len(ids):
        raise InvalidVectorError(f"got {len(ids)} ids but {len(rows)} vectors")
    if metadata is not None and len(metadata) != len(ids):
        raise InvalidMetadataError(f"got {len(ids)} ids but {len(metadata)} metadata entries")
    texts = [metadata_json(m, max_metadata_bytes) for m in metadata or [None] * len(ids)]
    return ids, rows, texts


def filter_operators(key: str, value: dict[Any, Any]) -> tuple[dict[str, Any], Any]:
    """Check ``{"gt"|"gte"|"lt"|"lte": number, "not": value | [values]}``: (ranges, not-value or
    ``_ABSENT``). Numbers are finite and not booleans; bounds may instead all be ISO 8601
    datetime strings (``service/storage/payload.py``); ``not`` takes what equality takes."""
    if not value or any(op not in RANGE_OPS and op != "not" for op in value):
        raise InvalidFilterError(
            f"filter field {key!r}: an object takes operators {', '.join([*RANGE_OPS, 'not'])}"
        )
    ranges = {op: v for op, v in value.items() if op in RANGE_OPS}
    for op, v in ranges.items():
        if not (
            isinstance(v, int)
            and not isinstance(v, bool)
            and -(2**63) <= v < 2**63
            or isinstance(v, float)
            and math.isfinite(v)
            or datetime_epoch(v) is not None
        ):
            raise InvalidFilterError(
                f"filter field {key!r}: {op} takes a finite number or an ISO 8601 datetime "
                f"string, not {shown(v)}"
            )
    if len({isinstance(v, str) for v in ranges.values()}) > 1:
        raise InvalidFilterError(f"filter field {key!r}: bounds are all numbers or all datetimes")
    negated = value.get("not", _ABSENT)
    if isinstance(negated, dict):
        raise InvalidFilterError(f"filter field {key!r}: not takes a value or a list of values")
    if isinstance(negated, list) and not negated:
        raise InvalidFilterError(f"filter field {key!r}: not has an empty list of values")
    return ranges, negated


_ABSENT = object()


def check_filter_value(key: str, v: Any) -> None:
    """An equality value: a string, a finite number (int64 range), a boolean or null."""
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, int) and -(2**63) <= v < 2**63 or isinstance(v, float) and math.isfinite(v):
        return
    if isinstance(v, str):
        if _SURROGATES.search(v):  # SQLite cannot bind it, jsonb cannot hold it: no stored value has one
            raise InvalidFilterError(f"filter value for {key!r} holds a lone UTF-16 surrogate")
        return
    raise InvalidFilterError(
        f"filter value {shown(v)} for {key!r} is not a string, finite number, boolean or null"
    )


# The datetime strings both backends parse the same way (Python's fromisoformat, PostgreSQL's
# timestamptz input); PostgreSQL's index function tests the same pattern (postgres_filters.py).
ISO_DATETIME = r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?)?(Z|[+-]\d{2}:\d{2})?$"
_ISO = re.compile(ISO_DATETIME, re.ASCII)


def datetime_epoch(value: Any) -> float | None:
    """Seconds since 1970 of an ISO 8601 string (UTC when it has no offset); None otherwise."""
    if not isinstance(value, str) or not _ISO.fullmatch(value):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:  # a date that does not exist (2026-02-30)
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def range_bounds(key: str, ranges: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
    """(datetime range?, bounds): string bounds become seconds since 1970."""
    if all(_number(v) for v in ranges.values()):
        return False, ranges
    return True, {op: datetime_epoch(v) for op, v in ranges.items()}


def check_filter_key(key: Any) -> str:
    if not isinstance(key, str) or not 0 < len(key) <= MAX_FILTER_KEY_CHARS or _FORBIDDEN_CHARS.search(key):
        raise InvalidFilterError(f"invalid filter field {shown(key)}")
    return key


FilterClause = tuple[str, "list[Any] | None", dict[str, Any], "list[Any] | None"]


def parse_filter(filter: Any) -> list[FilterClause]:
    """Check a filter ``{"field": value | [any-of values] | {operators}}``; one clause per field:
    ``(field, equality values or None, {range operator: number}, not-values or None)``.

    Every backend compiles these clauses to its own SQL; this is the one place that decides
    what a valid filter is (the limits, the field names, the value types).
    """
    if filter is None:
        return []
    if not isinstance(filter, dict):
        raise InvalidFilterError("filter must be an object of field -> value or list of values")
    if len(filter) > MAX_FILTER_KEYS:
        raise InvalidFilterError(f"filter has more than {MAX_FILTER_KEYS} fields")
    clauses: list[FilterClause] = []
    total = 0
    for key, value in filter.items():
        check_filter_key(key)
        equal: list[Any] | None = None
        ranges: dict[str, Any] = {}
        negated: list[Any] | None = None
        if isinstance(value, dict):
            ranges, raw = filter_operators(key, value)
            if raw is not _ABSENT:
                negated = raw if isinstance(raw, list) else [raw]
        else:
            if isinstance(value, list) and not value:
                raise InvalidFilterError(f"filter field {key!r} has an empty list of values")
            equal = value if isinstance(value, list) else [value]
        total += len(ranges) + len(equal or ()) + len(negated or ())
        if total > MAX_FILTER_VALUES:
            raise InvalidFilterError(f"filter has more than {MAX_FILTER_VALUES} values")
        for v in [*(equal or ()), *(negated or ())]:
            check_filter_value(key, v)
        clauses.append((key, equal, ranges, negated))
    return clauses


def compile_filter(filter: Any) -> tuple[str, list[Any]]:
    """SQLite condition on ``documents AS d`` for a filter (``parse_filter``); "" for none.

    Matching is type-aware: ``true`` never matches ``1``, ``null`` matches only an explicit
    null (not a missing field), and numbers compare by value (``1`` matches ``1.0``).
    Operators: ``{"gte": 10, "lt": 20}`` (numbers only: a field holding a string or nothing
    does not match; with ISO 8601 string bounds, datetimes: only strings of that form match)
    and ``{"not": value | [values]}`` (every document the equality would not match, a missing
    field included); they combine with AND.
    """
    params: list[Any] = []
    conds = [c for clause in parse_filter(filter) for c in scan_clause(clause, params)]
    return " AND ".join(conds), params


def scan_clause(clause: FilterClause, params: list[Any]) -> list[str]:
    """SQLite conditions (ANDed) of one parsed clause, evaluated on each document's metadata
    with ``json_each``; their parameters are appended to ``params``."""
    key, equal, ranges, negated = clause

    def equality(values: list[Any]) -> str:
        kinds: dict[str, list[Any]] = {"null": [], "true": [], "false": [], "number": [], "text": []}
        for v in values:
            if v is None or isinstance(v, bool):
                kinds[{None: "null", True: "true", False: "false"}[v]].append(v)
            else:
                kinds["text" if isinstance(v, str) else "number"].append(v)
        conds = [f"j.type = '{kind}'" for kind in ("null", "true", "false") if kinds[kind]]
        for kind, types in (("number", "'integer', 'real'"), ("text", "'text'")):
            if kinds[kind]:
                conds.append(f"(j.type IN ({types}) AND j.atom IN ({', '.join('?' * len(kinds[kind]))}))")
        params.extend([key, *kinds["number"], *kinds["text"]])
        # json_each decodes keys, so any key works (a '$."key"' path breaks on quotes/escapes).
        return f"EXISTS (SELECT 1 FROM json_each(d.metadata) AS j WHERE j.key = ? AND ({' OR '.join(conds)}))"

    clauses = []
    if equal is not None:
        clauses.append(equality(equal))
    if ranges:
        dated, bounds = range_bounds(key, ranges)
        # llave_epoch: service.storage.sqlite_payload registers it on every connection
        value, types = ("llave_epoch(j.atom)", "'text'") if dated else ("j.atom", "'integer', 'real'")
        conds = " AND ".join(f"{value} {RANGE_OPS[op]} ?" for op in bounds)
        clauses.append(
            f"EXISTS (SELECT 1 FROM json_each(d.metadata) AS j WHERE j.key = ? AND j.type IN ({types}) AND {conds})"
        )
        params.extend([key, *bounds.values()])
    if negated is not None:
        clauses.append(f"NOT ({equality(negated)})")
    return clauses


# --- search and index options (both backends) ------------------------------------------------


def check_k(k: Any, max_k: int = MAX_K) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise InvalidParameterError(f"k must be an integer from 1 to {max_k}")
    return k


def search_one(
    search_many: Any, name: str, query: Any, k: int, filter: Any, **options: Any
) -> list[dict[str, Any]]:
    """``store.search``: one query (a vector, or a 1 x dim array) through ``store.search_many``."""
    if isinstance(query, np.ndarray) and query.ndim == 2:
        if query.shape[0] != 1:
            raise InvalidVectorError("search takes one query vector; use search_many for several")
        return search_many(name, query, k, filter, **options)[0]
    return search_many(name, [query], k, filter, **options)[0]


def resolve_index_options(
    kind: Any,
    options: Any,
    defaults: dict[str, dict[str, Any]],
    precisions: tuple[str, ...],
    bounds: dict[str, tuple[int, int]] | None = None,
    where: str = "",
) -> dict[str, Any]:
    """The options of a new ``kind`` index: ``defaults[kind]`` overridden by ``options``.

    Integer options are positive (``nlist``/``nprobe`` may be null: chosen from the data),
    within ``bounds`` when given; ``precision`` is one of ``precisions`` (the backend's)."""
    if kind not in defaults:
        raise InvalidParameterError(f"unknown index type {shown(kind)}; use one of {', '.join(defaults)}")
    if options is not None and not isinstance(options, dict):
        raise InvalidParameterError("index options must be an object")
    resolved = dict(defaults[kind])
    for key, value in (options or {}).items():
        if key not in resolved:
            raise InvalidParameterError(f"unknown option {shown(key)} for a {kind} index")
        if key == "precision":
            if not isinstance(value, str) or value not in precisions:
                raise InvalidParameterError(
                    f"option 'precision' must be one of {', '.join(precisions)}{where}"
                )
        elif not (value is None and key in ("nlist", "nprobe")) and (
            not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000
        ):
            raise InvalidParameterError(f"option {key!r} must be a positive integer")
        elif bounds and key in bounds and value is not None and not bounds[key][0] <= value <= bounds[key][1]:
            raise InvalidParameterError(
                f"option {key!r} must be from {bounds[key][0]} to {bounds[key][1]}{where}"
            )
        resolved[key] = value
    return resolved
