"""Ablations on the demo model: the hardness-weighted loss (alpha 9) against InfoNCE
(alpha 0), and (``--mining``) a second round with mined hard negatives.

    python bench/ablation.py --quick          # 1 seed, 60 steps
    python bench/ablation.py                  # 3 seeds x 2 alphas x 600 steps
    python bench/ablation.py --mining         # 3 seeds: round 1, then round 2 with / without mined negatives

Mining (``--mining``; alpha 9 throughout): round 1 trains ``--steps`` steps with in-batch
negatives only; ``python -m training.mine`` with the round-1 model fills each training
row's ``neg_*`` with its ``--mine-top-k`` nearest targets (positive and candidates above
``--mine-margin`` x the positive's score dropped); round 2 continues from the round-1
model for ``--steps`` more steps with ``--hard-negatives K``, and a control round 2 runs
the same steps with in-batch negatives only (so the comparison is at equal steps). All
three are evaluated on the held-out split.

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
    base: Path, data: Path, out: Path, alpha: float, seed: int, args: argparse.Namespace,
    train_file: Path | None = None, extra: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    cmd = [
        common.PYTHON, str(common.REPO / "training" / "run.py"),
        "--model", str(base), "--train-data", str(train_file or data / "train.jsonl"), "--image-root", str(data),
        "--output-dir", str(out), "--max-steps", str(args.steps), "--per-device-batch-size", str(args.batch),
        "--learning-rate", str(args.lr), "--warmup-steps", "30", "--max-grad-norm", "1.0",
        "--alpha", str(alpha), "--logit-scale", "50", "--no-freeze-vision-tower",
        "--precision", "fp32", "--no-gradient-checkpointing", "--device", "cpu",
        "--seed", str(seed), "--logging-steps", "50", "--no-progress",
        *(["--mask-duplicates"] if args.mask_duplicates else []), *extra,
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


def run_mining(args: argparse.Namespace) -> dict[str, Any]:
    data = prepare_data(args)
    runs_dir = args.cache_dir / "ablation-mining-runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "ablation-mining",
        "command": "python bench/ablation.py " + " ".join(sys.argv[1:]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": [],
        "mining": {},
    }
    tag = f"steps{args.steps}-lr{args.lr:g}"
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = common.ensure_checkpoint("demo", args.cache_dir, seed=seed)
        round1 = runs_dir / f"seed{seed}-round1-{tag}"
        log(f"seed {seed}: round 1 ({args.steps} steps, in-batch negatives) ...")
        row = train_and_eval(base, data, round1, 9.0, seed, args)
        result["runs"].append({**row, "round": "1 in-batch"})
        log(f"  P@1 {row['precision_at_1']:.3f}")
        mined = runs_dir / f"seed{seed}-mined-{tag}-k{args.mine_top_k}-m{args.mine_margin:g}.jsonl"
        started = time.perf_counter()
        sh([common.PYTHON, "-m", "training.mine", "--model", str(round1), "--train-data", str(data / "train.jsonl"),
            "--image-root", str(data), "--out", str(mined), "--top-k", str(args.mine_top_k),
            "--margin", str(args.mine_margin), "--device", "cpu", "--batch-size", "64"],
           runs_dir / f"{mined.name}.log", threads=args.threads)  # fmt: skip
        stats = json.loads(mined.with_suffix(".stats.json").read_text())
        result["mining"][str(seed)] = {**{k: v for k, v in stats.items() if k != "skipped"},
                                       "mine_s": time.perf_counter() - started}  # fmt: skip
        log(f"  mined {stats['negatives_per_row']:.2f} negatives per row")
        # Round 2 (and its control) continue from round 1's weights, with a fresh schedule.
        for name, train_file, extra in (
            ("2 in-batch (control)", None, ()),
            ("2 mined", mined, ("--hard-negatives", str(args.mine_top_k))),
        ):
            out = runs_dir / f"seed{seed}-round{name.split()[0]}-{name.split()[1]}-{tag}"
            log(f"seed {seed}: round {name} ...")
            row = train_and_eval(round1, data, out, 9.0, seed, args, train_file=train_file, extra=extra)
            result["runs"].append({**row, "round": name})
            log(f"  P@1 {row['precision_at_1']:.3f}")
            common.write_results(args.out_name, result)
    by_round: dict[str, list[float]] = {}
    for r in result["runs"]:
        by_round.setdefault(r["round"], []).append(r["precision_at_1"])
    by_seed: dict[int, dict[str, float]] = {}
    for r in result["runs"]:
        by_seed.setdefault(r["seed"], {})[r["round"]] = r["precision_at_1"]
    diff = lambda a, b: [v[a] - v[b] for v in by_seed.values() if a in v and b in v]  # noqa: E731
    result["summary"] = {
        "rounds": {
            k: {
                "mean": statistics.mean(v),
                "std": statistics.stdev(v) if len(v) > 1 else float("nan"),
                "n": len(v),
            }
            for k, v in by_round.items()
        },
        "mined_minus_round1": diff("2 mined", "1 in-batch"),
        "mined_minus_control": diff("2 mined", "2 in-batch (control)"),
    }
    result["machine"] = common.machine_info()
    return result


def report_mining(result: dict[str, Any]) -> str:
    rows = [
        {"seed": r["seed"], "round": r["round"], "P@1": r["precision_at_1"], "final_loss": r["final_loss"],
         "train_s": r["train_s"]}
        for r in sorted(result["runs"], key=lambda r: (r["seed"], r["round"]))
    ]  # fmt: skip
    s = result["summary"]
    summ = [
        {"round": k, "mean_P@1": v["mean"], "std": v["std"], "seeds": v["n"]} for k, v in s["rounds"].items()
    ]
    fmt = lambda xs: ", ".join(f"{x:+.3f}" for x in xs)  # noqa: E731
    return "\n".join(
        [
            common.table(rows, ["seed", "round", "P@1", "final_loss", "train_s"], title="Runs"),
            common.table(
                summ, ["round", "mean_P@1", "std", "seeds"], title="Precision@1, held-out synthetic eval"
            ),
            f"\nround 2 mined - round 1 per seed: {fmt(s['mined_minus_round1'])}",
            f"round 2 mined - round 2 in-batch (equal steps) per seed: {fmt(s['mined_minus_control'])}",
        ]
    )


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
    p.add_argument("--mining", action="store_true", help="round 1 vs round 2 with mined hard negatives")
    p.add_argument("--mine-top-k", type=int, default=2, help="mined negatives per row (--hard-negatives)")
    p.add_argument("--mine-margin", type=float, default=0.95, help="training.mine --margin")
    args = p.parse_args(argv)
    if args.quick:
        explicit = set(sys.argv[1:] if argv is None else argv)
        if "--seeds" not in explicit:
            args.seeds = "0"
        if "--steps" not in explicit:
            args.steps = 60
    args.out_name = (
        "ablation"
        + ("-mining" if args.mining else "")
        + (f"-{args.tag}" if args.tag else "")
        + ("-quick" if args.quick and not args.tag else "")
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_mining(args) if args.mining else run(args)
    common.write_results(args.out_name, result)
    print(report_mining(result) if args.mining else report(result))


if __name__ == "__main__":
    main()
