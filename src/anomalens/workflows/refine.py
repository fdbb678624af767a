"""`anomalens refine`: a supervised stage trained on a few labelled images on top of any detector,
with its operating point at full recall chosen and its gain measured by cross-validation, never on
the images a classifier trained on."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from anomalens.data import Sample
from anomalens.data.labels import load_labelled
from anomalens.models.base import Detector
from anomalens.models.refine import Refiner, fit_classifier, image_features, probability
from anomalens.store import ResultStore, utc_now
from anomalens.thresholds import Calibration, image_digests
from anomalens.thresholds.operating import point_at

#: at most this many folds; fewer when a class has fewer labelled images
MAX_FOLDS = 5


@dataclass
class RefineReport:
    """Recall and false-alarm rate of the base detector and of the refined one on the same labelled
    images, each decided by a full-recall threshold chosen on the other folds."""

    n_good: int
    n_defect: int
    folds: int
    before: dict[str, float]
    after: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_good": self.n_good,
            "n_defect": self.n_defect,
            "folds": self.folds,
            "before": self.before,
            "after": self.after,
        }


def labels_from_store(store_path: str | Path) -> list[Sample]:
    """The images an inspector labelled on the review page (newest label per path)."""
    with ResultStore(store_path) as store:
        records = store.results(labelled=True)
    newest: dict[str, Sample] = {}
    for r in sorted(records, key=lambda r: r.labelled_at or ""):
        if Path(r.path).is_file():
            label = 1 if r.label == "defect" else 0
            newest[r.path] = Sample(Path(r.path), label, "defect" if label else "good")
    return list(newest.values())


def read_labels(source: str | Path) -> list[Sample]:
    """`--labels SOURCE`: a result store (.db / .sqlite), a CSV or a labelled folder."""
    if Path(source).suffix.lower() in (".db", ".sqlite", ".sqlite3"):
        return labels_from_store(source)
    return load_labelled(source)


def _full_recall_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """The highest threshold that still flags every defect of these scores."""
    return float(scores[y].min())


def _summary(caught: int, false_alarms: int, n_defect: int, n_good: int) -> dict[str, float]:
    n = n_defect + n_good
    return {
        "recall": caught / n_defect,
        "false_alarm_rate": false_alarms / n_good,
        "zfn_accuracy": (caught + n_good - false_alarms) / n,  # accuracy at the full-recall threshold
    }


def _folds(y: np.ndarray, seed: int) -> StratifiedKFold:
    n_splits = min(MAX_FOLDS, int(y.sum()), int((~y).sum()))
    if n_splits < 2:
        raise ValueError(
            f"refine needs at least 2 labelled defects and 2 labelled goods, got {int(y.sum())} and {int((~y).sum())}"
        )
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def _oof_probability(x: np.ndarray, y: np.ndarray, kind: str, seed: int) -> np.ndarray:
    """Each image's defect probability from a classifier that never saw it."""
    out = np.empty(len(y))
    for train, test in _folds(y, seed).split(x, y):
        out[test] = probability(kind, fit_classifier(x[train], y[train], kind, seed), x[test])
    return out


def refine(
    detector: Detector,
    labelled: list[Sample],
    *,
    classifier: str = "extra_trees",
    seed: int = 0,
    source: str = "",
    progress: bool = False,
) -> tuple[Detector, RefineReport]:
    """A copy of `detector` whose image score is a classifier's defect probability, trained on
    `labelled`, deciding at the full-recall threshold chosen out of fold; and the cross-validated
    report of recall and false alarms before and after (both thresholds chosen on other folds)."""
    if detector.calibration is None:
        raise ValueError(f"{detector.name} is not calibrated: refine a fitted model")
    base = copy.copy(detector)
    base.refiner = None  # refining a refined model starts again from its detector
    prediction = base.predict(labelled, progress=progress, calibrated=False)
    by_key = {str(s.path): s for s in labelled}
    y = np.array([by_key[k].label == 1 for k in prediction.keys])
    x = np.stack([image_features(s, m, base.calibration) for s, m in zip(prediction.scores, prediction.maps)])
    raw = np.asarray(prediction.scores, dtype=np.float64)

    # outer folds: a threshold chosen on the training folds, applied to the held-out fold
    before = [0, 0]
    after = [0, 0]
    splitter = _folds(y, seed)
    for train, test in splitter.split(x, y):
        t_before = _full_recall_threshold(raw[train], y[train])
        point = point_at(y[test], raw[test], t_before, "recall", 1.0)
        before = [before[0] + point.tp, before[1] + point.fp]
        inner = _oof_probability(x[train], y[train], classifier, seed)
        t_after = _full_recall_threshold(inner, y[train])
        p_test = probability(classifier, fit_classifier(x[train], y[train], classifier, seed), x[test])
        point = point_at(y[test], p_test, t_after, "recall", 1.0)
        after = [after[0] + point.tp, after[1] + point.fp]
    n_defect, n_good = int(y.sum()), int((~y).sum())
    report = RefineReport(
        n_good,
        n_defect,
        splitter.get_n_splits(),
        _summary(*before, n_defect, n_good),
        _summary(*after, n_defect, n_good),
    )

    # the stage kept: fitted on every label, deciding at the full-recall threshold of its out-of-fold scores
    oof = _oof_probability(x, y, classifier, seed)
    threshold = _full_recall_threshold(oof, y)
    digests = image_digests(prediction.keys)
    refined = copy.copy(base)
    refined.refiner = Refiner(
        classifier,
        base.calibration,
        fit_classifier(x, y, classifier, seed),
        {
            "source": source,
            "refined_at": utc_now(),
            "n_good": n_good,
            "n_defect": n_defect,
            "image_digests": digests,
            "report": report.to_dict(),
        },
    )
    refined.calibration = Calibration(
        threshold=threshold,
        center=float(np.median(oof[~y])),
        pixel_threshold=base.calibration.pixel_threshold,
        pixel_center=base.calibration.pixel_center,
        quantile=1.0,
        n_images=len(y),
    )
    point = point_at(y, oof, threshold, "recall", 1.0)
    refined.operating_point = {
        **point.to_dict(),
        "chosen_on": {"dataset": source or "labelled images", "n_images": len(y), "image_digests": digests},
        "cross_validated": True,
    }
    return refined, report
