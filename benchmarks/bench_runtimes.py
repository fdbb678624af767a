"""fp32 against INT8, and torch against ONNX Runtime against OpenVINO, on one category at a time.

For each method: fits it twice (runtime_precision fp32 and int8, the same seed), exports both,
and measures
- accuracy: image AUROC of every runtime and precision on the whole test set, and the INT8
  model's score parity against fp32 (max and mean |normalized score difference|, verdict flips,
  Spearman rank correlation of the image scores);
- speed: predict from files (no overlays) in images/s and in process CPU ms per image (steadier
  than wall time on a shared machine), the runtimes interleaved round by round in this one process
  so a busy machine slows them alike (median over rounds), and single-image latency of the
  service's path (`ServedModel.verdict`, one decoded image at a time, median ms).
The ONNX Runtime exports score as torch does (parity 1e-4, tests/test_export.py), so by default
only torch and OpenVINO are scored on the whole test set for AUROC (--auroc-all: every runtime).

    python benchmarks/bench_runtimes.py --data ../shared/datasets/lookout_cookies/cookie \
        --methods patchcore padim --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

import anomalens
from anomalens.data import load_mvtec, read_image
from anomalens.export import export_onnx, load_model, openvino_available
from anomalens.serve.model import ServedModel


def runtimes(model_file: Path, onnx_file: Path, threads: int) -> dict[str, object]:
    """Every way to run one fitted model: torch (its feature runner in ONNX Runtime), and its
    export in ONNX Runtime and OpenVINO."""
    models = {
        "torch": load_model(model_file, "torch", threads=threads, device="cpu"),
        "onnx": load_model(onnx_file, "onnx", threads=threads),
    }
    if openvino_available():
        models["openvino"] = load_model(onnx_file, "openvino", threads=threads)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="an MVTec-layout category")
    ap.add_argument("--methods", nargs="+", default=["patchcore", "padim"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--speed-images", type=int, default=64, help="test images timed per round")
    ap.add_argument("--latency-images", type=int, default=20)
    ap.add_argument("--auroc-all", action="store_true", help="AUROC of the onnx runtime too")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mvtec(args.data)
    paths = [s.path for s in data.test]
    labels = np.array([s.label for s in data.test])
    step = max(1, len(paths) // args.speed_images)
    timed = paths[::step][: args.speed_images]
    singles = [
        read_image(p) for p in paths[:: max(1, len(paths) // args.latency_images)][: args.latency_images]
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            models, row = {}, {"data": str(args.data), "method": method, "threads": args.threads}
            for precision in ("fp32", "int8"):
                det = anomalens.create(method, runtime_precision=precision, device="cpu")
                start = time.perf_counter()
                det.fit(data.train)
                row[f"fit_s_{precision}"] = round(time.perf_counter() - start, 2)
                model_file = det.save(Path(tmp) / f"{method}_{precision}.model")
                onnx_file = export_onnx(det, Path(tmp) / f"{method}_{precision}.onnx")
                for runtime, model in runtimes(model_file, onnx_file, args.threads).items():
                    models[f"{runtime}-{precision}"] = model
            scores = {}
            for name, model in models.items():
                if name.startswith("onnx") and not args.auroc_all:
                    continue
                scores[name] = model.predict(paths)
                row[f"auroc_{name}"] = round(float(roc_auc_score(labels, scores[name].scores)), 4)
            fp32, int8 = scores["torch-fp32"], scores["torch-int8"]
            diff = np.abs(fp32.normalized_scores - int8.normalized_scores)
            row["int8_vs_fp32"] = {
                "max_normalized_score_diff": round(float(diff.max()), 4),
                "mean_normalized_score_diff": round(float(diff.mean()), 4),
                "verdict_flips": int((fp32.is_anomalous != int8.is_anomalous).sum()),
                "spearman": round(float(spearmanr(fp32.scores, int8.scores).statistic), 4),
            }
            rates: dict[str, list[float]] = {n: [] for n in models}
            cpu: dict[str, list[float]] = {n: [] for n in models}
            for _ in range(args.rounds):
                for name, model in models.items():
                    start, cpu_start = time.perf_counter(), time.process_time()
                    model.predict(timed)
                    rates[name].append(len(timed) / (time.perf_counter() - start))
                    cpu[name].append(1000 * (time.process_time() - cpu_start) / len(timed))
            row["images_per_s"] = {n: round(statistics.median(r), 1) for n, r in rates.items()}
            row["cpu_ms_per_image"] = {n: round(statistics.median(r), 1) for n, r in cpu.items()}
            latency = {}
            for name, model in models.items():
                served = ServedModel(model, name, {})
                served.verdict(singles[0])  # warm-up
                times = []
                for image in singles:
                    start = time.perf_counter()
                    served.verdict(image)
                    times.append(1000 * (time.perf_counter() - start))
                latency[name] = round(statistics.median(times), 1)
            row["latency_ms"] = latency
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
