"""Feature-extraction speed: torch eager vs ONNX Runtime, batch 1 and 8.

Usage: python benchmarks/bench_backbone.py [--size 256] [--runs 5] [--name efficientnet_lite0]
Prints a JSON table; load averages are included because a busy machine skews CPU timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import onnxruntime
import torch

from anomalens.backbones import BackboneSpec, OnnxFeatureRunner, TorchFeatureRunner, build_backbone


def median_seconds(runner, x: np.ndarray, runs: int) -> float:
    runner(x)  # warm-up: allocations, oneDNN primitive / ORT kernel setup
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="efficientnet_lite0")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    extractor = build_backbone(BackboneSpec(args.name, tuple(args.layers)))
    start = time.perf_counter()
    onnx_runner = OnnxFeatureRunner(extractor, args.size)
    onnx_setup = time.perf_counter() - start
    engines = {"torch": TorchFeatureRunner(extractor), "onnx": onnx_runner}

    rows = []
    rng = np.random.default_rng(0)
    for batch in args.batches:
        x = rng.uniform(-1.0, 1.0, (batch, 3, args.size, args.size)).astype(np.float32)
        outputs = {name: runner(x) for name, runner in engines.items()}
        diff = max(float(np.abs(a - b).max()) for a, b in zip(outputs["torch"], outputs["onnx"], strict=True))
        for name, runner in engines.items():
            seconds = median_seconds(runner, x, args.runs)
            rows.append(
                {
                    "engine": name,
                    "batch": batch,
                    "median_s_per_batch": round(seconds, 4),
                    "images_per_s": round(batch / seconds, 1),
                    "max_abs_diff_torch_vs_onnx": diff,
                }
            )

    print(
        json.dumps(
            {
                "backbone": args.name,
                "layers": args.layers,
                "input": [args.size, args.size],
                "runs": args.runs,
                "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__,
                "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(),
                "onnx_setup_s": round(onnx_setup, 2),
                "onnx_exported_now": onnx_runner.exported,
                "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
