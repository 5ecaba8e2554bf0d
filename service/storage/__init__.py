"""Open a collection store from a location: a ``postgresql://`` URL (PostgreSQL + pgvector,
``service/storage/postgres.py``) or a directory (the embedded SQLite + FAISS store,
``service/storage/store.py``). Both have the same contract."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def is_postgres_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_store(location: str | Path, **options: Any) -> Any:
    """An opened store at ``location``; close it with ``close()``."""
    if is_postgres_url(location):
        from service.storage.postgres import PostgresCollectionStore

        store: Any = PostgresCollectionStore(str(location), **options)
    else:
        from service.storage.store import CollectionStore

        store = CollectionStore(Path(location), **options)
    store.open()
    return store
