"""Mine hard negatives for a training set from a live index of its targets.

    python -m training.mine --model runs/round1 --train-data train.jsonl --image-root D \\
        --out train_mined.jsonl [--top-k 4] [--skip-top 0] [--margin 0.95]
    python training/run.py --model runs/round1 --train-data train_mined.jsonl \\
        --image-root D --hard-negatives 4 --output-dir runs/round2 ...

Every distinct target of the training set is embedded (by ``--model``, or by a running
server with ``--server URL``) and indexed; each query is embedded and searched against
all of them (exact inner product on normalised vectors). From its ranking this drops:

* the row's own positive (and any target with the same content), and with
  ``--drop-same-query-positives`` the positives of every row whose query is identical,
* the ``--skip-top`` highest remaining candidates (optional, 0 by default),
* likely false negatives: any candidate scoring above ``--margin`` x the positive's
  score (positive-aware mining, as NV-Retriever's "TopK-PercPos"; 0.95 by default),

and keeps the next ``--top-k`` as the row's ``neg_text``/``neg_image_path`` lists
(MMEB's text/image-path convention; the training loader reads strings or lists). Every
other field of the row is written unchanged; rows that cannot be read are reported and
left out. A summary goes to stderr and, as JSON, next to ``--out`` (``.stats.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import BadRowError, Side, iter_rows, parse_train_row  # noqa: E402
from training.evaluate import embed_sides  # noqa: E402

logger = logging.getLogger("training.mine")


def select_negatives(
    scores: np.ndarray,
    positive: int,
    *,
    top_k: int,
    skip_top: int = 0,
    margin: float = 0.95,
    excluded: Sequence[int] = (),
) -> list[int]:
    """Indices of the mined negatives for one query, best first.

    Args:
        scores: (T,) the query's scores against every indexed target.
        positive: index of the row's positive among them.
        top_k: how many to keep.
        skip_top: how many of the highest-scoring remaining candidates to pass over.
        margin: candidates scoring above ``margin * scores[positive]`` are dropped as
            likely false negatives (``inf`` keeps them all).
        excluded: other indices that are never negatives (e.g. the query's own content).
    """
    ceiling = margin * float(scores[positive])
    banned = {positive, *excluded}
    order = np.argsort(-scores, kind="stable")
    kept: list[int] = []
    skipped = 0
    for j in order.tolist():
        if j in banned or scores[j] > ceiling:
            continue
        if skipped < skip_top:
            skipped += 1
            continue
        kept.append(j)
        if len(kept) == top_k:
            break
    return kept


def _embed(embedder, sides: list[Side], root: Path | None, batch_size: int) -> np.ndarray:
    """Unit vectors of ``sides`` in order (the evaluator's chunked embedding, normalised)."""
    out = embed_sides(embedder, sides, root, batch_size)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def mine(
    embedder,
    train_data: Sequence[str | Path],
    image_root: str | Path | None,
    out: str | Path,
    *,
    top_k: int = 4,
    skip_top: int = 0,
    margin: float = 0.95,
    batch_size: int = 16,
    drop_same_query_positives: bool = False,
) -> dict:
    """Write ``out`` (JSONL): the readable rows of ``train_data`` with mined negatives."""
    root = Path(image_root) if image_root is not None else None
    rows, queries, positives, skipped = [], [], [], []
    for path in map(Path, train_data):
        for number, row in iter_rows(path):
            try:
                pair = parse_train_row(row, root)
            except BadRowError as exc:
                skipped.append(f"{path}:{number}: {exc}")
                continue
            rows.append(row)
            queries.append(pair.query)
            positives.append(pair.target)
    if not rows:
        raise ValueError("no readable rows to mine")
    index: dict[Side, int] = {}
    for side in positives:
        index.setdefault(side, len(index))
    targets = list(index)
    by_key = {side.key: i for i, side in enumerate(targets)}
    positives_of_query: dict[int, set[int]] = {}
    for query, positive in zip(queries, positives, strict=True):
        positives_of_query.setdefault(query.key, set()).add(index[positive])
    logger.info("embedding %d distinct targets and %d queries", len(targets), len(queries))
    target_vectors = _embed(embedder, targets, root, batch_size)  # (T, d)
    query_vectors = _embed(embedder, queries, root, batch_size)  # (Q, d)

    counts, dropped_by_margin, gaps = [], 0, []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for start in range(0, len(rows), 1024):
            block = query_vectors[start : start + 1024] @ target_vectors.T  # (b, T)
            for offset, scores in enumerate(block):
                i = start + offset
                positive = index[positives[i]]
                same_as_query = [by_key[queries[i].key]] if queries[i].key in by_key else []
                if drop_same_query_positives:
                    same_as_query += sorted(positives_of_query[queries[i].key])
                chosen = select_negatives(
                    scores, positive, top_k=top_k, skip_top=skip_top, margin=margin, excluded=same_as_query
                )
                unlimited = select_negatives(
                    scores,
                    positive,
                    top_k=top_k,
                    skip_top=skip_top,
                    margin=float("inf"),
                    excluded=same_as_query,
                )
                dropped_by_margin += len(set(unlimited) - set(chosen))
                counts.append(len(chosen))
                if chosen:
                    gaps.append(float(scores[positive] - scores[chosen[0]]))
                row = dict(rows[i])
                row["neg_text"] = [targets[j].text for j in chosen]
                row["neg_image_path"] = [targets[j].image or "" for j in chosen]
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    stats = {
        "rows": len(rows),
        "skipped_rows": len(skipped),
        "targets_indexed": len(targets),
        "negatives_per_row": float(np.mean(counts)),
        "rows_without_negatives": int(sum(c == 0 for c in counts)),
        "top_k": top_k,
        "skip_top": skip_top,
        "margin": margin,
        "drop_same_query_positives": drop_same_query_positives,
        "dropped_as_likely_false_negatives": dropped_by_margin,
        "mean_positive_minus_hardest_negative": float(np.mean(gaps)) if gaps else None,
        "skipped": skipped[:20],
    }
    out.with_suffix(".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.mine",
        description="Fill neg_* of a training set with hard negatives mined from its own targets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("embedder (one of)")
    g.add_argument("--model", default=None, help="checkpoint to embed with (e.g. the round-1 model)")
    g.add_argument("--server", default=None, help="a running server's base URL to embed with instead")
    g.add_argument("--api-key", default=None, help="the server's API key (or LLAVE_API_KEY)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (with --model)")
    g.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass / request")
    g = p.add_argument_group("data")
    g.add_argument("--train-data", required=True, nargs="+", help="MMEB-train .jsonl or .parquet file(s)")
    g.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    g.add_argument("--out", required=True, type=Path, help="the mined rows (.jsonl)")
    g = p.add_argument_group("mining")
    g.add_argument("--top-k", type=int, default=4, help="negatives per row")
    g.add_argument("--skip-top", type=int, default=0, help="pass over the S highest-ranked candidates")
    g.add_argument(
        "--margin", type=float, default=0.95, help="drop candidates scoring above R x the positive's score"
    )
    g.add_argument(
        "--drop-same-query-positives",
        action="store_true",
        help="never use a positive of a row with the identical query as a negative",
    )
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.server):
        parser.error("give --model or --server (one of them)")
    if args.top_k < 1 or args.skip_top < 0:
        parser.error("--top-k must be positive and --skip-top not negative")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    if args.server:
        from training.remote import ServerEmbedder

        embedder = ServerEmbedder(args.server, api_key=args.api_key or os.environ.get("LLAVE_API_KEY"))
    else:
        import torch

        from model import load_embedder

        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        embedder = load_embedder(
            args.model, device=device, dtype="float32" if device == "cpu" else "bfloat16"
        )
        embedder.model.eval()
    stats = mine(
        embedder, args.train_data, args.image_root, args.out,
        top_k=args.top_k, skip_top=args.skip_top, margin=args.margin, batch_size=args.batch_size,
        drop_same_query_positives=args.drop_same_query_positives,
    )  # fmt: skip
    print(json.dumps({k: v for k, v in stats.items() if k != "skipped"}), file=sys.stderr)
    return stats


if __name__ == "__main__":
    main()
