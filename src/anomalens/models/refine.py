"""A supervised stage on top of any detector (`anomalens refine`): per-image features read off the
detector's score and map -> a classifier trained on a few labelled images -> the refined score, the
probability that the image is defective.

The classifier is fitted with scikit-learn and stored as plain arrays (logistic regression: scaler
and coefficients; Extra-Trees: every tree's node arrays), evaluated here in numpy: a model file
stays safetensors + JSON, and loading it runs no code (a pickled estimator would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from anomalens.thresholds import Calibration

#: what the classifier sees of one image, all in calibrated units (0 = goods' median, 1 = threshold)
FEATURES = (
    "score",
    "map_peak",
    "map_mean",
    "map_std",
    "map_p99",
    "area_share",
    "region_count",
    "largest_region_share",
)
CLASSIFIERS = ("extra_trees", "logistic")
_LEAF = -1  # scikit-learn's TREE_LEAF


def image_features(score: float, anomaly_map: np.ndarray, calibration: Calibration) -> np.ndarray:
    """The FEATURES of one image from its raw score and raw map at its own size, in the units of
    the base detector's `calibration`."""
    m = calibration.normalize_map(np.asarray(anomaly_map, dtype=np.float32))
    above = m >= 1.0
    labeled, count = ndimage.label(above, structure=np.ones((3, 3), bool))
    largest = np.bincount(labeled.ravel())[1:].max() / m.size if count else 0.0
    flat = m.ravel()
    p99 = np.partition(flat, int(0.99 * (flat.size - 1)))[int(0.99 * (flat.size - 1))]
    return np.array(
        [
            float(calibration.normalize(score)),
            flat.max(),
            flat.mean(),
            flat.std(),
            p99,
            above.mean(),
            count,
            largest,
        ],
        dtype=np.float64,
    )


def fit_classifier(
    x: np.ndarray, y: np.ndarray, kind: str = "extra_trees", seed: int = 0
) -> dict[str, np.ndarray]:
    """Fit `kind` on features `x` (N, F) and labels `y` (1 = defect); its arrays for `probability`."""
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(x)
        model = LogisticRegression(class_weight="balanced", max_iter=1000).fit(scaler.transform(x), y)
        return {
            "mean": scaler.mean_,
            "scale": scaler.scale_,
            "coef": model.coef_[0].astype(np.float64),
            "intercept": model.intercept_.astype(np.float64),
        }
    if kind == "extra_trees":
        from sklearn.ensemble import ExtraTreesClassifier

        forest = ExtraTreesClassifier(n_estimators=100, class_weight="balanced", random_state=seed).fit(x, y)
        return _pack_trees(forest)
    raise ValueError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}")


def _pack_trees(forest) -> dict[str, np.ndarray]:
    """All trees' node arrays end to end, child indices made global; `p_defect` per node."""
    left, right, feature, threshold, p_defect, roots = [], [], [], [], [], []
    offset = 0
    defect_column = list(forest.classes_).index(1)
    for tree in (e.tree_ for e in forest.estimators_):
        roots.append(offset)
        lt, rt = tree.children_left.astype(np.int64), tree.children_right.astype(np.int64)
        left.append(np.where(lt == _LEAF, _LEAF, lt + offset))
        right.append(np.where(rt == _LEAF, _LEAF, rt + offset))
        feature.append(np.maximum(tree.feature, 0).astype(np.int64))
        threshold.append(tree.threshold.astype(np.float64))
        value = tree.value[:, 0, :]
        p_defect.append(value[:, defect_column] / value.sum(axis=1))
        offset += tree.node_count
    return {
        "left": np.concatenate(left),
        "right": np.concatenate(right),
        "feature": np.concatenate(feature),
        "threshold": np.concatenate(threshold),
        "p_defect": np.concatenate(p_defect),
        "roots": np.asarray(roots, dtype=np.int64),
    }


def probability(kind: str, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """P(defect) for features `x` (N, F), as the fitted scikit-learn estimator's predict_proba."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if kind == "logistic":
        z = ((x - arrays["mean"]) / arrays["scale"]) @ arrays["coef"] + arrays["intercept"][0]
        return 1.0 / (1.0 + np.exp(-z))
    # scikit-learn's trees compare float32 features with float64 thresholds
    xf = x.astype(np.float32).astype(np.float64)
    node = np.repeat(arrays["roots"][None, :], len(xf), axis=0)
    rows = np.arange(len(xf))[:, None]
    while True:
        inner = arrays["left"][node] != _LEAF
        if not inner.any():
            break
        go_left = xf[rows, arrays["feature"][node]] <= arrays["threshold"][node]
        step = np.where(go_left, arrays["left"][node], arrays["right"][node])
        node = np.where(inner, step, node)
    return arrays["p_defect"][node].mean(axis=1)


@dataclass
class Refiner:
    """The fitted supervised stage a refined model carries: features, classifier, provenance."""

    kind: str
    # the base detector's calibration: the features' units (the refined model's own is in probabilities)
    calibration: Calibration
    arrays: dict[str, np.ndarray]
    info: dict[str, Any] = field(default_factory=dict)  # labels' source, counts, digests, CV report

    def score(self, raw_score: float, anomaly_map: np.ndarray) -> float:
        return float(
            probability(self.kind, self.arrays, image_features(raw_score, anomaly_map, self.calibration))[0]
        )

    @property
    def trained_on(self) -> set[str]:
        """Digests (`thresholds.image_digests`) of the labelled images the classifier was fitted on."""
        return set(self.info.get("image_digests", []))

    def to_arrays_and_meta(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        meta = {
            "kind": self.kind,
            "features": list(FEATURES),
            "calibration": self.calibration.to_dict(),
            "info": self.info,
        }
        return dict(self.arrays), meta

    @classmethod
    def from_arrays_and_meta(cls, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Refiner:
        if meta.get("features") != list(FEATURES) or meta.get("kind") not in CLASSIFIERS:
            raise ValueError("the refine stage was written by another anomalens version")
        return cls(meta["kind"], Calibration.from_dict(meta["calibration"]), arrays, meta.get("info", {}))
