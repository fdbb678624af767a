"""Per-method report card: every registered trained method on the shared sets and a synthetic object
set, over seeds, written to docs/report_card.md.

Usage:
    python benchmarks/report_card.py [--output report_card_run] [--doc docs/report_card.md]
        [--models autoencoder,fanogan,...] [--seeds 3]
        [--sets cookies,magnetic_tile,exposure_shift,synthetic_object] [--set max_minutes=2 ...]
        [--limit N] [--note TEXT] [--in-process] [--write-only]

The sets are linked (never copied) into OUTPUT/data, one folder each, and run by `anomalens benchmark`'s
runner (`workflows.benchmark.run_benchmark`: a process per (method, set, seed) cell, resumable: run the
same command again after an interruption). `--sets` also takes NAME=FOLDER for any MVTec-layout
category. `--limit N` keeps at most N images of each image folder (train/good, test/<type>), evenly
spaced by sorted name, for runs that must fit a small machine: the card then says so. `--write-only`
writes the card from the cells finished so far, running none (a partial card says which are missing).
Besides the card
(`--doc`), OUTPUT holds the benchmark's own benchmark.json/.md/.html with every number of every cell.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime
from pathlib import Path

from anomalens.data import make_synthetic_dataset
from anomalens.models.trainable import TrainableDetector
from anomalens.registry import available, get_class
from anomalens.report.benchmark_report import render_report_card, write_outputs
from anomalens.workflows.benchmark import (
    BenchmarkResult,
    load_cells,
    parse_model_sets,
    plan_cells,
    run_benchmark,
    run_cell_in_process,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
SHARED = {
    "cookies": "lookout_cookies/cookie",
    "magnetic_tile": "magnetic_tile/magnetic_tile",  # the fair split
    "exposure_shift": "magnetic_tile/exposure_shift",
}
SYNTHETIC = "synthetic_object"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def trained_methods() -> list[str]:
    return [n for n in available() if issubclass(get_class(n), TrainableDetector)]


def _link_limited(src: Path, dst: Path, limit: int) -> None:
    """dst mirrors the category src: image folders by links to at most `limit` evenly spaced files,
    ground_truth as one link (masks are found by name)."""
    for folder in sorted(p for p in src.rglob("*") if p.is_dir() and "ground_truth" not in p.parts):
        images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            continue
        step = max(1, -(-len(images) // limit))
        (dst / folder.relative_to(src)).mkdir(parents=True, exist_ok=True)
        for f in images[::step]:
            (dst / folder.relative_to(src) / f.name).symlink_to(f.resolve())
    if (src / "ground_truth").is_dir():
        (dst / "ground_truth").symlink_to((src / "ground_truth").resolve())


def prepare_data(out: Path, sets: list[str], data: Path, limit: int) -> Path:
    """OUTPUT/data/<name> per set: a link to the category (or a limited mirror), and the generated
    synthetic object set (seeded: the same files every time)."""
    root = out / "data"
    root.mkdir(parents=True, exist_ok=True)
    for entry in sets:
        name, _, folder = entry.partition("=")
        dst = root / name
        if dst.exists() or dst.is_symlink():
            continue  # a resumed run keeps its data
        if name == SYNTHETIC and not folder:
            make_synthetic_dataset(
                dst, kind="object", n_train=60, n_test_good=20, n_test_defect=30, size=128, channels=3, seed=0
            )
            continue
        if not folder:
            if name not in SHARED:
                raise SystemExit(
                    f"--sets: unknown set {name!r}; use {', '.join([*SHARED, SYNTHETIC])} or NAME=FOLDER"
                )
            folder = str(data / SHARED[name])
        src = Path(folder)
        if not (src / "train" / "good").is_dir():
            raise SystemExit(f"--sets {entry}: '{src}' is not an MVTec-layout category (no train/good)")
        if limit:
            _link_limited(src, dst, limit)
        else:
            dst.symlink_to(src.resolve())
    return root


def finished_cells(models: list[str], data: Path, out: Path, seeds: int, sets: dict) -> BenchmarkResult:
    """The benchmark result of the cells already in OUTPUT/cells.jsonl, running none."""
    planned = plan_cells(models, data, seeds, sets)
    latest = load_cells(out / "cells.jsonl")
    records = [latest[c.key] for c in planned if c.key in latest]
    config = {
        "models": models,
        "data": str(data),
        "seeds": seeds,
        "options": {m: dict(sets.get(m, {})) for m in models},
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "python": sys.version.split()[0],
        "n_missing": len(planned) - len(records),
    }
    return BenchmarkResult(cells=records, summary=summarize(records), config=config)


def _run_arguments(argv: list[str]) -> list[str]:
    """The command line that runs the cells: without --note (printed apart) and --write-only."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif arg != "--write-only" and not arg.startswith("--note="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", type=Path, default=Path("report_card_run"))
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "report_card.md")
    parser.add_argument("--models", default=",".join(trained_methods()))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", default=",".join([*SHARED, SYNTHETIC]))
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding the shared sets")
    parser.add_argument(
        "--set", dest="set_", action="append", default=[], help="as `anomalens benchmark --set`"
    )
    parser.add_argument("--limit", type=int, default=0, help="at most N images per image folder (0 = all)")
    parser.add_argument(
        "--note", default="", help="how the run was made (machine, load), printed in the card"
    )
    parser.add_argument("--cell-timeout", type=float, default=0, help="seconds per cell, 0 = no limit")
    parser.add_argument("--in-process", action="store_true", help="run cells in this process (tests)")
    parser.add_argument("--write-only", action="store_true", help="write the card from the finished cells")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sets = parse_model_sets(args.set_, models)
    data = prepare_data(
        args.output, [s.strip() for s in args.sets.split(",") if s.strip()], args.data, args.limit
    )
    if args.write_only:
        result = finished_cells(models, data, args.output, args.seeds, sets)
    else:
        result = run_benchmark(
            models,
            data,
            args.output,
            seeds=args.seeds,
            sets=sets,
            runner=run_cell_in_process if args.in_process else None,
            timeout=args.cell_timeout or None,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    write_outputs(args.output, result.config, result.cells, result.summary)
    note = args.note
    if args.limit:
        note = (note + " " if note else "") + (
            f"Reduced data: at most {args.limit} images per image folder (train/good and each test "
            "folder), evenly spaced by sorted file name."
        )
    missing = result.config.get("n_missing", 0)
    if missing:
        note += f" Partial card: {missing} planned cells had not run yet."
    command = "python benchmarks/report_card.py " + " ".join(
        _run_arguments(argv if argv is not None else sys.argv[1:])
    )
    note = f"Command: `{command.strip()}` ({os.cpu_count()} CPU cores seen). {note}".strip()
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(
        render_report_card(result.config, result.summary, result.cells, note), encoding="utf-8"
    )
    print(
        f"wrote {args.doc} and {args.output}/benchmark.md ({len(result.failed)} cells failed)",
        file=sys.stderr,
    )
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
