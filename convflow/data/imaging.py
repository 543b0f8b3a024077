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
from convflow.core import skips
from convflow.core.errors import DataError

MODES = {1: "L", 3: "RGB"}
JPEG_QUALITY = 95  # of JPEG records (data.record_format: jpeg)
# The image files convflow takes, by name, in training, `convflow init` and `convflow predict`: the
# formats people's photos come in that Pillow decodes (a GIF's first frame, a TIFF's first page).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# iPhones' photos, taken when the optional pillow-heif plugin is installed (convflow[heic]).
HEIF_SUFFIXES = (".heic", ".heif")
FORMATS_TAKEN = "JPEG, PNG, WebP, BMP, GIF, TIFF, and HEIC/HEIF with convflow[heic]"
# Pillow's name of each format taken, and the file name ending it goes by.
SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif"}
SUFFIX_OF_FORMAT |= {"TIFF": ".tiff", "HEIF": ".heic"}
# Image files Pillow does not recognize, named by their ending.
OTHER_IMAGE_SUFFIXES = {".svg": "SVG", ".avif": "AVIF", ".dng": "raw", ".cr2": "raw", ".nef": "raw", ".arw": "raw"}
# The brands of an ISO media file's `ftyp` box that mark a HEIC/HEIF image.
HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
ORIENTATION = 0x0112  # the EXIF tag
# A header claiming more pixels than this is refused before decoding (a decompression bomb).
MAX_PIXELS = 50_000_000


@functools.cache
def heif_available() -> bool:
    """Whether HEIC/HEIF files open: the optional pillow-heif plugin is installed (and is now
    registered with Pillow, in this process)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def taken_suffixes() -> tuple[str, ...]:
    """The file name endings of the images convflow takes (lower case)."""
    return IMAGE_SUFFIXES + (HEIF_SUFFIXES if heif_available() else ())


def is_image_name(path: str | Path) -> bool:
    """Whether convflow takes the file named `path` as an image (hidden files aside)."""
    return str(path).lower().endswith(taken_suffixes())


def open_image(source: str | Path | io.BytesIO) -> Image.Image:
    """Pillow's Image.open, with HEIC/HEIF files opening where the plugin is installed."""
    heif_available()
    return Image.open(source)


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1 to 8; 1, upright, when it has none)."""
    value = image.getexif().get(ORIENTATION, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says, as browsers and photo viewers show it (a
    phone stores a photo's pixels as the sensor read them, and the way up in the tag); `image`
    itself when it is upright. Every decode of a source image goes through here: training records
    (and so the report's samples, read from them), `convflow predict`, `load_file`. It decodes the
    image: a JPEG's draft is set before."""
    image.load()  # a TIFF turns itself upright as it loads, and drops its tag
    if orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def why_not_taken(path: str) -> str:
    """Why the file at `path`, whose name convflow does not take, is skipped: a HEIC without the plugin,
    an image in a format convflow does not take (named), one of a format it takes under another name,
    or not an image."""
    suffix = Path(path).suffix.lower()
    if suffix in HEIF_SUFFIXES:
        return skips.NEEDS_HEIC
    try:
        with open(path, "rb") as handle:
            if _needs_heif(handle.read(16)):
                return skips.NEEDS_HEIC
        with open_image(path) as image:
            found = image.format
    except Exception:  # Pillow raises many types for what it does not recognize
        found = OTHER_IMAGE_SUFFIXES.get(suffix)
        return f"{found} image: {skips.NOT_TAKEN} (it takes {FORMATS_TAKEN})" if found else skips.NOT_AN_IMAGE
    if found in SUFFIX_OF_FORMAT:
        named = f"named {suffix}" if suffix else "without a name ending"
        return f"{found} image {named}: {skips.RENAME} {SUFFIX_OF_FORMAT[found]} to use it"
    return f"{found} image: {skips.NOT_TAKEN} (it takes {FORMATS_TAKEN})"


def _needs_heif(head: bytes) -> bool:
    """Whether a file starting with `head` is a HEIC/HEIF image that needs the missing plugin."""
    return head[4:8] == b"ftyp" and head[8:12] in HEIF_BRANDS and not heif_available()


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
    with open_image(path) as image:
        _draft(image, size, channels)
        return to_model_size(upright(image), size, channels, resize)


def _draft(image: Image.Image, size: tuple[int, int], channels: int) -> None:
    """JPEG: decode at a reduced scale when the image is large (still at least `size` once upright)."""
    image.draft(MODES[channels], (size[0], size[1]) if _sideways(image) else (size[1], size[0]))


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
        with open_image(io.BytesIO(content)) as image:
            mode, size = image.mode, image.size
            if self._keeps_as_it_is(image):
                if not measure:
                    image.draft(image.mode, (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                return content, _measured(np.asarray(image), mode, size) if measure else None
            _draft(image, self.size, self.channels)
            turned = upright(image)
            if turned.size != image.size:  # turned sideways
                size = size[::-1]
            model_image = _model_image(turned, self.size, self.channels, self.resize)
            record = _encode_model_image(model_image, self.record_format)
            return record, _measured(np.asarray(model_image), mode, size) if measure else None

    def _keeps_as_it_is(self, image: Image.Image) -> bool:
        return (
            self.record_format == "jpeg"
            and image.format == "JPEG"
            and image.mode == MODES[self.channels]
            and image.size == (self.size[1], self.size[0])
            and orientation(image) == 1
        )

    def pixels(self, source: int | np.ndarray) -> np.ndarray:
        if self.images_npy is not None:
            source = images_array(self.images_npy)[source]
            if source.shape == (*self.size, self.channels):
                return np.asarray(source)
        return load_array(np.asarray(source), self.size, self.channels, self.resize)


def _sideways(image: Image.Image) -> bool:
    """Whether the image turns a quarter once upright: EXIF orientations 5 to 8 swap width and height."""
    return orientation(image) >= 5


def _upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the image once upright (a TIFF's as it loaded: Pillow turns it itself)."""
    return image.size[::-1] if _sideways(image) else image.size


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
    """check_image_file of `path` (only its first bytes read if its name is not an image's), and the
    sha256 digest of its bytes: the file is read once for both."""
    if not is_image_name(path):
        return why_not_taken(path), (0, 0), b""
    content = Path(path).read_bytes()
    return (*check_image_bytes(content), hashlib.sha256(content).digest())


def check_image_bytes(content: bytes) -> tuple[str | None, tuple[int, int]]:
    """Why an image file's bytes are unusable (None if usable), and its (height, width) once upright.

    A JPEG is not decoded here: to_tfrecords decodes every image once, and says which file if one
    fails. Its header is read and its scan must reach the end-of-image marker (a cut-off file does
    not); other formats are decoded, as their damage shows nowhere else.
    """
    if not content:
        return skips.EMPTY, (0, 0)
    try:
        with open_image(io.BytesIO(content)) as image:
            size = (image.height, image.width)
            if image.width * image.height > MAX_PIXELS:
                return f"{image.width}x{image.height} exceeds {MAX_PIXELS} pixels", size
            if image.format != "JPEG":
                image.load()
            elif content.rfind(b"\xff\xd9") < image.tile[0].offset:  # the scan starts at the tile's offset
                return skips.CUT_OFF, (0, 0)
            size = _upright_size(image)[::-1]
    except Image.DecompressionBombError as error:  # refused by Pillow before our own size check
        return f"exceeds {MAX_PIXELS} pixels: {error}", (0, 0)
    except Exception as error:  # PIL raises many types for bad files
        return skips.NEEDS_HEIC if _needs_heif(content[:16]) else f"cannot decode: {error}", (0, 0)
    return None, size
