"""Copy every collection from one store to another: SQLite data dir <-> PostgreSQL.

    python -m service.migrate --from ./data --to postgresql://user@host/db
    python -m service.migrate --from postgresql://user@host/db --to ./data-back
    python -m service.migrate --from-parquet s3://bucket/vectors --to URL_OR_DIR --collection docs

Each collection is created on the target with the source's dimension, index type, index
options and source options (``store_source``, thumbnail size and format), then its documents
(id, unit vector, metadata, and their sources: text and thumbnails, byte for byte) are
copied in id order, page by page; each page is one all-or-nothing upsert. Resumable: a page whose ids are all on the
target already is skipped, so a run that was interrupted (or repeated) picks up where it
stopped. At the end every collection's count and options are compared and a sample of
documents (vector, metadata, text and thumbnails) is read back from both sides; a mismatch is
an error (exit 1).

``--from-parquet`` loads the Parquet shards that ``python -m service.batch --out`` wrote
(``service/batch/parquet.py``) into one collection, through the same upsert (resumable the
same way).

The source must not change meanwhile: stop the servers of a data directory (its lock
enforces it) or of the PostgreSQL database you copy from.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import numpy as np

logger = logging.getLogger("llave.migrate")


class MigrationError(Exception):
    pass


# Each backend's reduced precision: FAISS's 8-bit scalar quantizer, pgvector's halfvec. Both
# rank candidates in reduced precision and rescore them exactly, so one maps to the other.
REDUCED_PRECISION = {"sq8": "halfvec", "halfvec": "sq8"}


def _target_options(source_options: dict[str, Any], kind: str, target: Any) -> dict[str, Any]:
    """The source's options that the target knows (``lists_built``: bookkeeping of the
    PostgreSQL store), with the reduced precision translated to the target's own."""
    known = set(target._defaults.get(kind, {}))
    options = {key: value for key, value in source_options.items() if key in known}
    if "precision" in options:
        precision = options["precision"]
        if precision not in target.precisions:
            options["precision"] = REDUCED_PRECISION.get(precision, precision)
    return options


def copy_collection(source: Any, target: Any, name: str, *, page: int = 500) -> dict[str, Any]:
    info = source.describe(name)
    options = _target_options(source.collection_options(name), info["index"], target)
    target.create_collection(name, info["dim"], info["index"], options, source=_source_options(info))
    cursor: str | None = None
    copied = skipped = 0
    while True:
        docs, cursor = source.list_documents(name, cursor, page, with_vector=True, with_source=True)
        if docs:
            ids = [d["id"] for d in docs]
            if len(target.existing_ids(name, ids)) == len(ids):
                skipped += len(ids)
            else:
                target.upsert(
                    name,
                    ids,
                    np.stack([d["vector"] for d in docs]),
                    [d["metadata"] for d in docs],
                    sources=[d["source"] for d in docs],
                )
                copied += len(ids)
        if cursor is None:
            break
    return {"collection": name, "copied": copied, "skipped": skipped}


def _source_options(info: dict[str, Any]) -> dict[str, Any]:
    from service.storage.sources import SOURCE_DEFAULTS

    return {key: info[key] for key in SOURCE_DEFAULTS}


def verify_collection(source: Any, target: Any, name: str, *, sample: int = 200, seed: int = 0) -> None:
    from service.storage.sources import SOURCE_DEFAULTS

    a, b = source.describe(name), target.describe(name)
    for key in ("count", "dim", "index", *SOURCE_DEFAULTS):
        if a[key] != b[key]:
            raise MigrationError(
                f"collection {name!r}: {key} {a[key]!r} on the source, {b[key]!r} on the target"
            )
    ids: list[str] = []
    cursor: str | None = None
    while True:
        docs, cursor = source.list_documents(name, cursor, 5000)
        ids += [d["id"] for d in docs]
        if cursor is None:
            break
    rng = np.random.default_rng(seed)
    for doc_id in (
        rng.choice(np.array(ids, dtype=object), min(sample, len(ids)), replace=False) if ids else []
    ):
        x, y = source.get(name, doc_id, with_vector=True), target.get(name, doc_id, with_vector=True)
        if x["metadata"] != y["metadata"]:
            raise MigrationError(f"collection {name!r}, document {doc_id!r}: metadata differs")
        if not np.allclose(x["vector"], y["vector"], atol=1e-6, rtol=0):
            raise MigrationError(f"collection {name!r}, document {doc_id!r}: vector differs")
        if (x["text"], x["thumbnails"]) != (y["text"], y["thumbnails"]) or any(
            source.thumbnail(name, doc_id, i) != target.thumbnail(name, doc_id, i)
            for i in range(x["thumbnails"])
        ):
            raise MigrationError(
                f"collection {name!r}, document {doc_id!r}: source (text or thumbnails) differs"
            )


def migrate(source: Any, target: Any, *, page: int = 500, sample: int = 200) -> list[dict[str, Any]]:
    """Copy and verify every collection of ``source`` into ``target`` (both opened stores)."""
    reports = []
    for info in source.list_collections():
        report = copy_collection(source, target, info["name"], page=page)
        verify_collection(source, target, info["name"], sample=sample)
        logger.info(
            "%s: %d copied, %d already there, verified", info["name"], report["copied"], report["skipped"]
        )
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    from service.storage import open_store

    parser = argparse.ArgumentParser(description="Copy every collection between two stores (resumable).")
    source_group = parser.add_mutually_exclusive_group(required=True)
    source_group.add_argument("--from", dest="source", help="a data directory or a postgresql:// URL")
    source_group.add_argument(
        "--from-parquet", help="a folder or URI of Parquet shards written by python -m service.batch"
    )
    parser.add_argument("--to", dest="target", required=True, help="a data directory or a postgresql:// URL")
    parser.add_argument("--collection", help="with --from-parquet: the collection to load into")
    parser.add_argument("--page", type=int, default=500, help="documents per upsert")
    parser.add_argument(
        "--sample", type=int, default=200, help="documents per collection compared at the end"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.from_parquet:
        return _load_parquet(args)
    if args.source == args.target:
        print("migrate failed: --from and --to are the same store", file=sys.stderr)
        return 1
    try:
        source = open_store(args.source, read_only=True)  # PostgreSQL: the flag is ignored
        try:
            target = open_store(args.target)
            try:
                reports = migrate(source, target, page=args.page, sample=args.sample)
            finally:
                target.close()
        finally:
            source.close()
    except Exception as exc:
        print(f"migrate failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"collections": reports}))
    return 0


def _load_parquet(args: argparse.Namespace) -> int:
    from service.batch.parquet import load_shards
    from service.storage import open_store

    if not args.collection:
        print("migrate failed: --from-parquet needs --collection", file=sys.stderr)
        return 1
    try:
        target = open_store(args.target)
        try:
            report = load_shards(args.from_parquet, target, args.collection, page=args.page)
        finally:
            target.close()
    except Exception as exc:
        print(f"migrate failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
