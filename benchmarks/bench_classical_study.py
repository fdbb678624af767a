"""The classical-detector study, end to end, timed: 15 detectors x representations on one dataset.

    python benchmarks/bench_classical_study.py                       # magnetic tile, the default five representations
    python benchmarks/bench_classical_study.py --data DIR --features raw,deep --out study/ --fresh

Runs `anomalens.workflows.classical_study.run_study` (a fresh study unless --resume), writes its
outputs (`anomalens.report.study_report.write_outputs`), prints the Markdown table and one JSON
line: wall seconds, cells ok / skipped / failed, peak RSS of this process and of the cell workers
(RUSAGE_CHILDREN), load average before and after (the machine may be shared: read the time with the
load average). Target on magnetic tile: under 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile" / "magnetic_tile"


def main(argv: list[str] | None = None) -> dict:
    from anomalens.report.study_report import write_outputs
    from anomalens.workflows.classical_study import DEFAULT_FEATURES, run_study

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--models", default="classical:all")
    ap.add_argument("--features", default=",".join(DEFAULT_FEATURES))
    ap.add_argument("--out", default="classical_study_bench")
    ap.add_argument("--cell-budget", type=float, default=120.0)
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], help="option key=value for every detector"
    )
    ap.add_argument("--resume", action="store_true", help="keep OUT and reuse its finished cells")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    out = Path(args.out)
    if out.exists() and not args.resume:
        shutil.rmtree(out)
    load_start = os.getloadavg()
    start = time.perf_counter()
    result = run_study(
        args.data,
        args.models,
        args.features,
        out,
        options=dict(s.split("=", 1) for s in args.sets),
        cell_budget_s=args.cell_budget or None,
        progress=args.progress,
        log_fn=lambda m: print(m, file=sys.stderr, flush=True),
    )
    outputs, markdown = write_outputs(out, result.config, result.cells, result.features)
    wall = time.perf_counter() - start
    print(markdown)
    status = [c["status"] for c in result.cells]
    summary = {
        "data": args.data,
        "wall_s": round(wall, 1),
        "cells": len(status),
        "ok": status.count("ok"),
        "skipped": status.count("skipped"),
        "failed": status.count("failed"),
        "n_run": result.n_run,
        "n_reused": result.n_reused,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_mb_workers": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "top5_by_auroc": [
            (c["detector"], c["features"], round(c["image_auroc"], 4))
            for c in result.ranked("image_auroc")[:5]
        ],
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "outputs": {k: str(v) for k, v in outputs.items()},
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
