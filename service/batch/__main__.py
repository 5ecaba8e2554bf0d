"""``python -m service.batch``: embed a corpus on Ray Data (``pip install '.[batch]'``).

    python -m service.batch --model CKPT ./images/ --out ./vectors/                 # Parquet shards
    python -m service.batch --model CKPT s3://bucket/shards/ --out s3://bucket/vectors/
    python -m service.batch --model CKPT rows.jsonl --to ./data --collection docs     # embedded store
    python -m service.batch --model CKPT rows.parquet --to postgresql://... --collection docs \\
        --job-dir ./docs-job                                                          # PostgreSQL

Sources: folders of images, ``.jsonl`` / ``.parquet`` rows (the project's input format or
MMEB's ``qry_text``/``qry_img_path``), WebDataset ``.tar`` shards; local or URIs
(``s3://...``; see ``service/batch/sources.py``). Rerun the same command to resume: finished
blocks are skipped (the manifest under the job directory). The last line printed is the
summary as JSON; the exit status is 0 when every item was embedded, 2 when some failed
(listed in ``failures.jsonl`` in the job directory), 1 when the job itself failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from service.batch.sources import FORMATS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m service.batch",
        description="Embed a corpus on Ray Data (resumable, exactly once per id).",
    )
    p.add_argument("sources", nargs="+", help="folders, .jsonl/.parquet files or .tar shards (paths or URIs)")
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    where = p.add_argument_group("target (one of)")
    where.add_argument("--out", help="folder or URI for the Parquet shards (and the job's manifest)")
    where.add_argument("--to", help="a data directory or a postgresql:// URL to upsert into")
    p.add_argument("--collection", help="with --to: the collection (created on the first block)")
    p.add_argument(
        "--job-dir",
        help="manifest and failures.jsonl (default: --out itself; with --to a data directory, "
        "DATA_DIR/batch/COLLECTION; with a PostgreSQL URL it is required)",
    )
    p.add_argument("--with-source", action="store_true", help="--out: add each item's text and thumbnails")
    p.add_argument("--instruction", help="instruction for every input that has none (as /embed takes)")
    p.add_argument(
        "--format", choices=FORMATS, default="auto", help="how to read the sources (default: by name)"
    )
    p.add_argument("--image-root", help="folder or URI that row files' image paths are relative to")
    p.add_argument("--block-size", type=int, default=256, help="items per block (unit of retry and resume)")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per forward")
    p.add_argument(
        "--device", default="auto", help="device of each model actor (auto: CUDA when there is one)"
    )
    p.add_argument("--dtype", default="auto")
    p.add_argument("--actors", type=int, help="model replicas (default: one per GPU of the cluster, else 1)")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, default=1.0)
    p.add_argument("--torch-threads", type=int, help="threads of a CPU actor's forward")
    p.add_argument("--restart", action="store_true", help="forget the manifest and start over")
    return p


def _job_dir(args: argparse.Namespace) -> str:
    from service.storage import is_postgres_url

    if args.job_dir:
        return args.job_dir
    if args.out:
        return args.out
    if is_postgres_url(args.to):
        raise SystemExit("--job-dir is needed with a PostgreSQL target (where the manifest is kept)")
    return str(Path(args.to) / "batch" / args.collection)


def main(argv: list[str] | None = None, *, embedder_factory: str | None = None) -> int:
    """Run the job; ``embedder_factory`` ("module:function") replaces ``model.load_embedder``
    in the model actors (tests only, as for ``python -m service``)."""
    args = _parser().parse_args(argv)
    if bool(args.out) == bool(args.to):
        raise SystemExit("give one target: --out FOLDER (Parquet) or --to STORE --collection NAME")
    if args.to and not args.collection:
        raise SystemExit("--to needs --collection")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from service import limits
    from service.batch.job import ClusterOptions, run_job
    from service.batch.sinks import SinkSpec, StoreSink
    from service.batch.sources import ReadOptions
    from service.batch.stages import JobSpec, ModelSpec

    sink = SinkSpec(
        kind="parquet" if args.out else "store",
        where=args.out or args.to,
        collection=args.collection,
        with_source=args.with_source,
        model=args.model,
    )
    try:
        if sink.kind == "store":
            probe = StoreSink(sink)
            try:
                source_options = probe.source_options()
            finally:
                probe.close()
        else:
            from service.storage.sources import SOURCE_DEFAULTS

            source_options = dict(SOURCE_DEFAULTS) if args.with_source else None
        job = JobSpec(
            model=ModelSpec(
                checkpoint=args.model,
                device=args.device,
                dtype=args.dtype,
                batch_size=args.batch_size,
                torch_threads=args.torch_threads,
                embedder_factory=embedder_factory,
            ),
            read=ReadOptions(
                instruction=args.instruction,
                image_root=args.image_root,
                block_size=args.block_size,
                format=args.format,
            ),
            sink=sink,
            source_options=source_options,
            image_limits=limits.image_limits(),
        )
        cluster = ClusterOptions(
            actors=args.actors, gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor
        )
        summary = run_job(args.sources, job, _job_dir(args), cluster=cluster, restart=args.restart)
    except Exception as exc:  # one clear line for the operator; Ray has logged the details
        print(f"batch failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary.as_dict()), flush=True)
    return 2 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
