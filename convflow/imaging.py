"""Decode and resize one image to the pipeline's size with Pillow; light enough for worker processes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

MODES = {1: "L", 3: "RGB"}


def to_model_size(image: Image.Image, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """Convert to the pipeline's channels, then resize to (height, width) by stretching or padding."""
    height, width = size
    if image.mode.startswith("I"):
        # 16-bit (and 32-bit integer) images: Pillow's convert() clips to 255 rather than scaling.
        image = Image.fromarray(np.round(np.asarray(image, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if image.mode != MODES[channels]:
        # RGBA and palette images are flattened onto black before conversion, so the
        # transparent parts do not show whatever colour happened to be stored under them.
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        image = image.convert(MODES[channels])
    if image.size != (width, height):
        if resize == "pad":
            image = ImageOps.pad(image, (width, height), method=Image.Resampling.BILINEAR, color=0)
        else:
            image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[..., np.newaxis] if channels == 1 else pixels


def load_file(path: str, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    with Image.open(path) as image:
        image.draft(MODES[channels], (size[1], size[0]))  # JPEG: decode at reduced scale when large
        return to_model_size(image, size, channels, resize)


def load_array(pixels: np.ndarray, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return to_model_size(image, size, channels, resize)
