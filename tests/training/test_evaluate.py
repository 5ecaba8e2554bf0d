"""Precision@1 scoring, per dataset, and the evaluate CLI on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.tolerance import assert_close_scaled
from training import mmeb, synthetic
from training.data import BadRowError, Side, model_input
from training.evaluate import (
    EvalRow,
    ServerEmbedder,
    evaluate,
    find_benchmark,
    format_table,
    load_benchmark,
    load_eval_rows,
    select_rows,
)

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
    # each distinct input embedded once per dataset, as MMEB's reference code does (5 of 7 mentions)
    assert embedder.calls == 5
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


# --- MMEB: the benchmark's structure, a folder of per-dataset files, the paper's layout ---------

# Two datasets from each meta-task (an IND and an OOD one) plus one outside MMEB, with the
# number of hits out of 4 rows each: P@1 = hits / 4.
SYNTHETIC_HITS = {
    "ImageNet-1K": 4,  # classification, IND
    "Place365": 2,  # classification, OOD
    "OK-VQA": 3,  # VQA, IND
    "ScienceQA": 1,  # VQA, OOD
    "MSCOCO_t2i": 2,  # retrieval, IND
    "OVEN": 0,  # retrieval, OOD
    "MSCOCO": 4,  # grounding, IND
    "RefCOCO": 3,  # grounding, OOD
    "CIFAR-100": 0,  # on the MMEB-eval hub repository, but not one of the 36
}


def _fake_rows(hits: int, n: int = 4) -> list[dict]:
    """MMEB-eval rows for FakeEmbedder: the first ``hits`` rank the positive first."""
    rows = []
    for i in range(n):
        candidates = ["v:1,0.1", "v:0,1", "v:1,-0.5"] if i < hits else ["v:0,1", "v:1,0", "v:1,-0.5"]
        rows.append(
            {"qry_text": "v:1,0", "qry_img_path": "", "tgt_text": candidates, "tgt_img_path": [""] * 3}
        )
    return rows


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _synthetic_benchmark(root: Path) -> Path:
    """The MMEB-eval layouts a user may have: Hub shards, the parquet converter's folders,
    flat .jsonl/.parquet files, a name spelled as MMEB-train spells it; plus the files a
    Hub download brings that are not datasets."""
    layout = {
        "ImageNet-1K": None,  # two Hub shards, below
        "Place365": "Place365.jsonl",
        "OK-VQA": "OK-VQA/test/0000.parquet",
        "ScienceQA": "ScienceQA.parquet",
        "MSCOCO_t2i": "mscoco-T2I.jsonl",
        "OVEN": "OVEN/test.jsonl",
        "MSCOCO": "MSCOCO/test-00000-of-00001.parquet",
        "RefCOCO": "RefCOCO/test-00000-of-00001.parquet",
        "CIFAR-100": "CIFAR-100/test-00000-of-00001.parquet",
    }
    for name, hits in SYNTHETIC_HITS.items():
        rows = _fake_rows(hits)
        if layout[name] is None:
            _write(root / name / "test-00000-of-00002.parquet", rows[:2])
            _write(root / name / "test-00001-of-00002.parquet", rows[2:])
        else:
            _write(root / layout[name], rows)
    (root / "README.md").write_text("# MMEB-eval\n")
    (root / "images.zip").write_bytes(b"PK")
    (root / "eval_images" / "ImageNet-1K").mkdir(parents=True)
    return root


def test_mmeb_definition_is_the_benchmarks():
    assert len(mmeb.DATASETS) == 36
    count = {k: len(mmeb.group_members(k)) for k in mmeb.SUMMARY_KEYS}
    # The paper's "# Datasets" row (LLaVE Table 2; MMEB Table 1).
    assert count == {
        "classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4, "IND": 20, "OOD": 16, "overall": 36,
    }  # fmt: skip
    # IND = the 20 subsets of MMEB-train (VLM2Vec train_image.yaml; the LLaVE README's training command).
    mmeb_train = (
        "ImageNet_1K HatefulMemes SUN397 N24News VOC2007 OK-VQA A-OKVQA DocVQA InfographicsVQA ChartQA "
        "Visual7W VisDial CIRR NIGHTS WebQA VisualNews_i2t VisualNews_t2i MSCOCO_t2i MSCOCO_i2t MSCOCO"
    ).split()
    assert {mmeb.canonical_name(n) for n in mmeb_train} == set(mmeb.group_members("IND"))
    assert mmeb.canonical_name("imagenet_1k") == "ImageNet-1K"
    assert mmeb.canonical_name("Visual7W") == "Visual7W" and mmeb.canonical_name("CIFAR-100") is None


def test_the_paper_numbers_are_consistent_and_cited():
    paper = mmeb.paper_results()
    assert "2503.04812" in paper["sources"]["summary"] and paper["unit"] == "percent"
    assert {m: e["summary"]["overall"] for m, e in paper["models"].items()} == {
        "LLaVE-0.5B": 59.1, "LLaVE-2B": 65.2, "LLaVE-7B": 70.3,
    }  # fmt: skip
    n = {k: len(mmeb.group_members(k)) for k in mmeb.SUMMARY_KEYS}
    for entry in paper["models"].values():
        s = entry["summary"]
        assert set(s) == set(mmeb.SUMMARY_KEYS) and set(entry["datasets"]) == set(mmeb.DATASETS)
        # The overall score is the mean over 36 datasets: both weighted splits give it back
        # (to the table's rounding), which catches a mistyped figure.
        by_task = sum(s[k] * n[k] for k in mmeb.META_TASKS) / 36
        by_split = (s["IND"] * 20 + s["OOD"] * 16) / 36
        assert abs(by_task - s["overall"]) < 0.1 and abs(by_split - s["overall"]) < 0.1
        scores = entry["datasets"]
        if all(v is not None for v in scores.values()):  # LLaVE-7B: Table 7 of the paper
            # Each average of Table 2 is the mean of its datasets' scores (to its rounding).
            for key in mmeb.SUMMARY_KEYS:
                members = mmeb.group_members(key)
                assert abs(sum(scores[m] for m in members) / len(members) - s[key]) < 0.051, key
    assert all(v is not None for v in paper["models"]["LLaVE-7B"]["datasets"].values())


def test_the_paper_data_ships_with_the_package():
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "mmeb_paper.json" in config.get("package-data", {}).get("training", [])


def test_benchmark_folder_layouts_grouping_and_averages(tmp_path):
    bench = _synthetic_benchmark(tmp_path / "MMEB-eval")
    found = find_benchmark(bench)
    assert set(found) == set(SYNTHETIC_HITS)  # README, images.zip, eval_images/ are not datasets
    assert [p.name for p in found["ImageNet-1K"]] == [
        "test-00000-of-00002.parquet",
        "test-00001-of-00002.parquet",
    ]
    rows, report = load_benchmark(bench, None)
    assert not report.skipped and len(rows) == 4 * len(SYNTHETIC_HITS)
    result = evaluate(FakeEmbedder(), rows, None)
    assert {n: d["precision_at_1"] for n, d in result["datasets"].items()} == {
        n: h / 4 for n, h in SYNTHETIC_HITS.items()
    }
    report = mmeb.report(result["datasets"])
    summary = {k: v["precision_at_1"] for k, v in report["summary"].items()}
    assert summary == pytest.approx(
        {
            "classification": (1 + 0.5) / 2,
            "vqa": (0.75 + 0.25) / 2,
            "retrieval": (0.5 + 0) / 2,
            "grounding": (1 + 0.75) / 2,
            "IND": (1 + 0.75 + 0.5 + 1) / 4,
            "OOD": (0.5 + 0.25 + 0 + 0.75) / 4,
            "overall": 4.75 / 8,  # the mean over datasets, CIFAR-100 not among them
        }
    )
    assert report["summary"]["retrieval"]["datasets"] == 2 and report["summary"]["retrieval"]["of"] == 12
    assert (
        list(report["unknown"]) == ["CIFAR-100"] and not report["complete"] and len(report["missing"]) == 28
    )
    assert report["datasets"]["OVEN"] == {
        "meta_task": "retrieval",
        "split": "OOD",
        "precision_at_1": 0.0,
        "rows": 4,
    }
    assert result["precision_at_1"] == pytest.approx(4.75 / 9)  # every dataset evaluated, as before

    table = mmeb.format_markdown(report)
    assert "| datasets | 2/10 | 2/10 | 2/12 | 2/4 | 4/20 | 4/16 | 8/36 |" in table
    assert "| P@1 | 75.0 | 50.0 | 25.0 | 87.5 | 81.2 | 37.5 | 59.4 |" in table
    assert "| OVEN | Retrieval | OOD | 4 | 0.0 |" in table
    unknown_part = table.split("Not MMEB datasets")[1]
    assert (
        "| CIFAR-100 | 4 | 0.0 |" in unknown_part and "CIFAR-100" not in table.split("Not MMEB datasets")[0]
    )


def test_a_complete_run_has_every_average():
    datasets = {
        n: {"precision_at_1": 0.5 if split == "IND" else 0.25, "rows": 1}
        for n, (_, split) in mmeb.DATASETS.items()
    }
    report = mmeb.report(datasets)
    assert report["complete"] and not report["missing"]
    assert (
        report["summary"]["IND"]["precision_at_1"] == 0.5
        and report["summary"]["OOD"]["precision_at_1"] == 0.25
    )
    assert report["summary"]["overall"]["precision_at_1"] == pytest.approx((20 * 0.5 + 16 * 0.25) / 36)
    assert report["summary"]["grounding"]["precision_at_1"] == pytest.approx((0.5 + 3 * 0.25) / 4)
    assert "| datasets | 10 | 10 | 12 | 4 | 20 | 16 | 36 |" in mmeb.format_markdown(report)
    with pytest.raises(ValueError, match="both MMEB's ImageNet-1K"):
        mmeb.report({"ImageNet-1K": datasets["ImageNet-1K"], "ImageNet_1K": datasets["ImageNet-1K"]})


def test_dataset_choice_and_max_rows(tmp_path):
    bench = _synthetic_benchmark(tmp_path / "bench")
    rows, _ = load_benchmark(bench, None, datasets=["grounding", "imagenet_1k"], max_rows=3)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.dataset] = counts.get(row.dataset, 0) + 1
    assert counts == {"ImageNet-1K": 3, "MSCOCO": 3, "RefCOCO": 3}  # 3 rows across ImageNet-1K's two shards
    rows, _ = load_benchmark(bench, None, datasets=["OOD", "CIFAR-100"])
    assert {r.dataset for r in rows} == {"Place365", "ScienceQA", "OVEN", "RefCOCO", "CIFAR-100"}
    with pytest.raises(ValueError, match="VizWiz: not found"):
        load_benchmark(bench, None, datasets=["VizWiz"])
    with pytest.raises(ValueError, match="nope: not found"):
        load_benchmark(bench, None, datasets=["nope"])
    # the same choice in one file with a dataset column
    flat = [dict(r, dataset=n) for n, h in SYNTHETIC_HITS.items() for r in _fake_rows(h)]
    _write(tmp_path / "all.jsonl", flat)
    rows, _ = load_eval_rows(tmp_path / "all.jsonl", None)
    kept = select_rows(rows, ["vqa"], 2)
    assert [r.dataset for r in kept] == ["OK-VQA", "OK-VQA", "ScienceQA", "ScienceQA"]


def _result(scores: dict[str, float]) -> dict:
    return {"datasets": {n: {"precision_at_1": p, "rows": 4} for n, p in scores.items()}}


def test_comparison_with_the_paper_and_with_an_earlier_run():
    run = _result({n: h / 4 for n, h in SYNTHETIC_HITS.items()})
    paper = mmeb.paper_reference("llave-7b")
    cmp = mmeb.compare(run, paper)
    assert cmp["reference"] == "paper:LLaVE-7B"
    assert cmp["summary"]["overall"]["reference"] == pytest.approx(0.703)
    assert cmp["summary"]["overall"]["delta"] == pytest.approx(4.75 / 8 - 0.703)
    assert cmp["summary"]["vqa"]["delta"] == pytest.approx(0.5 - 0.654)
    assert cmp["datasets"]["OVEN"] == {
        "run": 0.0,
        "reference": pytest.approx(0.68),
        "delta": pytest.approx(-0.68),
    }
    assert cmp["datasets"]["ImageNet-A"] == {"run": None, "reference": pytest.approx(0.516), "delta": None}
    assert set(mmeb.DATASETS) <= set(cmp["datasets"])  # every published dataset, evaluated or not
    text = mmeb.format_comparison(cmp)
    assert "| Overall | 59.4 | 70.3 | -10.9 |" in text and "| OVEN | 0.0 | 68.0 | -68.0 |" in text
    assert "| ImageNet-A | – | 51.6 | – |" in text
    no_datasets = mmeb.compare(run, mmeb.paper_reference("LLaVE-0.5B"))  # summary only in the paper
    assert no_datasets["datasets"]["OVEN"] == {"run": 0.0, "reference": None, "delta": None}

    earlier = _result({**{n: h / 4 for n, h in SYNTHETIC_HITS.items()}, "OVEN": 0.5, "ScienceQA": 0.25})
    cmp = mmeb.compare(run, mmeb.result_reference(earlier, "old.json"))
    assert cmp["datasets"]["OVEN"]["delta"] == pytest.approx(-0.5)
    assert cmp["datasets"]["ScienceQA"]["delta"] == 0.0
    assert cmp["datasets"]["CIFAR-100"]["delta"] == 0.0  # outside MMEB, still compared
    assert cmp["summary"]["retrieval"]["delta"] == pytest.approx(-0.25)
    assert cmp["summary"]["OOD"]["delta"] == pytest.approx(-0.5 / 4)

    assert mmeb.infer_paper_model("zhibinlan/LLaVE-0.5B") == "LLaVE-0.5B"
    with pytest.raises(ValueError, match="paper:LLaVE-2B"):
        mmeb.infer_paper_model("runs/my-model")
    with pytest.raises(ValueError, match="no published MMEB numbers"):
        mmeb.paper_reference("LLaVE-13B")


def test_cli_compares_two_result_files_without_a_model(tmp_path):
    old, new = tmp_path / "old.json", tmp_path / "new.txt"
    old.write_text(json.dumps(_result({"ImageNet-1K": 0.5, "OVEN": 0.25}), indent=2))
    # a saved stdout: the table, then the JSON line
    new.write_text("some table\n" + json.dumps(_result({"ImageNet-1K": 0.75, "OVEN": 0.25})) + "\n")
    proc = _cli("--results", str(new), "--compare", str(old), "--markdown", str(tmp_path / "t.md"))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["comparison"]["datasets"]["ImageNet-1K"]["delta"] == pytest.approx(0.25)
    assert result["comparison"]["summary"]["overall"]["delta"] == pytest.approx(0.125)
    assert f"Difference to {old}" in proc.stdout and "| ImageNet-1K | 75.0 | 50.0 | +25.0 |" in proc.stdout
    assert "| ImageNet-1K | Classification | IND | 4 | 75.0 |" in (tmp_path / "t.md").read_text()
    bad = _cli("--results", str(new), "--compare", "paper:LLaVE-13B", check=False)
    assert bad.returncode == 2 and "no published MMEB numbers" in bad.stderr
    # an unusable reference stops the run before anything is loaded or embedded
    bad = _cli(
        "--model", str(tmp_path / "no-such-model"), "--data", str(old), "--compare", "paper", check=False
    )
    assert bad.returncode == 2 and "cannot tell which published model" in bad.stderr


def test_server_embedder_retries_caps_and_splits():
    import httpx

    seen: list[int] = []
    state = {"busy": 1}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            return httpx.Response(200, json={"model": "m", "dim": 2, "limits": {"max_inputs_per_request": 4}})
        inputs = json.loads(request.content)["inputs"]
        if state["busy"]:
            state["busy"] -= 1
            return httpx.Response(429, headers={"retry-after": "0"}, json={"error": {"message": "busy"}})
        if len(inputs) > 3:
            return httpx.Response(413, json={"error": {"type": "too_large", "message": "body too large"}})
        seen.append(len(inputs))
        assert all(isinstance(p.get("image", ""), str) for x in inputs for p in x["content"])
        return httpx.Response(200, json={"embeddings": [[float(len(x["content"])), 0.0] for x in inputs]})

    client = ServerEmbedder("http://eval.test", transport=httpx.MockTransport(handle))
    inputs = [{"content": [{"type": "text", "text": "a"}]}] * 9 + [
        {"content": [{"type": "text", "text": "b"}, {"type": "image", "image": b"\x89PNG"}]}
    ]
    out = client.embed(inputs, batch_size=16)
    assert out.shape == (10, 2) and out[:, 0].tolist() == [1.0] * 9 + [2.0]
    assert seen == [2, 2, 2, 2, 2]  # capped at the server's 4 per request, each 4 split in two on 413
    assert client.name == "m"


def _image_benchmark(root: Path) -> tuple[Path, Path]:
    """A tiny image benchmark in the MMEB-eval layout (one dataset per meta-task and one
    outside MMEB), images in ``MMEB-eval/eval_images`` where ``images.zip`` unzips."""
    from tests.conftest import make_png

    data = root / "MMEB-eval"
    images = data / "eval_images"
    colours = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220)}

    def image(dataset: str, name: str) -> str:
        rel = f"{dataset}/{name}.png"
        (images / dataset).mkdir(parents=True, exist_ok=True)
        (images / rel).write_bytes(make_png(32, 24 if "crop" in name else 32, colours[name.split("_")[0]]))
        return rel

    labels = list(colours)
    benchmark = {
        "ImageNet-1K": [
            {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": image("ImageNet-1K", c),
             "tgt_text": [c, *(x for x in labels if x != c)], "tgt_img_path": ["", "", ""]}
            for c in ("red", "blue")
        ],
        "OK-VQA": [
            {"qry_text": "<|image_1|>\nRepresent the given image with the following question: What colour is it?",
             "qry_img_path": image("OK-VQA", c), "tgt_text": [c, "purple"], "tgt_img_path": ["", ""]}
            for c in ("green", "red")
        ],
        "MSCOCO_t2i": [
            {"qry_text": f"Find me an everyday image that matches the given caption: a {c} square", "qry_img_path": "",
             "tgt_text": ["<|image_1|>\nRepresent the given image."] * 3,
             "tgt_img_path": [image("MSCOCO_t2i", c), *(image("MSCOCO_t2i", x) for x in labels if x != c)]}
            for c in ("blue", "green")
        ],
        "RefCOCO": [
            {"qry_text": "<|image_1|>\nSelect the portion of the image that isolates the object of the given label: square",
             "qry_img_path": image("RefCOCO", f"{c}_full"), "tgt_text": ["<|image_1|>\nRepresent the given cropped image of the object."] * 2,
             "tgt_img_path": [image("RefCOCO", f"{c}_crop"), image("RefCOCO", "blue_crop" if c != "blue" else "red_crop")]}
            for c in ("red", "green")
        ],
        "CIFAR-100": [
            {"qry_text": "<|image_1|>\nRepresent the given image for classification", "qry_img_path": image("CIFAR-100", "blue"),
             "tgt_text": ["blue", "red"], "tgt_img_path": ["", ""]}
        ],
    }  # fmt: skip
    for name, rows in benchmark.items():
        _write(data / name / "test-00000-of-00001.parquet", rows)
    return data, images


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "training.evaluate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_cli_on_a_benchmark_folder_with_the_model_core(tiny_checkpoint, tmp_path):
    data, images = _image_benchmark(tmp_path)
    proc = _cli(
        "--model",
        str(tiny_checkpoint),
        "--data",
        str(data),
        "--device",
        "cpu",
        "--batch-size",
        "2",
        "--compare",
        "paper:LLaVE-0.5B",
        "--output",
        str(tmp_path / "r.json"),
    )  # fmt: skip  (no --image-root: DIR/eval_images is the default)
    lines = proc.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert result["rows"] == 9 and set(result["datasets"]) == {
        "ImageNet-1K",
        "OK-VQA",
        "MSCOCO_t2i",
        "RefCOCO",
        "CIFAR-100",
    }
    summary = result["mmeb"]["summary"]
    assert [summary[k]["datasets"] for k in mmeb.SUMMARY_KEYS] == [1, 1, 1, 1, 3, 1, 4]  # RefCOCO is OOD
    assert summary["OOD"]["precision_at_1"] == result["datasets"]["RefCOCO"]["precision_at_1"]
    assert result["mmeb"]["unknown"] == {"CIFAR-100": result["datasets"]["CIFAR-100"]}
    assert summary["overall"]["precision_at_1"] == pytest.approx(
        np.mean(
            [
                result["datasets"][n]["precision_at_1"]
                for n in ("ImageNet-1K", "OK-VQA", "MSCOCO_t2i", "RefCOCO")
            ]
        )
    )
    assert result["comparison"]["reference"] == "paper:LLaVE-0.5B"
    assert "| P@1 |" in proc.stdout and "Difference to paper:LLaVE-0.5B" in proc.stdout
    assert "Partial run: 4 of 36 datasets" in proc.stdout
    assert "input" in proc.stderr  # the progress bar


def test_server_mode_evaluates_a_running_deployment(tiny_checkpoint, tiny_embedder, tmp_path, capsys):
    from tests.service.conftest import MAIN_ARGS, start_server
    from training.evaluate import main

    data, images = _image_benchmark(tmp_path)
    rows, _ = load_benchmark(data, images)
    (tmp_path / "server").mkdir()
    server = start_server(tiny_checkpoint, tmp_path / "server", *MAIN_ARGS)
    try:
        # The server embeds what the model core embeds (one input per request, so that
        # batching pads nothing: the same computation up to rounding).
        sides = list(dict.fromkeys(s for r in rows for s in (r.query, *r.candidates)))
        inputs = [model_input(s, images) for s in sides]
        remote = ServerEmbedder(server.url)
        assert_close_scaled(
            remote.embed(inputs, batch_size=1), tiny_embedder.embed(inputs, batch_size=1), rtol=1e-4
        )
        remote.close()

        main(
            [
                "--server",
                server.url,
                "--data",
                str(data),
                "--batch-size",
                "32",
                "--datasets",
                "MMEB",
                "--no-progress",
            ]
        )
    finally:
        server.stop()
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["server"] == server.url and result["model"] == tiny_checkpoint.name
    assert set(result["datasets"]) == {
        "ImageNet-1K",
        "OK-VQA",
        "MSCOCO_t2i",
        "RefCOCO",
    }  # MMEB: CIFAR-100 left out
    assert result["rows"] == 8 and result["mmeb"]["summary"]["overall"]["datasets"] == 4
    assert "| P@1 |" in out


def test_the_readme_shows_the_shipped_paper_numbers():
    readme = (REPO / "README.md").read_text()
    for model, entry in mmeb.paper_results()["models"].items():
        figures = " | ".join(f"{entry['summary'][k]:.1f}" for k in mmeb.SUMMARY_KEYS)
        assert f"| {model} (paper) | {figures} |" in readme
