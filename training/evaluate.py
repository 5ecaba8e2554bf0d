"""MMEB-style evaluation: Precision@1 of each query over its candidate targets.

    python -m training.evaluate --model M --data eval.jsonl --image-root D [--batch-size 16]
        [--device auto] [--dtype auto] [--limit N] [--output results.json]
    python -m training.evaluate (--model M | --server URL) --data MMEB-eval/ --image-root D
        [--datasets NAME|GROUP ...] [--max-rows N] [--markdown table.md]
        [--compare results.json | --compare paper:LLaVE-7B]
    python -m training.evaluate --results new.json --compare old.json
    python -m training.evaluate (--model M | --server URL) --video-retrieval msrvtt|msvd --data D
        [--video-root V] [--compare paper:LLaVE-7B]     (training/video_retrieval.py)

Rows (JSONL or Parquet) are ``{"qry_text", "qry_img_path", "tgt_text": [...],
"tgt_img_path": [...], "dataset"?}``; the first target is the positive, ``<|image_1|>``
marks an image. A row scores 1 when the positive has the highest similarity (ties go to
the first candidate, as ``argmax`` does in the MMEB reference code). Scores are averaged
per dataset and the overall score is the mean over datasets (MMEB's convention).

``--data`` is one file (datasets named by the rows' ``dataset`` field) or a folder of
per-dataset files as TIGER-Lab/MMEB-eval ships them: ``<dir>/<Dataset>/test-*.parquet``
(also ``<Dataset>/test/*.parquet`` and ``<Dataset>/*.jsonl``) or ``<dir>/<Dataset>.jsonl``
/ ``.parquet``; the dataset is the folder or file name (spelled as MMEB spells it when
it is one of its 36: ``ImageNet_1K`` is ``ImageNet-1K``). Without ``--image-root`` a folder's
images are looked up in ``<dir>/eval_images`` (where MMEB-eval's ``images.zip`` unzips),
else in ``<dir>``. Each dataset's distinct queries and candidates are embedded once, in
batches, by the model core (``--model``) or a running server (``--server URL``, POST
/embed), with progress on stderr (a bar on a terminal, a line every 10% in a log).

Output: a table on stdout (the paper's MMEB layout, ``training/mmeb.py``, when any dataset
is one of MMEB's 36; datasets outside it are reported apart), optionally the difference to
an earlier run or to the published numbers (``--compare``); the last line is one JSON
object: ``{"precision_at_1", "rows", "datasets": {name: {"precision_at_1", "rows"}},
"mmeb": {"summary", "datasets", "unknown", "missing", "complete"}, "comparison"?, ...}``
(``precision_at_1`` is the mean over every dataset evaluated; the MMEB overall, over the
MMEB datasets only, is ``mmeb.summary.overall``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # `python training/evaluate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training import mmeb, video_retrieval  # noqa: E402
from training.data import BadRowError, LoadReport, Side, iter_rows, model_input, parse_side  # noqa: E402
from training.progress import Progress  # noqa: E402
from training.remote import ServerEmbedder  # noqa: E402

DEFAULT_DATASET = "all"
DATA_SUFFIXES = (".parquet", ".jsonl")
# Sides embedded per call to the embedder: bounds the images held in memory at once.
CHUNK_BATCHES = 8


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


def _read_file(
    path: Path,
    root: Path | None,
    rows: list[EvalRow],
    report: LoadReport,
    *,
    on_bad: str,
    dataset: str | None = None,
    limit: int | None = None,
) -> None:
    """Append the usable rows of one file (at most ``limit``). ``dataset`` overrides the
    rows' own names; those are spelled as MMEB spells them when they are MMEB datasets."""
    kept = 0
    for number, raw in iter_rows(path):
        if limit is not None and kept >= limit:
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
        name = dataset or mmeb.canonical_name(row.dataset) or row.dataset
        rows.append(EvalRow(row.query, row.candidates, name, source))
        kept += 1


def load_eval_rows(
    path: str | Path, image_root: str | Path | None, *, on_bad: str = "skip", limit: int | None = None
) -> tuple[list[EvalRow], LoadReport]:
    """One file of eval rows (the first ``limit`` usable ones)."""
    root = Path(image_root) if image_root is not None else None
    rows: list[EvalRow] = []
    report = LoadReport()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evaluation data not found: {path}")
    _read_file(path, root, rows, report, on_bad=on_bad, limit=limit)
    return rows, report


def _dataset_files(folder: Path) -> list[Path]:
    """The data files of one ``<dir>/<Dataset>/`` folder: its ``test`` split if marked
    (``test-*.parquet`` as on the Hub, ``test/*.parquet`` as the parquet converter writes,
    ``test.jsonl``), else every data file in it."""

    def data(paths) -> list[Path]:
        return sorted(p for p in paths if p.is_file() and p.suffix in DATA_SUFFIXES)

    for pattern in ("test-*", "test.*", "test/*"):
        found = data(folder.glob(pattern))
        if found:
            return found
    return data(folder.iterdir())


def find_benchmark(folder: str | Path) -> dict[str, list[Path]]:
    """Per-dataset files of a benchmark folder, by dataset name (its MMEB spelling when it
    is one of the 36, else the folder or file name). Folders without data files (the
    images) are ignored; a dataset present twice is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"benchmark folder not found: {folder}")
    found: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files = _dataset_files(entry)
            name = entry.name
        elif entry.suffix in DATA_SUFFIXES:
            files, name = [entry], entry.stem
        else:
            continue
        if not files:
            continue
        name = mmeb.canonical_name(name) or name
        if name in found:
            raise ValueError(f"dataset {name} is in {folder} twice: {found[name][0]} and {files[0]}")
        found[name] = files
    if not found:
        raise FileNotFoundError(
            f"no dataset files in {folder} (expected <Dataset>/test-*.parquet or <Dataset>.jsonl/.parquet)"
        )
    return found


def load_benchmark(
    folder: str | Path,
    image_root: str | Path | None,
    *,
    datasets: Sequence[str] | None = None,
    max_rows: int | None = None,
    on_bad: str = "skip",
) -> tuple[list[EvalRow], LoadReport]:
    """Rows of a benchmark folder (see ``find_benchmark``), the chosen ``datasets``
    (names or groups, ``mmeb.select``; default all), at most ``max_rows`` per dataset."""
    root = Path(image_root) if image_root is not None else None
    found = find_benchmark(folder)
    names = mmeb.select(datasets, found) if datasets else list(found)
    rows: list[EvalRow] = []
    report = LoadReport()
    for name in names:
        start = len(rows)
        for path in found[name]:
            left = None if max_rows is None else max_rows - (len(rows) - start)
            if left is not None and left <= 0:
                break
            _read_file(path, root, rows, report, on_bad=on_bad, dataset=name, limit=left)
    return rows, report


def default_image_root(data: Path) -> Path | None:
    if not data.is_dir():
        return None
    return data / "eval_images" if (data / "eval_images").is_dir() else data


def select_rows(rows: list[EvalRow], datasets: Sequence[str] | None, max_rows: int | None) -> list[EvalRow]:
    """The rows of the chosen datasets (``mmeb.select``), the first ``max_rows`` of each."""
    names = list(dict.fromkeys(r.dataset for r in rows))
    chosen = set(mmeb.select(datasets, names)) if datasets else set(names)
    kept, counts = [], dict.fromkeys(names, 0)
    for row in rows:
        if row.dataset in chosen and (max_rows is None or counts[row.dataset] < max_rows):
            kept.append(row)
            counts[row.dataset] += 1
    return kept


# --- embedding and scoring -------------------------------------------------------------


def embed_sides(
    embedder,
    sides: list[Side],
    root: Path | None,
    batch_size: int,
    advance: Callable[[int], Any] = lambda n: None,
) -> np.ndarray:
    """Vectors of ``sides`` in their order, embedded in chunks of similar inputs."""
    order = sorted(range(len(sides)), key=lambda i: (sides[i].image is not None, len(sides[i].text)))
    chunk = max(1, batch_size) * CHUNK_BATCHES
    out: np.ndarray | None = None
    for start in range(0, len(order), chunk):
        idx = order[start : start + chunk]
        vectors = np.asarray(
            embedder.embed([model_input(sides[i], root) for i in idx], batch_size=batch_size),
            dtype=np.float32,
        )
        if out is None:
            out = np.zeros((len(sides), vectors.shape[1]), dtype=np.float32)
        out[idx] = vectors
        advance(len(idx))
    assert out is not None
    return out


def evaluate(
    embedder,
    rows: Sequence[EvalRow],
    image_root: str | Path | None,
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Precision@1 per dataset and overall (mean over datasets). Dataset by dataset, each
    distinct query and candidate is embedded once (as the MMEB reference code does)."""
    root = Path(image_root) if image_root is not None else None
    by_dataset: dict[str, list[EvalRow]] = {}
    for row in rows:
        by_dataset.setdefault(row.dataset, []).append(row)
    plans = []
    for name in sorted(by_dataset):
        index: dict[Side, int] = {}
        for row in by_dataset[name]:
            for side in (row.query, *row.candidates):
                index.setdefault(side, len(index))
        plans.append((name, by_dataset[name], index))

    # A bar on a terminal; in a log file, a line every 10% of the inputs or 30 s.
    bar = Progress(sum(len(index) for *_, index in plans), "embed", "input", enabled=progress)
    datasets = {}
    try:
        for name, drows, index in plans:
            bar.set_description(name)
            try:
                vectors = embed_sides(embedder, list(index), root, batch_size, bar.update)  # (n_unique, dim)
            except Exception as exc:
                raise RuntimeError(f"{name}: embedding failed: {type(exc).__name__}: {exc}") from exc
            hits = []
            for row in drows:
                q = vectors[index[row.query]]  # (dim,)
                c = vectors[[index[s] for s in row.candidates]]  # (k, dim)
                hits.append(float(np.argmax(c @ q) == 0))
            datasets[name] = {"precision_at_1": float(np.mean(hits)), "rows": len(hits)}
    finally:
        bar.close()
    overall = float(np.mean([d["precision_at_1"] for d in datasets.values()])) if datasets else float("nan")
    return {"precision_at_1": overall, "rows": len(rows), "datasets": datasets}


# --- output ------------------------------------------------------------------------


def format_table(result: dict) -> str:
    width = max([len("dataset"), len("overall (mean)")] + [len(n) for n in result["datasets"]])
    lines = [f"{'dataset':<{width}}  {'rows':>6}  {'P@1':>6}", "-" * (width + 16)]
    for name, d in result["datasets"].items():
        lines.append(f"{name:<{width}}  {d['rows']:>6}  {d['precision_at_1']:>6.3f}")
    lines.append("-" * (width + 16))
    lines.append(f"{'overall (mean)':<{width}}  {result['rows']:>6}  {result['precision_at_1']:>6.3f}")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """The MMEB layout when any dataset is an MMEB one, else the plain per-dataset table."""
    report = result.get("mmeb") or mmeb.report(result["datasets"])
    if report["datasets"]:
        return mmeb.format_markdown(report, max_rows=result.get("max_rows"))
    return format_table(result)


def read_result(path: str | Path) -> dict:
    """A results file: the ``--output`` JSON, or a saved stdout whose last line is it."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        result = json.loads(text)
    except json.JSONDecodeError:
        lines = [line for line in text.splitlines() if line.strip()]
        try:
            result = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            result = None
    if not isinstance(result, dict) or not isinstance(result.get("datasets"), dict):
        raise ValueError(f"{path}: not a training.evaluate result (no 'datasets' object)")
    return result


def reference_for(spec: str, model_name: str | None) -> dict:
    """``--compare``: ``paper`` (the published model named like ``--model``),
    ``paper:LLaVE-7B``, or an earlier results file."""
    if spec == "paper" or spec.startswith("paper:"):
        name = spec.partition(":")[2] or mmeb.infer_paper_model(model_name or "")
        return mmeb.paper_reference(name)
    return mmeb.result_reference(read_result(spec), spec)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (either layout)")
    parser.add_argument("--server", default=None, help="evaluate a running server instead (its base URL)")
    parser.add_argument("--api-key", default=None, help="the server's API key (or LLAVE_API_KEY)")
    parser.add_argument(
        "--data", default=None, help="MMEB-eval rows (.jsonl or .parquet) or a folder of per-dataset files"
    )
    parser.add_argument(
        "--image-root",
        default=None,
        help="folder the image paths are relative to (folder default: DIR/eval_images)",
    )
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        metavar="NAME",
        help="only these datasets (names, comma or space separated) or groups: classification, vqa, "
        "retrieval, grounding, IND, OOD, MMEB",
    )
    parser.add_argument(
        "--max-rows", type=int, default=None, help="at most N rows per dataset (a quick look)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="inputs per forward pass (per request with --server)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of a file")
    parser.add_argument(
        "--bad-rows", choices=["skip", "error"], default="skip", help="what to do with unusable rows"
    )
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON result to this file")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table(s) to this file")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="REF",
        help="print the difference to an earlier results file, or to the paper: paper:LLaVE-0.5B, "
        "paper:LLaVE-2B, paper:LLaVE-7B (paper: the one named like --model)",
    )
    parser.add_argument(
        "--results", type=Path, default=None, help="report an earlier results file (no model)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--video-retrieval",
        choices=video_retrieval.LAYOUTS,
        default=None,
        help="text-video retrieval (R@1/5/10) on MSR-VTT (--data: the test CSV) or MSVD (--data: its folder)",
    )
    parser.add_argument("--video-root", default=None, help="folder of the clips (--video-retrieval)")
    args = parser.parse_args(argv)
    if args.video_retrieval:
        _run_video(parser, args)
        return

    datasets = [t for item in args.datasets or [] for t in item.split(",") if t.strip()] or None
    if args.max_rows is not None and args.max_rows < 1:
        parser.error("--max-rows must be at least 1")
    earlier: dict | None = None
    if args.results is not None:
        if args.model or args.server or args.data:
            parser.error("--results reports an earlier run: give no --model, --server or --data")
        try:
            earlier = read_result(args.results)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
    else:
        if bool(args.model) == bool(args.server):
            parser.error("give --model or --server (one of them)")
        if not args.data:
            parser.error("--data is required")
    # The reference is checked before any evaluation (a full MMEB run takes hours); a plain
    # `paper` with --server waits for the served model's name.
    reference = None
    if args.compare and not (args.compare == "paper" and args.server):
        reference = _reference(parser, args.compare, args.model or (earlier or {}).get("model"))
    result = earlier if earlier is not None else _run(parser, args, datasets, reference)

    try:
        if "mmeb" not in result:
            result["mmeb"] = mmeb.report(result["datasets"])
        text = format_report(result)
    except ValueError as exc:
        parser.error(str(exc))
    if args.compare:
        reference = reference or _reference(parser, args.compare, result.get("model"))
        result["comparison"] = mmeb.compare(result, reference)
        text += "\n\n" + mmeb.format_comparison(result["comparison"])
    _emit(args, result, text)


def _emit(args: argparse.Namespace, result: dict, text: str) -> None:
    """The report: the JSON and markdown files asked for, then the table and one JSON line."""
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(text + "\n")
    print(text)
    print(json.dumps(result))


def _reference(parser: argparse.ArgumentParser, spec: str, model_name: str | None) -> dict:
    try:
        return reference_for(spec, model_name)
    except (OSError, ValueError) as exc:
        parser.error(f"--compare {spec}: {exc}")


def _open_embedder(parser: argparse.ArgumentParser, args: argparse.Namespace, reference: dict | None):
    """The model core (--model) or a running server (--server), and its name."""
    embedder: Any
    if args.server:
        try:
            embedder = ServerEmbedder(args.server, api_key=args.api_key or os.environ.get("LLAVE_API_KEY"))
        except Exception as exc:  # unreachable, refused, not this project's server
            parser.error(f"--server {args.server}: {type(exc).__name__}: {exc}")
        model_name = embedder.name
        if args.compare and reference is None:
            _reference(parser, args.compare, model_name)  # fails now, not after the run
    else:
        from model import load_embedder

        embedder = load_embedder(args.model, device=args.device, dtype=args.dtype)
        model_name = str(args.model)
    return embedder, model_name


def _run_video(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--video-retrieval: load the set, embed captions and clips, print R@K (and --compare)."""
    if bool(args.model) == bool(args.server) or not args.data:
        parser.error("--video-retrieval needs --data and one of --model or --server")
    reference = None
    if args.compare:
        try:
            reference = video_retrieval.paper_reference(args.compare, args.video_retrieval)
        except ValueError as exc:
            parser.error(f"--compare {args.compare}: {exc}")
    try:
        data = video_retrieval.load(args.video_retrieval, args.data, args.video_root)
    except (OSError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    embedder, model_name = _open_embedder(parser, args, {})
    bar = Progress(len(data.videos) + len(data.captions), "embed", "input", enabled=not args.no_progress)
    try:
        result = video_retrieval.evaluate(embedder, data, batch_size=args.batch_size, progress=bar)
    finally:
        bar.close()
        if isinstance(embedder, ServerEmbedder):
            embedder.close()
    result["model"] = model_name
    text = video_retrieval.format_report(result, reference)
    if reference is not None:
        result["comparison"] = reference
    _emit(args, result, text)


def _run(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    datasets: list[str] | None,
    reference: dict | None,
) -> dict:
    data = Path(args.data)
    image_root = args.image_root if args.image_root is not None else default_image_root(data)
    if data.is_dir() and args.limit is not None:
        parser.error("--limit counts the rows of one file; for a folder use --max-rows (per dataset)")
    try:
        if data.is_dir():
            rows, report = load_benchmark(
                data, image_root, datasets=datasets, max_rows=args.max_rows, on_bad=args.bad_rows
            )
        else:
            rows, report = load_eval_rows(data, image_root, on_bad=args.bad_rows, limit=args.limit)
            rows = select_rows(rows, datasets, args.max_rows)
    except (FileNotFoundError, ValueError) as exc:  # BadRowError is a ValueError
        parser.error(str(exc))
    if report.skipped:
        print(report.summary(), file=sys.stderr)
    if not rows:
        parser.error(f"no usable rows in {args.data}")

    embedder, model_name = _open_embedder(parser, args, reference)
    try:
        result = evaluate(
            embedder, rows, image_root, batch_size=args.batch_size, progress=not args.no_progress
        )
    finally:
        if isinstance(embedder, ServerEmbedder):
            embedder.close()
    result["model"] = model_name
    if args.server:
        result["server"] = args.server
    result["data"] = str(data)
    result["max_rows"] = args.max_rows
    if report.skipped:
        result["skipped_rows"] = len(report.skipped)
    result["mmeb"] = mmeb.report(result["datasets"])
    return result


if __name__ == "__main__":
    main()
