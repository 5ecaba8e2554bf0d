"""Where one served request's CPU goes, stage by stage (SIMULATED device, wrk load).

    python bench/profile_stages.py                                  # this tree, --api-workers 1
    python bench/profile_stages.py --trees main=/tmp/base,this=. --rounds 2 --tag ab
    python bench/profile_stages.py --api-workers 1,2 --no-py-spy    # CPU per request only

For every server (each ``--trees`` entry x each ``--api-workers`` value, started in turn, the
whole sequence repeated ``--rounds`` times so that trees alternate) on the simulated device
(``python -m bench.simserver``, bench/simdevice.py), plus a bare FastAPI endpoint of the same
shape (bench/bare_fastapi.py):

1. **CPU per request** (exact): ``wrk`` keeps ``--connections`` keep-alive connections busy
   with one-text ``POST /embed`` requests for ``--duration`` s; the CPU time of every
   process of the server and of each of its threads is read from ``/proc`` before and
   after, and divided by the requests wrk completed. Garbage collection time per process
   comes from ``bench/instrument/sitecustomize.py`` (``gc.callbacks``).
2. **Latency at c=1**: ``wrk -c 1`` for ``--c1-duration`` s, p50 against one direct call of
   the stand-in (measured here, and nominal).
3. **Stage shares** (sampled): a second c=``--connections`` window under ``py-spy record
   --native`` (blocking, ``--rate`` Hz) of each Python process of the server; samples are
   put in stages by ``bench/stages.py`` and each thread's measured CPU is split by them.

Requests/s figures are throughput on whatever machine this runs on (on a shared machine
they move with other people's load: the JSON records the load average and the CPU others
used); CPU ms per request and stage shares hold under load far better. Writes
``bench/results/profile-stages[-TAG].json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import serve  # noqa: E402
import stages  # noqa: E402
from common import log  # noqa: E402

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
INSTRUMENT = Path(__file__).resolve().parent / "instrument"
WRK_DONE = r"""
done = function(summary, latency, requests)
  io.write(string.format("WRK-JSON {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p99_us\":%d,"
    .. "\"status_errors\":%d,\"socket_errors\":%d}\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def wrk_script(bodies: list[bytes], path: Path) -> Path:
    """A wrk Lua script that sends ``bodies`` in turn and prints a JSON summary."""
    items = ",\n".join("[==[" + b.decode() + "]==]" for b in bodies)
    path.write_text(
        f"local bodies = {{\n{items}\n}}\nlocal i = 0\n"
        'local headers = {["Content-Type"] = "application/json"}\n'
        "request = function()\n  i = i % #bodies + 1\n"
        '  return wrk.format("POST", "/embed", headers, bodies[i])\nend\n' + WRK_DONE
    )
    return path


def run_wrk(url: str, script: Path, connections: int, duration: float) -> dict[str, Any]:
    """One wrk run (one thread); its summary and its own CPU seconds."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "-s", str(script), url + "/embed"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"WRK-JSON (\{.*\})", out)
    if m is None:
        raise RuntimeError(f"wrk gave no summary:\n{out[-2000:]}")
    result: dict[str, Any] = json.loads(m.group(1))
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["wrk_cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return result


def thread_cpu(pid: int) -> tuple[dict[int, float], dict[int, str]]:
    """CPU seconds and kernel name (comm) of each thread of ``pid`` (and, under -1, the
    process's system time: syscalls, the loopback TCP stack)."""
    cpu, comm = {}, {}
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu[-1] = int(fields[12]) / os.sysconf("SC_CLK_TCK")
    except OSError:
        pass
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            comm[int(tid)] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        cpu[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return cpu, comm


def server_processes(root: int) -> dict[int, str]:
    """pid -> role of the processes that serve requests: the front ends and the engine (with
    ``--api-workers 1`` the server process is the front end)."""
    roles = {p: common.process_role(cmd, p == root) for p, cmd in common.process_tree(root).items()}
    front = "api-" if any(r.startswith("api-") for r in roles.values()) else "server"
    keep = (front, "engine", "bare FastAPI")
    return {p: r for p, r in roles.items() if r.startswith(keep)}


def gc_seconds(gc_dir: Path, pid: int) -> float:
    try:
        data = json.loads((gc_dir / f"gc-{pid}.json").read_text())
    except (OSError, ValueError):
        return float("nan")
    return float(sum(data["cpu_s"].values()))


def snapshot(procs: dict[int, str], gc_dir: Path) -> dict[int, Any]:
    time.sleep(0.6)  # the GC counters are written twice a second
    return {p: (thread_cpu(p), gc_seconds(gc_dir, p)) for p in procs}


def cpu_window(server: serve.Server, args: argparse.Namespace, script: Path, gc_dir: Path) -> dict[str, Any]:
    root = server.proc.pid  # type: ignore[union-attr]
    procs = server_processes(root)
    before = snapshot(procs, gc_dir)
    load = common.ForeignLoad(list(common.process_tree(root)))
    w = run_wrk(server.url, script, args.connections, args.duration)
    others = max(0.0, load.cores() - w.get("wrk_cpu_s", 0.0) / args.duration)
    after = snapshot(procs, gc_dir)
    per_proc = {}
    for pid, role in procs.items():
        (c0, _), g0 = before[pid]
        (c1, comm), g1 = after[pid]
        system = c1.pop(-1, 0.0) - c0.pop(-1, 0.0)
        threads = {t: c1[t] - c0.get(t, 0.0) for t in c1}
        per_proc[pid] = {
            "role": role,
            "cpu_ms_per_request": sum(threads.values()) * 1000 / max(w["requests"], 1),
            "system_ms_per_request": system * 1000 / max(w["requests"], 1),
            "gc_ms_per_request": (g1 - g0) * 1000 / max(w["requests"], 1),
            "threads": {t: {"comm": comm.get(t, ""), "cpu_s": s} for t, s in threads.items()},
        }
    return {"wrk": w, "processes": per_proc, "others_cores": others, "load_average": os.getloadavg()}


def spy_window(
    server: serve.Server, args: argparse.Namespace, script: Path, out_dir: Path
) -> dict[int, Path]:
    procs = server_processes(server.proc.pid)  # type: ignore[union-attr]
    spies = {}
    for pid in procs:
        path = out_dir / f"{server.name}-{pid}.txt"
        cmd = [PY_SPY, "record", "-p", str(pid), "-o", str(path), "-f", "raw", "-d", str(int(args.duration)),
               "-r", str(args.rate), "--threads", "--native"]  # fmt: skip
        spies[pid] = (subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path)
    run_wrk(server.url, script, args.connections, args.duration + 2)
    for spy, _ in spies.values():
        spy.wait()
    return {pid: path for pid, (_, path) in spies.items() if path.exists()}


def stage_table(cpu: dict[str, Any], profiles: dict[int, Path]) -> dict[str, dict[str, float]]:
    """role -> stage -> ms per request (from the CPU window, split by the py-spy shares)."""
    out: dict[str, dict[str, float]] = {}
    n = cpu["wrk"]["requests"]
    for pid, info in cpu["processes"].items():
        if pid not in profiles:
            continue
        role = "engine" if info["role"] == "engine" else "front end"
        shares = stages.thread_shares(stages.parse_raw(profiles[pid].read_text()), role)
        threads = {t: v["cpu_s"] for t, v in info["threads"].items()}
        comms = {t: v["comm"] for t, v in info["threads"].items()}
        gc_s = info["gc_ms_per_request"] * n / 1000.0
        per = stages.stage_ms(shares, threads, comms, n, gc_s)
        into = out.setdefault(role, {})
        for stage, ms in per.items():
            into[stage] = into.get(stage, 0.0) + ms
    return out


def measure(server: serve.Server, args: argparse.Namespace, script: Path, c1: Path, gc_dir: Path,
            spy_dir: Path) -> dict[str, Any]:  # fmt: skip
    run_wrk(server.url, script, args.connections, args.warmup)
    entry: dict[str, Any] = {"name": server.name, "command": server.command}
    entry["cpu"] = cpu_window(server, args, script, gc_dir)
    entry["c1"] = run_wrk(server.url, c1, 1, args.c1_duration)
    if args.py_spy and server.model_args:
        entry["stages"] = stage_table(entry["cpu"], spy_window(server, args, script, spy_dir))
    w = entry["cpu"]["wrk"]
    per = "; ".join(f"{p['role']} {p['cpu_ms_per_request']:.3f} (gc {p['gc_ms_per_request']:.3f})"
                    for p in entry["cpu"]["processes"].values())  # fmt: skip
    log(f"  {server.name}: {w['rps']:.0f} req/s at c={args.connections} (p50 {w['p50_us'] / 1000:.1f} ms), "
        f"c=1 p50 {entry['c1']['p50_us'] / 1000:.1f} ms; CPU ms/request: {per}; others "
        f"{entry['cpu']['others_cores']:.2f} cores, load {entry['cpu']['load_average'][0]:.1f}")  # fmt: skip
    return entry


def servers_for(args: argparse.Namespace, ckpt: Path, gc_dir: Path) -> list[serve.Server]:
    base = ["--max-batch-size", "64", "--warmup-tokens", "64", "--gil-switch-interval-ms", "0.1",
            *args.server_arg]  # fmt: skip
    env = {"LLAVE_SIM_PROFILE": "h100", "LLAVE_BENCH_GC_DIR": str(gc_dir),
           "PYTHONPATH": f"{INSTRUMENT}{os.pathsep}{common.REPO}"}  # fmt: skip
    out = []
    for spec in args.trees.split(","):
        name, _, path = spec.rpartition("=")
        tree = Path(path).resolve()
        for w in [int(x) for x in args.api_workers.split(",")]:
            out.append(serve.Server(f"{name or tree.name}-w{w}", ckpt, "cpu", "float32",
                                    [*base, "--api-workers", str(w)], dict(env), launcher=["-m", "bench.simserver"],
                                    pythonpath=None if tree == common.REPO else str(tree)))  # fmt: skip
    if not args.no_bare:
        uvicorn = ["-m", "uvicorn", "bench.bare_fastapi:app", "--host", "127.0.0.1", "--port", "{port}",
                   "--log-level", "warning"]  # fmt: skip
        out.append(serve.Server("bare-fastapi", ckpt, "cpu", "float32", [], {**env, "LLAVE_BARE_DIM": "896"},
                                launcher=uvicorn, model_args=False))  # fmt: skip
    return out


def report(result: dict[str, Any]) -> str:
    rows = []
    for e in result["runs"]:
        procs = e["cpu"]["processes"].values()
        rows.append({
            "round": e["round"], "server": e["name"], "req_per_s": e["cpu"]["wrk"]["rps"],
            "p50_ms": e["cpu"]["wrk"]["p50_us"] / 1000, "p99_ms": e["cpu"]["wrk"]["p99_us"] / 1000,
            "c1_p50_ms": e["c1"]["p50_us"] / 1000,
            "cpu_ms_per_req": sum(p["cpu_ms_per_request"] for p in procs),
            "by_process": "; ".join(f"{p['role']} {p['cpu_ms_per_request']:.3f}" for p in procs),
            "system_ms_per_req": sum(p["system_ms_per_request"] for p in procs),
            "gc_ms_per_req": sum(p["gc_ms_per_request"] for p in procs if p["gc_ms_per_request"] == p["gc_ms_per_request"]),
            "errors": e["cpu"]["wrk"]["status_errors"] + e["cpu"]["wrk"]["socket_errors"],
            "others_cores": e["cpu"]["others_cores"], "load1": e["cpu"]["load_average"][0],
        })  # fmt: skip
    text = common.table(rows, list(rows[0]), title=f"SIMULATED device; c={result['connections']} (wrk)")
    off = result["offline"]
    text += (f"\nstand-in called directly (this process): batch 1 {off['direct_ms']:.1f} ms, batch 64 "
             f"{off['offline_limit']:.0f} inputs/s (nominal 16 ms, 2,370/s)\n")  # fmt: skip
    for e in result["runs"]:
        for role, per in e.get("stages", {}).items():
            text += f"\n{e['name']} (round {e['round']}), {role}: ms of CPU per request by stage\n"
            text += "".join(f"  {ms:7.3f}  {stage}\n" for stage, ms in per.items())
    return text


def markdown(result: dict[str, Any]) -> str:
    """The stage tables of a results file as markdown: one column per server and role."""
    cols = [
        (f"{e['name']} r{e['round']}", role, per)
        for e in result["runs"]
        for role, per in e.get("stages", {}).items()
    ]
    order: dict[str, float] = {}
    for _, _, per in cols:
        for stage, ms in per.items():
            order[stage] = max(order.get(stage, 0.0), ms)
    lines = [
        "| stage | " + " | ".join(f"{n}: {r}" for n, r, _ in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for stage in sorted(order, key=lambda k: -order[k]):
        lines.append(f"| {stage} | " + " | ".join(f"{per.get(stage, 0.0):.3f}" for _, _, per in cols) + " |")
    lines.append(
        "| **all stages** | " + " | ".join(f"**{sum(per.values()):.3f}**" for _, _, per in cols) + " |"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--trees", default=".", help="NAME=PATH,...: source trees to serve from (default: this one)"
    )
    p.add_argument("--api-workers", default="1")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per window")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--c1-duration", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--no-py-spy", dest="py_spy", action="store_false")
    p.add_argument("--no-bare", action="store_true")
    p.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    p.add_argument("--preset", default="llave-0.5b")
    p.add_argument("--texts", type=int, default=128)
    p.add_argument("--tag", default="")
    p.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE)
    p.add_argument("--markdown", type=Path, help="print the stage tables of a results JSON and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed (apt-get install wrk)")
    ckpt = common.ensure_checkpoint(args.preset, args.cache_dir)
    work = Path(tempfile.mkdtemp(prefix="llave-stages-"))
    gc_dir, spy_dir = work / "gc", args.cache_dir / "profiles"
    gc_dir.mkdir()
    spy_dir.mkdir(parents=True, exist_ok=True)
    bodies = [serve.common_json({"inputs": [{"text": t}]}) for t in common.make_texts(ckpt, args.texts, 40)]
    script, c1 = wrk_script(bodies, work / "load.lua"), wrk_script(bodies, work / "c1.lua")
    offline = serve.sim_offline(serve._checkpoint_dim(ckpt), [1, 64], 1.0)
    result: dict[str, Any] = {
        "benchmark": "profile_stages", "SIMULATION": "the device is simulated (bench/simdevice.py)",
        "command": "python bench/profile_stages.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "connections": args.connections,
        "offline": {"direct_ms": offline[0]["ms_per_call_p50"], "offline_limit": offline[1]["throughput"]},
        "runs": [],
    }  # fmt: skip
    for r in range(args.rounds):
        for server in servers_for(args, ckpt, gc_dir):
            try:
                server.start()
                asyncio_run(server.wait_ready())
                entry = measure(server, args, script, c1, gc_dir, spy_dir)
                entry["round"] = r
                result["runs"].append(entry)
            finally:
                server.stop()
    result["machine"] = common.machine_info()
    print(report(result))
    common.write_results("profile-stages" + (f"-{args.tag}" if args.tag else ""), result)
    shutil.rmtree(work, ignore_errors=True)


def asyncio_run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


if __name__ == "__main__":
    main()
