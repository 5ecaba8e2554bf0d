"""Where a served request's CPU goes: per-thread accounting, client processes, py-spy.

    python bench/profile_serve.py --preset demo --kind image      # small model: the GPU-like regime
    python bench/profile_serve.py --preset tiny --kind text
    python bench/profile_serve.py --preset llave-0.5b --kind text --plan 1:1,64:1 --repeats 1

Starts one server (default flags) and runs closed-loop points from ``bench/serve.py``
(``--plan`` = concurrency:client-processes pairs), measuring for each point the server's
CPU per request split by thread (``MainThread`` = the event loop: HTTP, validation,
JSON; ``llave-preprocess`` = tokenising and image decoding; ``llave-device`` = collate,
forward dispatch, pooling; ``native`` = threads Python does not know: torch's OpenMP
workers and tokenizers' threads). With ``--py-spy`` it also records py-spy profiles
(all threads, and GIL holders only) of the server at the first and last concurrency of
the plan, under ``bench/.cache/profiles/``. Writes ``bench/results/profile-PRESET-KIND.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import serve  # noqa: E402
from common import log  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by native id, from ``py-spy dump`` (empty without py-spy)."""
    try:
        out = subprocess.run(
            [PY_SPY, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {int(t): n for t, n in re.findall(r'Thread (\d+) \((?:idle|active)[^)]*\): "([^"]+)"', out)}


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


# Where a sample's time goes: the innermost frame that belongs to one of these (path prefixes
# as py-spy prints them, relative to site-packages or the repository).
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("forward (torch, transformers)", ("torch/", "transformers/")),
    ("HTTP stack (uvicorn, starlette, fastapi, pydantic)",
     ("uvicorn/", "starlette/", "fastapi/", "pydantic", "httptools", "h11/", "anyio/", "json/")),
    ("preprocessing libraries (tokenizers, PIL, numpy)", ("tokenizers/", "PIL/", "numpy/")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("server code (service/)", ("service/",)),
    ("model code (model/)", ("model/",)),
    ("asyncio, threads, queues", ("asyncio/", "threading.py", "concurrent/", "queue.py", "selectors.py",
                                  "uvloop/", "contextlib.py", "weakref", "_weakrefset.py")),
]  # fmt: skip


def profile_shares(path: Path) -> dict[str, float]:
    """Share of py-spy samples (raw/collapsed format) per category of ``CATEGORIES``."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        files = re.findall(r"\(([^():]+):\d+\)", stack)
        category = "other"
        for file in reversed(files):  # innermost first
            hit = next((name for name, prefixes in CATEGORIES if file.startswith(prefixes)), None)
            if hit is not None:
                category = hit
                break
        counts[category] = counts.get(category, 0) + int(n)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}


async def point(
    server: serve.Server,
    bodies: list[bytes],
    c: int,
    procs: int,
    names: dict[int, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    before = thread_cpu(server.proc.pid)  # type: ignore[union-attr]
    p = await serve.closed_loop(
        server,
        bodies,
        c,
        duration=args.duration,
        warmup=args.warmup,
        min_rounds=0,
        max_window=args.duration + 10,
        procs=procs,
    )
    after = thread_cpu(server.proc.pid)  # type: ignore[union-attr]
    delta = {t: after.get(t, 0.0) - before.get(t, 0.0) for t in after}
    total = sum(delta.values()) or 1.0
    shares: dict[str, float] = {}
    for tid, cpu in delta.items():
        name = re.sub(r"_\d+$", "", names.get(tid, "native"))
        shares[name] = shares.get(name, 0.0) + cpu / total
    p["client_procs"] = procs
    p["thread_cpu_ms_per_request"] = {
        n: share * p["server_cpu_cores"] / p["throughput"] * 1000.0
        for n, share in shares.items()
        if p["throughput"]
    }
    return p


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ckpt = common.ensure_checkpoint(args.preset, args.cache_dir)
    plan = [tuple(int(x) for x in item.split(":")) for item in args.plan.split(",")]
    server = serve.Server("profile", ckpt, args.device, args.dtype, [], {})
    result: dict[str, Any] = {
        "benchmark": "profile_serve",
        "command": "python bench/profile_serve.py " + " ".join(sys.argv[1:]),
        "points": [],
    }
    server.start()
    try:
        await server.wait_ready()
        inputs = serve.make_inputs(args.kind, ckpt, 128, 40, (384, 384))
        bodies = [serve.common_json({"inputs": [x]}) for x in inputs]
        names = thread_names(server.proc.pid)  # type: ignore[union-attr]
        for rep in range(args.repeats):
            for c, procs in plan:
                common.wait_for_quiet([server.proc.pid], max_wait=args.quiet_wait)  # type: ignore[union-attr]
                names.update(thread_names(server.proc.pid))  # type: ignore[union-attr]  (pool threads start lazily)
                p = await point(server, bodies, c, procs, names, args)
                p["repeat"] = rep
                result["points"].append(p)
                per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(p["thread_cpu_ms_per_request"].items()))
                log(
                    f"c={c} procs={procs}: {p['throughput']:.1f}/s, batch {p['mean_batch_size']:.1f}, busy "
                    f"{p['device_busy']:.2f}, server {p['server_cpu_cores']:.2f} cores, client "
                    f"{p['client_cpu_cores']:.2f}, p50 {p['p50_ms']:.0f} ms; server CPU ms/request: {per}"
                )
        if args.py_spy:
            out_dir = args.cache_dir / "profiles"
            out_dir.mkdir(parents=True, exist_ok=True)
            for c in dict.fromkeys([plan[-1][0], plan[0][0]]):
                spies = [
                    subprocess.Popen(
                        [
                            PY_SPY,
                            "record",
                            "-p",
                            str(server.proc.pid),
                            "-o",
                            str(out_dir / f"{args.preset}-{args.kind}-c{c}-{tag}.txt"),  # type: ignore[union-attr]
                            "-f",
                            "raw",
                            "-d",
                            str(int(args.duration + 4)),
                            "--threads",
                            "-r",
                            "200",
                            "--nonblocking",  # two samplers at once: neither may pause the server
                            *extra,
                        ],  # fmt: skip
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                    for tag, extra in (("all", []), ("gil", ["--gil"]))
                ]
                await serve.closed_loop(
                    server,
                    bodies,
                    c,
                    duration=args.duration,
                    warmup=2,
                    min_rounds=0,
                    max_window=args.duration + 10,
                )
                for spy in spies:
                    spy.wait()
                log(f"py-spy profiles at c={c} in {out_dir}")
                for tag in ("all", "gil"):
                    path = out_dir / f"{args.preset}-{args.kind}-c{c}-{tag}.txt"
                    if path.exists():
                        shares = profile_shares(path)
                        result.setdefault("profile_shares", {})[f"c{c}-{tag}"] = shares
                        log(f"  c={c} {tag}: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    finally:
        server.stop()
    result["machine"] = common.machine_info()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--kind", default="image", choices=serve.KINDS)
    p.add_argument("--plan", default="8:1,64:1,64:4", help="concurrency:client-processes, comma-separated")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--duration", type=float, default=12.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quiet-wait", type=float, default=120.0)
    p.add_argument("--py-spy", action="store_true", help="also record py-spy profiles (pip install py-spy)")
    p.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE)
    args = p.parse_args()
    started = time.perf_counter()
    result = asyncio.run(run(args))
    result["elapsed_s"] = time.perf_counter() - started
    common.write_results(f"profile-{args.preset}-{args.kind}", result)


if __name__ == "__main__":
    main()
