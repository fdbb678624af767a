"""Why was an image flagged, and where: explanation maps for every detector.

Methods (`explain_images(..., method=...)`):

* "map": the detector's own anomaly map, normalized so 1.0 is the calibrated pixel threshold
  (only for detectors that localize);
* "lime-score": LIME on the anomaly score itself (any detector, classical ones included);
* "gradcam" / "lime": Grad-CAM and LIME of a classifier fine-tuned on the detector's pseudo-labels
  (`train_classifier`), for a second opinion on *why*.

Maps from LIME and Grad-CAM lie in [0, 1] (1 = strongest evidence in that image).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from anomalens.data.inputs import as_items, load_item
from anomalens.explain.classifier import AnomalyClassifier, PseudoLabels, pseudo_labels, train_classifier
from anomalens.explain.faithfulness import peak_point
from anomalens.inference import Region, decide, find_regions, overlay_image
from anomalens.models.base import Detector
from anomalens.workflows.evaluate import Evaluation, gallery_indices

METHODS = ("map", "lime-score", "gradcam", "lime")

__all__ = [
    "METHODS",
    "AnomalyClassifier",
    "Explanation",
    "PseudoLabels",
    "explain_images",
    "explanation_figure",
    "gallery_explanations",
    "pseudo_labels",
    "train_classifier",
]

# LIME on the score for a report's gallery images: a few seconds per image
GALLERY_SEGMENTS, GALLERY_SAMPLES, GALLERY_NORMALS = 48, 96, 16


@dataclass
class Explanation:
    """One image's explanation: the map at the image's resolution and the detector's verdict."""

    key: str
    method: str
    map: np.ndarray
    score: float
    normalized_score: float | None
    seconds: float
    flagged: bool | None = None  # the detector's verdict (inference.decide); None when it is not calibrated

    @property
    def region_threshold(self) -> float:
        """Where a region starts: the calibrated pixel threshold (1.0) for "map", half the image's
        strongest evidence (0.5) for the others."""
        return 1.0 if self.method == "map" else 0.5

    def regions(self, min_area: int = 16, min_share: float = 0.0) -> list[Region]:
        """Connected areas at or above `region_threshold`, largest first (peak and mean on the map's scale)."""
        return find_regions(self.map, min_area, min_share, threshold=self.region_threshold)

    def peak(self) -> tuple[int, int] | None:
        """(x, y) of the strongest evidence (centre of the maximal pixels); None for a constant map."""
        return peak_point(self.map)


def explain_images(
    detector: Detector,
    images: Iterable | np.ndarray,
    method: str = "map",
    *,
    classifier: AnomalyClassifier | None = None,
    normal_images: Sequence | None = None,
    baseline: str = "auto",
    n_segments: int = 64,
    num_samples: int = 128,
    seed: int = 0,
) -> list[Explanation]:
    """Explain each image with `method` (see the module docstring); `normal_images` (paths or arrays
    of good images) give LIME's replacement content, `classifier` is needed for gradcam and lime."""
    from anomalens.explain.cam import gradcam_maps
    from anomalens.explain.lime_maps import lime_classifier_map, lime_score_map

    if method not in METHODS:
        raise ValueError(f"explanation method {method!r}: use one of {', '.join(METHODS)}")
    if method == "map" and not detector.localizes:
        raise ValueError(
            f"{detector.name} scores whole images only (its map is constant): "
            "use method 'lime-score' to see where its score comes from"
        )
    if method in ("gradcam", "lime") and classifier is None:
        raise ValueError(
            f"method {method!r} explains a classifier trained on the detector's pseudo-labels: "
            "pass classifier= (see train_classifier)"
        )
    items = as_items(images)
    prediction = detector.predict(items)
    cal = prediction.calibration
    out = []
    for i, item in enumerate(items):
        start = time.perf_counter()
        verdict = (
            None
            if cal is None
            else decide(prediction.scores[i], prediction.maps[i], cal, localizes=detector.localizes)
        )
        if method == "map":
            amap = prediction.maps[i] if verdict is None else verdict.normalized_map
        elif method == "lime-score":
            amap = lime_score_map(
                detector,
                load_item(item),
                normal_images,
                baseline=baseline,
                n_segments=n_segments,
                num_samples=num_samples,
                seed=seed,
            )
        elif method == "gradcam":
            amap = gradcam_maps(classifier, [load_item(item)])[0]
        else:
            amap = lime_classifier_map(
                classifier,
                load_item(item),
                normal_images,
                baseline=baseline,
                n_segments=n_segments,
                num_samples=num_samples,
                seed=seed,
            )
        out.append(
            Explanation(
                prediction.keys[i],
                method,
                amap,
                float(prediction.scores[i]),
                None if verdict is None else verdict.normalized_score,
                round(time.perf_counter() - start, 3),
                None if verdict is None else verdict.anomalous,
            )
        )
    return out


def explanation_figure(explanation: Explanation, image: np.ndarray, min_area: int = 16) -> Image.Image:
    """Side by side: the image | the image under the explanation heat map, regions boxed, verdict on top."""
    norm = explanation.normalized_score
    verdict = "" if norm is None else f"score {norm:.2f} {'DEFECT' if explanation.flagged else 'ok'}  "
    title = f"{Path(explanation.key).name}  {verdict}[{explanation.method}]"
    heat = explanation.map / explanation.region_threshold  # the overlay's colour scale puts regions at 1.0
    return overlay_image(image, heat, explanation.regions(min_area), title, bool(explanation.flagged))


def gallery_explanations(
    detector: Detector, evaluation: Evaluation, n_gallery: int = 6
) -> dict[str, np.ndarray]:
    """LIME on the anomaly score (maps in [0, 1]) for the images an HTML report's gallery shows, keyed
    by image path; the test set's good images give LIME's normal content. For detectors whose own
    map is constant (classical ones): the report draws these instead."""
    from anomalens.explain.lime_maps import lime_score_map

    shown = sorted({i for idx in gallery_indices(evaluation, n_gallery).values() for i in idx})
    goods = [s.path for s in evaluation.samples if s.label == 0][:GALLERY_NORMALS]
    return {
        str(evaluation.samples[i].path): lime_score_map(
            detector,
            evaluation.samples[i].path,
            goods or None,
            n_segments=GALLERY_SEGMENTS,
            num_samples=GALLERY_SAMPLES,
        )
        for i in shown
    }
