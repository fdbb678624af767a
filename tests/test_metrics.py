"""Tests for anomalens.metrics: cross-checks against sklearn and a brute-force AUPRO."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from anomalens.metrics import aupro, f1_at_threshold, image_metrics, pixel_metrics

# ---------------------------------------------------------------------------------------------
# image metrics


def test_image_metrics_hand_computed() -> None:
    labels = [0, 0, 1, 1, 0, 1]
    scores = [0.1, 0.4, 0.35, 0.8, 0.2, 0.9]
    r = image_metrics(labels, scores)
    # Positives (0.9, 0.8, 0.35) beat negatives (0.4, 0.2, 0.1) in 8 of 9 pairs.
    assert r["image_auroc"] == pytest.approx(8 / 9)
    # AP = (1 + 1 + 3/4) / 3 at recalls 1/3, 2/3, 1.
    assert r["image_ap"] == pytest.approx(11 / 12)
    # Best cut at 0.35: tp=3, fp=1 -> P=3/4, R=1, F1=6/7.
    assert r["image_f1_max"] == pytest.approx(6 / 7)
    assert r["image_f1_threshold"] == pytest.approx(0.35)
    assert (r["n_good"], r["n_defective"]) == (3, 3)
    json.dumps(r)


def test_image_metrics_perfect_separation() -> None:
    r = image_metrics([0, 0, 1, 1], [0.1, 0.2, 0.7, 0.9])
    assert r["image_auroc"] == 1.0
    assert r["image_ap"] == 1.0
    assert r["image_f1_max"] == 1.0
    assert r["image_f1_threshold"] == pytest.approx(0.7)


def test_image_metrics_matches_sklearn_random() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + labels
    r = image_metrics(labels, scores)
    assert r["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert r["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    # F1-max equals the best F1 over all candidate thresholds, and is reproduced at its threshold.
    best = max(f1_at_threshold(labels, scores, t)["f1"] for t in np.unique(scores))
    assert r["image_f1_max"] == pytest.approx(best)
    assert f1_at_threshold(labels, scores, r["image_f1_threshold"])["f1"] == pytest.approx(best)


def test_image_metrics_one_class() -> None:
    with pytest.warns(UserWarning, match="one class"):
        r = image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    assert r["image_auroc"] is None and r["image_ap"] is None and r["image_f1_max"] is None
    with pytest.warns(UserWarning, match="one class"):
        r = image_metrics([1, 1], [0.1, 0.3])
    assert r["image_auroc"] is None
    assert r["image_f1_max"] == 1.0 and r["image_f1_threshold"] == pytest.approx(0.1)
    json.dumps(r)


@pytest.mark.parametrize(
    ("labels", "scores"),
    [([0, 1], [0.1]), ([], []), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, float("nan")])],
)
def test_image_metrics_invalid(labels: list, scores: list) -> None:
    with pytest.raises(ValueError):
        image_metrics(labels, scores)


def test_f1_at_threshold_counts() -> None:
    r = f1_at_threshold([0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.2, 0.9], 0.4)
    assert (r["tp"], r["fp"], r["tn"], r["fn"]) == (2, 1, 2, 1)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(2 / 3)
    nothing = f1_at_threshold([0, 1], [0.1, 0.2], 1.0)
    assert (nothing["precision"], nothing["recall"], nothing["f1"]) == (0.0, 0.0, 0.0)


@settings(max_examples=50, deadline=None)
@given(
    labels=st.lists(st.integers(0, 1), min_size=2, max_size=40),
    data=st.data(),
)
def test_image_metrics_fuzz(labels: list[int], data: st.DataObject) -> None:
    labels[0], labels[1] = 0, 1  # both classes present
    scores = data.draw(
        st.lists(
            st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0])),
            min_size=len(labels),
            max_size=len(labels),
        )
    )
    r = image_metrics(labels, scores)
    for key in ("image_auroc", "image_ap", "image_f1_max"):
        assert 0.0 <= r[key] <= 1.0
    assert r["image_f1_threshold"] in scores


# ---------------------------------------------------------------------------------------------
# pixel AUROC / AP


def _random_set(seed: int, sizes: list[tuple[int, int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Masks with blob-ish defects on every second image and maps correlated with them."""
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i, (h, w) in enumerate(sizes):
        mask = np.zeros((h, w), dtype=bool)
        if i % 2:
            mask = ndimage.binary_dilation(rng.random((h, w)) < 0.02, iterations=2)
        masks.append(mask)
        maps.append((rng.random((h, w)) + mask * rng.random((h, w))).astype(np.float32))
    return masks, maps


def test_pixel_metrics_matches_sklearn_varying_sizes() -> None:
    masks, maps = _random_set(0, [(20, 30), (25, 17), (40, 40), (9, 50)])
    r = pixel_metrics(masks, maps)
    y = np.concatenate([m.ravel() for m in masks])
    s = np.concatenate([a.ravel() for a in maps])
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert r["pixel_ap"] == pytest.approx(average_precision_score(y, s))
    assert r["aupro"] == pytest.approx(aupro(masks, maps))
    assert r["pixel_subsampled"] is False
    json.dumps(r)


def test_pixel_metrics_excludes_none_masks() -> None:
    masks, maps = _random_set(1, [(20, 30), (25, 17), (40, 40), (30, 20)])
    extra_map = np.full((15, 15), 100.0, dtype=np.float32)  # would dominate if it were counted
    with_none = pixel_metrics([*masks, None], [*maps, extra_map])
    assert with_none == pixel_metrics(masks, maps)


def test_pixel_metrics_empty_defect_mask() -> None:
    masks, maps = _random_set(2, [(20, 30), (25, 17)])
    empty = np.zeros((10, 12), dtype=bool)  # defective image whose mask has no pixels
    empty_map = np.random.default_rng(0).random((10, 12))
    r = pixel_metrics([*masks, empty], [*maps, empty_map])
    assert all(0.0 <= r[k] <= 1.0 for k in ("pixel_auroc", "pixel_ap", "aupro"))
    assert r["aupro"] == pytest.approx(brute_aupro([*masks, empty], [*maps, empty_map]))


def test_pixel_metrics_shape_mismatch_names_index() -> None:
    masks, maps = _random_set(3, [(10, 10), (12, 8)])
    maps[1] = maps[1].T
    with pytest.raises(ValueError, match="image 1") as info:
        pixel_metrics(masks, maps)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="2 masks but 1 maps"):
        pixel_metrics(masks, maps[:1])


def test_pixel_metrics_undefined() -> None:
    good = [np.zeros((5, 5), dtype=bool)] * 2
    maps = [np.random.default_rng(0).random((5, 5))] * 2
    for masks in (good, [None, None], [np.ones((5, 5), dtype=bool)] * 2):
        with pytest.warns(UserWarning, match="undefined"):
            r = pixel_metrics(masks, maps)
        assert (r["pixel_auroc"], r["pixel_ap"], r["aupro"]) == (None, None, None)
    with pytest.raises(ValueError):
        aupro(good, maps)


def test_pixel_metrics_subsampling_deterministic() -> None:
    masks, maps = _random_set(4, [(60, 80)] * 6)
    full = pixel_metrics(masks, maps)
    sub = pixel_metrics(masks, maps, max_pixels=10_000)
    assert sub["pixel_subsampled"] is True
    assert sub == pixel_metrics(masks, maps, max_pixels=10_000)
    assert sub["pixel_auroc"] == pytest.approx(full["pixel_auroc"], abs=0.03)
    assert sub["aupro"] == full["aupro"]  # AUPRO is never subsampled


# ---------------------------------------------------------------------------------------------
# AUPRO


def brute_aupro(masks: list, maps: list, max_fpr: float = 0.3) -> float:
    """Direct definition: PRO and FPR recomputed from scratch at every distinct threshold."""
    pairs = [(np.asarray(m, bool), np.asarray(a, np.float64)) for m, a in zip(masks, maps) if m is not None]
    regions = []
    for mask, amap in pairs:
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(amap, labeled == k) for k in range(1, n + 1)]
    negatives = np.concatenate([amap[~mask] for mask, amap in pairs])
    points = [(0.0, 0.0)]
    for t in np.unique(np.concatenate([amap.ravel() for _, amap in pairs]))[::-1]:
        fpr = np.mean(negatives >= t)
        pro = np.mean([np.mean(amap[region] >= t) for amap, region in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x1 <= max_fpr:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_cut = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            area += (max_fpr - x0) * (y0 + y_cut) / 2
            break
    return area / max_fpr


def test_aupro_perfect_map() -> None:
    masks, _ = _random_set(5, [(20, 20), (30, 10), (16, 16), (25, 25)])
    assert aupro(masks, [m.astype(float) for m in masks]) == pytest.approx(1.0)


def test_aupro_constant_map() -> None:
    masks, _ = _random_set(6, [(20, 20), (30, 10)])
    # All scores tie: the curve jumps from (0, 0) to (1, 1); area of PRO=FPR up to 0.3 is 0.045.
    assert aupro(masks, [np.full(m.shape, 0.5) for m in masks]) == pytest.approx(0.15)


def test_aupro_inverted_map_is_zero() -> None:
    masks, _ = _random_set(7, [(20, 20), (30, 10)])
    assert aupro(masks, [(~m).astype(float) for m in masks]) == 0.0


def test_aupro_two_regions_hand_computed() -> None:
    mask = np.array(
        [
            [1, 0, 0, 0, 0],
            [0, 0, 0, 1, 1],
            [0, 0, 0, 0, 0],
        ],
        dtype=bool,
    )
    amap = np.full(mask.shape, 0.1)
    amap[0, 0] = 0.9  # region A (1 px)
    amap[1, 3], amap[1, 4] = 0.8, 0.2  # region B (2 px)
    amap[2, 0] = 0.85  # one of 12 negatives
    # Curve: (0,0) (0,.5) (1/12,.5) (1/12,.75) (1/12,1) (1,1) -> area to .3 = 1/24 + (.3 - 1/12).
    assert aupro([mask], [amap]) == pytest.approx((0.3 - 1 / 24) / 0.3)


def test_aupro_diagonal_pixels_form_one_region() -> None:
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    amap = np.zeros((4, 4))
    amap[0, 0] = amap[3, 3] = 1.0
    # 8-connectivity: regions {(0,0),(1,1)} half found and {(3,3)} fully found -> PRO 0.75 at
    # FPR 0 (4-connectivity would give 2/3). Curve (0,0) (0,.75) (1,1): at FPR .3, PRO = .825.
    assert aupro([mask], [amap]) == pytest.approx((0.75 + 0.825) / 2)


@st.composite
def mask_map_sets(draw: st.DrawFn) -> tuple[list, list, float]:
    """A few small images of varying size, random masks (some None), maps with or without ties."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_images = draw(st.integers(1, 4))
    density = draw(st.sampled_from([0.05, 0.2, 0.5]))
    ties = draw(st.booleans())
    masks, maps = [], []
    for i in range(n_images):
        shape = (draw(st.integers(2 if i == 0 else 1, 9)), draw(st.integers(1, 9)))
        amap = rng.integers(0, 5, shape).astype(float) if ties else rng.random(shape)
        mask = rng.random(shape) < density
        masks.append(None if i > 0 and draw(st.booleans()) else mask)
        maps.append(amap)
    # Guarantee one positive and one negative pixel in the first (never None) image.
    masks[0].flat[0], masks[0].flat[-1] = True, False
    return masks, maps, draw(st.sampled_from([0.05, 0.3, 1.0]))


@settings(max_examples=60, deadline=None)
@given(case=mask_map_sets())
def test_aupro_matches_brute_force(case: tuple[list, list, float]) -> None:
    masks, maps, max_fpr = case
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(brute_aupro(masks, maps, max_fpr), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(case=mask_map_sets())
def test_aupro_invariant_to_monotonic_transform(case: tuple[list, list, float]) -> None:
    masks, maps, max_fpr = case
    transformed = [np.exp(3 * a) - 7 for a in maps]
    assert aupro(masks, transformed, max_fpr) == pytest.approx(aupro(masks, maps, max_fpr), abs=1e-12)


def test_aupro_num_thresholds_on_grid_is_exact() -> None:
    masks, _ = _random_set(8, [(20, 20), (15, 25)])
    rng = np.random.default_rng(8)
    maps = [rng.integers(0, 10, m.shape).astype(float) for m in masks]
    maps[0][0, 0], maps[0][0, 1] = 0.0, 9.0  # grid of 10 thresholds is exactly 0..9
    assert aupro(masks, maps, num_thresholds=10) == pytest.approx(aupro(masks, maps))
    coarse = aupro(masks, maps, num_thresholds=3)
    assert 0.0 <= coarse <= 1.0


def test_aupro_float32_and_int_maps() -> None:
    masks, maps = _random_set(9, [(20, 20), (15, 25)])
    assert aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps))
    int_maps = [(a * 10).astype(np.int64) for a in maps]
    assert aupro(masks, int_maps) == pytest.approx(brute_aupro(masks, int_maps))


def test_aupro_invalid_inputs() -> None:
    masks, maps = _random_set(10, [(8, 8), (8, 8)])
    with pytest.raises(ValueError, match="max_fpr"):
        aupro(masks, maps, max_fpr=0.0)
    with pytest.raises(ValueError, match="image 0"):
        aupro(masks, [np.full((8, 8), np.nan), maps[1]])
    with pytest.raises(ValueError, match="2-D"):
        aupro([np.zeros(5, bool)], [np.zeros(5)])
    with pytest.raises(ValueError, match="at least one image"):
        aupro([None], [maps[0]])
