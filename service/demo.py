"""The offline default behind ``make serve``: a demo model, a demo collection, a server.

    python -m service.demo [server flags...]

With a model configured (``LLAVE_MODEL`` or ``--model``) this simply runs the server on it.
Without one it prepares, once, under ``LLAVE_DEMO_DIR`` (default ``./.cache/demo``):

1. a random ``demo``-preset checkpoint (``python -m model.tiny``),
2. the synthetic shapes dataset (``python -m training.synthetic``),
3. a demo model fine-tuned from 1 with the hardness-weighted loss (``training/run.py``),
4. its Precision@1 on the held-out synthetic eval split (``python -m training.evaluate``),

then upserts the eval images into the ``demo`` collection of the data directory
(resumable: a second start finds them stored), checks that "a red circle" finds red
circles, prints ready-to-paste ``curl`` examples and becomes the server (``exec``).
Training runs as its own process through the trainer's CLI, so the service never imports
``training/``. Every ``LLAVE_`` setting from the environment is honoured.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

DEMO_STEPS = int(os.environ.get("LLAVE_DEMO_STEPS", "600"))
DEMO_COLLECTION = "demo"
# The demo model is trained on the synthetic "t2i" task: a bare caption ("a red circle")
# as the query and a bare image as the target, so the demo queries and documents carry no
# instruction. (MMEB-style instructions work the same way with models trained on them.)
ATTRIBUTES = ("colour", "shape", "size", "position")


def _run(step: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
    print(f"[demo] {step}: {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env)


def _training_env() -> dict[str, str]:
    """One intra-op thread unless the user chose otherwise: the demo model is so small
    that more threads gain little on an idle machine, while on a busy one (anything else
    running on the same cores) spinning OpenMP threads make every step much slower
    (measured: bench/README.md, "Demo training threads")."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def prepare_model(cache: Path) -> Path:
    """Build, train and evaluate the demo model once; later calls reuse it."""
    model_dir, data_dir, base = cache / "model", cache / "data", cache / "base"
    done = cache / "model.done.json"
    if done.is_file() and (model_dir / "config.json").is_file():
        return model_dir
    py = sys.executable
    cache.mkdir(parents=True, exist_ok=True)
    _run("base checkpoint", [py, "-m", "model.tiny", str(base), "--preset", "demo", "--seed", "0"])
    _run(
        "synthetic data",
        [
            py,
            "-m",
            "training.synthetic",
            str(data_dir),
            "--n",
            "6000",
            "--seed",
            "0",
            "--tasks",
            "t2i",
            "--eval-n",
            "200",
        ],
    )
    repo = Path(__file__).resolve().parents[1]
    _run(
        "training",
        [
            py,
            str(repo / "training" / "run.py"),
            "--model",
            str(base),
            "--train-data",
            str(data_dir / "train.jsonl"),
            "--image-root",
            str(data_dir),
            "--output-dir",
            str(model_dir),
            "--max-steps",
            str(DEMO_STEPS),
            "--per-device-batch-size",
            "64",
            "--learning-rate",
            "5e-4",
            "--warmup-steps",
            "30",
            "--max-grad-norm",
            "1.0",
            "--alpha",
            "9",
            "--logit-scale",
            "50",
            "--no-freeze-vision-tower",
            "--mask-duplicates",
            "--precision",
            "fp32",
            "--no-gradient-checkpointing",
            "--device",
            "cpu",
            "--seed",
            "0",
            "--logging-steps",
            "50",
        ],
        env=_training_env(),
    )
    print("[demo] evaluating on the held-out synthetic split", flush=True)
    out = subprocess.run(
        [
            py,
            "-m",
            "training.evaluate",
            "--model",
            str(model_dir),
            "--data",
            str(data_dir / "eval.jsonl"),
            "--image-root",
            str(data_dir),
            "--device",
            "cpu",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    print(out.stdout, end="", flush=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    done.write_text(json.dumps({"precision_at_1": result["precision_at_1"], "steps": DEMO_STEPS}))
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
    from service.storage.store import CollectionStore

    docs = _eval_images(data_dir)
    embedder = load_embedder(model_dir, device="cpu", dtype="float32")
    store = CollectionStore(store_dir)
    store.open()
    try:
        missing = [
            d for d in docs if d["id"] not in store.existing_ids(DEMO_COLLECTION, [d["id"] for d in docs])
        ]
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            vecs = embedder.embed([{"image": d["image"].read_bytes()} for d in chunk])
            store.upsert(DEMO_COLLECTION, [d["id"] for d in chunk], vecs, [d["metadata"] for d in chunk])
        print(
            f"[demo] collection '{DEMO_COLLECTION}': {store.describe(DEMO_COLLECTION)['count']} images "
            f"({len(missing)} added now) in {store_dir}",
            flush=True,
        )
        query = embedder.embed([{"text": "a red circle"}])[0]
        return store.search(DEMO_COLLECTION, query, k=5)
    finally:
        store.close()


def print_examples(host: str, port: int, api_key: bool) -> None:
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    auth = ' -H "Authorization: Bearer $LLAVE_API_KEY"' if api_key else ""
    search = {"collection": DEMO_COLLECTION, "query": {"text": "a red circle"}, "k": 5}
    print(
        f"""
[demo] serving on {url}   (docs: {url}/docs)

  curl -s {url}/embed{auth} -H 'content-type: application/json' \\
       -d '{{"inputs": [{{"text": "a red circle"}}, {{"text": "a blue star"}}]}}'

  curl -s {url}/search{auth} -H 'content-type: application/json' \\
       -d '{json.dumps(search)}'

  curl -s {url}/search{auth} -H 'content-type: application/json' \\
       -d '{json.dumps({**search, "filter": {"shape": ["star", "square"]}})}'
""",
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    server = [sys.executable, "-m", "service", *argv]
    if "--model" in argv or any(a.startswith("--model=") for a in argv) or os.environ.get("LLAVE_MODEL"):
        os.execv(sys.executable, server)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cache = Path(os.environ.get("LLAVE_DEMO_DIR", ".cache/demo")).resolve()
    model_dir = prepare_model(cache)
    score = json.loads((cache / "model.done.json").read_text())["precision_at_1"]
    print(
        f"[demo] demo model {model_dir}: Precision@1 on the held-out synthetic eval = {score:.3f}", flush=True
    )
    from service.__main__ import load_settings

    settings = load_settings([*argv, "--model", str(model_dir)])  # env and flags, as the server sees them
    store_dir = settings.data_dir
    try:
        hits = index_demo_collection(model_dir, cache / "data", store_dir)
    except Exception as exc:  # e.g. a server already holds this data directory
        raise SystemExit(f"[demo] cannot prepare the demo collection in {store_dir}: {exc}") from exc
    print(
        "[demo] 'a red circle' ->",
        ", ".join(
            f"{h['metadata'].get('colour')} {h['metadata'].get('shape')} ({h['score']:.2f})" for h in hits
        ),
        flush=True,
    )
    print_examples(settings.host, settings.port, settings.api_key is not None)
    os.execv(sys.executable, [*server, "--model", str(model_dir)])


if __name__ == "__main__":
    main()
