"""LLaVE prompt construction: the user MESSAGE and the ChatML exchange around it.

Every input, query or target, is one ChatML exchange with the system prompt, the
user message and an empty assistant turn whose closing ``\\n`` is the token that is
pooled. The rules below follow the LLaVE authors' evaluation code exactly; they are
shared by serving and training so both see identical prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

IMAGE_PLACEHOLDER = "<image>"
SYSTEM_PROMPT = "You are a helpful assistant."

_CHATML = (
    "<|im_start|>system\n{system}<|im_end|>\n"
    "<|im_start|>user\n{message}<|im_end|>\n"
    "<|im_start|>assistant\n\n<|im_end|>\n"
)


def build_message(
    parts: Sequence[str | None], instruction: str | None = None, *, interleaved: bool = False
) -> str:
    """Build the user MESSAGE from ordered parts.

    ``parts`` holds text strings and ``None`` for each image, in order. Text parts are
    concatenated as given; each image becomes ``<image>``. The instruction, when given,
    goes first with one space before the content.

    Then the single-image rule of the authors' evaluation code (``preprocess_multimodal``):
    a message holding exactly one ``<image>`` that does not already start with it has the
    placeholder removed, the rest stripped, and ``<image>\n`` put in front; a message that
    already starts with ``<image>`` is left exactly as it is (``<image> Find`` keeps its
    space), and several images stay where they are. ``interleaved`` marks a ``content``
    list, which goes through that rule literally. The ``text``/``image`` shorthand is
    MMEB's layout, the image on its own line first: ``<image>\n{instruction} {text}``
    (an image alone is ``<image>\n``).
    """
    content = "".join(IMAGE_PLACEHOLDER if p is None else p for p in parts)
    if instruction and content:
        message = f"{instruction} {content}"
    else:
        message = instruction or content
    if message.count(IMAGE_PLACEHOLDER) != 1:
        return message
    if not interleaved:
        return IMAGE_PLACEHOLDER + "\n" + message.replace(IMAGE_PLACEHOLDER, "").strip()
    if message.startswith(IMAGE_PLACEHOLDER):
        return message
    return (IMAGE_PLACEHOLDER + "\n" + message.replace(IMAGE_PLACEHOLDER, "").strip()).strip()


def build_prompt(message: str, system: str = SYSTEM_PROMPT) -> str:
    """Wrap a user message in LLaVE's ChatML exchange."""
    return _CHATML.format(system=system, message=message)
