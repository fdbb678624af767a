"""Per-image overlap (PIMO) curves and their normalized area, AUPIMO (Bertoldo et al., 2024).

"AUPIMO: Redefining Visual Anomaly Detection Benchmarks with High Speed and Low Tolerance";
the reference implementation is anomalib's ``anomalib.metrics.pimo``.

Definition. Every threshold t is shared by all images. The *shared FPR* at t is the mean over the
normal images of each one's false-positive rate (share of its pixels with map >= t). Each anomalous
image's PIMO curve is its own TPR (share of its mask pixels with map >= t) against the shared FPR
on a log axis; its AUPIMO is the area under that curve for shared FPR in ``fpr_bounds``, in units
of log10(FPR), divided by log10(upper / lower): 1.0 for an image detected in full before any normal
pixel, about (upper - lower) / ln(upper / lower) ~ 4e-5 for a map that carries no information.

Integration rule. The curve points are ordered by rising shared FPR (falling threshold); the area
is the trapezoid rule in log10(FPR) over the points inside the bounds, with the two end points
linearly interpolated (in log10 FPR) on the segments that cross the bounds, as anomalib does.
Points at equal FPR form vertical steps that add no area. The one segment that starts at FPR 0,
where the log is undefined (the top normal scores tie, e.g. constant or saturated maps), is taken
linear in FPR, which is what breaking those ties at random achieves, and integrated exactly.

Thresholds. The curve only changes at normal scores (FPR) and anomalous scores (TPR); between two
consecutive normal scores s' > s the FPR is fixed and the TPR just above s is the best one, so for
each normal score s used as a breakpoint the curve gets two points, at s and just above s
(``np.nextafter``), and counts "map > s". The breakpoints are the distinct normal scores from the
last one with shared FPR <= lower to the first one with shared FPR >= upper. If there are at most
``num_thresholds`` of them, all are used and the result equals the integral over every distinct
threshold; otherwise ``num_thresholds`` of them are picked at shared FPR levels spaced evenly in
log between the bounds (ratio 10 ** (1 / 999) ~ 1.0023 per step for the default 1000 over one
decade) plus the two bracketing ones. Finding them ranks only each normal image's top
ceil(min(n_normal, 64) * upper * n_pixels) + 1 scores (at most 0.64 % of the normal pixels at the
default bounds), and the ranking is exact whenever there are at most 64 normal images or none has
more than 64 times the mean exceedance (otherwise the breakpoints are spaced less evenly; every
FPR and TPR stays exact). Each image is then counted once against the sorted thresholds (a
cumulative histogram), one image at a time, never as images x pixels x thresholds.

Speed and memory, measured on one core: 200 float32 maps of 256x256 (100 normal, 100 anomalous)
take 0.21 s; 60 maps of 1024x1024 (30 normal) take 0.9 s with a peak of 17 MB beyond the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_FPR_BOUNDS = (1e-5, 1e-4)
DEFAULT_NUM_THRESHOLDS = 1000
# Ranking each normal image's top (margin x upper) share of scores covers the shared FPR up to
# `upper` exactly unless one image exceeds the mean FPR by more than this factor.
_CANDIDATE_MARGIN = 64

Anomalous = tuple[int, np.ndarray, np.ndarray]  # (input index, bool mask, map)


def _split(
    masks: Sequence[ArrayLike | None], maps: Sequence[ArrayLike], labels: ArrayLike
) -> tuple[list[np.ndarray], list[Anomalous], int]:
    """Validate inputs; return the normal maps, the scorable anomalous images, the excluded count."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not len(masks) == len(maps) == labels.size:
        raise ValueError(f"got {len(masks)} masks, {len(maps)} maps and labels of shape {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    normals, anomalous, n_excluded = [], [], 0
    for i, (mask, amap, label) in enumerate(zip(masks, maps, labels)):
        amap = np.asarray(amap)
        if amap.size == 0 or amap.dtype.kind not in "fiu" or not np.isfinite(amap).all():
            raise ValueError(f"image {i}: map must be non-empty, real-valued and finite")
        if mask is not None:
            mask = np.asarray(mask).astype(bool, copy=False)
            if mask.shape != amap.shape:
                raise ValueError(f"image {i}: mask shape {mask.shape} != map shape {amap.shape}")
        if label == 0:
            if mask is not None and mask.any():
                raise ValueError(f"image {i} is labeled good but its mask marks defect pixels")
            normals.append(amap)
        elif mask is None or not mask.any():
            n_excluded += 1  # no ground truth to overlap with
        else:
            anomalous.append((i, mask, amap))
    if not normals:
        raise ValueError("AUPIMO needs at least one normal (label 0) image to define the shared FPR")
    if not anomalous:
        raise ValueError("AUPIMO needs at least one defective image with a non-empty mask")
    return normals, anomalous, n_excluded


def _top_normal_scores(normals: list[np.ndarray], upper: float) -> tuple[np.ndarray, np.ndarray]:
    """Distinct top normal scores, descending, with the shared FPR at each (exact while <= upper)."""
    share = min(1.0, min(len(normals), _CANDIDATE_MARGIN) * upper)
    tops, weights = [], []
    for amap in normals:
        scores = np.asarray(amap, dtype=np.float64).ravel()
        k = min(scores.size, math.ceil(share * scores.size) + 1)
        # copy: a view would keep the whole partitioned image alive
        tops.append(np.partition(scores, scores.size - k)[scores.size - k :].copy())
        # a pixel of image i moves the mean of per-image FPRs by 1 / (n_normal * n_pixels_i)
        weights.append(np.full(k, 1.0 / (len(normals) * scores.size)))
    scores = np.concatenate(tops)
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fpr = np.cumsum(np.concatenate(weights)[order])
    ends = np.append(np.flatnonzero(scores[:-1] != scores[1:]), scores.size - 1)  # last of each tie
    return scores[ends], fpr[ends]


def _thresholds(
    normals: list[np.ndarray], fpr_bounds: tuple[float, float], num_thresholds: int
) -> np.ndarray:
    """Ascending thresholds: the breakpoint normal scores and the next float above each."""
    lower, upper = fpr_bounds
    scores, fpr = _top_normal_scores(normals, upper)
    # From the last score with FPR <= lower (the top one if none) to the first with FPR >= upper.
    first = max(int(np.searchsorted(fpr, lower, side="right")) - 1, 0)
    last = min(int(np.searchsorted(fpr, upper, side="left")), scores.size - 1)
    if last - first + 1 <= num_thresholds:
        picked = scores[first : last + 1]
    else:
        levels = np.searchsorted(fpr, np.geomspace(lower, upper, num_thresholds), side="left")
        picked = scores[np.unique(np.concatenate(([first, last], np.clip(levels, first, last))))]
    return np.unique(np.concatenate((picked, np.nextafter(picked, np.inf))))


def _count_at_or_above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Number of scores >= each of the ascending thresholds, via one cumulative histogram."""
    scores = scores[scores >= thresholds[0]]
    bins = np.searchsorted(thresholds, scores, side="right") - 1
    return np.cumsum(np.bincount(bins, minlength=thresholds.size)[::-1])[::-1]


def _area_weights(fpr: np.ndarray, fpr_bounds: tuple[float, float]) -> np.ndarray:
    """Weights w with AUPIMO = tpr @ w, for curve points in order of rising shared FPR.

    The area is linear in the TPR values, so the weights are computed once for all images.
    """
    lo, hi = np.log10(fpr_bounds)
    with np.errstate(divide="ignore"):
        x = np.log10(fpr)
    start, end = np.maximum(x[:-1], lo), np.minimum(x[1:], hi)
    width = end - start
    to_self, to_next = np.zeros(width.size), np.zeros(width.size)

    in_log = (width > 0) & (fpr[:-1] > 0)
    span = (x[1:] - x[:-1])[in_log]
    # where the end points of the clipped segment sit along it, as a fraction from its start
    at_start = (start[in_log] - x[:-1][in_log]) / span
    at_end = (end[in_log] - x[:-1][in_log]) / span
    to_self[in_log] = width[in_log] * (2 - at_start - at_end) / 2
    to_next[in_log] = width[in_log] * (at_start + at_end) / 2

    from_zero = (width > 0) & (fpr[:-1] == 0)
    # TPR linear in FPR from (0, y0) to (f1, y1): its integral over d log10(FPR) in closed form
    rise = (10.0 ** end[from_zero] - 10.0 ** start[from_zero]) / (fpr[1:][from_zero] * math.log(10))
    to_self[from_zero] = width[from_zero] - rise
    to_next[from_zero] = rise
    return (np.append(to_self, 0.0) + np.insert(to_next, 0, 0.0)) / (hi - lo)


def _threshold_at(thresholds: np.ndarray, fpr: np.ndarray, bound: float) -> float:
    """Lowest threshold whose shared FPR is <= bound (thresholds ascending, fpr falling)."""
    return float(thresholds[np.flatnonzero(fpr <= bound)[0]])


def aupimo(
    masks: Sequence[ArrayLike | None],
    maps: Sequence[ArrayLike],
    labels: ArrayLike,
    fpr_bounds: tuple[float, float] = DEFAULT_FPR_BOUNDS,
    num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
) -> dict[str, Any]:
    """AUPIMO of every defective image and its summary statistics (see the module docstring).

    ``masks`` are bool arrays at each map's shape (all-False or None for good images), ``labels``
    0 (good) / 1 (defective). Defective images whose mask is None or empty are excluded and counted
    in ``n_excluded``. ``aupimo_per_image`` follows the input order, None for good and excluded
    images; ``aupimo_std`` is the population std; quartiles interpolate linearly.
    ``thresholds_at_bounds`` holds, for each FPR bound, the lowest evaluated threshold whose shared
    FPR is at most that bound; ``n_points_in_range`` the curve points with FPR inside the bounds.
    Raises ValueError without a good image or without a defective image with a non-empty mask.
    """
    lower, upper = fpr_bounds
    if not 0 < lower < upper <= 1:
        raise ValueError(f"fpr_bounds must satisfy 0 < lower < upper <= 1, got {fpr_bounds}")
    if num_thresholds < 2:
        raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
    normals, anomalous, n_excluded = _split(masks, maps, labels)
    thresholds = _thresholds(normals, (lower, upper), num_thresholds)

    fpr = np.zeros(thresholds.size)
    for amap in normals:
        fpr += _count_at_or_above(np.asarray(amap, dtype=np.float64).ravel(), thresholds) / amap.size
    fpr /= len(normals)
    tpr = np.stack(
        [
            _count_at_or_above(amap[mask].astype(np.float64), thresholds) / mask.sum()
            for _, mask, amap in anomalous
        ]
    )
    # thresholds ascend, so reverse to order the curve by rising FPR
    scores = np.clip(tpr[:, ::-1] @ _area_weights(fpr[::-1], (lower, upper)), 0.0, 1.0)

    per_image: list[float | None] = [None] * len(maps)
    for (i, _, _), score in zip(anomalous, scores):
        per_image[i] = float(score)
    q1, median, q3 = np.percentile(scores, [25, 50, 75])
    return {
        "aupimo_mean": float(scores.mean()),
        "aupimo_std": float(scores.std()),
        "aupimo_median": float(median),
        "aupimo_q1": float(q1),
        "aupimo_q3": float(q3),
        "aupimo_per_image": per_image,
        "n_images": len(anomalous),
        "n_excluded": n_excluded,
        "n_normal_images": len(normals),
        "fpr_bounds": [float(lower), float(upper)],
        "thresholds_at_bounds": [_threshold_at(thresholds, fpr, b) for b in (lower, upper)],
        "n_points_in_range": int(np.count_nonzero((fpr >= lower) & (fpr <= upper))),
    }
