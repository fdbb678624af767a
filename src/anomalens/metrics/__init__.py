"""Image- and pixel-level evaluation metrics for anomaly detection."""

from anomalens.metrics.image import (
    f1_at_threshold,
    full_recall_metrics,
    high_recall_metrics,
    image_metrics,
    partial_auroc_high_recall,
)
from anomalens.metrics.pimo import aupimo
from anomalens.metrics.pixel import aupro, pixel_metrics

__all__ = [
    "aupimo",
    "aupro",
    "f1_at_threshold",
    "full_recall_metrics",
    "high_recall_metrics",
    "image_metrics",
    "partial_auroc_high_recall",
    "pixel_metrics",
]
