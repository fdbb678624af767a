"""Reconstruction models (autoencoder, f-AnoGAN, GANomaly) next to PatchCore on real categories.

Usage:
    python benchmarks/bench_reconstruction.py [--models autoencoder fanogan ganomaly patchcore]
        [--categories magnetic_tile/magnetic_tile lookout_cookies/cookie] [--max-minutes 12]
        [--set autoencoder:epochs=20 ...] [--json results.json]

Each model is fitted at its CPU defaults (plus --set overrides) on the category's training goods
and evaluated on its test split in this process; --max-minutes caps each model's training.
Prints a Markdown table: image AUROC, pixel AUROC, AUPRO, pixel F1 at the calibrated pixel
threshold tau, fit seconds, images/s, and how training stopped. Timings on a shared machine are
noisy; the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import anomalens
from anomalens.data import load_dataset
from anomalens.workflows.evaluate import evaluate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["autoencoder", "fanogan", "ganomaly", "patchcore"])
    parser.add_argument(
        "--categories", nargs="+", default=["magnetic_tile/magnetic_tile", "lookout_cookies/cookie"]
    )
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the categories")
    parser.add_argument("--max-minutes", type=float, default=None, help="training budget per model (minutes)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="MODEL:KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    overrides: dict[str, dict[str, str]] = {}
    for item in args.sets:
        model, _, kv = item.partition(":")
        key, sep, value = kv.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected MODEL:KEY=VALUE")
        overrides.setdefault(model, {})[key] = value

    rows = []
    for category in args.categories:
        dataset = load_dataset(args.data / category)
        for model in args.models:
            options = dict(overrides.get(model, {}))
            if args.max_minutes is not None and model != "patchcore":
                options["max_minutes"] = args.max_minutes
            detector = anomalens.create(model, **options)
            start = time.perf_counter()
            detector.fit(dataset.train)
            fit_s = time.perf_counter() - start
            m = evaluate(detector, dataset, per_type=False).metrics
            training = detector.fit_info.get("training", {})
            row = {
                "category": category,
                "model": model,
                "options": options,
                "image_auroc": m["image_auroc"],
                "pixel_auroc": m["pixel_auroc"],
                "aupro": m["aupro"],
                "pixel_f1_at_tau": m.get("at_threshold", {}).get("pixel_f1"),
                "fit_s": round(fit_s, 1),
                "images_per_s": m["images_per_second"],
                "epochs": training.get("epochs_run"),
                "stopped": training.get("stopped"),
                "load": round(os.getloadavg()[0], 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(
        "\n| category | model | image AUROC | pixel AUROC | AUPRO | pixel F1 @tau | fit s | img/s | epochs | stopped "
        "| load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['category']} | {r['model']} | {_fmt(r['image_auroc'])} | {_fmt(r['pixel_auroc'])} | "
            f"{_fmt(r['aupro'])} | {_fmt(r['pixel_f1_at_tau'])} | {r['fit_s']} | {_fmt(r['images_per_s'])} | "
            f"{_fmt(r['epochs'])} | {_fmt(r['stopped'])} | {r['load']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
