"""Foundation benchmark: PatchCore and PaDiM on every MVTec-layout category under a folder.

    python benchmarks/bench_foundation.py [--data ../shared/datasets] [--repeats 3] [-o benchmarks/results/foundation]
                                          [--set patchcore.coreset_ratio=0.01]

A thin front to `anomalens benchmark` (workflows/benchmark.py): each (model, category, seed) run is
its own process (peak RSS is that run's own), finished runs are kept in OUT/cells.jsonl and not
recomputed, and the Markdown table of mean ± std (image AUROC, pixel AUROC, AUPRO, fit s,
predict images/s, single-image latency, peak RSS, model file MB) is printed and written with
JSON and HTML beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalens.report.benchmark_report import write_outputs
from anomalens.workflows.benchmark import parse_model_sets, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--models", default="patchcore,padim")
    ap.add_argument("--repeats", type=int, default=3, help="seeds per stochastic model")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "foundation"))
    ap.add_argument("--set", action="append", default=[], help="model.option=value")
    args = ap.parse_args()
    models = args.models.split(",")
    result = run_benchmark(
        models, args.data, args.output, seeds=args.repeats, sets=parse_model_sets(args.set, models), log=print
    )
    outputs = write_outputs(args.output, result.config, result.cells, result.summary)
    print(outputs["markdown"].read_text())


if __name__ == "__main__":
    main()
