"""Benchmark runner: every model on every MVTec-layout category, over seeds, resumable.

    from anomalens.workflows.benchmark import run_benchmark
    result = run_benchmark(["patchcore", "padim"], "../shared/datasets", "bench/", seeds=3,
                           sets={"patchcore": {"coreset_ratio": "0.01"}})

A *cell* is one (model, category, seed) run: fit on the training goods, save the model file,
evaluate the test split, time single-image predictions, read the peak RSS. By default each cell
runs in its own process (`python -m anomalens.workflows.benchmark --cell SPEC`), so the RSS is the
cell's own. Each finished cell is appended to OUT/cells.jsonl at once; a rerun with the same
arguments skips the cells finished there and retries the failed ones. Then OUT/benchmark.json,
OUT/benchmark.md and OUT/benchmark.html (self-contained, embedded figures) are written.
"""
from __future__ import annotations

import html
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "CellError", "CellSpec", "BenchmarkResult", "STOCHASTIC_MODELS", "SUMMARY_KEYS", "append_cell",
    "find_categories", "is_stochastic", "load_cells", "onnx_size", "parse_child_output", "parse_model_sets",
    "plan_cells",
    "run_benchmark", "run_cell", "run_cell_in_process", "run_cell_subprocess", "summarize", "write_outputs",
]

CELLS_FILE = "cells.jsonl"
CELL_MARKER = "ANOMALENS_CELL "  # prefix of the child's result line on stdout
#: methods whose fitted state depends on `seed` (PatchCore's coreset projection, PaDiM's channel subset);
#: a detector class may also say so itself with a `stochastic` class attribute
STOCHASTIC_MODELS = frozenset({"patchcore", "padim"})

#: (key, column title, format) of every summarized number, in table order
SUMMARY_KEYS: list[tuple[str, str, str]] = [
    ("image_auroc", "image AUROC", ".3f"),
    ("image_ap", "image AP", ".3f"),
    ("image_f1_max", "image F1-max", ".3f"),
    ("pixel_auroc", "pixel AUROC", ".3f"),
    ("pixel_ap", "pixel AP", ".3f"),
    ("aupro", "AUPRO", ".3f"),
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
]
#: the columns of the Markdown and HTML tables (JSON has all of SUMMARY_KEYS)
TABLE_KEYS = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "f1_at_threshold", "fit_s",
              "predict_img_s", "latency_ms", "peak_rss_mb", "model_mb", "onnx_mb"]
_FORMATS = {k: f for k, _, f in SUMMARY_KEYS}
_TITLES = {k: t for k, t, _ in SUMMARY_KEYS}


class CellError(RuntimeError):
    """A cell that could not finish; the message is one line."""


@dataclass(frozen=True)
class CellSpec:
    """One (model, category, seed) run. `options` are the user's --set values for this model
    (strings or values), without the seed."""

    model: str
    category: str  # display name: path relative to the benchmark's data folder
    path: str  # the category folder
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identity for resuming: same model, category, seed and options = same cell."""
        return json.dumps([self.model, self.category, self.seed, {k: self.options[k] for k in sorted(self.options)}],
                          default=str)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellSpec:
        return cls(model=d["model"], category=d["category"], path=d["path"], seed=int(d["seed"]),
                   options=dict(d.get("options") or {}))


@dataclass
class BenchmarkResult:
    cells: list[dict[str, Any]]  # the latest record of every planned cell, in plan order
    summary: list[dict[str, Any]]  # one row per (category, model)
    outputs: dict[str, Path]  # "json", "markdown", "html", "cells"
    n_run: int = 0
    n_reused: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c.get("status") != "ok"]


# -- planning ------------------------------------------------------------------------------------------------
def parse_model_sets(pairs: Iterable[str], models: Sequence[str]) -> dict[str, dict[str, str]]:
    """`model.key=value` -> {model: {key: value}} for that model only; a bare `key=value` applies to
    every model (e.g. image_size=128)."""
    out: dict[str, dict[str, str]] = {m: {} for m in models}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--set expects model.option=value (e.g. patchcore.coreset_ratio=0.01), got {pair!r}")
        model, dot, option = key.partition(".")
        if not dot:
            for m in models:
                out[m][key] = value
            continue
        if not option:
            raise ValueError(f"--set {pair!r}: no option name after '{model}.'")
        if model not in out:
            raise ValueError(f"--set {pair!r}: model {model!r} is not benchmarked (--models {','.join(models)})")
        out[model][option] = value
    return out


def is_stochastic(model: str) -> bool:
    from anomalens.registry import get_class

    return bool(getattr(get_class(model), "stochastic", model in STOCHASTIC_MODELS))


def _is_category(folder: Path) -> bool:
    return (folder / "train" / "good").is_dir()


def find_categories(data: str | Path) -> list[tuple[str, Path]]:
    """(display name, folder) of every MVTec-layout category under `data`, or `data` itself when it is one."""
    from anomalens.data import DatasetError, find_mvtec_categories

    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"folder not found: '{data}'")
    if _is_category(data):
        return [(data.resolve().name, data)]
    found = find_mvtec_categories(data)
    if not found:
        raise DatasetError(f"no MVTec-layout category (a folder with train/good) in '{data}' or its subfolders")
    return [(p.relative_to(data).as_posix(), p) for p in found]


def plan_cells(models: Sequence[str], data: str | Path, seeds: int = 3,
               sets: Mapping[str, Mapping[str, Any]] | None = None) -> list[CellSpec]:
    """Every cell to run, category by category, model by model, seed by seed.

    Stochastic models run with seed = 0..seeds-1, others once with seed 0; a user-given `seed`
    option pins one seed. Unknown models and options are rejected here, before anything runs.
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
        get_class(model)(**options)  # validates names and values now, not in every cell
        if seed_option is not None:
            seed_list = [int(seed_option)]
        else:
            seed_list = list(range(seeds)) if is_stochastic(model) else [0]
        per_model[model] = (options, seed_list)
    cells = []
    for name, folder in find_categories(data):
        for model in models:
            options, seed_list = per_model[model]
            cells += [CellSpec(model, name, str(folder), s, options) for s in seed_list]
    return cells


# -- one cell ----------------------------------------------------------------------------------------------------
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

    from anomalens.registry import create
    from anomalens.data import load_dataset
    from anomalens.workflows.evaluate import evaluate

    dataset = load_dataset(spec.path)
    det = create(spec.model, **{**spec.options, "seed": spec.seed})
    start = time.perf_counter()
    _warm_up(det)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    det.fit(dataset.train)
    fit_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        model_mb = det.save(Path(tmp) / "cell.model").stat().st_size / 2**20
    ev = evaluate(det, dataset)
    m = ev.metrics
    test = dataset.test
    times = []
    if test:
        for i in sorted(set(np.linspace(0, len(test) - 1, min(latency_images, len(test))).round().astype(int))):
            t = time.perf_counter()
            det.predict([test[i].path])
            times.append(time.perf_counter() - t)
    at = m.get("at_threshold") or {}
    onnx = onnx_size(det)
    return {
        "image_auroc": m.get("image_auroc"), "image_ap": m.get("image_ap"), "image_f1_max": m.get("image_f1_max"),
        "pixel_auroc": m.get("pixel_auroc"), "pixel_ap": m.get("pixel_ap"), "aupro": m.get("aupro"),
        "f1_at_threshold": at.get("f1"), "precision_at_threshold": at.get("precision"),
        "recall_at_threshold": at.get("recall"),
        "fit_s": round(fit_s, 3), "fit_core_s": det.fit_info.get("fit_seconds"), "setup_s": round(setup_s, 3),
        "predict_img_s": m.get("images_per_second"),
        "latency_ms": round(1000 * statistics.median(times), 2) if times else None,
        "peak_rss_mb": _peak_rss_mb(), "model_mb": round(model_mb, 3),
        "onnx_mb": None if onnx is None else round(onnx, 3),
        "n_train": len(dataset.train), "n_test": m.get("n_images"),
        "per_defect_type": m.get("per_defect_type"),
        "device": str(det.device),
    }


def run_cell_in_process(spec: CellSpec) -> dict[str, Any]:
    """Runner without a child process (peak RSS is then this whole process's)."""
    return run_cell(spec)


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def run_cell_subprocess(spec: CellSpec, timeout: float | None = None) -> dict[str, Any]:
    """Run the cell in a fresh Python process so its peak RSS is its own; CellError on failure."""
    cmd = [sys.executable, "-m", "anomalens.workflows.benchmark", "--cell", json.dumps(spec.to_dict())]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise CellError(f"timed out after {timeout:g} s") from None
    return parse_child_output(proc.returncode, proc.stdout, proc.stderr)


def parse_child_output(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The measurements a cell process printed, or CellError with its one-line reason."""
    for line in reversed(stdout.splitlines()):
        if returncode == 0 and line.startswith(CELL_MARKER):
            return json.loads(line[len(CELL_MARKER):])
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if returncode < 0:
        why = f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    else:
        why = lines[-1] if lines else f"exit code {returncode} without a result"
    raise CellError(_one_line(why))


# -- the cells file ------------------------------------------------------------------------------------------------
def load_cells(path: str | Path) -> dict[str, dict[str, Any]]:
    """key -> latest record of OUT/cells.jsonl; a line cut by a crash is ignored."""
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


def append_cell(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record and make sure it is on disk before the next cell starts."""
    path = Path(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """A crash mid-write can leave a last line without newline: end it so the next record stays whole."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


# -- summary -------------------------------------------------------------------------------------------------------
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
        row: dict[str, Any] = {"category": category, "model": model, "seeds": [r["seed"] for r in ok],
                               "failed_seeds": [r["seed"] for r in group if r.get("status") != "ok"]}
        for key, _, _ in SUMMARY_KEYS:
            row[key] = _mean_std([r.get(key) for r in ok])
        rows.append(row)
    return rows


def _cell_text(stat: Mapping[str, Any] | None, fmt: str) -> str:
    if stat is None:
        return "n/a"
    if stat["n"] > 1:
        return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"
    return f"{stat['mean']:{fmt}}"


def _markdown(config: Mapping[str, Any], summary: list[dict], cells: list[dict]) -> str:
    lines = [f"# anomalens benchmark ({config['date']})", "",
             f"Data: `{config['data']}`; models: {', '.join(config['models'])}; "
             f"seeds per stochastic model: {config['seeds']}. Mean ± sample std over seeds; fit s = wall time "
             "of fit (features, memory bank / Gaussians, calibration pass; the backbone's one-time set-up, "
             "e.g. ONNX export, is timed apart as setup_s in the JSON); predict img/s = whole test split "
             "in batches, from files; latency = median of single-image predictions; peak RSS of the cell's "
             "own process.", ""]
    for model, opts in config["options"].items():
        if opts:
            lines.append(f"- {model} options: " + ", ".join(f"`{k}={v}`" for k, v in opts.items()))
    if any(config["options"].values()):
        lines.append("")
    head = ["category", "model", "seeds"] + [_TITLES[k] for k in TABLE_KEYS]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(TABLE_KEYS)) + "|"]
    for row in summary:
        seeds = str(len(row["seeds"])) + (f" ({len(row['failed_seeds'])} failed)" if row["failed_seeds"] else "")
        lines.append("| " + " | ".join([row["category"], row["model"], seeds]
                                       + [_cell_text(row[k], _FORMATS[k]) for k in TABLE_KEYS]) + " |")
    failed = [c for c in cells if c.get("status") != "ok"]
    if failed:
        lines += ["", "## Failed cells (rerun the same command to retry them)", "",
                  "| model | category | seed | error |", "|---|---|---:|---|"]
        lines += [f"| {c['model']} | {c['category']} | {c['seed']} | {c.get('error', '').replace('|', '/')} |"
                  for c in failed]
    return "\n".join(lines) + "\n"


# -- figures and HTML ----------------------------------------------------------------------------------------
_MODEL_COLORS = ["#d64541", "#2b7bba", "#2e8b57", "#e08a1e", "#7d4fb3", "#5b6475", "#c2185b", "#00838f"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def _scatter_figure(summary: list[dict], models: list[str]) -> str | None:
    from anomalens.report.html_report import figure_data_uri, new_figure, style_axes

    points = []
    for row in summary:
        y = row["image_auroc"]
        x = row["latency_ms"]
        if x is None and row["predict_img_s"]:
            x = {"mean": 1000 / row["predict_img_s"]["mean"], "std": 0.0}
        if y is not None and x is not None:
            points.append((row, x, y))
    if not points:
        return None
    categories = list(dict.fromkeys(r["category"] for r in summary))
    fig = new_figure(7.6, 4.4)
    ax = fig.subplots()
    for row, x, y in points:
        color = _MODEL_COLORS[models.index(row["model"]) % len(_MODEL_COLORS)] if row["model"] in models else "#333"
        marker = _MARKERS[categories.index(row["category"]) % len(_MARKERS)]
        ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or None, yerr=y["std"] or None, fmt=marker, ms=8,
                    color=color, ecolor=color, elinewidth=1, capsize=3, mec="white", mew=0.8)
        if len(categories) <= 12:
            ax.annotate(row["category"].split("/")[-1], (x["mean"], y["mean"]), textcoords="offset points",
                        xytext=(6, 5), fontsize=8, color="#3a4356")
    xs = [x["mean"] for _, x, _ in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=_MODEL_COLORS[i % len(_MODEL_COLORS)], marker="o", ls="", ms=8, label=m)
               for i, m in enumerate(models) if any(r["model"] == m for r, _, _ in points)]
    if 1 < len(categories) <= 12:
        handles += [Line2D([], [], color="#5b6475", marker=_MARKERS[i % len(_MARKERS)], ls="", ms=7, label=c)
                    for i, c in enumerate(categories)]
    ax.legend(handles=handles, fontsize=8.5, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("single-image latency, ms (median of ~10 one-image predictions; left is faster)")
    ax.set_ylabel("image AUROC (higher is better)")
    style_axes(ax)
    fig.tight_layout()
    return figure_data_uri(fig)


def _bars_figure(summary: list[dict], models: list[str]) -> str | None:
    from anomalens.report.html_report import figure_data_uri, new_figure, style_axes

    categories = list(dict.fromkeys(r["category"] for r in summary))
    by = {(r["category"], r["model"]): r for r in summary}
    metrics = [k for k in ("image_auroc", "pixel_auroc") if any(r[k] is not None for r in summary)]
    if not categories or not metrics:
        return None
    side_by_side = len(categories) * len(models) <= 8
    width = min(16.0, max(6.5, 0.5 + len(categories) * (0.35 * len(models) + 0.5)))
    if side_by_side:
        fig = new_figure(min(16.0, 2 * width), 3.6)
        axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    else:
        fig = new_figure(width, 3.3 * len(metrics))
        axes = fig.subplots(len(metrics), 1, squeeze=False)[:, 0]
    bar = 0.8 / max(1, len(models))
    lows = []
    for ax, key in zip(axes, metrics):
        for j, model in enumerate(models):
            xs, ys, es = [], [], []
            for i, cat in enumerate(categories):
                stat = by.get((cat, model), {}).get(key)
                if stat is not None:
                    xs.append(i - 0.4 + bar * (j + 0.5))
                    ys.append(stat["mean"])
                    es.append(stat["std"])
            if xs:
                color = _MODEL_COLORS[j % len(_MODEL_COLORS)]
                ax.bar(xs, ys, bar * 0.92, yerr=es, color=color, alpha=0.85, label=model, capsize=2,
                       error_kw={"elinewidth": 1, "ecolor": "#1e2533"})
                lows += ys
                if len(categories) * len(models) <= 24:
                    for x, y, err in zip(xs, ys, es):
                        ax.text(x, min(y + err, 1.0) + 0.006, f"{y:.3f}", ha="center", va="bottom", fontsize=7,
                                color="#3a4356")
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels([c.split("/")[-1] for c in categories], rotation=30 if len(categories) > 6 else 0,
                           ha="right" if len(categories) > 6 else "center", fontsize=9)
        ax.set_ylabel(_TITLES[key])
        style_axes(ax)
        ax.grid(False, axis="x")
        ax.legend(fontsize=8.5, frameon=False, ncol=len(models), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    low = min(lows) if lows else 0.5
    for ax in axes:
        ax.set_ylim(max(0.0, min(0.5, math.floor((low - 0.05) * 10) / 10)), 1.05)
    fig.tight_layout(h_pad=2, w_pad=3)
    return figure_data_uri(fig)


def _html(config: Mapping[str, Any], summary: list[dict], cells: list[dict]) -> str:
    from anomalens.report.html_report import page

    e = html.escape
    models = list(config["models"])
    n_ok = sum(c.get("status") == "ok" for c in cells)
    n_failed = len(cells) - n_ok
    chips = [f"<span class=chip><b>{len({r['category'] for r in summary})}</b> categories</span>",
             f"<span class=chip><b>{len(models)}</b> models</span>",
             f"<span class='chip good'><b>{n_ok}</b> cells done</span>"]
    if n_failed:
        chips.append(f"<span class='chip bad'><b>{n_failed}</b> failed</span>")
    header = (f"<h1>Benchmark: {e(', '.join(models))}</h1><div class=sub>data <b>{e(str(config['data']))}</b>"
              f" &nbsp;·&nbsp; up to {config['seeds']} seeds per stochastic model &nbsp;·&nbsp; {e(config['date'])}"
              f"</div><div class=chips>{''.join(chips)}</div>")
    head = "".join(f"<th>{e(_TITLES[k])}</th>" for k in TABLE_KEYS)
    best: dict[tuple[str, str], float] = {}
    for row in summary:  # best mean per category, for the accuracy columns
        for k in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "aupro", "f1_at_threshold"):
            if row[k] is not None:
                best[(row["category"], k)] = max(best.get((row["category"], k), -1.0), row[k]["mean"])
    rows = []
    for row in summary:
        tds = []
        for k in TABLE_KEYS:
            stat = row[k]
            if stat is None:
                tds.append("<td class=na>n/a</td>")
                continue
            std = f"<br><small>± {stat['std']:{_FORMATS[k]}}</small>" if stat["n"] > 1 else ""
            strong = abs(stat["mean"] - best.get((row["category"], k), math.inf)) < 1e-12
            mean = f"{stat['mean']:{_FORMATS[k]}}"
            tds.append(f"<td>{'<b>' + mean + '</b>' if strong else mean}{std}</td>")
        seeds = str(len(row["seeds"])) + (f" <small class=bad>({len(row['failed_seeds'])} failed)</small>"
                                          if row["failed_seeds"] else "")
        rows.append(f"<tr><td class=l>{e(row['category'])}</td><td class=l>{e(row['model'])}</td><td>{seeds}</td>"
                    + "".join(tds) + "</tr>")
    css = ("<style>table.bench td small{color:#6b7385;font-size:11px}table.bench td{white-space:nowrap}"
           "small.bad{color:#c0392b!important}table.bench{font-size:13px}</style>")
    options = "".join(f"<li><b>{e(m)}</b>: {e(', '.join(f'{k}={v}' for k, v in o.items()))}</li>"
                      for m, o in config["options"].items() if o)
    body = (css + "<section id=summary><h2>Results</h2><p class=note>Mean over seeds, ± sample standard deviation "
            "below; the best accuracy per category in bold. Fit s: wall time of fit (features, memory bank or "
            "Gaussians, calibration pass; the backbone's one-time set-up is timed apart, setup_s in the JSON). "
            "Predict img/s: the whole test split in batches, read from files. Latency: median of single-image "
            "predictions. Peak RSS: the cell's own process.</p>"
            + (f"<ul class=note>{options}</ul>" if options else "")
            + f"<div style='overflow-x:auto'><table class=bench><tr><th class=l>category</th><th class=l>model</th>"
            f"<th>seeds</th>{head}</tr>{''.join(rows)}</table></div></section>")
    scatter = _scatter_figure(summary, models)
    bars = _bars_figure(summary, models)
    if scatter:
        body += ("<section id=tradeoff><h2>Accuracy vs latency</h2><p class=note>One point per model × category "
                 f"(error bars: std over seeds).</p><img class=plot alt='accuracy vs latency' src='{scatter}'>"
                 "</section>")
    if bars:
        body += ("<section id=categories><h2>Per category</h2><p class=note>Image and pixel AUROC per model "
                 f"(error bars: std over seeds).</p><img class=plot alt='AUROC per category' src='{bars}'></section>")
    failed = [c for c in cells if c.get("status") != "ok"]
    if failed:
        body += ("<section id=failed><h2>Failed cells</h2><p class=note>Rerun the same command to retry them; "
                 "finished cells are not recomputed.</p><table><tr><th class=l>model</th><th class=l>category</th>"
                 "<th>seed</th><th class=l>error</th></tr>"
                 + "".join(f"<tr><td class=l>{e(c['model'])}</td><td class=l>{e(c['category'])}</td>"
                           f"<td>{c['seed']}</td><td class=l>{e(c.get('error', ''))}</td></tr>" for c in failed)
                 + "</table></section>")
    return page(f"anomalens benchmark: {', '.join(models)}", header, body)


def write_outputs(out: str | Path, config: Mapping[str, Any], cells: list[dict],
                  summary: list[dict]) -> dict[str, Path]:
    """OUT/benchmark.json (config, summary, every cell), benchmark.md and benchmark.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "markdown": out / "benchmark.md", "html": out / "benchmark.html"}
    payload = {"config": dict(config), "summary": summary, "cells": cells}
    texts = {"json": json.dumps(payload, indent=2, default=str), "markdown": _markdown(config, summary, cells),
             "html": _html(config, summary, cells)}
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(texts[kind], encoding="utf-8")
        tmp.replace(path)
    return {**paths, "cells": out / CELLS_FILE}


# -- the whole run -------------------------------------------------------------------------------------------
CellRunner = Callable[[CellSpec], Mapping[str, Any]]


def run_benchmark(models: Sequence[str], data: str | Path, out: str | Path, *, seeds: int = 3,
                  sets: Mapping[str, Mapping[str, Any]] | None = None, runner: CellRunner | None = None,
                  timeout: float | None = None, log: Callable[[str], None] | None = None) -> BenchmarkResult:
    """Run (or resume) the benchmark into `out` and write its JSON, Markdown and HTML.

    `runner(spec) -> measurements` defaults to a fresh process per cell (`run_cell_subprocess`);
    an exception from it marks the cell failed with its one-line message and the run goes on.
    """
    models = list(models)
    cells = plan_cells(models, data, seeds, sets)
    if runner is None:
        def runner(spec: CellSpec) -> Mapping[str, Any]:
            return run_cell_subprocess(spec, timeout=timeout)
    log = log or (lambda message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells_path = out / CELLS_FILE
    _repair_tail(cells_path)
    latest = load_cells(cells_path)
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
            record = {"status": "failed", "error": _one_line(message)}
        record.update(spec.to_dict(), key=spec.key, wall_s=round(time.perf_counter() - start, 2),
                      finished_at=datetime.now().isoformat(timespec="seconds"))
        append_cell(cells_path, record)
        latest[spec.key] = record
        n_run += 1
        if record["status"] == "ok":
            auroc = record.get("image_auroc")
            log(f"{where}: ok in {record['wall_s']:.0f} s, image AUROC "
                f"{'n/a' if auroc is None else f'{auroc:.3f}'}")
        else:
            log(f"{where}: failed: {record['error']}")
    records = [latest[c.key] for c in cells if c.key in latest]
    summary = summarize(records)
    config = {"models": models, "data": str(data), "seeds": seeds,
              "options": {m: dict((sets or {}).get(m, {})) for m in models},
              "date": datetime.now().strftime("%Y-%m-%d %H:%M"), "python": sys.version.split()[0]}
    outputs = write_outputs(out, config, records, summary)
    return BenchmarkResult(cells=records, summary=summary, outputs=outputs, n_run=n_run, n_reused=n_reused)


def _child_main(argv: list[str]) -> int:
    """`python -m anomalens.workflows.benchmark --cell SPEC_JSON`: one cell, result on stdout."""
    if len(argv) != 2 or argv[0] != "--cell":
        print("usage: python -m anomalens.workflows.benchmark --cell SPEC_JSON (use `anomalens benchmark`)",
              file=sys.stderr)
        return 2
    try:
        result = run_cell(CellSpec.from_dict(json.loads(argv[1])))
    except Exception as err:  # noqa: BLE001 - reported to the parent as one line
        print(_one_line(f"{type(err).__name__}: {err}"), file=sys.stderr)
        return 1
    print(CELL_MARKER + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
