"""Errors raised by the collection store (``service/storage/store.py``).

They carry no HTTP knowledge; ``service/http/errors.py`` maps each class to a status code.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class CollectionNotFoundError(StoreError):
    """The named collection does not exist (404)."""


class DocumentNotFoundError(StoreError):
    """The document id does not exist in the collection (404)."""


class InvalidNameError(StoreError):
    """A collection name or document id is not allowed (422)."""


class DimensionMismatchError(StoreError):
    """A vector's dimension differs from its collection's (422)."""


class InvalidVectorError(StoreError):
    """A vector holds NaN or infinite values, or is all zeros (422)."""


class InvalidFilterError(StoreError):
    """A metadata filter is malformed (422)."""


class DuplicateIdError(StoreError):
    """An id appears more than once in one upsert request (422)."""


class CollectionExistsError(StoreError):
    """An explicit create asked for options that conflict with an existing collection (409)."""


class StoreUnavailableError(StoreError):
    """The data directory cannot be written (disk full, read-only, I/O error) (503)."""


class InvalidMetadataError(StoreError):
    """Document metadata is not a JSON object, cannot be serialised, or is too large (422)."""


class InvalidParameterError(StoreError):
    """An index type, collection option, dimension or search ``k`` is not allowed (422)."""
