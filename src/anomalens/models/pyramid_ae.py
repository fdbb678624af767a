"""Deep pyramidal autoencoder (Mishra, Piciarelli, Foresti, "Image anomaly detection by
aggregating deep pyramidal representations", 2020).

The image is encoded at several resolutions (a pyramid: the image average-pooled by 1, 2, 4, ...),
each level by its own stacked convolutional encoder down to one common low-resolution grid; the
levels' codes are aggregated into a low-dimensional latent code and decoded back to the image.
Training on goods minimizes a pixel loss plus a perceptual loss: the distance between the
frozen pretrained backbone's features of the image and of its reconstruction. The image score is
that similarity loss; the map adds the per-pixel residual and the per-feature residuals upsampled
to the image. Building blocks: `components.pyramid`; papers and deviations: docs/reconstruction.md.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anomalens.models.components.pyramid import (
    ConcatBottleneck,
    PerceptualResidual,
    PyramidAutoencoder,
    PyramidDecoder,
    PyramidEncoder,
    PyramidScorer,
    check_pyramid,
)
from anomalens.models.trainable import BackboneTrainableDetector, check_choice
from anomalens.models.training import Phase
from anomalens.registry import register


@register
class PyramidAe(BackboneTrainableDetector):
    """Deep pyramidal autoencoder. Options: levels (pyramid levels), depth (stride-2 levels of the
    full-resolution encoder; the latent grid is image_size / 2**depth), width, code (channels of
    each level's code), latent (channels of the latent grid), layers (backbone stages of the
    perceptual loss), perceptual_weight, sigma (map smoothing), score (loss = the image's
    similarity loss, or max of the map)."""

    name = "pyramid_ae"
    defaults = {
        "image_size": 128,
        "batch_size": 16,
        "layers": (1, 2, 3),
        "levels": 3,
        "depth": 4,
        "width": 32,
        "code": 32,
        "latent": 16,
        "perceptual_weight": 1.0,
        "sigma": 2.0,
        "score": "loss",
        "epochs": 40,
        "min_steps": 600,
        "lr": 1e-3,
        "weight_decay": 1e-5,
        "max_minutes": 12.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_choice(self.name, "score", o["score"], ("loss", "max"))
        check_pyramid(self.input_side, o["levels"], o["depth"])

    def _bottleneck(self) -> nn.Module:
        o = self.options
        return ConcatBottleneck(o["levels"], o["code"], o["latent"])

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        bottleneck = self._bottleneck()
        return {
            "ae": PyramidAutoencoder(
                PyramidEncoder(3, o["levels"], o["depth"], o["width"], o["code"]),
                bottleneck,
                PyramidDecoder(3, o["depth"], o["width"], bottleneck.out_channels),
            )
        }

    def _scorer(self) -> PyramidScorer:
        o = self.options
        return PyramidScorer(
            self.modules["ae"],
            PerceptualResidual(self.extractor),
            self.input_side,
            o["perceptual_weight"],
            o["sigma"],
            o["score"],
        )

    def _phases(self) -> list[Phase]:
        o = self.options
        ae, residual = self.modules["ae"], PerceptualResidual(self.extractor)
        opt = torch.optim.Adam(ae.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return PerceptualResidual.loss(*residual(x, ae(x)), o["perceptual_weight"]).mean()

        return [self.loss_phase("reconstruct", loss_of, {"adam": opt})]
