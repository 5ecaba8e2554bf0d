"""Zero-shot text-video retrieval as the LLaVE authors evaluate it (paper, Table 4).

    python -m training.evaluate --video-retrieval msrvtt --model M \\
        --data MSRVTT/MSRVTT_JSFUSION_test.csv --video-root MSRVTT/videos/all [--compare paper:LLaVE-7B]
    python -m training.evaluate --video-retrieval msvd --model M --data msvd/ [--video-root msvd/YouTubeClips]

The layouts are those of the CLIP4Clip loaders the authors' script uses
(``CLIP4Clip/dataloaders/dataloader_{msrvtt,msvd}_retrieval.py``):

- **MSR-VTT**: a CSV with ``video_id`` and ``sentence`` columns (the 1k-A test split,
  ``MSRVTT_JSFUSION_test.csv``), one caption per clip; clip ``V`` is ``<video-root>/V.mp4``.
- **MSVD**: a folder with ``test_list.txt`` (one clip id a line) and ``raw-captions.pkl``
  (clip id -> captions as lists of words, joined with spaces); the clips are the files
  under ``--video-root`` (default: the folder) named ``<id>.<any extension>``.

Each clip is embedded as ``<image>\\nRepresent the given video.`` with the whole clip under
its one ``<image>``; each caption as ``Find me an video that matches the given caption:
{caption}`` (their wording). Similarities are dot products of normalised embeddings.
Text-to-video: the rank of each caption's clip among all clips. Video-to-text: with one
caption per clip, the rank of the clip's caption among all captions; with several (MSVD),
each clip scores each clip's captions by their best one, as CLIP4Clip's
``tensor_video_to_text_sim`` does. R@K is the percentage ranked in the first K; MdR and
MnR the median and mean rank (1 = first).
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.video import VIDEO_TEXT

CAPTION_PREFIX = "Find me an video that matches the given caption: "
LAYOUTS = ("msrvtt", "msvd")
RANKS = (1, 5, 10)
# LLaVE, arXiv:2503.04812, Table 4 (zero-shot text-to-video retrieval, LLaVE-7B), percent.
PAPER: dict[str, dict[str, dict[str, float]]] = {
    "LLaVE-7B": {
        "msrvtt": {"R@1": 46.8, "R@5": 71.1, "R@10": 80.0},
        "msvd": {"R@1": 52.9, "R@5": 80.1, "R@10": 87.0},
    }
}


@dataclass
class VideoRetrievalSet:
    """Clips (paths) and captions; ``owner[i]`` is the clip index of caption ``i``."""

    name: str
    videos: list[Path]
    captions: list[str]
    owner: list[int]


class _Captions(pickle.Unpickler):
    """``raw-captions.pkl`` holds only dicts, lists and strings: nothing else is loaded."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"raw-captions.pkl may hold only plain data, not {module}.{name}")


def load_msrvtt(csv_path: Path, video_root: Path) -> VideoRetrievalSet:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"video_id", "sentence"} <= set(rows[0]):
        raise ValueError(f"{csv_path}: expected a CSV with 'video_id' and 'sentence' columns")
    videos = [video_root / f"{r['video_id']}.mp4" for r in rows]
    return VideoRetrievalSet("MSR-VTT", videos, [r["sentence"] for r in rows], list(range(len(rows))))


def load_msvd(folder: Path, video_root: Path, split: str = "test") -> VideoRetrievalSet:
    ids = [line.strip() for line in (folder / f"{split}_list.txt").read_text().splitlines() if line.strip()]
    with open(folder / "raw-captions.pkl", "rb") as f:
        captions = _Captions(f).load()
    files = {p.stem: p for p in sorted(video_root.rglob("*")) if p.is_file() and p.stem in set(ids)}
    missing = [i for i in ids if i not in files or i not in captions]
    if missing:
        raise ValueError(
            f"{len(missing)} clips of {split}_list.txt have no file or no caption, e.g. {missing[0]}"
        )
    texts, owner = [], []
    for n, vid in enumerate(ids):
        for words in captions[vid]:
            texts.append(" ".join(words) if isinstance(words, list) else str(words))
            owner.append(n)
    return VideoRetrievalSet("MSVD", [files[i] for i in ids], texts, owner)


def load(layout: str, data: str | Path, video_root: str | Path | None) -> VideoRetrievalSet:
    data = Path(data)
    if layout == "msrvtt":
        return load_msrvtt(data, Path(video_root) if video_root else data.parent)
    if layout == "msvd":
        return load_msvd(data, Path(video_root) if video_root else data)
    raise ValueError(f"unknown video retrieval layout {layout!r} (one of {', '.join(LAYOUTS)})")


def ranks(sim: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """1-based rank of ``sim[i, truth[i]]`` in row ``i`` (ties count in its favour)."""
    right = sim[np.arange(len(sim)), truth][:, None]
    return (sim > right).sum(axis=1) + 1


def metrics(rank: np.ndarray) -> dict[str, float]:
    out = {f"R@{k}": float(100.0 * np.mean(rank <= k)) for k in RANKS}
    out.update({"MdR": float(np.median(rank)), "MnR": float(np.mean(rank)), "queries": int(len(rank))})
    return out


def score(text_vectors: np.ndarray, video_vectors: np.ndarray, owner: Sequence[int]) -> dict[str, Any]:
    """Both directions from normalised (captions, dim) and (clips, dim) vectors."""
    owner_arr = np.asarray(owner)
    sim = text_vectors @ video_vectors.T  # (captions, clips)
    t2v = ranks(sim, owner_arr)
    # each clip against each clip's captions, a caption set scored by its best caption
    best = np.full((video_vectors.shape[0], video_vectors.shape[0]), -np.inf, dtype=sim.dtype)
    for clip in range(video_vectors.shape[0]):
        mine = owner_arr == clip
        if mine.any():
            best[:, clip] = sim[mine].max(axis=0)
    v2t = ranks(best, np.arange(len(best)))
    return {"text_to_video": metrics(t2v), "video_to_text": metrics(v2t)}


def embed_inputs(
    embedder, inputs: list[dict[str, Any]], batch_size: int, advance: Callable[[int], Any] = lambda n: None
) -> np.ndarray:
    chunks = []
    for start in range(0, len(inputs), batch_size):
        part = inputs[start : start + batch_size]
        chunks.append(np.asarray(embedder.embed(part, batch_size=batch_size), dtype=np.float32))
        advance(len(part))
    return np.concatenate(chunks)


def evaluate(
    embedder, data: VideoRetrievalSet, *, batch_size: int = 4, video_batch_size: int = 1, progress: Any = None
) -> dict[str, Any]:
    """Embed the captions and the clips (each clip's bytes read when its batch is sent),
    then score both directions."""
    advance = progress.update if progress is not None else (lambda n: None)
    texts = embed_inputs(embedder, [{"text": CAPTION_PREFIX + c} for c in data.captions], batch_size, advance)
    vectors = []
    for start in range(0, len(data.videos), video_batch_size):
        paths = data.videos[start : start + video_batch_size]
        batch = [{"video": p.read_bytes(), "text": VIDEO_TEXT} for p in paths]
        vectors.append(embed_inputs(embedder, batch, video_batch_size, advance))
    result = score(texts, np.concatenate(vectors), data.owner)
    return {"dataset": data.name, "videos": len(data.videos), "captions": len(data.captions), **result}


def paper_reference(spec: str, layout: str) -> dict[str, Any]:
    """``paper:LLaVE-7B`` -> that model's published text-to-video R@K for the layout."""
    name = spec.partition(":")[2] or "LLaVE-7B"
    match = [m for m in PAPER if m.lower() == name.lower()]
    if not match:
        raise ValueError(f"the paper gives video retrieval numbers for {', '.join(PAPER)} only, not {name!r}")
    return {"label": f"paper:{match[0]}", "text_to_video": PAPER[match[0]][layout]}


def format_report(result: dict[str, Any], reference: dict[str, Any] | None = None) -> str:
    head = f"{result['dataset']}: {result['captions']} captions, {result['videos']} clips"
    lines = [head, "", "| direction | R@1 | R@5 | R@10 | MdR | MnR |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in (("text_to_video", "text -> video"), ("video_to_text", "video -> text")):
        m = result[key]
        lines.append(
            f"| {label} | {m['R@1']:.1f} | {m['R@5']:.1f} | {m['R@10']:.1f} | {m['MdR']:.1f} | {m['MnR']:.1f} |"
        )
    if reference is not None:
        ref, mine = reference["text_to_video"], result["text_to_video"]
        lines += ["", f"text -> video, this run minus {reference['label']} (points):", ""]
        lines += ["| | R@1 | R@5 | R@10 |", "|---|---:|---:|---:|"]
        lines.append("| this run | " + " | ".join(f"{mine[k]:.1f}" for k in ref) + " |")
        lines.append(f"| {reference['label']} | " + " | ".join(f"{ref[k]:.1f}" for k in ref) + " |")
        lines.append("| Δ | " + " | ".join(f"{mine[k] - ref[k]:+.1f}" for k in ref) + " |")
    return "\n".join(lines)
