"""Classical outlier detectors (PyOD) on image representations: `classical:<detector>`.

Fifteen detectors, generated from one table (`PYOD_TABLE`): ABOD, CBLOF, Feature Bagging, HBOS,
Isolation Forest, KNN, average-KNN, LOF, OCSVM, PCA, LSCP, INNE, GMM, KDE and LMDD, each on a
representation chosen with the `features` option (`raw`, `pca:K`, `kpca-rbf:K`, ..., `deep`,
`patch`; see `anomalens.models.components.representations`).

    det = anomalens.create("classical:iforest", features="pca:300", pyod="n_estimators=200")
    det.fit(dataset.train)
    pred = det.predict(dataset.test)             # calibrated threshold: pred.is_anomalous
    reading = det.pyod_reading(pred.scores)      # PyOD's own decision: reading.labels, .proba_labels

Options (besides the common ones and the backbone options used by `deep`/`patch`):

- `features` (`deep`): the representation.
- `pixel_size` (64) and `color` (false): pixel representations resize to pixel_size x pixel_size,
  grayscale unless color.
- `standardize` (true): z-score every feature with the training mean/std before the detector.
- `pyod` (""): PyOD constructor options as "key=value;key=value" (`--set pyod=n_neighbors=10;method=mean`,
  or a dict in Python). Values are read as int, float, true/false, none or text; a comma makes a
  list. Pseudo-keys: `n_neighbors` for feature_bagging sets its LOF base detectors' neighbours,
  `lof_neighbors=10,15,20,25` sets LSCP's LOF pool.
- `contamination` (0.1): PyOD's expected outlier share, which sets its `threshold_`.
- `max_samples` (per detector, 0 = all): the detector is fitted on a seeded subsample of at most
  that many training vectors. Defaults bound the slow ones: ABOD 2000, OCSVM 5000, KDE 5000,
  LSCP 2000, LMDD 64 (its reference set, below). Otherwise a fit whose estimated time passes
  `SLOW_WARNING_S` logs a warning with the estimate and how to bound it, before it starts.
- `pca_max_samples` (5000), `kpca_max_samples` (2000): rows the PCA / kernel PCA is fitted on.
- `max_patches` (20000), `sigma` (4): `patch` features only (training patches kept, map smoothing).

Saving without pickle: a PyOD detector is not made of arrays in general, so the model file
stores what is needed to rebuild it exactly: the representation's fitted arrays (PCA mean and
components, kernel-PCA fit data / scaled eigenvectors / centering terms), the standardization
mean and std, the training feature matrix the detector was fitted on (N x d float32, after
subsampling) and its training decision scores. Loading refits the PyOD detector on that matrix
with the same options and `random_state=seed`, which reproduces it (same library versions give
identical scores); the refit's training scores are compared with the stored ones and a warning
says so if they differ (e.g. another PyOD or scikit-learn version).

Two readings of a score:

- the calibrated threshold of anomalens (held-out goods, `Prediction.is_anomalous`);
- PyOD's own, as in classical studies: `pyod_reading(scores)` / `classical_labels(images)` give
  `labels` (score > PyOD's contamination-based `threshold_`, i.e. `predict`) and `proba_labels`
  (PyOD's linear `predict_proba` > 0.5).

Localization: on global features the maps are constant (the image score everywhere) and
`localizes` is False. With `features=patch` every stride-8 patch is scored, the patch scores are
upsampled and smoothed (`SmoothUpsample`) into a map, the image score is the map's maximum and
`localizes` is True. PyOD's threshold then applies per patch, so its image reading (an image is
flagged when its score passes the training patches' `threshold_`) flags far more images than
`contamination` says.

Quirks handled here: PyOD's LMDD is transductive (its `decision_function` compares the rows it is
given with each other and ignores the fit), so an image is scored as the last row of
[reference set; image], the reference being a seeded subsample of `max_samples` training vectors:
its score depends on the training goods only. LSCP draws feature subsets from a random state that
advances at every call; it is reset to `seed` before each call, so scores do not depend on what
was scored before.
"""

from __future__ import annotations

import importlib
import logging
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalens.backbones import (
    BackboneError,
    BackboneSpec,
    build_backbone,
    make_feature_runner,
    weights_checksum,
)
from anomalens.data.inputs import Batch, Preprocess
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.components.representations import (
    FeatureSpec,
    Representation,
    check_features,
    subsample_indices,
)
from anomalens.models.feature_base import BackboneDetector
from anomalens.registry import register

log = logging.getLogger(__name__)

PREFIX = "classical:"
#: a fit estimated to take longer than this logs a warning with the estimate before it starts
SLOW_WARNING_S = 120.0


@dataclass(frozen=True)
class PyodEntry:
    """One row of the detector table."""

    key: str  # registered as classical:<key>
    title: str
    module: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    seeded: bool = False  # takes random_state
    neighbours: tuple[str, ...] = ()  # options that need more training vectors than their value
    max_samples: int = 0  # default cap on training vectors (0 = all)
    # rough seconds on a 2-core CPU for n training vectors of dimension d, m scored vectors:
    # fit ~ fit_cost * (n/1000)**fit_power * (d/300)**dim_power;
    # scoring ~ score_cost * m * (n/1000)**score_power * (d/300)**dim_power  (measured on magnetic tile features)
    fit_cost: float = 0.1
    fit_power: float = 1.0
    score_cost: float = 1e-4
    score_power: float = 0.0
    dim_power: float = 1.0  # both grow like (d/300)**dim_power
    note: str = ""


PYOD_TABLE: tuple[PyodEntry, ...] = (
    PyodEntry(
        "abod",
        "ABOD",
        "pyod.models.abod",
        "ABOD",
        {"method": "fast", "n_neighbors": 10},
        neighbours=("n_neighbors",),
        max_samples=2000,
        fit_cost=3.0,
        score_cost=1e-3,
        note="angle-based (fast variant, Python loop per vector): capped at 2000 training vectors",
    ),
    PyodEntry(
        "cblof",
        "CBLOF",
        "pyod.models.cblof",
        "CBLOF",
        {"n_clusters": 8, "alpha": 0.9, "beta": 5},
        seeded=True,
        neighbours=("n_clusters",),
        fit_cost=1.0,
        note="cluster-based local outlier factor",
    ),
    PyodEntry(
        "feature_bagging",
        "Feature Bagging",
        "pyod.models.feature_bagging",
        "FeatureBagging",
        {"n_estimators": 10, "n_neighbors": 20},
        seeded=True,
        neighbours=("n_neighbors",),
        fit_cost=3.0,
        fit_power=1.3,
        score_cost=3e-3,
        score_power=0.3,
        note="LOF on random feature subsets, averaged",
    ),
    PyodEntry(
        "hbos",
        "HBOS",
        "pyod.models.hbos",
        "HBOS",
        {"n_bins": 10},
        fit_cost=0.2,
        note="histogram-based, features independent",
    ),
    PyodEntry(
        "iforest",
        "Isolation Forest",
        "pyod.models.iforest",
        "IForest",
        {"n_estimators": 100},
        seeded=True,
        fit_cost=0.3,
        fit_power=0.2,
        score_cost=2e-5,
        note="isolation forest",
    ),
    PyodEntry(
        "knn",
        "KNN",
        "pyod.models.knn",
        "KNN",
        {"method": "largest", "n_neighbors": 5},
        neighbours=("n_neighbors",),
        fit_cost=0.3,
        fit_power=1.5,
        score_cost=3.6e-4,
        score_power=0.1,
        note="distance to the k-th nearest training vector",
    ),
    PyodEntry(
        "avg_knn",
        "average KNN",
        "pyod.models.knn",
        "KNN",
        {"method": "mean", "n_neighbors": 5},
        neighbours=("n_neighbors",),
        fit_cost=0.3,
        fit_power=1.5,
        score_cost=3.6e-4,
        score_power=0.1,
        note="mean distance to the k nearest training vectors",
    ),
    PyodEntry(
        "lof",
        "LOF",
        "pyod.models.lof",
        "LOF",
        {"n_neighbors": 20},
        neighbours=("n_neighbors",),
        fit_cost=0.3,
        fit_power=1.5,
        score_cost=3.6e-4,
        score_power=0.1,
        note="local outlier factor (novelty)",
    ),
    PyodEntry(
        "ocsvm",
        "OCSVM",
        "pyod.models.ocsvm",
        "OCSVM",
        {"kernel": "rbf", "nu": 0.5, "gamma": "auto"},
        max_samples=5000,
        fit_cost=0.3,
        fit_power=2.0,
        score_cost=1e-4,
        score_power=1.0,
        note="one-class SVM (fit grows ~N^2): capped at 5000 training vectors",
    ),
    PyodEntry(
        "pca",
        "PCA",
        "pyod.models.pca",
        "PCA",
        {},
        seeded=True,
        fit_cost=0.5,
        score_cost=1e-4,
        note="weighted distance to the principal hyperplanes (PyOD's PCA detector)",
    ),
    PyodEntry(
        "lscp",
        "LSCP",
        "pyod.models.lscp",
        "LSCP",
        {"lof_neighbors": [10, 15, 20, 25], "local_region_size": 30},
        seeded=True,
        neighbours=("lof_neighbors", "local_region_size"),
        max_samples=2000,
        fit_cost=8.0,
        fit_power=1.3,
        score_cost=8e-3,
        score_power=0.3,
        note="locally selected combination of a LOF pool: capped at 2000 training vectors",
    ),
    PyodEntry(
        "inne",
        "INNE",
        "pyod.models.inne",
        "INNE",
        {"n_estimators": 200},
        seeded=True,
        fit_cost=3.0,
        fit_power=0.3,
        score_cost=2.5e-3,
        note="isolation with nearest-neighbour ensembles",
    ),
    PyodEntry(
        "gmm",
        "GMM",
        "pyod.models.gmm",
        "GMM",
        {"n_components": 1, "covariance_type": "full", "reg_covar": 1e-3},
        seeded=True,
        neighbours=("n_components",),
        fit_cost=1.0,
        score_cost=1e-4,
        dim_power=1.5,
        note="Gaussian mixture negative log-likelihood",
    ),
    PyodEntry(
        "kde",
        "KDE",
        "pyod.models.kde",
        "KDE",
        {"bandwidth": 1.0},
        max_samples=5000,
        fit_cost=0.5,
        score_cost=5e-4,
        score_power=1.0,
        note="kernel density (negative log-density): capped at 5000",
    ),
    PyodEntry(
        "lmdd",
        "LMDD",
        "pyod.models.lmdd",
        "LMDD",
        {"n_iter": 10, "dis_measure": "aad"},
        seeded=True,
        max_samples=64,
        fit_cost=0.05,
        score_cost=1.3,
        score_power=1.0,
        note="linear deviation-based (transductive): each image scored against a 64-vector reference set",
    ),
)
TABLE: dict[str, PyodEntry] = {e.key: e for e in PYOD_TABLE}
CLASSICAL_NAMES: tuple[str, ...] = tuple(PREFIX + e.key for e in PYOD_TABLE)


def expand_models(text: str | Iterable[str]) -> list[str]:
    """'classical:all,patchcore' -> the 15 classical names, then patchcore (order kept, no repeats);
    a bare table key ('iforest') means its classical name."""
    parts = [p.strip() for p in text.split(",")] if isinstance(text, str) else [str(p).strip() for p in text]
    out: list[str] = []
    for p in parts:
        if p in ("classical:all", "classical"):
            names = list(CLASSICAL_NAMES)
        elif p in TABLE:
            names = [PREFIX + p]
        else:
            names = [p] if p else []
        out += [n for n in names if n not in out]
    return out


# -- options ---------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    t = text.strip()
    if "," in t:
        return [_parse_value(p) for p in t.split(",") if p.strip()]
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(t)
        except ValueError:
            pass
    return t


def parse_pyod_options(value: str | dict | None) -> dict[str, Any]:
    """'n_neighbors=10;method=mean' (or a dict) -> {'n_neighbors': 10, 'method': 'mean'}."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return {str(k): (list(v) if isinstance(v, tuple) else v) for k, v in value.items()}
    out = {}
    for part in str(value).replace("\n", ";").split(";"):
        if not part.strip():
            continue
        key, sep, val = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"option pyod: expected key=value;key=value, got {part.strip()!r}")
        out[key.strip()] = _parse_value(val)
    return out


def format_pyod_options(options: dict[str, Any]) -> str:
    """Canonical text form, stable under save/load: sorted 'key=value;...'."""

    def fmt(v: Any) -> str:
        if isinstance(v, (list, tuple)):
            return ",".join(fmt(x) for x in v)
        if isinstance(v, bool):
            return "true" if v else "false"
        return "none" if v is None else str(v)

    return ";".join(f"{k}={fmt(options[k])}" for k in sorted(options))


def estimate_seconds(entry: PyodEntry, n: int, d: int, m: int = 0) -> tuple[float, float]:
    """Rough (fit, scoring of m vectors) seconds on a 2-core CPU; for warnings and the study's guard."""
    scale = (max(d, 1) / 300) ** entry.dim_power
    fit = entry.fit_cost * (n / 1000) ** entry.fit_power * scale
    score = entry.score_cost * m * max(n / 1000, 1e-3) ** entry.score_power * scale
    return fit, score


_NUMBA_CACHED = False
_EXTRACTORS: dict[tuple, tuple[Any, str]] = {}
_RUNNERS: dict[tuple, Any] = {}


def _enable_numba_cache() -> None:
    """Turn on numba's on-disk cache for PyOD's jitted helpers (HBOS, ABOD, LMDD, CBLOF's distances),
    which PyOD compiles without it: 5-10 s saved in every new process after the first."""
    global _NUMBA_CACHED
    if _NUMBA_CACHED:
        return
    _NUMBA_CACHED = True
    try:
        from numba.core.dispatcher import Dispatcher
    except ImportError:  # pragma: no cover
        return
    modules = {e.module for e in PYOD_TABLE} | {"pyod.utils.stat_models", "pyod.utils.utility"}
    for name in sorted(modules):
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover
            continue
        for fn in list(vars(module).values()):
            if isinstance(fn, Dispatcher) and getattr(fn, "__module__", "").startswith("pyod"):
                try:
                    fn.enable_caching()
                except Exception:  # noqa: BLE001 - no writable cache location: just compile
                    log.debug("numba cache not enabled for %s", fn)


@dataclass
class ClassicalReading:
    """PyOD's own decision on image scores: `labels` = score > threshold_ (`predict`),
    `proba` = PyOD's linear predict_proba (min-max of the training scores), `proba_labels` = proba > 0.5."""

    scores: np.ndarray
    threshold: float
    labels: np.ndarray
    proba: np.ndarray
    proba_labels: np.ndarray


# -- the detector ----------------------------------------------------------------------------------
class ClassicalDetector(BackboneDetector):
    """Base of the `classical:*` detectors (see the module docstring); subclasses only set `entry`."""

    entry: PyodEntry
    name = "classical"
    stochastic = False

    common_defaults: dict[str, Any] = {
        "features": "deep",
        "pixel_size": 64,
        "color": False,
        "standardize": True,
        "pyod": "",
        "contamination": 0.1,
        "pca_max_samples": 5000,
        "kpca_max_samples": 2000,
        "max_patches": 20000,
        "sigma": 4.0,
    }

    def __init__(self, **options: Any) -> None:
        if isinstance(options.get("pyod"), dict):
            options["pyod"] = format_pyod_options(parse_pyod_options(options["pyod"]))
        super().__init__(**options)
        self.spec = FeatureSpec.parse(self.options["features"])
        self.options["features"] = str(self.spec)
        self.options["pyod"] = format_pyod_options(parse_pyod_options(self.options["pyod"]))
        if not 0 < float(self.options["contamination"]) <= 0.5:
            raise ValueError(
                f"option contamination={self.options['contamination']}: PyOD wants it in (0, 0.5]"
            )
        for key in ("pixel_size", "max_samples", "pca_max_samples", "kpca_max_samples", "max_patches"):
            if self.options[key] < (1 if key == "pixel_size" else 0):
                raise ValueError(
                    f"option {key}={self.options[key]} must be {'>= 1' if key == 'pixel_size' else '>= 0'}"
                )
        self.pyod_kwargs = self._pyod_kwargs()  # validated now, before any image is read
        self.rep: Representation | None = None
        self.model = None  # the fitted PyOD detector
        self.train: np.ndarray | None = (
            None  # training matrix the detector is fitted on (before standardization)
        )
        self.scale_mean: np.ndarray | None = None
        self.scale_std: np.ndarray | None = None
        self.train_scores: np.ndarray | None = None
        self._reference: np.ndarray | None = None  # LMDD
        self._upsample: SmoothUpsample | None = None

    # -- options -----------------------------------------------------------------------------------
    def _pyod_kwargs(self) -> dict[str, Any]:
        import inspect

        entry = self.entry
        user = parse_pyod_options(self.options["pyod"])
        kwargs = {**entry.kwargs, **user, "contamination": float(self.options["contamination"])}
        if "contamination" in user:
            kwargs["contamination"] = float(user["contamination"])
        cls = getattr(importlib.import_module(entry.module), entry.cls)
        allowed = set(inspect.signature(cls.__init__).parameters) - {
            "self",
            "random_state",
            "detector_list",
            "base_estimator",
            "n_jobs",
        }
        pseudo = {"feature_bagging": {"n_neighbors"}, "lscp": {"lof_neighbors"}}.get(entry.key, set())
        unknown = sorted(set(kwargs) - allowed - pseudo)
        if unknown:
            raise ValueError(
                f"{self.name}: unknown PyOD option(s) {', '.join(unknown)} for {entry.cls}; valid: "
                f"{', '.join(sorted(allowed | pseudo))}"
            )
        return kwargs

    def _build_pyod(self):
        _enable_numba_cache()
        entry = self.entry
        kwargs = dict(self.pyod_kwargs)
        cls = getattr(importlib.import_module(entry.module), entry.cls)
        seed = int(self.options["seed"])
        if entry.key == "feature_bagging":
            from pyod.models.lof import LOF

            kwargs["base_estimator"] = LOF(n_neighbors=int(kwargs.pop("n_neighbors")))
        if entry.key == "lscp":
            from pyod.models.lof import LOF

            neighbours = kwargs.pop("lof_neighbors")
            neighbours = neighbours if isinstance(neighbours, list) else [neighbours]
            if len(neighbours) < 2:
                raise ValueError(
                    f"{self.name}: lof_neighbors needs at least 2 values (a pool), e.g. 10,15,20"
                )
            kwargs["detector_list"] = [LOF(n_neighbors=int(k)) for k in neighbours]
        if entry.seeded:
            kwargs["random_state"] = seed
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"{self.name}: PyOD rejected options {self.options['pyod'] or '(defaults)'}: "
                f"{str(err).splitlines()[0]}"
            ) from None

    # one extractor and one runner per process and configuration, shared by the detectors (15 of them
    # in a study): building and checking an ONNX session takes about a second each time
    @property
    def extractor(self):
        if self._extractor is None:
            spec = self.backbone_spec
            stamp = (
                Path(spec.weights).stat().st_mtime if spec.weights and Path(spec.weights).exists() else None
            )
            key = (spec.name, spec.layers, spec.weights, stamp, str(self.device))
            if key not in _EXTRACTORS:
                extractor = build_backbone(spec, device=self.device)
                _EXTRACTORS[key] = (extractor, weights_checksum(extractor))
            extractor, checksum = _EXTRACTORS[key]
            if self._backbone_checksum is not None and checksum != self._backbone_checksum:
                raise BackboneError(
                    f"backbone {spec.name!r} now has other weights than when the model was fitted: "
                    "refit, or restore the original weight file"
                )
            self._extractor, self._backbone_checksum = extractor, checksum
        return self._extractor

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        if self._runner is None:
            extractor = self.extractor
            key = (id(extractor), self.input_size, str(self.device), self.options["engine"])
            if key not in _RUNNERS:
                _RUNNERS[key] = make_feature_runner(
                    extractor, self.input_size, self.device, engine=self.options["engine"]
                )
            self._runner = _RUNNERS[key]
        return super().features(pixels)

    @property
    def localizes(self) -> bool:  # type: ignore[override]
        return self.spec.is_patch

    @property
    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(
            name=self.options["backbone"],
            layers=self.spec.layers or (2, 3),
            weights=self.options["weights"] or None,
        )

    def _preprocess(self) -> Preprocess:
        if self.spec.uses_pixels:
            c = 3 if self.options["color"] else 1
            return Preprocess(
                self.options["pixel_size"], c, (0.0,) * 3, (1.0,) * 3, self.options["intensity"]
            )
        return super()._preprocess()

    def _new_representation(self) -> Representation:
        o = self.options
        return Representation(
            self.spec,
            seed=int(o["seed"]),
            pca_max_samples=o["pca_max_samples"],
            kpca_max_samples=o["kpca_max_samples"],
            max_patches=o["max_patches"],
            backbone=self.features if self.spec.uses_backbone else None,
        )

    # -- fitting -----------------------------------------------------------------------------------
    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        rep = self._new_representation()
        rep.start(n_images)
        for batch in batches:
            rep.add(batch.pixels)
        start = time.perf_counter()
        train = rep.finish()
        self.fit_info.update(representation=rep.info, representation_s=round(time.perf_counter() - start, 3))
        self.fit_matrix(train, representation=rep)

    def _check_neighbours(self, n: int) -> None:
        for key in self.entry.neighbours:
            value = self.pyod_kwargs.get(key)
            need = max(value) if isinstance(value, list) else value
            if need is not None and n <= int(need):
                unit = "training patches" if self.spec.is_patch else "training images"
                hint = max(1, n - 1)
                example = (
                    f"{key}={','.join(str(min(int(v), hint)) for v in value)}"
                    if isinstance(value, list)
                    else f"{key}={hint}"
                )
                raise ValueError(
                    f"{self.name} needs more {unit} than {key}={need} (got {n}): lower it, "
                    f"e.g. --set pyod={example}, or add good images"
                )

    def fit_matrix(
        self, train: np.ndarray, *, representation: Representation | None = None
    ) -> ClassicalDetector:
        """Fit the PyOD detector on a training feature matrix (N, d) from `representation`.

        `fit` calls it after streaming the images; the study calls it directly with features
        computed once for all detectors (then `representation` may be None and the detector
        scores matrices with `score_matrix`, but cannot be saved).
        """
        train = np.ascontiguousarray(train, dtype=np.float32)
        what = f"{self.name} on features {self.spec}"
        check_features(train, what)
        idx = subsample_indices(
            train.shape[0], int(self.options["max_samples"]), int(self.options["seed"]), salt=2
        )
        if len(idx) < train.shape[0]:
            log.warning(
                "%s: fitting on a seeded subsample of %d of %d training vectors (max_samples=%d)",
                self.name,
                len(idx),
                train.shape[0],
                self.options["max_samples"],
            )
            self.fit_info["subsampled"] = [int(len(idx)), int(train.shape[0])]
            train = train[idx]
        n, d = train.shape
        if n < 2:
            raise ValueError(f"{what}: needs at least 2 training vectors, got {n}")
        self._check_neighbours(n)
        fit_s, per_1000 = estimate_seconds(self.entry, n, d, 1000)
        if fit_s > SLOW_WARNING_S:
            log.warning(
                "%s: fitting on %d x %d features is estimated to take %.0f s; bound it with "
                "--set max_samples=N (seeded subsample) or fewer features",
                self.name,
                n,
                d,
                fit_s,
            )
        if per_1000 > SLOW_WARNING_S and not self.spec.is_patch:
            log.warning(
                "%s: scoring is estimated at %.0f ms per image on %d x %d features; lower max_samples "
                "or use fewer features for large batches",
                self.name,
                per_1000,
                n,
                d,
            )
        self.rep = representation
        self.train = train
        self.scale_mean = self.scale_std = None
        self._fit_pyod()
        self.train_scores = np.asarray(self.model.decision_scores_, dtype=np.float64)
        self._fitted = True
        self.fit_info.update(
            n_train_vectors=int(n), feature_dim=int(d), pyod_threshold=float(self.model.threshold_)
        )
        return self

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.scale_mean is None:
            return x
        return (x - self.scale_mean) / self.scale_std

    def _fit_pyod(self) -> None:
        """(Re)fit the PyOD detector on `self.train`: the same computation at fit and at load."""
        x = self.train.astype(np.float64)
        if self.options["standardize"] and self.scale_mean is None:
            mean = x.mean(axis=0)
            std = x.std(axis=0)
            std[~(std > 1e-12 * max(1.0, float(np.abs(x).max())))] = 1.0  # constant features stay as they are
            self.scale_mean, self.scale_std = mean, std
        x = self._standardized(self.train)
        model = self._build_pyod()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyOD/sklearn chatter (e.g. LSCP's region-size advice)
            try:
                if self.entry.key == "lmdd":
                    self._reference = x
                model.fit(x)
            except (ValueError, AssertionError, np.linalg.LinAlgError) as err:
                msg = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(
                    f"{self.name} could not be fitted on {x.shape[0]} x {x.shape[1]} features "
                    f"({self.spec}): {msg}; try other features or PyOD options (--set pyod=...)"
                ) from None
        self.model = model

    # -- scoring -----------------------------------------------------------------------------------
    def decision(self, x: np.ndarray) -> np.ndarray:
        """PyOD decision scores (higher = more anomalous) of feature vectors (n, d), before standardization."""
        z = self._standardized(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.entry.key == "lmdd":
                return np.array(
                    [self.model.decision_function(np.vstack([self._reference, row[None]]))[-1] for row in z],
                    dtype=np.float64,
                )
            if self.entry.key == "lscp":
                self.model.random_state = np.random.RandomState(int(self.options["seed"]))
            return np.asarray(self.model.decision_function(z), dtype=np.float64)

    def score_matrix(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Image scores from representation output: (B, d) vectors, or (B, h, w, d) patch grids
        (then also the smoothed maps at image_size)."""
        if feats.ndim == 2:
            return self.decision(feats), None
        b, h, w, d = feats.shape
        patch = self.decision(feats.reshape(b * h * w, d)).reshape(b, h, w)
        if self._upsample is None:
            self._upsample = SmoothUpsample(self.input_size, self.options["sigma"])
        maps = self._upsample(torch.from_numpy(patch.astype(np.float32))).numpy()
        return maps.reshape(b, -1).max(axis=1).astype(np.float64), maps

    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        if self.rep is None:
            raise RuntimeError(
                f"{self.name} was fitted from a feature matrix without its representation: "
                "it cannot score images"
            )
        with torch.inference_mode():
            feats = self.rep.transform(pixels)
        scores, maps = self.score_matrix(feats)
        if maps is None:
            size = pixels.shape[-1]
            maps = np.broadcast_to(scores.astype(np.float32)[:, None, None], (len(scores), size, size)).copy()
        return scores, maps

    # -- PyOD's own decision -----------------------------------------------------------------------
    @property
    def pyod_threshold(self) -> float:
        if self.model is None:
            raise RuntimeError(f"{self.name} is not fitted")
        return float(self.model.threshold_)

    def pyod_reading(self, scores: np.ndarray) -> ClassicalReading:
        """PyOD's `predict` (score > threshold_) and `predict_proba(method='linear')` > 0.5 for
        image scores this detector produced."""
        scores = np.asarray(scores, dtype=np.float64)
        lo, hi = float(self.train_scores.min()), float(self.train_scores.max())
        proba = np.clip((scores - lo) / (hi - lo), 0, 1) if hi > lo else (scores > hi).astype(np.float64)
        threshold = self.pyod_threshold
        return ClassicalReading(
            scores=scores,
            threshold=threshold,
            labels=(scores > threshold).astype(int),
            proba=proba,
            proba_labels=(proba > 0.5).astype(int),
        )

    def classical_labels(self, images, **predict_options: Any) -> ClassicalReading:
        """Score images and read them with PyOD's own threshold (see `pyod_reading`)."""
        return self.pyod_reading(self.predict(images, **predict_options).scores)

    # -- state -------------------------------------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if self.rep is None:
            raise RuntimeError(
                f"{self.name} was fitted from a feature matrix without its representation: "
                "nothing complete to save"
            )
        import pyod
        import sklearn

        arrays, rep_meta = self.rep.state()
        arrays = {**arrays, "train": self.train, "train_scores": self.train_scores}
        if self.scale_mean is not None:
            arrays.update(scale_mean=self.scale_mean, scale_std=self.scale_std)
        meta = {
            "representation": rep_meta,
            "pyod_kwargs": {k: v for k, v in self.pyod_kwargs.items()},
            "pyod_threshold": self.pyod_threshold,
            "versions": {
                "pyod": pyod.__version__,
                "scikit-learn": sklearn.__version__,
                "numpy": np.__version__,
            },
        }
        if self.spec.uses_backbone:
            meta.update(self._backbone_state())
        return arrays, meta

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if self.spec.uses_backbone:
            self._restore_backbone(meta)
        self.rep = self._new_representation()
        self.rep.restore(arrays, meta["representation"])
        self.train = arrays["train"]
        if "scale_mean" in arrays:
            self.scale_mean, self.scale_std = arrays["scale_mean"], arrays["scale_std"]
        self._fit_pyod()
        self.train_scores = np.asarray(arrays["train_scores"], dtype=np.float64)
        refit = np.asarray(self.model.decision_scores_, dtype=np.float64)
        if refit.shape != self.train_scores.shape or not np.allclose(
            refit, self.train_scores, rtol=1e-6, atol=1e-9
        ):
            import pyod

            warnings.warn(
                f"{self.name}: the detector refitted at load differs from the saved one (saved with PyOD "
                f"{meta.get('versions', {}).get('pyod')}, now {pyod.__version__}): scores may differ "
                "from when the model was saved",
                RuntimeWarning,
                stacklevel=2,
            )


def _make_class(entry: PyodEntry) -> type[ClassicalDetector]:
    camel = "".join(p.capitalize() for p in entry.key.split("_"))
    doc = (
        f"{entry.title} (PyOD `{entry.cls}`) on image features: {entry.note}.\n\n"
        f"Defaults: {format_pyod_options(entry.kwargs) or 'PyOD defaults'}"
        + (f"; max_samples={entry.max_samples}" if entry.max_samples else "")
        + ". See anomalens.models.classical."
    )
    cls = type(
        f"Classical{camel}",
        (ClassicalDetector,),
        {
            "__doc__": doc,
            "__module__": __name__,
            "entry": entry,
            "name": PREFIX + entry.key,
            "stochastic": entry.seeded,
            "defaults": {**ClassicalDetector.common_defaults, "max_samples": entry.max_samples},
        },
    )
    return register(cls)


DETECTORS: dict[str, type[ClassicalDetector]] = {PREFIX + e.key: _make_class(e) for e in PYOD_TABLE}
globals().update({cls.__name__: cls for cls in DETECTORS.values()})
