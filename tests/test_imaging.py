"""convflow.data.imaging: channel conversion and resizing of one image, as to_tfrecords applies it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from convflow.data import imaging


def test_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere, but only the left half is opaque
    rgba[:, :4, 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)

    rgb = imaging.load_file(str(path), (8, 8), 3, "stretch")

    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[:, :4], np.broadcast_to([200, 0, 0], (8, 4, 3)))
    np.testing.assert_array_equal(rgb[:, 4:], 0)


def test_grayscale_to_rgb_and_back(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = tmp_path / "gray.png"
    Image.fromarray(gray, "L").save(path)

    rgb = imaging.load_file(str(path), (8, 8), 3, "stretch")
    np.testing.assert_array_equal(rgb, np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(imaging.load_file(str(path), (8, 8), 1, "stretch")[..., 0], gray)


def test_stretch_and_pad(tmp_path):
    white = np.full((10, 20, 3), 255, np.uint8)  # height 10, width 20
    stretched = imaging.load_array(white, (12, 12), 3, "stretch")
    padded = imaging.load_array(white, (12, 12), 3, "pad")

    assert stretched.shape == padded.shape == (12, 12, 3)
    assert stretched.min() == 255
    # pad keeps the 2:1 aspect ratio: 6 white rows centred between black bars
    assert padded[0].max() == 0 and padded[-1].max() == 0
    assert padded[6].min() == 255


@pytest.mark.parametrize("channels", [1, 3])
def test_arrays_at_the_target_size_are_unchanged(channels):
    pixels = np.random.default_rng(0).integers(0, 256, (6, 9, channels), dtype=np.uint8)
    np.testing.assert_array_equal(imaging.load_array(pixels, (6, 9), channels, "stretch"), pixels)


def test_sixteen_bit_grayscale_png_keeps_its_contrast(tmp_path):
    """A 16-bit PNG (common for scans and medical images) must map 0..65535 onto 0..255.

    Pillow's plain convert("L") clips instead, so every pixel above 255 turns white.
    """
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")

    pixels = imaging.load_file(str(path), (16, 16), 1, "stretch")[..., 0]

    np.testing.assert_allclose(pixels, ramp / 257, atol=1)
