"""Explanation faithfulness on real data: do the maps point at the annotated defects, and how fast?

Usage:
    python benchmarks/bench_explain.py --data ../shared/datasets/magnetic_tile/magnetic_tile \
        [--n-fit 200] [--n-explain 12] [--pool 120] [--samples 128] [--segments 64] [--pca 50] [--figures docs/img]

For PatchCore and for Isolation Forest on PCA pixel features (`classical:iforest`, features=pca:50
by default): fit on `--n-fit` training goods, pseudo-label a pool of unlabelled test images by the
detector's scores, fine-tune the explanation classifier on them (agreement on held-out pseudo-labels),
then explain `--n-explain` defective test images (resized to 256 x 256, masks alike) with every method
and report, per method: mean per-image pixel AUROC against the mask, pointing-game hit rate
(tolerance 8 px), deletion-curve area (explained order vs random order; lower = more faithful), and
wall and CPU seconds per explained image. Wall time on a shared machine is noisy; CPU seconds under
OMP_NUM_THREADS=1 stand for one idle core (they include scoring the image once). Prints a Markdown
table and writes bench_explain.json (and one example figure per method with --figures).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from skimage.transform import resize

import anomalens
from anomalens.data import load_dataset, read_image, read_mask
from anomalens.explain import explain_images, explanation_figure, train_classifier
from anomalens.explain.faithfulness import deletion_curve, faithfulness_summary
from anomalens.explain.lime_maps import baseline_image, detector_score_fn

SIZE = 256
TOLERANCE = 8
DETECTORS = {
    "patchcore": {"image_size": SIZE},
    "classical:iforest": {"image_size": SIZE, "pyod": "n_estimators=200"},  # + features=pca:--pca
}


def spread(items: list, n: int) -> list:
    """n items evenly spaced through the list (deterministic, covers every defect type)."""
    if n >= len(items):
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, n).round()]


def square(image: np.ndarray, order: int = 1) -> np.ndarray:
    return resize(image, (SIZE, SIZE), order=order, anti_aliasing=order > 0, preserve_range=True).astype(
        np.float32
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--n-fit", type=int, default=200)
    ap.add_argument("--n-explain", type=int, default=12)
    ap.add_argument(
        "--pool", type=int, default=120, help="unlabelled test images pseudo-labelled for the classifier"
    )
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--segments", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument(
        "--pca", type=int, default=50, help="PCA components of the Isolation Forest's pixel features"
    )
    ap.add_argument("--models", default=",".join(DETECTORS))
    ap.add_argument("--figures", type=Path, default=None, help="write one example figure per method here")
    ap.add_argument("--out", type=Path, default=Path("bench_explain.json"))
    args = ap.parse_args()

    dataset = load_dataset(args.data)
    fit_set = spread(dataset.train, args.n_fit)
    normals = [s.path for s in spread(dataset.train, 32)]
    defects = [s for s in dataset.test if s.label == 1 and s.mask_path is not None]
    chosen = spread(defects, args.n_explain)
    images = [square(read_image(s.path)) for s in chosen]
    masks = [square(read_mask(s.mask_path).astype(np.float32), order=0) > 0.5 for s in chosen]
    pool = spread(dataset.test, args.pool)  # labels unused: the detector pseudo-labels them
    rows, details = [], {}
    for name in args.models.split(","):
        options = {
            **DETECTORS[name],
            **({"features": f"pca:{args.pca}"} if name == "classical:iforest" else {}),
        }
        detector = anomalens.create(name, **options).fit(fit_set)
        pool_scores = detector.predict(pool).normalized_scores
        start = time.perf_counter()
        classifier = train_classifier(pool_scores, [s.path for s in pool], epochs=args.epochs)
        train_seconds = time.perf_counter() - start
        score = detector_score_fn(detector)
        methods = (["map"] if detector.localizes else []) + ["lime-score", "gradcam", "lime"]
        details[name] = {"classifier": {**classifier.info, "train_seconds": round(train_seconds, 1)}}
        for method in methods:
            cpu = time.process_time()  # one thread (OMP_NUM_THREADS=1): CPU time ~ wall time on an idle core
            explanations = explain_images(
                detector,
                images,
                method,
                classifier=classifier,
                normal_images=normals,
                n_segments=args.segments,
                num_samples=args.samples,
            )
            cpu_seconds = (time.process_time() - cpu) / len(images)
            maps = [e.map for e in explanations]
            quality = faithfulness_summary(maps, masks, tolerance=TOLERANCE)
            curves = [
                deletion_curve(score, image, m, baseline_image(image, normals))
                for image, m in zip(images, maps)
            ]
            seconds = float(np.mean([e.seconds for e in explanations]))
            row = {
                "detector": name,
                "method": method,
                **quality,
                "deletion_auc": float(np.mean([c["auc"] for c in curves])),
                "random_deletion_auc": float(np.mean([c["random_auc"] for c in curves])),
                "seconds_per_image": round(seconds, 2),
                "cpu_seconds_per_image": round(cpu_seconds, 2),
            }
            if method in ("gradcam", "lime"):
                row["classifier_agreement"] = classifier.info["agreement"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.figures:
                args.figures.mkdir(parents=True, exist_ok=True)
                pick = int(np.argmax([e.normalized_score for e in explanations]))
                named = replace(
                    explanations[pick], key=f"{chosen[pick].defect_type}/{chosen[pick].path.name}"
                )
                explanation_figure(named, images[pick]).save(
                    args.figures / f"explain_tile_{name.replace('classical:', '')}_{method}.png"
                )
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "details": details,
                "size": SIZE,
                "n_explain": len(chosen),
                "tolerance_px": TOLERANCE,
                "samples": args.samples,
                "segments": args.segments,
                "load_average": os.getloadavg(),
            },
            indent=2,
        )
    )
    print(
        "\n| detector | method | pixel AUROC | pointing game | deletion AUC (random) | s / image | CPU s / image |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        auroc = "n/a" if r["pixel_auroc"] is None else f"{r['pixel_auroc']:.3f}"
        print(
            f"| {r['detector']} | {r['method']} | {auroc} | {r['pointing_game']:.2f} | "
            f"{r['deletion_auc']:.2f} ({r['random_deletion_auc']:.2f}) | {r['seconds_per_image']:.2f} | "
            f"{r['cpu_seconds_per_image']:.2f} |"
        )
    print(f"\nclassifier: {json.dumps(details)}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
