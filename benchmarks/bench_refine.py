"""A few labelled defects: PatchCore alone against PatchCore + `refine`, on the same test images.

The papers' protocol (Bougaham et al.): K labelled defects per type move from the test split to
training (`--train-defects K`, with as many test goods), over several seeds; both models are
judged on the rest only. Reports image AUROC, ZFN (accuracy at the threshold with zero false
negatives, set with the test labels: an upper bound for both) and the false-alarm rate there, and
the refined model's own cross-validated full-recall threshold applied to the test images (recall
and false alarms at a threshold that never saw them).

Usage: python benchmarks/bench_refine.py --data ../shared/datasets/magnetic_tile/magnetic_tile \
           --k 5 --seeds 5 [--classifier extra_trees] [--out benchmarks/results/refine_tile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

import anomalens
from anomalens.data import load_dataset
from anomalens.data.labels import split_train_defects
from anomalens.metrics import full_recall_metrics, image_metrics
from anomalens.workflows.refine import refine


def _judge(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    full = full_recall_metrics(labels, scores)
    return {
        "image_auroc": image_metrics(labels, scores)["image_auroc"],
        "zfn": full["accuracy_at_full_recall"],
        "fpr_at_full_recall": full["fpr_at_full_recall"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="patchcore")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--classifier", default="extra_trees")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    start = time.perf_counter()
    detector = anomalens.create(args.model).fit(dataset.train)
    fit_s = time.perf_counter() - start
    # every test image scored once; each seed's refined scores are read off these scores and maps
    base = detector.predict(dataset.test, calibrated=False)
    cached = {k: (s, m) for k, s, m in zip(base.keys, base.scores, base.maps)}
    runs = []
    for seed in range(args.seeds):
        rest, lent = split_train_defects(dataset, args.k, seed)
        t = time.perf_counter()
        refined, report = refine(detector, lent, classifier=args.classifier, seed=seed)
        refine_s = time.perf_counter() - t
        keys = [str(s.path) for s in rest.test]
        labels = np.array([s.label for s in rest.test])
        raw = np.array([cached[k][0] for k in keys])
        prob = np.array([refined.refiner.score(*cached[k]) for k in keys])
        flagged = prob >= refined.decision_calibration.threshold
        runs.append(
            {
                "seed": seed,
                "n_test": len(keys),
                "n_labelled": len(lent),
                "refine_s": round(refine_s, 2),
                "base": _judge(labels, raw),
                "refined": _judge(labels, prob),
                "refined_at_cv_threshold": {
                    "recall": float(flagged[labels == 1].mean()),
                    "false_alarm_rate": float(flagged[labels == 0].mean()),
                },
                "cv_report": report.to_dict(),
            }
        )
        print(json.dumps(runs[-1]["base"]), json.dumps(runs[-1]["refined"]), flush=True)

    def stat(side: str, key: str) -> str:
        values = np.array([r[side][key] for r in runs], dtype=float)
        return f"{values.mean():.3f} ± {values.std():.3f}"

    summary = {
        "data": str(args.data),
        "model": args.model,
        "classifier": args.classifier,
        "k": args.k,
        "seeds": args.seeds,
        "fit_s": round(fit_s, 1),
        "load_average": os.getloadavg(),
        "mean_std": {
            side: {key: stat(side, key) for key in runs[0][side]}
            for side in ("base", "refined", "refined_at_cv_threshold")
        },
        "runs": runs,
    }
    print(json.dumps(summary["mean_std"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
