"""Few-shot PatchCore: image AUROC from K = 1, 2, 4, 8, 16 goods, several seeds, mean +- std.

Usage: python benchmarks/bench_few_shot.py [--data ../shared/datasets/lookout_cookies/cookie]
       [--shots 1 2 4 8 16] [--seeds 5] [--augment 0] [--set key=value ...] [--json out.json]
Each seed picks other goods (`shots=K`, `seed=s`); the threshold comes from the calibration the fit
chose (held-out goods, or augmented leave-one-out with 5 goods or fewer), and the share of test goods it
flags and of defects it catches are reported beside AUROC, since a few-shot threshold is the
uncertain part.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

import anomalens
from anomalens.data import load_dataset
from anomalens.metrics import image_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets/lookout_cookies/cookie"))
    parser.add_argument("--model", default="patchcore")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--augment", type=int, default=0)
    parser.add_argument("--set", dest="sets", nargs="*", default=[])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_dataset(args.data)
    labels = np.array([s.label for s in data.test])
    extra = dict(s.split("=", 1) for s in args.sets)
    rows = []
    for k in args.shots:
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            start = time.perf_counter()
            det = anomalens.create(args.model, shots=k, seed=seed, augment_copies=args.augment, **extra)
            det.fit(data.train)
            pred = det.predict(data.test)
            flagged = pred.is_anomalous
            runs.append(
                {
                    "auroc": image_metrics(labels, pred.scores)["image_auroc"],
                    "goods_flagged": float(flagged[labels == 0].mean()),
                    "defects_caught": float(flagged[labels == 1].mean()),
                    "seconds": time.perf_counter() - start,
                }
            )
            print(k, seed, {key: round(v, 4) for key, v in runs[-1].items()}, flush=True)
        row = {"shots": k, "runs": runs}
        for key in ("auroc", "goods_flagged", "defects_caught", "seconds"):
            values = [r[key] for r in runs]
            row[key] = (float(np.mean(values)), float(np.std(values)))
        rows.append(row)
    print(
        f"{data.name}, {args.model}, augment_copies={args.augment}, {args.seeds} seeds, load {os.getloadavg()[0]:.1f}"
    )
    print("| K | image AUROC | test goods flagged | defects caught | s per fit+predict |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        a, g, d, s = (r[key] for key in ("auroc", "goods_flagged", "defects_caught", "seconds"))
        print(
            f"| {r['shots']} | {a[0]:.3f} ± {a[1]:.3f} | {g[0]:.0%} ± {g[1]:.0%} | "
            f"{d[0]:.0%} ± {d[1]:.0%} | {s[0]:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
