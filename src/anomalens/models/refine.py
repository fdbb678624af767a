"""A supervised stage on top of any detector (`anomalens refine`): per-image features read off the
detector's score and map -> a classifier trained on a few labelled images -> the refined score, the
probability that the image is defective.

The classifier is fitted with scikit-learn and stored as plain arrays (logistic regression: scaler
and coefficients; Extra-Trees, AdaBoost and histogram gradient boosting: every tree's node arrays),
evaluated here in numpy (`probability`) or in torch (`ClassifierModule`, for a detector's ONNX
graph): a model file stays safetensors + JSON, and loading it runs no code (a pickled estimator would).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn

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
CLASSIFIERS = ("extra_trees", "logistic", "adaboost", "hist_gradient_boosting")
#: tree kinds whose probability is the sigmoid of summed leaf margins (`value`, `bias`); Extra-Trees
#: average leaf probabilities (`p_defect`)
_BOOSTED = ("adaboost", "hist_gradient_boosting")
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
    """Fit `kind` on features `x` (N, F) and labels `y` (1 = defect); its arrays for `probability`.
    Every kind weighs the two classes equally (a few defects among many goods)."""
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
        defect_column = list(forest.classes_).index(1)
        trees = [e.tree_ for e in forest.estimators_]
        leaf = [t.value[:, 0, defect_column] / t.value[:, 0, :].sum(axis=1) for t in trees]
        return {**_pack_trees(trees, leaf), "p_defect": np.concatenate(leaf)}
    if kind == "adaboost":
        from sklearn.ensemble import AdaBoostClassifier
        from sklearn.utils.class_weight import compute_sample_weight

        model = AdaBoostClassifier(n_estimators=100, random_state=seed).fit(
            x, y, sample_weight=compute_sample_weight("balanced", y)
        )
        # SAMME with two classes: P(defect) = sigmoid(sum_t +-2 w_t / sum(w)), + where tree t says defect
        total = model.estimator_weights_.sum()
        trees = [e.tree_ for e in model.estimators_]
        leaf = [
            np.where(e.classes_[t.value[:, 0, :].argmax(axis=1)] == 1, 2.0, -2.0) * w / total
            for e, t, w in zip(model.estimators_, trees, model.estimator_weights_)
        ]
        return {**_pack_trees(trees, leaf), "value": np.concatenate(leaf), "bias": np.zeros(1)}
    if kind == "hist_gradient_boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        # scikit-learn's default leaf of 20 samples never splits a few dozen labels: scale it down
        leaf_size = int(np.clip(len(y) // 10, 2, 20))
        model = HistGradientBoostingClassifier(
            class_weight="balanced", min_samples_leaf=leaf_size, random_state=seed
        ).fit(x, y)
        if list(model.classes_) != [0, 1]:
            raise ValueError("hist_gradient_boosting needs labels 0 (good) and 1 (defect)")
        nodes = [p.nodes for (p,) in model._predictors]  # binary: one tree per iteration
        trees = [_HistTree(n) for n in nodes]
        leaf = [n["value"].astype(np.float64) for n in nodes]
        bias = np.asarray(model._baseline_prediction, dtype=np.float64).reshape(1)
        return {**_pack_trees(trees, leaf), "value": np.concatenate(leaf), "bias": bias}
    raise ValueError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}")


class _HistTree:
    """A histogram gradient boosting tree's nodes seen as scikit-learn's `Tree` arrays (leaf: -1)."""

    def __init__(self, nodes: np.ndarray) -> None:
        leaf = nodes["is_leaf"].astype(bool)
        self.children_left = np.where(leaf, _LEAF, nodes["left"].astype(np.int64))
        self.children_right = np.where(leaf, _LEAF, nodes["right"].astype(np.int64))
        self.feature = nodes["feature_idx"].astype(np.int64)
        self.threshold = nodes["num_threshold"].astype(np.float64)
        self.node_count = len(nodes)


def _pack_trees(trees: list, leaf: list[np.ndarray]) -> dict[str, np.ndarray]:
    """All trees' node arrays end to end, child indices made global (`leaf`: per tree, what a node
    contributes when an image lands there; stored by the caller under its kind's name)."""
    left, right, feature, threshold, roots = [], [], [], [], []
    offset = 0
    for tree in trees:
        roots.append(offset)
        lt, rt = tree.children_left.astype(np.int64), tree.children_right.astype(np.int64)
        left.append(np.where(lt == _LEAF, _LEAF, lt + offset))
        right.append(np.where(rt == _LEAF, _LEAF, rt + offset))
        feature.append(np.maximum(tree.feature, 0).astype(np.int64))
        threshold.append(tree.threshold.astype(np.float64))
        offset += tree.node_count
    if sum(len(v) for v in leaf) != offset:
        raise ValueError("one leaf value per node expected")
    return {
        "left": np.concatenate(left),
        "right": np.concatenate(right),
        "feature": np.concatenate(feature),
        "threshold": np.concatenate(threshold),
        "roots": np.asarray(roots, dtype=np.int64),
    }


def probability(kind: str, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """P(defect) for features `x` (N, F), as the fitted scikit-learn estimator's predict_proba."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if kind == "logistic":
        z = ((x - arrays["mean"]) / arrays["scale"]) @ arrays["coef"] + arrays["intercept"][0]
        return 1.0 / (1.0 + np.exp(-z))
    # scikit-learn's decision trees compare float32 features with float64 thresholds; its histogram
    # gradient boosting compares float64 features
    xf = x if kind == "hist_gradient_boosting" else x.astype(np.float32).astype(np.float64)
    node = np.repeat(arrays["roots"][None, :], len(xf), axis=0)
    rows = np.arange(len(xf))[:, None]
    while True:
        inner = arrays["left"][node] != _LEAF
        if not inner.any():
            break
        go_left = xf[rows, arrays["feature"][node]] <= arrays["threshold"][node]
        step = np.where(go_left, arrays["left"][node], arrays["right"][node])
        node = np.where(inner, step, node)
    if kind in _BOOSTED:
        return 1.0 / (1.0 + np.exp(-(arrays["value"][node].sum(axis=1) + arrays["bias"][0])))
    return arrays["p_defect"][node].mean(axis=1)


def _tree_depth(arrays: dict[str, np.ndarray]) -> int:
    """The longest root-to-leaf path of the packed trees, in comparisons."""
    depth = 0
    stack = [(int(r), 0) for r in arrays["roots"]]
    while stack:
        node, d = stack.pop()
        if arrays["left"][node] == _LEAF:
            depth = max(depth, d)
        else:
            stack += [(int(arrays["left"][node]), d + 1), (int(arrays["right"][node]), d + 1)]
    return depth


class ClassifierModule(nn.Module):
    """`probability` as a torch graph (ONNX-exportable): features (B, F) float32 -> P(defect) (B,).

    Trees are walked by a fixed number of gathers (the deepest tree's depth) for every tree at once;
    a leaf points to itself, so an image that reached one stays there. Each float64 threshold is
    stored as the largest float32 not above it: for float32 features, `x <= t32` is then exactly
    scikit-learn's `x <= t64`.
    """

    def __init__(self, kind: str, arrays: dict[str, np.ndarray]) -> None:
        super().__init__()
        if kind not in CLASSIFIERS:
            raise ValueError(f"unknown classifier {kind!r}; choose one of {', '.join(CLASSIFIERS)}")
        self.kind = kind

        def buffer(name: str, value: np.ndarray, dtype: torch.dtype = torch.float32) -> None:
            self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(value), dtype=dtype))

        if kind == "logistic":
            for key in ("mean", "scale", "coef", "intercept"):
                buffer(key, arrays[key])
            return
        leaf = arrays["left"] == _LEAF
        own = np.arange(len(leaf))
        thr = arrays["threshold"].astype(np.float32)
        above = thr.astype(np.float64) > arrays["threshold"]
        thr[above] = np.nextafter(thr[above], np.float32(-np.inf))
        buffer("left", np.where(leaf, own, arrays["left"]), torch.int64)
        buffer("right", np.where(leaf, own, arrays["right"]), torch.int64)
        buffer("feature", arrays["feature"], torch.int64)
        buffer("threshold", thr)
        buffer("roots", arrays["roots"], torch.int64)
        buffer("leaf_value", arrays["value"] if kind in _BOOSTED else arrays["p_defect"])
        buffer("bias", arrays["bias"] if kind in _BOOSTED else np.zeros(1))
        self.depth = _tree_depth(arrays)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.kind == "logistic":
            return torch.sigmoid(((x - self.mean) / self.scale) @ self.coef + self.intercept[0])
        node = self.roots.unsqueeze(0).expand(x.shape[0], -1)
        for _ in range(self.depth):
            value = torch.gather(x, 1, self.feature[node])
            node = torch.where(value <= self.threshold[node], self.left[node], self.right[node])
        if self.kind in _BOOSTED:
            return torch.sigmoid(self.leaf_value[node].sum(1) + self.bias[0])
        return self.leaf_value[node].mean(1)


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
