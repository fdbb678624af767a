"""Score a dataset's test split and compute every metric, overall and per defect type."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from anomalens.data import Dataset, Sample, read_mask
from anomalens.data.drift import DriftProfile
from anomalens.metrics import aupimo, f1_at_threshold, high_recall_metrics, image_metrics, pixel_metrics
from anomalens.metrics.pixel import pixel_f1_at_threshold
from anomalens.models.base import Detector, Prediction, resize_map, resize_mask
from anomalens.thresholds import image_digests, threshold_source

#: the guard's bounds: an image score near chance while the map localizes well
SCORE_GUARD_IMAGE_AUROC = 0.6
SCORE_GUARD_PIXEL_AUROC = 0.85


def score_guard(metrics: dict[str, Any], map_max_setting: str | None) -> str | None:
    """A warning when the image score does not follow the map (image AUROC below 0.6 while the
    pixel AUROC is above 0.85), naming the setting that scores by the map where the method has one."""
    image, pixel = metrics.get("image_auroc"), metrics.get("pixel_auroc")
    if image is None or pixel is None:
        return None
    if image >= SCORE_GUARD_IMAGE_AUROC or pixel <= SCORE_GUARD_PIXEL_AUROC:
        return None
    where = (
        f"image AUROC {image:.3f} < {SCORE_GUARD_IMAGE_AUROC} "
        f"while pixel AUROC {pixel:.3f} > {SCORE_GUARD_PIXEL_AUROC}"
    )
    tip = f": try --set {map_max_setting}" if map_max_setting else ""
    return f"the image score does not follow the map ({where}){tip}"


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    samples: list[Sample]
    prediction: Prediction
    masks: list[np.ndarray | None]


def _masks(samples: list[Sample], prediction: Prediction) -> list[np.ndarray | None]:
    """Ground truth per scored image: all-False for goods, None where a defect has no mask."""
    out = []
    for s, amap in zip(samples, prediction.maps):
        if s.label == 0:
            out.append(np.zeros(amap.shape, dtype=bool))
        elif s.mask_path is None:
            out.append(None)
        else:
            out.append(read_mask(s.mask_path, shape=amap.shape))
    return out


def _at_size(
    prediction: Prediction, masks: list[np.ndarray | None], size: tuple[int, int]
) -> tuple[Prediction, list[np.ndarray | None]]:
    """The prediction's maps and the masks brought to one size for pixel metrics."""
    maps = [resize_map(m, size) for m in prediction.maps]
    masks = [None if m is None else resize_mask(m, size) for m in masks]
    return replace(prediction, maps=maps), masks


def compute_metrics(
    samples: list[Sample], prediction: Prediction, masks: list[np.ndarray | None], with_pixels: bool = True
) -> dict[str, Any]:
    """Image metrics, pixel metrics where there is ground truth, and the calibrated operating point."""
    labels = np.array([s.label for s in samples])
    result: dict[str, Any] = {
        **image_metrics(labels, prediction.scores),
        **high_recall_metrics(labels, prediction.scores),
    }
    if with_pixels and any(m is not None and m.any() for m in masks):
        result.update(pixel_metrics(masks, prediction.maps))
        # per-image overlap at 1e-5..1e-4 false positives on goods (Bertoldo et al. 2024); needs goods
        pimo = aupimo(masks, prediction.maps, labels) if (labels == 0).any() else None
        result["aupimo"] = None if pimo is None else pimo["aupimo_mean"]
        result["aupimo_detail"] = pimo
    else:
        result.update(pixel_auroc=None, pixel_ap=None, aupro=None, aupimo=None, aupimo_detail=None)
    if prediction.calibration is not None:
        at = f1_at_threshold(labels, prediction.scores, prediction.calibration.threshold)
        result["at_threshold"] = {"threshold": prediction.calibration.threshold, **at}
        if result["pixel_auroc"] is not None:  # pixel F1 at the calibrated pixel threshold tau
            result["at_threshold"].update(
                pixel_f1_at_threshold(masks, prediction.maps, prediction.calibration.pixel_threshold)
            )
    return result


def evaluate(
    detector: Detector,
    dataset: Dataset,
    *,
    progress: bool = False,
    on_error: str = "raise",
    per_type: bool = True,
    pixel_size: int | None = None,
) -> Evaluation:
    """Score `dataset`'s test split and compute every metric, overall and per defect type.

    Pixel metrics compare maps and masks at each image's own resolution; `pixel_size=S` compares
    them at S x S instead (maps resized bilinearly, masks by nearest neighbour), the protocol of
    libraries that evaluate at the model's input size (anomalib), for side-by-side numbers.
    """
    if not dataset.test:
        raise ValueError(f"dataset '{dataset.name}' has no test images to evaluate on")
    # labelled images the model or its refine stage learnt from never count: it has seen their answers
    trained_on = detector.trained_on
    kept = [
        s
        for s, d in zip(dataset.test, image_digests(str(s.path) for s in dataset.test))
        if d not in trained_on
    ]
    n_trained_on = len(dataset.test) - len(kept)
    if not kept:
        raise ValueError(
            f"every test image of '{dataset.name}' was a labelled image the model learnt from: nothing to evaluate"
        )
    dataset = replace(dataset, test=kept)
    start = time.perf_counter()
    prediction = detector.predict(dataset.test, progress=progress, on_error=on_error)
    seconds = time.perf_counter() - start
    by_key = {str(s.path): s for s in dataset.test}
    samples = [by_key[k] for k in prediction.keys]
    masks = _masks(samples, prediction)
    if pixel_size:
        prediction, masks = _at_size(prediction, masks, (pixel_size, pixel_size))
    metrics = compute_metrics(samples, prediction, masks, with_pixels=detector.localizes)
    metrics["pixel_protocol"] = (
        f"{pixel_size}x{pixel_size} (maps bilinear, masks nearest)"
        if pixel_size
        else "each image's own resolution"
    )
    metrics.update(
        dataset=dataset.name,
        model=detector.name,
        n_images=len(samples),
        n_skipped=len(prediction.skipped),
        n_left_out_trained_on=n_trained_on,
        predict_seconds=round(seconds, 3),
        images_per_second=round(len(samples) / seconds, 2) if seconds > 0 else None,
    )
    metrics["score_warning"] = score_guard(metrics, _map_max_setting(detector))
    metrics["threshold_source"] = threshold_source(
        detector.calibration, detector.operating_point, prediction.keys
    )
    if detector.drift_profile is not None:
        metrics["drift"] = drift_summary(detector.drift_profile, samples, prediction)
    if per_type:
        metrics["per_defect_type"] = {}
        goods = [i for i, s in enumerate(samples) if s.label == 0]
        for dtype in sorted({s.defect_type for s in samples if s.label == 1}):
            idx = goods + [i for i, s in enumerate(samples) if s.defect_type == dtype and s.label == 1]
            sub = Prediction(
                [prediction.keys[i] for i in idx],
                prediction.scores[idx],
                [prediction.maps[i] for i in idx],
                prediction.calibration,
            )
            m = compute_metrics(
                [samples[i] for i in idx], sub, [masks[i] for i in idx], with_pixels=detector.localizes
            )
            metrics["per_defect_type"][dtype] = {
                k: m[k] for k in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupimo")
            } | {"n": len(idx) - len(goods)}
    return Evaluation(metrics, samples, prediction, masks)


def _map_max_setting(detector: Detector) -> str | None:
    """The detector's map-max setting, None when it is in force already (or there is none)."""
    setting = getattr(detector, "map_max_setting", None)
    if setting is None:
        return None
    key, _, value = setting.partition("=")
    return None if str(getattr(detector, "options", {}).get(key)) == value else setting


def drift_summary(profile: DriftProfile, samples: list[Sample], prediction: Prediction) -> dict[str, Any]:
    """Images outside the training goods' range (each image alone), by statistic, and the test
    goods' statistics compared as a batch with the training goods' (a new condition whose images
    each stay inside the old range shows only as a batch)."""
    flagged = [i for i, flags in enumerate(prediction.drift) if flags]
    by_statistic: dict[str, int] = {}
    for i in flagged:
        for flag in prediction.drift[i]:
            by_statistic[flag.statistic] = by_statistic.get(flag.statistic, 0) + 1
    goods = [stats for stats, s in zip(prediction.stats, samples) if s.label == 0]
    n_goods = sum(s.label == 0 for s in samples)
    return {
        "n_images_flagged": len(flagged),
        "n_goods_flagged": sum(samples[i].label == 0 for i in flagged),
        "n_goods": n_goods,
        "by_statistic": dict(sorted(by_statistic.items(), key=lambda kv: -kv[1])),
        "examples": [
            f"{samples[i].path.parent.name}/{samples[i].path.name}: {prediction.drift[i][0].message}"
            for i in flagged[:5]
        ],
        "goods_batch_shift": [shift.message for shift in profile.compare_batch(goods)],
    }


def gallery_indices(evaluation: Evaluation, n: int) -> dict[str, list[int]]:
    """Which scored images a report shows, `n` of each: the highest-scoring goods (false alarms first),
    the lowest-scoring defects (misses first) and the flagged defects not already among those."""
    labels = np.array([s.label for s in evaluation.samples], dtype=int)
    flagged = evaluation.prediction.is_anomalous
    ranking = evaluation.prediction.normalized_scores
    if ranking is None:
        ranking = np.asarray(evaluation.prediction.scores, dtype=np.float64)
    down = [int(i) for i in np.argsort(-ranking, kind="stable")]
    goods = [i for i in down if labels[i] == 0][:n]
    defects_low = [int(i) for i in np.argsort(ranking, kind="stable") if labels[i] == 1][:n]
    caught = [i for i in down if labels[i] == 1 and (flagged is None or flagged[i])]
    caught = [i for i in caught if i not in set(defects_low)][:n] or caught[:n]
    return {"goods": goods, "defects_low": defects_low, "caught": caught}


def evaluate_products(
    detector: Detector,
    datasets: dict[str, Dataset],
    *,
    progress: bool = False,
    on_error: str = "raise",
    pixel_size: int | None = None,
) -> tuple[dict[str, Any], dict[str, Evaluation]]:
    """A multi-product model on each product's test split: every metric per product and over all
    products together (its scores share one scale: each product's calibration puts its threshold at
    1), and, for a model with a router, where each test image was routed (accuracy, unmatched goods)."""
    per: dict[str, Evaluation] = {
        name: evaluate(detector, data, progress=progress, on_error=on_error, pixel_size=pixel_size)
        for name, data in datasets.items()
    }
    evals = list(per.values())
    samples = [s for e in evals for s in e.samples]
    prediction = Prediction(
        keys=[k for e in evals for k in e.prediction.keys],
        scores=np.concatenate([e.prediction.scores for e in evals]),
        maps=[m for e in evals for m in e.prediction.maps],
        calibration=evals[0].prediction.calibration,
    )
    overall = compute_metrics(samples, prediction, [m for e in evals for m in e.masks], detector.localizes)
    overall.pop("aupimo_detail", None)
    metrics: dict[str, Any] = {
        "model": detector.name,
        "products": {name: e.metrics for name, e in per.items()},
        "overall": overall | {"n_images": len(samples)},
    }
    if hasattr(detector, "route"):
        metrics["routing"] = routing_summary(detector, {n: e.samples for n, e in per.items()})
    return metrics, per


def routing_summary(detector, samples: dict[str, list[Sample]]) -> dict[str, Any]:
    """Where a multi-product model routes each product's test images: the share sent to their own
    product (all images, and the goods alone) and the goods that match no product."""
    rows = {name: (s, detector.route(s)) for name, s in samples.items()}
    out: dict[str, Any] = {"per_product": {}}
    hits = goods = good_hits = unmatched_goods = 0
    for name, (ss, routes) in rows.items():
        ok = [r.product == name for r in routes]
        good = [s.label == 0 for s in ss]
        miss = sum(g and not r.matched for g, r in zip(good, routes))
        out["per_product"][name] = {
            "accuracy": float(np.mean(ok)),
            "routed_to": {
                p: sum(r.product == p for r in routes) for p in sorted({r.product for r in routes})
            },
            "goods_matching_no_product": miss,
            "defects_matching_no_product": sum(not g and not r.matched for g, r in zip(good, routes)),
        }
        hits += sum(ok)
        goods += sum(good)
        good_hits += sum(o and g for o, g in zip(ok, good))
        unmatched_goods += miss
    n = sum(len(ss) for ss, _ in rows.values())
    out.update(
        accuracy=hits / n,
        goods_accuracy=good_hits / goods if goods else None,
        goods_matching_no_product=unmatched_goods,
        n_images=n,
    )
    return out
