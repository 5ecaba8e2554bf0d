"""The synthetic shapes data: deterministic, MMEB-shaped, with hard negatives."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from training import synthetic

TRAIN_KEYS = {"qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path"}
EVAL_KEYS = {"qry_text", "qry_img_path", "tgt_text", "tgt_img_path", "dataset"}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _attributes(image_path: str) -> tuple[str, ...]:
    """colour, shape, size, position, from a file name like 000012_red_circle_small_left.png."""
    return tuple(Path(image_path).stem.split("_")[1:])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    synthetic.generate(out, n=120, seed=3, eval_n=40, image_size=48)
    return out


def test_same_seed_gives_identical_files(data, tmp_path):
    synthetic.generate(tmp_path, n=120, seed=3, eval_n=40, image_size=48)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (data / name).read_bytes()
    first_image = _rows(data / "train.jsonl")[0]
    path = first_image["qry_image_path"] or first_image["pos_image_path"]
    assert (tmp_path / path).read_bytes() == (data / path).read_bytes()


def test_other_seed_gives_other_data(data, tmp_path):
    synthetic.generate(tmp_path, n=120, seed=4, eval_n=40, image_size=48)
    assert (tmp_path / "train.jsonl").read_bytes() != (data / "train.jsonl").read_bytes()


def test_train_rows_are_mmeb_train_rows(data):
    rows = _rows(data / "train.jsonl")
    assert len(rows) == 120
    for row in rows:
        assert set(row) == TRAIN_KEYS
        for text, image in (
            ("qry", "qry_image_path"),
            ("pos_text", "pos_image_path"),
            ("neg_text", "neg_image_path"),
        ):
            assert ("<|image_1|>" in row[text]) == bool(row[image]), row
            if row[image]:
                assert not Path(row[image]).is_absolute()
                with Image.open(data / row[image]) as im:
                    assert im.size == (48, 48) and im.mode == "RGB"
    text_queries = sum(not r["qry_image_path"] for r in rows)
    assert 0 < text_queries < len(rows)  # both directions present
    assert any(r["qry"].startswith("<|image_1|>\nRepresent the given image") for r in rows)
    assert any(re.fullmatch(r"an? \w+ \w+", r["qry"]) for r in rows)  # plain captions, "a red circle"


def test_train_negatives_differ_in_exactly_one_attribute(data):
    for row in _rows(data / "train.jsonl"):
        if row["pos_image_path"]:
            pos, neg = _attributes(row["pos_image_path"]), _attributes(row["neg_image_path"])
            if row["qry"].startswith("Find me"):  # detailed caption: all four attributes count
                assert sum(a != b for a, b in zip(pos, neg, strict=True)) == 1
            else:  # "a red circle": colour and shape count
                assert sum(a != b for a, b in zip(pos[:2], neg[:2], strict=True)) == 1
        else:
            assert row["pos_text"] != row["neg_text"]


def test_eval_rows_positive_first_with_one_attribute_hard_negatives(data):
    rows = _rows(data / "eval.jsonl")
    assert len(rows) == 40
    assert {r["dataset"] for r in rows} == {f"shapes_{t}" for t in synthetic.TASKS}
    for row in rows:
        assert set(row) == EVAL_KEYS
        assert len(row["tgt_text"]) == len(row["tgt_img_path"]) >= 2
        for text, image in zip(row["tgt_text"], row["tgt_img_path"], strict=True):
            assert ("<|image_1|>" in text) == bool(image)
        if row["dataset"] == "shapes_t2i":
            colour, shape = row["qry_text"].split()[1:]
            candidates = [_attributes(p)[:2] for p in row["tgt_img_path"]]
            assert candidates[0] == (colour, shape)
            assert len(set(candidates)) == len(candidates)  # nothing else matches the caption
            assert (colour, shape) not in candidates[1:]
            assert any(c[1] == shape and c[0] != colour for c in candidates[1:])  # same shape, other colour
            assert any(c[0] == colour and c[1] != shape for c in candidates[1:])
        elif row["tgt_img_path"][0] == "":
            assert len(set(row["tgt_text"])) == len(row["tgt_text"])


def test_train_and_eval_images_are_different_renders(data):
    def digests(split):
        return {
            hashlib.sha1(Image.open(p).tobytes()).hexdigest() for p in (data / "images" / split).glob("*.png")
        }

    train, evaluation = digests("train"), digests("eval")
    assert train and evaluation and not train & evaluation


def test_cli_writes_the_layout(tmp_path):
    out = tmp_path / "cli"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.synthetic",
            str(out),
            "--n",
            "8",
            "--seed",
            "1",
            "--eval-n",
            "4",
            "--tasks",
            "t2i",
            "--image-size",
            "32",
        ],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
    )
    rows = _rows(out / "train.jsonl")
    assert len(rows) == 8 and all(not r["qry_image_path"] and r["pos_image_path"] for r in rows)
    assert {r["dataset"] for r in _rows(out / "eval.jsonl")} == {"shapes_t2i"}
    assert (out / rows[0]["pos_image_path"]).is_file()


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        synthetic.generate(tmp_path, n=2, seed=0, tasks=["nope"])
