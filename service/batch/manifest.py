"""The job's record of finished blocks, which makes a rerun resume where a run stopped.

``<job dir>/_manifest/``: ``job.json`` (what the job embeds: model, instruction, target and
the hash of its block plan) and one ``blocks/<key>.json`` per finished block (its item
count and failures). A block's record is written by the driver only after the sink has
written that whole block, each record as one whole file or object, so the manifest works
the same on local disk and on object storage, and a crash between the write and the
record only means that block is written again (which replaces it). A rerun with other
inputs or another model is refused: its blocks would not be the ones recorded.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from service.batch.files import Location, exists, list_files, locate, read_bytes, write_bytes_atomic

FAILURES = "failures.jsonl"


class ManifestMismatchError(Exception):
    """The job dir holds the manifest of a different job."""


class Manifest:
    def __init__(self, job_dir: str) -> None:
        self.job_dir = locate(job_dir)
        self.root: Location = self.job_dir.child("_manifest")

    @staticmethod
    def plan_hash(keys: list[str]) -> str:
        return hashlib.sha256("\n".join(keys).encode()).hexdigest()

    def start(self, job: dict[str, Any], *, restart: bool = False) -> None:
        """Record the job, or check that the recorded one is this one."""
        where = self.root.child("job.json")
        if exists(where) and not restart:
            recorded = json.loads(read_bytes(where))
            if recorded != job:
                changed = sorted(k for k in set(job) | set(recorded) if job.get(k) != recorded.get(k))
                raise ManifestMismatchError(
                    f"{self.job_dir.uri} holds another job's manifest (differs in: {', '.join(changed)}); "
                    "use another output, or --restart to start it over"
                )
            return
        if restart and exists(self.root):
            self.root.fs.delete_dir_contents(self.root.path)
        write_bytes_atomic(where, json.dumps(job, sort_keys=True).encode())

    def finished(self) -> dict[str, dict[str, Any]]:
        folder = self.root.child("blocks")
        records = {}
        for name in list_files(folder):
            if name.endswith(".json") and "/" not in name:
                records[name[: -len(".json")]] = json.loads(read_bytes(folder.child(name)))
        return records

    def record(self, key: str, report: dict[str, Any]) -> None:
        write_bytes_atomic(self.root.child(f"blocks/{key}.json"), json.dumps(report).encode())

    def write_failures(self, records: dict[str, dict[str, Any]]) -> tuple[str, int]:
        """``<job dir>/failures.jsonl`` from every finished block's failures (all runs)."""
        lines = [json.dumps(f) for key in sorted(records) for f in records[key]["failures"]]
        where = self.job_dir.child(FAILURES)
        write_bytes_atomic(where, ("\n".join(lines) + "\n" if lines else "").encode())
        return where.uri, len(lines)
