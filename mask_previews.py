"""--save_mask_previews: the first training examples as trained, with each region's mask and an overlay."""

from __future__ import annotations

import logging
import os

import numpy as np
from PIL import Image

import fairhuman_utils as fh

UsageError = fh.UsageError
logger = logging.getLogger(__name__)


REGION_COLOURS = [(255, 64, 64), (64, 128, 255), (64, 200, 64), (240, 200, 40), (220, 80, 220), (40, 210, 210),
                  (255, 140, 30), (140, 90, 255)]
"""The overlay colour of each region, by its position among the regions (the first two: hand red, face blue)."""


def region_legend(overlay: Image.Image, names, colours) -> Image.Image:
    """``overlay`` with a legend strip below it: a colour swatch and the name of each region."""
    from PIL import ImageDraw

    line = 11
    legend = Image.new("RGB", (max(overlay.width, 8 + 6 * max(len(n) for n in names) + 14), overlay.height + line * len(names) + 2),
                       (255, 255, 255))
    legend.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(legend)
    for k, (name, colour) in enumerate(zip(names, colours)):
        y = overlay.height + 2 + k * line
        draw.rectangle([2, y + 1, 9, y + 8], fill=colour)
        draw.text((12, y - 1), name, fill=(0, 0, 0))
    return legend


def save_mask_previews(dataset, keys, folder: str) -> None:
    """Write the image, each region's mask (``{i}_{region}.png``) and an overlay with a colour per region and a
    legend per example, as trained (each at its bucket's size)."""
    os.makedirs(folder, exist_ok=True)
    names = [name for name, _, _ in dataset.sources]
    colours = [REGION_COLOURS[k % len(REGION_COLOURS)] for k in range(len(names))]
    for i, key in enumerate(keys):
        example = dataset[key]
        pixels = ((example["pixel_values"].permute(1, 2, 0).numpy() + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}_image.png"))
        overlay = pixels.astype(np.float32)
        for mask, name, colour in zip(example["masks"], names, colours):
            m = mask.numpy()
            Image.fromarray((m * 255).round().astype(np.uint8)).save(os.path.join(folder, f"{i}_{name}.png"))
            overlay = overlay * (1 - 0.45 * m[..., None]) + 0.45 * m[..., None] * np.array(colour, np.float32)
        overlay = Image.fromarray(overlay.clip(0, 255).astype(np.uint8))
        region_legend(overlay, names, colours).save(os.path.join(folder, f"{i}_overlay.png"))
