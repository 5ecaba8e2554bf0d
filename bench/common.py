"""Helpers shared by the benchmarks: checkpoints, inputs, statistics, tables, results.

Nothing here imports torch or the model core at import time, so a benchmark's client
side stays light. Benchmarks are not tests (docs/architecture.md, "Contracts"): they
print a table and write JSON under ``bench/results/``; nothing asserts on wall-clock time.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
DEFAULT_CACHE = BENCH / ".cache"
PYTHON = sys.executable

if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere
    sys.path.insert(0, str(REPO))


def offline_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: no hub access, unbuffered output, repo importable."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- checkpoints -----------------------------------------------------------------------------


def ensure_checkpoint(
    preset: str, cache_dir: Path = DEFAULT_CACHE, *, seed: int = 0, fmt: str = "hf"
) -> Path:
    """A random ``model.tiny`` checkpoint of ``preset``, built once and cached.

    A ``.complete`` marker is written after the build, so an interrupted build is redone.
    """
    out = Path(cache_dir) / f"{preset}-seed{seed}-{fmt}"
    marker = out / ".complete"
    if marker.exists():
        return out
    started = time.perf_counter()
    log(f"building the {preset} checkpoint in {out} (model.tiny, seed {seed}) ...")
    subprocess.run(
        [PYTHON, "-m", "model.tiny", str(out), "--preset", preset, "--seed", str(seed), "--format", fmt],
        check=True,
        cwd=REPO,
        env=offline_env(),
    )
    marker.write_text(f"built in {time.perf_counter() - started:.1f} s\n")
    log(f"built in {time.perf_counter() - started:.1f} s")
    return out


# --- inputs ----------------------------------------------------------------------------------

_WORDS = (
    "a the of with and in on at to for from by is are this that image picture photo question answer "
    "what which where who how many find caption text document query target search similar describe "
    "object scene person people red green blue yellow purple orange black white gray pink brown circle "
    "square triangle star cross diamond shape small large big left right top bottom center middle corner "
    "cat dog car tree house sky sea one two three four five six seven eight nine ten number"
).split()


def make_texts(checkpoint: Path, n: int, tokens: int = 40, seed: int = 0) -> list[str]:
    """``n`` distinct texts of exactly ``tokens`` tokens each (by the checkpoint's tokenizer)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(tokens * 2)]
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"][:tokens]
        texts.append(tok.decode(ids).strip())
    return texts


def make_images(n: int, size: tuple[int, int] = (384, 384), seed: int = 0, quality: int = 90) -> list[str]:
    """``n`` distinct JPEG images (width, height) with a few random shapes, as base64 strings."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
            x1, y1 = x0 + rng.randrange(20, size[0] // 2), y0 + rng.randrange(20, size[1] // 2)
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


# --- statistics ------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and relative range ((max - min) / median) of repeated measurements."""
    vals = [v for v in values if v == v]  # drop NaN
    if not vals:
        return {
            "median": float("nan"),
            "min": float("nan"),
            "max": float("nan"),
            "rel_range": float("nan"),
            "n": 0,
        }
    med = statistics.median(vals)
    return {
        "median": med,
        "min": min(vals),
        "max": max(vals),
        "rel_range": (max(vals) - min(vals)) / med if med else float("nan"),
        "n": len(vals),
    }


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), children excluded."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return out


def process_tree(pid: int) -> dict[int, str]:
    """``pid`` and all its descendants, each with its command line (Linux /proc)."""
    out: dict[int, str] = {}
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    stack = [pid]
    while stack:
        p = stack.pop()
        if p in out:
            continue
        try:
            raw = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        out[p] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        stack.extend(children.get(p, []))
    return out


def process_role(cmdline: str, root: bool) -> str:
    """A process's role in a server, told from its command line."""
    low = cmdline.lower()
    if low.startswith("llave: "):  # the server's process titles (service/proctitle.py)
        return cmdline[len("llave: ") :].strip()
    if "resource_tracker" in low:
        return "multiprocessing resource tracker"
    if "uvicorn" in low and "bare_fastapi" in low:
        return "bare FastAPI (uvicorn)"
    for marker, role in (("engine", "engine"), ("api-worker", "API worker"), ("api_worker", "API worker")):
        if marker in low:
            return role
    if root:
        return "server (main process)"
    if "multiprocessing" in low or "spawn_main" in low:
        return "child (multiprocessing)"
    return "child: " + cmdline[:60]


def tree_cpu(pid: int) -> dict[int, dict[str, Any]]:
    """CPU seconds, command line and role of every process of ``pid``'s tree, now."""
    return {
        p: {"cmdline": cmd, "role": process_role(cmd, p == pid), "cpu_s": cpu_seconds(p)}
        for p, cmd in process_tree(pid).items()
    }


def tree_cpu_delta(
    before: dict[int, dict[str, Any]], after: dict[int, dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per process alive at the end: its role, command line and CPU seconds used in between."""
    rows = []
    for p, info in after.items():
        start = before.get(p, {}).get("cpu_s", 0.0)
        rows.append({"pid": p, "role": info["role"], "cmdline": info["cmdline"][:300],
                     "cpu_s": info["cpu_s"] - start})  # fmt: skip
    return sorted(rows, key=lambda r: r["pid"])


def rss_bytes(pid: int | None = None) -> int:
    """Current resident set size of a process (default: this one)."""
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes(pid: int | None = None) -> int:
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _busy_jiffies() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    total = sum(fields[:8])
    return total - idle, total


class ForeignLoad:
    """CPU used by processes other than ``pids`` (and this one) between ``start`` and ``stop``.

    The machine is shared: this tells how much of it others took during a measurement,
    in cores (e.g. 1.0 = one core busy with someone else's work).
    """

    def __init__(self, pids: Iterable[int] = ()) -> None:
        self.pids = {os.getpid(), *pids}
        self.start()

    def _mine(self) -> float:
        return sum(x for x in (cpu_seconds(p) for p in self.pids) if x == x)

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._busy0, _ = _busy_jiffies()
        self._mine0 = self._mine()

    def elapsed(self) -> float:
        """Seconds since ``start``."""
        return time.perf_counter() - self._t0

    def cores(self) -> float:
        """Foreign cores since ``start``."""
        busy1, _ = _busy_jiffies()
        mine1 = self._mine()
        span = self.elapsed()
        if span <= 0:
            return float("nan")
        busy = (busy1 - self._busy0) / os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy - (mine1 - self._mine0)) / span)


def wait_for_quiet(
    pids: Iterable[int] = (), *, threshold: float = 0.3, max_wait: float = 0.0, probe: float = 1.0
) -> float:
    """Wait (at most ``max_wait`` s) until others use under ``threshold`` cores; return the last reading."""
    deadline = time.perf_counter() + max_wait
    while True:
        load = ForeignLoad(pids)
        time.sleep(probe)
        cores = load.cores()
        if cores < threshold or time.perf_counter() >= deadline:
            return cores


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


# --- output ----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average_at_start": load_average(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        pass
    for mod in ("torch", "transformers", "faiss", "numpy"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_results(name: str, data: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """Write ``bench/results/<name>.json`` (atomically) and return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    log(f"wrote {path}")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, set):
        return sorted(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def fmt(value: Any, digits: int = 3) -> str:
    """A number printed with about ``digits`` significant figures (integers as they are)."""
    if isinstance(value, float):
        if value != value:
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            decimals = max(digits - len(str(int(abs(value)))), 0)
            return f"{value:.{decimals}f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (dicts) restricted to ``columns``."""
    rows = list(rows)
    cells = [[fmt(row.get(col, "")) for col in columns] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]
    lines = []
    if title:
        lines.append(f"\n{title}\n")
    lines.append("| " + " | ".join(col.ljust(w) for col, w in zip(columns, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)
