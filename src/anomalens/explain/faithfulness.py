"""How far an explanation map can be trusted: against ground-truth masks, and against the detector.

* pixel AUROC of the map against the mask (per image, then averaged: explanation maps are scaled
  per image, so pooling pixels across images would mix scales);
* pointing game (Zhang et al., ECCV 2016): does the map's maximum fall inside the mask, give or
  take `tolerance` pixels;
* deletion curve (Petsiuk et al., BMVC 2018): the detector's score as the top-k % explained pixels
  are replaced with normal content; a faithful map makes it drop fast (low area under the curve),
  compared with deleting the same number of pixels in random order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

DELETION_FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


def explanation_auroc(explanation: np.ndarray, mask: np.ndarray) -> float | None:
    """Pixel AUROC of one map against its mask; None when the mask is empty or covers everything."""
    truth = np.asarray(mask, bool).ravel()
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, np.asarray(explanation, np.float64).ravel()))


def peak_point(explanation: np.ndarray) -> tuple[int, int] | None:
    """(x, y) the map points at: the centre of mass of its maximal pixels (LIME maps are flat over
    a superpixel, so "the maximum" is an area); None for a constant map, which points nowhere."""
    explanation = np.asarray(explanation, np.float64)
    top, low = explanation.max(), explanation.min()
    if top - low <= 1e-12:
        return None
    cy, cx = ndimage.center_of_mass(explanation >= top - 1e-6 * (top - low))
    return int(round(cx)), int(round(cy))


def pointing_hit(explanation: np.ndarray, mask: np.ndarray, tolerance: int = 4) -> bool:
    """True when the map's peak point lies in the mask or within `tolerance` pixels (Euclidean) of it;
    a constant map never hits."""
    if np.shape(explanation) != np.shape(mask):
        raise ValueError(f"explanation map {np.shape(explanation)} and mask {np.shape(mask)} differ in shape")
    point = peak_point(explanation)
    mask = np.asarray(mask, bool)
    return bool(
        point is not None
        and mask.any()
        and ndimage.distance_transform_edt(~mask)[point[1], point[0]] <= tolerance
    )


def faithfulness_summary(
    explanations: Sequence[np.ndarray], masks: Sequence[np.ndarray], tolerance: int = 4
) -> dict:
    """Mean per-image pixel AUROC and pointing-game hit rate over the images with a non-empty mask."""
    pairs = [(e, m) for e, m in zip(explanations, masks) if m is not None and np.asarray(m).any()]
    if not pairs:
        raise ValueError("faithfulness needs at least one image with a non-empty ground-truth mask")
    aurocs = [a for a in (explanation_auroc(e, m) for e, m in pairs) if a is not None]
    hits = [pointing_hit(e, m, tolerance) for e, m in pairs]
    return {
        "pixel_auroc": float(np.mean(aurocs)) if aurocs else None,
        "pointing_game": float(np.mean(hits)),
        "n_images": len(pairs),
    }


def deletion_curve(
    score: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    explanation: np.ndarray,
    baseline: np.ndarray,
    fractions: Sequence[float] = DELETION_FRACTIONS,
    seed: int = 0,
) -> dict:
    """Scores as the top `fractions` of explained pixels are replaced with `baseline` (normal content),
    and the same for a random pixel order; all images go to `score` in one batch.

    Returns fractions, scores, random_scores and the areas under both curves divided by the
    fraction span, i.e. the mean score along each curve (lower `auc` than `random_auc` = faithful).
    """
    fractions = np.asarray(fractions, np.float64)
    if fractions.min() < 0 or fractions.max() > 1:
        raise ValueError("deletion fractions must lie in [0, 1]")
    order = np.argsort(-np.asarray(explanation, np.float64).ravel(), kind="stable")
    random_order = np.random.default_rng(seed).permutation(order.size)
    batch = []
    for ranking in (order, random_order):
        for f in fractions:
            gone = np.zeros(order.size, bool)
            gone[ranking[: int(round(f * order.size))]] = True
            gone = gone.reshape(explanation.shape)
            batch.append(np.where(gone[..., None] if image.ndim == 3 else gone, baseline, image))
    values = np.asarray(score(np.stack(batch)), np.float64)
    explained, rand = values[: len(fractions)], values[len(fractions) :]
    span = max(fractions[-1] - fractions[0], 1e-12)
    return {
        "fractions": fractions.tolist(),
        "scores": explained.tolist(),
        "random_scores": rand.tolist(),
        "auc": float(np.trapezoid(explained, fractions) / span),
        "random_auc": float(np.trapezoid(rand, fractions) / span),
    }
