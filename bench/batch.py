"""The batch job (``python -m service.batch``) against the in-process offline forward.

    python bench/batch.py                      # LLaVE-0.5B-shaped random checkpoint, texts and images
    python bench/batch.py --quick              # tiny checkpoint, 64 texts, 8 images (smoke check)
    python bench/batch.py --preprocess-only    # the CPU stage alone: CPU ms and bytes per item
    python bench/batch.py --checkpoint PATH --device cuda --dtype bfloat16   # on a GPU machine

For each kind of input (40-token texts in a JSON-lines file; 384x384 JPEG files in a folder):

1. offline: ``load_embedder(...).embed(inputs, batch_size=B)`` in this process, the inputs
   already in memory (preprocess, forward, normalise: the ceiling for one process);
2. the job: ``run_job`` on a local Ray cluster (``ray.init(num_cpus=os.cpu_count())``): read
   and preprocess in CPU tasks, the forward in one actor with the same threads and batch size,
   normalise, write Parquet shards and the manifest; timed from the call to its return, so it
   includes Ray's scheduling, the actor's start and model load, serialisation and writes;
3. offline again (the mean of both offline runs is the reference, which evens out drift
   from other load on the machine).

The job's own accounting (summary fields) splits its wall time: the actor's start-up (Ray
worker, imports, model load), the time to the first finished block, forwards, preprocessing
and writes (those two run beside the forwards); "other" is the job's wall time less the
first block and the forwards after it: scheduling, serialisation and waiting that nothing
overlapped. The load average before and after is printed with the table (the machine may
be shared). Results: a table and ``bench/results/batch[-quick][-TAG].json``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ensure_checkpoint,
    load_average,
    log,
    machine_info,
    make_images,
    make_texts,
    table,
    write_results,
)


def _corpus(kind: str, n: int, checkpoint: Path, root: Path) -> tuple[str, list[dict[str, Any]]]:
    """Write the inputs where the job reads them; return (source, the same inputs in memory)."""
    if kind == "text":
        texts = make_texts(checkpoint, n, tokens=40)
        path = root / "texts.jsonl"
        path.write_text(
            "".join(json.dumps({"id": f"t{i:06d}", "text": t}) + "\n" for i, t in enumerate(texts))
        )
        return str(path), [{"text": t} for t in texts]
    folder = root / "images"
    folder.mkdir()
    inputs = []
    for i, b64 in enumerate(make_images(n, (384, 384))):
        data = base64.b64decode(b64)
        (folder / f"im{i:06d}.jpg").write_bytes(data)
        inputs.append({"image": data})
    return str(folder), inputs


def _offline(checkpoint: Path, inputs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    import torch

    from model import load_embedder

    embedder = load_embedder(checkpoint, device=args.device, dtype=args.dtype)
    embedder.embed(inputs[: min(4, len(inputs))], batch_size=args.batch_size)  # warm-up
    started = time.perf_counter()
    embedder.embed(inputs, batch_size=args.batch_size)
    seconds = time.perf_counter() - started
    del embedder
    return {
        "seconds": seconds,
        "items_per_s": len(inputs) / seconds,
        "torch_threads": torch.get_num_threads(),
    }


def _job(checkpoint: Path, source: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from service import limits
    from service.batch.job import ClusterOptions, run_job
    from service.batch.sinks import SinkSpec
    from service.batch.sources import ReadOptions
    from service.batch.stages import JobSpec, ModelSpec

    job = JobSpec(
        model=ModelSpec(
            checkpoint=str(checkpoint),
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            torch_threads=torch.get_num_threads(),
        ),
        read=ReadOptions(block_size=args.block_size),
        sink=SinkSpec(kind="parquet", where=str(out)),
        image_limits=limits.image_limits(),
    )
    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    started = time.perf_counter()
    summary = run_job([source], job, str(out), cluster=ClusterOptions(actors=1, gpus_per_actor=gpus))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "items_per_s": summary.items / seconds, "summary": summary.as_dict()}


def _preprocess_cost(checkpoint: Path, inputs: list[dict[str, Any]]) -> dict[str, float]:
    """What the CPU stage costs per item (``model.Preprocessor``, as ``prepare_block`` runs it)
    and what each prepared item weighs on its way to the model actor (pickled)."""
    import pickle

    from model import load_preprocessor

    pre = load_preprocessor(checkpoint)
    pre.preprocess(inputs[0])  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    prepared = [pre.preprocess(x) for x in inputs]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    size = sum(len(pickle.dumps(p, protocol=5)) for p in prepared)
    return {
        "cpu_ms_per_item": 1000 * cpu / len(inputs),
        "wall_ms_per_item": 1000 * wall / len(inputs),
        "bytes_per_item": size / len(inputs),
    }


def preprocess_only(checkpoint: Path, args: argparse.Namespace) -> None:
    results: dict[str, Any] = {
        "machine": machine_info(),
        "args": vars(args) | {"checkpoint": str(checkpoint)},
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-pre-") as tmp:
        for kind, n in (("text", args.texts), ("image", args.images)):
            if n > 0:
                _, inputs = _corpus(kind, n, checkpoint, Path(tmp))
                results[kind] = _preprocess_cost(checkpoint, inputs) | {"items": n}
                rows.append({"kind": kind, **results[kind]})
    results["load_average_at_end"] = load_average()
    load = f"load average {results['machine']['load_average_at_start'][0]:.1f} -> {results['load_average_at_end'][0]:.1f}"
    print(table(rows, list(rows[0]), title=f"the CPU stage per item ({checkpoint.name}; {load})"))
    write_results("batch-preprocess" + (f"-{args.tag}" if args.tag else ""), results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="llave-0.5b", help="model.tiny preset of the random checkpoint")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint instead of the random one")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tag", default="")
    parser.add_argument(
        "--quick", action="store_true", help="tiny checkpoint, 64 texts, 8 images, blocks of 8"
    )
    parser.add_argument(
        "--preprocess-only",
        action="store_true",
        help="only the CPU stage's cost per item (no Ray, no forward)",
    )
    args = parser.parse_args()
    if args.quick:
        args.preset, args.texts, args.images, args.block_size, args.batch_size = "tiny", 64, 8, 8, 8
    checkpoint = args.checkpoint or ensure_checkpoint(args.preset)
    if args.preprocess_only:
        return preprocess_only(checkpoint, args)

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="warning")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rows, results = [], {"machine": machine_info(), "args": vars(args) | {"checkpoint": str(checkpoint)}}
    for kind, n in (("text", args.texts), ("image", args.images)):
        if n <= 0:
            continue
        root = Path(tempfile.mkdtemp(prefix=f"bench-batch-{kind}-"))
        try:
            source, inputs = _corpus(kind, n, checkpoint, root)
            log(f"{kind}: offline ({n} inputs) ...")
            before = _offline(checkpoint, inputs, args)
            log(f"{kind}: the job ...")
            job = _job(checkpoint, source, root / "out", args)
            log(f"{kind}: offline again ...")
            after = _offline(checkpoint, inputs, args)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        offline_rate = (before["items_per_s"] + after["items_per_s"]) / 2
        s = job["summary"]
        steady = s["items"] - args.block_size  # after the first block (one block's items)
        after_first = job["seconds"] - s["first_block_seconds"]
        point = {
            "kind": kind,
            "items": n,
            "offline_items_per_s": offline_rate,
            "offline_runs": [before, after],
            "job_items_per_s": job["items_per_s"],
            "job_seconds": job["seconds"],
            "ratio": job["items_per_s"] / offline_rate,
            # without the one-off start-up (to the first finished block): the rate of a long job
            "ratio_after_first_block": steady / after_first / offline_rate
            if steady > 0 and after_first > 0
            else None,
            # wall time after the first block not spent in forwards (the actor is the bottleneck)
            "other_seconds": max(after_first - s["forward_seconds"] * steady / max(s["items"], 1), 0.0),
            "summary": s,
        }
        results[kind] = point
        rows.append(
            {
                "kind": kind,
                "items": n,
                "offline items/s": offline_rate,
                "job items/s": job["items_per_s"],
                "ratio": point["ratio"],
                "ratio after 1st block": point["ratio_after_first_block"],
                "job s": job["seconds"],
                "to 1st block s": s["first_block_seconds"],
                "actor load s": s["actor_load_seconds"],
                "forward s": s["forward_seconds"],
                "prepare s": s["prepare_seconds"],
                "write s": s["write_seconds"],
                "other s": point["other_seconds"],
            }
        )
    ray.shutdown()
    results["load_average_at_end"] = load_average()
    load = f"load average {results['machine']['load_average_at_start'][0]:.1f} -> {results['load_average_at_end'][0]:.1f} on {os.cpu_count()} cores"
    print(
        table(
            rows,
            list(rows[0]),
            title=f"batch job vs offline ({checkpoint.name}, {args.device}, {args.dtype}; {load})",
        )
    )
    name = "batch" + ("-quick" if args.quick else "") + (f"-{args.tag}" if args.tag else "")
    write_results(name, results)


if __name__ == "__main__":
    main()
