"""Defect synthesizer speed: defect images per second at 256 px, per kind and for the mix.

Usage:
    python benchmarks/bench_defects.py [--size 256] [--n 400] [--threads 1]

Makes `n` defects per kind on 8-bit RGB and grayscale goods (anomalens.data.synthetic textures) and
prints a Markdown table: images per second by wall clock and by process CPU time (on a shared
machine the CPU rate is the one to compare with the 200 images/s target), mean mask area.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="OpenCV and torch threads")
    args = parser.parse_args()
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
