"""Tokenising prompts so that user text is always text.

A tokenizer matches its added tokens (``<image>``, ``<|im_start|>``, ``<|im_end|>``,
``<|endoftext|>``, ...) anywhere in a string before it splits the rest into words. Fed a
whole prompt, it would turn a user's ``"see <image> here"`` into an image placeholder with
no image, or a ``<|im_end|>`` into the end of the user's turn. ``PromptTokenizer`` instead
takes the prompt as segments (``model/prompts.py``): the special tokens the prompt
builder placed become their ids, and every text segment is tokenised with a copy of the
tokenizer that has no added tokens at all, so any string in it, special or not, is split
into ordinary tokens. For text that spells no special token the ids are exactly those of
tokenising the whole prompt string (each text segment lies between two special tokens,
where the tokenizer splits anyway).

A tokenizer without a fast (Rust) backend falls back to ``split_special_tokens``, and a
non-special added token that still matched is refused with an error naming it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .errors import InvalidInputError
from .prompts import IMAGE, Segment, Special


def _plain_backend(tokenizer: Any) -> Any | None:
    """A ``tokenizers.Tokenizer`` with the same pipeline and no added tokens (None if the
    tokenizer has no fast backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = []
    spec["truncation"] = None
    spec["padding"] = None
    return Tokenizer.from_str(json.dumps(spec))


class PromptTokenizer:
    """Turns prompt segments into token ids; text segments never yield special ids."""

    def __init__(self, tokenizer: Any, image_token_id: int) -> None:
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.added_ids = {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
        self._special_ids: dict[str, int] = {}
        self._plain = _plain_backend(tokenizer)

    def special_id(self, special: Special) -> int:
        if special is IMAGE:
            return self.image_token_id
        found = self._special_ids.get(special.token)
        if found is None:
            ids = self.tokenizer.convert_tokens_to_ids([special.token])
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if len(ids) != 1 or ids[0] is None or (unk is not None and ids[0] == unk):
                raise ValueError(f"the tokenizer has no {special.token!r} token")
            found = self._special_ids[special.token] = int(ids[0])
        return found

    def text_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text, tokenised as plain text."""
        if not texts:
            return []
        if self._plain is not None:
            # One text at a time: encode_batch hands even three short strings to the rayon
            # pool, whose threads then spin waiting for more (measured: bench/README.md,
            # "Profile of one request"); the preprocessing pool already runs inputs in parallel.
            return [self._plain.encode(text, add_special_tokens=False).ids for text in texts]
        out = self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True, verbose=False)[
            "input_ids"
        ]
        for ids in out:
            matched = self.added_ids.intersection(ids)
            if matched:
                names = sorted(self.tokenizer.convert_ids_to_tokens(sorted(matched)))
                raise InvalidInputError(
                    f"the text spells the tokenizer's added token(s) {names}, which this tokenizer "
                    "cannot read as plain text; remove or escape them"
                )
        return out

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        texts = [s for s in segments if isinstance(s, str)]
        encoded = iter(self.text_ids(texts))
        ids: list[int] = []
        for segment in segments:
            if isinstance(segment, Special):
                ids.append(self.special_id(segment))
            else:
                ids.extend(next(encoded))
        return ids
