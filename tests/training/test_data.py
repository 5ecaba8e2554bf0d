"""MMEB-train rows -> pairs -> the serving prompts, grouped batches, bad-row policy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.conftest import make_png
from training.data import (
    BadRowError,
    GroupedBatchSampler,
    PairDataset,
    Side,
    collate_pairs,
    load_train_pairs,
    model_input,
    parse_side,
)


def _write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "red.png").write_bytes(make_png(32, 32, (200, 30, 30)))
    (root / "blue.png").write_bytes(make_png(40, 24, (30, 30, 200)))
    return root


GOOD_IMAGE_QUERY = {
    "qry": "<|image_1|>\nRepresent the given image with the following question: What colour?",
    "qry_image_path": "red.png",
    "pos_text": "red",
    "pos_image_path": "",
    "neg_text": "",
    "neg_image_path": "",
}
GOOD_TEXT_QUERY = {
    "qry": "a blue square",
    "qry_image_path": "",
    "pos_text": "<|image_1|>",
    "pos_image_path": "blue.png",
}


def test_bad_rows_are_skipped_and_reported_with_file_and_line(tmp_path, image_root):
    data = _write_jsonl(
        tmp_path / "train.jsonl",
        [
            GOOD_IMAGE_QUERY,
            "{not json",
            {**GOOD_TEXT_QUERY, "pos_image_path": ""},  # marker without an image
            {**GOOD_IMAGE_QUERY, "qry": "no marker"},  # image without a marker
            {**GOOD_TEXT_QUERY, "pos_image_path": "missing.png"},
            {"pos_text": "x"},  # no query
            GOOD_TEXT_QUERY,
        ],
    )
    pairs, report = load_train_pairs([data], image_root)
    assert [p.source for p in pairs] == [f"{data}:1", f"{data}:7"]
    assert report.rows == 7 and len(report.skipped) == 5
    assert [s.split(": ", 1)[0] for s in report.skipped] == [f"{data}:{n}" for n in (2, 3, 4, 5, 6)]
    assert "invalid JSON" in report.skipped[0]
    assert "missing.png" in report.skipped[3]
    assert "skipped 5" in report.summary()


def test_error_policy_stops_at_the_first_bad_row(tmp_path, image_root):
    data = _write_jsonl(
        tmp_path / "train.jsonl", [GOOD_IMAGE_QUERY, {**GOOD_TEXT_QUERY, "pos_image_path": ""}]
    )
    with pytest.raises(BadRowError, match=rf"{data}:2: .*has <\|image_1\|> but"):
        load_train_pairs([data], image_root, on_bad="error")


def test_parquet_rows_read_like_jsonl(tmp_path, image_root):
    import pyarrow as pa  # the train extra's dependency: missing, it fails here instead of skipping
    import pyarrow.parquet as pq

    rows = [GOOD_IMAGE_QUERY, {**GOOD_TEXT_QUERY, "neg_text": "", "neg_image_path": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    pairs, report = load_train_pairs([tmp_path / "train.parquet"], image_root)
    assert len(pairs) == 2 and not report.skipped
    assert pairs[1].source.endswith("train.parquet:2")
    assert pairs[0].query == Side(GOOD_IMAGE_QUERY["qry"], "red.png")


def test_training_prompts_are_the_serving_prompts(tiny_embedder, image_root):
    """<|image_1|> + text becomes the same token ids as the API's {image, text} input."""
    image = (image_root / "red.png").read_bytes()
    side = Side("<|image_1|>\nRepresent the given image with the following question: What colour?", "red.png")
    served = {"image": image, "text": "Represent the given image with the following question: What colour?"}
    assert tiny_embedder.prompt(model_input(side, image_root)) == tiny_embedder.prompt(served)
    trained = tiny_embedder.preprocess(model_input(side, image_root))
    assert trained.input_ids == tiny_embedder.preprocess(served).input_ids
    # MMEB's image-alone layout is the shorthand's message; a bare marker is the authors'
    # literal "<image>" (a message that starts with the image is left as written).
    alone = tiny_embedder.prompt(model_input(Side("<|image_1|>\n", "red.png"), image_root))
    assert alone == tiny_embedder.prompt({"image": image}) and "<image>\n<|im_end|>" in alone
    bare = tiny_embedder.prompt(model_input(Side("<|image_1|>", "red.png"), image_root))
    assert "user\n<image><|im_end|>" in bare
    assert tiny_embedder.prompt(model_input(Side("a red circle"), None)) == tiny_embedder.prompt(
        {"text": "a red circle"}
    )


def test_dataset_replaces_a_corrupt_image_with_a_row_of_the_same_modality(
    tmp_path, image_root, tiny_embedder, caplog
):
    (image_root / "broken.png").write_bytes(b"\x89PNG not really")
    data = _write_jsonl(
        tmp_path / "train.jsonl",
        [{**GOOD_IMAGE_QUERY, "qry_image_path": "broken.png"}, GOOD_TEXT_QUERY, GOOD_IMAGE_QUERY],
    )
    pairs, _ = load_train_pairs([data], image_root)
    dataset = PairDataset(pairs, tiny_embedder, image_root)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        query, target, keys, _ = dataset[0]
    assert f"{data}:1: cannot preprocess" in caplog.text
    assert query.num_images == 1  # row 3 (also an image query) stood in
    assert keys == (pairs[2].query.key, pairs[2].target.key)
    strict = PairDataset(pairs, tiny_embedder, image_root, on_bad="error")
    with pytest.raises(BadRowError, match=f"{data}:1"):
        strict[0]


def test_collate_keeps_pairs_and_keys(tmp_path, image_root, tiny_embedder):
    data = _write_jsonl(tmp_path / "train.jsonl", [GOOD_TEXT_QUERY, GOOD_TEXT_QUERY])
    pairs, _ = load_train_pairs([data], image_root)
    batch = collate_pairs([PairDataset(pairs, tiny_embedder, image_root)[i] for i in range(2)])
    assert len(batch) == 2 and batch.keys.shape == (2, 2)
    assert batch.keys[0].tolist() == batch.keys[1].tolist()  # identical rows, identical keys
    tensors = tiny_embedder.collate(batch.targets, "cpu")
    assert tensors["pixel_values"].shape[0] >= 2


def test_content_keys_are_stable_and_distinct():
    # Pinned values, not a self-comparison: ranks and resumed runs must agree on the keys, so
    # they cannot depend on the process (Python's hash() would change with PYTHONHASHSEED).
    assert Side("a", "x.png").key == 73074464330962614
    assert Side("a").key == 6963791677552977958
    assert len({Side("a").key, Side("a", "x.png").key, Side("b").key}) == 3
    assert 0 <= Side("a").key < 2**63


def _modalities(n_image: int, n_text: int) -> list[str]:
    return ["image"] * n_image + ["text"] * n_text


def test_grouped_batches_share_a_modality_and_split_over_ranks():
    modalities = _modalities(37, 29)
    world, size = 2, 4
    samplers = [GroupedBatchSampler(modalities, size, world_size=world, rank=r, seed=3) for r in range(world)]
    per_rank = [list(s) for s in samplers]
    assert len(per_rank[0]) == len(per_rank[1]) == len(samplers[0]) == 37 // 8 + 29 // 8
    seen = []
    for parts in zip(*per_rank, strict=True):
        assert all(len(p) == size for p in parts)
        batch = [i for p in parts for i in p]
        assert len({modalities[i] for i in batch}) == 1
        seen += batch
    assert len(seen) == len(set(seen))
    again = list(GroupedBatchSampler(modalities, size, world_size=world, rank=0, seed=3))
    assert again == per_rank[0]


def test_epochs_reshuffle_and_skip_resumes_mid_epoch():
    sampler = GroupedBatchSampler(_modalities(40, 40), 4, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0, skip=5)
    assert list(sampler) == first[5:] and len(sampler) == len(first) - 5


def test_one_process_sees_the_global_batches_of_two():
    """Same seed: a single process with batch 2B sees the union of two ranks' B-slices."""
    modalities = _modalities(30, 30)
    single = list(GroupedBatchSampler(modalities, 8, seed=1))
    ranks = [list(GroupedBatchSampler(modalities, 4, world_size=2, rank=r, seed=1)) for r in range(2)]
    assert single == [a + b for a, b in zip(*ranks, strict=True)]


def test_hard_negatives_are_read_padded_and_collated(tmp_path, image_root, tiny_embedder):
    rows = [
        {
            **GOOD_TEXT_QUERY,
            "neg_text": ["<|image_1|>", "", "a red thing"],
            "neg_image_path": ["red.png", "", ""],
        },
        {**GOOD_IMAGE_QUERY, "neg_text": "blue"},  # MMEB's single string
        GOOD_TEXT_QUERY,  # none
        {**GOOD_TEXT_QUERY, "neg_text": ["x", "y"], "neg_image_path": ["red.png"]},  # unequal lists
    ]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    ignored, _ = load_train_pairs([data], image_root)
    assert all(p.negatives == () for p in ignored)  # off by default
    pairs, report = load_train_pairs([data], image_root, hard_negatives=2)
    assert len(pairs) == 3 and "negative" in report.skipped[0] and ":4:" in report.skipped[0]
    assert pairs[0].negatives == (Side("<|image_1|>", "red.png"), Side("a red thing"))
    assert pairs[1].negatives == (Side("blue"),) and pairs[2].negatives == ()
    one, _ = load_train_pairs([data], image_root, hard_negatives=1)
    assert one[0].negatives == (Side("<|image_1|>", "red.png"),)

    dataset = PairDataset(pairs, tiny_embedder, image_root, hard_negatives=2)
    batch = collate_pairs([dataset[i] for i in range(3)])
    assert len(batch.negatives) == 6  # every row has k = 2 slots
    assert batch.negative_valid.tolist() == [True, True, True, False, False, False]
    assert batch.negative_keys[:3].tolist() == [s.key for s in pairs[0].negatives + pairs[1].negatives]
    assert batch.negatives[0].num_images == 1
    assert (
        batch.negatives[3] is batch.targets[1] or batch.negatives[3].input_ids == batch.targets[1].input_ids
    )
    plain = collate_pairs([PairDataset(pairs, tiny_embedder, image_root)[i] for i in range(3)])
    assert plain.negatives == [] and plain.negative_valid is None


def test_special_strings_in_mmeb_rows_are_text(tiny_embedder, image_root):
    """In MMEB rows only ``<|image_1|>`` places the row's image; a literal ``<image>`` or
    ``<|im_end|>`` in a row's text is text, in training and evaluation alike."""
    side = parse_side(
        {"qry": "<|image_1|>\nWhat does <image> mean in <|im_end|>?", "qry_image_path": "red.png"},
        "qry",
        "qry_image_path",
        image_root,
        check_files=True,
    )
    prep = tiny_embedder.preprocess(model_input(side, image_root))
    assert prep.num_images == 1
    assert prep.input_ids.count(tiny_embedder.image_token_id) == tiny_embedder.image_tokens(
        *prep.image_sizes[0]
    )
    text = tiny_embedder.tokenizer.decode(prep.input_ids)
    assert "What does <image> mean in <|im_end|>?" in text
    im_end = tiny_embedder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert prep.input_ids.count(im_end) == 3  # the template's own, none from the text
