"""Image and mask reading with uniform float output and one-line errors."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_TIFF_EXTENSIONS = (".tif", ".tiff")
_FORMAT_NAMES = {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF"}


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
        return _one_line(f"cannot read image '{self.path}': {self.reason}")


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
    detail = text[:80] or type(exc).__name__
    return f"corrupt {fmt} ({detail})"


def _read_pillow(path: Path) -> np.ndarray:
    with Image.open(path) as im:
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


def _read_tifffile(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first  # multi-page TIFF: first page only
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


def _decode(path: Path) -> np.ndarray:
    if path.suffix.lower() not in _TIFF_EXTENSIONS:
        return _read_pillow(path)
    try:
        return _read_tifffile(path)
    except Exception as tiff_exc:
        try:
            # Pillow decodes some TIFF compressions (LZW, JPEG) that tifffile needs imagecodecs for.
            return _read_pillow(path)
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
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "b":
        return arr.astype(np.float32)
    if kind == "u" and size in (1, 2):
        return (arr / (255.0 if size == 1 else 65535.0)).astype(np.float32)
    if kind != "f":
        raise ImageReadError(path, f"unsupported bit depth ({arr.dtype.name})")
    data = arr.astype(np.float64)
    if not np.isfinite(data).all():
        raise ImageReadError(path, "contains NaN/inf values")
    if data.min() < 0:
        raise ImageReadError(path, "negative values in float image")
    high = data.max()
    if high > 1:
        data = data / (65535.0 if high <= 65535 else high)
    return data.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Read an image as float32 in [0, 1]: (H, W) for grayscale, (H, W, 3) for colour.

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
    if not path.exists():
        raise ImageReadError(path, "file not found")
    if not path.is_file():
        raise ImageReadError(path, "not a file")
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(path, "empty file")
        arr = _decode(path)
    except ImageReadError:
        raise
    except Exception as exc:  # decoders raise many types (OSError, SyntaxError, zlib, struct...)
        raise ImageReadError(path, _reason(exc, _format_name(path))) from exc
    return _to_float(path, _normalise_shape(path, arr))


def image_shape(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    path = Path(path)
    try:
        if path.suffix.lower() in _TIFF_EXTENSIONS:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                return int(page.imagelength), int(page.imagewidth)
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except Exception as exc:  # the decoders raise many types; reading the header is their first step
        raise ImageReadError(path, _reason(exc, _format_name(path))) from exc


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
