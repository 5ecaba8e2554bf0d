"""The batch job's Parquet shards: their schema, how a block becomes one, how shards load.

One shard per input block, ``part-<block key>.parquet``:

- ``id``: string;
- ``vector``: ``fixed_size_list<float32>[dim]``, unit length (what ``/embed`` returns);
- ``metadata``: the document's metadata as JSON text (null when it has none);
- with ``--with-source``: ``source_text`` (string) and ``thumbnails`` (list of binary) with
  ``thumbnail_types`` (their media types), the same source a collection keeps.

The file's schema metadata names the model and the dimension. ``load_shards`` upserts shards
into a collection through the store's own upsert (``python -m service.migrate
--from-parquet``), page by page, skipping pages already there (resumable).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.batch.files import list_files, locate

logger = logging.getLogger("llave.batch")

SHARD_PREFIX, SHARD_SUFFIX = "part-", ".parquet"


def shard_name(block_key: str) -> str:
    return f"{SHARD_PREFIX}{block_key}{SHARD_SUFFIX}"


def block_table(
    ids: Sequence[str],
    vectors: np.ndarray,
    metadata: Sequence[dict[str, Any] | None],
    sources: Sequence[Any] | None,
    *,
    model: str = "",
) -> pa.Table:
    dim = int(vectors.shape[1])
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel(), type=pa.float32())
    columns: dict[str, pa.Array] = {
        "id": pa.array(list(ids), type=pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        "metadata": pa.array([None if m is None else json.dumps(m) for m in metadata], type=pa.string()),
    }
    if sources is not None:
        columns["source_text"] = pa.array([s.text if s else None for s in sources], type=pa.string())
        columns["thumbnails"] = pa.array(
            [[t.data for t in s.thumbnails] if s else [] for s in sources], type=pa.list_(pa.binary())
        )
        columns["thumbnail_types"] = pa.array(
            [[t.media_type for t in s.thumbnails] if s else [] for s in sources], type=pa.list_(pa.string())
        )
    table = pa.table(columns)
    return table.replace_schema_metadata({"llave.model": model, "llave.dim": str(dim)})


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def read_shards(where: str) -> pa.Table:
    """Every shard under an output folder, as one table (for tests and small outputs)."""
    loc = locate(where)
    names = [n for n in list_files(loc) if _is_shard(n)]
    tables = [pq.read_table(loc.child(n).path, filesystem=loc.fs) for n in names]
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def _is_shard(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return "/" not in name and base.startswith(SHARD_PREFIX) and base.endswith(SHARD_SUFFIX)


def _sources(table: pa.Table) -> list[Any] | None:
    if "source_text" not in table.column_names:
        return None
    from service.storage.sources import Source, Thumbnail

    texts = table.column("source_text").to_pylist()
    thumbs = table.column("thumbnails").to_pylist()
    types = table.column("thumbnail_types").to_pylist()
    return [
        Source(text, tuple(Thumbnail(t, d) for t, d in zip(ty, th, strict=True)))
        for text, th, ty in zip(texts, thumbs, types, strict=True)
    ]


def load_shards(where: str, store: Any, collection: str, *, page: int = 500) -> dict[str, Any]:
    """Upsert every shard under ``where`` into ``collection`` of an opened store."""
    loc = locate(where)
    names = [n for n in list_files(loc) if _is_shard(n)]
    loaded = skipped = 0
    for name in names:
        pf = pq.ParquetFile(loc.child(name).path, filesystem=loc.fs)
        for batch in pf.iter_batches(batch_size=page):
            table = pa.Table.from_batches([batch])
            ids = table.column("id").to_pylist()
            if len(_existing(store, collection, ids)) == len(ids):
                skipped += len(ids)
                continue
            dim = table.schema.field("vector").type.list_size
            vectors = table.column("vector").combine_chunks().flatten().to_numpy().reshape(-1, dim)
            metadata = [None if m is None else json.loads(m) for m in table.column("metadata").to_pylist()]
            store.upsert(collection, ids, vectors, metadata, sources=_sources(table))
            loaded += len(ids)
        logger.info("%s: loaded", name)
    return {"collection": collection, "shards": len(names), "loaded": loaded, "skipped": skipped}


def _existing(store: Any, collection: str, ids: list[str]) -> set[str]:
    from service.storage.errors import CollectionNotFoundError

    try:
        return set(store.existing_ids(collection, ids))
    except CollectionNotFoundError:
        return set()
