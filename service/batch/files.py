"""Where a batch job reads and writes: local paths or object storage, through ``pyarrow.fs``.

A location is a local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``).
pyarrow's own filesystems serve the schemes they know (S3 takes its endpoint, region and
credentials from the usual ``AWS_*`` variables, ``AWS_ENDPOINT_URL`` included); any other
scheme goes through ``fsspec`` (``pyarrow.fs.FSSpecHandler``), so whatever fsspec can open
works too. Workers get the location as text and open it themselves (one filesystem per
process, cached), never a pickled client.
"""

from __future__ import annotations

import functools
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Location:
    """A filesystem and a path on it (``path`` uses ``/``; for S3 it starts with the bucket)."""

    fs: pafs.FileSystem
    path: str
    uri: str  # as given (a local path made absolute), to print and to hand to workers

    @property
    def local(self) -> bool:
        return self.fs.type_name == "local"

    def child(self, relative: str) -> Location:
        return Location(self.fs, posixpath.join(self.path, relative), join_uri(self.uri, relative))


def join_uri(base: str, relative: str) -> str:
    return base.rstrip("/") + "/" + relative.lstrip("/")


def is_uri(text: str) -> bool:
    return "://" in text


# Schemes whose path is "bucket/key" exactly as written after "://".
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(root: str) -> pafs.FileSystem:
    return _from_uri(root)[0]


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except ValueError:  # a scheme pyarrow does not know (pyarrow.lib.ArrowInvalid)
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def locate(where: str | Path) -> Location:
    """The filesystem and path of a local path or a URI (bucket filesystems cached per process)."""
    text = str(where)
    if not is_uri(text):
        local = Path(text).expanduser().resolve().as_posix()
        return Location(pafs.LocalFileSystem(), local, local)
    text = text.rstrip("/")
    scheme, rest = text.split("://", 1)
    if scheme in _BUCKET_SCHEMES:
        return Location(_bucket_filesystem(f"{scheme}://{rest.split('/', 1)[0]}"), rest, text)
    fs, path = _from_uri(text)
    return Location(fs, path, text)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def is_dir(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory


def list_files(loc: Location) -> list[str]:
    """Paths (relative to ``loc``, ``/``-separated, sorted) of every file under a folder."""
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    prefix = loc.path.rstrip("/") + "/"
    return sorted(i.path[len(prefix) :] for i in infos if i.type == pafs.FileType.File)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write a whole file so that readers see all of it or nothing.

    Local disk: a temporary name in the same folder, then a rename. Object stores: one
    PUT, which is all or nothing by itself (S3 never shows a partly uploaded object)."""
    parent = posixpath.dirname(loc.path)
    loc.fs.create_dir(parent, recursive=True)
    if not loc.local:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)
        return
    tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
    try:
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        loc.fs.move(tmp, loc.path)
    finally:
        if loc.fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            loc.fs.delete_file(tmp)
