"""Input drift: per-image statistics of the training goods, and a check that names what is out of range.

At fit time :meth:`DriftProfile.fit` keeps, for each scalar statistic of :func:`image_statistics`, its
range over the training goods, and for the embedding (a normalised 16x16 thumbnail) the goods' thumbnails
and their leave-one-out nearest-neighbour distances. :meth:`DriftProfile.check` then flags every statistic
of a new image that lies outside that range by more than the margin, with a one-line message such as
"brighter than every training good: mean 154 vs 66-137 (0-255 scale)".

The margin rule (one rule for every statistic and dataset)::

    flagged when  value < low - m  or  value > high + m,   m = margin * (high - low) + floor

with ``margin`` a share of the observed range (0.25 by default) and ``floor`` a small absolute amount per
statistic (below) so that a constant statistic still tolerates quantisation. Scale-like statistics (aspect
ratio, sharpness) are compared on a log scale, so the rule reads in ratios there. Why 0.25: for a new good
drawn from the goods' own distribution, the chance of falling beyond min/max by a quarter of the range is,
per statistic, about 0.6 % (normal) to 1.6 % (exponential or Student t5 tails) with 30 goods and at most
0.4 % with 100 goods; with no margin it is 2 / (n + 1), 6.5 % with 30 goods.

Floors: height and width 0.5 px (so any other integer size flags when all goods share one size, and the
goods' own size never does), aspect ratio 1 % (log 0.01), intensity means and spreads 2 grey levels on the
0-255 scale, sharpness 25 % (log 1.25, on log(1 + variance of the Laplacian)), embedding distance 0.05
(RMS, in units of the thumbnail's own spread), channel count 0.5 (grayscale vs RGB always flags).

The embedding's training range is [0, largest leave-one-out nearest-neighbour distance among the goods]:
an image flags when its distance to the nearest good exceeds (1 + margin) * largest + floor. The thumbnail
is normalised (each channel's mean removed, divided by the thumbnail's spread) so that it measures layout
only: brightness and contrast already have their own statistics, and one cause then gives one message.

Everything here is numpy/scipy only, and serialises to arrays plus JSON (no pickle) for the model file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

THUMBNAIL_SIZE = 16
#: every statistic but the size is measured on a block-averaged copy at most this long: the check
#: runs on the reader thread of every prediction, and a 768 x 576 RGB image then costs ~2 ms, not ~9
MEASURE_MAX_SIDE = 256
MAX_THUMBNAILS = 2000
DEFAULT_MARGIN = 0.25
#: the batch test: family-wise false-alarm rate over all statistics, and the fewest images it judges
BATCH_ALPHA = 1e-3
BATCH_MIN_IMAGES = 20
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, the usual grey of an RGB image
_CHANNEL_NAMES = ("r", "g", "b")
_CHANNEL_WORDS = {"r": "red", "g": "green", "b": "blue"}
# a thumbnail flatter than this (0-1 scale) has no layout to compare: dividing by it would amplify noise
_THUMBNAIL_STD_FLOOR = 1.0 / 255.0
_EMBEDDING_FLOOR = 0.05
_PROFILE_VERSION = 1


@dataclass(frozen=True)
class _Rule:
    """How one scalar statistic is compared and worded."""

    log: bool  # compare log(value) (log1p for sharpness, which can be 0)
    floor: float  # absolute part of the margin, in the compared scale
    lower: str  # word when below the range
    higher: str  # word when above the range
    label: str  # name in the message
    unit: str  # appended to the numbers in the message


_GREY = " (0-255 scale)"


def _rules() -> dict[str, _Rule]:
    rules = {
        "channels": _Rule(False, 0.5, "", "", "channels", ""),
        "height": _Rule(False, 0.5, "smaller", "larger", "height", " px"),
        "width": _Rule(False, 0.5, "smaller", "larger", "width", " px"),
        "aspect": _Rule(True, 0.01, "narrower", "wider", "aspect ratio", " (width/height)"),
        "mean": _Rule(False, 2.0, "darker", "brighter", "mean", _GREY),
        "std": _Rule(False, 2.0, "lower in contrast", "higher in contrast", "spread (std)", _GREY),
    }
    for c in _CHANNEL_NAMES:
        word = _CHANNEL_WORDS[c]
        rules[f"mean_{c}"] = _Rule(
            False, 2.0, f"darker in {word}", f"brighter in {word}", f"{word} mean", _GREY
        )
        rules[f"std_{c}"] = _Rule(
            False,
            2.0,
            f"lower in {word} contrast",
            f"higher in {word} contrast",
            f"{word} spread (std)",
            _GREY,
        )
    rules["sharpness"] = _Rule(
        True, math.log(1.25), "blurrier", "sharper", "sharpness", " (variance of the Laplacian, 0-255 scale)"
    )
    return rules


RULES = _rules()


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    if image.size == 0:
        raise ValueError("image has no pixels")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise ValueError("image contains NaN/inf values")
    return image


@lru_cache(maxsize=64)
def _area_weights(n: int, out: int) -> np.ndarray:
    """(out, n) matrix averaging n pixels into out equal bins, weighted by overlap (any n, even n < out)."""
    edges = np.linspace(0.0, n, out + 1)
    pixels = np.arange(n)
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    overlap = np.clip(overlap, 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def thumbnail(image: np.ndarray) -> np.ndarray:
    """Area-averaged (16, 16) or (16, 16, 3) thumbnail, whatever the image's size and aspect."""
    image = _check_image(image)
    h, w = image.shape[:2]
    # einsum, not matmul: these products are too small for BLAS, whose threads stall on a busy machine
    rows = np.einsum("ih,hx->ix", _area_weights(h, THUMBNAIL_SIZE), image.reshape(h, -1))
    rows = rows.reshape((THUMBNAIL_SIZE, w) + image.shape[2:])
    if image.ndim == 2:
        return np.einsum("iw,jw->ij", rows, _area_weights(w, THUMBNAIL_SIZE))
    return np.einsum("iwc,jw->ijc", rows, _area_weights(w, THUMBNAIL_SIZE))


def _reduced(image: np.ndarray) -> np.ndarray:
    """Every k-th pixel of the image in each direction, k = ceil(long side / MEASURE_MAX_SIDE): the same
    rule for every image. Sampling, not averaging, keeps the means and spreads unbiased, and costs
    nothing (averaging blocks took ~6 ms of a 768 x 576 RGB image)."""
    factor = -(-max(image.shape[:2]) // MEASURE_MAX_SIDE)
    return image if factor == 1 else np.ascontiguousarray(image[::factor, ::factor])


def _sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian (0-255 scale) of the reduced grey image (see `_reduced`)."""
    return float(np.var(ndimage.laplace(gray))) * 255.0**2


def image_statistics(image: np.ndarray) -> dict[str, float | np.ndarray]:
    """Statistics of one image as :func:`anomalens.data.read_image` returns it (float in [0, 1]).

    Scalars, in human units: ``height``, ``width`` (px), ``aspect`` (width / height), ``channels`` (1 or
    3), ``mean`` and ``std`` of the grey image (RGB: BT.601 luma) on the 0-255 scale, for RGB also
    ``mean_r/g/b`` and ``std_r/g/b``, and ``sharpness`` (see :func:`_sharpness`). ``embedding`` is the one
    array: the raw (16, 16) or (16, 16, 3) area-averaged thumbnail, float32 in [0, 1]. All but the size
    are measured on a sample of the pixels (see :func:`_reduced`): the same rule for the goods and for
    every image checked against them.
    """
    image = _check_image(image)
    h, w = image.shape[:2]
    image = _reduced(image)
    gray = image if image.ndim == 2 else image @ LUMA
    stats: dict[str, float | np.ndarray] = {
        "height": float(h),
        "width": float(w),
        "aspect": w / h,
        "channels": float(1 if image.ndim == 2 else 3),
        # float32 reductions: numpy sums pairwise, accurate to ~1e-6 here and much faster than float64
        "mean": float(gray.mean()) * 255.0,
        "std": float(gray.std()) * 255.0,
    }
    if image.ndim == 3:
        planes = np.ascontiguousarray(np.moveaxis(image, -1, 0)).reshape(3, -1)  # strided reductions are slow
        for c, mean, std in zip(_CHANNEL_NAMES, planes.mean(axis=1), planes.std(axis=1)):
            stats[f"mean_{c}"], stats[f"std_{c}"] = float(mean) * 255.0, float(std) * 255.0
    stats["sharpness"] = _sharpness(gray)
    stats["embedding"] = thumbnail(image)
    return stats


def _to_channels(thumb: np.ndarray, channels: int) -> np.ndarray:
    """A thumbnail with the profile's channel count: RGB to luma, or grey repeated to RGB."""
    if channels == 1 and thumb.ndim == 3:
        return thumb @ LUMA
    if channels == 3 and thumb.ndim == 2:
        return np.repeat(thumb[..., None], 3, axis=-1)
    return thumb


def _embedding(thumbs: np.ndarray) -> np.ndarray:
    """(n, D) layout vectors from (n, 16, 16[, 3]) thumbnails: per-channel mean removed, divided by the
    thumbnail's spread and by sqrt(D), so the Euclidean distance is an RMS difference in spread units."""
    flat = thumbs.reshape(len(thumbs), THUMBNAIL_SIZE * THUMBNAIL_SIZE, -1).astype(np.float64)
    centred = flat - flat.mean(axis=1, keepdims=True)
    spread = np.sqrt((centred**2).mean(axis=(1, 2), keepdims=True))
    vectors = centred / np.maximum(spread, _THUMBNAIL_STD_FLOOR)
    return vectors.reshape(len(thumbs), -1) / math.sqrt(flat[0].size)


def _leave_one_out_distances(vectors: np.ndarray) -> np.ndarray:
    """Each vector's Euclidean distance to its nearest other vector, in row chunks to bound memory."""
    out = np.empty(len(vectors))
    squares = (vectors**2).sum(axis=1)
    for start in range(0, len(vectors), 256):
        chunk = vectors[start : start + 256]
        d2 = squares[start : start + 256, None] + squares[None, :] - 2.0 * chunk @ vectors.T
        d2[np.arange(len(chunk)), np.arange(start, start + len(chunk))] = np.inf  # not itself
        out[start : start + 256] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
    return out


def _scaled(key: str, x: float) -> float:
    """A statistic on the scale its rule compares it on (log for scale-like ones)."""
    if not RULES[key].log:
        return x
    return math.log1p(x) if key == "sharpness" else math.log(x)


def _fmt(x: float) -> str:
    """Compact human number: whole from 10 up (grey levels, pixels), three significant digits below."""
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.3g}"


def _fmt_range(low: float, high: float) -> str:
    return _fmt(low) if _fmt(low) == _fmt(high) else f"{_fmt(low)}-{_fmt(high)}"


@dataclass(frozen=True)
class DriftFlag:
    """One statistic out of the training goods' range by more than the margin.

    ``value``, ``low`` and ``high`` are in the statistic's human units (intensities on the 0-255 scale,
    sizes in px; for ``embedding`` the distance to the nearest good, and the goods' own range [0, largest
    leave-one-out distance]). ``excess`` is how far beyond the range, as a share of the range (on the log
    scale for aspect and sharpness; the range is taken as at least the floor so the share stays finite).
    """

    statistic: str
    value: float
    low: float
    high: float
    excess: float
    message: str


@dataclass(frozen=True)
class BatchDrift:
    """A statistic whose distribution over a batch of images has moved away from the goods'."""

    statistic: str
    median: float  # over the batch, in human units
    goods_median: float
    p_value: float  # two-sample Kolmogorov-Smirnov
    n_images: int
    message: str


class DriftProfile:
    """Ranges of the training goods' statistics, and the check against them (rule: module docstring)."""

    def __init__(
        self,
        ranges: dict[str, tuple[float, float]],
        thumbnails: np.ndarray,
        nn_distances: np.ndarray,
        n_goods: int,
        margin: float = DEFAULT_MARGIN,
        values: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in ranges.items()}
        #: every good's value of each scalar statistic, for the batch test (`compare_batch`)
        self.values = {k: np.asarray(v, dtype=np.float64) for k, v in (values or {}).items()}
        self.thumbnails = np.asarray(thumbnails, dtype=np.float32)
        self.nn_distances = np.asarray(nn_distances, dtype=np.float64)
        self.n_goods = int(n_goods)
        self.margin = float(margin)
        self.channels = 3 if self.thumbnails.ndim == 4 else 1
        self._embeddings = _embedding(self.thumbnails)

    @classmethod
    def fit(
        cls,
        goods: list[dict],
        margin: float = DEFAULT_MARGIN,
        max_thumbnails: int = MAX_THUMBNAILS,
        seed: int = 0,
    ) -> DriftProfile:
        """Profile of the training goods' statistics (each from :func:`image_statistics`).

        A statistic enters the profile when every good has it (so per-channel statistics only for all-RGB
        goods). The embedding keeps a seeded random subset of at most ``max_thumbnails`` thumbnails, in RGB
        when every good is RGB and in grey otherwise; leave-one-out distances are among that subset.
        """
        if not goods:
            raise ValueError("a drift profile needs at least one training good")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        keys = [k for k in RULES if all(k in s for s in goods)]
        ranges = {k: (min(float(s[k]) for s in goods), max(float(s[k]) for s in goods)) for k in keys}
        keep = np.arange(len(goods))
        if len(goods) > max_thumbnails:
            keep = np.sort(np.random.default_rng(seed).choice(len(goods), max_thumbnails, replace=False))
        channels = 3 if all(s["embedding"].ndim == 3 for s in goods) else 1
        thumbs = np.stack([_to_channels(goods[i]["embedding"], channels) for i in keep]).astype(np.float32)
        vectors = _embedding(thumbs)
        loo = _leave_one_out_distances(vectors) if len(thumbs) > 1 else np.zeros(0)
        values = {k: np.array([float(s[k]) for s in goods]) for k in keys}
        return cls(ranges, thumbs, loo, len(goods), margin, values)

    def _scalar_flag(self, key: str, value: float, stats: dict) -> DriftFlag | None:
        rule, (low, high) = RULES[key], self.ranges[key]
        span = _scaled(key, high) - _scaled(key, low)
        beyond = max(_scaled(key, low) - _scaled(key, value), _scaled(key, value) - _scaled(key, high))
        if beyond <= self.margin * span + rule.floor:
            return None
        word = rule.higher if value > high else rule.lower
        if key == "channels":
            kind = {1: "grayscale", 3: "RGB"}
            message = f"{kind[int(value)]}, every training good is {kind[int(low)]}"
        elif key in ("height", "width"):
            # a size reads best whole: "1250x500 px vs 256x256 px"
            goods = f"{_fmt_range(*self.ranges['width'])}x{_fmt_range(*self.ranges['height'])}"
            size = f"{_fmt(float(stats['width']))}x{_fmt(float(stats['height']))}"
            message = f"{word} than every training good: {size} px vs {goods} px ({key} {_fmt(value)} px)"
        else:
            goods = _fmt_range(low, high)
            message = f"{word} than every training good: {rule.label} {_fmt(value)} vs {goods}{rule.unit}"
        return DriftFlag(key, value, low, high, beyond / max(span, rule.floor), message)

    def _embedding_flag(self, thumb: np.ndarray) -> DriftFlag | None:
        vector = _embedding(_to_channels(np.asarray(thumb, dtype=np.float32), self.channels)[None])
        # one query: a plain difference, no BLAS call (see thumbnail)
        distance = float(np.sqrt(((self._embeddings - vector) ** 2).sum(axis=1).min()))
        largest = float(self.nn_distances.max()) if len(self.nn_distances) else 0.0
        beyond = distance - largest
        if beyond <= self.margin * largest + _EMBEDDING_FLOOR:
            return None
        ratio = f" ({distance / largest:.1f}x)" if largest > 0 else ""
        message = (
            f"unlike every training good: distance to the nearest good {distance:.2f} vs at most "
            f"{largest:.2f} between goods{ratio}"
        )
        excess = beyond / max(largest, _EMBEDDING_FLOOR)
        return DriftFlag("embedding", distance, 0.0, largest, excess, message)

    def check(self, stats: dict) -> list[DriftFlag]:
        """Flags for every statistic of ``stats`` (from :func:`image_statistics`) beyond range + margin.

        Statistics the profile lacks, or the image lacks (per-channel ones of a grey image checked against
        RGB goods: the ``channels`` flag says so), are skipped. The embedding is compared in the profile's
        channel count. Flags come in a fixed order: channels, size, intensities, sharpness, embedding.
        """
        flags = [self._scalar_flag(key, float(stats[key]), stats) for key in self.ranges if key in stats]
        if "embedding" in stats:
            flags.append(self._embedding_flag(stats["embedding"]))
        return [f for f in flags if f is not None]

    def compare_batch(self, batch: list[dict], alpha: float = BATCH_ALPHA) -> list[BatchDrift]:
        """Statistics whose distribution over a batch of images differs from the goods'.

        An image inside the goods' range can still come from a new condition (a new exposure whose
        images span the old ones' range): one image cannot show it, a batch can. Each scalar
        statistic is compared with a two-sample Kolmogorov-Smirnov test; a shift is reported when
        p < alpha / (number of statistics tested) (Bonferroni) and the medians differ by more than
        the statistic's floor. Needs at least BATCH_MIN_IMAGES images.
        """
        from scipy.stats import ks_2samp

        if len(batch) < BATCH_MIN_IMAGES:
            return []
        keys = [k for k in self.values if k != "channels" and all(k in s for s in batch)]
        shifts = []
        for key in keys:
            rule, goods = RULES[key], self.values[key]
            seen = np.array([float(s[key]) for s in batch])
            result = ks_2samp(seen, goods)
            median_seen, median_goods = float(np.median(seen)), float(np.median(goods))
            moved = abs(_scaled(key, median_seen) - _scaled(key, median_goods))
            if result.pvalue * len(keys) >= alpha or moved <= rule.floor:
                continue
            word = (rule.higher if median_seen > median_goods else rule.lower) or "different"
            message = (
                f"{word} than the training goods: median {rule.label} {_fmt(median_seen)} vs "
                f"{_fmt(median_goods)}{rule.unit} (Kolmogorov-Smirnov p = {result.pvalue:.1g}, {len(seen)} images)"
            )
            shifts.append(
                BatchDrift(key, median_seen, median_goods, float(result.pvalue), len(seen), message)
            )
        return shifts

    def to_arrays_and_meta(self) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays (thumbnails, leave-one-out distances, the goods' values) for safetensors, JSON-safe
        metadata for the rest."""
        arrays = {"thumbnails": self.thumbnails, "nn_distances": self.nn_distances}
        arrays.update({f"values.{k}": v for k, v in self.values.items()})
        meta = {
            "version": _PROFILE_VERSION,
            "margin": self.margin,
            "n_goods": self.n_goods,
            "ranges": {k: [lo, hi] for k, (lo, hi) in self.ranges.items()},
        }
        return arrays, meta

    @classmethod
    def from_arrays_and_meta(cls, arrays: dict[str, np.ndarray], meta: dict) -> DriftProfile:
        """The profile :meth:`to_arrays_and_meta` described (JSON floats round-trip exactly)."""
        if meta.get("version") != _PROFILE_VERSION:
            raise ValueError(f"unsupported drift profile version {meta.get('version')!r}")
        ranges = {k: (lo, hi) for k, (lo, hi) in meta["ranges"].items()}
        values = {k[len("values.") :]: v for k, v in arrays.items() if k.startswith("values.")}
        return cls(
            ranges, arrays["thumbnails"], arrays["nn_distances"], meta["n_goods"], meta["margin"], values
        )
