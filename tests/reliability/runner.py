"""The long reliability run: every category of ``tests/reliability`` at a larger scale, with counts.

Used by ``bench/reliability.py`` (prints the table, writes JSON) and by the soak test
(``tests/soak``). Each section reuses the checks of the fast tests; an assertion that fails
becomes a violation in the results instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.reliability.attacks import (
    BYPASS_TARGETS,
    ROUTES,
    SSRF_URLS,
    check_bypass,
    check_route_auth,
    check_ssrf,
    check_traversal,
    image_host_server,
)
from tests.reliability.crash import check_kill_9
from tests.reliability.faults import (
    check_dead_worker,
    check_disk_full,
    check_failing_batches,
    check_read_only_data_dir,
)
from tests.reliability.fuzzing import REJECTION_STATUSES
from tests.reliability.helpers import assert_healthy
from tests.reliability.hostile import check_case, hostile_cases
from tests.reliability.load import check_overload
from tests.reliability.servers import start_keyed_server, start_main_server


@dataclass
class Config:
    fuzz_examples: int = 400  # random examples per operation and mode (schemathesis -n)
    hostile_passes: int = 5
    hostile_concurrency: int = 16
    load_clients: int = 200
    load_seconds: float = 120.0
    crash_rounds: int = 20
    failing_batch_rounds: int = 20
    seed: int = 0


class Run:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.sections: dict[str, dict[str, Any]] = {}
        self.violations: list[str] = []

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        self.log(f"[{time.strftime('%H:%M:%S')}] {name} ...")
        started = time.monotonic()
        try:
            result = fn()
            status = "passed"
        except AssertionError as exc:
            result, status = {}, "failed"
            self.violations.append(f"{name}: {str(exc)[:500]}")
        except Exception as exc:
            if type(exc).__name__ == "Skipped":  # pytest.skip() inside a check: not available here
                result, status = {"reason": str(exc)}, "skipped"
            else:
                result, status = {}, "error"
                self.violations.append(
                    f"{name}: {''.join(traceback.format_exception_only(exc)).strip()[:500]}"
                )
        for message in result.pop("violations", []):
            self.violations.append(f"{name}: {message}")
        self.sections[name] = {"status": status, "seconds": round(time.monotonic() - started, 1), **result}
        self.log(f"    {status} in {self.sections[name]['seconds']} s: {json.dumps(result)[:300]}")


def fuzz(url: str, examples: int, workdir: Path, seed: int) -> dict[str, Any]:
    """schemathesis' CLI: examples, coverage, fuzzing and stateful phases, positive and negative."""
    report_path = workdir / "schemathesis.json"
    config_path = workdir / "schemathesis.toml"
    config_path.write_text(
        "[checks.negative_data_rejection]\n"
        f"expected-statuses = {json.dumps([str(s) for s in REJECTION_STATUSES])}\n"
    )
    command = [
        str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(config_path),
        "run", url + "/openapi.json",
        "--max-examples", str(examples), "--workers", "1", "--seed", str(seed), "--request-timeout", "60",
        # positive_data_acceptance: valid-by-schema data can still be bad (random base64 is no image);
        # allow_header_conformance: Starlette's 405 lists one route's methods (see the report).
        "--exclude-checks", "positive_data_acceptance,allow_header_conformance",
        "--report", "json", "--report-json-path", str(report_path),
    ]  # fmt: skip
    # cwd: schemathesis keeps a cache (.schemathesis/) in its working directory
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=workdir)
    (workdir / "schemathesis.log").write_text(done.stdout + done.stderr)
    report = json.loads(report_path.read_text())
    failures = [json.dumps(f)[:300] for f in report.get("failures", [])]
    tool_errors = report.get("errors", [])
    return {
        "operations": report["operations"]["tested"],
        "generated": report["test_cases"]["generated"],
        "failures": len(failures),
        "tool_errors": len(tool_errors),
        "violations": failures + [f"schemathesis error: {json.dumps(e)[:200]}" for e in tool_errors],
    }


def hostile(server: Any, passes: int, concurrency: int) -> dict[str, Any]:
    """Every hostile case, ``passes`` times, ``concurrency`` at a time."""
    collection = "hostile"
    cases = hostile_cases(collection)
    with server.client() as client:
        seed = {"documents": [{"id": "a", "vector": [1.0, 0.0]}]}
        assert client.post(f"/collections/{collection}/documents", json=seed).status_code == 200
    local = threading.local()
    statuses: Counter = Counter()
    violations: list[str] = []

    def one(case: Any) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=server.url, timeout=120)
        try:
            statuses[check_case(local.client, case, public=(server.model_name,))] += 1
        except AssertionError as exc:
            violations.append(f"{case.id}: {str(exc)[:300]}")

    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(passes):
            list(pool.map(one, cases))
    assert_healthy(server.url)
    return {
        "cases": len(cases),
        "requests": len(cases) * passes,
        "by_status": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(v for k, v in statuses.items() if k >= 500),
        "violations": violations,
    }


def _each(items: list[Any], check: Callable[[Any], int | None]) -> tuple[int, list[str]]:
    sent, violations = 0, []
    for item in items:
        try:
            sent += check(item) or 1
        except AssertionError as exc:
            violations.append(f"{item}: {str(exc)[:300]}")
    return sent, violations


def auth(server: Any) -> dict[str, Any]:
    sent, violations = _each(ROUTES, lambda r: check_route_auth(server.url, server.auth, *r))
    tricks, more = _each(BYPASS_TARGETS, lambda t: check_bypass(server.port, t))
    return {
        "routes": len(ROUTES),
        "requests": sent + tricks,
        "path_tricks": len(BYPASS_TARGETS),
        "let_in": len(violations) + len(more),
        "violations": violations + more,
    }


def ssrf(server: Any) -> dict[str, Any]:
    with image_host_server() as port:
        sent, violations = _each(SSRF_URLS, lambda t: check_ssrf(server.url, t, port))
    return {
        "urls": len(SSRF_URLS),
        "requests": sent,
        "refused_or_fetched_wrongly": len(violations),
        "violations": violations,
    }


def traversal(server: Any, workdir: Path) -> dict[str, Any]:
    return {"requests": check_traversal(server.url, server.port, workdir, public=(server.model_name,))}


def load(server: Any, config: Config) -> dict[str, Any]:
    return check_overload(server, clients=config.load_clients, seconds=config.load_seconds, seed=config.seed)


def run_all(config: Config, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    from model import load_embedder
    from model.tiny import build_checkpoint

    workdir.mkdir(parents=True, exist_ok=True)
    run = Run(log)
    started = time.monotonic()
    checkpoint = build_checkpoint(workdir / "tiny", fmt="hf", seed=0, preset="tiny")
    embedder = load_embedder(checkpoint, device="cpu", dtype="float32")
    for name in ("main", "keyed", "dead_worker", "disk_full", "read_only", "crash"):
        (workdir / name).mkdir(exist_ok=True)
    with contextlib.ExitStack() as servers:
        main = start_main_server(checkpoint, workdir / "main")
        servers.callback(main.stop)
        keyed = start_keyed_server(checkpoint, workdir / "keyed")
        servers.callback(keyed.stop)
        run.section("fuzz", lambda: fuzz(main.url, config.fuzz_examples, workdir, config.seed))
        run.section("hostile", lambda: hostile(main, config.hostile_passes, config.hostile_concurrency))
        run.section("ssrf", lambda: ssrf(main))
        run.section("traversal", lambda: traversal(main, workdir / "main"))
        run.section(
            "failing_batch", lambda: check_failing_batches(main, embedder, config.failing_batch_rounds)
        )
        run.section("auth", lambda: auth(keyed))
        run.section("load", lambda: load(keyed, config))
    for name, fn in [
        ("dead_worker", check_dead_worker),
        ("disk_full", check_disk_full),
        ("read_only", check_read_only_data_dir),
    ]:
        run.section(name, lambda fn=fn, name=name: fn(checkpoint, workdir / name))
    run.section(
        "kill_9", lambda: check_kill_9(checkpoint, workdir / "crash", config.crash_rounds, seed=config.seed)
    )
    lost = sum(
        int(run.sections.get(name, {}).get("acked_docs_lost", 0) or 0)
        for name in ("load", "disk_full", "kill_9")
    )
    return {
        "config": asdict(config),
        "seconds": round(time.monotonic() - started, 1),
        "sections": run.sections,
        "acked_docs_lost": lost,
        "violations": run.violations,
    }


def _n(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(results: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    s = results["sections"]
    cfg = results["config"]

    def get(name: str, key: str, default: Any = "?") -> Any:
        return s.get(name, {}).get(key, default)

    def status(name: str) -> str:
        return {"passed": "", "skipped": " (skipped)", "failed": " **FAILED**", "error": " **ERROR**"}.get(
            get(name, "status", "error"), ""
        )

    load_statuses = get("load", "by_status", {})
    rows = [
        (
            "Fuzzing (schemathesis: examples, coverage, fuzzing, stateful)" + status("fuzz"),
            f"{_n(get('fuzz', 'generated'))} generated requests over {get('fuzz', 'operations')} operations",
            f"{get('fuzz', 'failures')} failures (5xx, undocumented status/body, schema-invalid data accepted)",
        ),
        (
            "Hostile inputs (JSON, numbers, encodings, content types, text, images, limits)"
            + status("hostile"),
            f"{get('hostile', 'cases')} cases x {cfg['hostile_passes']} passes, {cfg['hostile_concurrency']} at a time"
            f" = {_n(get('hostile', 'requests'))} requests",
            f"{get('hostile', 'server_errors')} 5xx; statuses {get('hostile', 'by_status')}",
        ),
        (
            "API key on every route, path and header tricks" + status("auth"),
            f"{get('auth', 'routes')} method/route pairs x 7 credentials + {get('auth', 'path_tricks')} path tricks"
            f" = {_n(get('auth', 'requests'))} requests",
            f"{get('auth', 'let_in')} let in without the key",
        ),
        (
            "Image URL SSRF (private, loopback, metadata, odd encodings, other schemes)" + status("ssrf"),
            f"{get('ssrf', 'urls')} URLs x 4 routes = {get('ssrf', 'requests')} requests",
            "0 fetched" if get("ssrf", "status") == "passed" else "see violations",
        ),
        (
            "Path traversal in collection names and ids" + status("traversal"),
            f"{get('traversal', 'requests')} requests",
            "0 files outside the store" if get("traversal", "status") == "passed" else "see violations",
        ),
        (
            "Load past capacity" + status("load"),
            f"{cfg['load_clients']} clients x {cfg['load_seconds']:g} s = {_n(get('load', 'requests'))} requests",
            f"200: {_n(load_statuses.get('200', 0))}, 429: {_n(load_statuses.get('429', 0))}, "
            f"503: {_n(load_statuses.get('503', 0))}; RSS {get('load', 'rss_mib_first')} -> peak "
            f"{get('load', 'rss_mib_peak')} -> {get('load', 'rss_mib_last')} MiB; latency "
            f"{get('load', 'latency_ms_before')} ms before, {get('load', 'latency_ms_after')} ms after",
        ),
        (
            "kill -9 during concurrent HTTP upserts" + status("kill_9"),
            f"{get('kill_9', 'kills')} kills; {_n(get('kill_9', 'acked_batches'))} acknowledged batches "
            f"({_n(get('kill_9', 'acked_docs'))} docs)",
            f"{get('kill_9', 'acked_docs_lost')} acknowledged docs lost, {get('kill_9', 'partial_batches')} partial "
            f"batches, {get('kill_9', 'integrity_problems')} integrity problems; "
            f"{get('kill_9', 'in_flight_batches_committed')} in-flight batches committed whole",
        ),
        (
            "Exception inside a batch (fail-batch)" + status("failing_batch"),
            f"{get('failing_batch', 'bad_requests')} failing requests among {get('failing_batch', 'good_requests')} good",
            f"{get('failing_batch', 'good_ok')} good answered with their exact vectors; "
            f"{get('failing_batch', 'good_failed_with_a_bad_batch')} shared a failing forward pass",
        ),
        (
            "Engine process killed (kill-worker), no restarts left" + status("dead_worker"),
            f"1 kill with {get('dead_worker', 'in_flight')} requests in flight",
            f"all answered ({get('dead_worker', 'answered_200')} x 200, {get('dead_worker', 'answered_503')} x 503); "
            "the server exited 1; a new server on the same data served everything stored",
        ),
        (
            "Disk full (512 KiB tmpfs)" + status("disk_full"),
            f"{get('disk_full', 'acked_docs')} docs acknowledged, then {get('disk_full', 'writes_refused_503')} "
            "writes refused",
            f"503 + JSON each time; {get('disk_full', 'acked_docs_lost')} acknowledged docs lost; writes resume",
        ),
        (
            "Read-only data directory" + status("read_only"),
            "1 start",
            f"refuses to start (exit {get('read_only', 'exit_code')}), cause in the log; no file changed",
        ),
    ]
    lines = ["| Category | Tried | Outcome |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append(f"| **Acknowledged writes lost (all runs)** | | **{results['acked_docs_lost']}** |")
    return "\n".join(lines)
