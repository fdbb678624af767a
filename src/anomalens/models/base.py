"""The detector contract every method follows (scikit-learn style).

`fit` learns normality from good images, `predict` returns image scores and pixel maps at
each input's own resolution, `save`/`load` use one safetensors file whose JSON header holds
the configuration: loading never runs code.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from scipy import ndimage

from anomalens._version import __version__
from anomalens.data import Sample, calibration_split
from anomalens.data.augment import augment
from anomalens.data.drift import DriftFlag, DriftProfile
from anomalens.data.geometry import (
    Geometry,
    Placement,
    native_canvas,
    parse_size,
    place_mask,
    size_option,
    stitch,
)
from anomalens.data.inputs import (
    Batch,
    InputItem,
    Preprocess,
    SkipLog,
    as_items,
    check_intensity,
    iter_batches,
    load_item,
)
from anomalens.data.io import ImageReadError, image_shape, read_mask
from anomalens.data.progress import progress_bar
from anomalens.models.refine import Refiner
from anomalens.thresholds import (
    Calibration,
    calibrate,
    check_operating_point,
    decision_calibration,
    image_digests,
)

FORMAT_VERSION = 1
LOO_VIEWS = 4  # augmented views of each good scored for a leave-one-out calibration
ROI_KEY = "anomalens.roi"  # the region of interest's array in a model file, beside the method's own
DRIFT_PREFIX = "anomalens.drift."  # the drift profile's arrays
REFINE_PREFIX = "anomalens.refine."  # the supervised stage's arrays (`anomalens refine`)


class ModelFileError(ValueError):
    """A model file that cannot be read as an anomalens model."""


@dataclass
class Prediction:
    """Scores and maps for a list of images, in input order.

    `scores` are raw detector scores; `normalized_scores` put the calibration median at 0 and
    the calibrated threshold at 1.0 (`is_anomalous`: the raw score reaches the threshold). `drift`
    holds each image's drift flags (empty lists when the model has no drift profile), `stats` its
    drift statistics.
    """

    keys: list[str]
    scores: np.ndarray
    maps: list[np.ndarray]
    calibration: Calibration | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    drift: list[list[DriftFlag]] = field(default_factory=list)
    stats: list[dict] = field(default_factory=list)

    @property
    def normalized_scores(self) -> np.ndarray | None:
        return None if self.calibration is None else self.calibration.normalize(self.scores)

    @property
    def is_anomalous(self) -> np.ndarray | None:
        return None if self.calibration is None else self.calibration.is_anomalous(self.scores)

    def normalized_map(self, i: int) -> np.ndarray:
        if self.calibration is None:
            raise ValueError("the detector is not calibrated: fit it with calibration images")
        return self.calibration.normalize_map(self.maps[i])

    def __len__(self) -> int:
        return len(self.keys)


class Scored(NamedTuple):
    """One scored image: its key, raw score, raw map at its own (H, W), and what it was measured at."""

    key: str
    score: float
    map: np.ndarray
    drift: list[DriftFlag]  # statistics out of the training goods' range (empty without a drift profile)
    stats: dict | None  # the image's drift statistics, when measured
    image: np.ndarray | None = None  # the decoded image, with keep_images=True


@runtime_checkable
class Inferencer(Protocol):
    """What scores images, whatever runs it: a fitted `Detector`, or an exported model in ONNX
    Runtime (`anomalens.export.OnnxDetector`). Workflows, the service and the reports take any
    object with these members.
    """

    name: str
    options: dict[str, Any]
    localizes: bool

    @property
    def decision_calibration(self) -> Calibration | None:
        """The calibration that decides (its threshold at the operating point when one is set)."""

    def preprocess(self) -> Preprocess:
        """How an image (H, W[, C]) in [0, 1] becomes the model's input tensor."""

    def score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Raw image scores (B,) and anomaly maps (B, S, S) at model resolution for preprocessed pixels."""

    @property
    def map_score(self) -> dict[str, Any]:
        """How an image score is read off a map (see `score_from_map`), where the canvas score cannot be used."""

    @property
    def roi(self) -> np.ndarray | None:
        """The region of interest (True = inspect), at its own resolution; None inspects everything."""

    @property
    def drift_profile(self) -> DriftProfile | None:
        """The training goods' statistics that each image is checked against (None: no check)."""

    @property
    def refiner(self) -> Refiner | None:
        """The supervised stage that turns the image's raw score and map into its refined score (None: none)."""


def score_from_map(anomaly_map: np.ndarray, spec: dict[str, Any], roi: np.ndarray | None = None) -> float:
    """An image score from its raw map (over `roi` only, when given): the map's maximum, or with
    ``{"reduce": "topk", "k": k, "pool": p}`` the mean of the k highest p x p block averages (the
    map brought back to patch resolution, as PatchCore's top-k patch score)."""
    values = anomaly_map
    if roi is not None:
        values = np.where(roi, anomaly_map, np.float32(anomaly_map[roi].min()))
    if spec.get("reduce") == "topk":
        pool = max(1, int(spec.get("pool", 1)))
        blocks = ndimage.uniform_filter(values, size=pool, mode="nearest")[
            pool // 2 :: pool, pool // 2 :: pool
        ]
        if roi is not None:
            blocks = blocks[roi[pool // 2 :: pool, pool // 2 :: pool]]
        top = np.sort(blocks.ravel())[-max(1, int(spec["k"])) :]
        return float(top.mean())
    return float(values[roi].max() if roi is not None else values.max())


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask at another (H, W), nearest neighbour (no new pixels on either side)."""
    if tuple(mask.shape) == tuple(shape):
        return mask
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5


def assemble(
    scores: np.ndarray,
    maps: np.ndarray,
    placement: Placement,
    map_score: dict[str, Any],
    roi: np.ndarray | None,
) -> tuple[float, np.ndarray]:
    """One image's raw score and map at its own (H, W) from the scores and maps of its canvases.

    A squashed image without a region of interest keeps the model's own score; otherwise the map
    of the image's own pixels (padding cropped, tiles stitched, outside the ROI at the map's
    lowest inside value) decides the score by `map_score`, so padding and pixels outside the ROI
    never count.
    """
    shape = placement.image_shape
    if placement.squashed and roi is None:
        return float(scores[0]), resize_map(maps[0], shape)
    amap = stitch(np.asarray(maps, dtype=np.float32), placement)
    inside = None if roi is None else resize_mask(roi, amap.shape)
    score = score_from_map(amap, map_score, inside)
    full = resize_map(amap, shape)
    if roi is not None:
        inside = resize_mask(roi, shape)
        full = np.where(inside, full, np.float32(full[inside].min()))
    return score, full


def score_canvases(
    model: Inferencer, pixels: torch.Tensor, placements: list[Placement]
) -> list[tuple[float, np.ndarray]]:
    """Score the canvases of several images (`pixels`: each image's canvases in turn), at most
    `batch_size` canvases per model call (a tiled image has dozens), and return each image's raw
    score and map at its own size (see `assemble`)."""
    step = max(1, int(model.options["batch_size"]))
    parts = [model.score_batch(pixels[i : i + step]) for i in range(0, len(pixels), step)]
    scores = np.concatenate([np.asarray(s) for s, _ in parts])
    maps = np.concatenate([np.asarray(m) for _, m in parts])
    out, start = [], 0
    for placement in placements:
        part = slice(start, start + len(placement.windows))
        score, amap = assemble(scores[part], maps[part], placement, model.map_score, model.roi)
        out.append((score if model.refiner is None else model.refiner.score(score, amap), amap))
        start = part.stop
    return out


def iter_predict(
    model: Inferencer,
    images: Iterable | np.ndarray,
    *,
    progress: bool = False,
    on_error: str = "raise",
    skip_log: SkipLog | None = None,
    statistics: bool = False,
    max_pixels: int | None = None,
    keep_images: bool = False,
) -> Iterator[Scored]:
    """Yield each image's `Scored` (raw score, map at its own resolution, drift flags) as each batch
    is scored, so batch jobs can write results as they go and keep them if a later image fails.
    Images are measured for the drift check when the model has a profile, or when `statistics`;
    keep_images=True hands each decoded image on in `Scored.image`. max_pixels: the decode limit
    (default: `data.io.max_pixels_limit()`)."""
    items = as_items(images)
    preprocess, profile = model.preprocess(), model.drift_profile
    measure = statistics or profile is not None
    with progress_bar(len(items), f"{model.name}: predict", enabled=progress) as bar:
        for batch in iter_batches(
            items,
            preprocess,
            model.options["batch_size"],
            on_error=on_error,
            skip_log=skip_log,
            progress=bar,
            statistics=measure,
            max_pixels=max_pixels,
            keep_images=keep_images,
        ):
            results = score_canvases(model, batch.pixels, batch.placements)
            for i, (key, (score, amap)) in enumerate(zip(batch.keys, results)):
                stats = batch.stats[i] if measure else None
                drift = profile.check(stats) if profile is not None else []
                yield Scored(key, score, amap, drift, stats, batch.images[i] if keep_images else None)


def predict(
    model: Inferencer,
    images: Iterable | np.ndarray,
    *,
    progress: bool = False,
    on_error: str = "raise",
    calibrated: bool = True,
    statistics: bool = False,
) -> Prediction:
    """Score images with any `Inferencer`; maps come back at each image's own resolution.

    on_error='skip' logs unreadable files in `Prediction.skipped` instead of raising.
    """
    skip_log = SkipLog()
    rows = list(
        iter_predict(
            model, images, progress=progress, on_error=on_error, skip_log=skip_log, statistics=statistics
        )
    )
    return Prediction(
        keys=[r.key for r in rows],
        scores=np.array([r.score for r in rows], dtype=np.float64),
        maps=[r.map for r in rows],
        calibration=model.decision_calibration if calibrated else None,
        skipped=skip_log.skipped,
        drift=[r.drift for r in rows],
        stats=[r.stats for r in rows if r.stats is not None],
    )


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Options come as strings from `--set key=value`: convert them to the default's type."""
    if name == "image_size":
        return size_option(value)  # a number, or HxW
    if not isinstance(value, str) or isinstance(default, str) or default is None:
        return tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(v) for v in value.split(",") if v.strip())
        return type(default)(value)
    except ValueError:
        raise ValueError(
            f"option {name}={value!r}: expected {type(default).__name__} like {default!r}"
        ) from None


def _file_option_problem(
    name: str, value: Any, default: Any, bounds: tuple[float, float] | None
) -> str | None:
    """Why an option read from a model file does not fit its declared default, or None.

    The type comes from the default (bool, int, float, str, tuple of its first element's type);
    a number must be finite and within `bounds`, else within [0, max(2^20, 64 x default)] for
    defaults >= 0 (every declared default is), so a file cannot ask for a network of absurd size.
    """
    if name == "image_size":
        try:
            parse_size(value)
        except (ValueError, TypeError) as err:
            return str(err).split(": ", 1)[-1]  # without parse_size's own "option image_size=..."
        return None
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(default, str):
        return None if isinstance(value, str) else "expected a string"
    if isinstance(default, tuple):
        kind = type(default[0]) if default else None
        if not isinstance(value, (list, tuple)) or len(value) > 64:
            return "expected a list"
        for v in value:
            problem = _file_option_problem(name, v, default[0], bounds) if kind is not None else None
            if problem:
                return problem
        return None
    if isinstance(default, int) and (isinstance(value, bool) or not isinstance(value, int)):
        return "expected an integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "expected a number"
    if not math.isfinite(value):
        return "expected a finite number"
    lo, hi = bounds or (0, max(2**20, 64 * default))
    if not lo <= value <= hi:
        return f"expected a value in [{lo:g}, {hi:g}]"
    return None


class Detector(ABC):
    """Base class: subclasses set `name`, `defaults`, and implement the four hooks below."""

    name: ClassVar[str]
    #: options common to every detector; subclasses add theirs in `defaults`
    base_defaults: ClassVar[dict[str, Any]] = {
        "image_size": 256,  # the model's canvas: 256, or HxW like 192x512
        "resize": "squash",  # how images meet the canvas: squash, letterbox or native (see data/geometry.py)
        "scale": 1.0,  # native: the pixel scale (0.5 halves images)
        "tile": 0,  # native: cut images into overlapping tiles of this side (0: one canvas)
        "tile_overlap": 0.25,
        "drift_check": True,  # record the training goods' statistics and flag images outside their range
        "intensity": "none",  # per-image contrast normalization: none, standardize or stretch
        "batch_size": 8,
        "device": "auto",
        "calibration_fraction": 0.1,
        "calibration_quantile": 0.99,
        "seed": 0,
        "shots": 0,  # few-shot: fit on this many seeded goods (0: all of them)
        "augment_copies": 0,  # few-shot: this many augmented copies of each good join the fit
        "augment_flips": True,  # augmentation may flip (off for parts with a handedness)
    }
    defaults: ClassVar[dict[str, Any]] = {}
    #: (low, high) of numeric options, checked when a model file is loaded; others get the generic
    #: bound of `_file_option_problem`. Methods add theirs in `option_bounds`.
    base_option_bounds: ClassVar[dict[str, tuple[float, float]]] = {
        "scale": (1e-3, 64.0),
        "tile": (0, 8192),
        "tile_overlap": (0.0, 0.99),
        "batch_size": (1, 4096),
        "calibration_fraction": (0.0, 1.0),
        "calibration_quantile": (0.0, 1.0),
        "seed": (0, 2**32 - 1),
    }
    option_bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    #: False for methods that only score whole images: their maps are constant (the image score
    #: everywhere), pixel metrics are not computed and no regions are drawn for them
    localizes: ClassVar[bool] = True
    #: True for methods whose networks need a square input: their canvas is always square
    square_input: ClassVar[bool] = True
    #: True for methods that model each canvas position apart (PaDiM): padding must sit alike in every image
    position_dependent: ClassVar[bool] = False
    #: the --set option=value that makes the image score the anomaly map's maximum, for methods
    #: whose default image score is computed apart from their map (evaluate suggests it when the
    #: image score misses what the map finds); None where the score is the map's already
    map_max_setting: ClassVar[str | None] = None
    #: True when the fitted model depends on `seed` (a random projection, subset, initialisation or
    #: shuffling): `anomalens benchmark` then repeats it over seeds and reports mean and spread
    stochastic: ClassVar[bool] = False
    #: True when a fit takes seconds (no training): with too few goods to hold any out, the threshold
    #: then comes from leave-one-out refits; trained methods hold one good out instead
    refits_cheaply: ClassVar[bool] = True
    #: how the method uses labelled defects at fit (`fit(..., defects=)`, `fit --labels`): "none"
    #: (goods only; the supervised stage on top of any method is `anomalens refine`), "optional"
    #: (a stage that learns from them when given) or "required"
    uses_defects: ClassVar[str] = "none"
    #: True when each labelled defect must come with its pixel mask (segmentation methods)
    needs_defect_masks: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        allowed = {**self.base_defaults, **self.defaults}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(
                f"{self.name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}"
            )
        self.options = {k: _coerce(k, options.get(k, v), v) for k, v in allowed.items()}
        o = self.options
        o["image_size"] = size_option(o["image_size"])
        check_intensity(o["intensity"])
        _ = self.geometry  # building it checks resize, scale and tiles
        if self.square_input and isinstance(o["image_size"], str):
            raise ValueError(
                f"{self.name} needs a square input: give image_size as one number (e.g. 256), or "
                "use resize=letterbox to keep the aspect ratio"
            )
        #: the region of interest (True = inspect) at its own resolution, saved in the model file
        self._roi: np.ndarray | None = None
        #: the training goods' statistics, recorded at fit (drift_check), saved in the model file
        self._drift_profile: DriftProfile | None = None
        self.calibration: Calibration | None = None
        #: threshold chosen on labelled data (`anomalens threshold`), saved in the model file; when
        #: set it decides instead of the calibrated threshold (see `decision_calibration`)
        self.operating_point: dict[str, Any] | None = None
        #: the supervised stage of `anomalens refine`, saved in the model file; when set the image
        #: score is its defect probability and `calibration` is in those units
        self.refiner: Refiner | None = None
        self.fit_info: dict[str, Any] = {}
        #: the labelled defects of the running fit (and their masks, aligned; None where none)
        self._defects: list[InputItem] = []
        self._defect_masks: list[Any] = []
        self._fitted = False
        self._show_progress = False

    # -- hooks -------------------------------------------------------------------------------
    @abstractmethod
    def _preprocess(self) -> Preprocess:
        """How images are resized and normalized for this detector."""

    @abstractmethod
    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        """Learn from batches of preprocessed good images."""

    @abstractmethod
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and anomaly maps (B, S, S) at model resolution."""

    @abstractmethod
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and JSON-safe metadata that fully describe the fitted detector."""

    @abstractmethod
    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Inverse of `_state`."""

    def inference_module(self) -> torch.nn.Module | None:
        """The fitted inference graph for ONNX export, or None where the method has none.

        Contract: a module on the CPU mapping preprocessed pixels (B, C, S, S), exactly as
        `_preprocess` yields them, to (scores (B,), maps (B, S, S)) equal to `_score_batch`.
        Methods whose scoring is plain torch should score through this same module.
        """
        return None

    # -- public API ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        d = self.options["device"]
        if d == "auto":
            d = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.device(d)

    def fit(
        self,
        images: Iterable | np.ndarray,
        calibration: Iterable | np.ndarray | None = None,
        *,
        progress: bool = False,
        roi: str | Path | np.ndarray | None = None,
        defects: Iterable | np.ndarray | None = None,
        defect_masks: Sequence | None = None,
    ) -> Detector:
        """Learn normality from good images and calibrate the threshold.

        Without `calibration`, a deterministic `calibration_fraction` of the goods is held out
        for it (never test images); when that rounds to none (5 goods or fewer at 0.1), the
        threshold comes from augmented leave-one-out scores instead (see `_leave_one_out`).
        `shots`: fit on that many seeded goods; `augment_copies`: add augmented copies of each good.
        `roi`: see `set_roi`. With resize=native and no tiles, the canvas is sized here to hold
        every training image at `scale`.
        `defects`: labelled defective images for methods that learn from them (`uses_defects`), with
        `defect_masks` (paths, arrays or None, aligned) where the method needs masks. Their path
        digests are kept in `fit_info` so `evaluate` never counts them. The threshold still comes
        from held-out goods.
        """
        if roi is not None:
            self.set_roi(roi)
        o = self.options
        self.fit_info = {}
        self._set_defects(defects, defect_masks)
        items = self._pick_shots(as_items(images))
        if not items:
            raise ValueError("fit got no images")
        loo = None
        if calibration is None and self.refits_cheaply and round(o["calibration_fraction"] * len(items)) == 0:
            fit_items, cal_items = items, []
            loo = self._leave_one_out(items)
        elif calibration is None:
            fit_items, cal_items = split_items(items, o["calibration_fraction"], o["seed"])
        else:
            fit_items, cal_items = items, as_items(calibration)
        if not fit_items:
            raise ValueError("fit got no images")
        fit_items = self._augmented(self._hold_out_validation(fit_items), o["augment_copies"], o["seed"])
        self._prepare_fit(fit_items)
        torch.manual_seed(self.options["seed"])
        shapes = [_item_shape(it) for it in fit_items]
        if self.options["resize"] == "native" and not self.options["tile"]:
            h, w = native_canvas(shapes, self.options["scale"])
            self.options["image_size"] = size_option(max(h, w) if self.square_input else (h, w))
        geometry = self.geometry
        placements = [geometry.place(h, w) for h, w in shapes]
        n_inputs = sum(len(p.windows) for p in placements)
        extents = {(p.windows[0].height, p.windows[0].width) for p in placements if not p.squashed}
        if self.position_dependent and len(extents) > 1:
            # a Gaussian per canvas position would mix padding and part where the images' extents differ
            self.fit_info["warnings"] = [
                f"{self.name} models each canvas position, but the training images fill the {geometry.resize} "
                "canvas to different extents (their aspect ratios or sizes differ): use resize=squash"
            ]
        self._show_progress = progress  # methods with long fitting steps show their own bars
        measure = bool(self.options["drift_check"])
        self._drift_profile = None  # an earlier fit's goods say nothing about these
        self.refiner = None  # trained on the old fit's scores and maps
        fit_stats: list[dict] = []

        def fit_batches(bar) -> Iterator[Batch]:
            step = self.options["batch_size"]
            for batch in iter_batches(fit_items, self.preprocess(), step, progress=bar, statistics=measure):
                fit_stats.extend(batch.stats)
                # the methods see at most batch_size canvases at once: a tiled image brings dozens
                for i in range(0, len(batch.pixels), step):
                    yield replace(batch, pixels=batch.pixels[i : i + step])

        start = time.perf_counter()
        with progress_bar(len(fit_items), f"{self.name}: features", enabled=progress) as bar:
            self._fit_batches(fit_batches(bar), n_inputs)
        self._fitted = True
        self._defects, self._defect_masks = [], []  # learnt from: not kept in memory
        fit_seconds = time.perf_counter() - start
        cal = loo or self.predict(cal_items, progress=progress, calibrated=False, statistics=measure)
        self.calibration = calibrate(cal.scores, cal.maps, quantile=self.options["calibration_quantile"])
        if measure and fit_stats + cal.stats:
            self._drift_profile = DriftProfile.fit(fit_stats + cal.stats, seed=self.options["seed"])
        self.operating_point = None  # chosen for the old fit: no longer valid
        if loo is not None:
            self.fit_info["calibration"] = f"augmented leave-one-out ({len(loo)} scores)"
        self.fit_info.update(
            n_fit=len(fit_items),
            n_calibration=len(cal_items),
            n_model_inputs=n_inputs,
            fit_seconds=round(fit_seconds, 3),
            anomalens_version=__version__,
        )
        return self

    def _set_defects(self, defects: Iterable | np.ndarray | None, masks: Sequence | None) -> None:
        """Check the labelled defects against the method's `uses_defects` and keep them for the fit."""
        items = as_items(defects) if defects is not None else []
        masks = list(masks) if masks is not None else [None] * len(items)
        if len(masks) != len(items):
            raise ValueError(f"{len(items)} labelled defects but {len(masks)} defect masks")
        if items and self.uses_defects == "none":
            raise ValueError(
                f"{self.name} learns from goods only: it takes no labelled defects (to learn from them on "
                "top of it, use `anomalens refine MODEL --labels SOURCE`)"
            )
        if not items and self.uses_defects == "required":
            raise ValueError(
                f"{self.name} learns from labelled defects: give some (fit --labels SOURCE, or "
                "--train-defects K for an MVTec-layout dataset; Python: fit(goods, defects=...))"
            )
        if self.needs_defect_masks:
            missing = [it.key for it, m in zip(items, masks) if m is None]
            if missing:
                raise ValueError(
                    f"{self.name} needs a pixel mask for each labelled defect; none for "
                    f"{len(missing)} of {len(items)}, e.g. '{missing[0]}'"
                )
        self._defects, self._defect_masks = items, masks
        if items:
            self.fit_info["defects"] = {
                "n": len(items),
                "image_digests": image_digests(it.key for it in items if it.path is not None),
            }

    def labelled_defects(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The running fit's labelled defects as the model sees its goods, all at once (they are
        few): pixels (N, C, H, W) and masks (N, H, W) float 0/1 on the same canvases, None unless
        every defect has one. Masks follow the images through the geometry (resize, padding,
        tiles) by nearest neighbour. No defects: an empty pixel tensor."""
        pre = self.preprocess()
        masked = all(m is not None for m in self._defect_masks)
        by_key = {it.key: m for it, m in zip(self._defects, self._defect_masks)}
        pixels, masks = [], []
        for batch in iter_batches(self._defects, pre, self.options["batch_size"]):
            pixels.append(batch.pixels)
            for key, shape, placement in zip(batch.keys, batch.shapes, batch.placements) if masked else ():
                given = by_key[key]
                mask = read_mask(given, shape=shape) if not isinstance(given, np.ndarray) else given > 0
                if mask.shape != tuple(shape):
                    raise ValueError(f"mask of '{key}' is {mask.shape}, the image {tuple(shape)}")
                masks.append(torch.from_numpy(place_mask(mask, placement)))
        if not pixels:
            return torch.empty(0, pre.channels, *self.input_size), None
        return torch.cat(pixels), torch.cat(masks).float() if masked else None

    @property
    def trained_on(self) -> set[str]:
        """Digests of the labelled images this model (or its refine stage) learnt from: never evaluated."""
        digests = set(self.fit_info.get("defects", {}).get("image_digests", []))
        return digests | (self.refiner.trained_on if self.refiner is not None else set())

    def _pick_shots(self, items: list[InputItem]) -> list[InputItem]:
        """`shots` seeded goods (all when 0), in input order."""
        k = self.options["shots"]
        if not k:
            return items
        if not 0 < k <= len(items):
            raise ValueError(f"option shots={k}: got {len(items)} good images; give 1 to {len(items)}")
        chosen = np.random.default_rng(self.options["seed"]).choice(len(items), size=k, replace=False)
        self.fit_info["shots"] = [items[i].key for i in sorted(chosen)]
        return [items[i] for i in sorted(chosen)]

    def _augmented(self, items: list[InputItem], n: int, seed: int) -> list[InputItem]:
        """The items, then `n` augmented copies of each (held in memory: meant for few goods)."""
        if n <= 0:
            return items
        extra = []
        for i, it in enumerate(items):
            views = augment(load_item(it), n, seed * 7919 + i, flips=self.options["augment_flips"])
            extra += [InputItem(f"{it.key}#aug{j}", array=v) for j, v in enumerate(views)]
        return items + extra

    def _leave_one_out(self, items: list[InputItem]) -> Prediction:
        """Calibration scores when too few goods to hold any out: each good's augmented views
        (never in the bank) scored by a model fitted on the other goods (and their augmentations);
        with a single good, by a model of its own other augmented views. Warns how uncertain that is."""
        o = self.options
        n_views = max(o["augment_copies"], LOO_VIEWS)
        clone_options = {**o, "shots": 0, "drift_check": False}
        scores, maps = [], []
        for i, it in enumerate(items):
            others = [x for j, x in enumerate(items) if j != i] or [it]
            views = self._augmented([it], n_views, o["seed"] + 1000 + i)[1:]  # seeds apart from the fit's
            clone = self._sibling(**clone_options)
            clone._roi = self._roi
            clone._fit_on(
                self._augmented(others, max(o["augment_copies"], 1 if len(items) == 1 else 0), o["seed"])
            )
            pred = clone.predict(views, calibrated=False)
            scores.append(pred.scores)
            maps += pred.maps
        scores = np.concatenate(scores)
        alone = " of the one good against its own other copies" if len(items) == 1 else ""
        self.fit_info.setdefault("warnings", []).append(
            f"only {len(items)} good image(s): the threshold is a {o['calibration_quantile']} quantile of "
            f"{len(scores)} augmented leave-one-out scores{alone}, an uncertain estimate (their spread: "
            f"{scores.min():.4g} to {scores.max():.4g}); set it on labelled parts with `anomalens threshold` "
            "or refit with more goods"
        )
        return Prediction([f"loo[{i}]" for i in range(len(scores))], scores, maps)

    def _sibling(self, **options: Any) -> Detector:
        """A new unfitted detector of this method (a leave-one-out model); methods share what they can."""
        return type(self)(**options)

    def _fit_on(self, items: list[InputItem]) -> None:
        """Fit the method on items without calibrating (the leave-one-out models)."""
        placements = [self.geometry.place(*_item_shape(it)) for it in items]
        step = self.options["batch_size"]

        def batches() -> Iterator[Batch]:
            for batch in iter_batches(items, self.preprocess(), step):
                for i in range(0, len(batch.pixels), step):
                    yield replace(batch, pixels=batch.pixels[i : i + step])

        torch.manual_seed(self.options["seed"])
        self._fit_batches(batches(), sum(len(p.windows) for p in placements))
        self._fitted = True

    @property
    def geometry(self) -> Geometry:
        """How images of any size meet this detector's canvas (options image_size, resize, scale, tile)."""
        o = self.options
        return Geometry(parse_size(o["image_size"]), o["resize"], o["scale"], o["tile"], o["tile_overlap"])

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) of each tensor the networks see: the canvas, or a tile."""
        return self.geometry.model_input

    @property
    def input_side(self) -> int:
        """The side of the square input of methods with `square_input` (their networks' image size)."""
        h, w = self.input_size
        if h != w:
            raise ValueError(f"{self.name} needs a square input, got {h}x{w}: use resize=letterbox or tiles")
        return h

    def preprocess(self) -> Preprocess:
        """How images are brought onto the canvas and normalized (the `Inferencer` protocol). The
        canvas is the method's own input size (e.g. a classical detector's pixel_size)."""
        pre = self._preprocess()
        own, geometry = parse_size(pre.image_size), self.geometry
        if not geometry.tiled:
            geometry = replace(geometry, canvas=own)
        elif own != geometry.model_input:
            raise ValueError(
                f"{self.name}: its input is {own[1]}x{own[0]} px, not the {geometry.tile} px tile: "
                "tiles need a model that sees whole tiles"
            )
        return replace(pre, image_size=geometry.model_input, geometry=geometry)

    @property
    def map_score(self) -> dict[str, Any]:
        """How the image score is read off the map where the canvas score would count padding or
        pixels outside the ROI: its maximum (methods may say otherwise)."""
        return {"reduce": "max"}

    @property
    def roi(self) -> np.ndarray | None:
        return self._roi

    @property
    def drift_profile(self) -> DriftProfile | None:
        return self._drift_profile

    def set_roi(self, roi: str | Path | np.ndarray | None) -> None:
        """The region of interest: a mask image (white = inspect) or a boolean array; None clears it.
        Pixels outside never score and never produce regions. Set it before `fit`, whose threshold
        is calibrated with it."""
        if roi is None:
            self._roi = None
            return
        mask = read_mask(roi) if isinstance(roi, (str, Path)) else np.asarray(roi) > 0
        if mask.ndim != 2 or not mask.any():
            raise ValueError("the region of interest must be a 2-D mask with some white (inspected) pixels")
        self._roi = mask

    def score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (B,) and maps (B, S, S) at model resolution (the `Inferencer` protocol)."""
        self._check_fitted()
        return self._score_batch(pixels)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{self.name} is not fitted: call fit() or load a model file first")

    def _prepare_fit(self, items: list[InputItem]) -> None:  # noqa: B027 - optional hook, most need nothing
        """Anything a method sets up from the goods it fits on before their features are taken
        (an INT8 backbone's calibration, see feature_base.py); nothing by default."""

    def _hold_out_validation(self, items: list[InputItem]) -> list[InputItem]:
        """The goods to fit on, after a method has set aside what it validates on (trained methods:
        early stopping, the best epoch, normalization quantiles). Never the calibration goods: a
        threshold taken on images the model was selected on would be biased low."""
        return items

    def iter_predict(self, images: Iterable | np.ndarray, **options: Any) -> Iterator[Scored]:
        """Yield each image's `Scored` (raw score, map at its own resolution, drift flags) as each
        batch is scored; options as `models.base.iter_predict` (progress, on_error, skip_log,
        statistics)."""
        self._check_fitted()
        return iter_predict(self, images, **options)

    def predict(self, images: Iterable | np.ndarray, **options: Any) -> Prediction:
        """Score images; maps come back at each image's own resolution. Options as
        `models.base.predict`: progress, on_error ('skip' lists unreadable files in
        `Prediction.skipped` instead of raising), calibrated, statistics."""
        self._check_fitted()
        return predict(self, images, **options)

    @property
    def decision_calibration(self) -> Calibration | None:
        """The calibration that decides: its threshold moved to the operating point when one is set."""
        return decision_calibration(self.calibration, self.operating_point)

    def save(self, path: str | Path) -> Path:
        if not self._fitted:
            raise RuntimeError(f"{self.name} is not fitted: nothing to save")
        arrays, meta = self._state()
        if self._roi is not None:
            arrays = {**arrays, ROI_KEY: self._roi.astype(np.uint8)}
        drift = None
        if self._drift_profile is not None:
            drift_arrays, drift = self._drift_profile.to_arrays_and_meta()
            arrays = {**arrays, **{DRIFT_PREFIX + k: v for k, v in drift_arrays.items()}}
        refine = None
        if self.refiner is not None:
            refine_arrays, refine = self.refiner.to_arrays_and_meta()
            arrays = {**arrays, **{REFINE_PREFIX + k: v for k, v in refine_arrays.items()}}
        header = {
            "format_version": FORMAT_VERSION,
            "detector": self.name,
            "options": self.options,
            "calibration": self.calibration.to_dict() if self.calibration else None,
            "operating_point": self.operating_point,
            "fit_info": self.fit_info,
            "drift": drift,
            "refine": refine,
            "state": meta,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {k: np.ascontiguousarray(v) for k, v in arrays.items()},
            str(tmp),
            metadata={"anomalens": json.dumps(header)},
        )
        tmp.replace(path)  # a crash mid-write never leaves a half model under the real name
        return path

    @classmethod
    def load(cls, path: str | Path) -> Detector:
        """A fitted detector from its model file. Everything in the file is checked first (see
        `read_model_file` and `check_file_options`), then the detector scores one blank canvas:
        any file it cannot be rebuilt from ends in one `ModelFileError`, never a later traceback
        or a NaN score."""
        from anomalens.backbones import BackboneError
        from anomalens.registry import available, get_class

        header, arrays = read_model_file(path)
        name = header["detector"]
        if not isinstance(name, str) or name not in available():
            raise ModelFileError(f"'{path}': unknown detector {name!r}")
        detector_cls = get_class(name)
        detector_cls.check_file_options(header["options"], path)
        try:
            detector = detector_cls(**header["options"])
            roi = arrays.pop(ROI_KEY, None)
            if roi is not None and (roi.ndim != 2 or not roi.any()):
                raise ValueError(
                    f"region of interest of shape {roi.shape}: expected a 2-D mask with some pixels"
                )
            detector._roi = None if roi is None else roi > 0
            drift = {
                k[len(DRIFT_PREFIX) :]: arrays.pop(k) for k in list(arrays) if k.startswith(DRIFT_PREFIX)
            }
            if header["drift"]:
                detector._drift_profile = DriftProfile.from_arrays_and_meta(drift, header["drift"])
            refine = {
                k[len(REFINE_PREFIX) :]: arrays.pop(k) for k in list(arrays) if k.startswith(REFINE_PREFIX)
            }
            if header["refine"]:
                detector.refiner = Refiner.from_arrays_and_meta(refine, header["refine"])
            detector._restore(arrays, header["state"])
            detector.calibration = (
                Calibration.from_dict(header["calibration"]) if header["calibration"] is not None else None
            )
            check_operating_point(header["operating_point"])
            detector.operating_point = header["operating_point"]
            detector.fit_info = header["fit_info"]
            detector._fitted = True
            detector._check_scores()
        except (ModelFileError, BackboneError):
            raise
        except Exception as err:  # the file is what failed: say so in one line, whatever broke
            if isinstance(err, KeyError):  # a method's _restore reading an array or entry that is not there
                reason = f"no {err} in the file"
            else:
                reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
            raise ModelFileError(f"'{path}' does not hold a usable {name} model: {reason}") from None
        return detector

    @classmethod
    def check_file_options(cls, options: Any, path: str | Path = "model file") -> None:
        """ModelFileError unless `options` (read from a file) are this detector's own, each of its
        default's type and within its bounds (`base_option_bounds`, `option_bounds`)."""
        if not isinstance(options, dict):
            raise ModelFileError(f"'{path}': options must be an object, got {type(options).__name__}")
        allowed = {**cls.base_defaults, **cls.defaults}
        bounds = {**cls.base_option_bounds, **cls.option_bounds}
        unknown = sorted(set(options) - set(allowed), key=str)
        if unknown:
            raise ModelFileError(
                f"'{path}': unknown option(s) for {cls.name}: {', '.join(map(str, unknown))}"
            )
        for key, value in options.items():
            problem = _file_option_problem(key, value, allowed[key], bounds.get(key))
            if problem:
                raise ModelFileError(f"'{path}': option {key}={value!r:.60}: {problem}")

    def _check_scores(self) -> None:
        """Score one blank canvas: arrays of the wrong shape fail here rather than on the first
        image, and a model that scores NaN is refused (a NaN image score would pass)."""
        pre = self.preprocess()
        h, w = pre.input_size
        scores, maps = self.score_batch(torch.zeros(1, pre.channels, h, w))
        scores, maps = np.asarray(scores), np.asarray(maps)
        if scores.shape != (1,) or maps.ndim != 3 or maps.shape[0] != 1:
            raise ValueError(
                f"a blank image scores {scores.shape} with a map {maps.shape}: expected (1,), (1, H, W)"
            )
        if np.isnan(scores).any() or np.isnan(maps).any():
            raise ValueError("a blank image scores NaN")

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.options.items() if v != {**self.base_defaults, **self.defaults}[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


def split_items(
    items: list[InputItem], fraction: float, seed: int
) -> tuple[list[InputItem], list[InputItem]]:
    """(kept, held out): a deterministic `fraction` of the items (at least one, at most all but one),
    chosen by a seeded hash of their names as `data.calibration_split` does."""
    by_key = {it.key: it for it in items}
    samples = [Sample(path=Path(it.key), label=0) for it in items]
    kept, held = calibration_split(samples, fraction=fraction, seed=seed)
    return [by_key[str(s.path)] for s in kept], [by_key[str(s.path)] for s in held]


def _item_shape(item: InputItem) -> tuple[int, int]:
    """(H, W) of an input without decoding a file's pixels."""
    if item.array is not None:
        return tuple(np.asarray(item.array).shape[:2])
    try:
        return image_shape(item.path)
    except ImageReadError:  # decoding it gives the one clear error the user should see
        return load_item(item).shape[:2]


#: what a model file's header holds, with the JSON type of each entry
_HEADER_KEYS = {
    "format_version": int,
    "detector": str,
    "options": dict,
    "calibration": (dict, type(None)),
    "operating_point": (dict, type(None)),
    "fit_info": dict,
    "drift": (dict, type(None)),
    "refine": (dict, type(None)),
    "state": dict,
}
#: entries files written before they existed may lack
_HEADER_OPTIONAL = {"operating_point": None, "fit_info": {}, "drift": None, "refine": None}
#: array dtypes a model file may hold (safetensors reads others too: none of ours writes them)
_ARRAY_DTYPES = ("float16", "float32", "float64", "int32", "int64", "uint8", "bool")


def check_model_path(path: str | Path) -> Path:
    """`path` as a Path if it is a file; else a ModelFileError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise ModelFileError(f"model file '{path}' is a folder: give the file written by `anomalens fit`")
    if not path.is_file():
        raise ModelFileError(f"model file '{path}' not found")
    return path


def read_model_file(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of a model file, checked: a JSON object with every key of
    `_HEADER_KEYS` of its type, arrays of known dtypes with finite values; ModelFileError otherwise."""
    path = check_model_path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        arrays = load_file(str(path))
        header = json.loads(meta["anomalens"])
    except PermissionError:
        raise ModelFileError(f"model file '{path}' cannot be read: permission denied") from None
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as err:
        raise ModelFileError(f"'{path}' is not an anomalens model file ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"'{path}': the model header must be a JSON object, got {type(header).__name__}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(
            f"'{path}' has model format {header.get('format_version')!r:.40}, "
            f"this anomalens reads format {FORMAT_VERSION}"
        )
    header = {**_HEADER_OPTIONAL, **header}
    for key, kind in _HEADER_KEYS.items():
        if key not in header:
            raise ModelFileError(f"'{path}': the model header has no '{key}'")
        if isinstance(header[key], bool) or not isinstance(header[key], kind):
            raise ModelFileError(f"'{path}': the model header's '{key}' has the wrong type")
    for name, array in arrays.items():
        if array.dtype.name not in _ARRAY_DTYPES:
            raise ModelFileError(f"'{path}': array '{name}' has dtype {array.dtype}")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ModelFileError(f"'{path}': array '{name}' holds NaN or infinite values")
    return header, arrays


def resize_map(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bring a model-resolution map back to the image's own (H, W)."""
    if tuple(anomaly_map.shape) == tuple(shape):
        return anomaly_map.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(anomaly_map, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False)[0, 0].numpy()
