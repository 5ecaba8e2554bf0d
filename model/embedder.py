"""The LLaVE embedder: preprocess (CPU) -> forward (device) -> postprocess.

The three stages are separate so a server can run preprocessing in a worker pool while
the device runs the previous batch, and so each stage can be timed on its own.
``cost`` (the sequence length, image tokens included) drives the batcher's token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import InputTooLongError
from .inputs import ImageLimits, ParsedInput, decode_image, open_image, parse_input
from .onevision import (
    ImageProcessor,
    count_image_tokens,
    count_video_tokens,
    image_feature_limits,
    splice_media,
)
from .prompts import Segment, chatml_segments, message_segments, render
from .tokenization import PromptTokenizer
from .video import FrameSampling, VideoLimits, VideoReader, frames_to_pixels, open_video

IMAGE_FEATURE_LIMITS = "image_feature_limits"  # collate's key for images cut by the length limit
VIDEO_FRAMES = "video_frames"  # collate's key: frames of each image place (0 for an image)


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(n, L, d) hidden states -> (n, d) at each row's last real token.

    The index comes from the mask itself, so it is right for left and right padding
    alike (``mask.sum() - 1`` is wrong under left padding). Shared with the trainer.
    """
    last = mask.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)  # (n,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@dataclass
class PreparedInput:
    """One input after CPU preprocessing, ready to be collated into a batch."""

    input_ids: list[int]
    pixel_values: np.ndarray | None = None  # (crops, 3, H, W) float32, all images of the input
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) per image
    truncated: bool = False
    # When the length cut falls inside the last image: how many of its features are kept
    # (the authors splice every image's features, then cut the sequence).
    cut_image_tokens: int | None = None
    # Per entry of image_sizes: 0 for an image, the frame count for a video (whose frames
    # are its rows of pixel_values and whose size is the crop's). Empty: all images.
    video_frames: list[int] = field(default_factory=list)

    @property
    def num_images(self) -> int:
        """Image places: images and videos."""
        return len(self.image_sizes)

    @property
    def num_videos(self) -> int:
        return sum(1 for frames in self.video_frames if frames)

    @property
    def cost(self) -> int:
        """Sequence length in tokens, image tokens included."""
        return len(self.input_ids)


@dataclass(frozen=True, kw_only=True)
class EmbedderConfig:
    """Options of an :class:`Embedder` (plain values; nothing is read from the environment)."""

    max_length: int = 4096
    image_limits: ImageLimits = ImageLimits()
    vision_aspect_ratio: str = "anyres_max_9"
    video_limits: VideoLimits = VideoLimits()
    video_sampling: FrameSampling = FrameSampling()
    video_max_length: int = 8192  # the cut of an input holding a video (the authors' retrieval script)


class Preprocessor:
    """Stage 1 on its own: parse, decode and tile images, build the prompt and tokenise.

    Holds only what preprocessing needs (the tokenizer, the image processor and a few
    numbers from the model's config), never the weights, and pickles: a server builds it
    where the model is loaded and ships it to the processes that preprocess requests, so
    both sides use exactly the same tokenizer and tiling.
    """

    def __init__(self, tokenizer, image_processor: ImageProcessor, model_config, config: EmbedderConfig):
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.config = config
        self.image_token_id: int = (
            model_config.image_token_id
            if hasattr(model_config, "image_token_id")
            else model_config.image_token_index
        )
        self.crop: int = model_config.vision_config.image_size
        self.patch: int = model_config.vision_config.patch_size
        self.grid_pinpoints = [list(p) for p in model_config.image_grid_pinpoints]
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else (tokenizer.eos_token_id or 0)
        # User text is always plain text: special strings in it never become special ids.
        self.tokens = PromptTokenizer(tokenizer, self.image_token_id)

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def limits(self) -> ImageLimits:
        return self.config.image_limits

    # ------------------------------------------------------------------ stage 1: CPU
    def image_tokens(self, height: int, width: int) -> int:
        return count_image_tokens(
            height,
            width,
            crop=self.crop,
            patch=self.patch,
            grid_pinpoints=self.grid_pinpoints,
            vision_aspect_ratio=self.config.vision_aspect_ratio,
        )

    @staticmethod
    def _segments(parsed: ParsedInput) -> list[Segment]:
        return chatml_segments(
            message_segments(parsed.parts, parsed.instruction, interleaved=parsed.interleaved)
        )

    def prompt(self, inp: Any) -> str:
        """The exact ChatML prompt for one input (``<image>`` not yet expanded)."""
        return render(self._segments(self._parse(inp)))

    def _expand(self, ids: list[int], counts: Sequence[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Replace each ``<image>`` id by its feature count; return ids and image spans."""
        if ids.count(self.image_token_id) != len(counts):  # a broken invariant, never user input
            raise RuntimeError(
                f"the prompt holds {ids.count(self.image_token_id)} image tokens for {len(counts)} images"
            )
        out: list[int] = []
        spans: list[tuple[int, int]] = []
        it = iter(counts)
        for tok in ids:
            if tok == self.image_token_id:
                n = next(it)
                spans.append((len(out), len(out) + n))
                out.extend([tok] * n)
            else:
                out.append(tok)
        return out, spans

    def _cut(
        self, ids: list[int], spans: list[tuple[int, int]], truncate: bool, limit: int
    ) -> tuple[list[int], list[int], bool]:
        """Cut the spliced sequence to ``limit``, as the authors do.

        Returns the kept ids, how many features of each image are kept (all, some when the
        cut falls inside it, 0 when it falls before it) and whether anything was cut.
        """
        if len(ids) <= limit:
            return ids, [end - start for start, end in spans], False
        if not truncate:
            raise InputTooLongError(
                f"input is {len(ids)} tokens (image tokens included); the model's limit is {limit}"
            )
        kept = [max(0, min(end, limit) - start) for start, end in spans]
        return ids[:limit], kept, True

    def _parse(self, inp: Any) -> ParsedInput:
        return parse_input(inp, self.limits, max_videos=self.config.video_limits.max_videos)

    def _open_media(self, parsed: ParsedInput) -> list[Any]:
        """Each image opened lazily (header read) and each video's packets read, in order."""
        opened: list[Any] = []
        try:
            for kind, value in parsed.media:
                if kind == "video":
                    opened.append(open_video(value, self.config.video_limits))
                else:
                    opened.append(open_image(value, self.limits))
        except BaseException:
            _close_videos(opened)
            raise
        return opened

    def _media_tokens(self, item: Any) -> int:
        if isinstance(item, VideoReader):
            frames = len(item.sample(self.config.video_sampling))
            return count_video_tokens(frames, crop=self.crop, patch=self.patch)
        return self.image_tokens(item.height, item.width)

    def _limit(self, parsed: ParsedInput) -> int:
        return self.config.video_max_length if parsed.videos else self.max_length

    def preprocess(self, inp: Any, *, truncate: bool = True) -> PreparedInput:
        """Parse, decode and tile images, decode videos, build the prompt and tokenise
        (thread-safe).

        Image headers and video packets are read (and checked against the limits) first;
        only the media whose features survive the length cut are decoded."""
        parsed = self._parse(inp)
        ids = self.tokens.encode(self._segments(parsed))
        opened = self._open_media(parsed)
        try:
            counts = [self._media_tokens(item) for item in opened]
            ids, spans = self._expand(ids, counts)
            ids, kept, truncated = self._cut(ids, spans, truncate, self._limit(parsed))
            keep = [item for item, n in zip(opened, kept, strict=True) if n > 0]
            pixels = self._pixels(keep)
        finally:
            _close_videos(opened)
        cut_image_tokens = None
        if keep:
            last = len(keep) - 1  # the kept media are a prefix: the cut drops a suffix
            if kept[last] < counts[last]:
                cut_image_tokens = kept[last]
        frames = [
            p.shape[0] if isinstance(item, VideoReader) else 0 for item, p in zip(keep, pixels, strict=True)
        ]
        return PreparedInput(
            input_ids=ids,
            pixel_values=np.concatenate(pixels, axis=0) if pixels else None,
            image_sizes=[
                (self.crop, self.crop) if f else (im.height, im.width)
                for im, f in zip(keep, frames, strict=True)
            ],
            truncated=truncated,
            cut_image_tokens=cut_image_tokens,
            video_frames=frames if any(frames) else [],
        )

    def _pixels(self, media: list[Any]) -> list[np.ndarray]:
        """Float32 pixels of each kept image (its anyres crops) or video (its frames)."""
        out: list[np.ndarray | None] = [None] * len(media)
        images = [
            (i, decode_image(m, self.limits)) for i, m in enumerate(media) if not isinstance(m, VideoReader)
        ]
        if images:
            # One sample per image: the processor then tiles each with anyres (base crop +
            # grid), as the authors do for every image; given them as one sample it would
            # keep a single crop per image.
            feats = self.image_processor(images=[[im] for _, im in images], return_tensors=None, do_pad=False)
            for (i, _), p in zip(images, feats["pixel_values"], strict=True):
                out[i] = np.asarray(p, dtype=np.float32)
        for i, m in enumerate(media):
            if isinstance(m, VideoReader):
                # Each kept frame squashed to the crop (bicubic), rescaled and normalised
                # as the authors' SigLIP processor does; no anyres tiling for video frames.
                decoded = m.decode(m.sample(self.config.video_sampling), self.crop, poster_side=16)
                p = self.image_processor
                out[i] = frames_to_pixels(decoded.frames, p.image_mean, p.image_std)
        return [p for p in out if p is not None]

    def estimate_cost(self, inp: Any) -> int:
        """Sequence length of an input from the text, the image headers and the video
        packets only (nothing decoded)."""
        parsed = self._parse(inp)
        ids = self.tokens.encode(self._segments(parsed))
        opened = self._open_media(parsed)
        try:
            extra = sum(self._media_tokens(item) - 1 for item in opened)
        finally:
            _close_videos(opened)
        return min(len(ids) + extra, self._limit(parsed))

    def warmup_inputs(self, n: int, tokens: int) -> list[PreparedInput]:
        """``n`` prepared text inputs of about ``tokens`` tokens each, for a warm-up pass."""
        base = len(self.tokens.encode(chatml_segments([])))
        ids = self.tokens.encode(chatml_segments(["hello " * max(0, tokens - base)]))
        ids = ids[: max(base, min(tokens, self.max_length))]
        return [PreparedInput(input_ids=list(ids)) for _ in range(n)]


def _close_videos(opened: Sequence[Any]) -> None:
    for item in opened:
        if isinstance(item, VideoReader):
            item.close()


class Embedder:
    """Turns text, images and interleaved image+text into LLaVE embeddings.

    ``model`` is a ``LlavaOnevisionModel`` (no LM head) whose ``pack_image_features``
    truncates like the authors' code; ``tokenizer`` knows ``<image>``;
    ``image_processor`` is the PIL OneVision processor.
    """

    def __init__(
        self, model, tokenizer, image_processor: ImageProcessor, *, name: str, config: EmbedderConfig
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.name = name
        self.config = config
        self.dim: int = model.config.text_config.hidden_size
        self.preprocessor = Preprocessor(tokenizer, image_processor, model.config, config)
        self.pad_token_id = self.preprocessor.pad_token_id
        self.image_token_id = self.preprocessor.image_token_id

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    @property
    def dtype(self) -> str:
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def limits(self) -> ImageLimits:
        return self.config.image_limits

    # ------------------------------------------------------------------ stage 1: CPU
    # (``Preprocessor``; kept here so that one object can do all three stages)
    def preprocess(self, inp: Any, *, truncate: bool = True) -> PreparedInput:
        return self.preprocessor.preprocess(inp, truncate=truncate)

    def prompt(self, inp: Any) -> str:
        return self.preprocessor.prompt(inp)

    def image_tokens(self, height: int, width: int) -> int:
        return self.preprocessor.image_tokens(height, width)

    def estimate_cost(self, inp: Any) -> int:
        return self.preprocessor.estimate_cost(inp)

    def warmup_inputs(self, n: int, tokens: int) -> list[PreparedInput]:
        return self.preprocessor.warmup_inputs(n, tokens)

    # ------------------------------------------------------------------ stage 2: device
    def collate(
        self, batch: Sequence[PreparedInput], device: str | torch.device | None = None
    ) -> dict[str, Any]:
        """Right-pad a batch into model tensors (pixel crops of all images concatenated)."""
        device = device or self.device
        width = max(p.cost for p in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, : p.cost] = torch.as_tensor(p.input_ids, dtype=torch.long)
            mask[row, : p.cost] = 1
        out: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        crops = [p.pixel_values for p in batch if p.pixel_values is not None]
        if crops:
            out["pixel_values"] = torch.from_numpy(np.concatenate(crops, axis=0)).to(device)
            out["image_sizes"] = torch.tensor([s for p in batch for s in p.image_sizes], dtype=torch.long).to(
                device
            )
            if any(p.video_frames for p in batch):
                out[VIDEO_FRAMES] = [f for p in batch for f in (p.video_frames or [0] * p.num_images)]
            if any(p.cut_image_tokens is not None for p in batch):
                # Per image of the batch: how many of its features the cut keeps (None: all).
                out[IMAGE_FEATURE_LIMITS] = [
                    p.cut_image_tokens if i == p.num_images - 1 else None
                    for p in batch
                    for i in range(p.num_images)
                ]
        return out

    def encode(self, tensors: dict[str, Any], model: torch.nn.Module | None = None) -> torch.Tensor:
        """Pooled final hidden states (n, dim) of the last real token of each row.

        Differentiable (no ``no_grad``). ``model`` runs the forward instead of
        ``self.model`` (e.g. the trainer's DDP wrapper, so its gradient hooks fire).
        """
        tensors = dict(tensors)
        limits = tensors.pop(IMAGE_FEATURE_LIMITS, None)
        frames = tensors.pop(VIDEO_FRAMES, None)
        if "pixel_values" in tensors:
            tensors["pixel_values"] = tensors["pixel_values"].to(self.model.dtype)
        if frames is not None:  # videos: their features are spliced here (images as forward would)
            tensors = splice_media(self.model, tensors, frames, limits, self.image_token_id)
            limits = None
        with image_feature_limits(self.model, limits):
            hidden = (model or self.model)(
                **tensors, use_cache=False
            ).last_hidden_state  # (n, L, dim), after the final norm
        return last_token_pool(hidden, tensors["attention_mask"])

    def forward(self, batch: Sequence[PreparedInput]) -> torch.Tensor:
        """Device stage: collate and run the model in inference mode."""
        with torch.inference_mode():
            return self.encode(self.collate(batch))

    # ------------------------------------------------------------------ stage 3: CPU
    @staticmethod
    def postprocess(pooled: torch.Tensor, *, normalize: bool = True) -> np.ndarray:
        """Optionally L2-normalise, then return float32 numpy (n, dim)."""
        pooled = pooled.float()
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=-1)
        return pooled.cpu().numpy().astype(np.float32, copy=False)

    # ------------------------------------------------------------------ convenience
    def embed(
        self, inputs: Sequence[Any], *, truncate: bool = True, normalize: bool = True, batch_size: int = 16
    ) -> np.ndarray:
        """Embed any number of inputs; rows follow the input order."""
        if isinstance(inputs, (dict, str)):
            inputs = [inputs]
        prepared = [self.preprocess(x, truncate=truncate) for x in inputs]
        out = np.zeros((len(prepared), self.dim), dtype=np.float32)
        # Sort by length so each chunk pads little; results go back to input order.
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].cost)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.postprocess(self.forward([prepared[i] for i in idx]), normalize=normalize)
        return out
