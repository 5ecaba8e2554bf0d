"""Precision@1 scoring, per dataset, and the evaluate CLI on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training import synthetic
from training.data import BadRowError, Side
from training.evaluate import EvalRow, evaluate, format_table, load_eval_rows

REPO = Path(__file__).resolve().parents[2]


class FakeEmbedder:
    """Embeds text 'v:x,y' as the unit vector (x, y); records how often it was asked."""

    def __init__(self):
        self.calls = 0

    def embed(self, inputs, batch_size=16):
        self.calls += len(inputs)
        out = []
        for inp in inputs:
            text = "".join(p.get("text", "") for p in inp["content"])
            x, y = (float(v) for v in text.removeprefix("v:").split(","))
            out.append(np.array([x, y]) / np.hypot(x, y))
        return np.stack(out).astype(np.float32)


def _row(query: str, candidates: list[str], dataset: str) -> EvalRow:
    return EvalRow(Side(query), tuple(Side(c) for c in candidates), dataset, "")


def test_precision_at_1_per_dataset_and_mean_over_datasets():
    rows = [
        _row("v:1,0", ["v:1,0.1", "v:0,1"], "a"),  # hit
        _row("v:1,0", ["v:0,1", "v:1,0"], "a"),  # miss
        _row("v:0,1", ["v:0,1", "v:1,1"], "b"),  # hit
    ]
    embedder = FakeEmbedder()
    result = evaluate(embedder, rows, None)
    assert result["datasets"] == {
        "a": {"precision_at_1": 0.5, "rows": 2},
        "b": {"precision_at_1": 1.0, "rows": 1},
    }
    assert result["precision_at_1"] == pytest.approx(0.75)  # mean over datasets, not over rows
    assert embedder.calls == 4  # each distinct input embedded once (4 of 7 mentions)
    table = format_table(result)
    assert "overall (mean)" in table and "0.750" in table


def test_ties_go_to_the_first_candidate():
    result = evaluate(FakeEmbedder(), [_row("v:1,0", ["v:1,1", "v:1,1"], "t")], None)
    assert result["precision_at_1"] == 1.0


def test_eval_rows_are_validated(tmp_path):
    rows = [
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", ""]},
        {"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"], "tgt_img_path": ["", ""]},
        {"qry_text": "q", "qry_img_path": "", "tgt_text": []},
        {"qry_text": "q", "tgt_text": ["<|image_1|>"], "tgt_img_path": ["missing.png"]},
    ]
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded, report = load_eval_rows(data, tmp_path)
    assert len(loaded) == 1 and loaded[0].dataset == "all"
    assert [s.split(": ")[0] for s in report.skipped] == [f"{data}:{n}" for n in (2, 3, 4)]
    assert "target 0: image not found" in report.skipped[2]
    with pytest.raises(BadRowError, match=f"{data}:2"):
        load_eval_rows(data, tmp_path, on_bad="error")


def test_cli_prints_a_table_and_a_json_last_line(tiny_checkpoint, tmp_path):
    synthetic.generate(tmp_path, n=0, seed=0, eval_n=8, image_size=32, num_candidates=3)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "training.evaluate",
            "--model",
            str(tiny_checkpoint),
            "--data",
            str(tmp_path / "eval.jsonl"),
            "--image-root",
            str(tmp_path),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert 0.0 <= result["precision_at_1"] <= 1.0 and result["rows"] == 8
    assert set(result["datasets"]) == {f"shapes_{t}" for t in synthetic.TASKS}
    assert any(line.startswith("overall (mean)") for line in lines)
