"""Reliability and security run: fuzzing, hostile inputs, auth, SSRF, path traversal, load past
capacity, kill -9, failing batches, a dead worker, a full and a read-only disk, with counts.

    python bench/reliability.py              # the soak-sized run (run times: bench/README.md)
    python bench/reliability.py --quick      # a smaller run
    python bench/reliability.py --crash-rounds 50 --load-seconds 300 --tag long

Every category reuses the checks of the fast tests in ``tests/reliability`` (the soak test
``tests/soak/test_reliability_soak.py`` runs this same code under pytest). A failed check
is reported as a violation and the exit status is 1. Results: a Markdown table on stdout
and ``bench/results/reliability[-TAG].json``. Mounting the small tmpfs for the disk-full and
read-only checks needs root; without it those rows say "skipped".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/reliability.py` from anywhere
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.reliability.runner import Config, run_all, table  # noqa: E402

QUICK = {
    "fuzz_examples": 20,
    "hostile_passes": 2,
    "load_clients": 200,
    "load_seconds": 20.0,
    "crash_rounds": 5,
    "failing_batch_rounds": 5,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smaller run: " + json.dumps(QUICK))
    for f in fields(Config):
        p.add_argument(
            "--" + f.name.replace("_", "-"), type=type(f.default), default=None, help=f"default {f.default}"
        )
    p.add_argument("--workdir", type=Path, help="where servers and data go (default: a temporary directory)")
    p.add_argument("--tag", default="", help="suffix of the results file (reliability-TAG.json)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update(
        {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    )
    config = Config(**values)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="llave-reliability-") as tmp:
        workdir = args.workdir or Path(tmp)
        results = run_all(config, workdir, log=log)
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = REPO / "bench" / "results" / f"reliability{'-' + args.tag if args.tag else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(
        f"\n{len(results['violations'])} violations; {results['seconds']} s; results in {out.relative_to(REPO)}"
    )
    for violation in results["violations"]:
        print(f"- {violation}")
    return 1 if results["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
