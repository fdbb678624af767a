"""Seeded synthetic inspection images with drawn defects and exact masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

__all__ = [
    "AREA_TOLERANCE",
    "DEFECT_TYPES",
    "KINDS",
    "add_defect",
    "add_small_defect",
    "make_strip_dataset",
    "make_synthetic_dataset",
    "strip_image",
    "synthetic_image",
]

KINDS = ("texture", "object")
DEFECT_TYPES = ("scratch", "blob", "crack")

# Goods stay inside this range so blending towards 0 or 1 always changes every pixel.
_LOW, _HIGH = 0.05, 0.95
# Defect area as a fraction of the image: visible, but not trivially huge.
_MIN_AREA, _MAX_AREA = 0.005, 0.05
# Per defect type: blend strength, and the local mean below which the defect is bright.
_DEFECT_STYLE = {"scratch": (0.75, 0.75), "blob": (0.5, 0.4), "crack": (0.8, 0.3)}
_TEXTURE_TINT = np.array([1.0, 0.82, 0.6])
_OBJECT_TINT = np.array([1.0, 0.5, 0.35])


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float | tuple[float, ...]
) -> np.ndarray:
    """Gaussian-filtered white noise of `shape` rescaled to unit standard deviation; `sigma` may
    differ per axis (streaks)."""
    sigmas = np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),))
    # Filtering unit white noise with a 1-D Gaussian of sigma s leaves std (2 sqrt(pi) s) ** -0.5,
    # and the axes multiply: 1 / (2 sqrt(pi) sigma) for an isotropic 2-D one.
    gain = float(np.prod(np.sqrt(2 * np.sqrt(np.pi) * sigmas)))
    return gaussian_filter(rng.standard_normal(shape), sigma) * gain


def _texture(
    shape: tuple[int, int], rng: np.random.Generator, unit: float | None = None, angle: float = 30.0
) -> np.ndarray:
    """Oriented, slightly warped stripes over grain: goods vary a little but share statistics.

    Stripe period and warp are in `unit` pixels (default: the height, i.e. the square image's size),
    so a longer part shows more of the same material; the illumination gradient spans the image.
    """
    height, width = shape
    unit = height if unit is None else unit
    yy = np.arange(height)[:, None] / unit
    xx = np.arange(width)[None, :] / unit
    theta = np.deg2rad(angle + rng.normal(0, 2))
    period = 0.085 * (1 + rng.normal(0, 0.03))
    warp = 0.6 * _smooth_noise(rng, shape, unit / 12)
    phase = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi)
    stripes = np.sin(phase + warp)
    grain = _smooth_noise(rng, shape, 1.5)
    gx, gy = rng.normal(0, 0.04, 2)  # uneven illumination as a gentle gradient
    shading = gx * (np.arange(width)[None, :] / width - 0.5) + gy * (
        np.arange(height)[:, None] / height - 0.5
    )
    return 0.5 + 0.12 * stripes + 0.05 * grain + shading + 0.015 * rng.standard_normal(shape)


def _object(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bottle cap seen from above: (gray image, cap coverage in [0, 1])."""
    cy, cx = size / 2 + rng.normal(0, 0.01 * size, 2)
    angle = np.deg2rad(rng.normal(0, 4))
    yy, xx = np.mgrid[0:size, 0:size] - np.array([cy, cx])[:, None, None]
    r = np.hypot(yy, xx) / size
    phi = np.arctan2(yy, xx)
    radius = 0.33
    cover = np.clip((radius - r) * size + 0.5, 0, 1)  # antialiased rim
    cap = (0.62 + rng.normal(0, 0.015)) * (1 - 0.25 * (r / radius) ** 2)
    cap -= 0.15 * np.exp(-(((r - 0.22) / 0.01) ** 2))  # inner groove
    cap += 0.05 * np.sin(48 * (phi - angle)) * (r > 0.29)  # knurled edge
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / size
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / size
    cap += 0.12 * ((np.abs(u) < 0.12) & (np.abs(v) < 0.025))  # embossed bar (shows rotation)
    background = 0.12 + 0.01 * _smooth_noise(rng, (size, size), 2.0)
    gray = background * (1 - cover) + cap * cover + 0.01 * rng.standard_normal((size, size))
    return gray, cover


def _check_image_args(kind: str, size: int, channels: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind '{kind}', expected one of {KINDS}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")


def synthetic_image(
    kind: str = "texture", size: int = 128, channels: int = 1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A defect-free image, float32 in [0.05, 0.95]: (size, size) or (size, size, 3).

    ``kind`` is "texture" (warped oriented stripes over grain) or "object" (a cap on a
    plain background with slight position/rotation/brightness jitter).
    """
    _check_image_args(kind, size, channels)
    rng = np.random.default_rng(0) if rng is None else rng
    if kind == "texture":
        gray = _texture((size, size), rng)
        image = gray[..., None] * _TEXTURE_TINT if channels == 3 else gray
    else:
        gray, cover = _object(size, rng)
        # Only the cap is tinted; the background stays neutral.
        tint = 1 + cover[..., None] * (_OBJECT_TINT - 1)
        image = gray[..., None] * tint if channels == 3 else gray
    return np.clip(image, _LOW, _HIGH).astype(np.float32)


def _point(center: np.ndarray, length: float, angle: float) -> np.ndarray:
    return center + length * np.array([np.cos(angle), np.sin(angle)])


def _object_region(size: int) -> np.ndarray:
    """Pixels safely inside the cap whatever its jitter: where object defects go."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5 - size / 2
    return np.hypot(yy, xx) < 0.28 * size


def _draw_shape(
    defect_type: str,
    shape: tuple[int, int],
    center: np.ndarray,
    rng: np.random.Generator,
    side: float | None = None,
) -> np.ndarray:
    """Draw one defect of random geometry around ``center`` (x, y); returns its bool mask.

    Its size is proportional to ``side`` (default: the image's short side)."""
    height, width = shape
    side = min(height, width) if side is None else side
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    line_width = max(1, round(side / 64))
    if defect_type == "scratch":
        # A long thin stroke with a slight bend.
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.15, 0.28) * side
        bend = _point(center, rng.normal(0, 0.02) * side, angle + np.pi / 2)
        points = [_point(center, -half, angle), bend, _point(center, half, angle)]
        draw.line([tuple(p) for p in points], fill=255, width=line_width, joint="curve")
    elif defect_type == "blob":
        # A rotated ellipse with a wobbly outline.
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        a, b = rng.uniform(0.04, 0.09, 2) * side
        wobble = 1 + 0.1 * np.sin(rng.integers(3, 6) * t + rng.uniform(0, 2 * np.pi))
        rot = rng.uniform(0, np.pi)
        x, y = a * wobble * np.cos(t), b * wobble * np.sin(t)
        xs = center[0] + x * np.cos(rot) - y * np.sin(rot)
        ys = center[1] + x * np.sin(rot) + y * np.cos(rot)
        draw.polygon(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=255)
    elif defect_type == "crack":
        # A jagged random walk with one short branch.
        heading = rng.uniform(0, 2 * np.pi)
        points = [center]
        for _ in range(int(rng.integers(10, 17))):
            points.append(_point(points[-1], rng.uniform(0.025, 0.04) * side, heading + rng.normal(0, 0.5)))
        draw.line([tuple(p) for p in points], fill=255, width=line_width, joint="curve")
        start = points[int(rng.integers(2, len(points) - 2))]
        branch = [start]
        for _ in range(4):
            branch.append(
                _point(branch[-1], 0.025 * side, heading + rng.choice([-1, 1]) + rng.normal(0, 0.4))
            )
        draw.line([tuple(p) for p in branch], fill=255, width=max(1, line_width - 1), joint="curve")
    else:
        raise ValueError(f"unknown defect type '{defect_type}', expected one of {DEFECT_TYPES}")
    return np.asarray(canvas) > 0


def add_defect(
    image: np.ndarray, defect_type: str, rng: np.random.Generator, region: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect on a copy of ``image``; returns (float32 image, bool (H, W) mask).

    The defect covers 0.5-5 % of the image; pixels under it are blended towards black
    or white (whichever contrasts with their mean), and the mask is exactly the set of
    pixels whose value changed. ``region`` (bool (H, W)), if given, confines the defect
    (e.g. to the object); otherwise it is centred in the middle 60 % of the image.
    """
    if defect_type not in _DEFECT_STYLE:
        raise ValueError(f"unknown defect type '{defect_type}', expected one of {DEFECT_TYPES}")
    height, width = image.shape[:2]
    if region is not None:
        ys, xs = np.nonzero(region)
        if ys.size == 0:
            raise ValueError("defect region is empty")
    for _ in range(100):  # redraw until the area is in range; almost always the first try
        if region is None:
            center = rng.uniform(0.2, 0.8, 2) * np.array([width, height])
        else:
            k = rng.integers(ys.size)
            center = np.array([xs[k], ys[k]], dtype=float)
        shape = _draw_shape(defect_type, (height, width), center, rng)
        if region is not None:
            shape &= region
        if _MIN_AREA <= shape.mean() <= _MAX_AREA:
            break
    else:
        raise ValueError(f"cannot draw a {defect_type} of 0.5-5 % area on this {width}x{height} image/region")
    alpha, bright_below = _DEFECT_STYLE[defect_type]
    target = 1.0 if image[shape].mean() < bright_below else 0.0
    blend = shape[..., None] if image.ndim == 3 else shape
    out = np.where(blend, (1 - alpha) * image + alpha * target, image).astype(np.float32)
    changed = out != image
    mask = changed.any(axis=-1) if image.ndim == 3 else changed
    return out, mask


def _save(array: np.ndarray, path: Path, compress_level: int = 6) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array * 255).astype(np.uint8)).save(
        path, format="PNG", compress_level=compress_level
    )


def _check_dataset_args(
    root: Path, n_train: int, n_test_good: int, n_test_defect: int, defect_types: Sequence[str]
) -> None:
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"synthetic dataset folder is not empty: '{root}'")
    unknown = [t for t in defect_types if t not in _DEFECT_STYLE]
    if unknown or (n_test_defect > 0 and not defect_types):
        raise ValueError(
            f"defect_types must be a non-empty subset of {DEFECT_TYPES}, got {tuple(defect_types)}"
        )
    if min(n_train, n_test_good, n_test_defect) < 0 or n_train < 1:
        raise ValueError("n_train must be >= 1 and test counts >= 0")


def _write_category(
    root: Path,
    counts: tuple[int, int, int],
    seed: int,
    defect_types: Sequence[str],
    good: Callable[[np.random.Generator], np.ndarray],
    defective: Callable[[np.ndarray, str, np.random.Generator], tuple[np.ndarray, np.ndarray]],
    compress_level: int = 6,
) -> Path:
    """Write train/good, test/good, test/<type> and ground_truth/<type>/<stem>_mask.png; every image
    draws from its own seed stream [seed, group, index], so changing one count changes no other image."""
    n_train, n_test_good, n_test_defect = counts
    digits = max(3, len(str(max(counts))))

    def image_rng(group: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, group, index])

    for group, (folder, count) in enumerate(
        [(root / "train" / "good", n_train), (root / "test" / "good", n_test_good)]
    ):
        for i in range(count):
            _save(good(image_rng(group, i)), folder / f"{i:0{digits}d}.png", compress_level)
    for i in range(n_test_defect):
        defect_type = defect_types[i % len(defect_types)]
        stem = f"{i // len(defect_types):0{digits}d}"
        rng = image_rng(2, i)
        image, mask = defective(good(rng), defect_type, rng)
        _save(image, root / "test" / defect_type / f"{stem}.png", compress_level)
        _save(
            mask.astype(np.float32), root / "ground_truth" / defect_type / f"{stem}_mask.png", compress_level
        )
    return root


def make_synthetic_dataset(
    root: str | Path,
    kind: str = "texture",
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 10,
    size: int = 128,
    channels: int = 1,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write a synthetic MVTec-layout category into ``root`` and return ``root``.

    Layout: train/good, test/good, test/<type>, ground_truth/<type>/<stem>_mask.png (0/255).
    The ``n_test_defect`` defective images are spread round-robin over ``defect_types``.
    Files are byte-identical for the same arguments; each image has its own seed stream,
    so changing one count does not change the other images. ``root`` must be new or empty.
    """
    root = Path(root)
    _check_dataset_args(root, n_train, n_test_good, n_test_defect, defect_types)
    _check_image_args(kind, size, channels)  # fail before writing anything
    region = _object_region(size) if kind == "object" else None
    return _write_category(
        root,
        (n_train, n_test_good, n_test_defect),
        seed,
        defect_types,
        lambda rng: synthetic_image(kind, size, channels, rng),
        lambda image, defect_type, rng: add_defect(image, defect_type, rng, region),
    )


# -- elongated high-resolution parts with small defects ----------------------------------------------

#: pixels of the strip's material per texture unit: its stripes and warp look like a 128 px texture's
_STRIP_UNIT = 128
#: the stripes' phase runs across the strip: rolling marks lie nearly along it, 6 degrees off
_STRIP_ANGLE = 84.0
_METAL_TINT = np.array([0.92, 0.96, 1.0])
#: blend of a small defect towards black or white: about the stripes' own contrast, so it is seen at
#: full resolution and averages away once a long strip is shrunk 4-8x
_SMALL_DEFECT_ALPHA = 0.35
#: a drawn small defect's area may miss the requested one by this share (rasterizing is coarse)
AREA_TOLERANCE = 0.1


def _check_strip_args(height: int, width: int, channels: int, area: float) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if min(height, width) < 32:
        raise ValueError(f"height and width must be at least 32, got {height}x{width}")
    if not 0 < area <= 0.05 or area * height * width < 8:
        raise ValueError(f"defect area {area} must be in (0, 0.05] and at least 8 pixels on {height}x{width}")


def strip_image(
    height: int = 500, width: int = 2000, channels: int = 1, rng: np.random.Generator | None = None
) -> np.ndarray:
    """A defect-free rolled-metal strip, float32 in [0.05, 0.95]: (height, width) or (height, width, 3).

    Oriented warped stripes and grain at a fixed pixel scale (``synthetic_image``'s texture), fine
    streaks along the rolling direction, a slow brightness variation along the length and a
    per-part brightness offset; the stripes' phase and angle jitter from part to part.
    """
    _check_strip_args(height, width, channels, 0.05)
    rng = np.random.default_rng(0) if rng is None else rng
    gray = _texture((height, width), rng, unit=_STRIP_UNIT, angle=_STRIP_ANGLE)
    streaks = _smooth_noise(rng, (height, width), (0.6, 12.0))
    along = _smooth_noise(rng, (width,), width / 8)
    gray = gray + 0.03 * streaks + 0.03 * along[None, :] + rng.normal(0, 0.02)
    image = gray[..., None] * _METAL_TINT if channels == 3 else gray
    return np.clip(image, _LOW, _HIGH).astype(np.float32)


def _shape_of_area(
    defect_type: str, shape: tuple[int, int], center: np.ndarray, shape_seed: int, target: float
) -> np.ndarray:
    """The defect drawn at the scale whose area is closest to `target` pixels: a bisection on the
    scale (log side), the geometry fixed by `shape_seed` so that only its size changes."""
    lo, hi = np.log(2.0), np.log(8.0 * max(shape))
    best, best_miss = None, np.inf
    for _ in range(24):
        mid = (lo + hi) / 2
        mask = _draw_shape(defect_type, shape, center, np.random.default_rng(shape_seed), np.exp(mid))
        area = int(mask.sum())
        if abs(area - target) < best_miss:
            best, best_miss = mask, abs(area - target)
        if area == target:
            break
        lo, hi = (mid, hi) if area < target else (lo, mid)
    return best


def add_small_defect(
    image: np.ndarray, defect_type: str, rng: np.random.Generator, area: float = 0.0005
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a small defect covering ``area`` of the image (within `AREA_TOLERANCE`) on a copy of
    ``image``; returns (float32 image, bool (H, W) mask).

    It is centred anywhere, edges included (a part at the border is cut off and the rest grows to
    keep the area), and blended by `_SMALL_DEFECT_ALPHA` towards black or white, whichever contrasts
    with the pixels under it. The mask is exactly the set of pixels whose value changed, also once
    saved as 8-bit (every change is at least 0.35 * 0.05, about 4 grey levels).
    """
    if defect_type not in _DEFECT_STYLE:
        raise ValueError(f"unknown defect type '{defect_type}', expected one of {DEFECT_TYPES}")
    height, width = image.shape[:2]
    _check_strip_args(height, width, 1, area)
    target = area * height * width
    for _ in range(20):  # a shape cut by a corner may not reach the area: draw another
        center = rng.uniform(0, 1, 2) * np.array([width, height])
        shape = _shape_of_area(defect_type, (height, width), center, int(rng.integers(2**32)), target)
        if abs(shape.sum() / target - 1) <= AREA_TOLERANCE:
            break
    else:
        raise ValueError(f"cannot draw a {defect_type} of {area:.4%} area on a {width}x{height} image")
    target_value = 1.0 if image[shape].mean() < 0.5 else 0.0
    blend = shape[..., None] if image.ndim == 3 else shape
    out = np.where(blend, (1 - _SMALL_DEFECT_ALPHA) * image + _SMALL_DEFECT_ALPHA * target_value, image)
    out = out.astype(np.float32)
    changed = out != image
    return out, (changed.any(axis=-1) if image.ndim == 3 else changed)


def make_strip_dataset(
    root: str | Path,
    height: int = 500,
    width: int = 2000,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_defect: int = 20,
    defect_area: float = 0.0005,
    channels: int = 1,
    seed: int = 0,
    defect_types: Sequence[str] = DEFECT_TYPES,
) -> Path:
    """Write an MVTec-layout category of high-resolution metal strips (`strip_image`) with small
    defects (`add_small_defect`: ``defect_area`` of the image each, 0.05 % = 500 px on 500x2000)
    into ``root`` and return ``root``. Same layout, seeding and guarantees as
    `make_synthetic_dataset`; PNGs are written with light compression (noise compresses poorly
    and the default level would dominate the time).
    """
    root = Path(root)
    _check_dataset_args(root, n_train, n_test_good, n_test_defect, defect_types)
    _check_strip_args(height, width, channels, defect_area)
    return _write_category(
        root,
        (n_train, n_test_good, n_test_defect),
        seed,
        defect_types,
        lambda rng: strip_image(height, width, channels, rng),
        lambda image, defect_type, rng: add_small_defect(image, defect_type, rng, defect_area),
        compress_level=1,
    )
