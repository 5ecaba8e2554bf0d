"""LLaVA-OneVision pieces adapted to match the LLaVE authors' code exactly.

transformers' OneVision classes reproduce the authors' embeddings bit for bit except in
the places handled here (docs/architecture.md, "Fidelity notes"):

1. Unpadding rounding. The authors truncate (``int(x)``) when they compute the height
   or width of the unpadded feature grid; transformers rounds (``int(round(x, 7))``).
   ``count_image_tokens`` (used to expand ``<image>`` placeholders) and
   ``pack_image_features`` (bound onto the loaded model) both truncate.
2. Length. The authors cut the spliced sequence to ``tokenizer_model_max_length``; the
   cut lives in ``model/embedder.py``. Images after the cut are not even decoded there;
   for an image the cut falls inside, ``image_feature_limits`` has the packing keep only
   its first features, as the authors' splice-then-cut does.
3. Image backend. ``LlavaOnevisionImageProcessorPil`` is used explicitly, so a machine
   with torchvision installed does not silently switch to the unverified fast backend.
4. Several images in one input. The authors tile each like a lone image; transformers
   gives each a single crop. ``count_image_tokens`` has no multi-image case, and the
   embedder hands each image to the processor as its own sample (``model/embedder.py``).
"""

from __future__ import annotations

import contextlib
import math
import re
import types
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

__all__ = [
    "LLAVE_GRID",
    "ImageProcessor",
    "count_image_tokens",
    "image_feature_limits",
    "install_authors_packing",
    "parse_grid_pinpoints",
]

ImageProcessor = LlavaOnevisionImageProcessorPil

# LLaVE trained with 1x1..2x2 crops (docs/architecture.md, "Fidelity notes"), in units of the crop size.
LLAVE_GRID = [(1, 1), (1, 2), (2, 1), (2, 2)]


def parse_grid_pinpoints(value, crop: int) -> list[list[int]]:
    """Grid pinpoints in pixels from a config value.

    Accepts a list of ``[h, w]`` pixel pairs, or the LLaVA-NeXT range string
    ``"(1x1),...,(2x2)"`` expanded in units of ``crop``; ``None`` gives LLaVE's 2x2 grid.
    """
    if value is None:
        return [[h * crop, w * crop] for h, w in LLAVE_GRID]
    if isinstance(value, str):
        found = [(int(a), int(b)) for a, b in re.findall(r"\((\d+)x(\d+)\)", value)]
        if len(found) < 1:
            raise ValueError(f"cannot parse image_grid_pinpoints {value!r}")
        if "..." in value and len(found) == 2:
            (h0, w0), (h1, w1) = found
            found = [(h, w) for h in range(h0, h1 + 1) for w in range(w0, w1 + 1)]
        return [[h * crop, w * crop] for h, w in found]
    return [[int(h), int(w)] for h, w in value]


def _unpadded_grid(orig_h: int, orig_w: int, cur_h: int, cur_w: int) -> tuple[int, int, int]:
    """Rows and columns of the feature grid after removing padding, truncating like the
    authors' ``unpad_image``. Returns (rows, cols, padding) where padding is removed
    from both ends of the padded axis."""
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w, pad
    new_w = int(orig_w * (cur_h / orig_h))
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad, pad


def _max_patches(vision_aspect_ratio: str) -> int:
    return int(vision_aspect_ratio.removeprefix("anyres_max_"))


def count_image_tokens(
    height: int,
    width: int,
    *,
    crop: int,
    patch: int,
    grid_pinpoints: Sequence[Sequence[int]],
    vision_aspect_ratio: str = "anyres_max_9",
) -> int:
    """Number of ``<image>`` tokens one image becomes, as the authors' model packs it:
    the base crop (side^2 features), then the unpadded grid with one newline feature per
    row. Every image is tiled so, also when an input holds several (the authors' model
    code does; transformers would give each of those one crop plus a newline).
    """
    side = crop // patch
    base = side * side
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in grid_pinpoints])
    rows, cols, _ = _unpadded_grid(height, width, side * (best_h // crop), side * (best_w // crop))
    ratio = math.sqrt(rows * cols / (_max_patches(vision_aspect_ratio) * side * side))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return base + rows * cols + rows


def _pack_image_features(
    self, image_features, image_sizes, image_newline=None, vision_aspect_ratio="anyres_max_9"
):
    """Drop-in replacement for ``LlavaOnevisionModel.pack_image_features`` that unpads
    with the authors' truncation. Same inputs and outputs as the transformers method."""
    vision = self.config.vision_config
    side = vision.image_size // vision.patch_size
    packed, lengths = [], []
    for idx, feats in enumerate(image_features):
        if feats.shape[0] > 1:
            base, grid = feats[0], feats[1:]
            if base.shape[0] != side * side:
                raise ValueError("the number of patches is not consistent with the image size")
            grid_h, grid_w = get_anyres_image_grid_shape(
                image_sizes[idx], self.config.image_grid_pinpoints, vision.image_size
            )
            grid = grid.view(grid_h, grid_w, side, side, -1)
            grid = grid.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)  # (C, H, W)
            orig_h, orig_w = (int(v) for v in image_sizes[idx])
            cur_h, cur_w = grid.shape[1:]
            rows, cols, pad = _unpadded_grid(orig_h, orig_w, cur_h, cur_w)
            if rows != cur_h:
                grid = grid[:, pad : cur_h - pad, :]
            elif cols != cur_w:
                grid = grid[:, :, pad : cur_w - pad]
            channels, rows, cols = grid.shape
            ratio = math.sqrt(rows * cols / (_max_patches(vision_aspect_ratio) * side * side))
            if ratio > 1.1:
                grid = nn.functional.interpolate(
                    grid[None], [int(rows // ratio), int(cols // ratio)], mode="bilinear"
                )[0]
            if image_newline is not None:
                newline = image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid.device, grid.dtype)
                grid = torch.cat((grid, newline), dim=-1)
            feats = torch.cat((base, grid.flatten(1, 2).transpose(0, 1)), dim=0)
        else:
            feats = feats[0]
            if image_newline is not None:
                feats = torch.cat((feats, image_newline[None].to(feats)), dim=0)
        limits = getattr(self, "_llave_feature_limits", None)
        if limits is not None and limits[idx] is not None:
            feats = feats[: limits[idx]]  # the length cut falls inside this image
        packed.append(feats)
        lengths.append(feats.shape[0])
    return packed, torch.tensor(lengths, dtype=torch.long, device=image_features[0].device)


def install_authors_packing(onevision_model: nn.Module) -> None:
    """Bind the truncating ``pack_image_features`` onto one ``LlavaOnevisionModel``
    instance (no global patching: other models in the process are untouched)."""
    onevision_model.pack_image_features = types.MethodType(_pack_image_features, onevision_model)


@contextlib.contextmanager
def image_feature_limits(onevision_model: nn.Module, limits: Sequence[int | None] | None) -> Iterator[None]:
    """Within the block, the packing keeps only the first ``limits[i]`` features of image
    ``i`` of the next forward (``None``: all of them). The model is used by one thread."""
    if limits is None:
        yield
        return
    onevision_model._llave_feature_limits = list(limits)
    try:
        yield
    finally:
        onevision_model._llave_feature_limits = None


# --- video (the authors' video branch of prepare_inputs_labels_for_multimodal) ----------


def count_video_tokens(frames: int, *, crop: int, patch: int) -> int:
    """Tokens one video becomes: per frame, its features pooled 2x2 (rounding up, 27x27 ->
    14x14) with a newline after each row (14 x 15 = 210 at 384px), frames back to back."""
    side = math.ceil((crop // patch) / 2)
    return frames * side * (side + 1)


def frame_features(onevision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(frames, 3, H, W) -> (frames, side*side, dim): the vision tower and the projector,
    exactly as ``get_image_features`` treats one crop of an image (the authors'
    ``encode_images``, which their video branch calls too)."""
    config = onevision_model.config
    hidden = onevision_model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    layer = config.vision_feature_layer
    feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
    if config.vision_feature_select_strategy == "default":
        feats = feats[:, 1:]
    return onevision_model.multi_modal_projector(feats)


def pack_video_features(features: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """(frames, side*side, dim) -> (frames * rows * (cols + 1), dim).

    The authors' ``get_2dPool`` (``mm_spatial_pool_mode`` "bilinear": ``interpolate`` to
    ``ceil(side / 2)`` a side, stride 2 whatever the config says), then
    ``add_token_per_grid`` (``mm_newline_position`` "grid"): each frame's rows in order,
    ``image_newline`` after every row, nothing between frames.
    """
    frames, tokens, dim = features.shape
    side = math.isqrt(tokens)
    grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)  # (frames, dim, side, side)
    rows = cols = math.ceil(side / 2)
    grid = nn.functional.interpolate(grid, size=[rows, cols], mode="bilinear")
    newline = image_newline[None, :, None, None].expand(frames, dim, rows, 1).to(grid.device, grid.dtype)
    grid = torch.cat((grid, newline), dim=-1)  # (frames, dim, rows, cols + 1)
    return grid.permute(0, 2, 3, 1).reshape(frames * rows * (cols + 1), dim)


def splice_media(
    onevision_model: nn.Module,
    tensors: dict,
    video_frames: Sequence[int],
    feature_limits: Sequence[int | None] | None,
    image_token_id: int,
) -> dict:
    """The model's inputs with ``inputs_embeds`` in place of ``input_ids`` and the pixels:
    each image's features (``get_image_features``, exactly as the forward pass would
    compute them) and each video's (``frame_features`` + ``pack_video_features``) put at
    their ``<image>`` positions, in order; ``feature_limits`` cuts the one the length cut
    falls inside. ``video_frames`` gives, per image place of the batch, 0 for an image or
    the video's frame count (its rows of ``pixel_values``)."""
    tensors = dict(tensors)
    input_ids = tensors.pop("input_ids")
    pixel_values, image_sizes = tensors.pop("pixel_values"), tensors.pop("image_sizes")
    config = onevision_model.config
    crop = config.vision_config.image_size
    rows = [
        frames or image_size_to_num_patches(size, config.image_grid_pinpoints, crop)
        for size, frames in zip(image_sizes.tolist(), video_frames, strict=True)
    ]
    chunks = torch.split(pixel_values, rows)
    limits = list(feature_limits) if feature_limits is not None else [None] * len(rows)
    features: list[torch.Tensor | None] = [None] * len(rows)
    images = [i for i, frames in enumerate(video_frames) if not frames]
    if images:
        with image_feature_limits(onevision_model, [limits[i] for i in images]):
            out = onevision_model.get_image_features(
                torch.cat([chunks[i] for i in images]),
                image_sizes[images],
                vision_feature_layer=config.vision_feature_layer,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
            )
        for i, feats in zip(images, getattr(out, "pooler_output", out), strict=True):
            features[i] = feats
    for i, frames in enumerate(video_frames):
        if frames:
            feats = pack_video_features(
                frame_features(onevision_model, chunks[i]), onevision_model.image_newline
            )
            features[i] = feats[: limits[i]] if limits[i] is not None else feats
    embeds = onevision_model.get_input_embeddings()(input_ids)
    spliced = torch.cat([f for f in features if f is not None]).to(embeds.device, embeds.dtype)
    places = (input_ids == image_token_id).unsqueeze(-1).expand_as(embeds)
    if int(places.sum()) != spliced.numel():  # a broken invariant, never user input
        raise RuntimeError(
            f"{int(places.sum()) // embeds.shape[-1]} image places for {spliced.shape[0]} features"
        )
    tensors["inputs_embeds"] = embeds.masked_scatter(places, spliced)
    return tensors
