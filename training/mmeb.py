"""MMEB, the Massive Multimodal Embedding Benchmark: its datasets, meta-tasks and IND/OOD
split, a report in the LLaVE paper's layout, and comparisons with the published numbers.

The definition below is the benchmark's own (Jiang et al., "VLM2Vec: Training
Vision-Language Models for Massive Multimodal Embedding Tasks", arXiv:2410.05160; MMEB's
authors' code is https://github.com/TIGER-AI-Lab/VLM2Vec):

- the 36 dataset names and their meta-tasks: VLM2Vec ``experiments/report_score.py`` (the
  ``datasets`` list, in meta-task order: 10 classification, 10 VQA, 12 retrieval, 4 visual
  grounding) and ``experiments/public/eval/image.yaml`` (the same names under ``# CLS``,
  ``# QA``, ``# RET``, ``# VG``);
- in-distribution (IND) = the 20 datasets MMEB-train holds, ``experiments/public/train/
  train_image.yaml`` (there ``ImageNet_1K``), the same 20 subsets the LLaVE README trains on;
  the other 16 are out-of-distribution (OOD), "reserved for evaluation" (the MMEB paper and
  its leaderboard: "20 in-distribution datasets, which can be used for training, and 16
  out-of-distribution datasets").

Scores are Precision@1 as fractions (0..1) in the JSON results; the tables and the paper's
numbers (``mmeb_paper.json``) use percent, as the papers do. Every average is a plain mean
over the datasets it covers: a meta-task over its datasets, IND over 20, OOD over 16, and
the overall score over all 36 datasets (not the mean of the meta-task scores). A dataset
name outside the 36 is reported apart and never enters a meta-task or the MMEB overall.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from importlib import resources
from typing import Any

META_TASKS: dict[str, str] = {
    "classification": "Classification",
    "vqa": "VQA",
    "retrieval": "Retrieval",
    "grounding": "Grounding",
}
SPLITS = ("IND", "OOD")
# Columns of the paper's table (LLaVE, arXiv:2503.04812, Table 2), in its order.
SUMMARY_KEYS = (*META_TASKS, *SPLITS, "overall")
SUMMARY_LABELS = {**META_TASKS, "IND": "IND", "OOD": "OOD", "overall": "Overall"}

_CLS, _VQA, _RET, _VG = META_TASKS
# name -> (meta-task, split), in VLM2Vec's report order (see the module docstring).
DATASETS: dict[str, tuple[str, str]] = {
    # classification: 5 IND + 5 OOD
    "ImageNet-1K": (_CLS, "IND"),
    "N24News": (_CLS, "IND"),
    "HatefulMemes": (_CLS, "IND"),
    "VOC2007": (_CLS, "IND"),
    "SUN397": (_CLS, "IND"),
    "Place365": (_CLS, "OOD"),
    "ImageNet-A": (_CLS, "OOD"),
    "ImageNet-R": (_CLS, "OOD"),
    "ObjectNet": (_CLS, "OOD"),
    "Country211": (_CLS, "OOD"),
    # VQA: 6 IND + 4 OOD
    "OK-VQA": (_VQA, "IND"),
    "A-OKVQA": (_VQA, "IND"),
    "DocVQA": (_VQA, "IND"),
    "InfographicsVQA": (_VQA, "IND"),
    "ChartQA": (_VQA, "IND"),
    "Visual7W": (_VQA, "IND"),
    "ScienceQA": (_VQA, "OOD"),
    "VizWiz": (_VQA, "OOD"),
    "GQA": (_VQA, "OOD"),
    "TextVQA": (_VQA, "OOD"),
    # retrieval: 8 IND + 4 OOD
    "VisDial": (_RET, "IND"),
    "CIRR": (_RET, "IND"),
    "VisualNews_t2i": (_RET, "IND"),
    "VisualNews_i2t": (_RET, "IND"),
    "MSCOCO_t2i": (_RET, "IND"),
    "MSCOCO_i2t": (_RET, "IND"),
    "NIGHTS": (_RET, "IND"),
    "WebQA": (_RET, "IND"),
    "FashionIQ": (_RET, "OOD"),
    "Wiki-SS-NQ": (_RET, "OOD"),
    "OVEN": (_RET, "OOD"),
    "EDIS": (_RET, "OOD"),
    # visual grounding: 1 IND + 3 OOD
    "MSCOCO": (_VG, "IND"),
    "RefCOCO": (_VG, "OOD"),
    "RefCOCO-Matching": (_VG, "OOD"),
    "Visual7W-Pointing": (_VG, "OOD"),
}


def _fold(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


_BY_FOLDED = {_fold(name): name for name in DATASETS}
assert len(_BY_FOLDED) == len(DATASETS)  # folding keeps the 36 names apart


def canonical_name(name: str) -> str | None:
    """The MMEB name of ``name``, ignoring case, ``-`` and ``_`` (MMEB-train spells
    ``ImageNet_1K``); None for a dataset that is not one of the 36."""
    if name in DATASETS:
        return name
    return _BY_FOLDED.get(_fold(name))


def group_members(key: str) -> list[str]:
    """The MMEB datasets behind a summary key (a meta-task, IND, OOD or overall)."""
    if key == "overall":
        return list(DATASETS)
    if key in SPLITS:
        return [n for n, (_, split) in DATASETS.items() if split == key]
    if key in META_TASKS:
        return [n for n, (task, _) in DATASETS.items() if task == key]
    raise KeyError(key)


def select(requested: Iterable[str], available: Iterable[str]) -> list[str]:
    """The datasets of ``available`` that ``requested`` names, in ``available``'s order.

    A token is a dataset name (as found, or its MMEB name in any spelling), a meta-task
    (``classification``, ``vqa``, ``retrieval``, ``grounding``), ``IND``, ``OOD`` or
    ``MMEB`` (all 36). Raises ValueError for a token that matches nothing available.
    """
    available = list(available)
    by_canonical = {canonical_name(a): a for a in available if canonical_name(a)}
    chosen: set[str] = set()
    for token in requested:
        key = token.strip()
        group = {"mmeb": "overall", "ind": "IND", "ood": "OOD"}.get(key.lower(), key.lower())
        if key in available:
            chosen.add(key)
        elif canonical_name(key) in by_canonical:
            chosen.add(by_canonical[canonical_name(key)])
        elif group in SUMMARY_KEYS:
            found = [by_canonical[n] for n in group_members(group) if n in by_canonical]
            if not found:
                raise ValueError(f"--datasets {token}: none of its datasets is in the data")
            chosen.update(found)
        else:
            known = "known to MMEB" if canonical_name(key) else "not an MMEB dataset either"
            raise ValueError(
                f"--datasets {token}: not found ({known}); found: {', '.join(available) or 'nothing'}"
            )
    return [a for a in available if a in chosen]


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def report(datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """MMEB summary of per-dataset results ``{name: {"precision_at_1", "rows", ...}}``.

    Returns ``{"summary": {key: {"precision_at_1", "datasets", "of"}}, "datasets":
    {mmeb_name: {"meta_task", "split", "precision_at_1", "rows"}}, "unknown": {name: ...},
    "missing": [...], "complete": bool}``; a summary score is None when none of its
    datasets was evaluated. Raises ValueError when two names are one MMEB dataset.
    """
    known: dict[str, dict[str, Any]] = {}
    unknown: dict[str, dict[str, Any]] = {}
    for name, result in datasets.items():
        canon = canonical_name(name)
        if canon is None:
            unknown[name] = dict(result)
            continue
        if canon in known:
            raise ValueError(f"{name!r} and {known[canon]['name']!r} are both MMEB's {canon}")
        task, split = DATASETS[canon]
        known[canon] = {"name": name, "meta_task": task, "split": split, **result}
    summary = {}
    for key in SUMMARY_KEYS:
        members = group_members(key)
        scores = [known[n]["precision_at_1"] for n in members if n in known]
        summary[key] = {"precision_at_1": _mean(scores), "datasets": len(scores), "of": len(members)}
    ordered = {
        n: {k: v for k, v in known[n].items() if k != "name" or v != n} for n in DATASETS if n in known
    }
    return {
        "summary": summary,
        "datasets": ordered,
        "unknown": unknown,
        "missing": [n for n in DATASETS if n not in known],
        "complete": len(known) == len(DATASETS),
    }


# --- the published numbers ------------------------------------------------------------


def paper_results() -> dict[str, Any]:
    """``mmeb_paper.json``: the MMEB numbers published for LLaVE, with their sources."""
    return json.loads(resources.files("training").joinpath("mmeb_paper.json").read_text(encoding="utf-8"))


def paper_reference(model: str) -> dict[str, Any]:
    """The paper's scores for one model (``LLaVE-0.5B``, ``LLaVE-2B``, ``LLaVE-7B``; any
    case), as fractions: ``{"label", "summary": {key: float|None}, "datasets": {...}}``."""
    models = paper_results()["models"]
    match = [m for m in models if m.lower() == model.lower()]
    if not match:
        raise ValueError(f"no published MMEB numbers for {model!r}; known: {', '.join(models)}")
    entry = models[match[0]]

    def frac(v: float | None) -> float | None:
        return None if v is None else round(v / 100.0, 6)

    return {
        "label": f"paper:{match[0]}",
        "summary": {k: frac(entry["summary"].get(k)) for k in SUMMARY_KEYS},
        "datasets": {n: frac(v) for n, v in entry["datasets"].items()},
    }


def infer_paper_model(model: str) -> str:
    """The published model a checkpoint name refers to (``zhibinlan/LLaVE-7B`` ->
    ``LLaVE-7B``); ValueError unless exactly one matches."""
    lowered = model.lower()
    found = [m for m in paper_results()["models"] if m.lower() in lowered]
    if len(found) != 1:
        known = ", ".join(f"paper:{m}" for m in paper_results()["models"])
        raise ValueError(f"cannot tell which published model {model!r} is; name one: {known}")
    return found[0]


def result_reference(result: Mapping[str, Any], label: str) -> dict[str, Any]:
    """An earlier run's results (the evaluate JSON) as a comparison reference."""
    datasets = result.get("datasets") or {}
    summary = report(datasets)["summary"]
    return {
        "label": label,
        "summary": {k: summary[k]["precision_at_1"] for k in SUMMARY_KEYS},
        "datasets": {
            canonical_name(n) or n: d.get("precision_at_1")
            for n, d in datasets.items()
            if isinstance(d, Mapping)
        },
    }


def compare(result: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """This run minus the reference, per summary key and per dataset (fractions; None
    where either side has no number)."""
    mine = result_reference(result, "this run")

    def row(a: float | None, b: float | None) -> dict[str, float | None]:
        delta = None if a is None or b is None else a - b
        return {"run": a, "reference": b, "delta": delta}

    names = [n for n in DATASETS if n in mine["datasets"] or reference["datasets"].get(n) is not None]
    names += sorted(n for n in mine["datasets"] if n not in DATASETS)
    names += sorted(n for n in reference["datasets"] if n not in DATASETS and n not in mine["datasets"])
    return {
        "reference": reference["label"],
        "summary": {k: row(mine["summary"][k], reference["summary"].get(k)) for k in SUMMARY_KEYS},
        "datasets": {n: row(mine["datasets"].get(n), reference["datasets"].get(n)) for n in names},
    }


# --- markdown ------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}"


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def format_markdown(mmeb: Mapping[str, Any], *, max_rows: int | None = None) -> str:
    """The paper's layout: meta-tasks, IND, OOD, overall; then every dataset; then the
    datasets outside MMEB, apart. Scores in percent."""
    summary = mmeb["summary"]
    keys = list(SUMMARY_KEYS)
    counts = [
        str(summary[k]["of"])
        if summary[k]["datasets"] == summary[k]["of"]
        else f"{summary[k]['datasets']}/{summary[k]['of']}"
        for k in keys
    ]
    lines = ["MMEB, Precision@1 (%); averages are means over datasets", ""]
    lines += _table(
        ["", *(SUMMARY_LABELS[k] for k in keys)],
        [["datasets", *counts], ["P@1", *(_pct(summary[k]["precision_at_1"]) for k in keys)]],
        "l" + "r" * len(keys),
    )
    notes = []
    if not mmeb["complete"]:
        missing = mmeb["missing"]
        notes.append(
            f"Partial run: {len(DATASETS) - len(missing)} of {len(DATASETS)} datasets; "
            f"averages cover only those evaluated. Missing: {', '.join(missing)}."
        )
    if max_rows is not None:
        notes.append(
            f"At most {max_rows} rows per dataset (--max-rows): a quick look, not the benchmark's score."
        )
    if notes:
        lines += ["", *notes]
    if mmeb["datasets"]:
        lines += [""]
        lines += _table(
            ["dataset", "meta-task", "split", "rows", "P@1"],
            [
                [n, META_TASKS[d["meta_task"]], d["split"], str(d.get("rows", "")), _pct(d["precision_at_1"])]
                for n, d in mmeb["datasets"].items()
            ],
            "lllrr",
        )
    if mmeb["unknown"]:
        lines += ["", "Not MMEB datasets (reported apart: in no meta-task and not in the MMEB overall):", ""]
        lines += _table(
            ["dataset", "rows", "P@1"],
            [[n, str(d.get("rows", "")), _pct(d.get("precision_at_1"))] for n, d in mmeb["unknown"].items()],
            "lrr",
        )
    return "\n".join(lines)


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The difference to a reference, in P@1 points (this run minus the reference)."""
    rows = [
        [SUMMARY_LABELS[k], _pct(r["run"]), _pct(r["reference"]), _signed(r["delta"])]
        for k, r in comparison["summary"].items()
    ]
    rows += [
        [n, _pct(r["run"]), _pct(r["reference"]), _signed(r["delta"])]
        for n, r in comparison["datasets"].items()
    ]
    lines = [
        f"Difference to {comparison['reference']} (P@1 points, this run minus reference; – where either has none)",
        "",
    ]
    return "\n".join(lines + _table(["", "this run", comparison["reference"], "Δ"], rows, "lrrr"))
