"""Payload indexes (Qdrant's name): the metadata keys a collection filters on, with a type.

A collection declares them (``{"kind": "keyword", "price": "float", "date": "datetime"}``)
and may change the declaration later; each backend then keeps a typed copy of those keys'
values in an index, built in the background for the documents already stored and kept in
step by every write. A filter clause on a declared key whose values have the declared type
reads only the matching entries of that index; any other clause (an undeclared key, a key
whose index is still building, a value of another type) is evaluated by a scan, and the
search says which keys were scanned.

Types, and the clauses each one serves:

- ``keyword``: string values; equality, any-of and ``not``.
- ``integer`` / ``float``: numbers (the two behave alike: JSON has one number type);
  equality, any-of, ``not`` and ranges with number bounds.
- ``datetime``: ISO 8601 strings (``YYYY-MM-DD``, optionally ``THH:MM[:SS[.ffffff]]`` and
  ``Z`` or ``+HH:MM``; no offset means UTC), kept as seconds since 1970; ranges whose bounds
  are such strings (``{"date": {"gte": "2026-01-01"}}``). A range with string bounds means
  the same on an undeclared key, by a scan.

Pure functions; the backends' SQL lives in ``sqlite_payload.py`` and ``postgres_filters.py``.
"""

from __future__ import annotations

from typing import Any

from service.limits import MAX_PAYLOAD_INDEXES, PAYLOAD_INDEX_TYPES
from service.storage.errors import InvalidParameterError
from service.storage.validation import (  # noqa: F401  (re-exported for the backends)
    ISO_DATETIME,
    check_filter_key,
    datetime_epoch,
    range_bounds,
)

INDEX_KINDS = PAYLOAD_INDEX_TYPES


def check_payload_indexes(indexes: Any) -> dict[str, str]:
    """A declaration ``{key: type}``: at most MAX_PAYLOAD_INDEXES keys, each a valid filter
    field name, each type one of INDEX_KINDS."""
    if not isinstance(indexes, dict):
        raise InvalidParameterError("indexes must be an object of metadata key -> type")
    if len(indexes) > MAX_PAYLOAD_INDEXES:
        raise InvalidParameterError(f"indexes: at most {MAX_PAYLOAD_INDEXES} keys")
    for key, kind in indexes.items():
        try:
            check_filter_key(key)
        except Exception as exc:
            raise InvalidParameterError(f"indexes: {exc}") from None
        if kind not in INDEX_KINDS:
            raise InvalidParameterError(
                f"indexes: the type of {key!r} must be one of {', '.join(INDEX_KINDS)}"
            )
    return dict(sorted(indexes.items()))


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def served_by(
    kind: str | None, equal: list[Any] | None, ranges: dict[str, Any], negated: list[Any] | None
) -> bool:
    """Whether an index of ``kind`` answers this clause exactly as the scan would."""
    values = [*(equal or ()), *(negated or ())]
    if kind == "keyword":
        return not ranges and all(isinstance(v, str) for v in values)
    if kind in ("integer", "float"):
        return all(_number(v) for v in [*values, *ranges.values()])
    if kind == "datetime":
        return not values and all(isinstance(v, str) for v in ranges.values())
    return False


def split_clauses(clauses: list[Any], indexes: dict[str, str]) -> tuple[list[Any], list[Any]]:
    """(clauses an index serves, clauses to scan) of a parsed filter, given the ready indexes."""
    indexed, scanned = [], []
    for clause in clauses:
        key, equal, ranges, negated = clause
        (indexed if served_by(indexes.get(key), equal, ranges, negated) else scanned).append(clause)
    return indexed, scanned
