"""Frozen pretrained feature extractors (offline EfficientNet-Lite by default) and fast runners."""

from .extractor import (
    BackboneError,
    BackboneSpec,
    FeatureExtractor,
    build_backbone,
    resolve_device,
    weights_checksum,
)
from .onnx_runner import OnnxFeatureRunner, TorchFeatureRunner, make_feature_runner, onnx_cache_dir

__all__ = [
    "BackboneError",
    "BackboneSpec",
    "FeatureExtractor",
    "OnnxFeatureRunner",
    "TorchFeatureRunner",
    "build_backbone",
    "make_feature_runner",
    "onnx_cache_dir",
    "resolve_device",
    "weights_checksum",
]
