"""Benchmark PatchCore and PaDiM on every MVTec-layout category under a folder.

    python benchmarks/bench_foundation.py [--data ../shared/datasets] [--models patchcore,padim]
                                          [--repeats 3] [--set patchcore.coreset_ratio=0.01] [--json out.json]

Each (model, category, repeat) runs in a fresh process so peak RSS is that run's own. Prints a
Markdown table of medians over the repeats and writes all raw runs as JSON.
Columns: image AUROC, pixel AUROC, AUPRO, fit seconds (features + coreset/Gaussian, without the
calibration pass), predict images/s end to end (read + preprocess + score, test split),
peak RSS MB, model file MB.
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


def run_cell(model: str, category: str, options: dict) -> dict:
    import anomalens
    from anomalens.data import load_dataset
    from anomalens.engine.evaluate import evaluate

    dataset = load_dataset(category)
    det = anomalens.create(model, **options)
    start = time.perf_counter()
    det.fit(dataset.train)
    fit_total = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = det.save(Path(tmp) / "m.model")
        model_mb = path.stat().st_size / 2**20
    ev = evaluate(det, dataset, per_type=False)
    m = ev.metrics
    return {"model": model, "category": dataset.name, "options": options,
            "image_auroc": m["image_auroc"], "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
            "fit_s": det.fit_info["fit_seconds"], "fit_total_s": round(fit_total, 2),
            "predict_img_s": m["images_per_second"], "model_mb": round(model_mb, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)}


def parse_sets(pairs: list[str], models: list[str]) -> dict[str, dict]:
    out = {m: {} for m in models}
    for pair in pairs:
        key, _, value = pair.partition("=")
        model, _, option = key.partition(".")
        out.setdefault(model, {})[option] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--models", default="patchcore,padim")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], help="model.option=value")
    ap.add_argument("--json", default=None, help="write raw runs and medians here")
    ap.add_argument("--cell", nargs=3, metavar=("MODEL", "CATEGORY", "OPTIONS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], args.cell[1], json.loads(args.cell[2]))))
        return

    from anomalens.data import find_mvtec_categories

    models = args.models.split(",")
    sets = parse_sets(args.set, models)
    categories = find_mvtec_categories(args.data)
    runs = []
    for category in categories:
        for model in models:
            for rep in range(args.repeats):
                proc = subprocess.run([sys.executable, __file__, "--cell", model, str(category),
                                       json.dumps(sets.get(model, {}))], capture_output=True, text=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore"})
                if proc.returncode != 0:
                    print(f"{model} on {category}: failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"done {model} {category.name} #{rep + 1}: {runs[-1]}", file=sys.stderr)
    cols = ["image_auroc", "pixel_auroc", "aupro", "fit_s", "predict_img_s", "peak_rss_mb", "model_mb"]
    medians = []
    for category in sorted({r["category"] for r in runs}):
        for model in models:
            cell = [r for r in runs if r["category"] == category and r["model"] == model]
            if cell:
                medians.append({"category": category, "model": model, "n": len(cell),
                                **{c: statistics.median(r[c] for r in cell if r[c] is not None) for c in cols}})
    print("| category | model | runs | image AUROC | pixel AUROC | AUPRO | fit s | predict img/s | peak RSS MB | model MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in medians:
        print(f"| {m['category']} | {m['model']} | {m['n']} | {m['image_auroc']:.3f} | {m['pixel_auroc']:.3f} | "
              f"{m['aupro']:.3f} | {m['fit_s']:.1f} | {m['predict_img_s']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{m['model_mb']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
