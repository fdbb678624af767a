"""Shared plumbing of detectors built on a pretrained backbone (PatchCore, PaDiM, ...)."""

from __future__ import annotations

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
from anomalens.data.inputs import Preprocess
from anomalens.models.base import Detector


class BackboneDetector(Detector):
    """Adds the backbone options, a lazily built extractor and a checksum check on load."""

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
                self.extractor, self.input_size, self.device, engine=self.options["engine"]
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

    def _backbone_state(self) -> dict[str, Any]:
        _ = self.extractor  # make sure the checksum is known
        return {"backbone_checksum": self._backbone_checksum}

    def _restore_backbone(self, meta: dict[str, Any]) -> None:
        self._backbone_checksum = meta["backbone_checksum"]
