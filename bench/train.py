"""Training benchmark: loss overhead, gradient-cache memory, and training throughput on CPU.

    python bench/train.py --quick      # smaller sizes (a smoke check)
    python bench/train.py              # the 0.5B-shaped parts take most of the time

Run times on the benchmark machine: the script table of bench/README.md.

Three parts, each in its own subprocess where memory or threads matter:

1. ``loss``: forward + backward time of ``hardness_weighted_loss`` with alpha 9 against
   alpha 0 (plain InfoNCE) on random embeddings of dim 896, at several batch sizes,
   interleaved and repeated (median, spread); compared with one model step, to show
   whether the weighting's overhead matters.
2. ``memory``: peak memory of one training step at a large contrastive batch, with and
   without gradient caching (``training.grad_cache.grad_cache_step``, model-agnostic).
   Each configuration runs in a fresh subprocess; peak = VmHWM after the step minus RSS
   before it (model and optimizer state already allocated; the kernel's peak counter is
   reset just before the step). Models: ``demo`` (text -> image pairs) and a ``llave-0.5b``-shaped
   model (text -> text pairs, vision tower frozen as in the paper).
3. ``throughput``: pairs/s of full training steps (forward, loss, backward, AdamW) for
   the ``tiny`` and the 0.5B-shaped model (a few steps after one warm-up step).

Results: tables on stdout and ``bench/results/train[-quick].json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import log  # noqa: E402

# --------------------------------------------------------------------------- part 1: loss


def bench_loss(
    batch_sizes: list[int], repeats: int, dim: int = 896, min_s: float = 0.3
) -> list[dict[str, Any]]:
    import torch

    from training.loss import hardness_weighted_loss

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for n in batch_sizes:
        q0 = torch.randn(n, dim)
        t0 = q0 + 0.5 * torch.randn(n, dim)
        times: dict[float, list[float]] = {0.0: [], 9.0: []}

        def once(alpha: float, q0: Any = q0, t0: Any = t0) -> float:
            q = q0.clone().requires_grad_()
            t = t0.clone().requires_grad_()
            started = time.perf_counter()
            loss = hardness_weighted_loss(q, t, alpha=alpha)
            loss.backward()
            return time.perf_counter() - started

        for alpha in times:  # warm
            once(alpha)
        for rep in range(repeats):
            for alpha in (0.0, 9.0) if rep % 2 == 0 else (9.0, 0.0):  # interleaved
                calls, started = [], time.perf_counter()
                while time.perf_counter() - started < min_s or len(calls) < 3:
                    calls.append(once(alpha))
                times[alpha].append(statistics.median(calls))
        ratios = [a / b for a, b in zip(times[9.0], times[0.0], strict=True)]
        rows.append(
            {
                "batch": n,
                "infonce_ms": statistics.median(times[0.0]) * 1000,
                "hardness_ms": statistics.median(times[9.0]) * 1000,
                "ratio": statistics.median(ratios),
                "ratio_spread": common.spread(ratios)["rel_range"],
            }
        )
        log(f"loss n={n}: InfoNCE {rows[-1]['infonce_ms']:.2f} ms, alpha 9 {rows[-1]['hardness_ms']:.2f} ms")
    return rows


# --------------------------------------------------------------------------- model steps (subprocess)


def _pairs(emb: Any, kind: str, n: int, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """``n`` prepared (query, target) pairs: text -> image (``t2i``) or text -> text."""
    texts = common.make_texts(Path(emb.name), 2 * n, tokens=24, seed=seed)
    queries = [emb.preprocess({"text": t}) for t in texts[:n]]
    if kind == "t2i":
        crop = emb.preprocessor.crop
        images = common.make_images(n, size=(crop, crop), seed=seed)
        targets = [emb.preprocess({"image": im}) for im in images]
    else:
        targets = [emb.preprocess({"text": t}) for t in texts[n:]]
    return queries, targets


def step_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process: load, build a batch, run steps, report time and memory."""
    import torch

    from model import load_embedder
    from training.grad_cache import grad_cache_step
    from training.loss import hardness_weighted_loss

    torch.manual_seed(0)
    emb = load_embedder(cfg["checkpoint"], device="cpu", dtype="float32")
    model = emb.model
    model.train()
    for name, p in model.named_parameters():  # the paper: vision tower frozen
        p.requires_grad_(not name.startswith("vision_tower"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    queries, targets = _pairs(emb, cfg["pairs"], cfg["batch"])
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["bf16"] else _null()

    def encode(chunk: list[Any]) -> Any:
        with autocast:
            return emb.encode(emb.collate(chunk, device="cpu"))

    def loss_fn(q: Any, t: Any) -> Any:
        return hardness_weighted_loss(q, t, alpha=cfg["alpha"])

    chunk = cfg["chunk"]

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        if chunk:
            qc = [queries[i : i + chunk] for i in range(0, len(queries), chunk)]
            tc = [targets[i : i + chunk] for i in range(0, len(targets), chunk)]
            loss = grad_cache_step(encode, qc, tc, loss_fn)
        else:
            loss = loss_fn(encode(queries), encode(targets))
            loss.backward()
        opt.step()
        return float(loss)

    # AdamW's state exists before the measured step, so its memory is in the baseline.
    if cfg["warmup_steps"]:
        for _ in range(cfg["warmup_steps"]):
            step()
    else:  # allocate the optimizer state without a full step: a zero-gradient update
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    import gc

    gc.collect()
    base_rss = common.rss_bytes()
    _reset_peak()
    times = []
    for _ in range(cfg["steps"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    peak = common.peak_rss_bytes()
    out = {
        **cfg,
        "step_s": statistics.median(times),
        "pairs_per_s": cfg["batch"] / statistics.median(times),
        "rss_before_step_gb": base_rss / 1e9,
        "peak_rss_gb": peak / 1e9,
        "step_peak_extra_gb": (peak - base_rss) / 1e9,
        "trainable_params_m": sum(p.numel() for p in params) / 1e6,
        "tokens_per_query": statistics.mean(p.cost for p in queries),
        "tokens_per_target": statistics.mean(p.cost for p in targets),
        "torch_threads": torch.get_num_threads(),
    }
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def quiet(max_wait: float) -> None:
    if max_wait > 0:
        started = time.perf_counter()
        cores = common.wait_for_quiet(max_wait=max_wait)
        if time.perf_counter() - started > 2:
            log(f"waited {time.perf_counter() - started:.0f} s for quiet (others now use {cores:.2f} cores)")


def run_worker(cfg: dict[str, Any], max_wait: float = 0.0) -> dict[str, Any]:
    quiet(max_wait)
    foreign = common.ForeignLoad()
    cmd = [common.PYTHON, __file__, "--_worker", json.dumps(cfg)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=common.offline_env(), cwd=common.REPO)
    if out.returncode != 0:
        raise RuntimeError(f"worker {cfg} failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["foreign_cpu_cores"] = foreign.cores()  # the worker's own CPU counts as foreign here: ~1-2
    return row


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "benchmark": "train",
        "command": "python bench/train.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    ckpt = {p: str(common.ensure_checkpoint(p, args.cache_dir)) for p in ("tiny", "demo", "llave-0.5b")}
    parts = set(args.parts.split(","))

    if "loss" in parts:
        log("part 1: loss overhead")
        quiet(args.quiet_wait)
        result["loss"] = bench_loss([int(x) for x in args.loss_batches.split(",")], args.repeats)

    if "memory" in parts:
        log("part 2: peak memory with and without gradient caching")
        rows = []
        for preset, pairs, batch, chunk, bf16 in args.memory_configs:
            for use_cache in (False, True):
                cfg = {
                    "model": preset,
                    "checkpoint": ckpt[preset],
                    "pairs": pairs,
                    "batch": batch,
                    "chunk": chunk if use_cache else 0,
                    "bf16": bf16,
                    "alpha": 9.0,
                    "steps": 1,
                    "warmup_steps": 0,
                }
                row = run_worker(cfg, args.quiet_wait)
                rows.append(row)
                log(f"  {preset} batch {batch} chunk {row['chunk']}: +{row['step_peak_extra_gb']:.2f} GB peak, "
                    f"{row['step_s']:.1f} s/step")  # fmt: skip
        result["memory"] = rows

    if "throughput" in parts:
        log("part 3: training throughput")
        rows = []
        for preset, pairs, batch, bf16, steps in args.throughput_configs:
            cfg = {
                "model": preset,
                "checkpoint": ckpt[preset],
                "pairs": pairs,
                "batch": batch,
                "chunk": 0,
                "bf16": bf16,
                "alpha": 9.0,
                "steps": steps,
                "warmup_steps": 1,
            }
            row = run_worker(cfg, args.quiet_wait)
            rows.append(row)
            log(f"  {preset} batch {batch}: {row['pairs_per_s']:.1f} pairs/s ({row['step_s']:.2f} s/step)")
        result["throughput"] = rows
    result["machine"] = common.machine_info()
    return result


def report(result: dict[str, Any]) -> str:
    out = []
    if "loss" in result:
        out.append(
            common.table(
                result["loss"],
                ["batch", "infonce_ms", "hardness_ms", "ratio", "ratio_spread"],
                title="Loss forward+backward, dim 896 (alpha 9 vs alpha 0; medians of interleaved repeats)",
            )
        )
    cols = ["model", "pairs", "batch", "chunk", "bf16", "tokens_per_query", "tokens_per_target", "step_s",
            "pairs_per_s", "rss_before_step_gb", "step_peak_extra_gb", "peak_rss_gb"]  # fmt: skip
    if "memory" in result:
        out.append(
            common.table(
                result["memory"], cols, title="Peak memory of one training step (chunk 0 = no gradient cache)"
            )
        )
    if "throughput" in result:
        out.append(common.table(result["throughput"], cols, title="Training throughput (full steps, AdamW)"))
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="loss,memory,throughput")
    p.add_argument("--loss-batches", default="64,256,1024,4096")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE)
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="wait up to this long for other processes to calm down before each timing (0: never)",
    )
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tag", default="")
    p.add_argument("--_worker", dest="worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # (preset, pairs, batch, grad-cache chunk, bf16 autocast)
    args.memory_configs = [("demo", "t2i", 512, 32, False), ("llave-0.5b", "text", 32, 4, True)]
    # (preset, pairs, batch, bf16 autocast, measured steps)
    args.throughput_configs = [("tiny", "t2i", 64, False, 5), ("llave-0.5b", "text", 16, True, 2)]
    if args.quick:
        args.loss_batches = "64,1024" if "--loss-batches" not in (argv or sys.argv) else args.loss_batches
        args.repeats = 3
        args.quiet_wait = 0.0 if "--quiet-wait" not in (argv or sys.argv) else args.quiet_wait
        args.memory_configs = [("demo", "t2i", 256, 32, False)]
        args.throughput_configs = [("tiny", "t2i", 64, False, 3), ("llave-0.5b", "text", 4, True, 1)]
    args.out_name = (
        "train" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick and not args.tag else "")
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(step_worker(json.loads(args.worker))))
        return
    result = run(args)
    common.write_results(args.out_name, result)
    print(report(result))


if __name__ == "__main__":
    main()
