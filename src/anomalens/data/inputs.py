"""Turn what users pass (samples, paths, folders, arrays) into preprocessed batches.

Every detector reads images through here, so corrupt files, progress and skip-and-log
behave the same for all methods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.datasets import Sample
from anomalens.data.drift import image_statistics
from anomalens.data.geometry import Geometry, Placement, parse_size
from anomalens.data.io import MIN_SIDE, ImageReadError, display_name, list_images, read_image

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

ImageLike = "Sample | str | Path | np.ndarray"


@dataclass
class InputItem:
    """One image to score: where it came from and, once read, its pixels. `key` names it in
    results and messages (`display_name` of the path: always valid UTF-8)."""

    key: str
    path: Path | None = None
    array: np.ndarray | None = None


@dataclass
class Batch:
    keys: list[str]
    shapes: list[tuple[int, int]]  # original (H, W) of each image, for maps at input resolution
    pixels: torch.Tensor  # (N, C, H, W) float32, normalized: each image's canvases in turn
    placements: list[Placement] = field(default_factory=list)  # where each image's canvases sit
    stats: list[dict] = field(default_factory=list)  # each image's drift statistics, when asked for
    images: list[np.ndarray] = field(default_factory=list)  # the decoded images, when asked for


@dataclass
class SkipLog:
    """Bad files met while reading with on_error='skip'; with `path`, each message is also appended
    to that file as it is met (a crash later keeps the list so far)."""

    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: Path | None = None

    def add(self, key: str, message: str) -> None:
        self.skipped.append((key, message))
        log.warning("skipped %s", message)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(message + "\n")


def item_error(item: InputItem, err: Exception) -> ImageReadError:
    """Any failure while reading or preparing one image as that image's one-line error."""
    if isinstance(err, ImageReadError):
        return err
    what = item.path if item.path is not None else item.key
    text = " ".join(str(err).split())[:120]
    return ImageReadError(what, f"cannot prepare it ({type(err).__name__}{': ' + text if text else ''})")


def as_items(images: Iterable | np.ndarray | str | Path) -> list[InputItem]:
    """Accept samples, paths, folders (expanded), a list of arrays or an (N,H,W[,C]) array."""
    if isinstance(images, (str, Path)):
        images = [images]
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim in (3, 4) and images.dtype != object else [images]
    items: list[InputItem] = []
    for i, obj in enumerate(images):
        if isinstance(obj, InputItem):
            items.append(obj)
        elif isinstance(obj, Sample):
            items.append(InputItem(display_name(obj.path), path=obj.path))
        elif isinstance(obj, (str, Path)):
            p = Path(obj)
            if p.is_dir():
                items.extend(InputItem(display_name(f), path=f) for f in list_images(p, recursive=True))
            else:
                items.append(InputItem(display_name(p), path=p))
        elif isinstance(obj, np.ndarray):
            items.append(InputItem(f"array[{i}]", array=obj))
        else:
            raise TypeError(
                f"cannot use {type(obj).__name__} as an image: pass paths, Samples or numpy arrays"
            )
    return items


def _as_float_image(array: np.ndarray, key: str) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (1, 3)):
        raise ImageReadError(key, f"shape {a.shape} is not (H, W), (H, W, 1) or (H, W, 3)")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    else:
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ImageReadError(key, "contains NaN/inf values")
    if min(a.shape[:2]) < MIN_SIDE:
        raise ImageReadError(
            key, f"image too small: {a.shape[1]}x{a.shape[0]} (at least {MIN_SIDE} px a side)"
        )
    return a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a


def load_item(item: InputItem, max_pixels: int | None = None) -> np.ndarray:
    """The item's pixels as float32; files are read with `read_image`'s limits (max_pixels)."""
    if item.array is not None:
        return _as_float_image(item.array, item.key)
    return read_image(item.path, max_pixels=max_pixels)


INTENSITY_MODES = ("none", "standardize", "stretch")


def check_intensity(mode: str) -> str:
    if mode not in INTENSITY_MODES:
        raise ValueError(f"option intensity={mode!r}: use one of {', '.join(INTENSITY_MODES)}")
    return mode


def adjust_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Per-image contrast normalization for dark or low-contrast images (thermal, metal, tiles).

    "standardize": zero mean and unit spread, mapped to mean 0.5 and std 0.2; "stretch": the 1st
    and 99th percentiles mapped to 0 and 1 (not clipped: the darkest and brightest 1 % are often
    the defect). Either hides a global brightness change of a whole part, so it is an option,
    not the default.
    """
    if mode == "standardize":
        return ((image - image.mean()) / (image.std() + 1e-6) * 0.2 + 0.5).astype(np.float32)
    if mode == "stretch":
        lo, hi = np.percentile(image, (1, 99))
        return ((image - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    check_intensity(mode)
    return image


@dataclass(frozen=True)
class Preprocess:
    """Bring an image onto the model's canvases (see data/geometry.py), make the channels the model
    wants, normalize. `image_size` is the canvas: 256 or (H, W); `geometry` says how images of other
    sizes and aspect ratios get there (default: squashed onto it)."""

    image_size: int | tuple[int, int]
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    intensity: str = "none"
    geometry: Geometry | None = None
    #: the colour padding stands for, before normalization; None: `mean` (0 once normalized)
    pad: tuple[float, ...] | None = None

    @property
    def canvas_geometry(self) -> Geometry:
        return self.geometry or Geometry(parse_size(self.image_size))

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of each tensor the model receives."""
        return self.canvas_geometry.model_input

    def canvases(self, image: np.ndarray, key: str = "image") -> tuple[torch.Tensor, Placement]:
        """All model inputs of one image (n, C, H, W), and where they sit in it. Padding is the mean
        colour (0 once normalized), so it looks like nothing in particular."""
        geometry = self.canvas_geometry
        placement = geometry.place(image.shape[0], image.shape[1], key)
        t = torch.from_numpy(np.ascontiguousarray(adjust_intensity(image, self.intensity)))
        t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
        if t.shape[0] != self.channels:
            # grayscale stays grayscale until here: only a 3-channel model gets it repeated
            t = t.mean(0, keepdim=True) if self.channels == 1 else t[:1].expand(self.channels, -1, -1)
        if tuple(t.shape[-2:]) != placement.resized_shape:
            t = F.interpolate(
                t[None], size=placement.resized_shape, mode="bilinear", align_corners=False, antialias=True
            )[0]
        mean = torch.tensor(self.mean[: self.channels]).view(-1, 1, 1)
        std = torch.tensor(self.std[: self.channels]).view(-1, 1, 1)
        t = (t - mean) / std
        ch, cw = placement.canvas
        out = torch.zeros(len(placement.windows), self.channels, ch, cw)
        if self.pad is not None:
            out += ((torch.tensor(self.pad[: self.channels]).view(-1, 1, 1) - mean) / std)[None]
        for i, win in enumerate(placement.windows):
            out[i, :, : win.height, : win.width] = t[
                :, win.y0 : win.y0 + win.height, win.x0 : win.x0 + win.width
            ]
        return out, placement

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """The one model input (C, H, W) of an image (geometries without tiles)."""
        pixels, placement = self.canvases(image)
        if len(placement.windows) != 1:
            raise ValueError("a tiled image has several model inputs: use Preprocess.canvases")
        return pixels[0]

    def to_dict(self) -> dict:
        return {
            "image_size": list(parse_size(self.image_size)),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "intensity": self.intensity,
            "geometry": self.canvas_geometry.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict, *, normalize: bool = True) -> Preprocess:
        """Inverse of `to_dict`; normalize=False keeps pixels in [0, 1] (for graphs that normalize),
        padding with the mean colour the graph's normalization turns into 0."""
        c = d["channels"]
        geometry = Geometry.from_dict(d["geometry"]) if "geometry" in d else None
        if normalize:
            return cls(tuple(d["image_size"]), c, tuple(d["mean"]), tuple(d["std"]), d["intensity"], geometry)
        return cls(
            tuple(d["image_size"]), c, (0.0,) * c, (1.0,) * c, d["intensity"], geometry, tuple(d["mean"])
        )


def iter_batches(
    items: Sequence[InputItem],
    preprocess: Preprocess,
    batch_size: int,
    *,
    on_error: str = "raise",
    skip_log: SkipLog | None = None,
    progress: tqdm | None = None,
    statistics: bool = False,
    max_pixels: int | None = None,
    keep_images: bool = False,
) -> Iterator[Batch]:
    """Read and preprocess in a background thread so decoding overlaps the model's compute.
    statistics=True also measures each image for the drift check (`data.drift.image_statistics`);
    keep_images=True keeps the decoded images in `Batch.images` (for overlays: no second decode).
    Whatever fails for one image (reading, preprocessing, measuring) is that image's
    `ImageReadError`: skipped and logged with on_error='skip', else raised once the images before
    it are scored."""
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")

    def prepare(chunk: Sequence[InputItem]) -> tuple[Batch, ImageReadError | None]:
        keys, shapes, tensors, placements, stats, kept = [], [], [], [], [], []
        error = None
        for item in chunk:
            try:
                image = load_item(item, max_pixels)
                pixels, placement = preprocess.canvases(image, item.key)
                measured = image_statistics(image) if statistics else None
            except Exception as exc:  # noqa: BLE001 - one image's failure, whatever it is, is that image's
                err = item_error(item, exc)
                if on_error == "raise":
                    error = err  # the images before it in this batch are still scored
                    break
                (skip_log or SkipLog()).add(item.key, str(err))
                continue
            keys.append(item.key)
            shapes.append(image.shape[:2])
            tensors.append(pixels)
            placements.append(placement)
            if statistics:
                stats.append(measured)
            if keep_images:
                kept.append(image)
        pixels = (
            torch.cat(tensors) if tensors else torch.empty(0, preprocess.channels, *preprocess.input_size)
        )
        return Batch(keys, shapes, pixels, placements, stats, kept), error

    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            batch, error = pending.result()
            pending = pool.submit(prepare, chunks[i + 1]) if i + 1 < len(chunks) and error is None else None
            if progress is not None:
                progress.update(len(batch.keys))
            if batch.keys:
                yield batch
            if error is not None:
                raise error
