"""The driver: plan blocks, skip the finished ones, run the Ray Data pipeline, record.

    read + preprocess (CPU tasks) -> forward (actor pool) -> normalise + write (CPU tasks)

``run_job`` connects to Ray if the caller has not (``ray.init()``: a local cluster, or the
one ``RAY_ADDRESS`` names, as inside ``ray job submit``). Each finished block is recorded in
the manifest as its results reach the driver; progress is Ray's own display plus one plain
line per 10% of the blocks; the summary counts this run's items and the whole job's
failures (those of blocks finished by earlier runs included).
"""

from __future__ import annotations

import collections
import logging
import pickle
import time
from dataclasses import dataclass, field
from typing import Any

from service.batch.manifest import Manifest
from service.batch.sinks import SinkSpec, make_sink
from service.batch.sources import Block, plan_blocks
from service.batch.stages import EmbedBlocks, JobSpec, finish_block, prepare_block, write_finished

logger = logging.getLogger("llave.batch")

CPU_TASK_MAX_CALLS = 256  # blocks a read/preprocess worker process runs before it is replaced


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    actors: int | None = None  # model replicas; default: one per GPU, else 1
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    cpus_per_task: float = 1.0  # read + preprocess and write tasks


@dataclass
class Summary:
    blocks: int = 0
    blocks_done_before: int = 0
    blocks_run: int = 0
    items: int = 0  # embedded and written by this run
    items_total: int = 0  # in the target, all runs
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    forward_seconds: float = 0.0
    prepare_seconds: float = 0.0
    write_seconds: float = 0.0
    actor_load_seconds: float = 0.0
    first_block_seconds: float = 0.0  # from the start to the first finished block
    actors: int = 0
    gpus_per_actor: float = 0.0
    actor_pids: set[int] = field(default_factory=set)
    failures_file: str = ""

    @property
    def failed(self) -> int:
        return sum(self.failures_by_reason.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "blocks_done_before": self.blocks_done_before,
            "blocks_run": self.blocks_run,
            "items": self.items,
            "items_total": self.items_total,
            "failed": self.failed,
            "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
            "failures_file": self.failures_file,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items / self.seconds, 2) if self.seconds > 0 else None,
            # GPU time held by the model actors (what a bill counts) and the part spent in forwards
            "gpu_seconds": round(self.actors * self.gpus_per_actor * self.seconds, 1),
            "forward_seconds": round(self.forward_seconds, 3),
            # where the rest went (summed over workers: these overlap each other)
            "prepare_seconds": round(self.prepare_seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "actor_load_seconds": round(self.actor_load_seconds, 3),
            "first_block_seconds": round(self.first_block_seconds, 3),
            "actors": self.actors,
            "actor_processes_used": len(self.actor_pids),
        }


class Progress:
    """A plain log line each time another 10% of the blocks is done."""

    def __init__(self, total: int, done_before: int) -> None:
        self.total, self.done = total, done_before
        self.started = time.monotonic()
        self.items = self.failed = 0
        self.next_tenth = (10 * done_before // total + 1) if total else 11

    def block_done(self, items: int, failed: int) -> None:
        self.done += 1
        self.items += items
        self.failed += failed
        tenth = 10 * self.done // self.total if self.total else 0
        if tenth >= self.next_tenth:  # one line even when a block crosses several tenths
            rate = self.items / max(time.monotonic() - self.started, 1e-9)
            logger.info(
                "batch: %d%% (%d/%d blocks), %d items embedded, %d failed, %.1f items/s",
                100 * self.done // self.total, self.done, self.total, self.items, self.failed, rate,
            )  # fmt: skip
            self.next_tenth = tenth + 1


def _ray() -> Any:
    import ray

    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    return ray


def _cluster_defaults(ray: Any, options: ClusterOptions) -> tuple[int, float]:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_actor = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = options.actors or (max(1, int(gpus // per_actor)) if per_actor else 1)
    return actors, per_actor


def run_job(
    sources: list[str],
    job: JobSpec,
    job_dir: str,
    *,
    cluster: ClusterOptions = ClusterOptions(),
    restart: bool = False,
) -> Summary:
    """Embed every unfinished block of ``sources`` into ``job.sink``; return the summary."""
    started = time.monotonic()
    blocks = plan_blocks(sources, job.read)
    by_key = {b.key: b for b in blocks}
    manifest = Manifest(job_dir)
    manifest.start(_job_record(job, list(by_key)), restart=restart)
    finished = {k: v for k, v in manifest.finished().items() if k in by_key}
    todo = [b for b in blocks if b.key not in finished]
    summary = Summary(blocks=len(by_key), blocks_done_before=len(finished))
    logger.info("batch: %d blocks, %d already done, %d to run", len(by_key), len(finished), len(todo))
    if todo:
        ray = _ray()
        summary.actors, summary.gpus_per_actor = _cluster_defaults(ray, cluster)
        progress = Progress(len(by_key), len(finished))
        driver_sink = None if job.sink.parallel else make_sink(job.sink)
        try:
            for key, report in _results(ray, todo, job, cluster, summary, driver_sink):
                manifest.record(key, report)
                finished[key] = report
                summary.blocks_run += 1
                summary.items += report["items"]
                summary.forward_seconds += report["forward_seconds"]
                summary.prepare_seconds += report["prepare_seconds"]
                summary.write_seconds += report["write_seconds"]
                summary.actor_load_seconds += report["actor_load_seconds"]
                if summary.blocks_run == 1:
                    summary.first_block_seconds = time.monotonic() - started
                if report.get("embedded_by"):
                    summary.actor_pids.add(report["embedded_by"])
                progress.block_done(report["items"], len(report["failures"]))
        finally:
            if driver_sink is not None:
                driver_sink.close()
    reasons: collections.Counter[str] = collections.Counter()
    for report in finished.values():
        reasons.update(f["reason"] for f in report["failures"])
    summary.failures_by_reason = dict(reasons)
    summary.items_total = sum(r["items"] for r in finished.values())
    summary.failures_file, _ = manifest.write_failures(finished)
    summary.seconds = time.monotonic() - started
    return summary


def _job_record(job: JobSpec, keys: list[str]) -> dict[str, Any]:
    sink: SinkSpec = job.sink
    return {
        "model": job.model.checkpoint,
        "instruction": job.read.instruction,
        "target": {"kind": sink.kind, "where": sink.where, "collection": sink.collection},
        "blocks": len(keys),
        "plan": Manifest.plan_hash(keys),
    }


def _results(ray: Any, todo: list[Block], job: JobSpec, cluster: ClusterOptions, summary: Summary, sink: Any):
    """(block key, report) for each block as the pipeline finishes it."""
    import ray.data

    ds = ray.data.from_items([{"block": b.to_json()} for b in todo], override_num_blocks=len(todo))
    # A read/preprocess worker process is replaced after CPU_TASK_MAX_CALLS blocks, which bounds
    # what decoders may leak over a long job. Its own remote arguments also keep this stage
    # apart from the actor stage: Ray fuses a task stage into the actor stage after it when
    # both ask for the same resources (CPU actors), and preprocessing would then run inside
    # the model's process, in turn with the forwards.
    ds = ds.map(
        prepare_block, fn_kwargs={"job": job}, num_cpus=cluster.cpus_per_task, max_calls=CPU_TASK_MAX_CALLS
    )
    # Ray Data restarts a dead actor and retries its blocks (an actor pool's max_restarts and
    # max_task_retries default to -1; exactly-once relies on it, and the sinks make a retried
    # block replace itself).
    ds = ds.map(
        EmbedBlocks,
        fn_constructor_kwargs={"job": job},
        compute=ray.data.ActorPoolStrategy(size=summary.actors),
        num_gpus=summary.gpus_per_actor or None,
        num_cpus=cluster.cpus_per_actor,
    )
    if job.sink.parallel:
        ds = ds.map(finish_block, fn_kwargs={"job": job}, num_cpus=cluster.cpus_per_task)
    # Each block as soon as the pipeline has it, so the manifest and the progress lines keep
    # up with the work: iter_rows() holds a finished block back until the next one is out
    # (its prefetch), which a driver killed meanwhile would have to redo.
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for row in batch.to_pylist():
            block = Block.from_json(row["block"])
            payload = pickle.loads(row["payload"])
            report = payload if job.sink.parallel else write_finished(block, payload, sink)
            yield block.key, report
