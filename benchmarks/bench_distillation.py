"""Distillation benchmark: EfficientAD, reverse distillation and STFPM next to PatchCore.

    python benchmarks/bench_distillation.py [--data ../shared/datasets/magnetic_tile/magnetic_tile]
        [--models efficientad,reverse_distillation,stfpm,patchcore] [-o benchmarks/results/distillation]
        [--set stfpm.max_minutes=5] [--latency] [--latency-only]

A thin front to `anomalens benchmark` (workflows/benchmark.py): one process per (model, category)
cell, finished cells kept in OUT/cells.jsonl and not recomputed, and the Markdown table (image
AUROC, pixel AUROC, AUPRO, fit s, predict images/s, single-image latency, ...) printed and written
with JSON and HTML beside it. The trained methods are deterministic for a seed, so one seed each.

--latency also times EfficientAD-S's single-image inference at 256 px on 2 threads, PyTorch and
ONNX Runtime (the weights do not change the cost, so an unfitted model is timed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from anomalens.report.benchmark_report import write_outputs
from anomalens.workflows.benchmark import parse_model_sets, run_benchmark

ROOT = Path(__file__).resolve().parents[1]


def efficientad_latency(image_size: int = 256, threads: int = 2, repeats: int = 10) -> dict[str, float]:
    """Median milliseconds per single image of EfficientAD-S's inference graph, torch and ONNX Runtime."""
    from anomalens.export import ort_session
    from anomalens.models.efficientad import EfficientAd

    torch.set_num_threads(threads)
    det = EfficientAd(image_size=image_size, device="cpu")
    det._set_modules(det._build_modules())
    module = det.inference_module()
    x = torch.randn(1, 3, image_size, image_size)

    def median_ms(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times)[len(times) // 2]

    with torch.inference_mode():
        torch_ms = median_ms(lambda: module(x))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "efficientad.onnx"
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=17)
        session = ort_session(path, threads=threads)
        feed = {session.get_inputs()[0].name: x.numpy()}
        ort_ms = median_ms(lambda: session.run(None, feed))
    return {"torch_ms": torch_ms, "onnxruntime_ms": ort_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", default=str(ROOT.parent / "shared" / "datasets" / "magnetic_tile" / "magnetic_tile")
    )
    ap.add_argument("--models", default="efficientad,reverse_distillation,stfpm,patchcore")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "distillation"))
    ap.add_argument("--set", action="append", default=[], help="model.option=value")
    ap.add_argument("--latency", action="store_true", help="also time EfficientAD-S at 256 px")
    ap.add_argument("--latency-only", action="store_true", help="only time EfficientAD-S at 256 px")
    args = ap.parse_args()
    if args.latency or args.latency_only:
        latency = efficientad_latency()
        print(
            f"EfficientAD-S, 256 px, 1 image, 2 threads: PyTorch {latency['torch_ms']:.0f} ms, "
            f"ONNX Runtime {latency['onnxruntime_ms']:.0f} ms"
        )
    if args.latency_only:
        return
    models = args.models.split(",")
    result = run_benchmark(
        models, args.data, args.output, seeds=1, sets=parse_model_sets(args.set, models), log=print
    )
    outputs = write_outputs(args.output, result.config, result.cells, result.summary)
    print(outputs["markdown"].read_text())


if __name__ == "__main__":
    main()
