"""ONNX export: parity with torch, exported size and single-image latency, torch vs ONNX Runtime.

Usage: python benchmarks/bench_export.py [--data ../shared/datasets/lookout_cookies/cookie]
           [--models patchcore,padim] [--runs 40] [--threads 2] [--json out.json]

Each model is fitted at its defaults on the category's training goods, exported, and both runtimes
score the whole test split: max |score diff| and max |map diff| (maps at image resolution), image
AUROC of each. Latency is one image per call (batch 1, read + preprocess + score), both runtimes on
`--threads` threads, cycling over the test images after a warm-up. The "torch" detector runs its
backbone through ONNX Runtime too (engine=auto on CPU): it is the library's default CPU path.
CPU timings are noisy on a shared machine; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import anomalens
from anomalens.data import load_dataset
from anomalens.export import OnnxDetector, export_onnx
from anomalens.metrics import image_metrics


def latencies_ms(predict, paths: list[Path], runs: int) -> np.ndarray:
    predict([paths[0]])  # warm-up: ORT kernels, oneDNN primitives, the map matrices
    times = []
    for i in range(runs):
        start = time.perf_counter()
        predict([paths[i % len(paths)]])
        times.append(1000 * (time.perf_counter() - start))
    return np.array(times)


def bench_model(name: str, data: Path, runs: int, threads: int) -> dict:
    dataset = load_dataset(data)
    det = anomalens.create(name, device="cpu").fit(dataset.train)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = export_onnx(det, Path(tmp) / f"{name}.onnx")
        export_s = time.perf_counter() - start
        onnx_det = OnnxDetector.load(path, threads=threads)
        size_mb = path.stat().st_size / 2**20
        ref, got = det.predict(dataset.test), onnx_det.predict(dataset.test)
        labels = [s.label for s in dataset.test]
        paths = [s.path for s in dataset.test]
        torch_ms = latencies_ms(det.predict, paths, runs)
        onnx_ms = latencies_ms(onnx_det.predict, paths, runs)
    return {
        "model": name,
        "n_test": len(dataset.test),
        "max_score_diff": float(np.abs(got.scores - ref.scores).max()),
        "max_map_diff": max(float(np.abs(a - b).max()) for a, b in zip(got.maps, ref.maps)),
        "max_normalized_score_diff": float(np.abs(got.normalized_scores - ref.normalized_scores).max()),
        "same_verdicts": bool((got.is_anomalous == ref.is_anomalous).all()),
        "score_range": [float(ref.scores.min()), float(ref.scores.max())],
        "auroc_torch": image_metrics(labels, ref.scores)["image_auroc"],
        "auroc_onnx": image_metrics(labels, got.scores)["image_auroc"],
        "onnx_mb": round(size_mb, 2),
        "export_s": round(export_s, 1),
        "torch_p50_ms": float(np.percentile(torch_ms, 50)),
        "torch_p95_ms": float(np.percentile(torch_ms, 95)),
        "onnx_p50_ms": float(np.percentile(onnx_ms, 50)),
        "onnx_p95_ms": float(np.percentile(onnx_ms, 95)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/lookout_cookies/cookie"))
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--runs", type=int, default=40, help="timed single-image calls per runtime")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = [bench_model(name, args.data, args.runs, args.threads) for name in args.models.split(",")]
    print(
        f"data {args.data}, batch 1, {args.threads} threads, {args.runs} timed calls; "
        f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        "| model | max abs score diff | max abs map diff | same verdicts | AUROC torch / ONNX | ONNX MB "
        "| torch p50 / p95 ms | ONNX Runtime p50 / p95 ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['max_score_diff']:.2e} | {r['max_map_diff']:.2e} | {r['same_verdicts']} "
            f"| {r['auroc_torch']:.3f} / {r['auroc_onnx']:.3f} | {r['onnx_mb']:.2f} "
            f"| {r['torch_p50_ms']:.0f} / {r['torch_p95_ms']:.0f} "
            f"| {r['onnx_p50_ms']:.0f} / {r['onnx_p95_ms']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
