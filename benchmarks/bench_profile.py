"""Where one predict run from files spends its time, stage by stage, for PatchCore, PaDiM and STFPM.

Fits each method on a category's training goods, then scores its test images one batch at a time
in a single thread, timing each stage with wall and process CPU time: decode, preprocess,
features (the backbone), detector (nearest-neighbour search / Mahalanobis / student), map
(upsampling and smoothing at the model's resolution), resize (the map back to the image's size
and the score off it), regions (verdict and connected components) and writing (overlay PNG and
CSV row). The stages run one after the other here so each one's time is its own; the real
`predict` overlaps decoding with the model in a background thread, and its end-to-end rate is
measured afterwards (`predict_to_folder`, with and without overlays).

    python benchmarks/bench_profile.py --data ../shared/datasets/lookout_cookies/cookie \
        --methods patchcore padim stfpm --threads 2 --markdown
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import anomalens
from anomalens.data import load_mvtec, read_image
from anomalens.inference import decide, verdict_overlay
from anomalens.inference.overlay import PNG_LEVEL
from anomalens.models.base import assemble

STAGES = ("decode", "preprocess", "features", "detector", "map", "resize", "regions", "writing")
FIT_OPTIONS = {
    "patchcore": {},
    "padim": {},
    "stfpm": {"epochs": 2, "min_steps": 0},  # a short fit: the profile needs a trained model, not a good one
}


class Clock:
    """Wall and process CPU seconds per stage; `inner` stages are subtracted from the one around them."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def add(self, stage: str, wall: float, cpu: float) -> None:
        self.wall[stage] += wall
        self.cpu[stage] += cpu

    def timed(self, stage: str, fn):
        def wrapper(*args, **kwargs):
            w, c = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            self.add(stage, time.perf_counter() - w, time.process_time() - c)
            return result

        return wrapper


def instrument(det, clock: Clock) -> None:
    """Time the backbone and the map smoothing inside the detector's own scoring."""
    if hasattr(det, "features"):  # PatchCore, PaDiM: the feature runner (ONNX Runtime or torch)
        det.features = clock.timed("features", det.features)
    else:  # trained models: the frozen teacher is their backbone
        det.extractor.forward = clock.timed("features", det.extractor.forward)
    model = getattr(det, "model", None)
    upsample = getattr(model, "upsample", None)
    if upsample is not None:
        upsample.forward = clock.timed("map", upsample.forward)


def profile(det, paths: list[Path], out: Path) -> Clock:
    clock = Clock()
    instrument(det, clock)
    pre, cal, step = det.preprocess(), det.decision_calibration, det.options["batch_size"]
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        for start in range(0, len(paths), step):
            chunk = paths[start : start + step]
            images = [clock.timed("decode", read_image)(p) for p in chunk]
            canvases = [clock.timed("preprocess", pre.canvases)(im, str(p)) for im, p in zip(images, chunk)]
            pixels = torch.cat([c for c, _ in canvases])
            inner = clock.wall["features"] + clock.wall["map"], clock.cpu["features"] + clock.cpu["map"]
            w, c = time.perf_counter(), time.process_time()
            scores, maps = det.score_batch(pixels)
            w, c = time.perf_counter() - w, time.process_time() - c
            clock.add(
                "detector",
                w - (clock.wall["features"] + clock.wall["map"] - inner[0]),
                c - (clock.cpu["features"] + clock.cpu["map"] - inner[1]),
            )
            for i, (image, path, (_, placement)) in enumerate(zip(images, chunk, canvases)):
                score, amap = clock.timed("resize", assemble)(
                    scores[i : i + 1], maps[i : i + 1], placement, det.map_score, det.roi
                )
                verdict = clock.timed("regions", decide)(score, amap, cal, localizes=det.localizes)
                w, c = time.perf_counter(), time.process_time()
                verdict_overlay(image, verdict, path.name).save(
                    out / f"{path.stem}.png", compress_level=PNG_LEVEL
                )
                writer.writerow([str(path), f"{score:.6g}", int(verdict.anomalous)])
                clock.add("writing", time.perf_counter() - w, time.process_time() - c)
    return clock


def end_to_end(det, paths: list[Path], out: Path, overlays: bool) -> float:
    from anomalens.workflows.predict import predict_to_folder

    start = time.perf_counter()
    predict_to_folder(det, paths, out, overlays=overlays)
    return len(paths) / (time.perf_counter() - start)


def table(name: str, clock: Clock, n: int, rates: dict[str, float]) -> str:
    wall, cpu = sum(clock.wall.values()), sum(clock.cpu.values())
    lines = [
        f"**{name}** ({n} images, {n / wall:.1f} images/s staged; end to end: "
        + ", ".join(f"{k} {v:.1f} images/s" for k, v in rates.items())
        + ")",
        "",
        "| stage | wall ms/image | wall share | CPU ms/image | CPU share |",
        "|---|---|---|---|---|",
    ]
    for s in STAGES:
        if s in clock.wall:
            lines.append(
                f"| {s} | {1000 * clock.wall[s] / n:.1f} | {100 * clock.wall[s] / wall:.0f} % "
                f"| {1000 * clock.cpu[s] / n:.1f} | {100 * clock.cpu[s] / cpu:.0f} % |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="an MVTec-layout category")
    ap.add_argument("--methods", nargs="+", default=list(FIT_OPTIONS))
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--markdown", action="store_true", help="print markdown tables, not JSON lines")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mvtec(args.data)
    paths = [s.path for s in data.test]
    for name in args.methods:
        det = anomalens.create(name, image_size=args.image_size, **FIT_OPTIONS.get(name, {}))
        start = time.perf_counter()
        det.fit(data.train)
        fit_s = time.perf_counter() - start
        det.predict(paths[:2])  # warm-up: builds the feature runner, caches and smoothing matrices
        with tempfile.TemporaryDirectory() as tmp:
            rates = {
                "with overlays": end_to_end(det, paths, Path(tmp) / "a", True),
                "no overlays": end_to_end(det, paths, Path(tmp) / "b", False),
            }
            clock = profile(det, paths, Path(tmp))
        n = len(paths)
        if args.markdown:
            print(table(f"{name} (fit {fit_s:.1f} s)", clock, n, rates) + "\n")
        else:
            buf = io.StringIO()
            json.dump(
                {
                    "method": name,
                    "fit_s": round(fit_s, 2),
                    "images": n,
                    "rates": {k: round(v, 2) for k, v in rates.items()},
                    "ms_per_image": {
                        s: round(1000 * clock.wall[s] / n, 2) for s in STAGES if s in clock.wall
                    },
                    "cpu_ms_per_image": {
                        s: round(1000 * clock.cpu[s] / n, 2) for s in STAGES if s in clock.cpu
                    },
                },
                buf,
            )
            print(buf.getvalue(), flush=True)


if __name__ == "__main__":
    main()
