"""Bulk ingestion into a collection: ``python -m service.ingest``.

    python -m service.ingest --collection photos ./images/              # every image and video under a folder
    python -m service.ingest --collection docs corpus.jsonl              # one document per line
    python -m service.ingest --collection docs corpus.jsonl --server http://127.0.0.1:8000 --api-key KEY
    python -m service.ingest --collection docs corpus.jsonl --data-dir ./data --model ./ckpt   # no server

A folder gives one document per image or video file (id = its path relative to the
folder, metadata ``{"path": ...}``); a video is embedded as the LLaVE authors embed a clip
for retrieval, ``<image>\nRepresent the given video.``. A JSON-lines file gives one
document per line: ``{"id", "text"?, "image"? | "video"?, "instruction"?, "content"?,
"metadata"?, "vector"?}`` where an ``image`` or ``video`` may be a file path (relative to
the file's folder) or base64.

Resumable: ids already in the collection are skipped, so an interrupted run can simply be
started again. Documents keep their source (text, thumbnails of images and of videos' first
frames, videos' durations) as they do through the
server, when the collection keeps sources (``store_source``, on by default). Talks to a running server (default) or, with ``--data-dir``, opens the
store and embeds in-process (the server must not be running on that directory: the
store takes a lock).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.video import VIDEO_TEXT

logger = logging.getLogger("llave.ingest")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".ts"}
INPUT_FIELDS = ("text", "image", "video", "instruction", "content")
MEDIA_FIELDS = ("image", "video")


class IngestError(Exception):
    """A source row that cannot be ingested, or a failure that stops the run."""


@dataclass
class Row:
    id: str
    where: str  # "file:line" or the image path, for error messages
    doc: dict[str, Any]


@dataclass
class Report:
    added: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"added": self.added, "skipped": self.skipped, "failed": len(self.failed)}


# ----------------------------------------------------------------------------- sources


def _encode_file(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def iter_folder(folder: Path) -> Iterator[Row]:
    suffixes = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
        rel = path.relative_to(folder).as_posix()
        if path.suffix.lower() in VIDEO_SUFFIXES:
            yield Row(
                rel, str(path), {"id": rel, "video": path, "text": VIDEO_TEXT, "metadata": {"path": rel}}
            )
        else:
            yield Row(rel, str(path), {"id": rel, "image": path, "metadata": {"path": rel}})


def iter_jsonl(path: Path) -> Iterator[Row | IngestError]:
    base = path.parent
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield IngestError(f"{where}: invalid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
                yield IngestError(f"{where}: a row must be an object with a non-empty string 'id'")
                continue
            unknown = set(obj) - {"id", "metadata", "vector", *INPUT_FIELDS}
            if unknown:
                yield IngestError(f"{where}: unknown field(s) {sorted(unknown)}")
                continue
            missing = None
            for kind, suffixes in (("image", IMAGE_SUFFIXES), ("video", VIDEO_SUFFIXES)):
                value = obj.get(kind)
                if isinstance(value, str) and not value.startswith("data:") and (base / value).is_file():
                    obj[kind] = base / value
                elif isinstance(value, str) and len(value) < 1024 and not value.startswith("data:"):
                    if (base / value).suffix.lower() in suffixes:
                        missing = f"{where}: {kind} file {value} not found"
            if missing:
                yield IngestError(missing)
                continue
            yield Row(obj["id"], where, obj)


def iter_source(source: Path) -> Iterator[Row | IngestError]:
    if source.is_dir():
        yield from iter_folder(source)
    elif source.is_file():
        yield from iter_jsonl(source)
    else:
        raise IngestError(f"{source}: no such folder or file")


def _chunks(
    rows: Iterator[Row | IngestError], size: int, report: Report, on_error: str
) -> Iterator[list[Row]]:
    chunk: list[Row] = []
    for row in rows:
        if isinstance(row, IngestError):
            _fail(report, str(row), on_error)
            continue
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _fail(report: Report, message: str, on_error: str) -> None:
    report.failed.append(message)
    logger.warning("skipped: %s", message)
    if on_error == "stop":
        raise IngestError(message)


# ----------------------------------------------------------------------------- targets


class ServerTarget:
    """Ingest through a running server's HTTP API (retrying 429 and 503)."""

    def __init__(
        self, url: str, collection: str, api_key: str | None, timeout: float = 300.0, retries: int = 30
    ):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout)
        self.collection = collection
        self.retries = retries

    def _request(self, method: str, path: str, body: Any) -> Any:
        for _attempt in range(self.retries):
            r = self.client.request(method, path, json=body)
            if r.status_code in (429, 503):
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            return r
        raise IngestError(f"the server kept answering {r.status_code} on {path}")

    def existing(self, ids: list[str]) -> set[str]:
        r = self._request("POST", f"/collections/{self.collection}/existing", {"ids": ids})
        if r.status_code == 404:
            return set()
        _raise_for(r)
        return set(r.json()["existing"])

    def upsert(self, rows: list[Row]) -> None:
        docs = []
        for row in rows:
            doc = dict(row.doc)
            for kind in MEDIA_FIELDS:
                if isinstance(doc.get(kind), Path):
                    doc[kind] = _encode_file(doc[kind])
            docs.append(doc)
        _raise_for(self._request("POST", f"/collections/{self.collection}/documents", {"documents": docs}))

    def close(self) -> None:
        self.client.close()


def _raise_for(r: Any) -> None:
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text[:200]
        raise IngestError(f"HTTP {r.status_code}: {message}")


class StoreTarget:
    """Ingest straight into the store, embedding in-process (no server).

    Takes the server's upsert path (``service/storage/documents.py``): the same vector
    assembly and checks, vectors normalised once by the store, and the documents' sources
    (text and thumbnails, ``service/storage/sources.py``) kept when the collection keeps
    them, with the same image limits as the server's defaults (``service/limits.py``)."""

    def __init__(self, data_dir: Path | str, collection: str, model: str | None, device: str, dtype: str):
        from service.storage import open_store

        self.store = open_store(data_dir)  # a directory, or a postgresql:// URL
        self.collection = collection
        self._model_id, self._device, self._dtype = model, device, dtype
        self._embedder: Any = None

    def _embed(self, inputs: list[dict[str, Any]]) -> Any:
        if self._embedder is None:
            if not self._model_id:
                raise IngestError("--model is needed to embed documents without a server")
            from model import load_embedder
            from service import limits

            self._embedder = load_embedder(
                self._model_id, device=self._device, dtype=self._dtype, **limits.image_limits()
            )
        return self._embedder.embed(inputs, normalize=False)  # the store normalises

    def _source_options(self) -> dict[str, Any]:
        from service.storage.errors import CollectionNotFoundError
        from service.storage.sources import SOURCE_DEFAULTS

        try:
            return dict(self.store.source_options(self.collection))
        except CollectionNotFoundError:
            return dict(SOURCE_DEFAULTS)  # the upsert creates it with the defaults

    def existing(self, ids: list[str]) -> set[str]:
        return set(self.store.existing_ids(self.collection, ids))

    def upsert(self, rows: list[Row]) -> None:
        from model.errors import LlaveError
        from service import limits
        from service.storage.documents import assemble_vectors, check_unique_ids
        from service.storage.errors import StoreError
        from service.storage.sources import media_limits, source_of_input

        try:
            ids = check_unique_ids([r.id for r in rows])
            to_embed = [i for i, r in enumerate(rows) if r.doc.get("vector") is None]
            inputs = []
            for i in to_embed:
                inp = {k: rows[i].doc[k] for k in INPUT_FIELDS if k in rows[i].doc}
                for kind in MEDIA_FIELDS:
                    if isinstance(inp.get(kind), Path):
                        inp[kind] = inp[kind].read_bytes()
                inputs.append(inp)
            embedded = self._embed(inputs) if inputs else None
            vectors = assemble_vectors([r.doc.get("vector") for r in rows], embedded, to_embed)
            sources: list[Any] = [None] * len(rows)
            options = self._source_options()
            if options["store_source"]:
                media = media_limits(limits.image_limits())
                for i, inp in zip(to_embed, inputs, strict=True):
                    sources[i] = source_of_input(inp, options, *media)
            self.store.upsert(
                self.collection, ids, vectors, [r.doc.get("metadata") for r in rows], sources=sources
            )
        except (LlaveError, StoreError, ValueError, TypeError, OSError) as exc:
            raise IngestError(str(exc)) from exc

    def close(self) -> None:
        self.store.close()


# ----------------------------------------------------------------------------- driver


def ingest(
    source: Path,
    target: Any,
    *,
    batch_size: int = 32,
    on_error: str = "skip",
    instruction: str | None = None,
    progress: bool = True,
) -> Report:
    """Upsert every row of ``source`` not yet in the collection; return the counts."""
    from tqdm import tqdm

    report = Report()
    rows = list(iter_source(source))
    bar = tqdm(total=len(rows), unit="doc", desc=f"ingest {source.name}", disable=not progress)
    try:
        for chunk in _chunks(iter(rows), batch_size, report, on_error):
            bar.update(len(chunk))
            seen: set[str] = set()
            unique = []
            for row in chunk:
                if row.id in seen:
                    _fail(report, f"{row.where}: id {row.id!r} repeats an earlier row", on_error)
                    continue
                seen.add(row.id)
                if instruction and "vector" not in row.doc and "instruction" not in row.doc:
                    row.doc["instruction"] = instruction
                unique.append(row)
            stored = target.existing([r.id for r in unique]) if unique else set()
            todo = [r for r in unique if r.id not in stored]
            report.skipped += len(unique) - len(todo)
            if not todo:
                continue
            try:
                target.upsert(todo)
                report.added += len(todo)
            except IngestError:
                # Find the bad rows: one at a time, so the good ones still land.
                for row in todo:
                    try:
                        target.upsert([row])
                        report.added += 1
                    except IngestError as exc:
                        _fail(report, f"{row.where}: {exc}", on_error)
            bar.set_postfix(added=report.added, skipped=report.skipped, failed=len(report.failed))
        # Rows refused by the parser were counted in _chunks; the bar covers them too.
        bar.update(bar.total - bar.n)
    finally:
        bar.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Bulk-ingest images or JSON lines into a collection (resumable)."
    )
    parser.add_argument("source", type=Path, help="a folder of images, or a .jsonl file of documents")
    parser.add_argument("--collection", required=True, help="collection name (created on first upsert)")
    parser.add_argument("--server", default="http://127.0.0.1:8000", help="URL of a running server")
    parser.add_argument("--api-key", default=None, help="API key of the server (or LLAVE_API_KEY)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="write to this store directly instead of a server (the server must be stopped)",
    )
    parser.add_argument(
        "--store-url",
        default=None,
        help="write to this PostgreSQL store directly (postgresql://...; servers may keep running)",
    )
    parser.add_argument("--model", default=None, help="with --data-dir/--store-url: checkpoint used to embed")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=32, help="documents per upsert request")
    parser.add_argument("--instruction", default=None, help="instruction added to every input document")
    parser.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="bad rows: report and skip them, or stop at the first",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    import os

    try:
        if args.data_dir is not None or args.store_url is not None:
            where = args.store_url if args.store_url is not None else args.data_dir
            target: Any = StoreTarget(where, args.collection, args.model, args.device, args.dtype)
        else:
            target = ServerTarget(
                args.server, args.collection, args.api_key or os.environ.get("LLAVE_API_KEY")
            )
        try:
            report = ingest(
                args.source,
                target,
                batch_size=args.batch_size,
                on_error=args.on_error,
                instruction=args.instruction,
                progress=not args.no_progress,
            )
        finally:
            target.close()
    except Exception as exc:  # a clear one-line message for the operator
        print(f"ingest failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"collection": args.collection, **report.as_dict()}))
    return 0 if not report.failed else 2


if __name__ == "__main__":
    sys.exit(main())
