"""Approximate indexes saved at shutdown and loaded at start-up instead of rebuilt.

Rebuilding an HNSW graph over a million vectors takes minutes (bench/README.md), during
which searches fall back to exact scans. On a clean close the store writes each built
approximate index here; on open it uses a snapshot only when it provably matches the
table: same dimension, index type and options, and exactly the same set of live row ids.
Row ids are never reused and a row's vector never changes (a replacement is a new row),
so the same id set means the same vectors. Anything else (a write after the snapshot, a
crash, a half-written or corrupt file) falls back to the normal rebuild: a snapshot can
cost time, never correctness.

Layout: ``<data_dir>/index-snapshots/<sha256(name)[:32]>/`` with ``index.faiss``,
``labels.npy``, ``alive.npy`` and ``meta.json`` (written last; its presence marks a
complete snapshot). A new snapshot is written beside the old one and swapped in by
renames, so a crash mid-write leaves at worst no snapshot.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service.storage.vector_index import ApproximateIndex

logger = logging.getLogger("llave.store")

SNAPSHOT_DIR = "index-snapshots"
FORMAT = 1


def snapshot_root(data_dir: Path) -> Path:
    return data_dir / SNAPSHOT_DIR


def snapshot_path(data_dir: Path, collection: str) -> Path:
    return snapshot_root(data_dir) / hashlib.sha256(collection.encode()).hexdigest()[:32]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(data_dir: Path, collection: str, index: ApproximateIndex) -> Path:
    """Write ``index`` as the snapshot of ``collection`` (replacing any older one)."""
    faiss_index, labels, alive, facts = index.export_state()
    final = snapshot_path(data_dir, collection)
    tmp = final.with_name(final.name + ".tmp")
    old = final.with_name(final.name + ".old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (faiss.write_index_binary if facts.get("binary") else faiss.write_index)(
            faiss_index, str(tmp / "index.faiss")
        )
        np.save(tmp / "labels.npy", labels)
        np.save(tmp / "alive.npy", alive)
        meta = {
            "format": FORMAT,
            "collection": collection,
            "dim": index.dim,
            "kind": index.kind,
            "options": index.options,
            "live": len(index),
            "faiss_bytes": (tmp / "index.faiss").stat().st_size,
            **facts,
        }
        for name in ("index.faiss", "labels.npy", "alive.npy"):
            _fsync(tmp / name)
        (tmp / "meta.json").write_text(json.dumps(meta))
        _fsync(tmp / "meta.json")
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return final


def load(
    data_dir: Path,
    collection: str,
    dim: int,
    kind: str,
    options: dict[str, Any],
    live_labels: np.ndarray,
    *,
    tombstone_ratio: float,
) -> ApproximateIndex | None:
    """The snapshot of ``collection`` if it matches exactly, else None (with the reason logged).

    ``live_labels``: the collection's row ids in the table, ascending.
    """
    path = snapshot_path(data_dir, collection)
    if not (path / "meta.json").exists():
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        expected = {"format": FORMAT, "collection": collection, "dim": dim, "kind": kind, "options": options}
        differs = [key for key, value in expected.items() if meta.get(key) != value]
        if differs:
            logger.info("index snapshot of %r not used: its %s differ", collection, ", ".join(differs))
            return None
        changed = meta["live"] != len(live_labels) or (
            (path / "index.faiss").stat().st_size != meta["faiss_bytes"]
        )
        if not changed:
            labels = np.load(path / "labels.npy", allow_pickle=False)
            alive = np.load(path / "alive.npy", allow_pickle=False)
            changed = len(alive) != len(labels) or not np.array_equal(np.sort(labels[alive]), live_labels)
        if changed:
            logger.info(
                "index snapshot of %r not used: the collection changed since it was saved", collection
            )
            return None
        read = faiss.read_index_binary if meta.get("binary") else faiss.read_index
        faiss_index = read(str(path / "index.faiss"))
        return ApproximateIndex.restore(
            dim, kind, options, faiss_index, labels, alive, meta, tombstone_ratio=tombstone_ratio
        )
    except Exception:  # a damaged snapshot only costs the rebuild it was meant to save
        logger.warning("index snapshot of %r is unreadable; rebuilding the index", collection, exc_info=True)
        return None


def remove_stale(data_dir: Path, collections: set[str]) -> None:
    """Delete snapshots of collections that no longer exist, and leftovers of interrupted saves."""
    root = snapshot_root(data_dir)
    if not root.is_dir():
        return
    keep = {snapshot_path(data_dir, name).name for name in collections}
    for entry in root.iterdir():
        if entry.name not in keep:
            shutil.rmtree(entry, ignore_errors=True)
