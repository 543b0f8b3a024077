"""convflow.data.imaging: channel conversion and resizing of one image, as to_tfrecords applies it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from conftest import save_turned
from convflow.core import skips
from convflow.data import imaging

# A landscape photo, 12 high and 20 wide, smooth enough for lossy formats to keep it close.
ROWS, COLUMNS = np.mgrid[0:12, 0:20]
PHOTO = np.stack([COLUMNS * 12, ROWS * 20, np.full_like(ROWS, 90)], axis=-1).astype(np.uint8)


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


# ----------------------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("record_format", ["raw", "png"])
@pytest.mark.parametrize(("suffix", "options"), [(".png", {}), (".tiff", {}), (".webp", {"lossless": True})])
@pytest.mark.parametrize("orientation", range(2, 9))
def test_a_turned_photos_record_equals_the_upright_photos(tmp_path, orientation, suffix, options, record_format):
    """A phone stores a photo's pixels as the sensor read them and the way up in an EXIF tag: its
    record holds the photo upright, as viewers show it, byte for byte the upright file's record."""
    upright = save_turned(tmp_path / f"upright{suffix}", PHOTO, 1, **options)
    turned = save_turned(tmp_path / f"turned{suffix}", PHOTO, orientation, **options)
    records = imaging.RecordImages((16, 16), 3, "pad", record_format)
    with Image.open(turned) as stored:
        assert stored.getexif()[imaging.ORIENTATION] == orientation

    assert records.one(str(turned)) == records.one(str(upright))
    assert records.measured(str(turned))[1] == records.measured(str(upright))[1]  # its properties, upright
    assert imaging.check_image_file(turned) == (None, (12, 20))  # (height, width) as seen
    np.testing.assert_array_equal(imaging.load_file(str(turned), (12, 20), 3, "stretch"), PHOTO)


def test_a_turned_jpeg_at_the_models_size_is_turned_not_kept_as_it_is(tmp_path):
    """A JPEG at the model's size goes into a JPEG record as it is, unless its tag turns it."""
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[:8, :8] = 255  # the top left block white, on an 8x8 JPEG block: it survives compression
    turned = save_turned(tmp_path / "turned.jpg", pixels, 6, quality=95)

    record = imaging.RecordImages((16, 16), 3, "stretch", "jpeg").one(str(turned))

    assert record != turned.read_bytes()
    decoded = np.asarray(Image.open(io.BytesIO(record)), np.float64)
    assert decoded[:8, :8].mean() > 240 and decoded[8:].mean() < 15 and decoded[:, 8:].mean() < 15


def test_upright_leaves_an_untagged_image_itself(tmp_path):
    path = save_turned(tmp_path / "photo.png", PHOTO, 1)
    with Image.open(path) as image:
        assert imaging.orientation(image) == 1 and imaging.upright(image) is image


# ----------------------------------------------------------------------------- which files are taken


@pytest.mark.parametrize("suffix", [".jpg", ".JPEG", ".png", ".webp", ".bmp", ".gif", ".tif", ".TIFF"])
def test_every_format_taken_decodes(tmp_path, suffix):
    path = tmp_path / f"photo{suffix}"
    lossless = {".webp": {"lossless": True}}.get(suffix.lower(), {})
    Image.fromarray(PHOTO).save(path, **lossless)

    assert imaging.is_image_name(path)
    problem, size, digest = imaging.inspect_image_file(str(path))
    assert (problem, size) == (None, (12, 20)) and len(digest) == 32
    pixels = imaging.load_file(str(path), (12, 20), 3, "stretch")
    if suffix.lower() in (".jpg", ".jpeg"):
        assert np.abs(pixels.astype(int) - PHOTO).mean() < 8  # lossy
    elif suffix == ".gif":
        assert pixels.shape == PHOTO.shape  # a palette of 256 colours: its first frame, in them
    else:
        np.testing.assert_array_equal(pixels, PHOTO)


def test_files_not_taken_are_named_with_why(tmp_path):
    Image.fromarray(PHOTO).save(tmp_path / "scan.ppm")
    Image.fromarray(PHOTO).save(tmp_path / "photo.jfif", "JPEG")
    Image.fromarray(PHOTO).save(tmp_path / "IMG_0001", "PNG")
    (tmp_path / "logo.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    (tmp_path / "notes.txt").write_text("not an image")

    def why(name: str) -> str:
        problem, size, digest = imaging.inspect_image_file(str(tmp_path / name))
        assert problem is not None and (size, digest) == ((0, 0), b"")
        return problem

    taken = "(it takes JPEG, PNG, WebP, BMP, GIF, TIFF, and HEIC/HEIF with convflow[heic])"
    assert why("scan.ppm") == f"PPM image: a format convflow does not take {taken}"
    assert why("logo.svg") == f"SVG image: a format convflow does not take {taken}"
    assert why("photo.jfif") == "JPEG image named .jfif: rename it to .jpg to use it"
    assert why("IMG_0001") == "PNG image without a name ending: rename it to .png to use it"
    assert why("notes.txt") == "not an image file"


def test_a_heic_photo_without_the_extra_is_named_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(imaging, "heif_available", lambda: False)
    heic = tmp_path / "IMG_0001.HEIC"
    heic.write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64))
    renamed = tmp_path / "IMG_0002.dat"  # an iPhone photo under another name: told by its content
    renamed.write_bytes(heic.read_bytes())
    exported = tmp_path / "IMG_0003.jpg"  # and under a name convflow takes
    exported.write_bytes(heic.read_bytes())

    assert not imaging.is_image_name(heic)
    for path in (heic, renamed, exported):
        problem = imaging.inspect_image_file(str(path))[0]
        assert problem == skips.NEEDS_HEIC
        assert problem.endswith("pip install 'convflow[heic]'")


def test_a_heic_photo_with_the_extra_is_taken_and_decoded(tmp_path):
    pytest.importorskip("pillow_heif", reason="the heic extra is not installed: pip install 'convflow[heic]'")
    path = tmp_path / "IMG_0001.heic"
    Image.fromarray(PHOTO).save(path, "HEIF", quality=-1)

    assert imaging.heif_available() and imaging.is_image_name(path)
    assert imaging.inspect_image_file(str(path))[:2] == (None, (12, 20))
    pixels = imaging.load_file(str(path), (12, 20), 3, "stretch")
    assert np.abs(pixels.astype(int) - PHOTO).mean() < 8  # through YUV
