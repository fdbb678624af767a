"""Learning from synthetic defects: SimpleNet and DRAEM next to PatchCore on the same backbone.

    python benchmarks/bench_learners.py [--data ../shared/datasets/lookout_cookies/cookie]
        [--data ../shared/datasets/magnetic_tile/magnetic_tile] [--models simplenet,draem,patchcore]
        [-o benchmarks/results/learners] [--set draem.max_minutes=5]

A thin front to `anomalens benchmark` (workflows/benchmark.py): one process per (model, category)
cell, finished cells kept in OUT/cells.jsonl and not recomputed, and the Markdown table (image
AUROC, pixel AUROC, AUPRO, fit s, predict images/s, peak RSS, ONNX MB, ...) printed and written
with JSON and HTML beside it. A reported ONNX size means the export passed its parity check (scores
and maps within 1e-4 of the torch model's). SimpleNet and PatchCore use Lite0 (stages 2 and 3) at
256 px, squashed, so the comparison has the same backbone and geometry; DRAEM runs at its CPU
default (128 px). One seed each: the methods are deterministic for a seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from anomalens.report.benchmark_report import write_outputs
from anomalens.workflows.benchmark import parse_model_sets, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", action="append", help="category folder (repeatable); default: cookies and magnetic tile"
    )
    ap.add_argument("--models", default="simplenet,draem,patchcore")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "learners"))
    ap.add_argument("--set", action="append", default=[], help="model.option=value")
    args = ap.parse_args()
    data = args.data or [
        str(DATASETS / "lookout_cookies" / "cookie"),
        str(DATASETS / "magnetic_tile" / "magnetic_tile"),
    ]
    models = args.models.split(",")
    sets = parse_model_sets(args.set, models)
    for folder in data:
        out = Path(args.output) / Path(folder).name
        result = run_benchmark(models, folder, out, seeds=1, sets=sets, log=print)
        outputs = write_outputs(out, result.config, result.cells, result.summary)
        print(outputs["markdown"].read_text())


if __name__ == "__main__":
    main()
