"""Plant scale for the classical detectors: fit and score N synthetic images of H x W.

    python benchmarks/bench_classical_scale.py                      # 15,000 images of 256 x 320, pca:300 + iforest
    python benchmarks/bench_classical_scale.py --n 2000 --detector classical:knn --features deep

Images are generated with numpy into a temporary folder (8-bit grayscale PNGs: a shaded stripe
texture with a per-image shift, brightness and noise; one in 50 has a bright blob), outside the
timed part. Then `fit` (which holds out 10 % for calibration and scores them) and `predict` on all
N images (streamed with `iter_predict`) are timed; the peak RSS of the process is read at the end. Prints one JSON line:
times, images/s, peak RSS, load average before/after and the machine's CPU count (the machine
may be shared: read the times with the load average).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def generate(folder: Path, n: int, height: int, width: int, seed: int = 0) -> list[Path]:
    """n seeded 8-bit grayscale PNGs: stripes + shading + noise, a bright blob in one of 50."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pad = 16
    big = 0.5 + 0.12 * np.sin(
        2
        * np.pi
        * (
            np.mgrid[0 : height + pad, 0 : width + pad][1] * 0.9
            + np.mgrid[0 : height + pad, 0 : width + pad][0] * 0.4
        )
        / 11.0
    )
    paths = []
    for i in range(n):
        dy, dx = rng.integers(0, pad, 2)
        img = (
            big[dy : dy + height, dx : dx + width]
            + rng.normal(0, 0.03)
            + 0.04 * (xx / width - 0.5) * rng.normal()
        )
        img = img + rng.normal(0, 0.02, (height, width)).astype(np.float32)
        if i % 50 == 49:
            cy, cx, r = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width, rng.uniform(4, 12)
            img = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r * r, 0.95, img)
        path = folder / f"img_{i:05d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path, compress_level=1)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=15000)
    ap.add_argument("--height", type=int, default=256)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--detector", default="classical:iforest")
    ap.add_argument("--features", default="pca:300")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="detector option key=value")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workdir", default=None, help="where to write the images (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the images and the model file")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)

    import anomalens

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="anomalens_scale_"))
    load_start = os.getloadavg()
    start = time.perf_counter()
    paths = generate(work / "images", args.n, args.height, args.width)
    gen_s = time.perf_counter() - start
    rss_after_gen = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    options = dict(s.split("=", 1) for s in args.sets)
    det = anomalens.create(args.detector, features=args.features, batch_size=args.batch_size, **options)
    try:
        start = time.perf_counter()
        det.fit(paths, progress=args.progress)
        fit_s = time.perf_counter() - start
        start = time.perf_counter()
        # iter_predict streams: predict() would also hold one full-size map per image (4.9 GB here)
        scores = np.array([scored.score for scored in det.iter_predict(paths, progress=args.progress)])
        score_s = time.perf_counter() - start
        model = det.save(work / "scale.model")
        reading = det.pyod_reading(scores) if hasattr(det, "pyod_reading") else None
        result = {
            "n_images": args.n,
            "image": [args.height, args.width],
            "detector": args.detector,
            "features": args.features,
            "options": options,
            "generate_s": round(gen_s, 1),
            "fit_s": round(fit_s, 1),
            "score_s": round(score_s, 1),
            "fit_plus_score_s": round(fit_s + score_s, 1),
            "score_images_per_s": round(args.n / score_s, 1),
            "n_fit": det.fit_info.get("n_fit"),
            "n_calibration": det.fit_info.get("n_calibration"),
            "representation": det.fit_info.get("representation"),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_rss_mb_after_generation": round(rss_after_gen, 1),
            "model_mb": round(model.stat().st_size / 1e6, 1),
            "flagged_calibrated": int((det.calibration.normalize(scores) >= 1).sum()),
            "flagged_pyod": None if reading is None else int(reading.labels.sum()),
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "cpus": os.cpu_count(),
        }
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
