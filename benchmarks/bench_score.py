"""End-to-end `anomalens score` throughput and memory on a large archive.

Builds an archive of N images by symlinking a category's real test images in a cycle, fits
PatchCore (defaults: EfficientNet-Lite0, 256 px) on its training goods unless --model is given,
runs `anomalens score` in a subprocess and samples its RSS every second.

Usage: python benchmarks/bench_score.py --data ../shared/datasets/lookout_cookies/cookie --n 5000
Prints a JSON summary: images/s end to end (process start to exit, decode and DB writes
included), peak RSS, and RSS at 10 / 50 / 90 % of the run (flat = no leak). Load averages are
included because a busy machine skews CPU timings.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil


def build_archive(category: Path, n: int, folder: Path) -> list[Path]:
    """n distinct file names cycling the category's test images (symlinks: no disk copies)."""
    from anomalens.data import list_images

    sources = list_images(category / "test", recursive=True)
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for i in range(n):
        link = folder / f"{i // 1000:02d}" / f"img_{i:05d}{sources[i % len(sources)].suffix}"
        link.parent.mkdir(exist_ok=True)
        if not link.exists():
            os.symlink(sources[i % len(sources)].resolve(), link)
        links.append(link)
    return links


def fit_model(category: Path, path: Path) -> Path:
    import anomalens
    from anomalens.data import load_dataset

    if not path.is_file():
        anomalens.create("patchcore").fit(load_dataset(category).train).save(path)
    return path


def run_score(cmd: list[str], n: int, db: Path) -> dict:
    """Run the command, sampling its RSS (with children) and the store's row count every second."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ps = psutil.Process(proc.pid)
    samples = []  # (seconds, rss MB, rows stored)
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        rows = 0
        if db.exists():
            with (
                sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn,
                contextlib.suppress(sqlite3.OperationalError),  # the table is not there yet
            ):
                rows = conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
        samples.append((time.perf_counter() - start, rss / 2**20, rows))
        time.sleep(1.0)
    stdout = proc.communicate()[0]
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"score failed ({proc.returncode}): {stdout}")

    def rss_at(fraction: float) -> float:
        return next((mb for _, mb, rows in samples if rows >= fraction * n), samples[-1][1])

    return {
        "seconds": round(seconds, 1),
        "images_per_second": round(n / seconds, 2),
        "peak_rss_mb": round(max(mb for _, mb, _ in samples), 1),
        "rss_mb_at_10_50_90pct": [round(rss_at(f), 1) for f in (0.1, 0.5, 0.9)],
        "stdout": stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument(
        "--model", type=Path, help="model file (default: fit PatchCore on the training goods)"
    )
    parser.add_argument(
        "--work", type=Path, help="folder for the archive, model and store (default: a temp dir)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_score_"))
    archive = work / f"archive_{args.n}"  # one folder per size: a smaller run never sees extra files
    build_archive(args.data, args.n, archive)
    model = args.model or fit_model(args.data, work / "patchcore.model")
    db = work / "results.db"
    db.unlink(missing_ok=True)
    exe = str(Path(sys.executable).parent / "anomalens")
    cmd = [
        exe,
        "score",
        str(model),
        str(archive),
        "-o",
        str(db),
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "-q",
    ]
    result = run_score(cmd, args.n, db)
    with sqlite3.connect(db) as conn:
        result["rows"] = conn.execute("SELECT COUNT(*) FROM results WHERE status = 'ok'").fetchone()[0]
        result["integrity"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
    print(
        json.dumps(
            {
                "data": str(args.data),
                "n": args.n,
                "model": str(model),
                "command": " ".join(cmd),
                "cpus": os.cpu_count(),
                "loadavg_after": os.getloadavg(),
                **result,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
