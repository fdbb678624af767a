"""The classical-detector study: every `classical:*` detector on every representation, one table.

    from anomalens.workflows.classical_study import run_study
    result = run_study("../shared/datasets/magnetic_tile/magnetic_tile", "classical:all",
                       ["raw", "pca:300", "pca:700", "kpca-rbf:300", "deep"], "study/")
    print(result.ranked("image_auroc")[:5])

How it runs:

- The training goods are split into fit and calibration goods exactly as `Detector.fit` does
  (`calibration_split`, `calibration_fraction`, `seed`); the test split is never used for fitting.
- Each representation is fitted once on the fit goods and applied once to the calibration and test
  images; its matrices are cached under OUT/features/<spec>/ (.npy, no pickle) and shared by all
  detectors, so a study costs one feature extraction per representation, not one per cell.
- A *cell* is (detector, representation): fit the PyOD detector on the training matrix
  (`ClassicalDetector.fit_matrix`, the same code as `fit`), score calibration and test, then
  image AUROC / AP / F1-max, F1 at PyOD's own threshold (`predict`), at `predict_proba` > 0.5, and
  at the calibrated threshold; fit and scoring seconds.
- Cells run one at a time in a worker process (`runs.Worker`), so each has a wall-clock budget
  (`cell_budget_s`): a cell past it is killed and recorded as skipped with that reason. Before a
  cell starts, the slow-detector guard estimates its time (`estimate_seconds`) and skips it with
  the estimate when that already passes the budget. Degenerate inputs (too few images for a
  PCA or for the neighbours, identical images, ...) are recorded as skipped with the detector's
  one-line reason. Every cell therefore ends as `ok` or `skipped` (or `failed` for a crash).
- Each finished cell is appended to OUT/cells.jsonl at once. Running the same study again reuses
  the cells recorded there (failed cells are retried; cells skipped for the budget are retried
  when the budget is now larger), so a crashed or interrupted study resumes where it stopped.
- report/study_report.py writes the result: OUT/study.json holds everything; OUT/study.md the ranked
  table (by AUROC), the top 5 by F1 at the PyOD threshold and by AUROC, the skipped cells with their
  reasons and the machine's load.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.workflows.runs import (
    CELLS_FILE,
    CellError,
    CellTimeout,
    Worker,
    append_cell,
    resume_cells,
    serve_tasks,
)

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_FEATURES", "StudyResult", "parse_study_sets", "ranked", "run_study"]

DEFAULT_FEATURES = ("raw", "pca:300", "pca:700", "kpca-rbf:300", "deep")
WORKER_CMD = [sys.executable, "-m", "anomalens.workflows.classical_study", "--worker"]
FEATURES_DIR = "features"
FEATURES_VERSION = 1


@dataclass
class StudyResult:
    cells: list[dict[str, Any]]  # latest record of every planned cell, in plan order
    features: dict[str, dict[str, Any]]  # per representation: dims, times, or why it failed
    config: dict[str, Any]  # data, detectors, options, budget, machine and load: the outputs' header
    n_run: int = 0
    n_reused: int = 0

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["status"] == "ok"]

    def ranked(self, key: str = "image_auroc") -> list[dict[str, Any]]:
        return ranked(self.cells, key)


# -- options ---------------------------------------------------------------------------------------
def parse_study_sets(
    pairs: Iterable[str], names: Sequence[str]
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """`key=value` for every detector, `classical:knn.key=value` (or `knn.key=value`) for one.

    The value may hold '=' and ';' (e.g. `classical:knn.pyod=n_neighbors=10;method=mean`). Shared
    options are kept apart (the study records them once); scoped ones go through the benchmark's
    parser after bare detector names get their `classical:` prefix."""
    from anomalens.models.classical import PREFIX
    from anomalens.workflows.benchmark import parse_model_sets

    common: dict[str, str] = {}
    scoped: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        model, dot, option = key.strip().partition(".")
        if sep and key.strip() and not dot:
            common[model] = value.strip()
        else:
            scoped.append(pair if not dot or model.startswith(PREFIX) else PREFIX + pair.strip())
    return common, parse_model_sets(scoped, names)


# -- features --------------------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _feature_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that change the features (the cache key of a representation)."""
    keys = (
        "image_size",
        "intensity",
        "batch_size",
        "pixel_size",
        "color",
        "pca_max_samples",
        "kpca_max_samples",
        "max_patches",
        "seed",
        "backbone",
        "weights",
        "calibration_fraction",
    )
    return {k: options[k] for k in keys if k in options}


def _compute_features(
    spec: str, host, fit_items, cal_items, test_items, folder: Path, logf, progress: bool
) -> dict[str, Any]:
    """Fit the representation on the fit goods, transform calibration and test images, cache as .npy."""
    from anomalens.data.inputs import iter_batches
    from anomalens.data.progress import progress_bar

    pre = host.preprocess()
    bs = host.options["batch_size"]
    start = time.perf_counter()
    rep = host._new_representation()
    rep.start(len(fit_items))
    with progress_bar(len(fit_items), f"{spec}: fit", enabled=progress) as bar:
        for batch in iter_batches(fit_items, pre, bs, progress=bar):
            rep.add(batch.pixels)
    train = rep.finish()
    fit_s = time.perf_counter() - start
    host.rep = rep

    def transform(items, label):
        rows, keys = [], []
        with progress_bar(len(items), f"{spec}: {label}", enabled=progress) as bar:
            for batch in iter_batches(items, pre, bs, progress=bar):
                rows.append(rep.transform(batch.pixels))
                keys += batch.keys
        return np.concatenate(rows), keys

    t = time.perf_counter()
    cal, cal_keys = transform(cal_items, "calibration")
    test, test_keys = transform(test_items, "test")
    transform_s = time.perf_counter() - t
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("calibration", cal), ("test", test)):
        np.save(folder / f"{name}.npy", np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    n_scored = len(cal_keys) + len(test_keys)
    info = {
        "status": "ok",
        "features": spec,
        "train_shape": list(train.shape),
        "test_shape": list(test.shape),
        "fit_s": round(fit_s, 3),
        "transform_ms_per_image": round(1000 * transform_s / max(1, n_scored), 2),
        "representation": rep.info,
        "test_keys": test_keys,
        "version": FEATURES_VERSION,
    }
    (folder / "meta.json").write_text(json.dumps(info))
    logf(
        f"features {spec}: train {tuple(train.shape)} in {fit_s:.1f} s, "
        f"{info['transform_ms_per_image']:.1f} ms per scored image"
    )
    return info


# -- one cell (runs in the worker) -----------------------------------------------------------------
_MATRICES: dict[str, dict[str, np.ndarray]] = {}


def run_cell(task: dict[str, Any]) -> dict[str, Any]:
    """Fit one detector on cached features and score calibration + test; JSON-safe result."""
    from anomalens.registry import create

    folder = task["folder"]
    if folder not in _MATRICES:
        _MATRICES.clear()
        _MATRICES[folder] = {
            k: np.load(Path(folder) / f"{k}.npy", mmap_mode="r") for k in ("train", "calibration", "test")
        }
    m = _MATRICES[folder]
    try:
        det = create(task["detector"], features=task["features"], **task["options"])
        start = time.perf_counter()
        det.fit_matrix(np.asarray(m["train"]))
        pyod_fit_s = time.perf_counter() - start
        cal_scores, _ = det.score_matrix(np.asarray(m["calibration"]))
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        test_scores, _ = det.score_matrix(np.asarray(m["test"]))
        score_s = time.perf_counter() - start
        reading = det.pyod_reading(test_scores)
    except ValueError as err:  # degenerate input or options: the detector's own one-line reason
        return {"status": "skipped", "reason": str(err).splitlines()[0]}
    except Exception as err:  # noqa: BLE001 - recorded, the study goes on
        return {
            "status": "failed",
            "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
            "traceback": traceback.format_exc(limit=4),
        }
    if not (np.isfinite(test_scores).all() and np.isfinite(cal_scores).all()):
        return {
            "status": "skipped",
            "reason": f"{task['detector']} gave NaN/inf scores on {task['features']}",
        }
    return {
        "status": "ok",
        "fit_s": round(fit_s, 4),
        "pyod_fit_s": round(pyod_fit_s, 4),
        "score_s": round(score_s, 4),
        "n_train_vectors": int(det.train.shape[0]),
        "pyod_threshold": reading.threshold,
        "test_scores": test_scores.tolist(),
        "calibration_scores": cal_scores.tolist(),
        "pyod_labels": reading.labels.tolist(),
        "proba_labels": reading.proba_labels.tolist(),
    }


# -- metrics ---------------------------------------------------------------------------------------
def _f1_from_labels(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    y, pred = y.astype(bool), pred.astype(bool)
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "f1": 2 * p * r / (p + r) if p + r else 0.0,
        "precision": p,
        "recall": r,
        "flagged": int(pred.sum()),
    }


def _cell_metrics(labels: np.ndarray, res: dict[str, Any], quantile: float) -> dict[str, Any]:
    import warnings

    from anomalens.metrics import image_metrics
    from anomalens.thresholds import calibrate

    scores = np.asarray(res["test_scores"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        im = image_metrics(labels, scores)
    cal = calibrate(np.asarray(res["calibration_scores"]), None, quantile=quantile)
    pyod = _f1_from_labels(labels, np.asarray(res["pyod_labels"]))
    proba = _f1_from_labels(labels, np.asarray(res["proba_labels"]))
    calibrated = _f1_from_labels(labels, scores >= cal.threshold)
    return {
        "image_auroc": im["image_auroc"],
        "image_ap": im["image_ap"],
        "image_f1_max": im["image_f1_max"],
        "f1_pyod": pyod["f1"],
        "precision_pyod": pyod["precision"],
        "recall_pyod": pyod["recall"],
        "flagged_pyod": pyod["flagged"] / max(1, len(labels)),
        "f1_proba": proba["f1"],
        "f1_calibrated": calibrated["f1"],
        "precision_calibrated": calibrated["precision"],
        "recall_calibrated": calibrated["recall"],
        "calibrated_threshold": cal.threshold,
    }


# -- the study -------------------------------------------------------------------------------------
def _backfill(rec: dict[str, Any]) -> dict[str, Any]:
    """Fill metrics added since a cell was recorded, from what the record holds."""
    if rec.get("status") == "ok" and "flagged_pyod" not in rec and "test_scores" in rec:
        scores = np.asarray(rec["test_scores"])
        rec["flagged_pyod"] = float((scores > rec["pyod_threshold"]).mean())
    return rec


def _reusable(rec: dict[str, Any] | None, budget: float | None) -> bool:
    if rec is None or rec.get("status") == "failed":
        return False
    if rec.get("status") == "skipped" and rec.get("budget_s") is not None:
        return budget is not None and budget <= rec["budget_s"]
    return True


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_study(
    data: str | Path,
    detectors: str | Sequence[str] = "classical:all",
    features_list: str | Sequence[str] = DEFAULT_FEATURES,
    out_dir: str | Path = "classical_study",
    *,
    options: Mapping[str, Any] | None = None,
    per_detector: Mapping[str, Mapping[str, Any]] | None = None,
    cell_budget_s: float | None = 120.0,
    guard: bool = True,
    in_process: bool = False,
    progress: bool = False,
    log_fn: Callable[[str], None] | None = None,
) -> StudyResult:
    """Run (or resume) the study into OUT/cells.jsonl (and OUT/features/); report.study_report writes
    the result's OUT/study.json and OUT/study.md.

    `options` apply to every detector (e.g. {"pixel_size": 64, "seed": 0}), `per_detector` to one
    (keys are detector names). `cell_budget_s` (None = no limit) bounds each cell's wall time;
    `guard` skips cells whose estimated time already passes it. `in_process` runs cells here
    instead of in a worker process (no hard budget then: for tests and debugging).
    """
    from anomalens.data import calibration_split, load_dataset
    from anomalens.data.inputs import as_items
    from anomalens.models.classical import TABLE, ClassicalDetector, estimate_seconds, expand_models
    from anomalens.models.components.representations import FeatureSpec
    from anomalens.registry import create, get_class

    logf = log_fn or (lambda message: log.info("%s", message))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = expand_models(detectors)
    specs = [
        str(FeatureSpec.parse(f))
        for f in (
            [s for s in features_list.split(",") if s.strip()]
            if isinstance(features_list, str)
            else features_list
        )
    ]
    if not names or not specs:
        raise ValueError("the study needs at least one detector and one representation")
    options = dict(options or {})
    per_detector = {expand_models([k])[0]: dict(v) for k, v in (per_detector or {}).items()}
    unknown = sorted(set(per_detector) - set(names))
    if unknown:
        raise ValueError(f"options given for {', '.join(unknown)}, which the study does not run")
    for name in names:
        cls = get_class(name)
        if not issubclass(cls, ClassicalDetector):
            raise ValueError(f"{name} is not a classical detector: the study runs classical:* detectors")
    # validate every option now, before anything is computed
    hosts = {}
    for spec in specs:
        for name in names:
            det = create(name, **{**options, **per_detector.get(name, {}), "features": spec})
            host = hosts.setdefault(spec, det)
            if _feature_options(det.options) != _feature_options(host.options):
                raise ValueError(
                    f"{name}: options that change the features or the calibration split "
                    f"({', '.join(_feature_options(det.options))}) must be the same for every detector "
                    "of a study: set them without a detector prefix"
                )
    dataset = load_dataset(data)
    if not dataset.test or not dataset.test_good or not dataset.test_defective:
        raise ValueError(f"'{data}' needs test images of both goods and defects for a study")
    host0 = next(iter(hosts.values()))
    o = host0.options
    fit_s, cal_s = calibration_split(dataset.train, fraction=o["calibration_fraction"], seed=o["seed"])
    labels = np.array([s.label for s in dataset.test])
    by_key = {str(s.path): s for s in dataset.test}
    cells_path = out / CELLS_FILE
    done = resume_cells(cells_path)
    config = {
        "data": str(Path(data).resolve()),
        "dataset": dataset.summary(),
        "detectors": names,
        "features": specs,
        "options": options,
        "per_detector": per_detector,
        "cell_budget_s": cell_budget_s,
        "n_fit": len(fit_s),
        "n_calibration": len(cal_s),
        "n_test": len(dataset.test),
        "started": datetime.now().isoformat(timespec="seconds"),
        "load_average_start": _load_average(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    logf(
        f"study: {dataset.summary()}; {len(names)} detectors x {len(specs)} representations; "
        f"{len(fit_s)} fit + {len(cal_s)} calibration goods; load average {config['load_average_start']}"
    )
    worker = None if in_process else Worker(WORKER_CMD, out / "worker.log")
    records: list[dict[str, Any]] = []
    feature_info: dict[str, dict[str, Any]] = {}
    n_run = n_reused = 0
    try:
        for spec in specs:
            host = hosts[spec]
            fopts = _feature_options(host.options)
            folder = out / FEATURES_DIR / _slug(f"{spec}__{json.dumps(fopts, sort_keys=True)}"[:150])
            plan = []
            for name in names:
                opts = {**options, **per_detector.get(name, {})}
                key = json.dumps(
                    [config["data"], name, spec, {k: opts[k] for k in sorted(opts)}], default=str
                )
                plan.append((name, opts, key))
            if all(_reusable(done.get(k), cell_budget_s) for _, _, k in plan):
                info = (
                    json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
                )
                feature_info[spec] = {k: v for k, v in info.items() if k != "test_keys"} or {
                    "status": "reused"
                }
                for _, _, key in plan:
                    records.append(_backfill(done[key]))
                    n_reused += 1
                continue
            meta_path = folder / "meta.json"
            info = json.loads(meta_path.read_text()) if meta_path.is_file() else None
            if info is None or info.get("version") != FEATURES_VERSION:
                try:
                    info = _compute_features(
                        spec,
                        host,
                        as_items(fit_s),
                        as_items(cal_s),
                        as_items(dataset.test),
                        folder,
                        logf,
                        progress,
                    )
                except ValueError as err:
                    info = {"status": "skipped", "features": spec, "reason": str(err).splitlines()[0]}
                    logf(f"features {spec}: skipped: {info['reason']}")
            else:
                logf(f"features {spec}: reusing {folder}")
            feature_info[spec] = {k: v for k, v in info.items() if k != "test_keys"}
            test_labels = labels
            if info.get("status") == "ok":
                test_labels = np.array([by_key[k].label for k in info["test_keys"]])
            for name, opts, key in plan:
                if _reusable(done.get(key), cell_budget_s):
                    records.append(_backfill(done[key]))
                    n_reused += 1
                    continue
                base = {"key": key, "detector": name, "features": spec, "options": opts}
                if info.get("status") != "ok":
                    rec = {**base, "status": "skipped", "reason": f"features: {info['reason']}"}
                else:
                    rec = _run_one(
                        name,
                        spec,
                        opts,
                        folder,
                        info,
                        test_labels,
                        host,
                        cell_budget_s,
                        guard,
                        worker,
                        TABLE,
                        estimate_seconds,
                    )
                    rec = {**base, **rec}
                rec["finished"] = datetime.now().isoformat(timespec="seconds")
                append_cell(cells_path, rec)
                records.append(rec)
                n_run += 1
                logf(_cell_line(rec))
    finally:
        if worker is not None:
            worker.close()
    config["finished"] = datetime.now().isoformat(timespec="seconds")
    config["load_average_end"] = _load_average()
    return StudyResult(records, feature_info, config, n_run=n_run, n_reused=n_reused)


def _run_one(
    name, spec, opts, folder, info, labels, host, budget, guard, worker, table, estimate_seconds
) -> dict[str, Any]:
    from anomalens.models.classical import PREFIX

    entry = table[name[len(PREFIX) :]]
    n, d = info["train_shape"][0], info["train_shape"][-1]
    cap = int(opts.get("max_samples", entry.max_samples))
    n_fit = min(n, cap) if cap > 0 else n
    # scored vectors: the test images (each patch counts for `patch`) plus the calibration goods (~ +20 %)
    m = int(np.prod(info["test_shape"][:-1]) * 1.2)
    est_fit, est_score = estimate_seconds(entry, n_fit, d, m)
    estimate = est_fit + est_score
    if guard and budget is not None and estimate > budget:
        return {
            "status": "skipped",
            "reason": f"slow-detector guard: estimated {estimate:.0f} s on {n_fit} x {d} "
            f"features > budget {budget:.0f} s (raise the budget or set max_samples)",
            "budget_s": budget,
            "estimated_s": round(estimate, 1),
        }
    task = {"detector": name, "features": spec, "options": opts, "folder": str(folder)}
    start = time.perf_counter()
    res = run_cell(task) if worker is None else _run_in_worker(worker, task, budget)
    wall = time.perf_counter() - start
    if res["status"] != "ok":
        return {k: v for k, v in res.items() if k != "traceback"} | {
            "wall_s": round(wall, 2),
            "estimated_s": round(estimate, 1),
        }
    metrics = _cell_metrics(labels, res, float(host.options["calibration_quantile"]))
    n_test = len(labels)
    return {
        "status": "ok",
        **metrics,
        "fit_s": res["fit_s"],
        "pyod_fit_s": res["pyod_fit_s"],
        "score_s": res["score_s"],
        "score_ms_per_image": round(1000 * res["score_s"] / n_test, 3),
        "features_fit_s": info["fit_s"],
        "features_ms_per_image": info["transform_ms_per_image"],
        "n_train_vectors": res["n_train_vectors"],
        "pyod_threshold": res["pyod_threshold"],
        "estimated_s": round(estimate, 1),
        "wall_s": round(wall, 2),
        "test_scores": res["test_scores"],
    }


def _run_in_worker(worker: Worker, task: dict[str, Any], budget: float | None) -> dict[str, Any]:
    """The cell's result from the worker; an overrun is a skip with the budget, a dead worker a failure."""
    try:
        return worker.run(task, budget)
    except CellTimeout:
        return {
            "status": "skipped",
            "reason": f"exceeded the per-cell budget of {budget:.0f} s (killed)",
            "budget_s": budget,
        }
    except CellError as err:
        return {"status": "failed", "reason": str(err)}


def _cell_line(rec: dict[str, Any]) -> str:
    head = f"{rec['detector']:>27} {rec['features']:<14}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec.get('reason', '')}"
    return (
        f"{head} AUROC {rec['image_auroc']:.3f}  AP {rec['image_ap']:.3f}  F1(pyod) {rec['f1_pyod']:.3f}  "
        f"F1(cal) {rec['f1_calibrated']:.3f}  fit {rec['fit_s']:.1f} s  score {rec['score_s']:.1f} s"
    )


# -- ranking (the report's tables and the top 5s) --------------------------------------------------
def ranked(cells: Sequence[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The ok cells that have `key`, best first (ties: higher AUROC, then by name)."""
    ok = [c for c in cells if c["status"] == "ok" and c.get(key) is not None]
    return sorted(ok, key=lambda c: (-c[key], -(c.get("image_auroc") or 0), c["detector"], c["features"]))


if __name__ == "__main__":  # pragma: no cover - the cell worker that Worker starts
    if sys.argv[1:] != ["--worker"]:
        sys.exit(
            "usage: python -m anomalens.workflows.classical_study --worker (use `anomalens classical-study`)"
        )
    logging.disable(logging.WARNING)
    serve_tasks(run_cell)
