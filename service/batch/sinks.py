"""Where a batch job's vectors go: Parquet shards, or a collection of either store.

Each sink writes one block in one piece, and writing the same block again replaces it
rather than adding to it, so a block whose write is repeated (a retried task, a rerun
after a crash) never leaves duplicates or a half-written block:

- ``parquet``: ``<out>/part-<block key>.parquet``, written whole (``files.write_bytes_atomic``);
- ``store``: one call of the store's own ``upsert`` per block (``service/storage``: one
  transaction, upsert by id, vectors and sources together), into a data directory (the
  embedded SQLite + FAISS store: one writer, so the driver writes) or a PostgreSQL URL
  (writers in parallel, one store per worker process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.batch.files import locate, write_bytes_atomic
from service.batch.parquet import block_table, shard_name, table_bytes


@dataclass(frozen=True, kw_only=True)
class SinkSpec:
    kind: str  # "parquet" | "store"
    where: str  # output folder/URI, data directory or postgresql:// URL
    collection: str | None = None
    with_source: bool = False  # parquet: add the source columns
    model: str = ""

    @property
    def parallel(self) -> bool:
        """Whether Ray workers may write (else the driver does, one block at a time)."""
        from service.storage import is_postgres_url

        return self.kind == "parquet" or is_postgres_url(self.where)


class ParquetSink:
    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.out = locate(spec.where)

    def write(
        self, key: str, ids: list[str], vectors: Any, metadata: list[Any], sources: list[Any]
    ) -> str | None:
        if not ids:
            return None
        table = block_table(
            ids, vectors, metadata, sources if self.spec.with_source else None, model=self.spec.model
        )
        name = shard_name(key)
        write_bytes_atomic(self.out.child(name), table_bytes(table))
        return name

    def close(self) -> None:
        pass


class StoreSink:
    def __init__(self, spec: SinkSpec) -> None:
        from service.storage import open_store

        self.spec = spec
        self.store = open_store(spec.where)

    def source_options(self) -> dict[str, Any] | None:
        """The collection's source options when it keeps sources (defaults if it is new)."""
        from service.storage.errors import CollectionNotFoundError
        from service.storage.sources import SOURCE_DEFAULTS

        try:
            options = dict(self.store.source_options(self.spec.collection))
        except CollectionNotFoundError:
            options = dict(SOURCE_DEFAULTS)  # the first upsert creates it with the defaults
        return options if options["store_source"] else None

    def write(self, key: str, ids: list[str], vectors: Any, metadata: list[Any], sources: list[Any]) -> int:
        if ids:
            self.store.upsert(self.spec.collection, ids, vectors, metadata, sources=sources)
        return len(ids)

    def close(self) -> None:
        self.store.close()


def make_sink(spec: SinkSpec) -> Any:
    return ParquetSink(spec) if spec.kind == "parquet" else StoreSink(spec)


_OPEN: dict[SinkSpec, Any] = {}


def open_sink(spec: SinkSpec) -> Any:
    """One sink per worker process and spec (a PostgreSQL store keeps its connections)."""
    if spec not in _OPEN:
        _OPEN[spec] = make_sink(spec)
    return _OPEN[spec]
