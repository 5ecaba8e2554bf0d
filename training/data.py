"""MMEB-format training data: read rows, build model inputs, group and collate batches.

A train row (JSONL, or Parquet with the same columns) is

    {"qry": str, "qry_image_path": str, "pos_text": str, "pos_image_path": str,
     "neg_text": str, "neg_image_path": str}

where ``<|image_1|>`` in a text marks where its image goes (MMEB's convention) and image
paths are relative to ``--image-root``. Each side becomes the same interleaved input the
server takes (``{"content": [text, image, text]}``), and is preprocessed by the model
core's ``Embedder.preprocess``, so training prompts are exactly the serving prompts
(``<|image_1|>`` becomes ``<image>``, then LLaVE's single-image rule). The loss uses
(query, positive) pairs; by default ``neg_*`` fields are not used (the in-batch and
cross-device negatives are the negatives, as in the paper). With ``hard_negatives=N``
(``--hard-negatives N``) up to N of them per row become extra candidates of the loss:
``neg_text``/``neg_image_path`` may be strings (one negative, MMEB's layout) or lists of
equal length (several, as ``training.mine`` writes them); empty ones are ignored.

Bad rows (invalid JSON, missing fields, a marker without an image or the reverse,
missing image files) are skipped with a report naming the file and line
(``on_bad="skip"``), or stop the run (``on_bad="error"``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<|image_1|>"


class BadRowError(ValueError):
    """A training row that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Side:
    """One query or target: MMEB text (with ``<|image_1|>``) and an optional image path."""

    text: str
    image: str | None = None

    @property
    def key(self) -> int:
        """Stable 63-bit content key (same on every rank and run) for duplicate masking."""
        digest = hashlib.blake2b(f"{self.text}\0{self.image or ''}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class TrainPair:
    query: Side
    target: Side
    source: str  # "file:line", for error messages
    negatives: tuple[Side, ...] = ()  # hard negative targets (only with hard_negatives > 0)

    @property
    def query_modality(self) -> str:
        return "image" if self.query.image else "text"


@dataclass
class LoadReport:
    """What ``load_train_pairs`` read and what it skipped (``file:line: reason``)."""

    rows: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self, limit: int = 10) -> str:
        lines = [f"read {self.rows} rows, kept {self.rows - len(self.skipped)}, skipped {len(self.skipped)}"]
        lines += [f"  {s}" for s in self.skipped[:limit]]
        if len(self.skipped) > limit:
            lines.append(f"  ... and {len(self.skipped) - limit} more")
        return "\n".join(lines)


def iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line or row number from 1, parsed row or the exception raised parsing it)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, row
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                yield number, exc


def parse_side(row: dict, text_key: str, image_key: str, image_root: Path | None, check_files: bool) -> Side:
    text = row.get(text_key)
    image = row.get(image_key) or None
    if text is None and image is None:
        raise BadRowError(f"missing {text_key!r}")
    text = text or ""
    if not isinstance(text, str) or (image is not None and not isinstance(image, str)):
        raise BadRowError(f"{text_key!r} and {image_key!r} must be strings")
    markers = text.count(IMAGE_MARKER)
    if "<|image_" in text.replace(IMAGE_MARKER, ""):
        raise BadRowError(f"{text_key!r}: only one image per side is supported ({IMAGE_MARKER})")
    if markers > 1:
        raise BadRowError(f"{text_key!r} holds {IMAGE_MARKER} {markers} times")
    if image and not markers:
        raise BadRowError(f"{image_key!r} is set but {text_key!r} has no {IMAGE_MARKER}")
    if markers and not image:
        raise BadRowError(f"{text_key!r} has {IMAGE_MARKER} but {image_key!r} is empty")
    if not text.strip() and not image:
        raise BadRowError(f"{text_key!r} is empty and there is no image")
    if image and check_files and not resolve_image(image, image_root).is_file():
        raise BadRowError(f"image not found: {resolve_image(image, image_root)}")
    return Side(text=text, image=image)


def resolve_image(path: str, image_root: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or image_root is None else image_root / p


def parse_negatives(row: dict, image_root: Path | None, check_files: bool, limit: int) -> tuple[Side, ...]:
    """Up to ``limit`` hard negatives of a row (``neg_text``/``neg_image_path``: strings or
    lists of equal length); empty entries are skipped."""
    texts, images = row.get("neg_text"), row.get("neg_image_path")
    if not isinstance(texts, list) and not isinstance(images, list):
        texts, images = [texts], [images]
    if texts is None:
        texts = [""] * len(images)
    if images is None:
        images = [None] * len(texts)
    if not isinstance(texts, list) or not isinstance(images, list) or len(texts) != len(images):
        raise BadRowError("'neg_text' and 'neg_image_path' must be lists of equal length")
    sides = []
    for text, image in zip(texts, images, strict=True):
        if len(sides) == limit:
            break
        if not text and not image:
            continue
        sides.append(parse_side({"t": text, "i": image}, "t", "i", image_root, check_files))
    return tuple(sides)


def parse_train_row(
    row: Any, image_root: Path | None, *, check_files: bool = True, hard_negatives: int = 0
) -> TrainPair:
    """One MMEB-train row -> TrainPair (``source`` left empty); raises BadRowError."""
    if isinstance(row, Exception):
        raise BadRowError(f"invalid JSON ({row})")
    if not isinstance(row, dict):
        raise BadRowError(f"a row must be an object, got {type(row).__name__}")
    query = parse_side(row, "qry", "qry_image_path", image_root, check_files)
    target = parse_side(row, "pos_text", "pos_image_path", image_root, check_files)
    negatives = ()
    if hard_negatives > 0:
        try:
            negatives = parse_negatives(row, image_root, check_files, hard_negatives)
        except BadRowError as exc:
            raise BadRowError(f"negative: {exc}") from None
    return TrainPair(query=query, target=target, source="", negatives=negatives)


def load_train_pairs(
    paths: Sequence[str | Path],
    image_root: str | Path | None,
    *,
    on_bad: str = "skip",
    check_files: bool = True,
    hard_negatives: int = 0,
) -> tuple[list[TrainPair], LoadReport]:
    """Read MMEB-train JSONL/Parquet files into pairs, applying the bad-row policy; with
    ``hard_negatives > 0`` each pair keeps up to that many ``neg_*`` targets."""
    if on_bad not in ("skip", "error"):
        raise ValueError(f"on_bad must be 'skip' or 'error', got {on_bad!r}")
    root = Path(image_root) if image_root is not None else None
    pairs: list[TrainPair] = []
    report = LoadReport()
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"training data not found: {path}")
        for number, row in iter_rows(path):
            report.rows += 1
            source = f"{path}:{number}"
            try:
                pair = parse_train_row(row, root, check_files=check_files, hard_negatives=hard_negatives)
            except BadRowError as exc:
                if on_bad == "error":
                    raise BadRowError(f"{source}: {exc}") from None
                report.skipped.append(f"{source}: {exc}")
                continue
            pairs.append(
                TrainPair(query=pair.query, target=pair.target, source=source, negatives=pair.negatives)
            )
    return pairs, report


def model_input(side: Side, image_root: Path | None) -> dict[str, Any]:
    """The server-shaped input for one side: interleaved content, image as raw bytes."""
    if not side.image:
        return {"content": [{"type": "text", "text": side.text}]}
    before, after = side.text.split(IMAGE_MARKER, 1)
    image = resolve_image(side.image, image_root).read_bytes()
    content = [{"type": "text", "text": before}] if before else []
    content.append({"type": "image", "image": image})
    if after:
        content.append({"type": "text", "text": after})
    return {"content": content}


class PairDataset(Dataset):
    """Preprocessed (query, target, keys, negatives) items through ``embedder.preprocess``.

    With ``hard_negatives = k > 0`` every item carries exactly k negative slots (so every
    rank encodes the same number of inputs, which sharded training needs): the row's
    negatives, then copies of its target marked invalid (``valid`` False, never scored).

    A row that fails preprocessing (corrupt image, image beyond the length cut) is
    logged with its file and line and replaced by the next row whose query has the same
    modality, so batches keep their size and grouping. With ``on_bad="error"`` it raises.
    """

    def __init__(
        self,
        pairs: Sequence[TrainPair],
        embedder,
        image_root: str | Path | None,
        *,
        on_bad: str = "skip",
        hard_negatives: int = 0,
    ):
        self.pairs = list(pairs)
        self.hard_negatives = hard_negatives
        self.embedder = embedder
        self.image_root = Path(image_root) if image_root is not None else None
        self.on_bad = on_bad
        self._by_modality: dict[str, list[int]] = {}
        for i, pair in enumerate(self.pairs):
            self._by_modality.setdefault(pair.query_modality, []).append(i)
        self._position = {i: k for group in self._by_modality.values() for k, i in enumerate(group)}

    def __len__(self) -> int:
        return len(self.pairs)

    def modalities(self) -> list[str]:
        return [p.query_modality for p in self.pairs]

    def _prepare(self, index: int):
        pair = self.pairs[index]
        query = self.embedder.preprocess(model_input(pair.query, self.image_root))
        target = self.embedder.preprocess(model_input(pair.target, self.image_root))
        negatives = [self.embedder.preprocess(model_input(s, self.image_root)) for s in pair.negatives]
        real = negatives[: self.hard_negatives]
        pad = self.hard_negatives - len(real)
        slots = (
            real + [target] * pad,
            [True] * len(real) + [False] * pad,
            [s.key for s in pair.negatives[: len(real)]] + [0] * pad,
        )
        return query, target, (pair.query.key, pair.target.key), slots

    def __getitem__(self, index: int):
        group = self._by_modality[self.pairs[index].query_modality]
        start = self._position[index]
        for attempt in range(min(len(group), 16)):
            i = group[(start + attempt) % len(group)]
            try:
                return self._prepare(i)
            except Exception as exc:  # any preprocessing failure is about this row's data
                message = f"{self.pairs[i].source}: cannot preprocess ({type(exc).__name__}: {exc})"
                if self.on_bad == "error":
                    raise BadRowError(message) from exc
                logger.warning("%s; using the next row of the same modality", message)
        raise BadRowError(f"{self.pairs[index].source}: this row and the next 15 of its group all failed")


@dataclass
class PairBatch:
    """This rank's share of one micro-batch (lists of ``PreparedInput``, not yet tensors)."""

    queries: list
    targets: list
    keys: torch.Tensor  # (n, 2) int64: query and target content keys
    negatives: list = field(default_factory=list)  # n * k hard negative slots, row-major
    negative_valid: torch.Tensor | None = None  # (n * k,) bool: False for padding slots
    negative_keys: torch.Tensor | None = None  # (n * k,) int64 content keys

    def __len__(self) -> int:
        return len(self.queries)


def collate_pairs(items: Sequence[tuple]) -> PairBatch:
    queries, targets, keys, slots = zip(*items, strict=True)
    batch = PairBatch(list(queries), list(targets), torch.tensor(keys, dtype=torch.long))
    if slots and slots[0][0]:
        batch.negatives = [x for inputs, _, _ in slots for x in inputs]
        batch.negative_valid = torch.tensor([v for _, valid, _ in slots for v in valid], dtype=torch.bool)
        batch.negative_keys = torch.tensor([k for _, _, ks in slots for k in ks], dtype=torch.long)
    return batch


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose queries share a modality (all image or all text), split over ranks.

    Every rank builds the same global batches of ``batch_size * world_size`` indices
    from one modality group (shuffled with ``seed`` and the epoch), drops incomplete
    ones, shuffles their order, and yields its own ``batch_size`` slice of each, so
    all ranks see equal-sized parts of the same micro-batch.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.modalities = list(modalities)
        self.batch_size, self.world_size, self.rank, self.seed = batch_size, world_size, rank, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; ``skip`` batches already done (when resuming)."""
        self.epoch, self.skip = epoch, skip

    def global_batches(self) -> list[list[int]]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        size = self.batch_size * self.world_size
        groups: dict[str, list[int]] = {}
        for i, m in enumerate(self.modalities):
            groups.setdefault(m, []).append(i)
        batches = []
        for name in sorted(groups):
            indices = groups[name]
            rng.shuffle(indices)
            batches += [indices[k : k + size] for k in range(0, len(indices) - size + 1, size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches()[self.skip :]:
            yield batch[lo:hi]

    def __len__(self) -> int:
        size = self.batch_size * self.world_size
        counts: dict[str, int] = {}
        for m in self.modalities:
            counts[m] = counts.get(m, 0) + 1
        return sum(c // size for c in counts.values()) - self.skip
