"""Validation of what callers hand the collection store: collection names, document
ids, metadata and metadata filters (compiled to SQL). Pure functions; they raise the
typed errors of ``service/storage/errors.py``."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from service.storage.errors import (
    DuplicateIdError,
    InvalidFilterError,
    InvalidMetadataError,
    InvalidNameError,
    InvalidVectorError,
)

MAX_DIM = 65536
MAX_ID_CHARS = 512
MAX_FILTER_KEYS, MAX_FILTER_KEY_CHARS, MAX_FILTER_VALUES = 32, 256, 1024
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SURROGATES = re.compile(r"[\ud800-\udfff]")
_FORBIDDEN_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # control chars, lone surrogates


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_collection_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(
            f"invalid collection name {shown(name)}: use 1-128 characters from "
            "A-Z a-z 0-9 _ . -, starting with a letter or digit"
        )
    return name


def check_doc_id(doc_id: Any) -> str:
    if not isinstance(doc_id, str) or not 0 < len(doc_id) <= MAX_ID_CHARS or _FORBIDDEN_CHARS.search(doc_id):
        raise InvalidNameError(
            f"invalid document id {shown(doc_id)}: use a non-empty string of at most "
            f"{MAX_ID_CHARS} characters without control characters"
        )
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


def check_upsert_batch(
    name: Any, ids: Any, vectors: Any, metadata: Any, max_metadata_bytes: int
) -> tuple[list[str], Any, list[str | None]]:
    """The checks every backend runs on an upsert before it touches storage: the collection
    name, each id, no id twice, one finite non-zero vector (L2-normalised here) and one
    metadata entry per id. Returns (ids, vectors, metadata as JSON text); ids is empty (and
    vectors None) for an empty batch."""
    from service.storage.vector_index import normalised_rows

    check_collection_name(name)
    if isinstance(ids, str):
        raise InvalidNameError("ids must be a list of strings, not one string")
    ids = [check_doc_id(doc_id) for doc_id in ids]
    seen: set[str] = set()
    for doc_id in ids:
        if doc_id in seen:
            raise DuplicateIdError(f"document id {shown(doc_id)} appears more than once in the request")
        seen.add(doc_id)
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
    ``_ABSENT``). Numbers are finite and not booleans; ``not`` takes what equality takes."""
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
        ):
            raise InvalidFilterError(f"filter field {key!r}: {op} takes a finite number, not {shown(v)}")
    negated = value.get("not", _ABSENT)
    if isinstance(negated, dict):
        raise InvalidFilterError(f"filter field {key!r}: not takes a value or a list of values")
    if isinstance(negated, list) and not negated:
        raise InvalidFilterError(f"filter field {key!r}: not has an empty list of values")
    return ranges, negated


_ABSENT = object()


def compile_filter(filter: Any) -> tuple[str, list[Any]]:
    """SQL condition on ``documents AS d`` for ``{"field": value | [any-of values] | {operators}}``;
    "" for none.

    Matching is type-aware: ``true`` never matches ``1``, ``null`` matches only an explicit
    null (not a missing field), and numbers compare by value (``1`` matches ``1.0``).
    Operators: ``{"gte": 10, "lt": 20}`` (numbers only: a field holding a string or nothing
    does not match) and ``{"not": value | [values]}`` (every document the equality would not
    match, a missing field included); they combine with AND.
    """
    if filter is None:
        return "", []
    if not isinstance(filter, dict):
        raise InvalidFilterError("filter must be an object of field -> value or list of values")
    if len(filter) > MAX_FILTER_KEYS:
        raise InvalidFilterError(f"filter has more than {MAX_FILTER_KEYS} fields")
    clauses: list[str] = []
    params: list[Any] = []
    total = 0
    for key, value in filter.items():
        if (
            not isinstance(key, str)
            or not 0 < len(key) <= MAX_FILTER_KEY_CHARS
            or _FORBIDDEN_CHARS.search(key)
        ):
            raise InvalidFilterError(f"invalid filter field {shown(key)}")
        if isinstance(value, dict):
            ranges, negated = filter_operators(key, value)
            total += len(ranges) + (
                0 if negated is _ABSENT else len(negated) if isinstance(negated, list) else 1
            )
            if total > MAX_FILTER_VALUES:
                raise InvalidFilterError(f"filter has more than {MAX_FILTER_VALUES} values")
            if ranges:
                conds = " AND ".join(f"j.atom {RANGE_OPS[op]} ?" for op in ranges)
                clauses.append(
                    "EXISTS (SELECT 1 FROM json_each(d.metadata) AS j WHERE j.key = ? "
                    f"AND j.type IN ('integer', 'real') AND {conds})"
                )
                params += [key, *ranges.values()]
            if negated is not _ABSENT:
                sql, sub = compile_filter({key: negated})
                clauses.append(f"NOT ({sql})")
                params += sub
            continue
        if isinstance(value, list) and not value:
            raise InvalidFilterError(f"filter field {key!r} has an empty list of values")
        values = value if isinstance(value, list) else [value]
        total += len(values)
        if total > MAX_FILTER_VALUES:
            raise InvalidFilterError(f"filter has more than {MAX_FILTER_VALUES} values")
        kinds: dict[str, list[Any]] = {"null": [], "true": [], "false": [], "number": [], "text": []}
        for v in values:
            if v is None or isinstance(v, bool):
                kinds[{None: "null", True: "true", False: "false"}[v]].append(v)
            elif isinstance(v, int) and -(2**63) <= v < 2**63 or isinstance(v, float) and math.isfinite(v):
                kinds["number"].append(v)
            elif isinstance(v, str):
                if _SURROGATES.search(v):  # SQLite cannot bind it (and no stored value holds one)
                    raise InvalidFilterError(f"filter value for {key!r} holds a lone UTF-16 surrogate")
                kinds["text"].append(v)
            else:
                raise InvalidFilterError(
                    f"filter value {shown(v)} for {key!r} is not a string, finite number, boolean or null"
                )
        conds = [f"j.type = '{kind}'" for kind in ("null", "true", "false") if kinds[kind]]
        for kind, types in (("number", "'integer', 'real'"), ("text", "'text'")):
            if kinds[kind]:
                conds.append(f"(j.type IN ({types}) AND j.atom IN ({', '.join('?' * len(kinds[kind]))}))")
        # json_each decodes keys, so any key works (a '$."key"' path breaks on quotes/escapes).
        clauses.append(
            f"EXISTS (SELECT 1 FROM json_each(d.metadata) AS j WHERE j.key = ? AND ({' OR '.join(conds)}))"
        )
        params += [key, *kinds["number"], *kinds["text"]]
    return " AND ".join(clauses), params
