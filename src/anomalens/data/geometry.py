"""How an image of any size and aspect ratio becomes model inputs, and how maps come back.

A model sees fixed-size *canvases* (H, W). `Geometry` says how an image is brought onto them:

* ``squash``: resized to the canvas whatever its aspect ratio (one canvas, all of it the image);
* ``letterbox``: resized so it fits the canvas with its aspect ratio kept (long side = canvas),
  placed at the top-left, the rest padded;
* ``native``: resized by `scale` only (``scale=0.5`` halves it), placed top-left on the canvas;
  with ``tile > 0`` it is instead cut into overlapping ``tile`` x ``tile`` canvases that cover it.

`Placement` records, for one image, where each canvas sits in the resized image and how much of
it is image rather than padding; `stitch` turns the canvases' maps back into one map of the
resized image (padding dropped, overlaps blended with weights that fall off towards each tile's
edge, so a good image shows no seams), which callers then resize to the image's own size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from anomalens.data.io import ImageReadError

RESIZE_MODES = ("squash", "letterbox", "native")
#: canvases of a native-scale model are rounded up to this multiple: the backbones' coarsest stride
CANVAS_MULTIPLE = 32


def parse_size(value: int | str | tuple | list) -> tuple[int, int]:
    """`image_size` as (H, W): 256 -> (256, 256), "192x512" (height x width) -> (192, 512)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        h, w = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        h = w = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*\d+\s*([xX]\s*\d+\s*)?", value):
        parts = re.split(r"[xX]", value)
        h, w = int(parts[0]), int(parts[-1])
    else:
        raise ValueError(f"option image_size={value!r}: give a size like 256 or HxW like 192x512")
    if not (8 <= int(h) <= 8192 and 8 <= int(w) <= 8192):
        raise ValueError(f"option image_size={value!r}: each side must be between 8 and 8192 pixels")
    return int(h), int(w)


def size_option(value: int | str | tuple | list) -> int | str:
    """The canonical option value: an int for a square canvas, "HxW" otherwise."""
    h, w = parse_size(value)
    return h if h == w else f"{h}x{w}"


class ImageGeometryError(ImageReadError):
    """An image that reads fine but does not fit the model's geometry: that image's error alone."""

    def __str__(self) -> str:
        return f"'{self.path}': {self.reason}"


@dataclass(frozen=True)
class Window:
    """One canvas: its top-left corner in the resized image and the image part it holds."""

    y0: int
    x0: int
    height: int  # rows of the canvas that are image (the rest is padding)
    width: int


@dataclass(frozen=True)
class Placement:
    """Where one image's canvases sit: the image's own size, its resized size, the canvases."""

    image_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    windows: tuple[Window, ...]
    canvas: tuple[int, int]
    squashed: bool  # the whole canvas is the whole image (maps need no crop or stitch)
    overlap: float = 0.0  # the tiles' overlap, as a share of a tile: how wide `stitch` cross-fades


@dataclass(frozen=True)
class Geometry:
    canvas: tuple[int, int] = (256, 256)
    resize: str = "squash"
    scale: float = 1.0
    tile: int = 0
    tile_overlap: float = 0.25

    def __post_init__(self) -> None:
        check_geometry(self.resize, self.scale, self.tile, self.tile_overlap)

    @property
    def tiled(self) -> bool:
        return self.tile > 0

    @property
    def model_input(self) -> tuple[int, int]:
        """The (H, W) of every canvas the model sees."""
        return (self.tile, self.tile) if self.tiled else self.canvas

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.resize == "squash":
            return self.canvas
        s = min(self.canvas[0] / h, self.canvas[1] / w) if self.resize == "letterbox" else self.scale
        return max(1, round(h * s)), max(1, round(w * s))

    def place(self, h: int, w: int, key: str = "image") -> Placement:
        """The canvases of an image of (h, w) pixels; a native image larger than the canvas is an
        error naming `key` (tiles cover any size)."""
        rh, rw = self.resized_shape(h, w)
        ch, cw = self.model_input
        if self.tiled:
            windows = tuple(
                Window(y, x, min(ch, rh - y), min(cw, rw - x))
                for y in _starts(rh, ch, self.tile_overlap)
                for x in _starts(rw, cw, self.tile_overlap)
            )
        else:
            if rh > ch or rw > cw:
                raise ImageGeometryError(
                    key,
                    f"{w}x{h} px at scale {self.scale:g} is {rw}x{rh} px, larger than "
                    f"the model's {cw}x{ch} px canvas: use resize=letterbox, or tiles "
                    "(tile=256)",
                )
            windows = (Window(0, 0, rh, rw),)
        return Placement(
            (h, w), (rh, rw), windows, (ch, cw), squashed=self.resize == "squash", overlap=self.tile_overlap
        )

    def to_dict(self) -> dict:
        return {
            "canvas": list(self.canvas),
            "resize": self.resize,
            "scale": self.scale,
            "tile": self.tile,
            "tile_overlap": self.tile_overlap,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            tuple(d["canvas"]), d["resize"], float(d["scale"]), int(d["tile"]), float(d["tile_overlap"])
        )


def check_geometry(resize: str, scale: float, tile: int, tile_overlap: float) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"option resize={resize!r}: use one of {', '.join(RESIZE_MODES)}")
    if not 0.01 <= scale <= 16:
        raise ValueError(f"option scale={scale}: use a factor between 0.01 and 16 (0.5 halves the image)")
    if tile < 0 or (tile and not 32 <= tile <= 4096):
        raise ValueError(f"option tile={tile}: 0 (no tiles) or a tile side between 32 and 4096 pixels")
    if tile and resize != "native":
        raise ValueError(
            f"tile={tile} cuts images at their native scale: set resize=native (and scale) with it"
        )
    if not 0.0 <= tile_overlap <= 0.75:
        raise ValueError(f"option tile_overlap={tile_overlap}: a share of the tile between 0 and 0.75")


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile origins along one axis: evenly spaced, at most tile * (1 - overlap) apart, the first at 0
    and the last flush with the end (one tile, padded, when the image is shorter than a tile)."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def native_canvas(sizes: list[tuple[int, int]], scale: float) -> tuple[int, int]:
    """The canvas that holds every image of `sizes` (h, w) at `scale`, rounded up to CANVAS_MULTIPLE."""
    if not sizes:
        raise ValueError("no images to size the canvas from")
    h = max(max(1, round(s[0] * scale)) for s in sizes)
    w = max(max(1, round(s[1] * scale)) for s in sizes)
    return (
        max(CANVAS_MULTIPLE, math.ceil(h / CANVAS_MULTIPLE) * CANVAS_MULTIPLE),
        max(CANVAS_MULTIPLE, math.ceil(w / CANVAS_MULTIPLE) * CANVAS_MULTIPLE),
    )


def _ramp(n: int, full: int, ramp: int) -> np.ndarray:
    """1-D blending weights over a tile side of `full` pixels (the first `n` hold image): rising over
    `ramp` pixels from each edge, never zero, so every pixel has weight and overlaps cross-fade."""
    if ramp <= 0:
        return np.ones(n, np.float32)
    x = np.arange(n, dtype=np.float32)
    return np.clip(np.minimum(x + 1, full - x) / (ramp + 1), 1e-3, 1.0)


def stitch(maps: np.ndarray, placement: Placement) -> np.ndarray:
    """One map of the resized image from its canvases' maps (n, H, W): padding cropped away, tiles
    blended by ramps as wide as half their overlap (weights normalized, so a constant map stays
    constant)."""
    if placement.squashed:
        return maps[0]
    rh, rw = placement.resized_shape
    if len(placement.windows) == 1:
        win = placement.windows[0]
        return maps[0][: win.height, : win.width]
    th, tw = placement.canvas
    total = np.zeros((rh, rw), np.float32)
    weight = np.zeros((rh, rw), np.float32)
    for amap, win in zip(maps, placement.windows):
        wy = _ramp(win.height, th, int(th * placement.overlap / 2))
        wx = _ramp(win.width, tw, int(tw * placement.overlap / 2))
        w2 = np.outer(wy, wx)
        total[win.y0 : win.y0 + win.height, win.x0 : win.x0 + win.width] += (
            amap[: win.height, : win.width] * w2
        )
        weight[win.y0 : win.y0 + win.height, win.x0 : win.x0 + win.width] += w2
    return total / weight


def place_mask(mask: np.ndarray, placement: Placement) -> np.ndarray:
    """A pixel mask (H, W) of the image on its canvases (n, h, w) as uint8 0/1: resized by nearest
    neighbour like the image was resized, padding 0 (the inverse of `stitch` for labels)."""
    rh, rw = placement.resized_shape
    resized = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((rw, rh), Image.NEAREST)) > 127
    ch, cw = placement.canvas
    out = np.zeros((len(placement.windows), ch, cw), np.uint8)
    for i, win in enumerate(placement.windows):
        out[i, : win.height, : win.width] = resized[win.y0 : win.y0 + win.height, win.x0 : win.x0 + win.width]
    return out
