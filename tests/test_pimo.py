"""Tests for anomalens.metrics.pimo: hand-computed AUPIMO, limiting cases and a brute-force check."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage

from anomalens.metrics import aupimo

# Enough normal pixels (20 x 128 x 128 ~ 3.3e5) to resolve the default lower bound 1e-5.
N_NORMAL, SIDE = 20, 128


def _square_mask(shape: tuple[int, int], top: int, left: int, size: int) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[top : top + size, left : left + size] = True
    return mask


def _dataset(rng: np.random.Generator, n_defective: int, side: int = SIDE, n_normal: int = N_NORMAL):
    """Uniform-noise maps; defective images get a square mask of random size and place."""
    maps = [rng.random((side, side)) for _ in range(n_normal + n_defective)]
    masks = [np.zeros((side, side), dtype=bool) for _ in range(n_normal)]
    for _ in range(n_defective):
        size = int(rng.integers(4, side // 3))
        top, left = rng.integers(0, side - size, size=2)
        masks.append(_square_mask((side, side), top, left, size))
    labels = [0] * n_normal + [1] * n_defective
    return masks, maps, labels


def _detect(rng: np.random.Generator, masks, maps, scales) -> None:
    """Defect pixels uniform in [1 - scale, 1]: TPR ~ (1 - t) / scale, rising through the range."""
    for mask, amap, scale in zip(masks[-len(scales) :], maps[-len(scales) :], scales):
        amap[mask] = 1 - scale * rng.random(int(mask.sum()))


def _brute_force(masks, maps, labels, fpr_bounds) -> list[float]:
    """AUPIMO at every distinct score: trapezoid in log10(FPR), end points interpolated."""
    normals = [np.sort(m.ravel()) for m, label in zip(maps, labels) if label == 0]
    defects = [np.sort(m[k]) for k, m, label in zip(masks, maps, labels) if label == 1 and k.any()]
    thresholds = np.unique(np.concatenate(normals + defects))[::-1]  # falling: FPR rises

    def share_at_or_above(sorted_scores: np.ndarray) -> np.ndarray:
        return 1 - np.searchsorted(sorted_scores, thresholds, side="left") / sorted_scores.size

    fpr = np.mean([share_at_or_above(n) for n in normals], axis=0)
    positive = fpr > 0  # points at FPR 0 bound no segment in range when the next point is below it
    lower, upper = fpr_bounds
    assert fpr[positive][0] <= lower, "the brute force needs a positive FPR point below the lower bound"
    x, lo, hi = np.log10(fpr[positive]), math.log10(lower), math.log10(upper)
    i = np.flatnonzero(x <= lo)[-1]  # segment i -> i+1 crosses lo
    j = np.flatnonzero(x >= hi)[0]  # segment j-1 -> j crosses hi
    result = []
    for d in defects:
        y = share_at_or_above(d)[positive]
        y_lo = y[i] + (y[i + 1] - y[i]) * (lo - x[i]) / (x[i + 1] - x[i])
        y_hi = y[j - 1] + (y[j] - y[j - 1]) * (hi - x[j - 1]) / (x[j] - x[j - 1])
        xs = np.concatenate(([lo], x[i + 1 : j], [hi]))
        ys = np.concatenate(([y_lo], y[i + 1 : j], [y_hi]))
        result.append(float(np.trapezoid(ys, xs) / (hi - lo)))
    return result


def test_hand_computed_two_normal_images_of_different_sizes() -> None:
    # Normal A (100 px): 1 px at 9, 4 at 7, 10 at 5. Normal B (50 px): 1 px at 8, 4 at 6.
    # Shared FPR = mean of the two images' FPRs, at t = 9, 8, 7, 6, 5:
    #   (1/100)/2 = .005, (1/100 + 1/50)/2 = .015, (5/100 + 1/50)/2 = .035, .075, .125
    # (pooling the pixels instead would give 2/150 = .0133 at t = 8).
    a = np.zeros((10, 10))
    a.flat[:15] = [9] + [7] * 4 + [5] * 10
    b = np.zeros((5, 10))
    b.flat[:5] = [8] + [6] * 4
    # Defective image: 4 mask pixels at 8.5, 8, 6.5, 6.5 -> TPR 1/4 for t in (8, 8.5], 1/2 for
    # t in (6.5, 8], 1 for t <= 6.5. Its other pixels score 100, which must not matter.
    d = np.full((4, 4), 100.0)
    d.flat[:4] = [8.5, 8, 6.5, 6.5]
    mask = np.zeros((4, 4), dtype=bool)
    mask.flat[:4] = True
    r = aupimo([None, np.zeros_like(b, dtype=bool), mask], [a, b, d], [0, 0, 1], fpr_bounds=(0.01, 0.1))

    # Curve (log10 FPR, TPR) by rising FPR: (.005, 1/4) just above 8 -> (.015, 1/2) at 8 ->
    # (.035, 1/2) at 7 -> vertical to 1 at 6.5 -> 1 up to .125. Integrate over [-2, -1]:
    x5, x15, x35 = math.log10(0.005), math.log10(0.015), math.log10(0.035)
    y_at_lower = 0.25 + 0.25 * (-2 - x5) / (x15 - x5)
    expected = (x15 + 2) * (y_at_lower + 0.5) / 2 + (x35 - x15) * 0.5 + (-1 - x35) * 1.0
    assert r["aupimo_per_image"][2] == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.719842, abs=1e-6)
    assert r["aupimo_per_image"][:2] == [None, None]
    # Lowest thresholds with shared FPR <= bound: just above 8 (FPR .005) and just above 5 (.075).
    assert r["thresholds_at_bounds"] == [np.nextafter(8.0, np.inf), np.nextafter(5.0, np.inf)]
    assert (r["n_images"], r["n_normal_images"], r["n_excluded"]) == (1, 2, 0)
    json.dumps(r)


def test_perfect_detector_scores_one() -> None:
    rng = np.random.default_rng(0)
    masks, maps, labels = _dataset(rng, n_defective=6)
    for mask, amap in zip(masks[N_NORMAL:], maps[N_NORMAL:]):
        amap[mask] += 1.0  # every defect pixel above every normal score
    r = aupimo(masks, maps, labels)
    assert r["aupimo_per_image"][N_NORMAL:] == [1.0] * 6
    assert r["aupimo_mean"] == r["aupimo_median"] == r["aupimo_q1"] == r["aupimo_q3"] == 1.0
    assert r["aupimo_std"] == 0.0
    t_lower, t_upper = r["thresholds_at_bounds"]
    assert 0.999 < t_upper < t_lower <= 1.0  # uniform noise: upper tail quantiles 1 - FPR


def test_noise_and_mask_independent_maps_score_near_zero() -> None:
    rng = np.random.default_rng(1)
    masks, maps, labels = _dataset(rng, n_defective=20)
    # TPR = FPR in expectation, so AUPIMO ~ (upper - lower) / ln(upper / lower): ~4e-5 by default,
    # 0.039 for bounds (1e-2, 1e-1), which the ~2e4 defect pixels here measure to about 1e-3.
    assert aupimo(masks, maps, labels)["aupimo_mean"] < 2e-3
    wide = aupimo(masks, maps, labels, fpr_bounds=(1e-2, 1e-1))
    assert wide["aupimo_mean"] == pytest.approx(0.09 / math.log(10), abs=4e-3)

    # Smooth blobs placed independently of the masks: localized structure, but not on the defects.
    smooth = [ndimage.gaussian_filter(m, sigma=4) for m in maps]
    assert aupimo(masks, smooth, labels)["aupimo_mean"] < 0.01
    assert aupimo(masks, smooth, labels, fpr_bounds=(1e-2, 1e-1))["aupimo_mean"] < 0.1


def test_constant_maps() -> None:
    masks, maps, labels = _dataset(np.random.default_rng(2), n_defective=3)
    lower, upper = 1e-5, 1e-4
    constant = [np.full_like(m, 0.5) for m in maps]
    # All ties: only random tie-breaking reaches the range, TPR = FPR there, so the area is
    # the integral of FPR over d log10(FPR), normalized: (upper - lower) / ln(upper / lower).
    r = aupimo(masks, constant, labels)
    assert r["aupimo_mean"] == pytest.approx((upper - lower) / math.log(upper / lower), rel=1e-9)
    # constant defective maps above / below constant normal maps: all or nothing
    above = constant[:N_NORMAL] + [np.full_like(m, 0.7) for m in maps[N_NORMAL:]]
    assert aupimo(masks, above, labels)["aupimo_per_image"][N_NORMAL:] == [1.0] * 3
    below = constant[:N_NORMAL] + [np.full_like(m, 0.2) for m in maps[N_NORMAL:]]
    assert aupimo(masks, below, labels)["aupimo_per_image"][N_NORMAL:] == [0.0] * 3


def test_saturated_normal_maps_tie_across_the_range() -> None:
    # 16 of the 16384 pixels of every normal map saturate at 1.0: the shared FPR jumps from 0 to
    # f1 = 16 / 16384 > upper in one step. The defect has half its mask above 1.0, half at 1.0,
    # so along that step (random tie-breaking) TPR = 1/2 + (1/2) FPR / f1.
    rng = np.random.default_rng(7)
    maps = [0.9 * rng.random((SIDE, SIDE)) for _ in range(N_NORMAL + 1)]
    for amap in maps[:N_NORMAL]:
        amap.flat[rng.choice(amap.size, 16, replace=False)] = 1.0
    mask = _square_mask((SIDE, SIDE), 20, 30, 10)
    maps[-1][mask] = np.repeat([2.0, 1.0], 50)
    masks = [np.zeros((SIDE, SIDE), dtype=bool)] * N_NORMAL + [mask]
    r = aupimo(masks, maps, [0] * N_NORMAL + [1])

    lower, upper, f1 = 1e-5, 1e-4, 16 / SIDE**2
    expected = 0.5 + 0.5 * (upper - lower) / (f1 * math.log(upper / lower))  # mean of TPR over d ln FPR
    assert r["aupimo_per_image"][-1] == pytest.approx(expected, rel=1e-9)
    assert r["thresholds_at_bounds"] == [np.nextafter(1.0, np.inf)] * 2
    assert r["n_points_in_range"] == 0


def test_invariant_to_monotone_transform() -> None:
    rng = np.random.default_rng(3)
    masks, maps, labels = _dataset(rng, n_defective=8)
    _detect(rng, masks, maps, rng.uniform(1e-4, 1e-3, size=8))  # partial detection
    r = aupimo(masks, maps, labels)
    transformed = aupimo(masks, [np.exp(5 * m) - 3 for m in maps], labels)
    scores = r["aupimo_per_image"][N_NORMAL:]
    assert min(scores) > 0 and max(scores) < 1
    np.testing.assert_allclose(transformed["aupimo_per_image"][N_NORMAL:], scores, rtol=0, atol=1e-12)


def test_per_image_scores_follow_input_order() -> None:
    rng = np.random.default_rng(4)
    masks, maps, labels = _dataset(rng, n_defective=5)
    _detect(rng, masks, maps, [2e-4 * (k + 1) for k in range(5)])  # a different AUPIMO per image
    r = aupimo(masks, maps, labels)["aupimo_per_image"]
    assert len(set(r[N_NORMAL:])) == 5

    order = rng.permutation(len(maps))
    shuffled = aupimo([masks[i] for i in order], [maps[i] for i in order], np.array(labels)[order])
    assert shuffled["aupimo_per_image"] == [r[i] for i in order]


def test_empty_and_missing_masks_are_excluded_and_counted() -> None:
    rng = np.random.default_rng(5)
    masks, maps, labels = _dataset(rng, n_defective=3)
    _detect(rng, masks, maps, [2e-4, 4e-4, 8e-4])
    base = aupimo(masks, maps, labels)
    extra_maps = maps + [rng.random((SIDE, SIDE)), rng.random((SIDE, SIDE))]
    r = aupimo(masks + [np.zeros((SIDE, SIDE), dtype=bool), None], extra_maps, labels + [1, 1])
    assert r["aupimo_per_image"] == base["aupimo_per_image"] + [None, None]
    assert (r["n_images"], r["n_excluded"]) == (3, 2)
    assert r["aupimo_mean"] == base["aupimo_mean"]


def test_invalid_inputs_raise() -> None:
    masks, maps, labels = _dataset(np.random.default_rng(6), n_defective=2)
    with pytest.raises(ValueError, match="normal"):
        aupimo(masks[N_NORMAL:], maps[N_NORMAL:], labels[N_NORMAL:])
    with pytest.raises(ValueError, match="non-empty mask"):
        aupimo(masks[:N_NORMAL] + [None], maps[: N_NORMAL + 1], labels[: N_NORMAL + 1])
    with pytest.raises(ValueError, match="labeled good"):
        aupimo(masks[N_NORMAL:] + masks[N_NORMAL:], maps[: 2 * 2], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="fpr_bounds"):
        aupimo(masks, maps, labels, fpr_bounds=(1e-4, 1e-5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_over_all_thresholds(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks, maps, labels = _dataset(rng, n_defective=6, side=48, n_normal=12)
    _detect(rng, masks, maps, rng.uniform(0.01, 0.05, size=6))  # TPR rises through the range
    maps = [m.astype(np.float32) for m in maps]  # the thresholds must be exact in float32 too
    fpr_bounds = (1e-3, 1e-2)  # resolvable with 12 x 48 x 48 ~ 2.8e4 normal pixels
    expected = _brute_force(masks, maps, labels, fpr_bounds)
    assert 0.05 < np.mean(expected) < 0.95

    exact = aupimo(masks, maps, labels, fpr_bounds=fpr_bounds)  # fewer breakpoints than the default
    np.testing.assert_allclose(exact["aupimo_per_image"][12:], expected, rtol=0, atol=1e-9)
    bounded = aupimo(masks, maps, labels, fpr_bounds=fpr_bounds, num_thresholds=100)
    assert bounded["n_points_in_range"] <= 2 * 100
    np.testing.assert_allclose(bounded["aupimo_per_image"][12:], expected, rtol=0, atol=1e-3)


def test_evaluate_reports_aupimo_overall_and_per_defect_type(texture, tmp_path):
    import anomalens
    from anomalens.report.html_report import write_evaluation_report
    from anomalens.workflows.evaluate import evaluate
    from conftest import fast_options

    det = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    evaluation = evaluate(det, texture)
    labels = np.array([s.label for s in evaluation.samples])
    direct = aupimo(evaluation.masks, evaluation.prediction.maps, labels)
    assert evaluation.metrics["aupimo"] == direct["aupimo_mean"] and 0.0 <= direct["aupimo_mean"] <= 1.0
    assert all("aupimo" in d for d in evaluation.metrics["per_defect_type"].values())
    html = write_evaluation_report(evaluation, det, tmp_path / "r.html", n_gallery=0).read_text()
    assert "AUPIMO" in html
