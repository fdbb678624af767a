"""Choose a model's operating point on labelled images (what `anomalens threshold` runs)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from anomalens.data import Dataset
from anomalens.metrics import high_recall_metrics
from anomalens.models.base import Inferencer
from anomalens.thresholds import OperatingPoint, image_digests, select_operating_point
from anomalens.thresholds.operating import point_at

#: each rule's target when none is given: miss no defect, 1 % false alarms, the goods' 0.99 quantile
DEFAULT_TARGETS = {"recall": 1.0, "fpr": 0.01, "good_quantile": 0.99}


@dataclass
class OperatingChoice:
    point: OperatingPoint  # as it does on the images it was chosen on
    labels: list[int]  # of the images it was chosen on (unreadable ones skipped), in their order
    scores: np.ndarray  # raw scores of those images
    high_recall: dict[str, Any]  # partial AUROC at high recall, FPR and accuracy at 100 % recall
    chosen_on: dict[str, Any]  # provenance stored with the point: dataset, image count and digests
    holdout: OperatingPoint | None = None  # the same threshold on the held-out images (never chosen on)
    n_holdout: int = 0

    def stored(self) -> dict[str, Any]:
        """The operating point as the model file keeps it: the point and where it was chosen."""
        return {**self.point.to_dict(), "chosen_on": self.chosen_on}


def choose_operating_point(
    model: Inferencer,
    dataset: Dataset,
    rule: str = "recall",
    target: float | None = None,
    *,
    on_error: str = "raise",
    progress: bool = False,
    holdout: float = 0.0,
    seed: int = 0,
) -> OperatingChoice:
    """Score `dataset`'s labelled (test) images and pick the threshold by `rule` (see
    `thresholds.select_operating_point`); `target` defaults to DEFAULT_TARGETS[rule].

    holdout=0.5 chooses on a seeded half (drawn per label, so both halves hold goods and defects)
    and reports the same threshold on the other half, images the choice never saw.
    """
    if not dataset.test:
        raise ValueError(f"'{dataset.root}' has no labelled (test) images")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"--holdout {holdout}: a share of the labelled images in [0, 1)")
    target = target if target is not None else DEFAULT_TARGETS.get(rule)
    prediction = model.predict(dataset.test, progress=progress, on_error=on_error, calibrated=False)
    by_key = {str(s.path): s.label for s in dataset.test}
    labels = np.array([by_key[k] for k in prediction.keys])  # unreadable files skipped with on_error='skip'
    held = _held_out(labels, holdout, seed)
    pick = ~held
    point = select_operating_point(labels[pick], prediction.scores[pick], rule, target)
    keys = [k for k, p in zip(prediction.keys, pick) if p]
    chosen_on = {"dataset": str(dataset.root), "n_images": len(keys), "image_digests": image_digests(keys)}
    high = (
        high_recall_metrics(labels[pick], prediction.scores[pick])
        if 0 < labels[pick].sum() < pick.sum()
        else {}
    )
    choice = OperatingChoice(point, labels[pick].tolist(), prediction.scores[pick], high, chosen_on)
    if held.any():
        choice.holdout = point_at(labels[held], prediction.scores[held], point.threshold, rule, point.target)
        choice.n_holdout = int(held.sum())
    return choice


def _held_out(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A seeded `share` of the images of each label, as a mask."""
    held = np.zeros(len(labels), bool)
    if share <= 0:
        return held
    rng = np.random.default_rng(seed)
    for label in (0, 1):
        idx = np.flatnonzero(labels == label)
        held[rng.choice(idx, int(round(share * len(idx))), replace=False)] = True
    return held
