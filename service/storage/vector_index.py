"""In-memory FAISS indexes derived from the store's SQLite rows.

Every index is keyed by the store's int64 row id (a "label"). Labels are never reused
(SQLite AUTOINCREMENT), so a tombstoned label can never be confused with a new document.

``FlatIndex`` and ``ApproximateIndex`` are not thread-safe on their own: ``search`` may
run concurrently with other ``search`` calls (FAISS releases the GIL), but ``add`` and
``remove`` need exclusive access. ``LiveIndex`` pairs an index with a readers-writer lock
and rebuilds it online (snapshot, build without the lock, catch up, swap).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import faiss
import numpy as np

from service.limits import (
    BINARY_RESCORE_FACTOR,
    INDEX_TYPES,  # noqa: F401  (re-exported)
    RESCORE_FACTOR,
    RESCORE_MIN,
)
from service.vectors import normalised_rows  # noqa: F401  (re-exported: the one normalisation)

# precision "sq8": the approximate index keeps each vector as 8-bit codes (FAISS scalar
# quantizer QT_8bit, one trained min/max per dimension): a quarter of the memory. It finds
# candidates; ``rescore`` recomputes their exact scores from SQLite's float32 vectors.
# precision "binary" (HNSW only): the graph holds each vector's sign bits (``IndexBinaryHNSW``,
# Hamming distance): 1/32 of the vectors' size; BINARY_RESCORE_FACTOR x k candidates are rescored.
PRECISIONS = ("float32", "sq8", "binary")
OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    # ef_construction 160: a wider beam while building gives a better graph, so the default
    # ef_search keeps its recall on large clustered collections at the same search latency;
    # the price is slower builds and upserts (measured: bench/README.md, bench/hnsw_sweep.py).
    "hnsw": {"m": 32, "ef_search": 128, "ef_construction": 160, "precision": "float32"},
    # nlist/nprobe None: chosen from the collection size when the index is trained.
    "ivf": {"nlist": None, "nprobe": None, "min_train": 1000, "precision": "float32"},
}
# An sq8 HNSW index searches exactly (float32) until this many vectors train its quantizer.
SQ8_MIN_TRAIN = 1000
_SQ8_TRAIN_SAMPLE = 65536
# A filter matching at most this many documents is answered exactly on the subset: cheap,
# and approximate indexes lose recall on very selective filters.
EXACT_SUBSET_MAX = 2048
_BUILD_CHUNK = 4096

# FAISS's keyword constructors (SearchParameters(sel=..., efSearch=...)) are missing from its stubs.
_faiss: Any = faiss
SearchResult = tuple[np.ndarray, np.ndarray]  # scores (nq, k) float32, labels (nq, k) int64, -1 = none


class BuildCancelled(Exception):
    """A background rebuild was told to stop (the store is closing)."""


def rescore(
    queries: np.ndarray, labels: np.ndarray, k: int, vectors_of: Callable[[np.ndarray], np.ndarray]
) -> SearchResult:
    """The ``k`` best of each row's candidate ``labels`` (-1: none) by exact inner product with
    ``vectors_of(unique labels)`` (float32 rows in that order): exact scores, best first."""
    nq = len(queries)
    wanted = np.unique(labels[labels >= 0])
    if not len(wanted):
        return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
    stored = vectors_of(wanted)
    rows = np.searchsorted(wanted, np.maximum(labels, 0))
    out_scores = np.full((nq, k), -np.inf, np.float32)
    out_labels = np.full((nq, k), -1, np.int64)
    for i in range(nq):
        ok = labels[i] >= 0
        cand = labels[i][ok]
        exact = _products(queries[i : i + 1], stored[rows[i][ok]])[0]
        top = np.lexsort((cand, -exact))[:k]  # best first, ties by label
        out_scores[i, : len(top)], out_labels[i, : len(top)] = exact[top], cand[top]
    width = int((out_labels >= 0).sum(axis=1).max())
    return out_scores[:, :width], out_labels[:, :width]


def _products(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """(nq, m) inner products of a few queries with ``vectors``, in numpy's own loops: BLAS
    would split so small a product over its threads, and on a busy machine waiting for them
    took 10-20 ms where the product takes 0.1 (measured on the 2 shared cores)."""
    return np.einsum("ij,kj->ik", queries, vectors)


def sign_bits(vectors: np.ndarray) -> np.ndarray:
    """(n, ceil(dim / 8)) uint8: 1 where a component is > 0, first dimension highest."""
    return np.packbits(np.asarray(vectors) > 0, axis=1)


def _empty(nq: int) -> SearchResult:
    return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)


class FlatIndex:
    """Exact inner-product search: ``IndexIDMap`` over ``IndexFlatIP``; deletes are immediate."""

    kind = "flat"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index = faiss.IndexIDMap(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def labels(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        if len(labels):
            self._index.add_with_ids(vectors, labels)

    def remove(self, labels: np.ndarray) -> None:
        if len(labels):
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(labels, np.int64)))

    def needs_rebuild(self) -> bool:
        return False

    reduced = False  # scores are exact; nothing to rescore

    def candidates(self, k: int) -> int:
        return k

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, **_plan: Any
    ) -> SearchResult:
        k = min(k, len(self) if allowed is None else len(allowed))
        if k <= 0:
            return _empty(len(queries))
        if allowed is None:
            return self._index.search(queries, k)
        selector = faiss.IDSelectorBatch(np.asarray(allowed, np.int64))
        return self._index.search(queries, k, params=_faiss.SearchParameters(sel=selector))


class ApproximateIndex:
    """HNSW or IVF index over positions, with tombstones for deletes and replacements.

    FAISS's HNSW cannot remove entries and IVF removal is slow, so a removed label only
    clears its ``alive`` bit; searches exclude dead positions with a bitmap selector, and
    ``needs_rebuild`` asks for a compaction once they exceed ``tombstone_ratio``. The index
    runs in an exact mode (``IndexFlatIP``) while an IVF collection (or an sq8 one) is too
    small to train, and after a reload from disk until the background build of the real index
    finishes.

    With ``precision: sq8`` the HNSW graph / IVF lists hold 8-bit codes (``IndexHNSWSQ``,
    ``IndexIVFScalarQuantizer`` on raw vectors): searches return ``candidates(k)`` labels
    with approximate scores for the caller to ``rescore``. The quantizer is trained once on
    float32 vectors (the exact mode's, i.e. SQLite's); a rebuild from the index's own decoded
    vectors keeps that training, so a compaction or IVF retraining re-encodes every vector
    to the very same codes (decoding then encoding with one quantizer is the identity).
    """

    def __init__(
        self,
        dim: int,
        kind: str,
        options: dict[str, Any],
        *,
        tombstone_ratio: float = 0.2,
        exact: bool = False,
    ) -> None:
        if kind not in ("hnsw", "ivf"):
            raise ValueError(f"not an approximate index type: {kind!r}")
        self.dim, self.kind, self.options = dim, kind, options
        self.tombstone_ratio = tombstone_ratio
        self._labels = np.empty(0, np.int64)  # position -> label
        self._alive = np.empty(0, bool)
        self._size = 0  # positions used, dead ones included
        self._pos: dict[int, int] = {}  # live label -> position
        self._ascending = True  # labels were added in increasing order (the store's row ids are)
        self._trained_on = 0
        self._nprobe = 1
        self.sq8 = options.get("precision") == "sq8"
        self.binary = options.get("precision") == "binary"
        self._sq_trained: np.ndarray | None = None  # the scalar quantizer's trained ranges
        self._index: Any
        if kind == "hnsw" and not exact and not self.sq8:
            self._make_hnsw(None)
        else:
            self._mode = "exact"
            self._index = faiss.IndexFlatIP(dim)

    def _make_hnsw(self, train: np.ndarray | None) -> None:
        m = int(self.options["m"])
        if self.binary:
            index = faiss.IndexBinaryHNSW(8 * -(-self.dim // 8), m)
        elif self.sq8:
            index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_8bit, m, faiss.METRIC_INNER_PRODUCT)
            self._train_sq(index, faiss.downcast_index(index.storage), train)
        else:
            index = faiss.IndexHNSWFlat(self.dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(self.options["ef_construction"])
        self._index, self._mode = index, "hnsw"

    def _train_sq(self, index: Any, sq_index: Any, train: np.ndarray | None) -> None:
        """Train ``sq_index``'s quantizer on ``train``, or give it ``self._sq_trained``."""
        if self._sq_trained is None:
            assert train is not None and len(train)
            if len(train) > _SQ8_TRAIN_SAMPLE:
                rows = np.random.default_rng(0).choice(len(train), _SQ8_TRAIN_SAMPLE, replace=False)
                train = train[np.sort(rows)]
            sq_index.train(np.ascontiguousarray(train, np.float32))
            self._sq_trained = faiss.vector_to_array(sq_index.sq.trained).copy()
        else:
            faiss.copy_array_to_vector(self._sq_trained, sq_index.sq.trained)
        sq_index.is_trained = True
        index.is_trained = True

    @property
    def reduced(self) -> bool:
        """Scores are approximate (sq8 codes, sign bits): rescore ``candidates(k)`` hits."""
        return (self.sq8 or self.binary) and self._mode != "exact"

    def candidates(self, k: int) -> int:
        factor = BINARY_RESCORE_FACTOR if self.binary else RESCORE_FACTOR
        return max(factor * k, RESCORE_MIN) if self.reduced else k

    @property
    def _bits(self) -> bool:
        """The FAISS index holds sign bits (queries and vectors are packed before it sees them)."""
        return self.binary and self._mode != "exact"

    @classmethod
    def build(
        cls,
        dim: int,
        kind: str,
        options: dict[str, Any],
        labels: np.ndarray,
        vectors: np.ndarray,
        *,
        tombstone_ratio: float = 0.2,
        should_stop: Callable[[], bool] = lambda: False,
        like: ApproximateIndex | None = None,
    ) -> ApproximateIndex:
        """A fresh index of the best mode for these vectors (slow: run it off the request path).

        ``like``: the index being replaced; when its vectors are sq8 codes (``vectors`` are their
        decoded values) its quantizer training is kept."""
        index = cls(dim, kind, options, tombstone_ratio=tombstone_ratio, exact=True)
        if like is not None and like.reduced:
            index._sq_trained = like._sq_trained
        n = len(labels)
        if kind == "ivf" and n >= int(options["min_train"]):
            index._train_ivf(vectors)
        elif kind == "hnsw" and (not index.sq8 or n >= SQ8_MIN_TRAIN or index._sq_trained is not None):
            index._make_hnsw(vectors)
        for start in range(0, len(labels), _BUILD_CHUNK):
            if should_stop():
                raise BuildCancelled
            index.add(labels[start : start + _BUILD_CHUNK], vectors[start : start + _BUILD_CHUNK])
        return index

    def export_state(self) -> tuple[Any, np.ndarray, np.ndarray, dict[str, Any]]:
        """(FAISS index, labels by position, alive bits, plain facts) for a snapshot on disk."""
        if self._mode == "exact":
            raise ValueError("an index in exact mode is rebuilt from the store, not saved")
        facts = {
            "mode": self._mode,
            "size": self._size,
            "ascending": self._ascending,
            "trained_on": self._trained_on,
            "nprobe": self._nprobe,
            "sq8": self.sq8,
            "binary": self.binary,
        }
        return self._index, self._labels[: self._size].copy(), self._alive[: self._size].copy(), facts

    @classmethod
    def restore(
        cls,
        dim: int,
        kind: str,
        options: dict[str, Any],
        faiss_index: Any,
        labels: np.ndarray,
        alive: np.ndarray,
        facts: dict[str, Any],
        *,
        tombstone_ratio: float = 0.2,
    ) -> ApproximateIndex:
        """The inverse of ``export_state``; raises ValueError when the parts disagree."""
        size = int(facts["size"])
        mode = facts["mode"]
        if mode != kind or faiss_index.d != dim or faiss_index.ntotal != size:
            raise ValueError(
                f"snapshot of a {mode} index with {faiss_index.ntotal} x {faiss_index.d} vectors"
            )
        if len(labels) != size or len(alive) != size:
            raise ValueError("snapshot labels and index sizes differ")
        index = cls(dim, kind, options, tombstone_ratio=tombstone_ratio, exact=True)
        # ``faiss_index`` must be the object that owns the C++ index (as faiss.read_index returns
        # it, already of its concrete class): a downcast copy would not keep it alive.
        expected = {
            ("hnsw", False): faiss.IndexHNSWFlat,
            ("hnsw", True): faiss.IndexHNSWSQ,
            ("ivf", False): faiss.IndexIVFFlat,
            ("ivf", True): faiss.IndexIVFScalarQuantizer,
        }[mode, index.sq8]
        if index.binary:
            expected = faiss.IndexBinaryHNSW
        if not isinstance(faiss_index, expected):
            raise ValueError(f"snapshot holds a {type(faiss_index).__name__}, not a {expected.__name__}")
        if index.sq8:
            sq_index = faiss.downcast_index(faiss_index.storage) if mode == "hnsw" else faiss_index
            index._sq_trained = faiss.vector_to_array(sq_index.sq.trained).copy()
        if mode == "ivf":
            faiss_index.make_direct_map()  # positions are sequential, so reconstruct() works
            index._trained_on, index._nprobe = int(facts["trained_on"]), int(facts["nprobe"])
        index._index, index._mode = faiss_index, mode
        index._labels, index._alive, index._size = labels.astype(np.int64), alive.astype(bool), size
        live = np.flatnonzero(index._alive)
        index._pos = dict(zip((int(x) for x in index._labels[live]), (int(p) for p in live), strict=True))
        index._ascending = bool(facts["ascending"])
        return index

    def _train_ivf(self, vectors: np.ndarray) -> None:
        n = len(vectors)
        nlist = self.options["nlist"] or max(1, min(round(2 * math.sqrt(n)), n // 39))
        nlist = max(1, min(int(nlist), n))
        quantizer = faiss.IndexFlatIP(self.dim)
        if self.sq8:  # codes of the raw vectors (not residuals): the training survives retraining
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, self.dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False
            )
        else:
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.seed = 1234
        sample = vectors
        if n > 64 * nlist:  # k-means needs ~40 points per centroid; more only costs time
            rows = np.random.default_rng(0).choice(n, 64 * nlist, replace=False)
            sample = vectors[np.sort(rows)]
        if self.sq8 and self._sq_trained is not None:
            ivf.train(np.ascontiguousarray(sample))  # the lists; then the kept quantizer ranges
            self._train_sq(ivf, ivf, None)
        else:
            ivf.train(np.ascontiguousarray(sample))
            if self.sq8:
                self._sq_trained = faiss.vector_to_array(ivf.sq.trained).copy()
        ivf.make_direct_map()  # positions are sequential, so reconstruct() works
        self._quantizer, self._index, self._mode = quantizer, ivf, "ivf"
        self._trained_on = n
        self._nprobe = int(self.options["nprobe"] or min(nlist, max(8, nlist // 4)))

    def __len__(self) -> int:
        return len(self._pos)

    @property
    def mode(self) -> str:
        """``exact``, ``hnsw`` or ``ivf``: what actually answers searches right now."""
        return self._mode

    @property
    def tombstones(self) -> int:
        return self._size - len(self._pos)

    def labels(self) -> np.ndarray:
        return np.fromiter(self._pos.keys(), np.int64, len(self._pos))

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        n = len(labels)
        if not n:
            return
        if any(int(label) in self._pos for label in labels):
            raise ValueError("label already present; remove it first")
        need = self._size + n
        if need > len(self._labels):
            cap = max(need, 2 * len(self._labels), 1024)
            self._labels = np.resize(self._labels, cap)
            alive = np.zeros(cap, bool)
            alive[: self._size] = self._alive[: self._size]
            self._alive = alive
        self._index.add(sign_bits(vectors) if self._bits else np.ascontiguousarray(vectors, np.float32))
        last = self._labels[self._size - 1] if self._size else np.iinfo(np.int64).min
        self._ascending = self._ascending and labels[0] > last and bool(np.all(np.diff(labels) > 0))
        self._labels[self._size : need] = labels
        self._alive[self._size : need] = True
        self._pos.update(zip((int(x) for x in labels), range(self._size, need), strict=True))
        self._size = need

    def remove(self, labels: Iterable[int]) -> None:
        for label in labels:
            pos = self._pos.pop(int(label), None)
            if pos is not None:
                self._alive[pos] = False

    def needs_rebuild(self) -> bool:
        live = len(self._pos)
        if self.tombstones and self.tombstones > self.tombstone_ratio * self._size:
            return True
        if self.kind == "hnsw":
            return self._mode == "exact" and live >= (SQ8_MIN_TRAIN if self.sq8 else 1)
        if self._mode == "exact":
            return live >= int(self.options["min_train"])
        return live >= 4 * self._trained_on  # grown a lot since k-means: retrain

    def live_items(self) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of every live entry, in insertion order."""
        positions = np.flatnonzero(self._alive[: self._size])
        if self._bits:  # +-1 per bit: packing them again gives the very same codes
            bits = np.unpackbits(self._codes()[positions], axis=1)[:, : self.dim]
            return self._labels[positions].copy(), bits.astype(np.float32) * 2 - 1
        vectors = (
            self._index.reconstruct_batch(positions)
            if len(positions)
            else np.empty((0, self.dim), np.float32)
        )
        return self._labels[positions].copy(), vectors

    def _codes(self) -> np.ndarray:
        storage = faiss.downcast_IndexBinary(self._index.storage)
        return faiss.vector_to_array(storage.xb).reshape(-1, storage.code_size)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        *,
        exact: bool = False,
        ef_search: int | None = None,
    ) -> SearchResult:
        """The ``k`` best live entries (of ``allowed`` labels, when given). ``exact``: scan
        the selected entries instead of walking the graph / probing lists; ``ef_search``: the
        HNSW beam for this search (default: the collection's option)."""
        positions = None if allowed is None else self._positions(np.asarray(allowed, np.int64))
        n_allowed = len(self._pos) if positions is None else len(positions)
        k = min(k, n_allowed)
        if k <= 0:
            return _empty(len(queries))
        small = positions is not None and len(positions) <= EXACT_SUBSET_MAX
        if small and self._mode != "exact" and not self._bits:
            return self._exact(queries, k, positions)
        if self._bits:  # Hamming distances of sign bits; the caller rescores the candidates
            queries, exact = sign_bits(queries), exact or small
        if positions is None and not self.tombstones:
            mask = None
        elif positions is None:
            mask = self._alive[: self._size]
        else:
            mask = np.zeros(self._size, bool)
            mask[positions] = True
        bits = None if mask is None else np.packbits(mask, bitorder="little")
        selector = None if bits is None else faiss.IDSelectorBitmap(self._size, faiss.swig_ptr(bits))
        if exact and self._mode != "exact":
            scores, found = self._exhaustive(queries, k, selector)
            return scores, np.where(found >= 0, self._labels[np.maximum(found, 0)], -1)
        if self._mode == "hnsw":
            params = _faiss.SearchParametersHNSW(
                sel=selector, efSearch=max(int(ef_search or self.options["ef_search"]), k)
            )
        elif self._mode == "ivf":
            params = _faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe)
        else:
            params = _faiss.SearchParameters(sel=selector)
        scores, found = self._index.search(queries, k, params=params)
        if self._bits:
            scores = -scores.astype(np.float32)  # higher is better, as for inner products
        short = (found >= 0).sum(axis=1) < k
        if short.any():  # the approximate search came back with too few hits: scan everything instead
            scores[short], found[short] = self._exhaustive(queries[short], k, selector)
        labels = np.where(found >= 0, self._labels[np.maximum(found, 0)], -1)
        return scores, labels

    def _exhaustive(self, queries: np.ndarray, k: int, selector: Any) -> SearchResult:
        """Exact search over the selected positions, reading the index's own stored vectors."""
        if self._mode == "ivf":  # IVFFlat keeps full vectors: probing every list is exact
            return self._index.search(
                queries, k, params=_faiss.SearchParametersIVF(sel=selector, nprobe=self._index.nlist)
            )
        if self._bits:
            storage = faiss.downcast_IndexBinary(self._index.storage)
            distances, found = storage.search(queries, k, params=_faiss.SearchParameters(sel=selector))
            return -distances.astype(np.float32), found
        storage = faiss.downcast_index(self._index.storage) if self._mode == "hnsw" else self._index
        return storage.search(queries, k, params=_faiss.SearchParameters(sel=selector))

    def _positions(self, labels: np.ndarray) -> np.ndarray:
        """Positions of the live entries among ``labels``."""
        if not self._ascending:
            pos = self._pos
            return np.fromiter((pos[int(x)] for x in labels if int(x) in pos), np.int64)
        # labels are appended in increasing order (row ids grow), so a binary search will do
        found = np.minimum(np.searchsorted(self._labels[: self._size], labels), max(self._size - 1, 0))
        keep = (
            (self._labels[found] == labels) & self._alive[found]
            if self._size
            else np.zeros(len(labels), bool)
        )
        return found[keep]

    def _exact(self, queries: np.ndarray, k: int, positions: np.ndarray) -> SearchResult:
        scores, found = self._exact_positions(queries, k, positions)
        return scores, np.where(found >= 0, self._labels[np.maximum(found, 0)], -1)

    def _exact_positions(self, queries: np.ndarray, k: int, positions: np.ndarray) -> SearchResult:
        vectors = self._index.reconstruct_batch(positions)
        scores = _products(queries, vectors)  # (nq, m)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, top, axis=1).astype(np.float32), positions[top]


VectorIndex = FlatIndex | ApproximateIndex


def new_index(
    dim: int, kind: str, options: dict[str, Any], *, tombstone_ratio: float, exact: bool = False
) -> VectorIndex:
    """An empty index of the given type (``exact`` starts an approximate one in exact mode)."""
    if kind == "flat":
        return FlatIndex(dim)
    return ApproximateIndex(dim, kind, options, tombstone_ratio=tombstone_ratio, exact=exact)


class RWLock:
    """Readers-writer lock, writer-preferring so a stream of searches cannot starve writes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class LiveIndex:
    """A collection's index, its readers-writer lock, and online rebuilds.

    Search under ``lock.read()``; call ``apply``/``replace``/``retire`` under ``lock.write()``.
    ``rebuild`` snapshots the live vectors under the read lock, builds a fresh index with no
    lock held, then under the write lock replays the changes journaled meanwhile and swaps.
    """

    def __init__(self, index: VectorIndex) -> None:
        self.index = index
        self.lock = RWLock()
        self.rebuilding = False  # set by the caller that schedules a rebuild, cleared by rebuild()
        self.retired = False  # the collection was deleted
        self._generation = 0  # bumped whenever ``index`` is replaced; a stale rebuild is dropped
        self._journal: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def apply(self, removed: np.ndarray, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Mirror a committed change: drop ``removed`` labels, then add ``labels``/``vectors``."""
        self.index.remove(removed)
        self.index.add(labels, vectors)
        if self._journal is not None:
            self._journal.append((removed, labels, vectors))

    def replace(self, index: VectorIndex) -> None:
        self.index, self._generation = index, self._generation + 1

    def needs_rebuild(self) -> bool:
        return not self.rebuilding and not self.retired and self.index.needs_rebuild()

    def rebuild(self, should_stop: Callable[[], bool] = lambda: False) -> VectorIndex | None:
        """Replace an approximate index by a freshly built one; None if skipped or cancelled."""
        try:
            with self.lock.read():
                old = self.index
                if self.retired or not isinstance(old, ApproximateIndex):
                    return None
                labels, vectors = old.live_items()
                generation, self._journal = self._generation, []
            fresh = ApproximateIndex.build(
                old.dim,
                old.kind,
                old.options,
                labels,
                vectors,
                tombstone_ratio=old.tombstone_ratio,
                should_stop=should_stop,
                like=old,
            )
            del vectors
            with self.lock.write():
                if self.retired or should_stop() or self._generation != generation or self._journal is None:
                    return None
                for removed, added, added_vectors in self._journal:
                    fresh.remove(removed)
                    fresh.add(added, added_vectors)
                self.replace(fresh)
            return fresh
        except BuildCancelled:
            return None
        finally:
            with self.lock.write():
                self._journal, self.rebuilding = None, False
