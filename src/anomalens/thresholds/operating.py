"""Operating points: pick the decision threshold from labelled data by a stated rule.

The calibrated threshold (a quantile of held-out goods) needs no defects. With labelled
images a line can instead choose what it trades: zero missed defects (target recall 1.0),
a false-alarm budget (target FPR), the best F1, or a quantile of the goods' scores. An
image is flagged when its raw score >= the threshold, as everywhere in anomalens.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from anomalens.metrics.image import _validate
from anomalens.thresholds.calibrate import Calibration

RULES = ("recall", "fpr", "f1", "good_quantile")


@dataclass(frozen=True)
class ThresholdCurve:
    """Confusion counts at every candidate threshold (each distinct score), highest threshold first."""

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_defective: int
    n_good: int

    @property
    def recall(self) -> np.ndarray:
        return self.tp / self.n_defective if self.n_defective else np.zeros_like(self.thresholds)

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / self.n_good if self.n_good else np.zeros_like(self.thresholds)

    @property
    def precision(self) -> np.ndarray:
        flagged = self.tp + self.fp
        return np.divide(self.tp, flagged, out=np.zeros(len(flagged)), where=flagged > 0)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        return np.divide(2 * p * r, p + r, out=np.zeros(len(p)), where=(p + r) > 0)

    def rows(self) -> list[dict[str, float]]:
        """One dict per threshold (for CSV/JSON): threshold, recall, fpr, precision, f1, good_pass_rate."""
        return [
            {
                "threshold": float(t),
                "recall": float(r),
                "fpr": float(f),
                "precision": float(p),
                "f1": float(f1),
                "good_pass_rate": float(1 - f),
            }
            for t, r, f, p, f1 in zip(self.thresholds, self.recall, self.fpr, self.precision, self.f1)
        ]


def threshold_curve(labels: ArrayLike, scores: ArrayLike) -> ThresholdCurve:
    """Counts of flagged defects (tp) and flagged goods (fp) for `score >= t` at each distinct score t."""
    y, s = _validate(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # the last index of each run of equal scores: every image at that score is flagged with it
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last]
    fp = np.cumsum(~y_sorted)[last]
    return ThresholdCurve(
        s_sorted[last], tp.astype(np.int64), fp.astype(np.int64), int(y.sum()), int((~y).sum())
    )


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen threshold and what it does on the labelled data it was chosen on."""

    rule: str
    target: float | None
    threshold: float
    recall: float
    fpr: float
    precision: float
    f1: float
    good_pass_rate: float  # fraction of goods that pass (1 - FPR)
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        return cls(**d)


def select_operating_point(
    labels: ArrayLike, scores: ArrayLike, rule: str = "recall", target: float | None = None
) -> OperatingPoint:
    """Choose a threshold by `rule`:

    * ``recall``: the highest threshold whose recall >= target (1.0 = no missed defect), so the
      fewest false alarms that still catch that share of defects;
    * ``fpr``: the lowest threshold whose false-positive rate <= target, so the most defects
      caught within that false-alarm budget;
    * ``f1``: the threshold of maximum F1 (ties: the highest threshold);
    * ``good_quantile``: the target quantile of the goods' scores (linear interpolation; needs no
      defects, like calibration).
    """
    if rule not in RULES:
        raise ValueError(f"operating point rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule != "f1":
        if target is None:
            raise ValueError(f"rule {rule!r} needs a target (e.g. --target 1.0 for recall)")
        if not 0.0 <= target <= 1.0:
            raise ValueError(f"target for rule {rule!r} must be in [0, 1], got {target}")
    y, s = _validate(labels, scores)
    curve = threshold_curve(y, s)
    if rule == "good_quantile":
        if not curve.n_good:
            raise ValueError("rule 'good_quantile' needs good images in the labelled data")
        threshold = float(np.quantile(s[~y], target))
    else:
        if not curve.n_defective:
            raise ValueError(f"rule {rule!r} needs defective images in the labelled data")
        if rule == "recall":
            # recall only grows as the threshold falls: the first index reaching the target
            i = int(np.argmax(curve.recall >= target - 1e-12))
        elif rule == "fpr":
            ok = np.nonzero(curve.fpr <= target + 1e-12)[0]
            if not ok.size:  # even the highest threshold flags too many goods
                raise ValueError(
                    f"no threshold keeps the false-positive rate <= {target}: the top-scoring "
                    "image is a good one; use a larger target"
                )
            i = int(ok[-1])
        else:
            i = int(np.argmax(curve.f1))
        threshold = float(curve.thresholds[i])
    return point_at(y, s, threshold, rule, None if rule == "f1" else target)


def point_at(
    y: np.ndarray, s: np.ndarray, threshold: float, rule: str, target: float | None
) -> OperatingPoint:
    """What `threshold` does on labels `y` and scores `s` (flagged: score >= threshold)."""
    flagged = s >= threshold
    tp, fp = int((flagged & y).sum()), int((flagged & ~y).sum())
    fn, tn = int(y.sum()) - tp, int((~y).sum()) - fp
    recall = tp / (tp + fn) if tp + fn else 0.0
    fpr = fp / (fp + tn) if fp + tn else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return OperatingPoint(
        rule, target, threshold, recall, fpr, precision, f1, 1.0 - fpr if fp + tn else 1.0, tp, fp, tn, fn
    )


def apply_operating_point(calibration: Calibration, threshold: float) -> Calibration:
    """The calibration with its image threshold moved to `threshold`, so normalized score 1.0 is
    the operating point; a threshold at or below the goods' median keeps the calibration's spread."""
    if threshold > calibration.center:
        return replace(calibration, threshold=float(threshold))
    spread = calibration.threshold - calibration.center if calibration.threshold > calibration.center else 1.0
    return replace(calibration, threshold=float(threshold), center=float(threshold) - spread)


def check_operating_point(operating_point: Any) -> None:
    """ValueError unless a stored operating point (from a file) is None or an object with a finite
    threshold: a NaN threshold would flag or pass every image."""
    if operating_point is None:
        return
    if not isinstance(operating_point, dict):
        raise ValueError(f"operating_point must be an object, got {type(operating_point).__name__}")
    value = operating_point.get("threshold")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"operating_point threshold={value!r} is not a finite number")


def decision_calibration(calibration: Calibration | None, operating_point: dict | None) -> Calibration | None:
    """The calibration that decides for a model: its own, or with the threshold moved to the model's
    stored operating point (`anomalens threshold`)."""
    if calibration is None or not operating_point:
        return calibration
    return apply_operating_point(calibration, operating_point["threshold"])


def image_digests(keys: Iterable[str]) -> list[str]:
    """Short digests of image paths (absolute), to tell later whether a threshold was chosen on the
    images being evaluated without storing the paths themselves."""
    return [hashlib.sha1(os.path.abspath(str(k)).encode()).hexdigest()[:12] for k in keys]


def threshold_source(
    calibration: Calibration | None, operating_point: dict | None, evaluated_keys: Iterable[str] | None = None
) -> dict | None:
    """Where the deciding threshold came from, in words and numbers, for evaluate, its JSON and report.

    With `evaluated_keys`, an operating point chosen on some of those very images says so: its
    numbers there are optimistic (the threshold saw the answers).
    """
    if calibration is None:
        return None
    if not operating_point:
        return {
            "kind": "goods_quantile",
            "quantile": calibration.quantile,
            "n_images": calibration.n_images,
            "text": f"the {calibration.quantile:g} quantile of {calibration.n_images} held-out training goods "
            "(no defect and no test image used)",
        }
    chosen = operating_point.get("chosen_on") or {}
    target = operating_point.get("target")
    source = {
        "kind": "operating_point",
        "rule": operating_point.get("rule"),
        "target": target,
        "dataset": chosen.get("dataset"),
        "n_images": chosen.get("n_images"),
        "text": f"operating point ({operating_point.get('rule')}{'' if target is None else f' {target:g}'}) "
        f"chosen on {chosen.get('n_images', '?')} labelled images of {chosen.get('dataset', 'unknown data')}",
    }
    if evaluated_keys is not None and chosen.get("image_digests"):
        seen = set(chosen["image_digests"])
        overlap = sum(d in seen for d in image_digests(evaluated_keys))
        source["n_evaluated_images_chosen_on"] = overlap
        if overlap:
            source["warning"] = f"chosen on {overlap} of these images: optimistic"
    return source
