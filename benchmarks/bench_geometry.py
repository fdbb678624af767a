"""Input geometry on long high-resolution parts with small defects: squash vs letterbox vs native tiles.

    python benchmarks/bench_geometry.py [--seeds 0,1,2] [--models patchcore,padim] [--quick]
                                        [-o benchmarks/results/geometry]

A seeded 1:4 strip set (`make_strip_dataset`: 500x2000 rolled metal, defects of 0.05 % of the image)
is generated into a temporary folder per seed. Each (model, geometry, seed) is fitted and evaluated
in its own process, so its peak RSS is its own: image AUROC, pixel AUROC, AUPRO, fit s and predict
images/s end to end from files (`evaluate` times `detector.predict` on the test files; fit has
already scored the calibration files, so the model is warm). Two speed checks follow: native
scale 1.0 with 256 px tiles on 500x1250 strips, and letterbox 256 on the cookie images
(576x768 RGB, read in place from ../shared/datasets). Metrics are mean ± std over seeds, times
and RSS medians. One seed by default: on 2 CPU cores a seed takes about 8 minutes, most of it
the native-scale tiles (33 tiles of 256 px per 500x2000 image); --seeds 0,1,2 for three. --quick:
PatchCore only, 8 training images, about 3 minutes. Timings are on a shared machine: the load
average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEOMETRIES = {
    "squash 256": {"image_size": 256, "resize": "squash"},
    "letterbox 256": {"image_size": 256, "resize": "letterbox"},
    "native 1.0 tile 256": {"resize": "native", "scale": 1.0, "tile": 256, "tile_overlap": 0.25},
    "native 0.5 tile 256": {"resize": "native", "scale": 0.5, "tile": 256, "tile_overlap": 0.25},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_cell(task: dict) -> dict:
    """Fit and evaluate one detector on one dataset (in the child process)."""
    import anomalens
    from anomalens.data import load_dataset
    from anomalens.workflows.evaluate import evaluate

    dataset = load_dataset(task["data"])
    detector = anomalens.create(task["model"], seed=task["seed"], device="cpu", **task["options"])
    start = time.perf_counter()
    detector.fit(dataset.train)
    fit_s = time.perf_counter() - start
    detector.predict([dataset.test[0].path])  # warm-up: one image, as a service would have seen
    metrics = evaluate(detector, dataset, per_type=False).metrics
    return {
        **{k: metrics[k] for k in METRICS},
        "fit_s": round(fit_s, 2),
        "images_per_s": metrics["images_per_second"],
        "n_test": metrics["n_images"],
        "model_inputs_per_image": detector.fit_info["n_model_inputs"] / detector.fit_info["n_fit"],
        "memory_bank": detector.fit_info.get("memory_bank"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def in_child(task: dict) -> dict:
    """Run one cell in a fresh interpreter: clean peak RSS, and a crash or OOM only loses that cell."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(task)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mean_std(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def median(values: list[float], fmt: str = ".1f") -> str:
    return format(statistics.median(values), fmt) if values else "n/a"


def summarize(cells: list[dict]) -> list[dict]:
    rows = []
    for key in dict.fromkeys((c["model"], c["geometry"], c["data"]) for c in cells):
        group = [c for c in cells if (c["model"], c["geometry"], c["data"]) == key]
        ok = [c["result"] for c in group if "error" not in c["result"]]
        errors = [c["result"]["error"] for c in group if "error" in c["result"]]
        row = {"model": key[0], "geometry": key[1], "data": key[2], "runs": len(ok), "errors": errors}
        for k in METRICS:
            row[k] = mean_std([r[k] for r in ok])
        for k, fmt in (("fit_s", ".1f"), ("images_per_s", ".2f"), ("peak_rss_mb", ".0f")):
            row[k] = median([r[k] for r in ok], fmt)
        row["inputs_per_image"] = median([r["model_inputs_per_image"] for r in ok], ".0f")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | data | geometry | runs | image AUROC | pixel AUROC | AUPRO | fit s | predict img/s "
        "| model inputs / image | peak RSS MB |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        note = f" (failed: {r['errors'][0]})" if r["errors"] else ""
        lines.append(
            f"| {r['model']} | {r['data']} | {r['geometry']}{note} | {r['runs']} | {r['image_auroc']} "
            f"| {r['pixel_auroc']} | {r['aupro']} | {r['fit_s']} | {r['images_per_s']} "
            f"| {r['inputs_per_image']} | {r['peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0", help="comma-separated: generation seed and model seed")
    ap.add_argument("--models", default="patchcore,padim")
    ap.add_argument("--geometries", default=",".join(GEOMETRIES), help=f"any of: {', '.join(GEOMETRIES)}")
    ap.add_argument("--height", type=int, default=500)
    ap.add_argument("--width", type=int, default=2000)
    ap.add_argument("--defect-area", type=float, default=0.0005)
    ap.add_argument("--n-train", type=int, default=16)
    ap.add_argument("--n-test-good", type=int, default=8)
    ap.add_argument("--n-test-defect", type=int, default=12)
    ap.add_argument("--speed-width", type=int, default=1250, help="width of the speed-only tiled strips")
    ap.add_argument(
        "--cookies", default=str(ROOT.parent / "shared" / "datasets" / "lookout_cookies" / "cookie")
    )
    ap.add_argument("--quick", action="store_true", help="one seed, PatchCore only, fewer and smaller images")
    ap.add_argument("-o", "--output", default=str(ROOT / "benchmarks" / "results" / "geometry"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_cell(json.loads(args.child))))
        return
    from anomalens.data.synthetic import make_strip_dataset

    seeds = [int(s) for s in args.seeds.split(",")]
    models = args.models.split(",")
    counts = (args.n_train, args.n_test_good, args.n_test_defect)
    if args.quick:
        seeds, models, counts = seeds[:1], ["patchcore"], (8, 4, 6)
    geometries = [g.strip() for g in args.geometries.split(",")]
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    started = time.perf_counter()
    cells = []
    with tempfile.TemporaryDirectory(prefix="anomalens_geometry_") as tmp:

        def strips(name: str, width: int, seed: int, n: tuple[int, int, int]) -> str:
            folder = Path(tmp) / f"{name}_seed{seed}"
            make_strip_dataset(folder, args.height, width, *n, defect_area=args.defect_area, seed=seed)
            return str(folder)

        def cell(model: str, geometry: str, data: str, label: str, seed: int, options: dict) -> None:
            task = {"model": model, "data": data, "seed": seed, "options": options}
            result = in_child(task)
            cells.append(
                {"model": model, "geometry": geometry, "data": label, "seed": seed, "result": result}
            )
            print(
                f"[{time.perf_counter() - started:6.0f} s] {model} / {label} / {geometry} / seed {seed}: "
                f"{json.dumps(result)}",
                flush=True,
            )

        strip_label = f"strips {args.width}x{args.height}"
        for seed in seeds:
            data = strips("strips", args.width, seed, counts)
            for model in models:
                for geometry in geometries:
                    cell(model, geometry, data, strip_label, seed, GEOMETRIES[geometry])
        # speed-only checks (their accuracy is reported too, but they are not the accuracy set)
        speed = strips("speed", args.speed_width, seeds[0], (8, 0 if args.quick else 2, 4))
        cell(
            "patchcore",
            "native 1.0 tile 256",
            speed,
            f"strips {args.speed_width}x{args.height}",
            seeds[0],
            GEOMETRIES["native 1.0 tile 256"],
        )
        if Path(args.cookies).is_dir():
            cell(
                "patchcore",
                "letterbox 256",
                args.cookies,
                "cookies 768x576 RGB",
                seeds[0],
                GEOMETRIES["letterbox 256"],
            )
    rows = summarize(cells)
    config = {
        "seeds": seeds,
        "models": models,
        "counts": dict(zip(("n_train", "n_test_good", "n_test_defect"), counts)),
        "strip": [args.height, args.width],
        "defect_area": args.defect_area,
        "quick": args.quick,
        "total_s": round(time.perf_counter() - started, 1),
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    (out / "geometry.json").write_text(json.dumps({"config": config, "cells": cells, "rows": rows}, indent=2))
    table = markdown(rows)
    (out / "geometry.md").write_text(table + "\n")
    print(f"\n{json.dumps(config)}\n\n{table}")


if __name__ == "__main__":
    main()
