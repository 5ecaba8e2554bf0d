"""training.mine: positive-aware selection, and the CLI end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training import synthetic
from training.data import Side, load_train_pairs
from training.mine import main, select_negatives


def test_selection_drops_the_positive_likely_false_negatives_and_skipped_ones():
    scores = np.array([0.9, 0.95, 0.5, 0.86, 0.7, 0.1, 0.8])  # the positive is index 0
    # 0.95 and 0.86 exceed 0.95 x 0.9 = 0.855: likely false negatives.
    assert select_negatives(scores, 0, top_k=3, margin=0.95) == [6, 4, 2]
    assert select_negatives(scores, 0, top_k=3, margin=float("inf")) == [1, 3, 6]
    assert select_negatives(scores, 0, top_k=2, margin=0.95, skip_top=1) == [4, 2]
    assert select_negatives(scores, 0, top_k=2, margin=0.95, excluded=[6]) == [4, 2]
    assert select_negatives(scores, 0, top_k=10, margin=0.95) == [6, 4, 2, 5]  # fewer than k left


class TableEmbedder:
    """Fixed vectors by text: lets the test know the true ranking."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def embed(self, inputs, *, batch_size=16):
        return np.array([self.table[x["content"][0]["text"]] for x in inputs], dtype=np.float32)


def test_mine_writes_the_nearest_true_negatives_as_lists(tmp_path):
    rows = [
        {"qry": "q red", "pos_text": "red", "neg_text": "", "extra": 1},
        {"qry": "q blue", "pos_text": "blue"},
        {"qry": "q green", "pos_text": "green"},
        {"qry": "q red", "pos_text": "red"},  # a duplicate pair: its copy is not a negative
        {"qry": ""},  # unreadable: reported, left out
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {
        "q red": [1.0, 0.0, 0.0],
        "q blue": [0.0, 1.0, 0.0],
        "q green": [0.0, 0.2, 1.0],
        "red": [1.0, 0.1, 0.0],
        "blue": [0.6, 1.0, 0.0],  # near "q red", but below 0.95 x its positive
        "green": [0.0, 1.0, 0.2],  # above the positive for "q blue": a likely false negative there
    }
    from training.mine import mine

    stats = mine(TableEmbedder(table), [data], None, tmp_path / "out.jsonl", top_k=1, margin=0.95)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(out) == 4 and stats["skipped_rows"] == 1 and stats["targets_indexed"] == 3
    assert out[0]["extra"] == 1 and out[0]["pos_text"] == "red"
    assert out[0]["neg_text"] == ["blue"] and out[0]["neg_image_path"] == [""]
    assert out[1]["neg_text"] == ["red"]  # "green" dropped as a likely false negative
    assert out[2]["neg_text"] == ["blue"]
    assert out[3]["neg_text"] == ["blue"]  # never its own positive's copy
    assert stats["dropped_as_likely_false_negatives"] >= 1
    pairs, _ = load_train_pairs([tmp_path / "out.jsonl"], None, hard_negatives=4)
    assert pairs[0].negatives == (Side("blue"),)


def test_mine_cli_on_a_tiny_model_feeds_training(tiny_checkpoint, tmp_path):
    data = tmp_path / "shapes"
    synthetic.generate(data, n=24, seed=0, eval_n=4, image_size=32, tasks=["t2i", "i2t"], num_candidates=3)
    out = tmp_path / "mined.jsonl"
    stats = main(
        ["--model", str(tiny_checkpoint), "--train-data", str(data / "train.jsonl"), "--image-root", str(data),
         "--out", str(out), "--top-k", "2", "--margin", "0.99", "--device", "cpu"]
    )  # fmt: skip
    mined = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(mined) == 24 and stats["rows"] == 24
    assert json.loads(out.with_suffix(".stats.json").read_text())["top_k"] == 2
    for row in mined:
        assert len(row["neg_text"]) == len(row["neg_image_path"]) <= 2
        positive = (row["pos_text"], row["pos_image_path"])
        assert positive not in list(zip(row["neg_text"], row["neg_image_path"], strict=True))
    assert stats["negatives_per_row"] > 0
    with pytest.raises(SystemExit):
        main(["--train-data", str(data / "train.jsonl"), "--out", str(out)])  # no embedder


def test_positives_of_identical_queries_can_be_dropped(tmp_path):
    """Two rows ask the same thing with different positives: each positive is the other
    row's nearest target, a true false negative; the option drops it."""
    rows = [{"qry": "q", "pos_text": "a"}, {"qry": "q", "pos_text": "b"}, {"qry": "r", "pos_text": "c"}]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = {"q": [1.0, 0.0], "r": [0.0, 1.0], "a": [1.0, 0.05], "b": [1.0, 0.3], "c": [0.3, 1.0]}
    from training.mine import mine

    kept = tmp_path / "kept.jsonl"
    mine(TableEmbedder(table), [data], None, kept, top_k=1, margin=float("inf"))
    assert [json.loads(line)["neg_text"] for line in kept.read_text().splitlines()][:2] == [["b"], ["a"]]
    dropped = tmp_path / "dropped.jsonl"
    stats = mine(
        TableEmbedder(table),
        [data],
        None,
        dropped,
        top_k=1,
        margin=float("inf"),
        drop_same_query_positives=True,
    )
    assert [json.loads(line)["neg_text"] for line in dropped.read_text().splitlines()][:2] == [["c"], ["c"]]
    assert stats["drop_same_query_positives"]
