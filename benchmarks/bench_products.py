"""Multi-product model vs one model per product: per-product image AUROC, routing accuracy, one file.

Usage: python benchmarks/bench_products.py [--data ../shared/datasets] [--method patchcore]
       [--routing product] [--json out.json]
Products: cookie, magnetic_tile (fair split) and exposure_shift (the same tiles, another split of the
goods: routing between those two is a coin toss by construction, so routing accuracy is also given
with the two tile splits counted as one product family). Timings are wall-clock on whatever machine
runs it (load average printed).
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
from anomalens.data import load_mvtec
from anomalens.workflows.evaluate import evaluate, evaluate_products

PRODUCTS = {
    "cookie": "lookout_cookies/cookie",
    "magnetic_tile": "magnetic_tile/magnetic_tile",
    "exposure_shift": "magnetic_tile/exposure_shift",
}
FAMILY = {"cookie": "cookie", "magnetic_tile": "tile", "exposure_shift": "tile"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--method", default="patchcore")
    parser.add_argument("--routing", default="product")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--max-train", type=int, default=0, help="at most N seeded goods per product (0: all)"
    )
    parser.add_argument("--test-every", type=int, default=1, help="every k-th test image (1: all)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    datasets = {name: load_mvtec(args.data / rel) for name, rel in PRODUCTS.items()}
    rng = np.random.default_rng(args.seed)
    for name, data in datasets.items():
        data.name = name
        if args.max_train and len(data.train) > args.max_train:  # a shared machine's budget, not a method
            data.train = [
                data.train[i] for i in sorted(rng.choice(len(data.train), args.max_train, replace=False))
            ]
        data.test = data.test[:: args.test_every]
    rows: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp())
    separate_bytes = 0
    for name, data in datasets.items():
        start = time.perf_counter()
        det = anomalens.create(args.method, seed=args.seed, image_size=args.image_size).fit(data.train)
        fit_s = time.perf_counter() - start
        separate_bytes += det.save(tmp / f"{name}.model").stat().st_size
        m = evaluate(det, data).metrics
        rows[name] = {
            "separate": m["image_auroc"],
            "separate_pixel": m["pixel_auroc"],
            "separate_fit_s": fit_s,
        }
        print(name, "separate", round(m["image_auroc"], 4), f"{fit_s:.0f} s", flush=True)
    start = time.perf_counter()
    multi = anomalens.create(
        "multi", method=args.method, routing=args.routing, seed=args.seed, image_size=args.image_size
    )
    multi.fit({name: data.train for name, data in datasets.items()})
    multi_fit_s = time.perf_counter() - start
    multi_bytes = multi.save(tmp / "multi.model").stat().st_size
    metrics, per = evaluate_products(multi, datasets)
    for name, m in metrics["products"].items():
        rows[name].update(multi=m["image_auroc"], multi_pixel=m["pixel_auroc"])
    routing = metrics["routing"]
    family_hits = sum(
        sum(n for p, n in r["routed_to"].items() if FAMILY[p] == FAMILY[name])
        for name, r in routing["per_product"].items()
    )
    result = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "sizes": {name: (len(d.train), len(d.test)) for name, d in datasets.items()},
        "load_average": os.getloadavg(),
        "rows": rows,
        "overall_multi_image_auroc": metrics["overall"]["image_auroc"],
        "routing": routing,
        "routing_family_accuracy": family_hits / routing["n_images"],
        "multi_fit_s": multi_fit_s,
        "model_bytes": {"multi": multi_bytes, "separate_total": separate_bytes},
    }
    print(
        "| product | separate image AUROC | multi image AUROC | difference | separate pixel AUROC "
        "| multi pixel AUROC | routed to own product |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        acc = routing["per_product"][name]["accuracy"]
        print(
            f"| {name} | {r['separate']:.4f} | {r['multi']:.4f} | {r['multi'] - r['separate']:+.4f} | "
            f"{r['separate_pixel']:.4f} | {r['multi_pixel']:.4f} | {acc:.1%} |"
        )
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=float))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
