"""Ablation: hardness-weighted loss (alpha 9) against InfoNCE (alpha 0) on the demo model.

    python bench/ablation.py --quick          # 1 seed, 60 steps
    python bench/ablation.py                  # 3 seeds x 2 alphas x 600 steps

Run times on the benchmark machine: the script table of bench/README.md.

For each seed s: the ``demo``-preset random checkpoint built with ``--seed s``, trained by
``training/run.py`` with the demo recipe of ``service/demo.py`` (batch 64, AdamW lr 5e-4,
30 warmup steps then cosine, clipping 1.0, logit scale 50, fp32, vision tower trained,
identical targets masked out of the negatives, one intra-op thread) and ``--seed s``, once with ``--alpha 0`` and once with
``--alpha 9``, same steps; then ``python -m training.evaluate`` on the held-out synthetic
eval split, whose candidates are the positive, hard negatives that differ from it in
exactly one attribute, and random distractors. Reports Precision@1 per alpha (mean, std,
range) and the paired difference per seed.

Results: a table on stdout and ``bench/results/ablation[-quick].json``.
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


def sh(cmd: list[str], log_path: Path | None = None, threads: int = 0) -> str:
    env = common.offline_env(**({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    out = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True)
    if log_path is not None:
        log_path.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def prepare_data(args: argparse.Namespace) -> Path:
    data = args.cache_dir / f"synthetic-n{args.n}-seed{args.data_seed}-{args.tasks.replace(',', '+')}"
    if not (data / ".complete").exists():
        log(f"writing the synthetic dataset to {data}")
        sh([common.PYTHON, "-m", "training.synthetic", str(data), "--n", str(args.n), "--seed", str(args.data_seed),
            "--tasks", args.tasks, "--eval-n", str(args.eval_n)])  # fmt: skip
        (data / ".complete").write_text("ok\n")
    return data


def train_and_eval(
    base: Path, data: Path, out: Path, alpha: float, seed: int, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [
        common.PYTHON, str(common.REPO / "training" / "run.py"),
        "--model", str(base), "--train-data", str(data / "train.jsonl"), "--image-root", str(data),
        "--output-dir", str(out), "--max-steps", str(args.steps), "--per-device-batch-size", str(args.batch),
        "--learning-rate", str(args.lr), "--warmup-steps", "30", "--max-grad-norm", "1.0",
        "--alpha", str(alpha), "--logit-scale", "50", "--no-freeze-vision-tower",
        "--precision", "fp32", "--no-gradient-checkpointing", "--device", "cpu",
        "--seed", str(seed), "--logging-steps", "50", "--no-progress",
        *(["--mask-duplicates"] if args.mask_duplicates else []),
    ]  # fmt: skip
    started = time.perf_counter()
    sh(cmd, out.parent / f"{out.name}.train.log", threads=args.threads)
    train_s = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    stdout = sh(
        [
            common.PYTHON,
            "-m",
            "training.evaluate",
            "--model",
            str(out),
            "--data",
            str(data / "eval.jsonl"),
            "--image-root",
            str(data),
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ]  # fmt: skip
    )
    ev = json.loads(stdout.strip().splitlines()[-1])
    return {
        "alpha": alpha,
        "seed": seed,
        "steps": args.steps,
        "precision_at_1": ev["precision_at_1"],
        "datasets": {k: v["precision_at_1"] for k, v in ev.get("datasets", {}).items()},
        "final_loss": metrics[-1]["loss"] if metrics else float("nan"),
        "train_s": train_s,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = prepare_data(args)
    runs_dir = args.cache_dir / "ablation-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "ablation",
        "command": "python bench/ablation.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [],
    }
    seeds = [int(s) for s in args.seeds.split(",")]
    for i, seed in enumerate(seeds):
        base = common.ensure_checkpoint("demo", args.cache_dir, seed=seed)
        for alpha in (0.0, 9.0) if i % 2 == 0 else (9.0, 0.0):
            out = runs_dir / f"demo-seed{seed}-alpha{alpha:g}-steps{args.steps}-lr{args.lr:g}"
            log(f"seed {seed}, alpha {alpha:g}: training {args.steps} steps ...")
            row = train_and_eval(base, data, out, alpha, seed, args)
            result["runs"].append(row)
            log(
                f"  P@1 {row['precision_at_1']:.3f} (final loss {row['final_loss']:.3f}, {row['train_s']:.0f} s)"
            )
            common.write_results(args.out_name, result)
    result["summary"] = summarise(result["runs"])
    result["machine"] = common.machine_info()
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for alpha in (0.0, 9.0):
        p = [r["precision_at_1"] for r in runs if r["alpha"] == alpha]
        out[f"alpha{alpha:g}"] = {
            "mean": statistics.mean(p) if p else float("nan"),
            "std": statistics.stdev(p) if len(p) > 1 else float("nan"),
            "min": min(p, default=float("nan")),
            "max": max(p, default=float("nan")),
            "n": len(p),
        }
    by_seed = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["alpha"]] = r["precision_at_1"]
    diffs = [v[9.0] - v[0.0] for v in by_seed.values() if 0.0 in v and 9.0 in v]
    out["paired_diff_alpha9_minus_alpha0"] = {
        "per_seed": diffs,
        "mean": statistics.mean(diffs) if diffs else float("nan"),
        "std": statistics.stdev(diffs) if len(diffs) > 1 else float("nan"),
        "wins_alpha9": sum(d > 0 for d in diffs),
    }
    return out


def report(result: dict[str, Any]) -> str:
    rows = [
        {
            "seed": r["seed"],
            "alpha": r["alpha"],
            "steps": r["steps"],
            "P@1": r["precision_at_1"],
            "final_loss": r["final_loss"],
            "train_s": r["train_s"],
        }  # fmt: skip
        for r in sorted(result["runs"], key=lambda r: (r["seed"], r["alpha"]))
    ]
    s = result["summary"]
    summ = [
        {
            "alpha": a,
            "mean_P@1": s[f"alpha{a}"]["mean"],
            "std": s[f"alpha{a}"]["std"],
            "min": s[f"alpha{a}"]["min"],
            "max": s[f"alpha{a}"]["max"],
            "seeds": s[f"alpha{a}"]["n"],
        }  # fmt: skip
        for a in ("0", "9")
    ]
    d = s["paired_diff_alpha9_minus_alpha0"]
    return "\n".join(
        [
            common.table(rows, ["seed", "alpha", "steps", "P@1", "final_loss", "train_s"], title="Runs"),
            common.table(
                summ,
                ["alpha", "mean_P@1", "std", "min", "max", "seeds"],
                title="Precision@1 on the held-out synthetic eval",
            ),
            f"\npaired difference (alpha 9 - alpha 0) per seed: {', '.join(f'{x:+.3f}' for x in d['per_seed'])}; "
            f"mean {d['mean']:+.3f}; alpha 9 better in {d['wins_alpha9']} of {len(d['per_seed'])} seeds",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4, help="the demo recipe's (2e-3 collapses, see README)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for training (the demo's 1; 0: torch's default)",
    )
    p.add_argument("--n", type=int, default=6000, help="synthetic train rows")
    p.add_argument("--eval-n", type=int, default=200, help="synthetic eval rows")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--tasks", default="t2i", help="synthetic tasks (t2i,i2t,t2i_detailed,vqa)")
    p.add_argument("--mask-duplicates", action=argparse.BooleanOptionalAction, default=True,
                   help="identical targets are not negatives (the demo recipe; off = the paper's loss as is)")  # fmt: skip
    p.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE)
    p.add_argument("--quick", action="store_true", help="1 seed, 60 steps (a smoke run: P@1 is still low)")
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.quick:
        explicit = set(sys.argv[1:] if argv is None else argv)
        if "--seeds" not in explicit:
            args.seeds = "0"
        if "--steps" not in explicit:
            args.steps = 60
    args.out_name = (
        "ablation" + (f"-{args.tag}" if args.tag else "") + ("-quick" if args.quick and not args.tag else "")
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    common.write_results(args.out_name, result)
    print(report(result))


if __name__ == "__main__":
    main()
