"""Image and mask reading with uniform float output and one-line errors."""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_TIFF_EXTENSIONS = (".tif", ".tiff")
_FORMAT_NAMES = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}

#: the largest image decoded, in pixels (width x height), unless `max_pixels` or the environment
#: variable ANOMALENS_MAX_PIXELS says otherwise: 100 MP is 1.2 GB as float32 RGB
DEFAULT_MAX_PIXELS = 100_000_000
#: images narrower or lower than this, in pixels, are refused (nothing to inspect in a 1x1 image)
MIN_SIDE = 8


def display_name(path: str | Path) -> str:
    """A file name as text that always encodes as UTF-8: bytes that are not UTF-8 (POSIX names
    hold any bytes; Python keeps them as surrogates) are written as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _one_line(text: str) -> str:
    """Escape line breaks so messages stay on one line whatever the path holds."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class ImageReadError(ValueError):
    """An image or mask file that cannot be decoded into a valid array."""

    def __init__(self, path: str | Path, reason: str) -> None:
        # Both fields go to args so the exception pickles (e.g. across DataLoader workers).
        super().__init__(str(path), reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return _one_line(f"cannot read image '{display_name(self.path)}': {self.reason}")


class DatasetError(ValueError):
    """A dataset folder, layout or listing that cannot be used; the message names the path."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def _format_name(path: Path) -> str:
    suffix = path.suffix.lower()
    return _FORMAT_NAMES.get(suffix, suffix.lstrip(".").upper() or "image")


def _reason(exc: Exception, fmt: str) -> str:
    """Short, one-line description of a decoder exception."""
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if isinstance(exc, EOFError) or "truncat" in lowered or "failed to read" in lowered:
        return f"truncated {fmt}"
    if isinstance(exc, UnidentifiedImageError):
        return f"not a recognised image file (expected {fmt})"
    if isinstance(exc, (MemoryError, Image.DecompressionBombError)):
        return "image too large to decode"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, IsADirectoryError):
        return "not a file"
    detail = text[:80] or type(exc).__name__
    return f"corrupt {fmt} ({detail})"


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without decoding the pixels."""

    width: int
    height: int
    channels: int
    bytes_per_sample: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decode_bytes(self) -> int:
        """Memory the decoded image needs at most: the decoder's array plus the float32 result."""
        return self.pixels * self.channels * (self.bytes_per_sample + 4)


# catch_warnings changes process-wide state: decoding threads take turns (opening reads the header only)
_OPEN_LOCK = threading.Lock()


def _open_pillow(path: Path) -> Image.Image:
    # Pillow warns (and at twice its limit refuses) on large images; check_header decides here
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _pillow_header(im: Image.Image) -> ImageHeader:
    bands = len(im.getbands())
    depth = 4 if im.mode in ("I", "F") else 2 if im.mode.startswith("I;16") else 1
    # palette, CMYK, YCbCr... are converted to 8-bit RGB
    channels = bands if im.mode in ("1", "L", "LA", "La", "I", "F", "RGB") or depth > 1 else 3
    return ImageHeader(im.width, im.height, channels, depth, im.format or "image")


def _tiff_header(page: tifffile.TiffPage) -> ImageHeader:
    channels = int(page.samplesperpixel)
    if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
        channels = 3
    return ImageHeader(
        int(page.imagewidth), int(page.imagelength), channels, max(1, page.dtype.itemsize), "TIFF"
    )


def check_header(path: str | Path, header: ImageHeader, max_pixels: int | None = None) -> ImageHeader:
    """Refuse, before decoding, an image outside the limits: more than `max_pixels` pixels (default
    `max_pixels_limit()`), a side under MIN_SIDE, more than 4 channels, or GIF."""
    limit = max_pixels_limit() if max_pixels is None else max_pixels
    if header.format == "GIF":
        raise ImageReadError(path, "GIF is not supported (palette colours, animation): convert it to PNG")
    if header.pixels > limit:
        raise ImageReadError(
            path,
            f"image too large: {header.width}x{header.height}x{header.channels} "
            f"({header.pixels / 1e6:.1f} megapixels, max_pixels is {limit / 1e6:g} M; "
            f"decoding would need {header.decode_bytes / 2**30:.1f} GiB)",
        )
    if header.channels > 4:
        raise ImageReadError(path, f"unsupported image: {header.channels} channels")
    if min(header.width, header.height) < MIN_SIDE:
        raise ImageReadError(
            path, f"image too small: {header.width}x{header.height} (at least {MIN_SIDE} px a side)"
        )
    return header


def max_pixels_limit() -> int:
    """The pixel limit in force: ANOMALENS_MAX_PIXELS when set (so Ray workers and the service read
    the same one), else DEFAULT_MAX_PIXELS."""
    text = os.environ.get("ANOMALENS_MAX_PIXELS", "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"ANOMALENS_MAX_PIXELS={text!r}: give a positive number of pixels, e.g. 100e6")
    return value


def _read_pillow(path: Path, max_pixels: int | None) -> np.ndarray:
    with _open_pillow(path) as im:
        check_header(path, _pillow_header(im), max_pixels)
        im.load()  # decode everything now so truncated files fail here, not later
        mode = im.mode
        if mode in ("1", "L") or mode.startswith("I;16"):
            return np.asarray(im)
        if mode in ("LA", "La"):
            return np.asarray(im.getchannel(0))
        if mode == "I":
            # Older Pillow versions decode 16-bit PNGs as 32-bit "I"; keep them 16-bit.
            arr = np.asarray(im)
            in_range = arr.size and arr.min() >= 0 and arr.max() <= 65535
            return arr.astype(np.uint16) if in_range else arr
        if mode == "F":
            return np.asarray(im)
        # P, PA, RGB, RGBA, RGBX, CMYK, YCbCr, ...: Pillow's RGB conversion drops alpha.
        return np.asarray(im.convert("RGB"))


def _read_tifffile(path: Path, max_pixels: int | None) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first  # multi-page TIFF: first page only
        check_header(path, _tiff_header(page), max_pixels)
        arr = page.asarray()
        photometric = page.photometric
        if photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
            colormap = np.asarray(page.colormap, dtype=np.uint16)
            arr = np.moveaxis(colormap[:, arr], 0, -1)
        elif photometric == tifffile.PHOTOMETRIC.MINISWHITE:
            if arr.dtype.kind == "b":
                arr = ~arr
            elif arr.dtype.kind == "u":
                arr = np.iinfo(arr.dtype).max - arr
    return arr


def _decode(path: Path, max_pixels: int | None) -> np.ndarray:
    if path.suffix.lower() not in _TIFF_EXTENSIONS:
        return _read_pillow(path, max_pixels)
    try:
        return _read_tifffile(path, max_pixels)
    except ImageReadError:
        raise  # refused from its header: Pillow would read the same header
    except Exception as tiff_exc:
        try:
            # Pillow decodes some TIFF compressions (LZW, JPEG) that tifffile needs imagecodecs for.
            return _read_pillow(path, max_pixels)
        except ImageReadError:
            raise
        except Exception:
            raise tiff_exc from None


def _normalise_shape(path: Path, arr: np.ndarray) -> np.ndarray:
    """Return (H, W) or (H, W, 3); channels-first TIFFs are moved to channels-last."""
    if arr.ndim == 3 and arr.shape[-1] not in (1, 2, 3, 4) and arr.shape[0] in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # gray or gray + alpha
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[-1] == 4:  # RGBA: alpha dropped
        arr = arr[..., :3]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] == 3)):
        raise ImageReadError(path, f"unsupported image shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ImageReadError(path, "image has no pixels")
    return arr


def _to_float(path: Path, arr: np.ndarray) -> np.ndarray:
    # one float32 array, scaled in place: no float64 copy of a large image
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "b":
        return arr.astype(np.float32)
    if kind == "u" and size in (1, 2):
        data = arr.astype(np.float32)
        data /= np.float32(255.0 if size == 1 else 65535.0)
        return data
    if kind != "f":
        raise ImageReadError(path, f"unsupported bit depth ({arr.dtype.name})")
    if not np.isfinite(arr).all():
        raise ImageReadError(path, "contains NaN/inf values")
    if arr.min() < 0:
        raise ImageReadError(path, "negative values in float image")
    high = float(arr.max())
    # the decoder's own float32 array is scaled in place (read_image's only caller owns it)
    data = arr if arr.dtype == np.float32 and arr.flags.writeable else arr.astype(np.float32)
    if high > 1:
        data /= np.float32(65535.0 if high <= 65535 else high)
    return data


def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Read an image as float32 in [0, 1]: (H, W) for grayscale, (H, W, 3) for colour.

    The header is checked before any pixel is decoded (`check_header`): more than `max_pixels`
    pixels (default `max_pixels_limit()`: ANOMALENS_MAX_PIXELS or 100 megapixels), a side under
    8 px, more than 4 channels, or a GIF file is refused with a one-line error naming the file.

    Integer images are divided by 255 (8-bit) or 65535 (16-bit, also 16-bit PNG) and
    1-bit images become 0/1. Float images (TIFF or Pillow "F") are kept as they are when
    within [0, 1]; when their maximum exceeds 1 they are divided by 65535 (assumed to
    hold 16-bit data) or, if the maximum exceeds 65535, by that maximum. Negative or
    NaN/inf values are rejected. Alpha channels are dropped (no compositing), palette
    images become RGB, multi-page TIFFs yield their first page and a page decoded as
    (C, H, W) (planar samples, C in 1, 3, 4) is moved to channels-last. Grayscale
    stored as three channels stays three-channel. EXIF orientation is ignored so pixels
    stay aligned with masks. Pillow decodes 16-bit colour PNGs to 8 bits, so only 16-bit
    grayscale PNGs (and 16-bit TIFFs) keep full precision. Every failure raises
    :class:`ImageReadError`.
    """
    path = Path(path)
    limit = max_pixels_limit() if max_pixels is None else max_pixels
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a file")
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file")
        arr = _decode(path, limit)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, zlib, struct...)
        raise ImageReadError(path, _reason(exc, _format_name(path))) from exc
    return _to_float(path, _normalise_shape(path, arr))


def read_header(path: str | Path) -> ImageHeader:
    """Width, height, channels and sample size of an image file, from its header only (Pillow's
    lazy open; tifffile for the first TIFF page). The service can weigh a decode by its
    `decode_bytes` before starting it."""
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_EXTENSIONS:
            try:
                with tifffile.TiffFile(path) as tif:
                    return _tiff_header(tif.pages.first)
            except Exception:
                pass  # not a TIFF inside (a wrong extension): Pillow reads what it is
        with _open_pillow(path) as im:
            return _pillow_header(im)
    except Exception as exc:  # the decoders raise many types; reading the header is their first step
        raise ImageReadError(path, _reason(exc, _format_name(path))) from exc


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    header = read_header(path)
    return header.height, header.width


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a defect mask as bool (H, W): any non-zero pixel (in any channel) is defect.

    If ``shape`` (H, W) is given, a mask of another size raises :class:`ImageReadError`.
    """
    image = read_image(path)
    mask = image > 0 if image.ndim == 2 else (image > 0).any(axis=-1)
    if shape is not None and tuple(shape) != mask.shape:
        (h, w), (eh, ew) = mask.shape, shape
        raise ImageReadError(path, f"mask size {w}x{h} does not match image size {ew}x{eh}")
    return mask


def natural_key(text: str) -> list[str | int]:
    """Sort key that orders embedded numbers numerically ("img2" before "img10")."""
    # re.split with a group alternates text/number, so positions never compare str to int.
    return [int(t) if i % 2 else t.lower() for i, t in enumerate(re.split(r"(\d+)", text))]


def natural_sorted(paths: Iterable[Path], root: Path) -> list[Path]:
    """Sort paths naturally by their parts relative to ``root`` (exact string breaks ties)."""

    def key(p: Path) -> tuple[list[list[str | int]], str]:
        rel = p.relative_to(root)
        return [natural_key(part) for part in rel.parts], rel.as_posix()

    return sorted(paths, key=key)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (hidden files and folders skipped), in natural order.

    Raises :class:`DatasetError` if the folder is missing or holds no images.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder not found: '{folder}'")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    images = [
        p
        for p in candidates
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    if not images:
        where = " (searched recursively)" if recursive else ""
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in '{folder}'{where}")
    return natural_sorted(images, folder)
