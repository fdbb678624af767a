"""Shared plumbing of detectors built on a pretrained backbone (PatchCore, PaDiM, ...)."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import torch

from anomalens.backbones import (
    BackboneError,
    BackboneSpec,
    build_backbone,
    make_feature_runner,
    weights_checksum,
)
from anomalens.data.inputs import InputItem, Preprocess, load_item
from anomalens.models.base import Detector

PRECISIONS = ("fp32", "int8")


class BackboneDetector(Detector):
    """Adds the backbone options, a lazily built extractor and a checksum check on load.

    A method that takes all its features through `features` may offer the option
    ``runtime_precision`` (PatchCore, PaDiM): "int8" quantizes the backbone's ONNX graph at fit,
    calibrated on the training goods only, and then fits, calibrates and predicts with those INT8
    features, so the memory bank or Gaussians and the threshold match what is scored; the INT8
    graph is saved in the model file.
    """

    base_defaults = {
        **Detector.base_defaults,
        "backbone": "efficientnet_lite0",
        "weights": "",  # local weight file; empty = the backbone's own (offline or published) weights
        "engine": "auto",  # feature extraction: "onnx" (fast on CPU), "torch", or "auto"
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._extractor = None
        self._runner = None
        self._backbone_checksum: str | None = None
        self._int8_graph: bytes | None = None  # the quantized backbone, when runtime_precision=int8
        precision = self.options.get("runtime_precision", "fp32")
        if precision not in PRECISIONS:
            raise ValueError(f"option runtime_precision={precision!r}: use one of {', '.join(PRECISIONS)}")

    @property
    def backbone_spec(self) -> BackboneSpec:
        return BackboneSpec(
            name=self.options["backbone"],
            layers=tuple(self.options["layers"]),
            weights=self.options["weights"] or None,
        )

    @property
    def extractor(self):
        if self._extractor is None:
            self._extractor = build_backbone(
                self.backbone_spec, device=self.device, input_size=self.input_size
            )
            checksum = weights_checksum(self._extractor)
            if self._backbone_checksum is not None and checksum != self._backbone_checksum:
                raise BackboneError(
                    f"backbone {self.backbone_spec.name!r} now has other weights than when the "
                    "model was fitted: refit, or restore the original weight file"
                )
            self._backbone_checksum = checksum
        return self._extractor

    def _preprocess(self) -> Preprocess:
        ex = self.extractor
        return Preprocess(self.input_size, 3, tuple(ex.mean), tuple(ex.std), self.options["intensity"])

    @property
    def feature_runner(self):
        """What runs the backbone: ONNX Runtime when that is faster, else torch (built once)."""
        if self._runner is None:
            self._runner = make_feature_runner(
                self.extractor,
                self.input_size,
                self.device,
                engine=self.options["engine"],
                int8_graph=self._int8_graph,
            )
        return self._runner

    def share_backbone(self, other: BackboneDetector) -> None:
        """Use `other`'s extractor and runner (same backbone options): one backbone in memory for
        the detectors of a multi-product model."""
        self._extractor, self._runner = other.extractor, other.feature_runner
        self._backbone_checksum = other._backbone_checksum

    def _sibling(self, **options: Any) -> BackboneDetector:
        sibling = type(self)(**options)
        sibling.share_backbone(self)  # the same frozen backbone: no second copy or ONNX session
        return sibling

    def features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """Backbone features of a normalized batch, through ONNX Runtime when that is faster."""
        outs = self.feature_runner(pixels.numpy() if pixels.device.type == "cpu" else pixels.cpu().numpy())
        return [torch.from_numpy(np.asarray(o)).to(self.device) for o in outs]

    @property
    def int8_backbone(self) -> bytes | None:
        """The INT8 backbone's ONNX graph (input "input", normalized; outputs feat0, feat1, ...)
        when fitted with runtime_precision=int8, else None."""
        return self._int8_graph

    def _prepare_fit(self, items: list[InputItem]) -> None:
        """With runtime_precision=int8: quantize the backbone, calibrated on up to 64 canvases of
        the goods being fitted (evenly spread over them; never the calibration goods)."""
        if self.options.get("runtime_precision", "fp32") != "int8":
            return
        from anomalens.backbones import OnnxFeatureRunner
        from anomalens.backbones.quantize import MAX_CALIBRATION_IMAGES, quantize_int8

        start = time.perf_counter()
        chosen = np.unique(np.linspace(0, len(items) - 1, min(len(items), MAX_CALIBRATION_IMAGES)).round())
        pre = self.preprocess()
        pixels = np.concatenate(
            [pre.canvases(load_item(items[int(i)]), items[int(i)].key)[0].numpy() for i in chosen]
        )
        fp32 = OnnxFeatureRunner(self.extractor, self.input_size)  # the cached fp32 graph
        self._int8_graph = quantize_int8(fp32.path, pixels[:MAX_CALIBRATION_IMAGES])
        self._runner = None  # the next features come from the INT8 graph
        self.fit_info["int8"] = {
            "calibration_canvases": int(min(len(pixels), MAX_CALIBRATION_IMAGES)),
            "quantize_seconds": round(time.perf_counter() - start, 3),
        }

    def _backbone_state(self) -> dict[str, Any]:
        _ = self.extractor  # make sure the checksum is known
        state: dict[str, Any] = {"backbone_checksum": self._backbone_checksum}
        if self._int8_graph is not None:  # a few hundred kB: base64 in the JSON header, never pickled
            state["int8_backbone_onnx"] = base64.b64encode(self._int8_graph).decode()
        return state

    def _restore_backbone(self, meta: dict[str, Any]) -> None:
        self._backbone_checksum = meta["backbone_checksum"]
        graph = meta.get("int8_backbone_onnx")
        self._int8_graph = None if graph is None else base64.b64decode(graph)
        self._runner = None
