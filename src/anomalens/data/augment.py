"""Few-shot augmentation: flipped, slightly rotated and shifted copies of a few good images."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MAX_ROTATION = 10.0  # degrees: a part placed a little askew, not a different view
MAX_SHIFT = 0.05  # share of each side


def augment(image: np.ndarray, n: int, seed: int, flips: bool = True) -> list[np.ndarray]:
    """`n` seeded variants of an (H, W[, C]) float image: optional horizontal/vertical flips, a rotation
    within +-10 degrees and a shift within 5 % of each side, borders reflected so no black wedges
    appear that the model would learn as normal."""
    rng = np.random.default_rng(seed)
    h, w = image.shape[:2]
    out = []
    for _ in range(n):
        a = image
        if flips and rng.random() < 0.5:
            a = a[:, ::-1]
        if flips and rng.random() < 0.5:
            a = a[::-1]
        a = ndimage.rotate(
            a, rng.uniform(-MAX_ROTATION, MAX_ROTATION), axes=(1, 0), reshape=False, order=1, mode="reflect"
        )
        shift = (rng.uniform(-MAX_SHIFT, MAX_SHIFT) * h, rng.uniform(-MAX_SHIFT, MAX_SHIFT) * w)
        a = ndimage.shift(a, shift + (0,) * (a.ndim - 2), order=1, mode="reflect")
        out.append(np.clip(a, 0.0, 1.0).astype(np.float32))
    return out
