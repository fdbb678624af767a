"""PIADE (Mishra, Piciarelli, Foresti, "A neural network for image anomaly detection with deep
pyramidal representations and dynamic routing", International Journal of Neural Systems 30(10),
2020).

The deep pyramidal autoencoder (`pyramid_ae`) with a dynamic-routing layer inspired by capsule
networks between the pyramid and the latent code: each level's code vector is an input capsule,
routed by agreement to a few latent capsules at every position of the latent grid
(`components.pyramid.DynamicRouting`). Same perceptual training loss, score and map as
`pyramid_ae`; deviations in docs/reconstruction.md.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from anomalens.models.components.pyramid import DynamicRouting
from anomalens.models.pyramid_ae import PyramidAe
from anomalens.registry import register


@register
class Piade(PyramidAe):
    """PIADE. Options: those of pyramid_ae, with the latent code made of `capsules` capsules of
    `capsule_dim` values each, routed from the pyramid levels in `routing_iterations` iterations."""

    name = "piade"
    defaults = {
        **{k: v for k, v in PyramidAe.defaults.items() if k != "latent"},
        "capsules": 4,
        "capsule_dim": 4,
        "routing_iterations": 3,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        for key in ("capsules", "capsule_dim", "routing_iterations"):
            if self.options[key] < 1:
                raise ValueError(f"{self.name}: option {key} must be >= 1, got {self.options[key]}")

    def _bottleneck(self) -> nn.Module:
        o = self.options
        return DynamicRouting(
            o["levels"], o["code"], o["capsules"], o["capsule_dim"], o["routing_iterations"]
        )
