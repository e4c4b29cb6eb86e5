"""The FairHuman pieces of the recipe, importable on their own.

FairHuman (ICCV 2025) trains a diffusion model on three objectives computed from ONE denoising
prediction -- the plain global loss, a hand-region loss and a face-region loss -- and combines
their gradients with alpha-fair (alpha = 2: Minimum Potential Delay) weights.

This module holds everything method-specific, as small functions without global state:

* images read upright (EXIF orientation applied): :func:`open_image`, :func:`image_size`
* boxes -> pixel masks: :func:`parse_box`, :func:`parse_boxes`, :func:`boxes_to_mask`, :func:`binarize_mask_image`,
  :func:`box_units_problem`
* aspect-ratio buckets: :func:`make_buckets`, :func:`assign_bucket`, :func:`bucket_granularity`
* the transform that moves image and masks together: :func:`resize_crop_plan`, :func:`paired_transform`,
  :func:`region_boxes`, :func:`box_area_kept`
* pixel masks -> latent masks: :func:`masks_to_latent`
* the objectives (global + one per region; default hand and face): :func:`objective_names`, :func:`fairhuman_losses`
* the alpha-fair solver: :func:`solve_fair_weights`
* per-objective gradients and their combination: :class:`ObjectiveGradients`
* how the objective gradients become the update, for every weighting mode, with the exact-solve
  schedule and its checkpoint state: :class:`FairUpdate` (what the training loop calls)
* the LoRA in the kohya format that ComfyUI / A1111 / Forge load: :func:`lora_to_kohya`
* byte-reproducible files: :func:`json_ready_config`, :func:`make_safetensors_reproducible`

The training script ``train_fairhuman_lora.py`` wires them into a diffusers-style loop.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

OBJECTIVES = ("global", "hand", "face")
"""The default objectives (FairHuman's), in the order used everywhere: losses, gradient rows, weights and
logs. A run with named regions (``--region NAME=COLUMN``) has its own list, ``("global", *region names)``
(:func:`objective_names`), passed to the pieces that need it (:class:`FairUpdate`)."""

GLOBAL_OBJECTIVE = "global"
"""The whole-latent objective, always first; no region may take its name."""

REGION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
"""What a region name may look like: it becomes a log tag (``loss/NAME``), a file name (mask previews)
and a JSON key."""


def objective_names(regions: Sequence[str]) -> tuple[str, ...]:
    """``("global", *regions)``: the objectives of a run whose region objectives are ``regions`` (K = 1 +
    the number of regions). Raises ``ValueError`` for no region, a duplicate name, the name "global" or a
    name that is not a plain identifier (letters, digits, ``_``, ``-``; starting with a letter)."""
    regions = list(regions)
    if not regions:
        raise ValueError("at least one region objective is needed")
    for name in regions:
        if not isinstance(name, str) or not REGION_NAME.fullmatch(name):
            raise ValueError(f"region name {name!r} is not a plain name (letters, digits, '_' or '-', starting with "
                             "a letter)")
        if name == GLOBAL_OBJECTIVE:
            raise ValueError(f"region name {name!r} clashes with the global objective")
    duplicates = sorted({name for name in regions if regions.count(name) > 1})
    if duplicates:
        raise ValueError(f"region name(s) given twice: {', '.join(duplicates)}")
    return (GLOBAL_OBJECTIVE, *regions)


class UsageError(ValueError):
    """Bad input found before any long work; the message names the flag, column or row. The scripts'
    ``cli()`` prints it as ``error: ...`` without a traceback. Defined here so that the training script
    and ``evaluate_fairhuman.py`` raise the same class (also when one runs as ``__main__``)."""


SEED_MAX = 2**32 - 1
"""The largest seed the scripts take: ``accelerate.utils.set_seed`` seeds numpy's legacy generator, which takes
0 .. 2**32 - 1."""


class AnnotationError(ValueError):
    """A dataset cell that cannot be turned into a region mask; the message names column and row."""


# ---------------------------------------------------------------------------------------------
# Reading images: always in the upright (displayed) frame
# ---------------------------------------------------------------------------------------------

EXIF_ORIENTATION = 0x0112
"""The EXIF tag that says how a stored image must be rotated/mirrored to be displayed upright."""


def _open_raw(source) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, dict):  # a `datasets` Image cell read with decode=False
        if source.get("bytes"):
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return Image.open(source["path"])
    if isinstance(source, (str, os.PathLike)):
        return Image.open(source)
    raise TypeError(f"not an image: {type(source).__name__}")


def open_image(source) -> Image.Image:
    """Open and decode an image UPRIGHT: the one image reader of the recipe (training, checking, preparing).

    ``source`` is a PIL image, a ``datasets`` image cell (``{"path", "bytes"}``), bytes or a path.
    The EXIF orientation is applied (``PIL.ImageOps.exif_transpose``), so the pixels are the ones a
    viewer shows and box coordinates refer to; ``image.info["exif_orientation"]`` keeps the tag that
    was applied (1 = none). Phone photos are often stored sideways with orientation 6 or 8. An image
    already transposed (e.g. decoded by ``datasets``, which drops the tag) is not rotated twice.
    """
    image = _open_raw(source)
    image.load()
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    if orientation not in (0, 1):
        upright = ImageOps.exif_transpose(image)
        upright.format = image.format
        image = upright
    image.info["exif_orientation"] = orientation if orientation in range(1, 9) else 1
    return image


def image_size(source) -> tuple[int, int]:
    """``(width, height)`` of an image in the upright frame of :func:`open_image`, reading only the header."""
    image = _open_raw(source)
    try:
        width, height = image.size
        if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # orientations that swap the axes
            width, height = height, width
        return width, height
    finally:
        if image is not source:
            image.close()


# ---------------------------------------------------------------------------------------------
# Boxes and masks in pixel space
# ---------------------------------------------------------------------------------------------


def parse_box(
    box, *, width: int, height: int, box_format: str = "xyxy", relative: bool = False
) -> tuple[float, float, float, float] | None:
    """One box as clipped pixel ``(x0, y0, x1, y1)``, or ``None`` when no area is left after clipping.

    ``box`` is 4 numbers, ``xyxy`` = ``(x0, y0, x1, y1)`` or ``xywh`` = ``(x0, y0, w, h)``; with
    ``relative=True`` they are fractions of the image width (x, w) and height (y, h). Raises
    ``ValueError`` (with the reason only) for anything that is not 4 finite numbers of a box with a
    non-negative width and height.
    """
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"expected 4 numbers ({box_format}), got {box!r}")
    try:
        a, b, c, d = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"expected 4 numbers ({box_format}), got {box!r}") from None
    if not all(math.isfinite(v) for v in (a, b, c, d)):
        raise ValueError(f"non-finite coordinate in {box!r}")
    if box_format == "xywh":
        if c < 0 or d < 0:
            raise ValueError(f"negative width or height in xywh box {box!r}")
        c, d = a + c, b + d
    elif box_format == "xyxy":
        if c < a or d < b:
            raise ValueError(f"x1 < x0 or y1 < y0 in xyxy box {box!r}")
    else:
        raise ValueError(f"unknown box_format {box_format!r}; expected 'xyxy' or 'xywh'")
    if relative:
        a, c = a * width, c * width
        b, d = b * height, d * height
    x0, x1 = min(max(a, 0.0), width), min(max(c, 0.0), width)
    y0, y1 = min(max(b, 0.0), height), min(max(d, 0.0), height)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def parse_boxes(
    cell,
    *,
    width: int,
    height: int,
    box_format: str = "xyxy",
    relative: bool = False,
    column: str = "boxes",
    row: int | None = None,
) -> list[tuple[float, float, float, float]]:
    """Validate one dataset cell of boxes and return them as clipped pixel ``(x0, y0, x1, y1)``.

    ``cell`` is a list of boxes (possibly empty or ``None``), each read by :func:`parse_box`. A box
    partly outside the image is clipped to ``[0, width] x [0, height]``; a box with no area left after
    clipping (including a zero-width one) is dropped. Anything else -- not a list, not 4 finite
    numbers, a negative width or height -- raises :class:`AnnotationError` naming ``column``, ``row``
    and the box.
    """
    where = f"column '{column}'" + (f", row {row}" if row is not None else "")
    if cell is None:
        return []
    if not isinstance(cell, (list, tuple)):
        raise AnnotationError(f"{where}: expected a list of boxes, got {type(cell).__name__} {cell!r}")
    boxes = []
    for j, box in enumerate(cell):
        try:
            parsed = parse_box(box, width=width, height=height, box_format=box_format, relative=relative)
        except ValueError as error:
            raise AnnotationError(f"{where}, box {j}: {error}") from None
        if parsed is not None:
            boxes.append(parsed)
    return boxes


RELATIVE_BOX_LIMIT = 2.0
"""Box numbers above this cannot be fractions of the image size (a little above 1 is a detector's overshoot)."""


def box_units_problem(low: float, high: float, relative: bool) -> str | None:
    """Whether the box numbers of a column look like the wrong unit; ``None`` when they look right.

    ``low`` and ``high`` are the smallest and largest number over every box of the column. With
    ``relative=True`` (fractions of the width/height) a number above ``RELATIVE_BOX_LIMIT`` means
    pixel boxes; with ``relative=False`` (pixels) every number within ``[0, 1]`` means fractions,
    which read as pixels would give masks of a pixel or two. Returns the reason, for the error message.
    """
    if relative and high > RELATIVE_BOX_LIMIT:
        return (f"--relative_boxes is set but the boxes hold numbers up to {high:g}: these look like pixel boxes; "
                "drop --relative_boxes")
    if not relative and 0.0 <= low and high <= 1.0:
        return ("every box lies within [0, 1]: these look like fractions of the image size, which read as pixels "
                "give masks of a pixel or two; pass --relative_boxes")
    return None


def boxes_to_mask(boxes: Iterable[Sequence[float]], width: int, height: int, dilation: int = 0) -> Image.Image:
    """Fill pixel boxes into a white-on-black ``L`` mask of size ``(width, height)``.

    Each box ``(x0, y0, x1, y1)`` (pixel edges, x1/y1 exclusive) covers the pixels whose centres lie
    inside it, then grows by ``dilation`` pixels on every side: the same as dilating the filled box
    with a square kernel of side ``2 * dilation`` (the authors used a 16 x 16 kernel, i.e. 8).
    """
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    for left, top, right, bottom in region_boxes(boxes, width, height, dilation):
        draw.rectangle((left, top, right - 1, bottom - 1), fill=255)
    return mask


def _mask_rect(box, width: int, height: int, dilation: int):
    """The pixels ``(left, top, right, bottom)`` (right/bottom exclusive) :func:`boxes_to_mask` fills for one box."""
    x0, y0, x1, y1 = box
    left, top = max(int(round(x0)) - dilation, 0), max(int(round(y0)) - dilation, 0)
    right, bottom = min(int(round(x1)) + dilation, width), min(int(round(y1)) + dilation, height)
    return (left, top, right, bottom) if right > left and bottom > top else None


def source_dilation(size: tuple[int, int], target: int | tuple[int, int], dilation: int) -> int:
    """``dilation`` TRAINING pixels in the source pixels of an image of ``size = (w, h)`` that is resized to
    cover ``target`` (``(tw, th)``, or an int for a square) by :func:`resize_crop_plan`'s scale
    ``s = max(tw / w, th / h)``: ``round(dilation / s)``. The authors' 16 x 16 kernel (8 px) is meant at
    the training size: a 4000 px photo trained at 1024 px needs 31 source pixels, not 8 (which would
    vanish in the resize)."""
    tw, th = (target, target) if isinstance(target, int) else target
    scale = max(tw / size[0], th / size[1])
    return int(round(dilation / scale))


def region_boxes(boxes: Iterable[Sequence[float]], width: int, height: int, dilation: int = 0) -> list[tuple]:
    """The pixel rectangles ``(left, top, right, bottom)`` that :func:`boxes_to_mask` fills for ``boxes``
    (rounded, dilated, clipped; empty ones left out), without drawing them."""
    return [r for r in (_mask_rect(b, width, height, dilation) for b in boxes) if r is not None]


def binarize_mask_image(mask: Image.Image, size: tuple[int, int], *, column: str, row: int | None) -> Image.Image:
    """Turn a white-on-black mask image (any PIL mode) into a 0/255 ``L`` mask of the image's ``size``.

    Pixels brighter than 127 count as inside the region. A mask whose size differs from the image's
    raises :class:`AnnotationError` naming column and row, since it cannot sit on the same pixels.
    """
    if mask.size != tuple(size):
        raise AnnotationError(
            f"column '{column}', row {row}: mask size {mask.size[0]}x{mask.size[1]} differs from the "
            f"image size {size[0]}x{size[1]}"
        )
    if mask.mode in ("RGBA", "LA", "P", "PA"):
        mask = mask.convert("RGBA").convert("RGB")
    return mask.convert("L").point(lambda v: 255 if v > 127 else 0)


# ---------------------------------------------------------------------------------------------
# One geometric transform for the image and its masks
# ---------------------------------------------------------------------------------------------


def bucket_granularity(vae_block_out_channels: Sequence[int], unet_block_out_channels: Sequence[int]) -> int:
    """The pixel step of a model's image sides: VAE factor x UNet downsampling.

    ``2 ** (len(vae block_out_channels) - 1)`` pixels per latent cell times ``2 ** (len(unet
    block_out_channels) - 1)`` for the UNet's downsamplings: 8 x 8 = 64 px for SD 1.x/2.x and SDXL, 2 x 2 = 4 px
    for the tiny test models. Sides that are multiples of it give latents every UNet level can halve.
    """
    return 2 ** (len(vae_block_out_channels) - 1) * 2 ** (len(unet_block_out_channels) - 1)


def make_buckets(resolution: int, step: int, max_aspect_ratio: float = 4.0) -> list[tuple[int, int]]:
    """Aspect-ratio buckets ``(width, height)`` of about ``resolution ** 2`` pixels, sides multiples of ``step``.

    For every short side ``s = k * step`` up to ``resolution`` the long side is the multiple of ``step``
    closest to ``resolution ** 2 / s``, and for every long side ``l = k * step`` from ``resolution`` the
    short side is the multiple closest to ``resolution ** 2 / l`` (both ways, so the aspect ratios are as
    fine as the step allows); both orientations ``(s, l)`` and ``(l, s)`` are buckets unless the long
    side exceeds ``max_aspect_ratio`` times the short one (4 = the extreme buckets of SDXL's training).
    Sorted from the tallest to the widest; the square bucket is in it whenever ``resolution`` is a
    multiple of ``step``. At 1024 px and step 64: 512x2048, 576x1856, 576x1792, 576x1728, ..., 960x1088,
    1024x1024 and their transposes (areas within about 10 % of 1024^2).
    """
    if resolution < step:
        raise ValueError(f"resolution {resolution} is below the bucket step {step}")
    area = resolution * resolution
    pairs = set()
    for short in range(step, resolution + 1, step):
        pairs.add((short, max(short, round(area / short / step) * step)))
    for long in range(math.ceil(resolution / step) * step, int(max_aspect_ratio * resolution) + step, step):
        short = round(area / long / step) * step
        if step <= short <= long:  # a short side rounded to 0 is not raised to one step (up to 4x the area)
            pairs.add((short, long))
    buckets = set()
    for short, long in pairs:
        if long <= max_aspect_ratio * short + 1e-9:
            buckets.update({(short, long), (long, short)})
    if not buckets:  # max_aspect_ratio below what the step allows: the squarest bucket
        side = max(step, round(resolution / step) * step)
        buckets.add((side, side))
    return sorted(buckets, key=lambda b: b[0] / b[1])


BUCKET_AREA_TOLERANCE = 0.10
"""Buckets are meant to stay within about this fraction of ``resolution ** 2`` in area."""


def bucket_area_problem(buckets: Sequence[tuple[int, int]], resolution: int, step: int) -> str | None:
    """``None`` when every bucket's area is within :data:`BUCKET_AREA_TOLERANCE` of ``resolution ** 2``, else
    the numbers: the smallest and largest area as multiples of it, with the bucket, and the step that would
    keep them close (``resolution / 8``, as 1024 / 128)."""
    ratios = [(w * h / resolution**2, (w, h)) for w, h in buckets]
    low, high = min(ratios), max(ratios)
    if 1 - BUCKET_AREA_TOLERANCE <= low[0] and high[0] <= 1 + BUCKET_AREA_TOLERANCE:
        return None
    return (f"with sides in steps of {step} px at {resolution} px the bucket areas range from {low[0]:.2f}x "
            f"({low[1][0]}x{low[1][1]}) to {high[0]:.2f}x ({high[1][0]}x{high[1][1]}) of {resolution}^2, not within "
            f"about {100 * BUCKET_AREA_TOLERANCE:.0f} %: the step is coarse for this resolution (a step of at most "
            f"{max(1, resolution // 8)} px keeps them close)")


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to the image's, ``|log(w/h) - log(bw/bh)|``
    (so 2:1 and 1:2 are equally far from 1:1). Ties go to the larger bucket."""
    ratio = math.log(size[0] / size[1])
    return min(range(len(buckets)),
               key=lambda i: (round(abs(ratio - math.log(buckets[i][0] / buckets[i][1])), 12),
                              -buckets[i][0] * buckets[i][1]))


@dataclass
class ResizeCrop:
    """Where an image of ``original_size`` lands in a ``target`` = ``(width, height)`` training example."""

    resized: tuple[int, int]  # (width, height) after resizing to cover the target
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image (before any flip)
    target: tuple[int, int]  # (width, height)


def resize_crop_plan(
    size: tuple[int, int],
    target: tuple[int, int],
    *,
    keep: Sequence[Sequence[float]] | None = None,
    center_crop: bool = False,
    rng: random.Random | None = None,
) -> ResizeCrop:
    """Resize ``size = (w, h)`` to cover ``target = (tw, th)`` and choose the crop of what is left over.

    The scale is ``max(tw / w, th / h)``: the image is kept whole up to the rounding to the target
    (the leftover is the pixels of the aspect-ratio difference; for a square target this is the
    diffusers examples' resize of the short side). The crop offset on each axis (top, then left) is
    drawn uniformly from ``rng``, or the middle one with ``center_crop``, among:

    * all offsets, when ``keep`` is ``None`` (the diffusers square crop);
    * with ``keep``, a list of boxes ``(x0, y0, x1, y1)`` in original pixels (the hand and face
      regions), the offsets that maximise ``sum_box kept length / box length`` on that axis: the
      offsets whose window holds every box when there are any, otherwise those that keep the most
      regions (each box counts alike, so a small hand weighs as much as a large face).
    """
    rng = rng if rng is not None else random.Random()
    width, height = size
    tw, th = target
    scale = max(tw / width, th / height)
    new_w, new_h = max(tw, round(width * scale)), max(th, round(height * scale))
    offsets = []
    for axis, (new, t, old) in enumerate(((new_h, th, height), (new_w, tw, width))):  # top first, then left
        candidates = np.arange(0, new - t + 1)
        if keep and len(candidates) > 1:
            score = np.zeros(len(candidates))
            for box in keep:
                a, b = box[1 - axis] * new / old, box[3 - axis] * new / old
                if b > a:
                    score += np.clip(np.minimum(b, candidates + t) - np.maximum(a, candidates), 0, None) / (b - a)
            candidates = candidates[score >= score.max() - 1e-9]
        offsets.append(int(candidates[(len(candidates) - 1) // 2] if center_crop else
                           candidates[rng.randint(0, len(candidates) - 1)]))
    return ResizeCrop((new_w, new_h), (offsets[0], offsets[1]), (tw, th))


def box_area_kept(boxes: Iterable[Sequence[float]], size: tuple[int, int], plan: ResizeCrop) -> tuple[float, float]:
    """``(kept, total)`` box area, in resized pixels, of pixel boxes ``(x0, y0, x1, y1)`` of an image of
    ``size`` under ``plan``: how much of the boxes the crop keeps (flips change nothing)."""
    sx, sy = plan.resized[0] / size[0], plan.resized[1] / size[1]
    top, left = plan.crop_top_left
    right, bottom = left + plan.target[0], top + plan.target[1]
    kept = total = 0.0
    for x0, y0, x1, y1 in boxes:
        x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
        total += (x1 - x0) * (y1 - y0)
        kept += max(0.0, min(x1, right) - max(x0, left)) * max(0.0, min(y1, bottom) - max(y0, top))
    return kept, total


@dataclass
class TransformedExample:
    pixel_values: torch.Tensor  # (3, H, W) in [-1, 1]
    masks: torch.Tensor  # (M, H, W) in [0, 1], same geometry as pixel_values
    original_size: tuple[int, int]  # (height, width) before any transform (SDXL micro-conditioning)
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized (and flipped) image
    target_size: tuple[int, int] = (0, 0)  # (height, width) of the example (SDXL micro-conditioning)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: RGBA, LA, P (with transparency) onto white; 16/32-bit gray scaled to its peak."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I"):
        array = np.asarray(image, dtype=np.float64)
        peak = max(float(array.max()), 1.0)
        return Image.fromarray((array * (255.0 / peak)).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def paired_transform(
    image: Image.Image,
    masks: Sequence[Image.Image],
    resolution: int | tuple[int, int],
    *,
    center_crop: bool = False,
    random_flip: bool = False,
    rng: random.Random | None = None,
    keep: Sequence[Sequence[float]] | None = None,
) -> TransformedExample:
    """Resize, crop and flip an image and its masks with ONE draw of the random parameters.

    ``resolution`` is the example's ``(width, height)`` (an aspect-ratio bucket), or an int for a
    ``resolution x resolution`` square.

    1. resize to cover the target (bilinear, image and masks alike), see :func:`resize_crop_plan`;
    2. crop the target: centred, or at offsets drawn once from ``rng``; with ``keep`` (the hand and
       face boxes, original pixels) only among the offsets that keep them inside, or as much of them as
       possible (:func:`resize_crop_plan`);
    3. with ``random_flip``, mirror left-right with probability 1/2, drawn once from ``rng``.

    The same offsets and the same flip are applied to every mask (the authors' code drew them
    separately, so masks could land on the wrong side). ``crop_top_left`` is reported in the frame of
    the returned image, so after a flip ``left = resized_width - left - width``.
    """
    rng = rng if rng is not None else random.Random()
    target = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    image = to_rgb(image)
    masks = [m.convert("L") for m in masks]
    for m in masks:
        if m.size != image.size:
            raise ValueError(f"mask size {m.size} differs from image size {image.size}")
    width, height = image.size
    plan = resize_crop_plan((width, height), target, keep=keep, center_crop=center_crop, rng=rng)
    new_w, new_h = plan.resized
    image = image.resize((new_w, new_h), Image.BILINEAR)
    masks = [m.resize((new_w, new_h), Image.BILINEAR) for m in masks]
    top, left = plan.crop_top_left
    crop = (left, top, left + target[0], top + target[1])
    image = image.crop(crop)
    masks = [m.crop(crop) for m in masks]
    if random_flip and rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        masks = [m.transpose(Image.FLIP_LEFT_RIGHT) for m in masks]
        left = new_w - left - target[0]

    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    if masks:
        mask_tensor = torch.from_numpy(np.stack([np.asarray(m, dtype=np.float32) / 255.0 for m in masks]))
    else:
        mask_tensor = torch.zeros(0, target[1], target[0])
    return TransformedExample(pixels, mask_tensor, (height, width), (top, left), (target[1], target[0]))


def pad_stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack per-example tensors into a batch, zero-padding the first dimension to the longest: the caption
    embeddings of text encoders that keep only a caption's own tokens (Z-Image, Qwen-Image; their masks pad with
    zeros, i.e. False). Tensors of one length stack as ``torch.stack`` does."""
    longest = max(t.shape[0] for t in tensors)
    if all(t.shape[0] == longest for t in tensors):
        return torch.stack(list(tensors))
    return torch.stack([F.pad(t, (0, 0) * (t.dim() - 1) + (0, longest - t.shape[0])) for t in tensors])


def masks_to_latent(masks: torch.Tensor, latent_size: tuple[int, int], mode: str = "hard") -> torch.Tensor:
    """Reduce pixel masks ``(B, M, H, W)`` in [0, 1] to the latent grid ``(B, M, h, w)``.

    Each latent cell takes the area average of the pixels it covers (``H/h`` x ``W/w`` pixels, 8 x 8
    for the Stable Diffusion VAEs). ``mode="hard"`` then thresholds at 0.5 (a cell is in the region
    when at least half of its pixels are), giving the 0/1 masks of the authors' runs;
    ``mode="soft"`` keeps the covered fraction.
    """
    reduced = F.adaptive_avg_pool2d(masks.float(), latent_size)
    if mode == "hard":
        return (reduced >= 0.5).to(reduced.dtype)
    if mode == "soft":
        return reduced
    raise ValueError(f"unknown latent mask mode {mode!r}; expected 'hard' or 'soft'")


def item_seed(seed: int, epoch: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (run seed, epoch, dataset index, stream).

    Every random draw that belongs to one training example (crop, flip, VAE sample, noise,
    timestep) is made from generators seeded with it, so the result does not depend on how examples
    are grouped into batches, micro-batches or processes, nor on where a run was resumed. ``stream``
    separates independent uses (0: examples, 1: the epoch's shuffling order).
    """
    state = np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index, stream]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


# ---------------------------------------------------------------------------------------------
# The objectives: global + one per region
# ---------------------------------------------------------------------------------------------


def fairhuman_losses(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *region_masks: torch.Tensor,
    local_loss_scale: float = 5.0,
    normalization: str = "latent",
    sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The FairHuman objectives on one prediction, as a tensor ``[L_g, L_R1, ..., L_RK-1]``: the global loss
    and one loss per region mask given, in order (FairHuman's: ``region_masks = (hand_mask, face_mask)``,
    ``[L_g, L_h, L_f]``).

    With the residual ``r = model_pred - target`` (computed in fp32), masks ``M`` of shape
    ``(B, 1, h, w)`` broadcast over the latent channels, ``s = local_loss_scale`` and optional
    per-example weights ``a_b`` (Min-SNR; 1 when ``None``)::

        L_g = mean_b a_b * mean_{c,y,x} r^2

        normalization="latent" (the authors'):  L_R = mean_b a_b * mean_{c,y,x} (s * M_R * r)^2
        normalization="area":                   L_R = sum_b a_b * sum_{c,y,x} (s * M_R * r)^2
                                                      / (C * sum_b sum_{y,x} M_R)

    i.e. "latent" averages the masked error over the whole latent (a small region gives a small
    loss), "area" over the region only. An empty region gives ``L_R = 0`` and a zero gradient.
    """
    residual = model_pred.float() - target.float()
    batch, channels = residual.shape[:2]
    weights = torch.ones(batch, device=residual.device) if sample_weights is None else sample_weights.float()
    losses = [(residual.pow(2).mean(dim=(1, 2, 3)) * weights).mean()]
    for mask in region_masks:
        mask = mask.to(residual.device, torch.float32)
        squared = (local_loss_scale * mask * residual).pow(2)
        if normalization == "latent":
            losses.append((squared.mean(dim=(1, 2, 3)) * weights).mean())
        elif normalization == "area":
            area = mask.sum() * channels
            total = (squared.sum(dim=(1, 2, 3)) * weights).sum()
            losses.append(total / area.clamp_min(1e-12))
        else:
            raise ValueError(f"unknown normalization {normalization!r}; expected 'latent' or 'area'")
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# The alpha-fair (MPD) weights
# ---------------------------------------------------------------------------------------------


def solve_fair_weights(
    gram: torch.Tensor,
    alpha: float = 2.0,
    *,
    max_iter: int = 100,
    tol: float = 1e-13,
    ridge: float = 1e-12,
) -> torch.Tensor:
    """Alpha-fair weights ``w`` for the Gram matrix ``gram = G^T G`` of K objective gradients.

    Solves, for every objective ``i`` with a non-zero gradient,

        (gram @ w)_i * w_i ** (1 / alpha) == 1,      w_i > 0

    which is the optimality condition of ``max_d sum_i u_i^(1-alpha) / (1-alpha)`` over update
    directions ``d = G w`` with ``||d|| <= eps`` and ``u_i = g_i . d`` (alpha = 2 is Minimum Potential
    Delay fairness, alpha = 1 proportional fairness). An objective whose gradient is zero
    (``gram[i, i] == 0``: no hand or no face in the batch) is left out of the solve and gets
    ``w_i = 0``.

    Method: the equation is the stationarity condition of the strictly convex

        phi(w) = 1/2 w^T H w - sum_i h(w_i),   h'(w) = w^(-1/alpha),   H = gram + ridge * diag(gram)

    so damped Newton's method (backtracking, staying inside w > 0) from the orthogonal-gradient
    solution ``w_i = H_ii^(-alpha/(alpha+1))`` converges to the unique solution in a handful of
    iterations. It is affine invariant, so badly scaled gradients cost nothing extra. The tiny
    relative ``ridge`` only matters when the gradients conflict so much that no direction improves
    all objectives (then no exact solution exists and the weights grow large instead of diverging).
    Runs in float64 on the CPU (a K x K problem); returns float64 weights on ``gram``'s device.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    k = gram.shape[0]
    if gram.shape != (k, k):
        raise ValueError(f"gram must be a square K x K matrix, got shape {tuple(gram.shape)}")
    g = gram.detach().to("cpu", torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("gram contains non-finite values")
    g = 0.5 * (g + g.T)
    weights = torch.zeros(k, dtype=torch.float64)
    active = torch.diagonal(g) > 0
    if not active.any():
        return weights.to(gram.device)
    h = g[active][:, active]
    h = h + ridge * torch.diag(torch.diagonal(h))
    p = 1.0 / alpha

    def utility(w):  # sum_i h(w_i) with h' = w^(-p)
        return torch.log(w).sum() if p == 1.0 else (w.pow(1.0 - p) / (1.0 - p)).sum()

    def phi(w):
        return 0.5 * w @ h @ w - utility(w)

    def residual(w):  # the equation's relative error, scale free
        return torch.abs((h @ w) * w.pow(p) - 1.0).max()

    w = torch.diagonal(h).pow(-alpha / (alpha + 1.0))
    scale = w.clone()
    for _ in range(max_iter):
        grad = h @ w - w.pow(-p)
        current_residual = residual(w)
        if current_residual < tol:
            break
        hess = h + torch.diag(p * w.pow(-p - 1.0))
        # Solve in the variables w_i / w0_i: same Newton step, but a well-conditioned linear system
        # even when the weights span many orders of magnitude.
        step = -scale * torch.linalg.solve(scale[:, None] * hess * scale[None, :], scale * grad)
        # Largest step that keeps w > 0 (fraction to the boundary), then backtrack on phi.
        shrinking = step < 0
        t = 1.0
        if shrinking.any():
            t = min(1.0, 0.99 * float((-w[shrinking] / step[shrinking]).min()))
        current = phi(w)
        slope = float(grad @ step)
        # Accept a sufficient decrease of phi, or of the residual once phi's change is below its
        # rounding error (weights many orders of magnitude apart).
        while t > 1e-12:
            candidate = w + t * step
            if phi(candidate) <= current + 1e-4 * t * slope or residual(candidate) < current_residual:
                break
            t *= 0.5
        w = w + t * step
    weights[active] = w
    return weights.to(gram.device)


def fair_equation_residual(gram: torch.Tensor, weights: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """``max_i |(gram @ w)_i * w_i^(1/alpha) - 1|`` over the objectives with ``w_i > 0``."""
    g = gram.to(torch.float64)
    w = weights.to(torch.float64)
    active = w > 0
    lhs = (g @ w)[active] * w[active].pow(1.0 / alpha)
    return (lhs - 1.0).abs().max()


# ---------------------------------------------------------------------------------------------
# Per-objective gradients and the fair combination
# ---------------------------------------------------------------------------------------------


class ObjectiveGradients:
    """K per-objective gradients of a set of parameters: row ``i`` holds ``d L_i / d params``.

    ``accumulate(losses, ...)`` adds ``d losses[i] / d params`` to row ``i`` (one backward pass per
    objective that is present; rows of absent objectives stay zero), so the gradients of all
    micro-batches of one optimizer step are summed before the solve. ``gram()`` is ``G^T G``
    (float64 accumulation); ``write_combination(c)`` writes ``sum_i c_i g_i`` into each parameter's
    ``.grad`` IN PLACE in row 0 and lets the other rows go.

    Memory (P trainable numbers), lean by construction: row 0 is made of the float32 gradient tensors
    autograd allocates as in a plain backward pass, and becomes the update's ``.grad``; rows
    ``1..K-1`` are in ``row_dtype`` (float32, or bfloat16: 2 bytes per number, rounded before the
    float64 Gram), each parameter's slice allocated when its gradient arrives (a post-accumulate-grad
    hook moves it there and frees the float32 gradient, one parameter at a time). Every row is
    dropped by ``write_combination`` / ``zero_``, so nothing is held between solves. At a solve step:
    ``4 + (K-1) * itemsize(row_dtype)`` bytes per parameter, against 4 for a plain backward pass.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], num_objectives: int = len(OBJECTIVES),
                 row_dtype: torch.dtype = torch.float32):
        self.params = list(params)
        self._num_objectives = num_objectives
        self.dtypes = [torch.float32] + [row_dtype] * (num_objectives - 1)
        self.rows: list[list[torch.Tensor | None]] | None = None  # rows[i][j]: objective i, parameter j

    @property
    def num_objectives(self) -> int:
        return self._num_objectives

    def _row(self, i: int) -> list[torch.Tensor | None]:
        if self.rows is None:
            self.rows = [[None] * len(self.params) for _ in range(self.num_objectives)]
        return self.rows[i]

    def _add(self, i: int, j: int, grad: torch.Tensor) -> None:
        """Add ``grad`` (parameter ``j``'s gradient of objective ``i``) to row ``i``; the first one is taken
        as it is when its dtype is the row's (no copy)."""
        row = self._row(i)
        if row[j] is None:
            row[j] = grad if grad.dtype == self.dtypes[i] else grad.to(self.dtypes[i])
        else:
            row[j].add_(grad)

    def _flat(self, i: int) -> torch.Tensor:
        row = self._row(i)
        return torch.cat([(torch.zeros(p.numel(), dtype=torch.float32, device=p.device) if g is None
                           else g.reshape(-1).float()) for p, g in zip(self.params, row)])

    def zero_(self) -> None:
        """Drop the rows (the next ``accumulate`` starts from zero). Never writes into them: row 0 may be
        the ``.grad`` of the update just written."""
        self.rows = None

    def accumulate(self, losses: torch.Tensor, present: Sequence[bool] | None = None, batched: bool = False) -> None:
        """Add the gradient of each ``losses[i]`` to row ``i``; skip the objectives not ``present``.

        One vector-Jacobian product per present objective. By default, separate backward passes
        (``retain_graph`` between them); each parameter's gradient goes into row ``i`` as soon as
        autograd has it (row 0: autograd accumulates into it as into ``.grad``; other rows: a
        post-accumulate-grad hook adds it in the row's dtype and frees it). With ``batched=True``, one
        vmapped backward pass (``torch.autograd.grad(..., is_grads_batched=True)``): the same numbers
        and one graph traversal, but K gradient-sized temporaries.
        """
        present = [True] * len(losses) if present is None else list(present)
        todo = [i for i, keep in enumerate(present) if keep]
        self._row(0)
        if batched and len(todo) > 1:
            rows = torch.eye(len(todo), dtype=losses.dtype, device=losses.device)
            grads = list(torch.autograd.grad(losses[todo], self.params, grad_outputs=rows, is_grads_batched=True,
                                             allow_unused=True))
            for j in range(len(grads)):  # parameter by parameter, each batched gradient freed once moved
                grad, grads[j] = grads[j], None
                if grad is not None:
                    for n, i in enumerate(todo):
                        # a view would keep the whole batched tensor: copy where the row takes it as it is
                        self._add(i, j, grad[n].clone() if self.dtypes[i] == grad.dtype else grad[n])
                del grad
            return
        saved = [p.grad for p in self.params]
        index = {id(p): j for j, p in enumerate(self.params)}
        current = [None]  # the objective whose pass is running

        def move_into_row(p):
            i = current[0]
            if i is not None and p.grad is not None and p.grad is not self.rows[i][index[id(p)]]:
                self._add(i, index[id(p)], p.grad)
                p.grad = None

        handles = [p.register_post_accumulate_grad_hook(move_into_row) for p in self.params]
        try:
            for n, i in enumerate(todo):
                row = self._row(i)
                same_dtype = self.dtypes[i] == torch.float32
                for j, p in enumerate(self.params):  # row 0 (float32): autograd adds into it in place
                    p.grad = row[j] if (same_dtype and row[j] is not None and row[j].dtype == p.dtype) else None
                current[0] = i
                torch.autograd.backward(losses[i], inputs=self.params, retain_graph=n < len(todo) - 1)
                current[0] = None
                for j, p in enumerate(self.params):
                    if p.grad is not None and p.grad is not row[j]:  # the hook did not run: add it ourselves
                        self._add(i, j, p.grad)
                    p.grad = None
        finally:
            for handle in handles:
                handle.remove()
            for p, grad in zip(self.params, saved):
                p.grad = grad

    def gram(self, chunk: int = 1 << 20) -> torch.Tensor:
        """``G^T G`` (K x K, float64) with ``g_i`` the rows.

        Accumulated in float64, parameter by parameter (column chunks of at most ``chunk`` numbers):
        exact to float64 rounding (no TF32, no float32 accumulation over millions of terms) with only
        ``K * chunk`` extra numbers in memory, never a float64 copy of the rows.
        """
        k = self.num_objectives
        gram = torch.zeros(k, k, dtype=torch.float64, device=self.params[0].device)
        if self.rows is None:
            return gram
        for j in range(len(self.params)):
            held = [i for i in range(k) if self.rows[i][j] is not None]
            if not held:
                continue
            columns = [self.rows[i][j].reshape(-1) for i in held]
            index = torch.tensor(held, device=gram.device)
            for start in range(0, columns[0].numel(), chunk):
                block = torch.stack([c[start : start + chunk].to(torch.float64) for c in columns])
                gram[index[:, None], index[None, :]] += block @ block.T
        return gram

    def average_across_processes(self) -> None:
        """Average the rows over all processes (``torch.distributed``), so every process solves the same
        weights from the gradient of the global batch. A no-op in a single process."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:
                for i in range(self.num_objectives):
                    row = self._row(i)
                    for j, p in enumerate(self.params):
                        if row[j] is None:  # every process reduces the same tensors
                            row[j] = torch.zeros_like(p, dtype=self.dtypes[i])
                        torch.distributed.all_reduce(row[j])
                        row[j] /= world

    def fair_update(self, alpha: float = 2.0, grad_scale: float = 1.0, stale: torch.Tensor | None = None) -> "FairStep":
        """Average over processes, solve the weights, write the update into ``.grad``, drop the rows.

        The rows hold gradients of losses multiplied by ``grad_scale`` (the fp16 loss scale, 1 otherwise):
        the weights are solved on the unscaled Gram matrix (:func:`fair_coefficients`) and the update
        ``grad_scale * K * G_unscaled w`` is written, so a ``GradScaler`` unscales, checks and skips it
        exactly as it would a plain backward pass. Non-finite gradients (an overflow) give NaN
        coefficients and NaN gradients: the scaler then skips the step and lowers its scale, and
        without a scaler the caller sees a non-finite gradient norm and skips the step.

        With ``stale`` coefficients (``--fair_update_interval`` > 1, fidelity check) the update written
        is ``sum_i stale_i g_i`` and the exact solution is still returned, to compare the two.
        """
        self.average_across_processes()
        gram = self.gram() / (grad_scale**2)
        if torch.isfinite(gram).all():
            _, exact = fair_coefficients(gram, alpha)
        else:
            exact = torch.full((self.num_objectives,), float("nan"), dtype=torch.float64)
        applied = exact if stale is None else stale.to(exact)
        self.write_combination(applied)
        self.zero_()
        return FairStep(applied, exact, gram)

    def write_combination(self, coefficients: torch.Tensor) -> None:
        """Set ``param.grad = sum_i coefficients[i] * g_i`` for every parameter, then drop the rows.

        Written in place in row 0 (``g_0 *= c_0``, then ``+= c_i g_i`` row by row, in float32), which
        becomes ``.grad``: no gradient-sized temporary."""
        coefficients = [float(c) for c in coefficients]
        rows = [self._row(i) for i in range(self.num_objectives)]
        for j, p in enumerate(self.params):
            combined = rows[0][j]
            if combined is None:
                combined = torch.zeros_like(p, dtype=torch.float32)
            combined.mul_(coefficients[0])
            for row, c in zip(rows[1:], coefficients[1:]):
                if c != 0 and row[j] is not None:
                    combined.add_(row[j], alpha=c)
            p.grad = combined if combined.dtype == p.dtype else combined.to(p.dtype)
        self.rows = None


def prediction_space_gram(losses_fn, model_pred: torch.Tensor) -> torch.Tensor:
    """The Gram matrix of the objectives' gradients with respect to the PREDICTION, ``V V^T``.

    ``v_i = d losses_fn(p)_i / d p`` at ``p = model_pred`` (in fp32, on a detached copy, so no graph of
    the model is touched). The parameter gradients are ``g_i = J^T v_i`` with ``J = dp/dtheta``, so
    ``G^T G = V J J^T V^T``; where ``J J^T`` is close to a multiple ``c I`` of the identity,
    ``G^T G ~ c V V^T``. The alpha-fair solution for ``c V V^T`` has the same update DIRECTION for
    every ``c`` (scaling the Gram by ``c`` scales ``w`` by ``c^(-2 alpha/(alpha+1))`` and ``G w`` by a
    constant), and costs no backward pass through the model: ``--fair_interval_weights
    prediction`` uses it between exact solves, with ``c`` taken from the last exact solve.
    """
    pred = model_pred.detach().float().requires_grad_(True)
    with torch.enable_grad():
        losses = losses_fn(pred)
        rows = [torch.autograd.grad(losses[i], pred, retain_graph=i < len(losses) - 1)[0].flatten()
                for i in range(len(losses))]
    v = torch.stack(rows).double()
    return v @ v.T


GRAM_CALIBRATIONS = ("diagonal", "trace")


def prediction_gram_calibration(gram: torch.Tensor, prediction_gram: torch.Tensor, mode: str = "diagonal",
                                previous: torch.Tensor | None = None) -> torch.Tensor:
    """Per-objective scales ``c`` that map the prediction-space Gram ``V V^T`` onto the exact ``G^T G``.

    ``g_i = J^T v_i``, so ``||g_i||^2 = c_i ||v_i||^2`` with ``c_i = v_i^T J J^T v_i / ||v_i||^2``: how
    strongly the model's parameters reach the direction ``v_i`` in prediction space. A localized
    objective (a hand region) and the global one have DIFFERENT ``c_i``, so:

    - ``"diagonal"``: ``c_i = (G^T G)_ii / (V V^T)_ii`` per objective, used as
      ``G^T G ~ D^(1/2) V V^T D^(1/2)`` with ``D = diag(c)`` (:func:`calibrated_gram`): exact on the
      diagonal at the calibration step, correlations taken from ``V``.
    - ``"trace"``: one scalar ``c_i = trace(G^T G) / trace(V V^T)`` for every objective (the direction
      of the fair update does not depend on a common scale, so this only fixes the norms' ratio ...
      wrongly for the regions when the ``c_i`` differ).

    An objective absent at this solve (``(V V^T)_ii = 0``) keeps its ``previous`` scale (the trace
    ratio when there is none).
    """
    gram, prediction_gram = gram.double(), prediction_gram.double()
    denominator = float(torch.trace(prediction_gram))
    trace_ratio = float(torch.trace(gram)) / denominator if denominator > 0 else 1.0
    scales = torch.full((gram.shape[0],), trace_ratio, dtype=torch.float64)
    if mode == "trace":
        return scales
    if mode != "diagonal":
        raise ValueError(f"unknown calibration {mode!r}; known: {GRAM_CALIBRATIONS}")
    if previous is not None:
        scales = previous.double().clone()
    present = (prediction_gram.diagonal() > 0) & (gram.diagonal() > 0)
    scales[present] = gram.diagonal()[present] / prediction_gram.diagonal()[present]
    return scales


def calibrated_gram(prediction_gram: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``D^(1/2) V V^T D^(1/2)`` with ``D = diag(scales)``: the estimate of ``G^T G`` between exact solves
    (scales from :func:`prediction_gram_calibration`)."""
    root = scales.double().sqrt()
    return prediction_gram.double() * root[:, None] * root[None, :]


@dataclass
class FairStep:
    """One fair update: the coefficients applied to the objective gradients, the exact ones
    (``K w`` solved this step) and the unscaled Gram matrix they were solved on."""

    applied: torch.Tensor
    exact: torch.Tensor
    gram: torch.Tensor

    def fidelity(self) -> tuple[float, float]:
        """``(cosine, relative error)`` of the applied update and weights against the exact ones:
        ``cos = a^T Gram e / sqrt(a^T Gram a * e^T Gram e)`` (the cosine of ``G a`` and ``G e``) and
        ``||a - e|| / ||e||``. Both are 1 and 0 when the applied coefficients are the exact ones.
        The cosine is dominated by the largest gradient (the global one): see :meth:`weight_ratios`."""
        a, e, g = self.applied.double(), self.exact.double(), self.gram.double()
        cosine = float(a @ g @ e / torch.sqrt((a @ g @ a) * (e @ g @ e)).clamp_min(1e-300))
        return cosine, float((a - e).norm() / e.norm().clamp_min(1e-300))

    def weight_ratios(self) -> list[float]:
        """``a_i / e_i`` per objective: the applied weight over the exact one (NaN where the exact weight
        is 0, i.e. the objective is absent). 1 everywhere for exact weights; the measure that shows
        whether a cheap mode gives the hand and face regions the weight MPD would."""
        a, e = self.applied.double(), self.exact.double()
        return [float(x / y) if y != 0 else float("nan") for x, y in zip(a, e)]


def fair_coefficients(gram: torch.Tensor, alpha: float = 2.0, grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fair update's coefficients on the (possibly loss-scaled) objective gradients.

    ``gram`` may come from gradients multiplied by a loss scale ``grad_scale`` (fp16 training); the
    weights are solved on the UNSCALED Gram ``gram / grad_scale^2`` because the solution is not
    scale invariant (scaling every gradient by c scales w by c^(-2 alpha / (alpha + 1))). Returns
    ``(w, K * w)``: the weights, and the coefficients of the update ``K * G w`` ("to match the sum of
    the losses", as the authors write it). ``K`` counts the objectives, present or not.
    """
    weights = solve_fair_weights(gram / (grad_scale**2), alpha=alpha)
    return weights, weights * gram.shape[0]


# ---------------------------------------------------------------------------------------------
# The update: how the K objective gradients become .grad, for every --weighting mode
# ---------------------------------------------------------------------------------------------

FIXED_COEFFICIENTS = {"global": (1.0, 0.0), "equal": (1.0, 1.0)}
"""The coefficients ``c`` of the non-fair modes, as (global objective's, every region objective's): the update
is ``sum_i c_i g_i``, the region entries times ``FairUpdate(region_weights=...)``."""


def fixed_coefficients(weighting: str, region_weights: Sequence[float]) -> torch.Tensor:
    """``c = (c_global, c_region * w_1, ..., c_region * w_R)`` (float64) of a non-fair ``weighting`` with the
    static ``region_weights`` ``w_r`` (:data:`FIXED_COEFFICIENTS`)."""
    global_c, region_c = FIXED_COEFFICIENTS[weighting]
    return (torch.tensor((global_c,) + (region_c,) * len(region_weights), dtype=torch.float64)
            * torch.tensor((1.0, *region_weights), dtype=torch.float64))


class FairUpdate:
    """How the objective gradients ``g_i`` become the update ``sum_i c_i g_i`` written into ``.grad``.

    The training loop calls it where the diffusers loop calls ``accelerator.backward(loss)``::

        with accelerator.accumulate(unet), fair_update.no_sync(accelerator, unet):
            ...
            losses = loss_fn(model_pred)                       # [L_global, L_region1, ...] (objectives)
            fair_update.backward(accelerator, losses, present, loss_fn=loss_fn, model_pred=model_pred)
            if accelerator.sync_gradients:
                logs = fair_update.write_update(accelerator)   # .grad = sum_i c_i g_i; the c_i for the logs
                accelerator.clip_grad_norm_(...)

    Modes (``weighting``):

    ``objectives`` names the K objectives, ``("global", *regions)`` (default FairHuman's global, hand, face):
    the order of the losses, rows, coefficients and of the ``weight/<objective>`` logs.

    * ``"global"``: ``c = (1, 0, ..., 0)``, ``"equal"``: ``c = (1, w_1, ..., w_R)`` with the static
      ``region_weights = (w_1, ..., w_R)``, one per region (all 1: the plain sum of the K losses); one
      backward pass of ``sum_i c_i L_i`` through ``accelerator.backward``, exactly the plain diffusers
      update.
    * ``"fair"``: ``c = K w`` with the alpha-fair weights ``w`` solving ``(G^T G w)_i w_i^(1/alpha) = 1``
      (:func:`solve_fair_weights`). Every ``update_interval``-th optimizer step (and the first) is an
      EXACT step: one backward pass per present objective into the rows of
      :class:`ObjectiveGradients` (summed over micro-batches, averaged over processes, the Gram taken
      on gradients unscaled by the fp16 loss scale), then ``.grad = K G w``. On the steps in between,
      one backward pass of ``sum_i c_i L_i`` with ``c`` from ``interval_weights``:

      - ``"prediction"``: ``c = K w`` solved on ``D^(1/2) V V^T D^(1/2)`` (:func:`calibrated_gram`),
        ``V V^T`` the Gram of ``v_i = dL_i/dpred`` (no backward through the model,
        :func:`prediction_space_gram`), ``D = diag(s)`` the calibration taken at the last exact step
        (:func:`prediction_gram_calibration`): with ``calibration="diagonal"`` (default) one scale per
        objective, ``s_i = (G^T G)_ii / (V V^T)_ii``, since the model reaches a localized (hand, face)
        direction differently from the global one; with ``"trace"`` one scale
        ``trace(G^T G) / trace(V V^T)`` for all, which measurably mis-weights the regions;
      - ``"reuse"``: the ``c`` of the last exact step.

      An objective absent at an exact step (zero gradient, ``w_i = 0``) keeps its previous
      coefficient for the steps until the next exact one. With ``fidelity_check`` the steps in
      between also take the exact per-objective gradients (costing an exact step's time) to log how
      far the applied update is from exact MPD (:meth:`FairStep.fidelity`, and per objective
      applied / exact weight, :meth:`FairStep.weight_ratios`).

    Memory: ``row_dtype`` is the dtype of the rows of objectives ``1..K-1`` (:class:`ObjectiveGradients`;
    row 0 is float32 and becomes ``.grad``). float32: 12 bytes per LoRA parameter on a solve step with
    K = 3 (plain: 4), the same numbers as always; bfloat16: 8 bytes, the region gradients rounded to
    bfloat16 (relative 2^-9 per number) before the float64 Gram. No rows are held between solves.

    State for a resumed run (:meth:`state_dict` / :meth:`load_state_dict`, plain JSON-able Python that
    the training script writes into each checkpoint as JSON): the number of updates written (which
    fixes the schedule), the last coefficients and the calibration ``s`` (one scale per objective).
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        weighting: str = "fair",
        *,
        alpha: float = 2.0,
        update_interval: int = 1,
        interval_weights: str = "prediction",
        calibration: str = "diagonal",
        batched_backward: bool = False,
        fidelity_check: bool = False,
        region_weights: Sequence[float] | None = None,
        objectives: Sequence[str] = OBJECTIVES,
        row_dtype: torch.dtype = torch.float32,
    ):
        if weighting not in ("fair", *FIXED_COEFFICIENTS):
            raise ValueError(f"unknown weighting {weighting!r}; expected 'fair', 'equal' or 'global'")
        if interval_weights not in ("prediction", "reuse"):
            raise ValueError(f"unknown interval_weights {interval_weights!r}; expected 'prediction' or 'reuse'")
        if update_interval < 1:
            raise ValueError(f"update_interval must be at least 1, got {update_interval}")
        if calibration not in GRAM_CALIBRATIONS:
            raise ValueError(f"unknown calibration {calibration!r}; expected one of {GRAM_CALIBRATIONS}")
        self.objectives = tuple(objectives)
        k = len(self.objectives)
        if k < 2 or self.objectives[0] != GLOBAL_OBJECTIVE:
            raise ValueError(f"objectives must be ('global', region, ...), got {self.objectives}")
        region_weights = (1.0,) * (k - 1) if region_weights is None else tuple(region_weights)
        if len(region_weights) != k - 1:
            raise ValueError(f"region_weights: {len(region_weights)} given for {k - 1} regions {self.objectives[1:]}")
        self.calibration = calibration
        self.weighting = weighting
        self.fair = weighting == "fair"
        self.alpha = alpha
        self.update_interval = update_interval
        self.batched_backward = batched_backward
        self.fidelity_check = fidelity_check and self.fair
        self.prediction_weights = self.fair and update_interval > 1 and interval_weights == "prediction"
        self.gradients = ObjectiveGradients(params, k, row_dtype=row_dtype) if self.fair else None
        self.step = 0  # updates written so far (= optimizer steps, skipped ones included)
        if weighting != "equal" and any(w != 1.0 for w in region_weights):
            raise ValueError(f"region_weights are the static weights of weighting 'equal', not of {weighting!r}")
        self.coefficients = None if self.fair else fixed_coefficients(weighting, region_weights)
        self.gram_scale = None  # s_i: exact / prediction-space Gram per objective, from the last exact step
        self._prediction_gram_sum = torch.zeros(k, k, dtype=torch.float64)

    # -- the schedule -------------------------------------------------------------------------

    @property
    def exact_step(self) -> bool:
        """Whether this optimizer step solves the exact fair weights (every ``update_interval``-th, and
        the first: ``step % update_interval == 0``, or no coefficients yet, or prediction-space weights
        without a calibration yet, e.g. resumed from a ``reuse`` checkpoint)."""
        return self.fair and (self.coefficients is None or self.step % self.update_interval == 0
                              or (self.prediction_weights and self.gram_scale is None))

    @property
    def per_objective(self) -> bool:
        """Whether this step takes one backward pass per objective (exact steps, and every step with
        the fidelity check); otherwise one backward pass of ``sum_i c_i L_i``."""
        return self.exact_step or self.fidelity_check

    def no_sync(self, accelerator, model):
        """The context for a micro-batch's forward and backward: on per-objective steps the rows are
        averaged across processes by :meth:`write_update`, so DDP must not reduce ``.grad`` as well."""
        return accelerator.no_sync(model) if self.per_objective else contextlib.nullcontext()

    # -- per micro-batch ------------------------------------------------------------------------

    def backward(self, accelerator, losses: torch.Tensor, present: Sequence[bool], *, loss_fn=None,
                 model_pred: torch.Tensor | None = None) -> None:
        """Backward pass(es) of one micro-batch's ``losses``, one per objective (``[L_global, L_hand, L_face]``).

        Per-objective steps: ``d (scale * L_i / A) / d params`` into row ``i`` for every ``present``
        objective (``scale`` = the fp16 loss scale, ``A`` = accumulation steps). Other steps:
        ``accelerator.backward(sum_i c_i L_i)`` (which divides by ``A`` and applies the loss scale).
        With prediction-space weights, ``loss_fn`` (prediction -> losses) and ``model_pred`` give
        ``V V^T / A^2`` (mean over processes): summed over an exact step's micro-batches for the
        calibration, or solved on at once for ``c`` in between.
        """
        accumulation = accelerator.gradient_accumulation_steps
        if self.prediction_weights:
            prediction_gram = prediction_space_gram(loss_fn, model_pred) / accumulation**2
            if accelerator.num_processes > 1:
                prediction_gram = accelerator.reduce(prediction_gram.to(accelerator.device), "mean").cpu()
            if self.exact_step:
                self._prediction_gram_sum += prediction_gram
            else:
                estimate = calibrated_gram(accumulation * prediction_gram, self.gram_scale)
                self.coefficients = (fair_coefficients(estimate, self.alpha)[1] if torch.isfinite(estimate).all()
                                     else torch.full((len(self.objectives),), float("nan"), dtype=torch.float64))
        if self.per_objective:
            scale = _loss_scale(accelerator)
            self.gradients.accumulate(losses * (scale / accumulation), present, batched=self.batched_backward)
        else:
            accelerator.backward(losses @ self.coefficients.to(losses))

    # -- per optimizer step ---------------------------------------------------------------------

    def write_update(self, accelerator) -> dict[str, float]:
        """On a sync step: make ``.grad`` the update and return the values to log.

        Per-objective steps write ``scale * sum_i c_i g_i`` (``c = K w`` solved now on the Gram of the
        rows averaged over processes and unscaled; on fidelity-check steps the interval's ``c``), so a
        ``GradScaler`` unscales and checks it as a plain backward pass; non-finite rows give NaN
        coefficients and the step is skipped downstream. Other steps already hold their update.
        Returns ``weight/<objective>`` (the ``c_i`` applied) and, on fidelity-check steps,
        ``fidelity/update_cosine``, ``fidelity/weight_rel_error`` and ``fidelity/weight_ratio_<objective>``
        (applied / exact weight; NaN for an absent objective).
        """
        logs = {}
        if self.per_objective:
            exact_step = self.exact_step
            step = self.gradients.fair_update(self.alpha, grad_scale=_loss_scale(accelerator),
                                              stale=None if exact_step else self.coefficients)
            if exact_step:
                exact = step.exact
                if self.prediction_weights:
                    self.gram_scale = prediction_gram_calibration(step.gram, self._prediction_gram_sum,
                                                                  self.calibration, previous=self.gram_scale)
                    self._prediction_gram_sum.zero_()
                if self.coefficients is not None and self.update_interval > 1:
                    # an objective absent at this solve keeps its last weight for the steps until the next
                    exact = torch.where(exact == 0, self.coefficients, exact)
                if torch.isfinite(exact).all():
                    self.coefficients = exact
            else:
                logs["fidelity/update_cosine"], logs["fidelity/weight_rel_error"] = step.fidelity()
                logs.update({f"fidelity/weight_ratio_{name}": r
                             for name, r in zip(self.objectives, step.weight_ratios())})
            applied = step.applied
        else:
            applied = self.coefficients
        self.step += 1
        logs.update({f"weight/{name}": float(c) for name, c in zip(self.objectives, applied)})
        return logs

    # -- checkpoints ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What a resumed run needs: updates written, last coefficients, calibration (plain Python)."""
        coefficients = None if self.coefficients is None else [float(c) for c in self.coefficients]
        return {"weighting": self.weighting, "step": self.step, "coefficients": coefficients,
                "gram_scale": None if self.gram_scale is None else [float(s) for s in self.gram_scale]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. The fair coefficients and calibration are only taken when both the
        saved and this update are ``fair`` (a run resumed with another ``--weighting`` keeps its own)."""
        self.step = int(state["step"])
        saved = state.get("coefficients")
        if saved is not None and len(saved) != len(self.objectives):
            raise ValueError(f"the saved fair update has {len(saved)} objectives, this one {len(self.objectives)} "
                             f"{self.objectives}")
        if self.fair and state.get("weighting") == "fair" and state.get("coefficients") is not None:
            self.coefficients = torch.tensor(state["coefficients"], dtype=torch.float64)
            if state.get("gram_scale") is not None:  # a list; one float in checkpoints before per-objective scales
                scale = torch.as_tensor(state["gram_scale"], dtype=torch.float64)
                self.gram_scale = scale.expand(len(self.objectives)).clone()


def _loss_scale(accelerator) -> float:
    """The fp16 loss scale of ``accelerator`` (its ``GradScaler``), or 1."""
    scaler = getattr(accelerator, "scaler", None)
    return scaler.get_scale() if scaler is not None else 1.0


# ---------------------------------------------------------------------------------------------
# The LoRA file for ComfyUI / AUTOMATIC1111 / Forge (kohya format)
# ---------------------------------------------------------------------------------------------



def lora_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, *, prefix: str = "lora_unet", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """One model's peft LoRA state dict in the kohya format (what ComfyUI, A1111 and Forge load).

    ``state_dict`` is what ``peft.get_peft_model_state_dict(model)`` returns: per LoRA module
    ``{path}.lora_A.weight`` (down: ``(r, in)``, or ``(r, in, k, k)`` for a conv) and
    ``{path}.lora_B.weight`` (up: ``(out, r)`` or ``(out, r, 1, 1)``). Each module becomes

        {prefix}_{path with '.' -> '_'}.lora_down.weight = lora_A
        {prefix}_{path with '.' -> '_'}.lora_up.weight   = lora_B
        {prefix}_{path with '.' -> '_'}.alpha            = alpha   (0-d float32)

    and a loader computes ``W + (alpha / r) * up @ down`` with ``r`` = the rows of ``down``: peft's
    own scale ``lora_alpha / r``, so ``alpha`` must be the LoRA alpha, not the rank (diffusers'
    ``convert_state_dict_to_kohya`` writes the rank, wrong whenever they differ). ``dtype`` casts
    the weights (the ``.alpha`` scalars stay float32, so ``alpha / r`` is exact; every loader reads
    them with ``.item()``). Raises ``ValueError`` for a key that is not a LoRA A/B weight, a module
    with only one of the two, or two module paths that give the same kohya name.
    """
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        path, dot, kind = key.rpartition(".lora_")
        if not dot or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"not a LoRA A/B weight of a peft state dict: {key!r}")
        modules.setdefault(path, {})[kind[0]] = tensor
    out: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for path, pair in modules.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"module {path!r} has lora_{''.join(pair)} but not lora_{'B' if 'A' in pair else 'A'}")
        name = f"{prefix}_{path.replace('.', '_')}"
        if name in names:
            raise ValueError(f"modules {names[name]!r} and {path!r} both become {name!r}")
        names[name] = path
        down, up = pair["A"], pair["B"]
        if up.shape[1] != down.shape[0]:
            raise ValueError(f"module {path!r}: lora_B has {up.shape[1]} columns but lora_A {down.shape[0]} rows")
        out[f"{name}.lora_down.weight"] = down.detach().to(dtype or down.dtype).contiguous()
        out[f"{name}.lora_up.weight"] = up.detach().to(dtype or up.dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Reproducible files: the same run writes the same bytes
# ---------------------------------------------------------------------------------------------


def json_ready_config(config: dict) -> dict:
    """A config dict (``LoraConfig.to_dict()``) with every set as a sorted list, so that its JSON is the
    same in every process: peft keeps ``target_modules`` as a set, and a set's order follows the
    string hashes, which ``PYTHONHASHSEED`` changes per process (diffusers writes ``list(the set)``)."""

    def ready(value):
        if isinstance(value, (set, frozenset)):
            return sorted(value, key=str)
        if isinstance(value, dict):
            return {k: ready(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [ready(v) for v in value]
        return value

    return {k: ready(v) for k, v in config.items()}


def canonical_safetensors_header(header: bytes, extra_metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors JSON header written in one fixed order, padded with spaces to a multiple of 8 bytes
    (as the format asks): ``__metadata__`` first with its keys sorted, then the tensors in the order of their
    data. The safetensors writer emits ``__metadata__`` in the order of a Rust ``HashMap``, which is seeded
    at random in every process, so the same tensors and metadata give different bytes from run to run. Only
    the header changes: the data offsets are relative to the end of the header, and readers get the same
    tensors and the same metadata (plus ``extra_metadata``, when given, added to it)."""
    import json

    parsed = json.loads(header)
    metadata = parsed.pop("__metadata__", None)
    if extra_metadata:
        metadata = {**(metadata or {}), **extra_metadata}
    tensors = sorted(parsed.items(), key=lambda item: (item[1]["data_offsets"], item[0]))
    ordered = {} if metadata is None else {"__metadata__": dict(sorted(metadata.items()))}
    ordered.update(tensors)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return text + b" " * (-len(text) % 8)


def make_safetensors_reproducible(path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Rewrite the header of the safetensors file at ``path`` with :func:`canonical_safetensors_header`
    (the tensor bytes are copied unchanged; the file is replaced atomically), ``extra_metadata`` added to its
    metadata. Two files with the same tensors and metadata are then byte-identical, whatever the process that
    wrote them."""
    import shutil

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
        canonical = canonical_safetensors_header(header, extra_metadata)
        if canonical == header:
            return
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "wb") as out:
                out.write(len(canonical).to_bytes(8, "little"))
                out.write(canonical)
                shutil.copyfileobj(f, out, 16 << 20)
            shutil.copymode(path, temporary)
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
