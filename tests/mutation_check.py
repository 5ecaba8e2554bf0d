"""Mutation check of the core: break one fidelity point at a time and see which tests fail.

    .venv/bin/python tests/mutation_check.py             # every mutant
    .venv/bin/python tests/mutation_check.py --only pool-naive-index,loss-no-stop-gradient
    .venv/bin/python tests/mutation_check.py --list      # the mutants and the tests each runs

Not part of ``make test`` (pytest collects ``test_*.py`` only). The working tree is copied
(tracked and untracked-but-not-ignored files, as ``git ls-files`` lists them) into a
temporary directory, the tests run there against the copy (never the shared tree), first
unmutated (they must pass), then once per mutant with that one edit applied. A mutant is
*caught* when at least one of its tests fails, *survived* when all pass. Prints a Markdown
table (mutant, change, catching tests) and exits 1 if a mutant survived, the baseline
failed, or a mutant's source line is no longer in the code (the edit is matched
exactly, so a refactor shows up here instead of silently mutating nothing).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

POOLING_TESTS = (
    "tests/model/test_embedder.py",
    "tests/model/test_fidelity.py",
    "tests/training/test_run.py::test_training_encode_pools_like_the_embedder",
)
PROMPT_TESTS = ("tests/model/test_prompts.py", "tests/training/test_data.py")
UNPAD_TESTS = ("tests/model/test_fidelity.py", "tests/model/test_embedder.py")
LOSS_TESTS = ("tests/training/test_loss.py", "tests/training/test_grad_cache.py")


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str  # must occur exactly once in ``path``
    new: str
    tests: tuple[str, ...]
    why: str


MUTANTS = (
    Mutant(
        "pool-naive-index",
        "model/embedder.py",
        "last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)",
        "last = mask.sum(dim=1) - 1",
        POOLING_TESTS,
        "last_token_pool: mask.sum() - 1 (a pad position under left padding)",
    ),
    Mutant(
        "pool-first-token",
        "model/embedder.py",
        "last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)",
        "last = mask.int().argmax(dim=1)",
        POOLING_TESTS,
        "last_token_pool: the first real token instead of the last",
    ),
    Mutant(
        "prompt-join-newline",
        "model/prompts.py",
        'message = f"{instruction} {content}"',
        'message = f"{instruction}\\n{content}"',
        PROMPT_TESTS,
        "build_message: instruction and content joined by a newline, not one space",
    ),
    Mutant(
        "prompt-instruction-last",
        "model/prompts.py",
        'message = f"{instruction} {content}"',
        'message = f"{content} {instruction}"',
        PROMPT_TESTS,
        "build_message: the instruction after the content",
    ),
    Mutant(
        "unpad-round-rows",
        "model/onevision.py",
        "new_h = int(orig_h * (cur_w / orig_w))",
        "new_h = int(round(orig_h * (cur_w / orig_w), 7))",
        UNPAD_TESTS,
        "_unpadded_grid: rows rounded as transformers does (wide images)",
    ),
    Mutant(
        "unpad-round-cols",
        "model/onevision.py",
        "new_w = int(orig_w * (cur_h / orig_h))",
        "new_w = int(round(orig_w * (cur_h / orig_h), 7))",
        UNPAD_TESTS,
        "_unpadded_grid: columns rounded as transformers does (tall images)",
    ),
    Mutant(
        "loss-no-stop-gradient",
        "training/loss.py",
        "log_weight = (alpha * sim.detach())",
        "log_weight = (alpha * sim)",
        LOSS_TESTS,
        "hardness weights alpha * s_ij without sg(): gradient flows through the weights",
    ),
)


def copy_tree(dst: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored) into ``dst``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():  # tracked but deleted in the working tree: skip
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run_tests(copy: Path, tests: tuple[str, ...], tag: str, workdir: Path) -> tuple[int, list[str], float]:
    """Run ``tests`` in ``copy``; return (pytest exit code, failing test ids, seconds)."""
    report = workdir / f"{tag}.xml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header",
        f"--basetemp={workdir / ('tmp-' + tag)}", f"--junitxml={report}", *tests,
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    (workdir / f"{tag}.log").write_text(proc.stdout + proc.stderr)
    failed = []
    if report.is_file():
        for case in ET.parse(report).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                module = case.get("classname", "").replace(".", "/")
                failed.append(f"{module}.py::{case.get('name')}")
    return proc.returncode, failed, elapsed


def check_imports_come_from(copy: Path) -> None:
    """The copy's packages, not the editable install of the shared tree, must be imported."""
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    code = "import model, training; print(model.__file__); print(training.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != 2 or not all(Path(p).is_relative_to(copy) for p in paths):
        raise SystemExit(f"the copy's packages are not the ones imported: {out.stdout}{out.stderr}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--keep", action="store_true", help="keep the temporary copy and the pytest logs")
    args = p.parse_args(argv)

    mutants = MUTANTS
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {m.name for m in MUTANTS}
        if unknown:
            p.error(f"unknown mutants: {', '.join(sorted(unknown))}")
        mutants = tuple(m for m in MUTANTS if m.name in names)
    if args.list:
        for m in mutants:
            print(f"{m.name}: {m.path}: {m.why}\n    tests: {' '.join(m.tests)}")
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="llave-mutants-"))
    copy = workdir / "repo"
    problems: list[str] = []
    rows: list[tuple[str, str, str, str]] = []
    try:
        copy_tree(copy)
        check_imports_come_from(copy)
        for m in mutants:  # every edit must still apply to the current code
            count = (copy / m.path).read_text().count(m.old)
            if count != 1:
                problems.append(f"{m.name}: {m.old!r} occurs {count} times in {m.path}")
        if problems:
            print("\n".join(problems), file=sys.stderr)
            return 1

        baseline_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        print(f"baseline: {' '.join(baseline_tests)}", file=sys.stderr, flush=True)
        code, failed, seconds = run_tests(copy, baseline_tests, "baseline", workdir)
        if code != 0:
            print(
                f"baseline failed (exit {code}): {failed}; log: {workdir / 'baseline.log'}", file=sys.stderr
            )
            args.keep = True
            return 1
        print(f"  passed in {seconds:.0f} s", file=sys.stderr, flush=True)

        for m in mutants:
            target = copy / m.path
            original = target.read_text()
            target.write_text(original.replace(m.old, m.new))
            try:
                print(f"{m.name}: {m.why}", file=sys.stderr, flush=True)
                code, failed, seconds = run_tests(copy, m.tests, m.name, workdir)
            finally:
                target.write_text(original)
            if code not in (0, 1):  # 1: tests failed; anything else: pytest itself broke
                problems.append(f"{m.name}: pytest exit {code}, see {workdir / (m.name + '.log')}")
                args.keep = True
            status = "caught" if failed else "SURVIVED"
            if not failed:
                problems.append(f"{m.name}: survived {' '.join(m.tests)}")
            print(f"  {status} ({len(failed)} failing, {seconds:.0f} s)", file=sys.stderr, flush=True)
            rows.append((m.name, f"`{m.path}`: {m.why}", status, "<br>".join(f"`{t}`" for t in failed)))
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    print("| mutant | change | result | failing tests |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for problem in problems:
        print(f"\nproblem: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
