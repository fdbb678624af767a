"""The classical study's outputs: OUT/study.json (config, representations, every cell without its
scores, the top 5s) and OUT/study.md (the ranked tables, the representations, the skipped cells).

    from anomalens.workflows.classical_study import run_study
    from anomalens.report.study_report import write_outputs
    result = run_study("../shared/datasets/magnetic_tile/magnetic_tile", out_dir="study/")
    paths, markdown = write_outputs(Path("study/"), result.config, result.cells, result.features)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anomalens.workflows.classical_study import ranked
from anomalens.workflows.runs import CELLS_FILE

__all__ = ["COLUMNS", "render_markdown", "write_outputs"]

COLUMNS = [
    ("image_auroc", "AUROC", ".3f"),
    ("image_ap", "AP", ".3f"),
    ("f1_pyod", "F1 PyOD thr", ".3f"),
    ("flagged_pyod", "flagged PyOD", ".0%"),
    ("f1_proba", "F1 proba>0.5", ".3f"),
    ("f1_calibrated", "F1 calibrated", ".3f"),
    ("image_f1_max", "F1-max", ".3f"),
    ("fit_s", "fit s", ".2f"),
    ("score_ms_per_image", "score ms/img", ".2f"),
]


def _fmt(value: Any, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _table(rows: Sequence[dict[str, Any]], rank: bool = True) -> list[str]:
    head = (["#"] if rank else []) + ["detector", "features"] + [t for _, t, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, c in enumerate(rows, 1):
        cols = ([str(i)] if rank else []) + [c["detector"].removeprefix("classical:"), c["features"]]
        cols += [_fmt(c.get(k), f) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cols) + " |")
    return lines


def render_markdown(
    config: dict[str, Any], cells: Sequence[dict[str, Any]], features: dict[str, dict[str, Any]]
) -> str:
    ok = ranked(cells, "image_auroc")
    skipped = [c for c in cells if c["status"] != "ok"]
    lines = [
        f"# Classical detectors study: {config['dataset']}",
        "",
        f"{len(config['detectors'])} detectors x {len(config['features'])} representations = {len(cells)} cells: "
        f"{len(ok)} ok, {sum(c['status'] == 'skipped' for c in cells)} skipped, "
        f"{sum(c['status'] == 'failed' for c in cells)} failed. Fit on {config['n_fit']} training goods, "
        f"threshold calibrated on {config['n_calibration']} held-out goods, scored on {config['n_test']} test "
        f"images. Per-cell budget {config['cell_budget_s']} s. {config['cpus']} CPUs, load average "
        f"{config['load_average_start']} at start, {config.get('load_average_end')} at the end "
        f"({config['started']} to {config.get('finished')}).",
        "",
        "F1 PyOD thr: PyOD's own `predict` (contamination-based `threshold_`); F1 proba>0.5: PyOD's linear "
        "`predict_proba` > 0.5; F1 calibrated: anomalens' threshold from held-out goods; F1-max: best threshold "
        "on the test set (optimistic, for reference); flagged PyOD: share of test images PyOD's threshold "
        "flags (an F1 of 2p/(1+p), p = share of defects, means it flags everything). "
        "fit s: detector fit + calibration scoring on cached "
        "features; score ms/img: detector scoring per test image (feature extraction listed below).",
        "",
        "## Top 5 by F1 at the PyOD threshold",
        "",
        *_table(ranked(cells, "f1_pyod")[:5]),
        "",
        "## Top 5 by image AUROC",
        "",
        *_table(ok[:5]),
        "",
        "## All cells, ranked by image AUROC",
        "",
        *_table(ok),
        "",
    ]
    lines += [
        "## Representations",
        "",
        "| features | train matrix | fit s | ms/img | note |",
        "|---|---|---|---|---|",
    ]
    for spec, info in features.items():
        if info.get("status") == "ok":
            lines.append(
                f"| {spec} | {' x '.join(map(str, info['train_shape']))} | {info['fit_s']:.1f} | "
                f"{info['transform_ms_per_image']:.1f} | |"
            )
        else:
            lines.append(f"| {spec} | | | | {info.get('reason', info.get('status', ''))} |")
    if skipped:
        lines += [
            "",
            "## Skipped or failed cells",
            "",
            "| detector | features | status | reason |",
            "|---|---|---|---|",
        ]
        for c in skipped:
            reason = str(c.get("reason", "")).replace("|", "\\|")
            lines.append(
                f"| {c['detector'].removeprefix('classical:')} | {c['features']} | {c['status']} | {reason} |"
            )
    return "\n".join(lines) + "\n"


def write_outputs(
    out: str | Path,
    config: dict[str, Any],
    cells: Sequence[dict[str, Any]],
    features: dict[str, dict[str, Any]],
) -> tuple[dict[str, Path], str]:
    """Write OUT/study.json and OUT/study.md; the paths (with the cells file's) and the Markdown."""
    out = Path(out)
    markdown = render_markdown(config, cells, features)
    slim = [{k: v for k, v in c.items() if k != "test_scores"} for c in cells]
    summary = {
        "config": config,
        "features": features,
        "cells": slim,
        "top5_by_f1_pyod": [
            (c["detector"], c["features"], c["f1_pyod"]) for c in ranked(cells, "f1_pyod")[:5]
        ],
        "top5_by_auroc": [
            (c["detector"], c["features"], c["image_auroc"]) for c in ranked(cells, "image_auroc")[:5]
        ],
    }
    paths = {"json": out / "study.json", "markdown": out / "study.md", "cells": out / CELLS_FILE}
    paths["json"].write_text(json.dumps(summary, indent=1))
    paths["markdown"].write_text(markdown)
    return paths, markdown
