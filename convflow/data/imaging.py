"""Check, decode and resize one image with Pillow; light enough for worker processes (no
TensorFlow, pydantic or Prefect is imported here)."""

from __future__ import annotations

import functools
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from convflow.checks.image_properties import image_properties
from convflow.core.errors import DataError

MODES = {1: "L", 3: "RGB"}
JPEG_QUALITY = 95  # of JPEG records (data.record_format: jpeg)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# A header claiming more pixels than this is refused before decoding (a decompression bomb).
MAX_PIXELS = 50_000_000


def to_model_size(image: Image.Image, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """Convert to the pipeline's channels, then resize to (height, width) by stretching or padding."""
    pixels = np.asarray(_model_image(image, size, channels, resize), dtype=np.uint8)
    return pixels[..., np.newaxis] if channels == 1 else pixels


def _model_image(image: Image.Image, size: tuple[int, int], channels: int, resize: str) -> Image.Image:
    """to_model_size, kept a Pillow image (L or RGB)."""
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
    return image


def load_file(path: str, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    with Image.open(path) as image:
        _draft(image, size, channels)
        return to_model_size(image, size, channels, resize)


def _draft(image: Image.Image, size: tuple[int, int], channels: int) -> None:
    """JPEG: decode at a reduced scale when the image is large (still at least `size`)."""
    image.draft(MODES[channels], (size[1], size[0]))


def load_array(pixels: np.ndarray, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return to_model_size(image, size, channels, resize)


def encode_image(image: np.ndarray, record_format: str) -> bytes:
    """An image's bytes as a record holds them: raw pixels, or a JPEG/PNG file made by Pillow."""
    if record_format == "raw":
        return image.tobytes()
    return _encode_model_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image), record_format)


def _encode_model_image(image: Image.Image, record_format: str) -> bytes:
    """encode_image of a Pillow image at the model's size (L or RGB): the same bytes, without
    copying its pixels into NumPy first."""
    if record_format == "raw":
        return image.tobytes()
    buffer = io.BytesIO()
    if record_format == "jpeg":
        image.save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, "PNG", compress_level=1)  # level 6 (the default) writes 3x slower for 10% less
    return buffer.getvalue()


@dataclass(frozen=True)
class RecordImages:
    """How an example's source becomes its record's image bytes (resized, then encoded as
    `record_format`): a file's path, a row of `images_npy`, or (TFDS) the image itself.

    It pickles, so that worker processes can encode with it.
    """

    size: tuple[int, int]
    channels: int
    resize: str
    record_format: str
    images_npy: str | None = None

    def one(self, source: str | int | np.ndarray) -> bytes:
        return self.measured(source, measure=False)[0]

    def measured(self, source: str | int | np.ndarray, measure: bool = True) -> tuple[bytes, dict | None]:
        """The record bytes of `source` and, when `measure`, the data checks' image properties
        (checks.image_properties) of the image at the model's size, with its width, height and
        mode as decoded: the pixels the model sees, measured while they are decoded anyway."""
        if isinstance(source, str):
            try:
                return self._file_record(source, measure)
            except Exception as error:  # PIL raises many types for bad files
                # download_and_split read only a JPEG's header and end marker: this is its decode
                raise DataError(f"{source}: cannot decode: {error}") from error
        pixels = self.pixels(source)
        record = encode_image(pixels, self.record_format)
        if not measure:
            return record, None
        stored = images_array(self.images_npy)[source] if self.images_npy is not None else np.asarray(source)
        height, width = stored.shape[:2]
        channels = stored.shape[2] if stored.ndim == 3 else 1
        return record, _measured(pixels, MODES.get(channels, "RGB"), (width, height))

    def _file_record(self, path: str, measure: bool) -> tuple[bytes, dict | None]:
        """A file's record bytes. A JPEG already at the model's size and colours goes into a JPEG
        record as it is: decoding and encoding it again would cost a third of the stage and lose
        detail. It is still decoded once, at an eighth of its size (the whole compressed stream
        is read, so a damaged file fails here, named, not in training), or whole when measured."""
        content = Path(path).read_bytes()
        with Image.open(io.BytesIO(content)) as image:
            mode, size = image.mode, image.size
            if self._keeps_as_it_is(image):
                if not measure:
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                return content, _measured(np.asarray(image), mode, size) if measure else None
            _draft(image, self.size, self.channels)
            model_image = _model_image(image, self.size, self.channels, self.resize)
            record = _encode_model_image(model_image, self.record_format)
            return record, _measured(np.asarray(model_image), mode, size) if measure else None

    def _keeps_as_it_is(self, image: Image.Image) -> bool:
        return (
            self.record_format == "jpeg"
            and image.format == "JPEG"
            and image.mode == MODES[self.channels]
            and image.size == (self.size[1], self.size[0])
        )

    def pixels(self, source: int | np.ndarray) -> np.ndarray:
        if self.images_npy is not None:
            source = images_array(self.images_npy)[source]
            if source.shape == (*self.size, self.channels):
                return np.asarray(source)
        return load_array(np.asarray(source), self.size, self.channels, self.resize)


def _measured(pixels: np.ndarray, mode: str, size: tuple[int, int]) -> dict:
    """image_properties of the model-size `pixels`, with the (width, height), mode and channels (the
    mode's bands) as decoded."""
    properties = image_properties(pixels, mode)
    properties["width"], properties["height"] = size
    properties["channels"] = Image.getmodebands(mode)
    return properties


@functools.lru_cache(maxsize=2)
def images_array(images_npy: str) -> np.ndarray:
    """images.npy mapped, not read: a process touches only the rows it encodes."""
    return np.load(images_npy, mmap_mode="r")


def check_image_file(path: str | Path) -> tuple[str | None, tuple[int, int]]:
    """Why an image file is unusable (None if usable), and its (height, width)."""
    return check_image_bytes(Path(path).read_bytes())


def inspect_image_file(path: str) -> tuple[str | None, tuple[int, int], bytes]:
    """check_image_file of `path` (unread if its name is not an image's), and the sha256 digest of
    its bytes: the file is read once for both."""
    if not path.lower().endswith(IMAGE_SUFFIXES):
        return "not an image file", (0, 0), b""
    content = Path(path).read_bytes()
    return (*check_image_bytes(content), hashlib.sha256(content).digest())


def check_image_bytes(content: bytes) -> tuple[str | None, tuple[int, int]]:
    """Why an image file's bytes are unusable (None if usable), and its (height, width).

    A JPEG is not decoded here: to_tfrecords decodes every image once, and says which file if one
    fails. Its header is read and its scan must reach the end-of-image marker (a cut-off file does
    not); other formats are decoded, as their damage shows nowhere else.
    """
    if not content:
        return "empty file", (0, 0)
    try:
        with Image.open(io.BytesIO(content)) as image:
            size = (image.height, image.width)
            if image.width * image.height > MAX_PIXELS:
                return f"{image.width}x{image.height} exceeds {MAX_PIXELS} pixels", size
            if image.format != "JPEG":
                image.load()
            elif content.rfind(b"\xff\xd9") < image.tile[0].offset:  # the scan starts at the tile's offset
                return "cannot decode: image file is truncated", (0, 0)
    except Image.DecompressionBombError as error:  # refused by Pillow before our own size check
        return f"exceeds {MAX_PIXELS} pixels: {error}", (0, 0)
    except Exception as error:  # PIL raises many types for bad files
        return f"cannot decode: {error}", (0, 0)
    return None, size
