"""What a batch job embeds: input blocks planned from its sources, and the items in each.

A *block* is the unit of work, of retry and of resumption: a run of files of a media
folder, a range of lines of a JSON-lines file, a range of rows of a Parquet file, or one
WebDataset tar shard. Its ``key`` is a hash of what it covers, so the same sources give
the same blocks on every run (the manifest records finished blocks by key).

Sources (local paths or URIs, see ``files.py``), chosen by suffix or ``--format``:

- a folder of media files: one item per file, ``id`` = its path relative to the folder,
  metadata ``{"path": ...}``. The file's suffix names the input field it fills
  (``MEDIA_FIELDS``: images now; video files join once the model core takes ``{"video"}``
  inputs, by adding their suffixes there);
- ``.jsonl`` / ``.parquet`` rows in the project's input format
  ``{"id", "text"?, "image"?, "instruction"?, "content"?, "metadata"?}`` or in MMEB's
  (``qry_text``/``qry`` with ``<|image_1|>`` where the image goes, ``qry_img_path``/
  ``qry_image_path``; id ``FILE:ROW`` unless the row has one). An image is a path relative
  to ``image_root`` (default: the row file's folder; a URI is read as it is), base64, a
  ``data:`` URI, or (Parquet) a binary value;
- ``.tar`` WebDataset shards: members grouped by key (the name up to the first dot of the
  file name); an image member (``.jpg``, ``.png``, ...), ``.txt`` text, ``.json``
  metadata; ``id`` = the key.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from service.batch.files import Location, is_dir, is_uri, join_uri, list_files, locate, read_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
# suffix -> the input field a file of that kind fills. Videos are added here (".mp4": "video",
# ...) once the model core embeds {"video": ...} inputs; nothing else in the job changes.
MEDIA_FIELDS: dict[str, str] = dict.fromkeys(IMAGE_SUFFIXES, "image")
ROW_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".tar": "webdataset"}
FORMATS = ("auto", "media", "jsonl", "parquet", "webdataset")
INPUT_FIELDS = ("text", "image", "instruction", "content")
ROW_FIELDS = frozenset({"id", "metadata", *INPUT_FIELDS})
MMEB_TEXT, MMEB_IMAGE = ("qry_text", "qry"), ("qry_img_path", "qry_image_path")
MMEB_MARKER = "<|image_1|>"
TEXT_MEMBERS = (".txt", ".text")


@dataclass(frozen=True)
class Block:
    """One unit of work (see the module docstring); plain data, JSON both ways."""

    format: str  # media | jsonl | parquet | webdataset
    uri: str  # the folder (media) or the file
    start: int = 0  # jsonl: first byte; parquet: first row
    stop: int = 0  # jsonl: byte after the last line; parquet: row after the last
    first_row: int = 1  # jsonl: line number of the block's first line
    paths: tuple[str, ...] = ()  # media: files relative to the folder
    image_root: str = ""

    @property
    def key(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:20]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Block:
        data = json.loads(text)
        data["paths"] = tuple(data["paths"])
        return cls(**data)


@dataclass
class Item:
    id: str
    where: str  # "file:row" or a path, for failures.jsonl
    input: dict[str, Any]
    metadata: dict[str, Any] | None = None


@dataclass
class Failure:
    """An item (or row) that was skipped, and why (``reason`` is a short stable word)."""

    where: str
    reason: str
    message: str
    id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    instruction: str | None = None
    image_root: str | None = None  # default: each row file's folder
    block_size: int = 256  # items per block (a WebDataset shard is one block whatever its size)
    format: str = "auto"


# ----------------------------------------------------------------------------- planning


def _format_of(loc: Location, wanted: str) -> str:
    if wanted != "auto":
        return wanted
    if is_dir(loc):
        return "folder"
    suffix = posixpath.splitext(loc.path)[1].lower()
    if suffix not in ROW_FORMATS:
        raise ValueError(f"{loc.uri}: cannot tell the format from the name; pass --format")
    return ROW_FORMATS[suffix]


def plan_blocks(sources: list[str], options: ReadOptions) -> list[Block]:
    """The blocks of every source, in a stable order."""
    blocks: list[Block] = []
    for source in sources:
        loc = locate(source)
        kind = _format_of(loc, options.format)
        if kind == "folder":  # media files, or a folder of row files / shards
            files = list_files(loc)
            data = [f for f in files if posixpath.splitext(f)[1].lower() in ROW_FORMATS]
            if data and not any(posixpath.splitext(f)[1].lower() in MEDIA_FIELDS for f in files):
                blocks += plan_blocks([loc.child(f).uri for f in data], options)
                continue
            kind = "media"
        if kind == "media":
            media = [f for f in list_files(loc) if posixpath.splitext(f)[1].lower() in MEDIA_FIELDS]
            for i in range(0, len(media), options.block_size):
                blocks.append(Block("media", loc.uri, paths=tuple(media[i : i + options.block_size])))
        elif kind == "jsonl":
            blocks += _plan_jsonl(loc, options)
        elif kind == "parquet":
            blocks += _plan_parquet(loc, options)
        elif kind == "webdataset":
            blocks.append(Block("webdataset", loc.uri))
        else:
            raise ValueError(f"unknown format {kind!r}; one of {', '.join(FORMATS)}")
    return blocks


def _root(loc: Location, options: ReadOptions) -> str:
    if options.image_root:
        return options.image_root if is_uri(options.image_root) else locate(options.image_root).uri
    return loc.uri.rsplit("/", 1)[0]


def _plan_jsonl(loc: Location, options: ReadOptions) -> list[Block]:
    """Byte ranges of ``block_size`` non-empty lines, found in one streaming pass."""
    blocks: list[Block] = []
    root = _root(loc, options)
    start = pos = 0
    lines = 0
    first = line_no = 1
    with loc.fs.open_input_stream(loc.path) as f:
        buffered = io.BufferedReader(f, buffer_size=1 << 20)  # type: ignore[arg-type]
        for line in buffered:
            pos += len(line)
            if line.strip():
                lines += 1
            line_no += 1
            if lines == options.block_size:
                blocks.append(Block("jsonl", loc.uri, start, pos, first, image_root=root))
                start, lines, first = pos, 0, line_no
    if lines:
        blocks.append(Block("jsonl", loc.uri, start, pos, first, image_root=root))
    return blocks


def _plan_parquet(loc: Location, options: ReadOptions) -> list[Block]:
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(loc.path) as f:
        rows = pq.ParquetFile(f).metadata.num_rows
    root = _root(loc, options)
    return [
        Block("parquet", loc.uri, start, min(start + options.block_size, rows), image_root=root)
        for start in range(0, rows, options.block_size)
    ]


# ----------------------------------------------------------------------------- reading


def read_block(block: Block, options: ReadOptions) -> Iterator[Item | Failure]:
    """The items of one block, and a Failure for each row or file that cannot be one."""
    if block.format == "media":
        yield from _read_media(block)
    elif block.format == "jsonl":
        yield from _read_jsonl(block)
    elif block.format == "parquet":
        yield from _read_parquet(block)
    elif block.format == "webdataset":
        yield from _read_tar(block)
    else:
        raise ValueError(f"unknown block format {block.format!r}")


def _read_media(block: Block) -> Iterator[Item | Failure]:
    folder = locate(block.uri)
    for rel in block.paths:
        where = join_uri(block.uri, rel)
        try:
            data = read_bytes(folder.child(rel))
        except OSError as exc:
            yield Failure(where, "unreadable_file", str(exc), rel)
            continue
        kind = MEDIA_FIELDS[posixpath.splitext(rel)[1].lower()]
        yield Item(rel, where, {kind: data}, {"path": rel})


def _read_jsonl(block: Block) -> Iterator[Item | Failure]:
    loc = locate(block.uri)
    with loc.fs.open_input_file(loc.path) as f:
        f.seek(block.start)
        data = f.read(block.stop - block.start)
    for offset, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        where = f"{block.uri}:{block.first_row + offset}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            yield Failure(where, "bad_row", f"invalid JSON ({exc})")
            continue
        yield _row_item(row, where, block)


def _read_parquet(block: Block) -> Iterator[Item | Failure]:
    import pyarrow.parquet as pq

    loc = locate(block.uri)
    with loc.fs.open_input_file(loc.path) as f:
        pf = pq.ParquetFile(f)
        groups: list[int] = []
        offset = first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > block.start and offset < block.stop:
                first = first if groups else offset
                groups.append(g)
            offset += n
        if not groups:
            return
        table = pf.read_row_groups(groups)
    rows = table.slice(block.start - first, block.stop - block.start).to_pylist()
    for i, row in enumerate(rows):
        yield _row_item(row, f"{block.uri}:{block.start + i + 1}", block)


def _row_item(row: Any, where: str, block: Block) -> Item | Failure:
    """A row in the project's format or MMEB's -> Item (images read), or a Failure."""
    if not isinstance(row, dict):
        return Failure(where, "bad_row", f"a row must be an object, got {type(row).__name__}")
    try:
        if any(k in row for k in MMEB_TEXT + MMEB_IMAGE):
            return _mmeb_item(row, where, block)
        row = {k: v for k, v in row.items() if v is not None}
        doc_id = row.get("id")
        if not isinstance(doc_id, str) or not doc_id:
            return Failure(where, "bad_row", "a row needs a non-empty string 'id'")
        unknown = set(row) - ROW_FIELDS
        if unknown:
            return Failure(where, "bad_row", f"unknown field(s) {sorted(unknown)}", doc_id)
        metadata = row.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            return Failure(where, "bad_row", "'metadata' must be an object", doc_id)
        inp = {k: row[k] for k in INPUT_FIELDS if k in row}
        if "image" in inp:
            inp["image"] = _image(inp["image"], block.image_root)
        if isinstance(inp.get("content"), list):
            inp["content"] = [
                {**part, "image": _image(part["image"], block.image_root)}
                if isinstance(part, dict) and part.get("type") == "image" and "image" in part
                else part
                for part in inp["content"]
            ]
        return Item(doc_id, where, inp, metadata)
    except FileNotFoundError as exc:
        return Failure(where, "missing_file", str(exc), row.get("id") if isinstance(row, dict) else None)
    except OSError as exc:
        return Failure(where, "unreadable_file", str(exc), row.get("id"))


def _mmeb_item(row: dict[str, Any], where: str, block: Block) -> Item | Failure:
    text = next((row[k] for k in MMEB_TEXT if row.get(k) is not None), "")
    path = next((row[k] for k in MMEB_IMAGE if row.get(k)), None)
    given = row.get("id")
    doc_id = given if isinstance(given, str) and given else where.rsplit("/", 1)[-1]
    if not isinstance(text, str) or (path is not None and not isinstance(path, str)):
        return Failure(where, "bad_row", "qry_text and qry_img_path must be strings", doc_id)
    if text.count(MMEB_MARKER) > (1 if path else 0) or (path and MMEB_MARKER not in text):
        return Failure(where, "bad_row", f"an MMEB row has {MMEB_MARKER} exactly once when it has an image")
    if path is None:
        content = [{"type": "text", "text": text}]
    else:
        # MMEB's marker becomes an interleaved image part, as the project's evaluator does
        before, after = text.split(MMEB_MARKER, 1)
        image = _image(path, block.image_root)
        content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image", "image": image}]
        content += [{"type": "text", "text": after}] if after else []
    metadata = {k: v for k, v in row.items() if k in ("dataset",) and isinstance(v, str)}
    return Item(doc_id, where, {"content": content}, metadata or None)


def _image(value: Any, root: str) -> Any:
    """A row's image: bytes as they are; a string naming an image file is read (relative
    to ``root``); any other string is left as base64 / data: URI for the model to decode."""
    if isinstance(value, str) and len(value) < 4096 and not value.startswith("data:"):
        if posixpath.splitext(value.lower())[1] in IMAGE_SUFFIXES:
            uri = value if is_uri(value) or value.startswith("/") else join_uri(root, value)
            loc = locate(uri)
            try:
                return read_bytes(loc)
            except FileNotFoundError:
                raise
            except OSError as exc:
                if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                    raise FileNotFoundError(f"image file {value} not found under {root}") from exc
                raise
    return value


def _read_tar(block: Block) -> Iterator[Item | Failure]:
    """A WebDataset shard, read as a stream (a sample's members are adjacent)."""
    loc = locate(block.uri)
    name = block.uri.rsplit("/", 1)[-1]
    with loc.fs.open_input_stream(loc.path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                key: str | None = None
                sample: dict[str, bytes] = {}
                for member in tar:
                    if not member.isfile():
                        continue
                    base = posixpath.basename(member.name)
                    if base.startswith("."):
                        continue
                    dot = base.find(".")
                    k = posixpath.join(posixpath.dirname(member.name), base[:dot] if dot > 0 else base)
                    ext = base[dot:].lower() if dot > 0 else ""
                    if k != key:
                        if key is not None:
                            yield _tar_item(key, sample, f"{name}:{key}")
                        key, sample = k, {}
                    data = tar.extractfile(member)
                    sample[ext] = data.read() if data is not None else b""
                if key is not None:
                    yield _tar_item(key, sample, f"{name}:{key}")
        except (tarfile.TarError, EOFError) as exc:
            yield Failure(block.uri, "bad_shard", f"unreadable tar shard ({exc}); items before it were kept")


def _tar_item(key: str, sample: dict[str, bytes], where: str) -> Item | Failure:
    inp: dict[str, Any] = {}
    metadata = None
    for ext, data in sample.items():
        last = "." + ext.rsplit(".", 1)[-1]
        if last in MEDIA_FIELDS and MEDIA_FIELDS[last] not in inp:
            inp[MEDIA_FIELDS[last]] = data
        elif last in TEXT_MEMBERS:
            try:
                inp["text"] = data.decode("utf-8")
            except UnicodeDecodeError:
                return Failure(where, "bad_row", f"{key}{ext} is not UTF-8 text", key)
        elif last == ".json":
            try:
                metadata = json.loads(data)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return Failure(where, "bad_row", f"{key}{ext}: invalid JSON ({exc})", key)
            if not isinstance(metadata, dict):
                return Failure(where, "bad_row", f"{key}{ext} must hold a JSON object", key)
    if not inp:
        return Failure(where, "empty", f"sample {key} has no image or text member", key)
    return Item(key, where, inp, metadata)
