"""Grad-CAM (Selvaraju et al., ICCV 2017) of the explanation classifier's "anomalous" logit,
computed by the `grad-cam` package (pytorch_grad_cam) on the fine-tuned last stage."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from anomalens.data.inputs import as_items, load_item
from anomalens.explain.classifier import AnomalyClassifier
from anomalens.models.base import resize_map

ANOMALOUS = 1  # the classifier's logit index for "anomalous"


def gradcam_maps(
    classifier: AnomalyClassifier, images: Iterable | np.ndarray, batch_size: int = 16
) -> list[np.ndarray]:
    """One map in [0, 1] per image, at the image's own resolution: where the evidence for
    "anomalous" sits in the classifier's last stage (each map scaled to its own maximum)."""
    items = as_items(images)
    loaded = [load_item(item) for item in items]
    maps: list[np.ndarray] = []
    with GradCAM(model=classifier.eval(), target_layers=[classifier.last_stage]) as cam:
        for start in range(0, len(loaded), batch_size):
            chunk = loaded[start : start + batch_size]
            pixels = classifier.pixels(chunk)
            cams = cam(input_tensor=pixels, targets=[ClassifierOutputTarget(ANOMALOUS)] * len(chunk))
            maps.extend(resize_map(c, image.shape[:2]) for c, image in zip(cams, chunk))
    return maps
