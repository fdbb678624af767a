"""anomalens: unsupervised visual anomaly detection and localization for industrial inspection.

import anomalens
det = anomalens.create("patchcore")
det.fit(anomalens.data.load_dataset("path/to/category").train)
result = det.predict(["img1.png", "img2.png"])   # result.scores, result.maps, result.is_anomalous
det.save("tile.model"); det = anomalens.load("tile.model")
"""

from anomalens._version import __version__  # noqa: E402
from anomalens.registry import available, create  # noqa: E402


def load(path):
    """Load any saved detector (safetensors + JSON header; no code runs)."""
    from anomalens.models.base import Detector

    return Detector.load(path)


__all__ = ["__version__", "available", "create", "load"]
