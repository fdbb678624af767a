"""Seeded synthetic inspection images with drawn defects and exact masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

__all__ = ["DEFECT_TYPES", "KINDS", "add_defect", "make_synthetic_dataset", "synthetic_image"]

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


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to unit standard deviation."""
    # Filtering unit white noise with a 2-D Gaussian leaves std 1 / (2 sqrt(pi) sigma).
    return gaussian_filter(rng.standard_normal((size, size)), sigma) * (2 * np.sqrt(np.pi) * sigma)


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    # Oriented, slightly warped stripes over grain: goods vary a little but share statistics.
    yy, xx = np.mgrid[0:size, 0:size] / size
    theta = np.deg2rad(30 + rng.normal(0, 2))
    period = 0.085 * (1 + rng.normal(0, 0.03))
    warp = 0.6 * _smooth_noise(rng, size, size / 12)
    phase = 2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform(0, 2 * np.pi)
    stripes = np.sin(phase + warp)
    grain = _smooth_noise(rng, size, 1.5)
    gx, gy = rng.normal(0, 0.04, 2)  # uneven illumination as a gentle gradient
    shading = gx * (xx - 0.5) + gy * (yy - 0.5)
    return 0.5 + 0.12 * stripes + 0.05 * grain + shading + 0.015 * rng.standard_normal((size, size))


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
    background = 0.12 + 0.01 * _smooth_noise(rng, size, 2.0)
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
        gray = _texture(size, rng)
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
    defect_type: str, shape: tuple[int, int], center: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw one defect of random geometry around ``center`` (x, y); returns its bool mask."""
    height, width = shape
    side = min(height, width)
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


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(array * 255).astype(np.uint8)).save(path, format="PNG")


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
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"synthetic dataset folder is not empty: '{root}'")
    unknown = [t for t in defect_types if t not in _DEFECT_STYLE]
    if unknown or (n_test_defect > 0 and not defect_types):
        raise ValueError(
            f"defect_types must be a non-empty subset of {DEFECT_TYPES}, got {tuple(defect_types)}"
        )
    if min(n_train, n_test_good, n_test_defect) < 0 or n_train < 1:
        raise ValueError("n_train must be >= 1 and test counts >= 0")
    _check_image_args(kind, size, channels)  # fail before writing anything
    digits = max(3, len(str(max(n_train, n_test_good, n_test_defect))))
    region = _object_region(size) if kind == "object" else None

    def image_rng(group: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, group, index])

    for group, (folder, count) in enumerate(
        [(root / "train" / "good", n_train), (root / "test" / "good", n_test_good)]
    ):
        for i in range(count):
            _save(synthetic_image(kind, size, channels, image_rng(group, i)), folder / f"{i:0{digits}d}.png")
    for i in range(n_test_defect):
        defect_type = defect_types[i % len(defect_types)]
        stem = f"{i // len(defect_types):0{digits}d}"
        rng = image_rng(2, i)
        image, mask = add_defect(synthetic_image(kind, size, channels, rng), defect_type, rng, region)
        _save(image, root / "test" / defect_type / f"{stem}.png")
        _save(mask.astype(np.float32), root / "ground_truth" / defect_type / f"{stem}_mask.png")
    return root
