"""One model for a line that makes several products.

`MultiProduct` keeps one PatchCore or PaDiM per product (its memory bank or statistics and its
own calibration) on one shared backbone, and a router: the nearest product centroid of each
image's global embedding (the backbone's stages average-pooled, L2-normalized). Scores leave the
model divided by the product's own threshold (flagged at 1.0), so products with different raw
scales share one decision rule. An image farther from its nearest centroid than that
product's goods are (`route_quantile` of their distances times `route_margin`) matches no product
and scores at least its distance ratio: flagged, with `route()` saying why. With routing=shared
one detector learns every product's goods together (for products too alike to route), and the
router only flags images that match none.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from anomalens.data.inputs import Batch, InputItem, as_items, iter_batches
from anomalens.models.base import Detector
from anomalens.models.components.features import pooled_features
from anomalens.models.feature_base import BackboneDetector
from anomalens.registry import get_class, register
from anomalens.thresholds import Calibration

METHODS = ("patchcore", "padim")
ROUTINGS = ("product", "shared")
SHARED = "*shared*"  # the one detector's name under routing=shared


@dataclass(frozen=True)
class Route:
    """Where the router sent one image: the nearest product, its distance and that product's limit."""

    key: str
    product: str
    distance: float
    limit: float

    @property
    def matched(self) -> bool:
        return self.distance <= self.limit

    @property
    def reason(self) -> str:
        if self.matched:
            return f"product {self.product!r} (routing distance {self.distance:.3g} <= {self.limit:.3g})"
        return (
            f"matches no product: the nearest, {self.product!r}, is at routing distance "
            f"{self.distance:.3g}, beyond its goods' {self.limit:.3g}"
        )


def threshold_ratio(scores: np.ndarray, maps: np.ndarray, cal: Calibration) -> tuple[np.ndarray, np.ndarray]:
    """Scores and maps over their product's thresholds: every product flags at 1. Distances start at
    0, so the ratio needs no center; (score - median) / (threshold - median) would blow up the
    scores of a product whose few calibration goods happen to score alike."""
    eps = np.finfo(np.float32).tiny
    return scores / max(cal.threshold, eps), maps / max(cal.pixel_threshold, eps)


def global_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """The router's embedding of each canvas: pooled stages, unit length (B, D)."""
    return F.normalize(pooled_features([f.float() for f in features]), dim=1)


class _Recorder:
    """Runs the shared backbone and keeps each canvas's global embedding: the router learns from
    the goods while a product's detector fits on them, without a second pass over the images."""

    def __init__(self, runner) -> None:
        self.runner, self.seen = runner, []

    def __call__(self, x: np.ndarray):
        outs = self.runner(x)
        self.seen.append(global_embedding([torch.from_numpy(np.asarray(o)) for o in outs]))
        return outs


def parse_method_options(text: str) -> dict[str, str]:
    """`method_options` as key=value pairs separated by ';' (each method coerces them)."""
    pairs = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option method_options: expected key=value;key=value, got {part!r}")
        pairs[key.strip()] = value.strip()
    return pairs


@register
class MultiProduct(BackboneDetector):
    """Several products in one model file. Options: method (patchcore or padim, one per product),
    method_options (that method's own options, 'coreset_ratio=0.05;top_k=5'), layers (the shared
    backbone's stages), routing (product: a detector and calibration per product; shared: one for
    all), route_quantile and route_margin (an image beyond margin x the quantile of its nearest
    product's goods' routing distances matches no product)."""

    name = "multi"
    square_input = False
    stochastic = True
    defaults = {
        "method": "patchcore",
        "method_options": "",
        "layers": (2, 3),
        "routing": "product",
        "route_quantile": 0.99,
        "route_margin": 1.5,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["method"] not in METHODS:
            raise ValueError(f"option method={o['method']!r}: use one of {', '.join(METHODS)}")
        if o["routing"] not in ROUTINGS:
            raise ValueError(f"option routing={o['routing']!r}: use one of {', '.join(ROUTINGS)}")
        if o["resize"] != "squash" or o["tile"]:
            raise ValueError("multi: only resize=squash without tiles (each product is scored on one canvas)")
        self._method_options = parse_method_options(o["method_options"])
        get_class(o["method"])(**self._inner_options())  # bad method options fail here, not after a fit
        self.detectors: dict[str, BackboneDetector] = {}
        self.products: list[str] = []
        self._centroids = torch.empty(0)
        self._limits = np.empty(0)

    def _inner_options(self) -> dict[str, Any]:
        shared = {k: v for k, v in self.options.items() if k in BackboneDetector.base_defaults}
        # the router measures drift-free routing distances; the product detectors skip the drift check
        return {**shared, "layers": self.options["layers"], "drift_check": False, **self._method_options}

    def _new_detector(self) -> BackboneDetector:
        det = get_class(self.options["method"])(**self._inner_options())
        det.share_backbone(self)
        return det

    # -- fitting ---------------------------------------------------------------------------------
    def fit(
        self,
        images: dict[str, Iterable] | Iterable | np.ndarray,
        calibration: Iterable | np.ndarray | None = None,
        *,
        progress: bool = False,
        roi: str | Path | np.ndarray | None = None,
        products: list[str] | None = None,
    ) -> MultiProduct:
        """Fit on each product's goods: a dict product -> goods, goods with a parallel `products`
        list, or plain goods (one product, 'default'). Each product holds out its own calibration
        goods (few-shot options apply per product)."""
        if calibration is not None or roi is not None:
            raise ValueError(
                "multi: each product calibrates on its own held-out goods; no calibration set or ROI"
            )
        groups = self._groups(images, products)
        self.fit_info = {"products": {}}
        self.detectors, embeddings = {}, {}
        if self.options["routing"] == "shared":
            every = [it for items in groups.values() for it in items]
            self.detectors[SHARED] = self._fit_one(every, progress)[0]
        for product, items in groups.items():
            if self.options["routing"] == "shared":
                embeddings[product] = self._embed_items(items)
            else:
                self.detectors[product], embeddings[product] = self._fit_one(items, progress)
        self.products = list(groups)
        self._fit_router(embeddings)
        # scores leave as ratios to each product's threshold: flagged at 1
        n = self._sum_info()
        self.calibration = Calibration(1.0, 0.0, 1.0, 0.0, self.options["calibration_quantile"], n)
        self.operating_point = None
        self._fitted = True
        return self

    def _groups(self, images, products: list[str] | None) -> dict[str, list[InputItem]]:
        if isinstance(images, dict):
            groups = {str(p): as_items(v) for p, v in images.items()}
        else:
            items = as_items(images)
            labels = products if products is not None else ["default"] * len(items)
            if len(labels) != len(items):
                raise ValueError(f"multi: {len(items)} images but {len(labels)} product labels")
            groups = {}
            for it, p in zip(items, labels):
                groups.setdefault(str(p), []).append(it)
        empty = [p for p, v in groups.items() if not v]
        if not groups or empty:
            raise ValueError(f"multi: no good images for product(s) {', '.join(empty) or '(none given)'}")
        return groups

    def _fit_one(self, items: list[InputItem], progress: bool) -> tuple[BackboneDetector, torch.Tensor]:
        det = self._new_detector()
        recorder = det._runner = _Recorder(self.feature_runner)
        det.fit(items, progress=progress)
        det._runner = self.feature_runner
        return det, torch.cat(recorder.seen)

    def _embed_items(self, items: list[InputItem]) -> torch.Tensor:
        out = [
            global_embedding(self.features(batch.pixels))
            for batch in iter_batches(items, self.preprocess(), self.options["batch_size"])
        ]
        return torch.cat(out)

    def _fit_router(self, embeddings: dict[str, torch.Tensor]) -> None:
        o = self.options
        centroids, limits = [], []
        for product in self.products:
            e = embeddings[product].cpu()
            c = e.mean(dim=0)
            d = torch.linalg.vector_norm(e - c, dim=1).numpy()
            centroids.append(c)
            limits.append(o["route_margin"] * float(np.quantile(d, o["route_quantile"])))
            self.fit_info["products"][product] = {
                "n_goods_seen": int(len(e)),
                "route_limit": round(limits[-1], 6),
            }
        self._centroids, self._limits = torch.stack(centroids), np.asarray(limits)

    def _sum_info(self) -> int:
        dets = list(self.detectors.values())
        for key in ("n_fit", "n_calibration", "n_model_inputs"):
            self.fit_info[key] = sum(d.fit_info.get(key, 0) for d in dets)
        self.fit_info["fit_seconds"] = round(sum(d.fit_info.get("fit_seconds", 0.0) for d in dets), 3)
        self.fit_info["warnings"] = [w for d in dets for w in d.fit_info.get("warnings", [])]
        for name, d in self.detectors.items():
            self.fit_info["products"].setdefault(name, {})["threshold"] = d.calibration.threshold
        return self.fit_info["n_calibration"]

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        raise NotImplementedError("multi fits through its product detectors (see fit)")

    # -- routing and scoring ---------------------------------------------------------------------
    def _distances(self, features: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Nearest product index and its routing distance for each canvas."""
        d = torch.cdist(global_embedding(features).cpu(), self._centroids)
        dist, idx = d.min(dim=1)
        return idx.numpy(), dist.numpy()

    def route(self, images: Iterable | np.ndarray) -> list[Route]:
        """Each image's nearest product, its routing distance and whether it matches."""
        self._check_fitted()
        routes = []
        for batch in iter_batches(as_items(images), self.preprocess(), self.options["batch_size"]):
            idx, dist = self._distances(self.features(batch.pixels))
            routes += [
                Route(k, self.products[i], float(d), float(self._limits[i]))
                for k, i, d in zip(batch.keys, idx, dist)
            ]
        return routes

    @torch.inference_mode()
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = self.features(pixels)
        idx, dist = self._distances(feats)
        scores = np.zeros(len(idx), dtype=np.float64)
        maps = np.zeros((len(idx), *self.input_size), dtype=np.float32)
        if SHARED in self.detectors:
            groups = {SHARED: np.arange(len(idx))}
        else:  # each image scored by its nearest product's detector
            groups = {p: np.flatnonzero(idx == i) for i, p in enumerate(self.products)}
        for name, rows in groups.items():
            if len(rows):
                det = self.detectors[name]
                s, m = det.score_features([f[torch.from_numpy(rows).to(f.device)] for f in feats])
                scores[rows], maps[rows] = threshold_ratio(s, m, det.calibration)
        ratio = dist / self._limits[idx]
        off = ratio > 1.0  # no product matches: at least the distance ratio, on every pixel
        scores[off] = np.maximum(scores[off], ratio[off])
        maps[off] = np.maximum(maps[off], ratio[off, None, None].astype(np.float32))
        return scores, maps

    # -- persistence -----------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {"router/centroids": self._centroids.numpy(), "router/limits": self._limits}
        meta: dict[str, Any] = {"products": self.products, "detectors": {}, **self._backbone_state()}
        for name, det in self.detectors.items():
            a, m = det._state()
            arrays.update({f"{name}/{k}": v for k, v in a.items()})
            meta["detectors"][name] = {
                "state": m,
                "calibration": det.calibration.to_dict(),
                "fit_info": det.fit_info,
            }
        return arrays, meta

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._restore_backbone(meta)
        self.products = list(meta["products"])
        self._centroids = torch.from_numpy(arrays["router/centroids"])
        self._limits = np.asarray(arrays["router/limits"], dtype=np.float64)
        self.detectors = {}
        for name, entry in meta["detectors"].items():
            det = self._new_detector()
            prefix = f"{name}/"
            det._restore(
                {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}, entry["state"]
            )
            det.calibration = Calibration.from_dict(entry["calibration"])
            det.fit_info = entry["fit_info"]
            det._fitted = True
            self.detectors[name] = det

    def product_detector(self, product: str) -> Detector:
        """The detector that scores `product` (under routing=shared, the one shared detector): a
        plain model with its own calibration, to save or export to ONNX on its own."""
        self._check_fitted()
        if product not in self.products:
            raise ValueError(f"multi: no product {product!r}; products: {', '.join(self.products)}")
        return self.detectors.get(SHARED) or self.detectors[product]
