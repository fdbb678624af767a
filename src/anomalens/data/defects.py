"""Synthetic defects made from good images, with exact masks: for learning and for choosing settings
when no real defect is available.

Six kinds, each a published recipe or a controlled drawing:

- ``cutpaste``: a rectangle of a good image (the same one or ``source``), colour-jittered and pasted
  elsewhere (Li et al., CutPaste, CVPR 2021);
- ``scar``: CutPaste-scar, a thin rotated strip pasted the same way;
- ``perlin``: a thresholded Perlin-noise mask filled with a texture, blended with the image (Zavrtanik
  et al., DRAEM, ICCV 2021); the texture is another good image (flipped, rotated, rescaled in
  intensity) or generated noise, since DRAEM's external texture set (DTD) is not available offline;
- ``nsa``: a patch of another good image Poisson-blended in (Schlüter et al., Natural Synthetic
  Anomalies, ECCV 2022) with OpenCV's ``seamlessClone``;
- ``scratch``: a thin smooth curve of ``scratch_width`` pixels, darker or brighter by ``contrast``;
- ``spot``: a soft-edged ellipse covering ``area`` of the image, darker or brighter by ``contrast``.

Images keep their dtype (uint8, uint16, float), shape (gray ``(H, W)`` / ``(H, W, 1)`` or colour
``(H, W, 3)``) and range; the mask is exactly the pixels whose value changed. Contrast is a fraction
of the image's own value span (max - min, at least a tenth of the nominal range), so 12-bit data in a
16-bit container gets visible defects. A synthesizer made with the same seed gives the same defects
for the same sequence of calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["KINDS", "DefectSynthesizer", "perlin_mask", "perlin_noise"]

KINDS = ("cutpaste", "scar", "perlin", "nsa", "scratch", "spot")
_TRIES = 20  # draws before giving up on an image no defect can change (e.g. saturated)
_MIN_SIDE = 16


def _generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(
    shape: tuple[int, int],
    rng: np.random.Generator | int | None,
    res: tuple[int, int] = (4, 4),
    angle: float = 0.0,
) -> np.ndarray:
    """2-D Perlin noise of any ``shape``: ``res`` (rows, columns) lattice cells across the image,
    the lattice rotated by ``angle`` degrees (DRAEM rotates its noise image instead; rotating the
    coordinates gives the same pattern without borders). float32, about [-1, 1].

    Cells 8 pixels or wider are computed on a grid of about 4 points per cell and resized (bilinear): the
    noise is smooth at that scale, and it keeps large masks cheap."""
    rng = _generator(rng)
    height, width = shape
    step = max(1, int(min(height / res[0], width / res[1]) // 4))
    theta = np.deg2rad(angle)
    ys = np.arange(0, height + step - 1, step, dtype=np.float32)[:, None] - (height - 1) / 2
    xs = np.arange(0, width + step - 1, step, dtype=np.float32)[None, :] - (width - 1) / 2
    u = (xs * np.cos(theta) - ys * np.sin(theta)) * (res[1] / width)
    v = (xs * np.sin(theta) + ys * np.cos(theta)) * (res[0] / height)
    u, v = u - u.min(), v - v.min()
    cells = (int(v.max()) + 2, int(u.max()) + 2)
    phi = rng.uniform(0, 2 * np.pi, cells).astype(np.float32)
    gx, gy = np.cos(phi), np.sin(phi)
    i, j = u.astype(np.int64), v.astype(np.int64)
    fu, fv = u - i, v - j
    n00 = gx[j, i] * fu + gy[j, i] * fv
    n01 = gx[j, i + 1] * (fu - 1) + gy[j, i + 1] * fv
    n10 = gx[j + 1, i] * fu + gy[j + 1, i] * (fv - 1)
    n11 = gx[j + 1, i + 1] * (fu - 1) + gy[j + 1, i + 1] * (fv - 1)
    su, sv = _fade(fu), _fade(fv)
    top = n00 + su * (n01 - n00)
    noise = np.sqrt(2) * (top + sv * (n10 + su * (n11 - n10) - top))
    if step > 1:
        noise = cv2.resize(
            noise, (noise.shape[1] * step, noise.shape[0] * step), interpolation=cv2.INTER_LINEAR
        )
    return noise[:height, :width].astype(np.float32)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator | int | None,
    *,
    scale_range: tuple[int, int] = (0, 6),
    threshold: float = 0.5,
) -> np.ndarray:
    """DRAEM's anomaly mask: Perlin noise with 2**k lattice cells per axis (k drawn in
    ``scale_range``, upper end excluded, each axis on its own), rotated by -90..90 degrees, above
    ``threshold``. bool ``shape``; it may be empty (DRAEM then trains on a good)."""
    rng = _generator(rng)
    low, high = scale_range
    if not 0 <= low < high:
        raise ValueError(f"perlin scale_range must be 0 <= low < high, got {scale_range}")
    res = (2 ** int(rng.integers(low, high)), 2 ** int(rng.integers(low, high)))
    return perlin_noise(shape, rng, res, float(rng.uniform(-90, 90))) > threshold


def _range_of(image: np.ndarray) -> tuple[float, float, float]:
    """(lowest, highest) value a defect may take, and the span contrast is a fraction of."""
    lo, hi = float(image.min()), float(image.max())
    if np.issubdtype(image.dtype, np.integer):
        bottom, top = 0.0, float(np.iinfo(image.dtype).max)
    else:  # floats: their unit range, widened to what the image holds
        bottom, top = min(0.0, lo), max(1.0, hi)
    return bottom, top, max(hi - lo, 0.1 * (top - bottom))


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    """The image as (H, W, C) float32; a one-line error naming what is wrong."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ValueError(f"{what} must be uint8, uint16, float32 or float64, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"{what} must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    if min(image.shape[:2]) < _MIN_SIDE:
        raise ValueError(f"{what} must be at least {_MIN_SIDE} x {_MIN_SIDE} pixels, got {image.shape[:2]}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return image.astype(np.float32)


def _match(source: np.ndarray, like: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The source as float32 with the image's size and channels, in the image's units."""
    if source.dtype != image.dtype:
        raise ValueError(f"source must have the image's dtype {image.dtype}, got {source.dtype}")
    src = _check_image(source, "source")
    height, width, channels = like.shape
    if src.shape[:2] != (height, width):
        src = cv2.resize(src, (width, height), interpolation=cv2.INTER_LINEAR)
        src = src.reshape(height, width, -1)
    if src.shape[2] != channels:
        src = src.mean(axis=2, keepdims=True) if channels == 1 else np.repeat(src, 3, axis=2)
    return src


class DefectSynthesizer:
    """Makes synthetic defects on good images: ``make(image, source)`` -> ``(defect_image, mask)``.

    ``kinds``: which recipes to draw from (uniformly, one per image; see the module docstring).
    ``area``: (min, max) fraction of the image covered by a cutpaste/nsa patch or a spot.
    ``contrast``: (min, max) change of a scratch or spot, as a fraction of the image's value span.
    ``scratch_width``: (min, max) scratch width in pixels; ``scratch_length``: (min, max) length as a
    fraction of the image's shorter side. ``perlin_scale``/``perlin_threshold``: DRAEM's mask
    parameters. ``textures``: where a perlin defect's texture comes from, "source" (another good image;
    the image itself when none is given) and/or "noise".
    """

    def __init__(
        self,
        kinds: Sequence[str] = KINDS,
        seed: int = 0,
        *,
        area: tuple[float, float] = (0.005, 0.05),
        contrast: tuple[float, float] = (0.15, 0.5),
        scratch_width: tuple[int, int] = (1, 4),
        scratch_length: tuple[float, float] = (0.15, 0.5),
        perlin_scale: tuple[int, int] = (0, 6),
        perlin_threshold: float = 0.5,
        textures: Sequence[str] = ("source", "noise"),
    ) -> None:
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in KINDS]
        if not kinds or unknown:
            raise ValueError(f"unknown defect kind(s) {unknown or kinds}; choose from {', '.join(KINDS)}")
        for name, (low, high), limit in (("area", area, 0.5), ("contrast", contrast, 1.0)):
            if not 0 < low <= high <= limit:
                raise ValueError(
                    f"{name} must be (min, max) with 0 < min <= max <= {limit}, got {(low, high)}"
                )
        if not 1 <= scratch_width[0] <= scratch_width[1]:
            raise ValueError(f"scratch_width must be (min, max) pixels >= 1, got {scratch_width}")
        if not 0 < scratch_length[0] <= scratch_length[1]:
            raise ValueError(f"scratch_length must be (min, max) > 0, got {scratch_length}")
        textures = tuple(textures)
        if not textures or set(textures) - {"source", "noise"}:
            raise ValueError(f"textures must be 'source' and/or 'noise', got {textures}")
        self.kinds, self.seed = kinds, seed
        self.area, self.contrast = area, contrast
        self.scratch_width, self.scratch_length = scratch_width, scratch_length
        self.perlin_scale, self.perlin_threshold = perlin_scale, perlin_threshold
        self.textures = textures
        self.rng = np.random.default_rng(seed)

    def make(
        self, image: np.ndarray, source: np.ndarray | None = None, kind: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One defect on a copy of ``image``: (defect image of the same dtype and shape, bool (H, W)
        mask of exactly the changed pixels). ``source``: another good image (same dtype, resized and
        converted to the image's channels) that cutpaste, scar, perlin and nsa take pixels from;
        without it they take them from the image itself. ``kind``: one kind instead of a random one."""
        work = _check_image(image, "image")
        src = work if source is None else _match(source, work, image)
        if kind is not None and kind not in KINDS:
            raise ValueError(f"unknown defect kind {kind!r}; choose from {', '.join(KINDS)}")
        bottom, top, span = _range_of(image)
        self._bounds = (bottom, top)  # what a scratch or spot may reach, for _signed
        flat = image.reshape(work.shape)
        for _ in range(_TRIES):
            chosen = kind or self.kinds[int(self.rng.integers(len(self.kinds)))]
            values, region, (y0, x0) = getattr(self, f"_{chosen}")(work, src, span)
            if not region.any():
                continue
            values = np.clip(values, bottom, top)
            if np.issubdtype(image.dtype, np.integer):
                values = np.rint(values)
            window = np.s_[y0 : y0 + region.shape[0], x0 : x0 + region.shape[1]]
            before = flat[window]
            after = np.where(region[..., None], values.astype(image.dtype), before)
            changed = (after != before).any(axis=2)
            if changed.any():
                out = image.copy()
                out.reshape(work.shape)[window] = after
                mask = np.zeros(work.shape[:2], bool)
                mask[window] = changed
                return out, mask
        raise ValueError(f"no defect changed the image in {_TRIES} draws: is it constant or saturated?")

    def make_many(self, images: Sequence[np.ndarray], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``n`` defects on images drawn at random from ``images``, each with another of them as its
        source (the image itself when there is only one)."""
        if not len(images):
            raise ValueError("make_many needs at least one good image")
        results = []
        for _ in range(n):
            index = int(self.rng.integers(len(images)))
            other = index
            if len(images) > 1:
                other = (index + 1 + int(self.rng.integers(len(images) - 1))) % len(images)
            results.append(self.make(images[index], None if other == index else images[other]))
        return results

    # Each recipe returns float32 (h, w, C) values in image units, the bool (h, w) region they may
    # change, and the window's top-left corner (y0, x0): work stays within the defect's bounding box.

    def _patch_size(self, shape: tuple[int, ...]) -> tuple[int, int]:
        height, width = shape[:2]
        share = self.rng.uniform(*self.area)
        aspect = np.exp(self.rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        ph = int(np.clip(round(np.sqrt(share * height * width * aspect)), 2, height - 8))
        pw = int(np.clip(round(share * height * width / ph), 2, width - 8))
        return ph, pw

    def _jitter(self, values: np.ndarray, span: float) -> np.ndarray:
        """CutPaste's colour jitter: contrast, brightness and (colour images) a slight tint."""
        gain = self.rng.uniform(0.85, 1.15)
        shift = self.rng.choice([-1, 1]) * self.rng.uniform(0.03, 0.12) * span
        tint = 1 + self.rng.uniform(-0.05, 0.05, values.shape[2]) if values.shape[2] == 3 else 1
        mean = values.mean()
        return ((values - mean) * gain + mean + shift) * tint

    def _paste(self, work: np.ndarray, src: np.ndarray, span: float, size: tuple[int, int], angle: float):
        """A ``size`` rectangle of the source, rotated by ``angle``, warped to a random place of the image."""
        height, width, channels = work.shape
        ph, pw = size
        sy, sx = self.rng.uniform(0, height - ph), self.rng.uniform(0, width - pw)
        reach = 0.5 * np.hypot(ph, pw)  # the rotated patch stays inside the image when it can
        dy = self.rng.uniform(min(reach, height / 2), max(height - reach, height / 2))
        dx = self.rng.uniform(min(reach, width / 2), max(width - reach, width / 2))
        corners = np.round(cv2.boxPoints(((dx, dy), (pw, ph), -angle))).astype(np.int32)
        x0, y0 = np.clip(corners.min(axis=0), 0, (width - 1, height - 1))
        x1, y1 = np.clip(corners.max(axis=0) + 1, 1, (width, height))
        region = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.fillPoly(region, [corners - (x0, y0)], 1)
        matrix = cv2.getRotationMatrix2D((sx + pw / 2, sy + ph / 2), angle, 1.0)
        matrix[:, 2] += (dx - sx - pw / 2 - x0, dy - sy - ph / 2 - y0)
        warped = cv2.warpAffine(
            src, matrix, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        return self._jitter(warped.reshape(y1 - y0, x1 - x0, channels), span), region.astype(bool), (y0, x0)

    def _cutpaste(self, work, src, span):
        return self._paste(work, src, span, self._patch_size(work.shape), 0.0)

    def _scar(self, work, src, span):
        # CutPaste-scar at 256 px: width 2-16, length 10-25, rotated -45..45 degrees; scaled to the image.
        unit = min(work.shape[:2]) / 256
        pw = max(1, round(self.rng.uniform(2, 16) * unit))
        ph = max(3, round(self.rng.uniform(10, 25) * unit))
        return self._paste(work, src, span, (ph, pw), float(self.rng.uniform(-45, 45)))

    def _texture(self, part: np.ndarray, src: np.ndarray, window, span: float) -> np.ndarray:
        """A texture for ``window`` of the image: the source flipped and rescaled, or Perlin noise."""
        if self.rng.choice(self.textures) == "source":
            flipped = src[:: self.rng.choice([-1, 1]), :: self.rng.choice([-1, 1])]
            texture = flipped[window]
            mean = texture.mean()
            return (texture - mean) * self.rng.uniform(0.5, 2.0) + mean + self.rng.uniform(-0.3, 0.3) * span
        shape = part.shape[:2]
        # 2 to 16 cells per 256 pixels, one field for every channel with a random tint per channel.
        res = tuple(int(max(1, 2 ** self.rng.uniform(1, 4) * n / 256)) for n in shape)
        noise = perlin_noise(shape, self.rng, res)[..., None]
        tint = self.rng.uniform(0.7, 1.3, part.shape[2])
        level = part.mean() + self.rng.uniform(-0.5, 0.5) * span
        return level + noise * tint * self.rng.uniform(0.2, 0.6) * span

    def _perlin(self, work, src, span):
        mask = perlin_mask(
            work.shape[:2], self.rng, scale_range=self.perlin_scale, threshold=self.perlin_threshold
        )
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not rows.size:
            return work[:0, :0], mask[:0, :0], (0, 0)
        window = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        part = work[window]
        beta = self.rng.uniform(0.0, 0.8)  # DRAEM's opacity of the image under the texture
        values = (1 - beta) * self._texture(part, src, window, span) + beta * part
        return values, mask[window], (rows[0], cols[0])

    def _nsa(self, work, src, span):
        height, width, channels = work.shape
        ph, pw = self._patch_size(work.shape)
        ph, pw = max(ph, 5), max(pw, 5)
        sy, sx = int(self.rng.integers(0, height - ph + 1)), int(self.rng.integers(0, width - pw + 1))
        patch = src[sy : sy + ph, sx : sx + pw]
        mean = patch.mean()
        patch = (patch - mean) * self.rng.uniform(0.6, 1.6) + mean + self.rng.uniform(-0.2, 0.2) * span
        # Poisson blending only sees the destination on the patch's border: clone into a window
        # around it (4-pixel margin, which OpenCV needs) instead of the whole image.
        y0, x0 = int(self.rng.integers(0, height - ph - 7)), int(self.rng.integers(0, width - pw - 7))
        part = work[y0 : y0 + ph + 8, x0 : x0 + pw + 8]
        lo = float(min(part.min(), patch.min()))
        scale = 255.0 / max(float(max(part.max(), patch.max())) - lo, 1e-6)

        # seamlessClone takes 8-bit 3-channel images: blend there and add the 8-bit change to the
        # image in its own units, so pixels outside the defect keep their full precision.
        def to8(values: np.ndarray) -> np.ndarray:
            values = np.clip(np.rint((values - lo) * scale), 0, 255).astype(np.uint8)
            return np.repeat(values, 3, axis=2) if channels == 1 else np.ascontiguousarray(values)

        dst8 = to8(part)
        inner = np.zeros((ph, pw), np.uint8)
        inner[1:-1, 1:-1] = 255
        mode = cv2.MIXED_CLONE if self.rng.uniform() < 0.5 else cv2.NORMAL_CLONE
        blended = cv2.seamlessClone(to8(patch), dst8, inner, (pw // 2 + 4, ph // 2 + 4), mode)
        change = (blended.astype(np.float32) - dst8)[..., :channels] / scale
        return part + change, (change != 0).any(axis=2), (y0, x0)

    def _signed(self, part: np.ndarray, region: np.ndarray, amount: float) -> float:
        """``amount`` darker or brighter at random, unless only one side has room for it (a dark
        defect on a bright surface, a bright one on a dark surface)."""
        level = float(part[region].mean())
        bottom, top = self._bounds
        if level + amount > top or level - amount < bottom:
            return amount if top - level > level - bottom else -amount
        return amount * self.rng.choice([-1.0, 1.0])

    def _scratch(self, work, src, span):
        height, width = work.shape[:2]
        length = self.rng.uniform(*self.scratch_length) * min(height, width)
        steps = 8
        heading = self.rng.uniform(0, 2 * np.pi) + np.cumsum(self.rng.normal(0, 0.15, steps))
        path = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * (length / steps), axis=0)
        path = np.vstack([[0.0, 0.0], path])
        low, high = path.min(axis=0), path.max(axis=0)
        room = np.array([width - 1, height - 1]) - (high - low)
        path += self.rng.uniform(0, np.maximum(room, 0)) - low
        thickness = int(self.rng.integers(self.scratch_width[0], self.scratch_width[1] + 1))
        # OpenCV draws a line of thickness t about t + 1 pixels wide for t >= 2; its box is padded so.
        t = thickness if thickness == 1 else thickness - 1
        pad = thickness + 1
        x0, y0 = np.clip(np.floor(path.min(axis=0)).astype(int) - pad, 0, None)
        x1, y1 = np.minimum(np.ceil(path.max(axis=0)).astype(int) + pad + 1, (width, height))
        region = np.zeros((y1 - y0, x1 - x0), np.uint8)
        cv2.polylines(region, [np.round(path - (x0, y0)).astype(np.int32)], False, 1, t, cv2.LINE_8)
        region = region.astype(bool)
        part = work[y0:y1, x0:x1]
        amount = self._signed(part, region, self.rng.uniform(*self.contrast) * span)
        return part + amount, region, (y0, x0)

    def _spot(self, work, src, span):
        height, width = work.shape[:2]
        share = self.rng.uniform(*self.area)
        aspect = np.exp(self.rng.uniform(np.log(0.5), np.log(2)))
        ry = np.sqrt(share * height * width * aspect / np.pi)
        rx = share * height * width / (np.pi * ry)
        reach = min(max(ry, rx), height / 2 - 1, width / 2 - 1)
        cy, cx = self.rng.uniform(reach, height - reach), self.rng.uniform(reach, width - reach)
        y0, x0 = max(0, int(cy - reach) - 1), max(0, int(cx - reach) - 1)
        y1, x1 = min(height, int(cy + reach) + 2), min(width, int(cx + reach) + 2)
        angle = self.rng.uniform(0, np.pi)
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
        along = (xs * np.cos(angle) + ys * np.sin(angle)) / rx
        across = (-xs * np.sin(angle) + ys * np.cos(angle)) / ry
        r2 = along**2 + across**2
        region = r2 < 1
        part = work[y0:y1, x0:x1]
        # Flat core with a soft rim, like a stain.
        alpha = np.clip(2.5 * (1 - r2), 0, 1)[..., None]
        amount = self._signed(part, region, self.rng.uniform(*self.contrast) * span)
        return part + amount * alpha, region, (y0, x0)
