"""The offline default behind ``make serve``: a demo model, a demo collection, a server.

    python -m service.demo [server flags...]

With a model configured (``LLAVE_MODEL`` or ``--model``) this simply runs the server on it.
Without one it prepares, once, under ``LLAVE_DEMO_DIR`` (default ``./.cache/demo``):

1. a random ``demo``-preset checkpoint (``python -m model.tiny``) and, at the same time,
   the synthetic shapes dataset (``python -m training.synthetic``),
2. a demo model fine-tuned from it with the hardness-weighted loss (``training/run.py``),
   which then scores Precision@1 on the held-out synthetic eval split in the same process
   (``--eval-data``, the evaluator of ``training.evaluate``),

then upserts the eval images into the ``demo`` collection of the data directory
(resumable: a second start finds them stored), checks that "a red circle" finds red
circles, and becomes the server (``exec``). A watcher process prints the search page's
address, the API docs' and ready-to-paste ``curl`` examples once ``/ready`` answers 200.
Training and indexing run as their own processes (through the trainer's CLI), so the
service never imports ``training/`` and this process never loads torch. Every ``LLAVE_``
setting from the environment is honoured.

Progress reads well in a terminal and in a log file: the trainer draws a bar on a
terminal and writes a plain line every 10% of the steps (or 30 s) anywhere else; each
stage ends with a line saying how long it took.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

DEMO_COLLECTION = "demo"
# The demo recipe. Measured on the 2-core machine (held-out Precision@1, same data and
# base): 600 steps of batch 64 reach 0.93; 400 steps (lr 6e-4) 0.78, 200 steps 0.62 (lr
# 5e-4) or 0.26 (lr 1e-3), 600 steps of batch 32 0.79. So the steps stay and the time is
# won elsewhere: two data-parallel processes (training_processes), each input encoded
# once per batch (training/step.py), stages run side by side. LLAVE_DEMO_STEPS overrides
# the number of steps (the tests use a handful).
DEMO_STEPS = int(os.environ.get("LLAVE_DEMO_STEPS", "600"))
DEMO_BATCH_SIZE = 64
DEMO_LEARNING_RATE = "5e-4"
DEMO_WARMUP_STEPS = 30
DEMO_TRAIN_ROWS = 6000
DEMO_EVAL_ROWS = 200  # queries; each has 8 candidate images, so 1600 images are indexed
# The demo model is trained on the synthetic "t2i" task: a bare caption ("a red circle")
# as the query and a bare image as the target, so the demo queries and documents carry no
# instruction. (MMEB-style instructions work the same way with models trained on them.)
ATTRIBUTES = ("colour", "shape", "size", "position")
READY_TIMEOUT_S = 900  # how long the watcher waits for /ready before giving up quietly


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _child_env() -> dict[str, str]:
    """The environment of the preparation processes.

    One intra-op thread unless the user chose otherwise: the demo model is so small that
    more threads gain little on an idle machine, while on a busy one (anything else
    running on the same cores) spinning OpenMP threads make every step much slower
    (measured: bench/README.md, "Demo training threads"). No Hugging Face progress bars
    (a one-shard "Writing model shards" bar is noise in a log file)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def _start(step: str, cmd: list[str], quiet_cpp: bool = False) -> subprocess.Popen:
    _say(f"{step}: {shlex.join(cmd)}")
    env = _child_env()
    if quiet_cpp:  # DDP's one-off note per process that every parameter was used, not errors
        env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return subprocess.Popen(cmd, env=env)


def _wait(step: str, proc: subprocess.Popen, started: float) -> None:
    code = proc.wait()
    if code != 0:
        raise SystemExit(f"[demo] {step} failed (exit status {code}); see the messages above")
    _say(f"{step}: done in {time.monotonic() - started:.0f} s")


def _run(step: str, cmd: list[str], quiet_cpp: bool = False) -> None:
    started = time.monotonic()
    _wait(step, _start(step, cmd, quiet_cpp), started)


def training_processes() -> int:
    """Two single-threaded processes where there are two cores (``LLAVE_DEMO_PROCESSES``
    overrides): data parallel, each encodes half of every batch, the loss sees all of it."""
    n = int(os.environ.get("LLAVE_DEMO_PROCESSES", "2" if (os.cpu_count() or 1) >= 2 else "1"))
    return n if n >= 1 and DEMO_BATCH_SIZE % n == 0 else 1


def training_command(
    base: Path, data_dir: Path, model_dir: Path, steps: int = DEMO_STEPS, processes: int = 1
) -> list[str]:
    """``training/run.py`` with the demo recipe (under torchrun when ``processes`` > 1: the
    same global batch, so the same training), evaluating on the held-out split at the end."""
    repo = Path(__file__).resolve().parents[1]
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    return [
        *launcher, str(repo / "training" / "run.py"),
        "--model", str(base),
        "--train-data", str(data_dir / "train.jsonl"),
        "--image-root", str(data_dir),
        "--output-dir", str(model_dir),
        "--max-steps", str(steps),
        "--per-device-batch-size", str(DEMO_BATCH_SIZE // processes),
        "--learning-rate", DEMO_LEARNING_RATE,
        "--warmup-steps", str(min(DEMO_WARMUP_STEPS, steps // 10)),
        "--max-grad-norm", "1.0",
        "--alpha", "9",
        "--logit-scale", "50",
        "--no-freeze-vision-tower",
        "--mask-duplicates",
        "--precision", "fp32",
        "--no-gradient-checkpointing",
        "--device", "cpu",
        "--seed", "0",
        "--logging-steps", "50",
        "--eval-data", str(data_dir / "eval.jsonl"),
        "--eval-batch-size", "64",
    ]  # fmt: skip


def prepare_model(cache: Path) -> Path:
    """Build, train and evaluate the demo model once; later calls reuse it."""
    model_dir, data_dir, base = cache / "model", cache / "data", cache / "base"
    done = cache / "model.done.json"
    if done.is_file() and (model_dir / "config.json").is_file():
        return model_dir
    py = sys.executable
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Two independent single-threaded jobs: one on each core of a 2-core machine.
    base_job = _start(
        "base checkpoint", [py, "-m", "model.tiny", str(base), "--preset", "demo", "--seed", "0"]
    )
    data_job = _start(
        "synthetic data",
        [
            py, "-m", "training.synthetic", str(data_dir),
            "--n", str(DEMO_TRAIN_ROWS), "--seed", "0", "--tasks", "t2i", "--eval-n", str(DEMO_EVAL_ROWS),
        ],
    )  # fmt: skip
    _wait("synthetic data", data_job, started)
    _wait("base checkpoint", base_job, started)
    processes = training_processes()
    _run(
        "training", training_command(base, data_dir, model_dir, processes=processes), quiet_cpp=processes > 1
    )
    evaluation = json.loads((model_dir / "eval.jsonl").read_text().strip().splitlines()[-1])
    done.write_text(
        json.dumps(
            {
                "precision_at_1": evaluation["precision_at_1"],
                "rows": evaluation["rows"],
                "steps": DEMO_STEPS,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
    return model_dir


def _eval_images(data_dir: Path) -> list[dict]:
    """Documents for the held-out eval images, with attributes parsed from their names
    (``000001_yellow_star_large_right.png``)."""
    docs = []
    for path in sorted((data_dir / "images" / "eval").glob("*.png")):
        parts = path.stem.split("_")[1:]
        meta = dict(zip(ATTRIBUTES, parts, strict=False))
        meta["path"] = path.relative_to(data_dir).as_posix()
        docs.append({"id": path.stem, "image": path, "metadata": meta})
    return docs


def index_demo_collection(model_dir: Path, data_dir: Path, store_dir: Path) -> list[dict]:
    """Upsert the eval images missing from the ``demo`` collection; return the hits for
    "a red circle" as a check."""
    from model import load_embedder
    from service.storage.sources import SOURCE_DEFAULTS, source_of_input
    from service.storage.store import CollectionStore

    docs = _eval_images(data_dir)
    from service import limits

    embedder = load_embedder(model_dir, device="cpu", dtype="float32", **limits.image_limits())
    store = CollectionStore(store_dir)
    store.open()
    try:
        missing = [
            d for d in docs if d["id"] not in store.existing_ids(DEMO_COLLECTION, [d["id"] for d in docs])
        ]
        exists = any(c["name"] == DEMO_COLLECTION for c in store.list_collections())
        options = store.source_options(DEMO_COLLECTION) if exists else SOURCE_DEFAULTS
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            inputs = [{"image": d["image"].read_bytes()} for d in chunk]
            vecs = embedder.embed(inputs, batch_size=64)
            # The image's thumbnail is kept with each document, for the search page.
            sources = [source_of_input(x, options) for x in inputs] if options["store_source"] else None
            ids, meta = [d["id"] for d in chunk], [d["metadata"] for d in chunk]
            store.upsert(DEMO_COLLECTION, ids, vecs, meta, sources=sources)
        _say(
            f"collection '{DEMO_COLLECTION}': {store.describe(DEMO_COLLECTION)['count']} images "
            f"({len(missing)} added now) in {store_dir}"
        )
        query = embedder.embed([{"text": "a red circle"}])[0]
        return store.search(DEMO_COLLECTION, query, k=5)
    finally:
        store.close()


def index_main(argv: list[str]) -> None:
    """``index_demo_collection`` as its own process (``MODEL_DIR DATA_DIR STORE_DIR``)."""
    model_dir, data_dir, store_dir = (Path(a) for a in argv)
    try:
        hits = index_demo_collection(model_dir, data_dir, store_dir)
    except Exception as exc:  # e.g. a server already holds this data directory
        raise SystemExit(f"[demo] cannot prepare the demo collection in {store_dir}: {exc}") from exc
    _say(
        "'a red circle' -> "
        + ", ".join(
            f"{h['metadata'].get('colour')} {h['metadata'].get('shape')} ({h['score']:.2f})" for h in hits
        )
    )


def base_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"http://{host}:{port}"


def print_examples(url: str, api_key: bool, seconds: float | None = None) -> None:
    auth = ' -H "Authorization: Bearer $LLAVE_API_KEY"' if api_key else ""
    search = {"collection": DEMO_COLLECTION, "query": {"text": "a red circle"}, "k": 5}
    after = f" after {seconds:.0f} s" if seconds is not None else ""
    print(
        f"""
[demo] ready{after}
[demo] search page: {url}/
[demo] API docs:    {url}/docs

  curl -s {url}/embed{auth} -H 'content-type: application/json' \\
       -d '{{"inputs": [{{"text": "a red circle"}}, {{"text": "a blue star"}}]}}'

  curl -s {url}/search{auth} -H 'content-type: application/json' \\
       -d '{json.dumps(search)}'

  curl -s {url}/search{auth} -H 'content-type: application/json' \\
       -d '{json.dumps({**search, "filter": {"shape": ["star", "square"]}})}'
""",
        flush=True,
    )


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):  # not listening yet, or 503 while loading
        return False


def announce_when_ready(url: str, api_key: bool, started: float) -> None:
    """Fork a watcher that prints the addresses once ``url``/ready answers 200, then exits.

    Double fork: the watcher belongs to init, not to the server this process becomes, so
    it never lingers as the server's zombie child. It gives up when the server is gone."""
    server_pid = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child:
        os.waitpid(child, 0)
        return
    try:
        if os.fork():
            os._exit(0)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.kill(server_pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            if _ready(url):
                print_examples(url, api_key, time.monotonic() - started)
                break
            time.sleep(1.0)  # each poll is a line in the server's access log
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    server = [sys.executable, "-m", "service", *argv]
    if "--model" in argv or any(a.startswith("--model=") for a in argv) or os.environ.get("LLAVE_MODEL"):
        os.execv(sys.executable, server)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.get("LLAVE_DEMO_DIR", ".cache/demo")).resolve()
    model_dir = prepare_model(cache)
    result = json.loads((cache / "model.done.json").read_text())
    _say(
        f"demo model {model_dir}: Precision@1 on the held-out synthetic eval = "
        f"{result['precision_at_1']:.3f} ({result.get('rows', DEMO_EVAL_ROWS)} captions, each against "
        "8 candidate images; chance 0.125)"
    )
    from service.__main__ import load_settings

    settings = load_settings([*argv, "--model", str(model_dir)])  # env and flags, as the server sees them
    index_started = time.monotonic()
    _say(f"indexing the held-out images into '{DEMO_COLLECTION}'")
    code = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from service.demo import index_main; index_main(sys.argv[1:])",
            str(model_dir),
            str(cache / "data"),
            str(settings.data_dir),
        ],
        env=_child_env(),
    ).returncode
    if code != 0:
        raise SystemExit(code)
    _say(f"indexing: done in {time.monotonic() - index_started:.0f} s; starting the server")
    url = base_url(settings.host, settings.port)
    announce_when_ready(url, settings.api_key is not None, started)
    os.execv(sys.executable, [*server, "--model", str(model_dir)])


if __name__ == "__main__":
    main()
