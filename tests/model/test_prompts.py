"""LLaVE prompt format: the exact MESSAGE, ChatML text and token sequence."""

from __future__ import annotations

import pytest

from model.prompts import build_message, build_prompt

HEAD = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n\n<|im_end|>\n"


@pytest.mark.parametrize(
    ("parts", "instruction", "expected"),
    [
        (["a red circle"], None, "a red circle"),
        (["a red circle"], "Find an image:", "Find an image: a red circle"),
        ([None], None, "<image>\n"),
        ([None, "what is this?"], None, "<image>\nwhat is this?"),
        ([None], "Represent the given image.", "<image>\nRepresent the given image."),
        (
            [None, "What is in the image"],
            "Represent the given image with the following question:",
            "<image>\nRepresent the given image with the following question: What is in the image",
        ),
        # The shorthand is MMEB's layout: the image on its own line first.
        ([None, " padded "], None, "<image>\npadded"),
        # Several images stay where they are; text parts are joined with nothing between.
        (["A:", None, "B:", None], None, "A:<image>B:<image>"),
        ([None, None], "Compare", "Compare <image><image>"),
        ([], "only an instruction", "only an instruction"),
    ],
)
def test_build_message(parts, instruction, expected):
    assert build_message(parts, instruction) == expected


@pytest.mark.parametrize(
    ("parts", "instruction", "expected"),
    [
        # One image in the middle: moved to the front, the rest stripped.
        (["left ", None, " right"], None, "<image>\nleft  right"),
        (["  ", None], None, "<image>"),  # the authors strip the result too
        (["Find a caption for ", None], "Task:", "<image>\nTask: Find a caption for"),
        # Already in front: left exactly as it is (the authors' preprocess_multimodal).
        ([None, " Find a caption"], None, "<image> Find a caption"),
        ([None, "a cat"], None, "<image>a cat"),
        ([None], None, "<image>"),
        ([None, "\nRepresent the given image. "], None, "<image>\nRepresent the given image. "),
        (["A:", None, "B:", None], None, "A:<image>B:<image>"),
    ],
)
def test_interleaved_content_follows_the_authors_rule_literally(parts, instruction, expected):
    assert build_message(parts, instruction, interleaved=True) == expected


def test_chatml_exchange_is_exact():
    assert build_prompt("hello") == HEAD + "hello" + TAIL


def test_embedder_prompt_matches_rules(tiny_embedder, png_b64):
    img = png_b64(32, 32)
    assert tiny_embedder.prompt({"text": "a cat"}) == HEAD + "a cat" + TAIL
    assert tiny_embedder.prompt({"image": img, "text": "a cat"}) == HEAD + "<image>\na cat" + TAIL
    assert tiny_embedder.prompt({"image": img, "instruction": "Represent the given image."}) == (
        HEAD + "<image>\nRepresent the given image." + TAIL
    )
    interleaved = {
        "content": [
            {"type": "text", "text": "x"},
            {"type": "image", "image": img},
            {"type": "text", "text": "y"},
            {"type": "image", "image": img},
        ]
    }
    assert tiny_embedder.prompt(interleaved) == HEAD + "x<image>y<image>" + TAIL


def test_token_sequence_for_image_and_text(tiny_embedder, png_b64):
    """Tokens are the tokenised prompt with each <image> expanded in place to its count."""
    emb = tiny_embedder
    tok = emb.tokenizer
    img = png_b64(64, 64)
    prep = emb.preprocess({"image": img, "text": "a red circle", "instruction": "Find:"})
    prompt = HEAD + "<image>\nFind: a red circle" + TAIL
    raw = tok(prompt, add_special_tokens=False)["input_ids"]
    assert raw.count(emb.image_token_id) == 1
    k = raw.index(emb.image_token_id)
    n = emb.image_tokens(64, 64)
    assert prep.input_ids == raw[:k] + [emb.image_token_id] * n + raw[k + 1 :]
    # The pooled token is the closing newline of the assistant turn.
    assert tok.decode(prep.input_ids[-1:]) == "\n"
    assert tok.decode(prep.input_ids[-2:-1]) == "<|im_end|>"
    # Specials are single tokens.
    for special in ("<|im_start|>", "<|im_end|>", "<image>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_text_only_has_no_image_token(tiny_embedder):
    prep = tiny_embedder.preprocess({"text": "no pictures here", "instruction": "Represent the text"})
    assert tiny_embedder.image_token_id not in prep.input_ids
    assert prep.pixel_values is None and prep.num_images == 0
