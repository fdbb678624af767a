"""LIME (Ribeiro et al., KDD 2016) maps: which superpixels push a prediction up.

Two targets share the machinery: the explanation classifier's P(anomalous), and — model-agnostic,
for every detector including the classical ones whose own map is constant — the detector's anomaly
score itself. Superpixels come from scikit-image's SLIC; switched-off superpixels show *normal*
content (the nearest normal image, the mean of normal images, or a blur of the image), so that
removing a defect lowers the score. The perturbed images are built in one vectorized step and
scored in batches; the weighted ridge fit is the `lime` package's LimeBase, with lime_image's kernel.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from lime.lime_base import LimeBase
from scipy.ndimage import gaussian_filter
from skimage.segmentation import slic
from skimage.transform import resize
from sklearn.metrics import pairwise_distances

from anomalens.data.inputs import as_items, load_item
from anomalens.explain.classifier import AnomalyClassifier
from anomalens.models.base import Detector

BASELINES = ("auto", "normal", "mean", "blur")
KERNEL_WIDTH = 0.25  # lime_image's default kernel width on cosine distance


def _image(image) -> np.ndarray:
    """A path, Sample or array as a float image."""
    return load_item(as_items([image])[0])


def _fit_shape(array: np.ndarray, like: np.ndarray) -> np.ndarray:
    """`array` resized to `like`'s (H, W) with `like`'s channels (grayscale <-> RGB)."""
    if array.ndim == 3 and like.ndim == 2:
        array = array.mean(axis=2)
    elif array.ndim == 2 and like.ndim == 3:
        array = np.repeat(array[..., None], like.shape[2], axis=2)
    return resize(array, like.shape, anti_aliasing=True, preserve_range=True).astype(np.float32)


def baseline_image(
    image: np.ndarray, normal_images: Sequence | None = None, kind: str = "auto"
) -> np.ndarray:
    """What a switched-off superpixel shows.

    "normal": the normal image closest to `image` (on 32 px thumbnails), so replaced patches carry
    real good texture; "mean": the pixel mean of the normal images (right for aligned objects);
    "blur": a strong blur of the image itself (no normal images needed); "auto": normal if normal
    images are given, else blur.
    """
    if kind not in BASELINES:
        raise ValueError(f"baseline {kind!r}: use one of {', '.join(BASELINES)}")
    if kind == "auto":
        kind = "normal" if normal_images is not None and len(normal_images) else "blur"
    if kind == "blur":
        sigma = max(image.shape[:2]) / 16
        return gaussian_filter(image, sigma=(sigma, sigma, 0) if image.ndim == 3 else sigma).astype(
            np.float32
        )
    if normal_images is None or not len(normal_images):
        raise ValueError(f"baseline {kind!r} needs normal images")
    normals = [_fit_shape(_image(n), image) for n in normal_images]
    if kind == "mean":
        return np.mean(normals, axis=0).astype(np.float32)
    thumb = _fit_shape(image, np.zeros((32, 32) + image.shape[2:]))
    distances = [float(((_fit_shape(n, thumb) - thumb) ** 2).sum()) for n in normals]
    return normals[int(np.argmin(distances))]


def superpixels(image: np.ndarray, n_segments: int = 64, compactness: float = 10.0) -> np.ndarray:
    """SLIC superpixel labels 0..K-1 (K close to `n_segments`)."""
    return slic(
        image,
        n_segments=n_segments,
        compactness=compactness,
        start_label=0,
        channel_axis=-1 if image.ndim == 3 else None,
    )


def lime_map(
    image: np.ndarray,
    predict: Callable[[np.ndarray], np.ndarray],
    baseline: np.ndarray,
    n_segments: int = 64,
    num_samples: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    compactness: float = 10.0,
) -> np.ndarray:
    """LIME weight of each superpixel for `predict` (a batch (N, H, W[, C]) -> (N,) values), painted
    on its pixels; positive weights scaled to [0, 1], the rest 0."""
    segments = superpixels(image, n_segments, compactness)
    n_seg = int(segments.max()) + 1
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 2, (num_samples, n_seg))
    data[0] = 1  # the unperturbed image, as lime_image does
    values = []
    for start in range(0, num_samples, batch_size):
        keep = data[start : start + batch_size][:, segments].astype(bool)  # (b, H, W)
        keep = keep[..., None] if image.ndim == 3 else keep
        values.append(np.asarray(predict(np.where(keep, image[None], baseline[None])), dtype=np.float64))
    labels = np.concatenate(values)[:, None]
    distances = pairwise_distances(data, data[:1], metric="cosine").ravel()
    lime = LimeBase(lambda d: np.sqrt(np.exp(-(d**2) / KERNEL_WIDTH**2)), random_state=seed)
    _, weights, _, _ = lime.explain_instance_with_data(
        data, labels, distances, 0, n_seg, feature_selection="none"
    )
    per_segment = np.zeros(n_seg)
    for feature, weight in weights:
        per_segment[feature] = weight
    positive = np.clip(per_segment, 0, None)
    top = positive.max()
    return (positive[segments] / top if top > 0 else np.zeros(segments.shape)).astype(np.float32)


def detector_score_fn(detector: Detector) -> Callable[[np.ndarray], np.ndarray]:
    """Batch of images -> the detector's scores (normalized when it is calibrated)."""

    def score(batch: np.ndarray) -> np.ndarray:
        prediction = detector.predict(list(batch))
        normalized = prediction.normalized_scores
        return prediction.scores if normalized is None else normalized

    return score


def lime_score_map(
    detector: Detector,
    image,
    normal_images: Sequence | None = None,
    *,
    baseline: str = "auto",
    n_segments: int = 64,
    num_samples: int = 128,
    seed: int = 0,
) -> np.ndarray:
    """LIME on the anomaly score itself: any detector (classical ones included) gets a map in [0, 1]
    at the image's resolution, without a second model. `image`: a path or an array."""
    array = _image(image)
    return lime_map(
        array,
        detector_score_fn(detector),
        baseline_image(array, normal_images, baseline),
        n_segments,
        num_samples,
        batch_size=max(8, detector.options["batch_size"]),
        seed=seed,
    )


def lime_classifier_map(
    classifier: AnomalyClassifier,
    image,
    normal_images: Sequence | None = None,
    *,
    baseline: str = "auto",
    n_segments: int = 64,
    num_samples: int = 128,
    seed: int = 0,
) -> np.ndarray:
    """LIME on the explanation classifier's P(anomalous): a map in [0, 1] at the image's resolution."""
    array = _image(image)
    return lime_map(
        array,
        lambda batch: classifier.predict_proba(list(batch)),
        baseline_image(array, normal_images, baseline),
        n_segments,
        num_samples,
        seed=seed,
    )
