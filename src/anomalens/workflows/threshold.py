"""Choose a model's operating point on labelled images (what `anomalens threshold` runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from anomalens.data import Dataset
from anomalens.metrics import high_recall_metrics
from anomalens.models.base import Inferencer
from anomalens.thresholds import OperatingPoint, select_operating_point

#: each rule's target when none is given: miss no defect, 1 % false alarms, the goods' 0.99 quantile
DEFAULT_TARGETS = {"recall": 1.0, "fpr": 0.01, "good_quantile": 0.99}


@dataclass
class OperatingChoice:
    point: OperatingPoint
    labels: list[int]  # of the images scored (unreadable ones skipped), in their order
    scores: np.ndarray  # raw scores of those images
    high_recall: dict[str, Any]  # partial AUROC at high recall, FPR and accuracy at 100 % recall


def choose_operating_point(
    model: Inferencer,
    dataset: Dataset,
    rule: str = "recall",
    target: float | None = None,
    *,
    on_error: str = "raise",
    progress: bool = False,
) -> OperatingChoice:
    """Score `dataset`'s labelled (test) images and pick the threshold by `rule` (see
    `thresholds.select_operating_point`); `target` defaults to DEFAULT_TARGETS[rule]."""
    if not dataset.test:
        raise ValueError(f"'{dataset.root}' has no labelled (test) images")
    target = target if target is not None else DEFAULT_TARGETS.get(rule)
    prediction = model.predict(dataset.test, progress=progress, on_error=on_error, calibrated=False)
    scored = set(prediction.keys)  # minus unreadable files skipped with on_error='skip'
    labels = [s.label for s in dataset.test if str(s.path) in scored]
    point = select_operating_point(labels, prediction.scores, rule, target)
    high = high_recall_metrics(labels, prediction.scores) if 0 < sum(labels) < len(labels) else {}
    return OperatingChoice(point, labels, prediction.scores, high)
