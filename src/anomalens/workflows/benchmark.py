"""Benchmark runner: every model on every MVTec-layout category, over seeds, resumable.

    from anomalens.workflows.benchmark import run_benchmark
    result = run_benchmark(["patchcore", "padim"], "../shared/datasets", "bench/", seeds=3,
                           sets={"patchcore": {"coreset_ratio": "0.01"}})

A *cell* is one (model, category, seed) run: fit on the training goods, save the model file,
evaluate the test split, time single-image predictions, read the peak RSS. By default each cell
runs in its own process (`python -m anomalens.workflows.benchmark --cell SPEC`, see workflows/runs.py),
so the RSS is the cell's own. Each finished cell is appended to OUT/cells.jsonl at once; a rerun with
the same arguments skips the cells finished there and retries the failed ones. The result's records,
summary and config are what report/benchmark_report.py writes as OUT/benchmark.json, .md and .html.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# the cells file and the child-process protocol live in runs.py; re-exported here for existing callers
from anomalens.workflows.runs import (
    CELLS_FILE,
    CellError,
    append_cell,
    load_cells,
    one_line,
    parse_child_output,
    print_result,
    resume_cells,
    run_child,
)

__all__ = [
    "CELLS_FILE",
    "CellError",
    "CellSpec",
    "BenchmarkResult",
    "SUMMARY_KEYS",
    "append_cell",
    "find_categories",
    "is_stochastic",
    "load_cells",
    "network_size",
    "onnx_size",
    "parse_child_output",
    "parse_model_sets",
    "plan_cells",
    "run_benchmark",
    "run_cell",
    "run_cell_in_process",
    "run_cell_subprocess",
    "summarize",
]

#: (key, column title, format) of every summarized number, in table order
SUMMARY_KEYS: list[tuple[str, str, str]] = [
    ("image_auroc", "image AUROC", ".3f"),
    ("image_ap", "image AP", ".3f"),
    ("image_f1_max", "image F1-max", ".3f"),
    ("pixel_auroc", "pixel AUROC", ".3f"),
    ("pixel_ap", "pixel AP", ".3f"),
    ("aupro", "AUPRO", ".3f"),
    ("aupimo", "AUPIMO", ".3f"),
    ("zfn", "ZFN (accuracy at 100 % recall)", ".3f"),
    ("f1_at_threshold", "F1 at threshold", ".3f"),
    ("precision_at_threshold", "precision at threshold", ".3f"),
    ("recall_at_threshold", "recall at threshold", ".3f"),
    ("fit_s", "fit s", ".1f"),
    ("setup_s", "setup s", ".1f"),
    ("predict_img_s", "predict img/s", ".1f"),
    ("latency_ms", "latency ms/img", ".0f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("model_mb", "model MB", ".1f"),
    ("onnx_mb", "ONNX MB", ".1f"),
    ("params_m", "params M", ".2f"),
    ("forward_mb", "forward MB", ".0f"),
    ("backward_mb", "backward MB", ".0f"),
]
#: the network-size numbers measured on a deep model's inference graph (`network_size`)
NETWORK_KEYS = ("params_m", "forward_mb", "backward_mb")


@dataclass(frozen=True)
class CellSpec:
    """One (model, category, seed) run. `options` are the user's --set values for this model
    (strings or values), without the seed."""

    model: str
    category: str  # display name: path relative to the benchmark's data folder
    path: str  # the category folder
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)
    train_defects: int = 0  # K labelled test defects per type lent to training (seeded by `seed`)

    @property
    def key(self) -> str:
        """Identity for resuming: same model, category, seed, options (and lent defects) = same cell."""
        key = [self.model, self.category, self.seed, {k: self.options[k] for k in sorted(self.options)}]
        if self.train_defects:
            key.append({"train_defects": self.train_defects})
        return json.dumps(key, default=str)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellSpec:
        return cls(
            model=d["model"],
            category=d["category"],
            path=d["path"],
            seed=int(d["seed"]),
            options=dict(d.get("options") or {}),
            train_defects=int(d.get("train_defects") or 0),
        )


@dataclass
class BenchmarkResult:
    cells: list[dict[str, Any]]  # the latest record of every planned cell, in plan order
    summary: list[dict[str, Any]]  # one row per (category, model)
    config: dict[str, Any]  # models, data, seeds, options, date, python: the outputs' header
    n_run: int = 0
    n_reused: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c.get("status") != "ok"]


# -- planning --------------------------------------------------------------------------------------
def parse_model_sets(pairs: Iterable[str], models: Sequence[str]) -> dict[str, dict[str, str]]:
    """`model.key=value` -> {model: {key: value}} for that model only; a bare `key=value` applies to
    every model (e.g. image_size=128)."""
    out: dict[str, dict[str, str]] = {m: {} for m in models}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(
                f"--set expects model.option=value (e.g. patchcore.coreset_ratio=0.01), got {pair!r}"
            )
        model, dot, option = key.partition(".")
        if not dot:
            for m in models:
                out[m][key] = value
            continue
        if not option:
            raise ValueError(f"--set {pair!r}: no option name after '{model}.'")
        if model not in out:
            raise ValueError(
                f"--set {pair!r}: model {model!r} is not benchmarked (--models {','.join(models)})"
            )
        out[model][option] = value
    return out


#: a model name's suffix that adds `anomalens refine` on the lent defects (needs train_defects)
REFINE_SUFFIX = "+refine"


def split_model(model: str) -> tuple[str, bool]:
    """('patchcore', True) for 'patchcore+refine': the detector and whether a refine stage goes on top."""
    return (model[: -len(REFINE_SUFFIX)], True) if model.endswith(REFINE_SUFFIX) else (model, False)


def is_stochastic(model: str) -> bool:
    """Whether `model` depends on its seed: declared once, on the detector class (`Detector.stochastic`)."""
    from anomalens.registry import get_class

    return get_class(split_model(model)[0]).stochastic


def find_categories(data: str | Path) -> list[tuple[str, Path]]:
    """(display name, folder) of every MVTec- or BTAD-layout category under `data`, or `data` itself
    when it is one."""
    from anomalens.data import DatasetError, find_mvtec_categories, is_category

    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"folder not found: '{data}'")
    if is_category(data):
        return [(data.resolve().name, data)]
    found = find_mvtec_categories(data)
    if not found:
        raise DatasetError(
            f"no MVTec- or BTAD-layout category (a folder with train/good or train/ok) in '{data}' "
            "or its subfolders"
        )
    return [(p.relative_to(data).as_posix(), p) for p in found]


def plan_cells(
    models: Sequence[str],
    data: str | Path,
    seeds: int = 3,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    train_defects: int = 0,
) -> list[CellSpec]:
    """Every cell to run, category by category, model by model, seed by seed.

    Stochastic models run with seed = 0..seeds-1, others once with seed 0; a user-given `seed`
    option pins one seed. With `train_defects` K (the labelled-defects protocol), every model runs
    every seed, since the seed also draws the K defects per type lent to training; the methods that
    learn from defects get them, `NAME+refine` adds a refine stage on them, and every model is
    evaluated on the same remaining test images. Unknown models and options are rejected here,
    before anything runs.
    """
    from anomalens.registry import get_class

    if not models:
        raise ValueError("no models to benchmark")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    sets = sets or {}
    per_model: dict[str, tuple[dict[str, Any], list[int]]] = {}
    for model in models:
        options = dict(sets.get(model, {}))
        seed_option = options.pop("seed", None)
        name, refined = split_model(model)
        cls = get_class(name)
        cls(**options)  # validates names and values now, not in every cell
        if (refined or cls.uses_defects == "required") and not train_defects:
            raise ValueError(
                f"{model} learns from labelled defects: give --train-defects K (K test defects per type "
                "lent to training, the rest evaluated)"
            )
        if seed_option is not None:
            seed_list = [int(seed_option)]
        else:
            seed_list = list(range(seeds)) if is_stochastic(model) or train_defects else [0]
        per_model[model] = (options, seed_list)
    cells = []
    for name, folder in find_categories(data):
        for model in models:
            options, seed_list = per_model[model]
            cells += [CellSpec(model, name, str(folder), s, options, train_defects) for s in seed_list]
    return cells


# -- one cell --------------------------------------------------------------------------------------
def onnx_size(detector) -> float | None:
    """Size in MB of the detector exported to ONNX (parity-checked); None where it has no ONNX export
    or the export fails (said on stderr: the cell's accuracy and speed are still worth keeping)."""
    from anomalens.export import ExportError, NotExportableError, export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        try:
            return export_onnx(detector, Path(tmp) / "cell.onnx").stat().st_size / 2**20
        except NotExportableError:
            return None
        except ExportError as exc:
            print(f"ONNX export failed, size not reported: {exc}", file=sys.stderr)
            return None


def _forward_peak_bytes(module, x) -> int:
    """Peak CPU memory the inference forward pass allocates beyond its input (no gradients):
    torch.profiler's allocation and free events, replayed in time order."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        module(x)
    level = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        level += event.self_cpu_memory_usage  # self: each allocation or free counted once
        peak = max(peak, level)
    return peak


def _saved_for_backward_bytes(module, x) -> int:
    """Activations the forward pass keeps for the backward pass when its parameters train: the
    distinct storages that autograd saves (saved-tensor hooks), weights and buffers left out."""
    import torch

    own = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(saved.values())


def network_size(detector, batch_size: int | None = None) -> dict[str, float] | None:
    """Parameters (millions) of a deep detector's inference graph and its activation memory (MB) at
    `batch_size` (default: the detector's batch_size option) on the CPU: `forward_mb`, the forward
    pass's peak; `backward_mb`, what it saves for the backward pass (0 where nothing in it trains).
    None for detectors without an inference graph (classical ones)."""
    import torch

    from anomalens.data.geometry import parse_size

    module = detector.inference_module()
    if module is None:
        return None
    pre = detector.preprocess()
    h, w = parse_size(pre.image_size)
    batch = batch_size or int(detector.options.get("batch_size", 1))
    x = torch.randn(batch, pre.channels, h, w, generator=torch.Generator().manual_seed(0))
    params = {id(p): p.numel() for p in module.parameters()}
    return {
        "params_m": sum(params.values()) / 1e6,
        "forward_mb": round(_forward_peak_bytes(module, x) / 2**20, 2),
        "backward_mb": round(_saved_for_backward_bytes(module, x) / 2**20, 2),
    }


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def _warm_up(detector) -> None:
    """Build the one-time state of a backbone detector (weights, ONNX export or cache, its agreement
    check) before the fit clock starts, so the first cell of a configuration is not charged for it."""
    features = getattr(detector, "features", None)
    if not callable(features):
        return
    import torch

    try:
        pre = detector.preprocess()
        features(torch.zeros(1, pre.channels, pre.image_size, pre.image_size))
    except Exception:  # noqa: BLE001 - fit reports the real problem, with its own message
        pass


def run_cell(spec: CellSpec, latency_images: int = 10) -> dict[str, Any]:
    """Fit, save, evaluate and time one cell in this process; returns its measurements."""
    import numpy as np

    from anomalens.data import load_dataset
    from anomalens.data.labels import split_train_defects
    from anomalens.registry import create
    from anomalens.workflows.evaluate import evaluate
    from anomalens.workflows.refine import refine

    dataset = load_dataset(spec.path)
    lent = []
    if spec.train_defects:
        dataset, lent = split_train_defects(dataset, spec.train_defects, spec.seed)
    name, refined = split_model(spec.model)
    det = create(name, **{**spec.options, "seed": spec.seed})
    defects = [s for s in lent if s.label == 1] if det.uses_defects != "none" else []
    start = time.perf_counter()
    _warm_up(det)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    if defects:
        det.fit(dataset.train, defects=defects, defect_masks=[s.mask_path for s in defects])
    else:
        det.fit(dataset.train)
    if refined:
        det, _ = refine(det, lent, seed=spec.seed, source=f"{spec.path} (train_defects {spec.train_defects})")
    fit_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model_mb = det.save(Path(tmp) / "cell.model").stat().st_size / 2**20
    ev = evaluate(det, dataset)
    m = ev.metrics
    test = dataset.test
    times = []
    if test:
        for i in sorted(
            set(np.linspace(0, len(test) - 1, min(latency_images, len(test))).round().astype(int))
        ):
            t = time.perf_counter()
            det.predict([test[i].path])
            times.append(time.perf_counter() - t)
    at = m.get("at_threshold") or {}
    onnx = onnx_size(det)
    sizes = network_size(det) or {}
    return {
        "image_auroc": m.get("image_auroc"),
        "image_ap": m.get("image_ap"),
        "image_f1_max": m.get("image_f1_max"),
        "pixel_auroc": m.get("pixel_auroc"),
        "pixel_ap": m.get("pixel_ap"),
        "aupro": m.get("aupro"),
        "aupimo": m.get("aupimo"),
        "zfn": m.get("accuracy_at_full_recall"),
        "f1_at_threshold": at.get("f1"),
        "precision_at_threshold": at.get("precision"),
        "recall_at_threshold": at.get("recall"),
        "fit_s": round(fit_s, 3),
        "fit_core_s": det.fit_info.get("fit_seconds"),
        "setup_s": round(setup_s, 3),
        "predict_img_s": m.get("images_per_second"),
        "latency_ms": round(1000 * statistics.median(times), 2) if times else None,
        "peak_rss_mb": _peak_rss_mb(),
        "model_mb": round(model_mb, 3),
        "onnx_mb": None if onnx is None else round(onnx, 3),
        **{k: sizes.get(k) for k in NETWORK_KEYS},
        "batch_size": det.options.get("batch_size"),
        "n_train": len(dataset.train),
        "n_labelled_trained_on": len(det.trained_on),  # never among the n_test evaluated
        "n_test": m.get("n_images"),
        "per_defect_type": m.get("per_defect_type"),
        "device": str(det.device),
    }


def run_cell_in_process(spec: CellSpec) -> dict[str, Any]:
    """Runner without a child process (peak RSS is then this whole process's)."""
    return run_cell(spec)


def run_cell_subprocess(spec: CellSpec, timeout: float | None = None) -> dict[str, Any]:
    """Run the cell in a fresh Python process so its peak RSS is its own; CellError on failure."""
    cmd = [sys.executable, "-m", "anomalens.workflows.benchmark", "--cell", json.dumps(spec.to_dict())]
    return run_child(cmd, timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


# -- summary ---------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> dict[str, Any] | None:
    """Mean and sample standard deviation (n-1; 0 for a single value)."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (category, model), in first-seen order: mean ± std over seeds of every number in
    SUMMARY_KEYS ({'mean', 'std', 'n'} or None when no seed had it), and the seeds that ran or failed."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["category"], r["model"]), []).append(r)
    rows = []
    for (category, model), group in groups.items():
        ok = [r for r in group if r.get("status") == "ok"]
        row: dict[str, Any] = {
            "category": category,
            "model": model,
            "seeds": [r["seed"] for r in ok],
            "failed_seeds": [r["seed"] for r in group if r.get("status") != "ok"],
        }
        for key, _, _ in SUMMARY_KEYS:
            row[key] = _mean_std([r.get(key) for r in ok])
        rows.append(row)
    return rows


# -- the whole run ---------------------------------------------------------------------------------
CellRunner = Callable[[CellSpec], Mapping[str, Any]]


def run_benchmark(
    models: Sequence[str],
    data: str | Path,
    out: str | Path,
    *,
    seeds: int = 3,
    sets: Mapping[str, Mapping[str, Any]] | None = None,
    train_defects: int = 0,
    runner: CellRunner | None = None,
    timeout: float | None = None,
    log: Callable[[str], None] | None = None,
) -> BenchmarkResult:
    """Run (or resume) the benchmark into `out` (OUT/cells.jsonl); report.benchmark_report writes the
    result's JSON, Markdown and HTML.

    `runner(spec) -> measurements` defaults to a fresh process per cell (`run_cell_subprocess`);
    an exception from it marks the cell failed with its one-line message and the run goes on.
    """
    models = list(models)
    cells = plan_cells(models, data, seeds, sets, train_defects)
    if runner is None:

        def runner(spec: CellSpec) -> Mapping[str, Any]:
            return run_cell_subprocess(spec, timeout=timeout)

    log = log or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / CELLS_FILE
    latest = resume_cells(cells_path)
    n_run = n_reused = 0
    for i, spec in enumerate(cells, start=1):
        where = f"[{i}/{len(cells)}] {spec.model} · {spec.category} · seed {spec.seed}"
        previous = latest.get(spec.key)
        if previous and previous.get("status") == "ok":
            n_reused += 1
            log(f"{where}: done before, kept")
            continue
        log(f"{where}: {'retrying' if previous else 'running'} ...")
        start = time.perf_counter()
        try:
            measured = dict(runner(spec))
            record = {**measured, "status": "ok"}
        except Exception as err:  # noqa: BLE001 - any failure of one cell is recorded, the others go on
            message = str(err) if isinstance(err, CellError) else f"{type(err).__name__}: {err}"
            record = {"status": "failed", "error": one_line(message)}
        record.update(
            spec.to_dict(),
            key=spec.key,
            wall_s=round(time.perf_counter() - start, 2),
            finished_at=datetime.now().isoformat(timespec="seconds"),
        )
        append_cell(cells_path, record)
        latest[spec.key] = record
        n_run += 1
        if record["status"] == "ok":
            auroc = record.get("image_auroc")
            log(
                f"{where}: ok in {record['wall_s']:.0f} s, image AUROC "
                f"{'n/a' if auroc is None else f'{auroc:.3f}'}"
            )
        else:
            log(f"{where}: failed: {record['error']}")
    records = [latest[c.key] for c in cells if c.key in latest]
    summary = summarize(records)
    config = {
        "models": models,
        "data": str(data),
        "seeds": seeds,
        "train_defects": train_defects,
        "options": {m: dict((sets or {}).get(m, {})) for m in models},
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "python": sys.version.split()[0],
    }
    return BenchmarkResult(cells=records, summary=summary, config=config, n_run=n_run, n_reused=n_reused)


def _child_main(argv: list[str]) -> int:
    """`python -m anomalens.workflows.benchmark --cell SPEC_JSON`: one cell, result on stdout."""
    if len(argv) != 2 or argv[0] != "--cell":
        print(
            "usage: python -m anomalens.workflows.benchmark --cell SPEC_JSON (use `anomalens benchmark`)",
            file=sys.stderr,
        )
        return 2
    try:
        result = run_cell(CellSpec.from_dict(json.loads(argv[1])))
    except Exception as err:  # noqa: BLE001 - reported to the parent as one line
        print(one_line(f"{type(err).__name__}: {err}"), file=sys.stderr)
        return 1
    print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
