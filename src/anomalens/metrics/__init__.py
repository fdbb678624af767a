"""Image- and pixel-level evaluation metrics for anomaly detection."""

from anomalens.metrics.image import f1_at_threshold, image_metrics
from anomalens.metrics.pixel import aupro, pixel_metrics

__all__ = ["aupro", "f1_at_threshold", "image_metrics", "pixel_metrics"]
