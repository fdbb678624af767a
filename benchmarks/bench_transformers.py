"""Transformer benchmark: UTRAD and VT-ADL at their CPU defaults, next to PatchCore.

    python benchmarks/bench_transformers.py [--data ../shared/datasets/magnetic_tile/magnetic_tile]
                                            [--models utrad,vtadl,patchcore] [-o benchmarks/results/transformers]
                                            [--set utrad.epochs=5]

A thin front to `anomalens benchmark` (workflows/benchmark.py): one process per (model, category)
run, finished runs kept in OUT/cells.jsonl and not recomputed, and the Markdown table (image
AUROC, pixel AUROC, AUPRO, fit s, predict images/s, latency, peak RSS, model and ONNX MB)
printed and written with JSON and HTML beside it. One seed per model: a trained transformer
takes up to its `max_minutes` (15) per run on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalens.report.benchmark_report import write_outputs
from anomalens.workflows.benchmark import parse_model_sets, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "datasets" / "magnetic_tile" / "magnetic_tile")
    )
    ap.add_argument("--models", default="utrad,vtadl,patchcore")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "transformers"))
    ap.add_argument("--set", action="append", default=[], help="model.option=value")
    args = ap.parse_args()
    models = args.models.split(",")
    result = run_benchmark(
        models, args.data, args.output, seeds=1, sets=parse_model_sets(args.set, models), log=print
    )
    outputs = write_outputs(args.output, result.config, result.cells, result.summary)
    print(outputs["markdown"].read_text())


if __name__ == "__main__":
    main()
