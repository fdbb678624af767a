"""Image-level anomaly detection metrics (one score per image)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


def _validate(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as a bool vector and scores as a float64 vector, or raise ValueError."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, got {y.shape} and {s.shape}")
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return y.astype(bool), s


def image_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    """Image AUROC, AP and F1-max (with its threshold) for labels 0=good / 1=defective.

    A sample is predicted defective iff ``score >= image_f1_threshold``. AUROC and AP are
    None (JSON-safe) when only one class is present; F1 fields are None without defects.
    """
    y, s = _validate(labels, scores)
    n_defective = int(y.sum())
    n_good = int(y.size - n_defective)
    result: dict[str, Any] = {
        "image_auroc": None,
        "image_ap": None,
        "image_f1_max": None,
        "image_f1_threshold": None,
        "n_good": n_good,
        "n_defective": n_defective,
    }
    if n_good and n_defective:
        result["image_auroc"] = float(roc_auc_score(y, s))
        result["image_ap"] = float(average_precision_score(y, s))
    else:
        warnings.warn(
            f"only one class present (n_good={n_good}, n_defective={n_defective}); "
            "image AUROC/AP are undefined and reported as None",
            UserWarning,
            stacklevel=2,
        )
    if n_defective:
        precision, recall, thresholds = precision_recall_curve(y, s)
        # The last (precision=1, recall=0) point has no threshold, so drop it.
        precision, recall = precision[:-1], recall[:-1]
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        best = int(np.argmax(f1))
        result["image_f1_max"] = float(f1[best])
        result["image_f1_threshold"] = float(thresholds[best])
    return result


def f1_at_threshold(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, Any]:
    """Confusion counts, precision, recall and F1 when predicting defective iff score >= threshold.

    Precision/recall/F1 are 0.0 where their denominator is zero.
    """
    y, s = _validate(labels, scores)
    pred = s >= threshold
    tp = int(np.count_nonzero(pred & y))
    fp = int(np.count_nonzero(pred & ~y))
    fn = int(np.count_nonzero(~pred & y))
    tn = int(y.size - tp - fp - fn)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "tn": tn, "fn": fn}


def partial_auroc_high_recall(labels: ArrayLike, scores: ArrayLike, min_tpr: float = 0.9) -> float | None:
    """Area of the ROC curve above TPR = `min_tpr` (the high-recall range an inspection line runs
    in), divided by its maximum (1 - min_tpr): 1.0 = perfect, a random ranking gets (1 - min_tpr) / 2.

    Equals sklearn's partial AUC with max_fpr = 1 - min_tpr of the swapped problem (goods as
    positives, negated scores), before sklearn's McClish standardization. None with one class.
    """
    if not 0.0 <= min_tpr < 1.0:
        raise ValueError(f"min_tpr must be in [0, 1), got {min_tpr}")
    y, s = _validate(labels, scores)
    if y.all() or not y.any():
        return None
    fpr, tpr, _ = roc_curve(y, s)
    xs, hs = [fpr[0]], [max(tpr[0] - min_tpr, 0.0)]
    for f0, t0, f1, t1 in zip(fpr[:-1], tpr[:-1], fpr[1:], tpr[1:]):
        if (t0 - min_tpr) * (t1 - min_tpr) < 0:  # the segment crosses TPR = min_tpr: split it there
            xs.append(f0 + (min_tpr - t0) * (f1 - f0) / (t1 - t0))
            hs.append(0.0)
        xs.append(f1)
        hs.append(max(t1 - min_tpr, 0.0))
    return float(np.trapezoid(hs, xs) / (1.0 - min_tpr))


def full_recall_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, Any]:
    """The operating point that misses no defect (threshold = the lowest defect score): its FPR
    (share of goods flagged) and accuracy. None without defects."""
    y, s = _validate(labels, scores)
    if not y.any():
        return {"threshold_at_full_recall": None, "fpr_at_full_recall": None, "accuracy_at_full_recall": None}
    threshold = float(s[y].min())
    flagged = s >= threshold
    n_good = int((~y).sum())
    return {
        "threshold_at_full_recall": threshold,
        "fpr_at_full_recall": float((flagged & ~y).sum() / n_good) if n_good else 0.0,
        "accuracy_at_full_recall": float((flagged == y).mean()),
    }


def high_recall_metrics(labels: ArrayLike, scores: ArrayLike, min_tpr: float = 0.9) -> dict[str, Any]:
    """Metrics for lines that must not miss defects: partial AUROC over TPR in [min_tpr, 1], and
    FPR, accuracy and threshold at 100 % recall."""
    return {
        "image_pauroc_high_recall": partial_auroc_high_recall(labels, scores, min_tpr),
        "pauroc_min_tpr": min_tpr,
        **full_recall_metrics(labels, scores),
    }
