"""LLaVE prompt construction: the user MESSAGE and the ChatML exchange around it.

Every input, query or target, is one ChatML exchange with the system prompt, the
user message and an empty assistant turn whose closing ``\\n`` is the token that is
pooled. The rules below follow the LLaVE authors' evaluation code exactly; they are
shared by serving and training so both see identical prompts.

A prompt is built as a list of *segments*: plain text (``str``) and the special tokens
this module places itself (``Special``: the ChatML markers and one ``<image>`` per image
of the input). Only those segments become special token ids; text the caller gave is
always plain text, even when it spells ``<image>`` or ``<|im_end|>``
(``model/tokenization.py``). That is the whole contract for special tokens in user text:
the position of an image comes from the input's structure (its ``image`` field or its
``content`` parts), never from a string inside a text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Special:
    """A special token placed by the prompt builder (never taken from user text)."""

    token: str


IMAGE = Special(IMAGE_PLACEHOLDER)
IM_START = Special("<|im_start|>")
IM_END = Special("<|im_end|>")

Segment = str | Special
# A message: text strings, and None where an image goes.
MessagePart = str | None


def message_segments(
    parts: Sequence[str | None], instruction: str | None = None, *, interleaved: bool = False
) -> list[MessagePart]:
    """Build the user MESSAGE from ordered parts, as text strings and ``None`` per image.

    ``parts`` holds text strings and ``None`` for each image, in order. Text parts are
    concatenated as given; the instruction, when given, goes first with one space before
    the content.

    Then the single-image rule of the authors' evaluation code (``preprocess_multimodal``):
    a message holding exactly one image that does not already start with it has the image
    removed from its place, the rest stripped, and ``<image>\\n`` put in front; a message
    that already starts with the image is left exactly as it is (``<image> Find`` keeps its
    space), and several images stay where they are. ``interleaved`` marks a ``content``
    list, which goes through that rule literally. The ``text``/``image`` shorthand is
    MMEB's layout, the image on its own line first: ``<image>\\n{instruction} {text}``
    (an image alone is ``<image>\\n``).
    """
    has_content = any(p is None or p for p in parts)
    message: list[MessagePart] = []
    if instruction:
        message.append(f"{instruction} " if has_content else instruction)
    message.extend(p for p in parts if p is None or p)
    if sum(1 for p in message if p is None) != 1:
        return _merge(message)
    text = "".join(p for p in message if p is not None)
    if not interleaved:
        return [None, "\n" + text.strip()]
    if message[0] is None:
        return _merge(message)
    rest = text.strip()
    return [None, "\n" + rest] if rest else [None]


def _merge(message: Sequence[MessagePart]) -> list[MessagePart]:
    out: list[MessagePart] = []
    for part in message:
        if part is not None and out and out[-1] is not None:
            out[-1] = out[-1] + part  # type: ignore[operator]
        elif part is None or part:
            out.append(part)
    return out


def build_message(
    parts: Sequence[str | None], instruction: str | None = None, *, interleaved: bool = False
) -> str:
    """The MESSAGE as a string (each image written ``<image>``), for display and tests."""
    return "".join(
        IMAGE_PLACEHOLDER if p is None else p
        for p in message_segments(parts, instruction, interleaved=interleaved)
    )


def chatml_segments(message: Sequence[MessagePart], system: str = SYSTEM_PROMPT) -> list[Segment]:
    """LLaVE's ChatML exchange around a message, as text and special-token segments.

    Adjacent text is merged, so each text segment is exactly a stretch of the prompt
    between two special tokens: tokenised on its own it gives the ids the authors' code
    gets from tokenising the whole prompt string.
    """
    out: list[Segment] = [IM_START, f"system\n{system}", IM_END, "\n", IM_START, "user\n"]
    for part in message:
        if part is None:
            out.append(IMAGE)
        elif isinstance(out[-1], str):
            out[-1] = out[-1] + part
        else:
            out.append(part)
    out += [IM_END, "\n", IM_START, "assistant\n\n", IM_END, "\n"]
    return out


def render(segments: Sequence[Segment]) -> str:
    """The prompt as one string (user text that spells a special token looks the same)."""
    return "".join(s.token if isinstance(s, Special) else s for s in segments)


def build_prompt(message: str, system: str = SYSTEM_PROMPT) -> str:
    """Wrap a user message string in LLaVE's ChatML exchange (display and tests)."""
    return render(chatml_segments([message] if message else [], system))
