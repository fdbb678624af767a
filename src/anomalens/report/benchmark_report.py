"""The benchmark's outputs: OUT/benchmark.json (config, summary, every cell), benchmark.md (the table
of mean ± std) and benchmark.html (self-contained, embedded figures).

    from anomalens.workflows.benchmark import run_benchmark
    from anomalens.report.benchmark_report import write_outputs
    result = run_benchmark(["patchcore", "padim"], "../shared/datasets", "bench/")
    paths = write_outputs("bench/", result.config, result.cells, result.summary)
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from anomalens.report.html_report import figure_data_uri, new_figure, page, style_axes
from anomalens.workflows.benchmark import SUMMARY_KEYS
from anomalens.workflows.runs import CELLS_FILE

__all__ = ["TABLE_KEYS", "render_html", "render_markdown", "write_outputs"]

#: the accuracy columns, whose best value per category is marked
ACCURACY_KEYS = [
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "aupro",
    "aupimo",
    "f1_at_threshold",
]
#: the columns of the Markdown and HTML tables (JSON has all of SUMMARY_KEYS)
TABLE_KEYS = [
    *ACCURACY_KEYS,
    "fit_s",
    "predict_img_s",
    "latency_ms",
    "peak_rss_mb",
    "model_mb",
    "onnx_mb",
    "params_m",
    "forward_mb",
    "backward_mb",
]
_FORMATS = {k: f for k, _, f in SUMMARY_KEYS}
_TITLES = {k: t for k, t, _ in SUMMARY_KEYS}


def _cell_text(stat: Mapping[str, Any] | None, fmt: str) -> str:
    if stat is None:
        return "n/a"
    if stat["n"] > 1:
        return f"{stat['mean']:{fmt}} ± {stat['std']:{fmt}}"
    return f"{stat['mean']:{fmt}}"


def render_markdown(config: Mapping[str, Any], summary: list[dict], cells: list[dict]) -> str:
    lines = [
        f"# anomalens benchmark ({config['date']})",
        "",
        f"Data: `{config['data']}`; models: {', '.join(config['models'])}; "
        f"seeds per stochastic model: {config['seeds']}. Mean ± sample std over seeds; fit s = wall time "
        "of fit (features, memory bank / Gaussians, calibration pass; the backbone's one-time set-up, "
        "e.g. ONNX export, is timed apart as setup_s in the JSON); predict img/s = whole test split "
        "in batches, from files; latency = median of single-image predictions; peak RSS of the cell's "
        "own process.",
        "",
    ]
    for model, opts in config["options"].items():
        if opts:
            lines.append(f"- {model} options: " + ", ".join(f"`{k}={v}`" for k, v in opts.items()))
    if any(config["options"].values()):
        lines.append("")
    head = ["category", "model", "seeds"] + [_TITLES[k] for k in TABLE_KEYS]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(TABLE_KEYS)) + "|"]
    for row in summary:
        seeds = str(len(row["seeds"])) + (
            f" ({len(row['failed_seeds'])} failed)" if row["failed_seeds"] else ""
        )
        lines.append(
            "| "
            + " | ".join(
                [row["category"], row["model"], seeds] + [_cell_text(row[k], _FORMATS[k]) for k in TABLE_KEYS]
            )
            + " |"
        )
    failed = [c for c in cells if c.get("status") != "ok"]
    if failed:
        lines += [
            "",
            "## Failed cells (rerun the same command to retry them)",
            "",
            "| model | category | seed | error |",
            "|---|---|---:|---|",
        ]
        lines += [
            f"| {c['model']} | {c['category']} | {c['seed']} | {c.get('error', '').replace('|', '/')} |"
            for c in failed
        ]
    return "\n".join(lines) + "\n"


# -- figures and HTML ------------------------------------------------------------------------------
_MODEL_COLORS = ["#d64541", "#2b7bba", "#2e8b57", "#e08a1e", "#7d4fb3", "#5b6475", "#c2185b", "#00838f"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def _scatter_figure(summary: list[dict], models: list[str]) -> str | None:
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
        color = (
            _MODEL_COLORS[models.index(row["model"]) % len(_MODEL_COLORS)]
            if row["model"] in models
            else "#333"
        )
        marker = _MARKERS[categories.index(row["category"]) % len(_MARKERS)]
        ax.errorbar(
            x["mean"],
            y["mean"],
            xerr=x["std"] or None,
            yerr=y["std"] or None,
            fmt=marker,
            ms=8,
            color=color,
            ecolor=color,
            elinewidth=1,
            capsize=3,
            mec="white",
            mew=0.8,
        )
        if len(categories) <= 12:
            ax.annotate(
                row["category"].split("/")[-1],
                (x["mean"], y["mean"]),
                textcoords="offset points",
                xytext=(6, 5),
                fontsize=8,
                color="#3a4356",
            )
    xs = [x["mean"] for _, x, _ in points]
    if min(xs) > 0 and max(xs) / min(xs) > 20:
        ax.set_xscale("log")
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=_MODEL_COLORS[i % len(_MODEL_COLORS)], marker="o", ls="", ms=8, label=m)
        for i, m in enumerate(models)
        if any(r["model"] == m for r, _, _ in points)
    ]
    if 1 < len(categories) <= 12:
        handles += [
            Line2D([], [], color="#5b6475", marker=_MARKERS[i % len(_MARKERS)], ls="", ms=7, label=c)
            for i, c in enumerate(categories)
        ]
    ax.legend(handles=handles, fontsize=8.5, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_xlabel("single-image latency, ms (median of ~10 one-image predictions; left is faster)")
    ax.set_ylabel("image AUROC (higher is better)")
    style_axes(ax)
    fig.tight_layout()
    return figure_data_uri(fig)


def _bars_figure(summary: list[dict], models: list[str]) -> str | None:
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
                ax.bar(
                    xs,
                    ys,
                    bar * 0.92,
                    yerr=es,
                    color=color,
                    alpha=0.85,
                    label=model,
                    capsize=2,
                    error_kw={"elinewidth": 1, "ecolor": "#1e2533"},
                )
                lows += ys
                if len(categories) * len(models) <= 24:
                    for x, y, err in zip(xs, ys, es):
                        ax.text(
                            x,
                            min(y + err, 1.0) + 0.006,
                            f"{y:.3f}",
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color="#3a4356",
                        )
        ax.set_xticks(range(len(categories)))
        ax.set_xticklabels(
            [c.split("/")[-1] for c in categories],
            rotation=30 if len(categories) > 6 else 0,
            ha="right" if len(categories) > 6 else "center",
            fontsize=9,
        )
        ax.set_ylabel(_TITLES[key])
        style_axes(ax)
        ax.grid(False, axis="x")
        ax.legend(
            fontsize=8.5, frameon=False, ncol=len(models), loc="lower center", bbox_to_anchor=(0.5, 1.0)
        )
    low = min(lows) if lows else 0.5
    for ax in axes:
        ax.set_ylim(max(0.0, min(0.5, math.floor((low - 0.05) * 10) / 10)), 1.05)
    fig.tight_layout(h_pad=2, w_pad=3)
    return figure_data_uri(fig)


#: the stacked parts of the network-size figure: (summary key, legend label, colour)
_SIZE_PARTS = [
    ("forward_mb", "forward pass (activations)", "#2b7bba"),
    ("backward_mb", "backward pass (saved activations)", "#e08a1e"),
    ("model_mb", "model file", "#2e8b57"),
    ("onnx_mb", "ONNX file", "#7d4fb3"),
]


def _network_size_figure(summary: list[dict]) -> str | None:
    """One stacked bar per deep model (and category when there are several): forward- and
    backward-pass activation memory at the batch size used, model-file and ONNX sizes in MB, with
    the parameter count above the bar."""
    rows = [r for r in summary if r.get("params_m") is not None]
    if not rows:
        return None
    several = len({r["category"] for r in rows}) > 1
    labels = [f"{r['model']}\n{r['category'].split('/')[-1]}" if several else r["model"] for r in rows]
    fig = new_figure(min(16.0, max(6.5, 1.0 + 0.9 * len(rows))), 4.2)
    ax = fig.subplots()
    bottoms = [0.0] * len(rows)
    for key, label, color in _SIZE_PARTS:
        values = [(r.get(key) or {}).get("mean", 0.0) for r in rows]
        ax.bar(range(len(rows)), values, 0.7, bottom=bottoms, color=color, alpha=0.85, label=label)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, (r, top) in enumerate(zip(rows, bottoms)):
        ax.text(
            i, top, f"{r['params_m']['mean']:.2f} M", ha="center", va="bottom", fontsize=8, color="#3a4356"
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=30 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center")
    ax.set_ylabel("MB")
    style_axes(ax)
    ax.grid(False, axis="x")
    ax.legend(fontsize=8.5, frameon=False, ncol=2, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    return figure_data_uri(fig)


def render_html(config: Mapping[str, Any], summary: list[dict], cells: list[dict]) -> str:
    e = html.escape
    models = list(config["models"])
    n_ok = sum(c.get("status") == "ok" for c in cells)
    n_failed = len(cells) - n_ok
    chips = [
        f"<span class=chip><b>{len({r['category'] for r in summary})}</b> categories</span>",
        f"<span class=chip><b>{len(models)}</b> models</span>",
        f"<span class='chip good'><b>{n_ok}</b> cells done</span>",
    ]
    if n_failed:
        chips.append(f"<span class='chip bad'><b>{n_failed}</b> failed</span>")
    header = (
        f"<h1>Benchmark: {e(', '.join(models))}</h1><div class=sub>data <b>{e(str(config['data']))}</b>"
        f" &nbsp;·&nbsp; up to {config['seeds']} seeds per stochastic model &nbsp;·&nbsp; {e(config['date'])}"
        f"</div><div class=chips>{''.join(chips)}</div>"
    )
    head = "".join(f"<th>{e(_TITLES[k])}</th>" for k in TABLE_KEYS)
    best: dict[tuple[str, str], float] = {}
    for row in summary:  # best mean per category, for the accuracy columns
        for k in ACCURACY_KEYS:
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
        seeds = str(len(row["seeds"])) + (
            f" <small class=bad>({len(row['failed_seeds'])} failed)</small>" if row["failed_seeds"] else ""
        )
        rows.append(
            f"<tr><td class=l>{e(row['category'])}</td><td class=l>{e(row['model'])}</td><td>{seeds}</td>"
            + "".join(tds)
            + "</tr>"
        )
    css = (
        "<style>table.bench td small{color:#6b7385;font-size:11px}table.bench td{white-space:nowrap}"
        "small.bad{color:#c0392b!important}table.bench{font-size:13px}</style>"
    )
    options = "".join(
        f"<li><b>{e(m)}</b>: {e(', '.join(f'{k}={v}' for k, v in o.items()))}</li>"
        for m, o in config["options"].items()
        if o
    )
    body = (
        css
        + "<section id=summary><h2>Results</h2><p class=note>Mean over seeds, ± sample standard deviation "
        "below; the best accuracy per category in bold. Fit s: wall time of fit (features, memory bank or "
        "Gaussians, calibration pass; the backbone's one-time set-up is timed apart, setup_s in the JSON). "
        "Predict img/s: the whole test split in batches, read from files. Latency: median of single-image "
        "predictions. Peak RSS: the cell's own process.</p>"
        + (f"<ul class=note>{options}</ul>" if options else "")
        + f"<div style='overflow-x:auto'><table class=bench><tr><th class=l>category</th><th class=l>model</th>"
        f"<th>seeds</th>{head}</tr>{''.join(rows)}</table></div></section>"
    )
    scatter = _scatter_figure(summary, models)
    bars = _bars_figure(summary, models)
    sizes = _network_size_figure(summary)
    if scatter:
        body += (
            "<section id=tradeoff><h2>Accuracy vs latency</h2><p class=note>One point per model × category "
            f"(error bars: std over seeds).</p><img class=plot alt='accuracy vs latency' src='{scatter}'>"
            "</section>"
        )
    if bars:
        body += (
            "<section id=categories><h2>Per category</h2><p class=note>Image and pixel AUROC per model "
            f"(error bars: std over seeds).</p><img class=plot alt='AUROC per category' src='{bars}'></section>"
        )
    if sizes:
        body += (
            "<section id=network-size><h2>Network size</h2><p class=note>Per deep model: activation memory "
            "of the forward pass (peak, no gradients) and what its forward pass saves for the backward pass, "
            "at the batch size used, measured on the CPU; model-file and ONNX sizes; parameters above each "
            "bar (the frozen backbone's included). Classical models have no network and no bar.</p>"
            f"<img class=plot alt='network size' src='{sizes}'></section>"
        )
    failed = [c for c in cells if c.get("status") != "ok"]
    if failed:
        body += (
            "<section id=failed><h2>Failed cells</h2><p class=note>Rerun the same command to retry them; "
            "finished cells are not recomputed.</p><table><tr><th class=l>model</th><th class=l>category</th>"
            "<th>seed</th><th class=l>error</th></tr>"
            + "".join(
                f"<tr><td class=l>{e(c['model'])}</td><td class=l>{e(c['category'])}</td>"
                f"<td>{c['seed']}</td><td class=l>{e(c.get('error', ''))}</td></tr>"
                for c in failed
            )
            + "</table></section>"
        )
    return page(f"anomalens benchmark: {', '.join(models)}", header, body)


def write_outputs(
    out: str | Path, config: Mapping[str, Any], cells: list[dict], summary: list[dict]
) -> dict[str, Path]:
    """OUT/benchmark.json (config, summary, every cell), benchmark.md and benchmark.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "benchmark.json", "markdown": out / "benchmark.md", "html": out / "benchmark.html"}
    payload = {"config": dict(config), "summary": summary, "cells": cells}
    texts = {
        "json": json.dumps(payload, indent=2, default=str),
        "markdown": render_markdown(config, summary, cells),
        "html": render_html(config, summary, cells),
    }
    for kind, path in paths.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(texts[kind], encoding="utf-8")
        tmp.replace(path)
    return {**paths, "cells": out / CELLS_FILE}
