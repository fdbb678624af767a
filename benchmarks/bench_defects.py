"""Defect synthesizer speed: defect images per second at 256 px, per kind and for the mix.

Usage:
    python benchmarks/bench_defects.py [--size 256] [--n 400] [--threads 1] [--figure docs/img/defects.png]

Makes `n` defects per kind on 8-bit RGB and grayscale goods (anomalens.data.synthetic textures) and
prints a Markdown table: images per second by wall clock and by process CPU time (on a shared
machine the CPU rate is the one to compare with the 200 images/s target), mean mask area.
With --figure, also draws each kind on a synthetic texture and on a magnetic tile good (from
--datasets, when there) with its mask outlined.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from anomalens.data import list_images, read_image
from anomalens.data.defects import KINDS, DefectSynthesizer
from anomalens.data.synthetic import synthetic_image


def goods(size: int, channels: int, n: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [np.rint(synthetic_image("texture", size, channels, rng) * 255).astype(np.uint8) for _ in range(n)]


def rate(kinds: tuple[str, ...], images: list[np.ndarray], n: int) -> tuple[float, float, float]:
    synth = DefectSynthesizer(kinds, seed=0)
    wall, cpu = time.perf_counter(), time.process_time()
    results = synth.make_many(images, n)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return n / wall, n / cpu, float(np.mean([mask.mean() for _, mask in results]))


def figure(path: Path, datasets: Path) -> None:
    """One row per good, one column per kind: the defect image with its mask's outline in red."""
    import cv2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("synthetic texture", goods(256, 3, 2))]
    tiles = datasets / "magnetic_tile/magnetic_tile/train/good"
    if tiles.is_dir():
        paths = list_images(tiles)[:2]
        rows.append(("magnetic tile", [cv2.resize(read_image(p), (256, 256)) for p in paths]))
    fig, axes = plt.subplots(len(rows), len(KINDS) + 1, figsize=(2 * (len(KINDS) + 1), 2.1 * len(rows)))
    for r, (title, images) in enumerate(rows):
        axes[r, 0].imshow(
            images[0], cmap="gray", vmin=0, vmax=images[0].max() if images[0].dtype.kind == "u" else 1
        )
        axes[r, 0].set_title(f"good: {title}", fontsize=8)
        for c, kind in enumerate(KINDS, start=1):
            out, mask = DefectSynthesizer([kind], seed=c).make(images[0], images[1])
            axes[r, c].imshow(out, cmap="gray", vmin=0, vmax=255 if out.dtype == np.uint8 else 1)
            axes[r, c].contour(mask, levels=[0.5], colors="red", linewidths=0.6)
            axes[r, c].set_title(kind, fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="OpenCV and torch threads")
    parser.add_argument("--figure", type=Path, help="also write the examples figure here")
    parser.add_argument(
        "--datasets", type=Path, default=Path(__file__).resolve().parents[2] / "shared/datasets"
    )
    args = parser.parse_args()
    if args.figure:
        figure(args.figure, args.datasets)
    torch.set_num_threads(args.threads)
    import cv2

    cv2.setNumThreads(args.threads)
    print("| kind | layout | images/s (wall) | images/s (CPU) | mean mask area |\n|---|---|---|---|---|")
    for channels, layout in ((3, "RGB"), (1, "gray")):
        images = goods(args.size, channels)
        for kinds in [(k,) for k in KINDS] + [KINDS]:
            wall, cpu, area = rate(kinds, images, args.n)
            name = "mix (all six)" if len(kinds) > 1 else kinds[0]
            print(f"| {name} | {layout} {args.size} px uint8 | {wall:.0f} | {cpu:.0f} | {area:.3f} |")


if __name__ == "__main__":
    main()
