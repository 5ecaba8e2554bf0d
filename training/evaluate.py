"""MMEB-style evaluation: Precision@1 of each query over its candidate targets.

    python -m training.evaluate --model M --data eval.jsonl --image-root D [--batch-size 16]
        [--device auto] [--dtype auto] [--limit N] [--output results.json]

Rows (JSONL or Parquet) are ``{"qry_text", "qry_img_path", "tgt_text": [...],
"tgt_img_path": [...], "dataset"?}``; the first target is the positive, ``<|image_1|>``
marks an image. A row scores 1 when the positive has the highest similarity (ties go to
the first candidate, as ``argmax`` does in the MMEB reference code). Scores are averaged
per dataset and the overall score is the mean over datasets (MMEB's convention). The
table goes to stdout; its last line is one JSON object:
``{"precision_at_1": ..., "rows": ..., "datasets": {name: {"precision_at_1", "rows"}}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python training/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.data import BadRowError, LoadReport, Side, iter_rows, model_input, parse_side  # noqa: E402

DEFAULT_DATASET = "all"


@dataclass(frozen=True)
class EvalRow:
    query: Side
    candidates: tuple[Side, ...]  # the positive first
    dataset: str
    source: str


def parse_eval_row(row: Any, image_root: Path | None, *, check_files: bool = True) -> EvalRow:
    if isinstance(row, Exception):
        raise BadRowError(f"invalid JSON ({row})")
    if not isinstance(row, dict):
        raise BadRowError(f"a row must be an object, got {type(row).__name__}")
    query = parse_side(row, "qry_text", "qry_img_path", image_root, check_files)
    texts, images = row.get("tgt_text"), row.get("tgt_img_path")
    if not isinstance(texts, list) or not texts:
        raise BadRowError("'tgt_text' must be a non-empty list")
    if images is None:
        images = [""] * len(texts)
    if not isinstance(images, list) or len(images) != len(texts):
        raise BadRowError("'tgt_img_path' must be a list as long as 'tgt_text'")
    candidates = []
    for i, (text, image) in enumerate(zip(texts, images, strict=True)):
        try:
            candidates.append(parse_side({"t": text, "i": image}, "t", "i", image_root, check_files))
        except BadRowError as exc:
            raise BadRowError(f"target {i}: {exc}") from None
    dataset = row.get("dataset") or DEFAULT_DATASET
    return EvalRow(query=query, candidates=tuple(candidates), dataset=str(dataset), source="")


def load_eval_rows(
    path: str | Path, image_root: str | Path | None, *, on_bad: str = "skip", limit: int | None = None
) -> tuple[list[EvalRow], LoadReport]:
    root = Path(image_root) if image_root is not None else None
    rows: list[EvalRow] = []
    report = LoadReport()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    for number, raw in iter_rows(path):
        if limit is not None and len(rows) >= limit:
            break
        report.rows += 1
        source = f"{path}:{number}"
        try:
            row = parse_eval_row(raw, root)
        except BadRowError as exc:
            if on_bad == "error":
                raise BadRowError(f"{source}: {exc}") from None
            report.skipped.append(f"{source}: {exc}")
            continue
        rows.append(EvalRow(row.query, row.candidates, row.dataset, source))
    return rows, report


def evaluate(
    embedder, rows: Sequence[EvalRow], image_root: str | Path | None, *, batch_size: int = 16
) -> dict:
    """Precision@1 per dataset and overall (mean over datasets); embeds each distinct
    query and candidate once."""
    root = Path(image_root) if image_root is not None else None
    index: dict[Side, int] = {}
    for row in rows:
        for side in (row.query, *row.candidates):
            index.setdefault(side, len(index))
    sides = list(index)
    vectors = embedder.embed([model_input(s, root) for s in sides], batch_size=batch_size)  # (n_unique, dim)
    hits: dict[str, list[float]] = {}
    for row in rows:
        q = vectors[index[row.query]]  # (dim,)
        c = vectors[[index[s] for s in row.candidates]]  # (k, dim)
        hits.setdefault(row.dataset, []).append(float(np.argmax(c @ q) == 0))
    datasets = {
        name: {"precision_at_1": float(np.mean(values)), "rows": len(values)}
        for name, values in sorted(hits.items())
    }
    overall = float(np.mean([d["precision_at_1"] for d in datasets.values()])) if datasets else float("nan")
    return {"precision_at_1": overall, "rows": len(rows), "datasets": datasets}


def format_table(result: dict) -> str:
    width = max([len("dataset"), len("overall (mean)")] + [len(n) for n in result["datasets"]])
    lines = [f"{'dataset':<{width}}  {'rows':>6}  {'P@1':>6}", "-" * (width + 16)]
    for name, d in result["datasets"].items():
        lines.append(f"{name:<{width}}  {d['rows']:>6}  {d['precision_at_1']:>6.3f}")
    lines.append("-" * (width + 16))
    lines.append(f"{'overall (mean)':<{width}}  {result['rows']:>6}  {result['precision_at_1']:>6.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (either layout)")
    parser.add_argument("--data", required=True, help="MMEB-eval rows, .jsonl or .parquet")
    parser.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument(
        "--bad-rows", choices=["skip", "error"], default="skip", help="what to do with unusable rows"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)

    from model import load_embedder

    rows, report = load_eval_rows(args.data, args.image_root, on_bad=args.bad_rows, limit=args.limit)
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not rows:
        parser.error(f"no usable rows in {args.data}")
    embedder = load_embedder(args.model, device=args.device, dtype=args.dtype)
    result = evaluate(embedder, rows, args.image_root, batch_size=args.batch_size)
    result["model"] = str(args.model)
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
