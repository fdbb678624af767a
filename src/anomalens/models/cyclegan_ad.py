"""CycleGAN-AD (Bougaham, Delchevalerie, El Adoui, Frenay, "Industrial and Medical Anomaly Detection
Through Cycle-Consistent Adversarial Networks", 2023).

A CycleGAN (Zhu et al. 2017; `components.cyclegan`) between the normal domain N (the training
goods) and the abnormal domain A (the few labelled defects, required): generators A->N and N->A,
PatchGAN discriminators of N and A, LSGAN, cycle-consistency and identity losses. The few
defects are drawn with replacement to pair every goods batch (oversampled), flipped and shifted.
At inference an image is translated to the normal domain, x -> G_A->N(x); the anomaly map is the
smoothed per-pixel residual |x - G(x)| (mean over channels). The image score (`score`) is by
default the paper's FID-like one, the squared distance between the pooled pretrained-backbone
features of x and of G(x) (one image per side has no covariance, so its Frechet distance is the
distance of the feature vectors); score=sse is the paper's other score, the residual's sum of
squared errors. The feature score was chosen on held-out goods against synthetic defects
(docs/cyclegan_ad.md), never on test defects.

Batch norm as the paper's code (instance norm, CycleGAN's, loses each image's brightness).
Deviations (docs/cyclegan_ad.md): generators of `width` 16 with 4 residual blocks (paper: 64 and
6), discriminators of width 32, no replay buffer of past translations, a constant learning rate of
5e-4, epochs bounded by `max_minutes`; EfficientNet-Lite0 instead of Inception-v3 for the feature
score.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from anomalens.data.inputs import Preprocess
from anomalens.models.components.cyclegan import NORMS, CycleGan, ResnetGenerator, flip_shift
from anomalens.models.components.features import pooled_features
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.trainable import BackboneTrainableDetector, TrainableDetector, check_choice
from anomalens.models.training import Phase, StepContext
from anomalens.registry import register

SCORES = ("sse", "max", "feature")


class FeatureDistance(nn.Module):
    """(x, y) in the model's [-1, 1] pixels -> (B,) squared distance of their pooled backbone
    features (the backbone's own normalization applied here, gray repeated to RGB)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()
        return pooled_features(self.backbone(((x + 1) / 2 - self.mean) / self.std))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.embed(x) - self.embed(y)).pow(2).sum(1)


class CycleGanAdModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)): the translation to the normal domain, its smoothed
    absolute residual as the map, SSE or the feature distance as the score."""

    def __init__(
        self,
        generator: ResnetGenerator,
        smooth: SmoothUpsample | None,
        features: FeatureDistance | None,
        score: str,
    ) -> None:
        super().__init__()
        self.generator, self.smooth, self.features, self.score = generator, smooth, features, score

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normal = self.generator(x)
        residual = x.float() - normal.float()
        maps = residual.abs().mean(1)
        if self.smooth is not None:
            maps = self.smooth(maps)
        if self.score == "feature":
            return self.features(x, normal), maps
        if self.score == "max":
            return maps.amax(dim=(1, 2)), maps
        return residual.pow(2).flatten(1).sum(1), maps


@register
class CycleGanAd(BackboneTrainableDetector):
    """CycleGAN-AD: learns from goods and a few labelled defects (required). Options: channels,
    width and blocks (generators), d_width and d_layers (PatchGAN discriminators), norm ("batch",
    as the paper's code, or "instance", CycleGAN's: it loses each image's brightness), cycle_weight
    (lambda of the L1 cycle loss, 10) and identity_weight (5, half of it as in CycleGAN),
    defect_shift (pixels of random shift of the defects, with random flips; 0 = flips only),
    sigma (map smoothing), score ("feature": the squared distance of the pooled backbone features,
    `backbone` and `layers`, of the image and its translation; "sse": the residual's sum of
    squares; "max": the map's maximum), lr, epochs, max_minutes."""

    name = "cyclegan_ad"
    uses_defects = "required"
    map_max_setting = "score=max"
    defaults = {
        "image_size": 64,
        "batch_size": 8,
        "channels": 3,
        "width": 16,
        "blocks": 4,
        "d_width": 32,
        "d_layers": 3,
        "norm": "batch",
        "cycle_weight": 10.0,
        "identity_weight": 5.0,
        "defect_shift": 4,
        "sigma": 1.0,
        "score": "feature",
        "layers": (3, 4),
        "validation_fraction": 0.0,
        "epochs": 40,
        "min_steps": 1500,
        "lr": 5e-4,  # the paper: 2e-4 over hundreds of epochs; a CPU budget trains a few hundred steps
        "max_minutes": 15.0,
    }
    option_bounds = {
        "channels": (1, 3),
        "width": (1, 512),
        "blocks": (0, 32),
        "d_width": (1, 512),
        "d_layers": (1, 6),
        "cycle_weight": (0.0, 1e4),
        "identity_weight": (0.0, 1e4),
        "defect_shift": (0, 256),
        "sigma": (0.0, 64.0),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_choice(self.name, "score", o["score"], SCORES)
        check_choice(self.name, "norm", o["norm"], NORMS)
        if o["channels"] not in (1, 3):
            raise ValueError(f"{self.name}: option channels must be 1 or 3, got {o['channels']}")
        if self.input_side % 4 or self.input_side < 2 ** (o["d_layers"] + 2):
            raise ValueError(
                f"{self.name}: image_size {self.input_side} must be a multiple of 4 and at least "
                f"{2 ** (o['d_layers'] + 2)} for d_layers={o['d_layers']}"
            )

    @property
    def uses_backbone(self) -> bool:
        return self.options["score"] == "feature"

    def _preprocess(self) -> Preprocess:
        # the generators work in [-1, 1] (tanh); the feature score converts to the backbone's own
        return TrainableDetector._preprocess(self)

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        return {
            "cyclegan": CycleGan(
                o["channels"], o["width"], o["blocks"], o["d_width"], o["d_layers"], o["norm"]
            )
        }

    def _scorer(self) -> CycleGanAdModel:
        o = self.options
        smooth = SmoothUpsample(self.input_side, o["sigma"]) if o["sigma"] > 0 else None
        features = FeatureDistance(self.extractor).to(self.device) if self.uses_backbone else None
        return CycleGanAdModel(self.modules["cyclegan"].to_normal, smooth, features, o["score"])

    def _fit_batches(self, batches, n_images: int) -> None:
        # the labelled defects are few (a few dozen): kept as one tensor for the whole training
        self._defect_pixels, _ = self.labelled_defects()
        self.fit_info["n_defects_trained"] = len(self._defect_pixels)
        try:
            super()._fit_batches(batches, n_images)
        finally:
            del self._defect_pixels

    def _phases(self) -> list[Phase]:
        o = self.options
        gan: CycleGan = self.modules["cyclegan"]
        opt_g = torch.optim.Adam(gan.generator_parameters(), lr=o["lr"], betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(gan.discriminator_parameters(), lr=o["lr"], betas=(0.5, 0.999))
        defects = self._defect_pixels

        def step(x_n: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
            # one abnormal image per good, drawn with replacement (the engine re-seeds the RNG)
            picks = torch.randint(len(defects), (len(x_n),))
            x_a = flip_shift(defects[picks], o["defect_shift"]).to(x_n.device)
            discriminators = (gan.d_normal, gan.d_abnormal)
            for d in discriminators:
                d.requires_grad_(False)  # the generators' step leaves the discriminators alone
            with ctx.autocast():
                losses, fake_n, fake_a = gan.generator_losses(
                    x_n, x_a, o["cycle_weight"], o["identity_weight"]
                )
            ctx.update(losses["loss"], opt_g)
            for d in discriminators:
                d.requires_grad_(True)
            with ctx.autocast():
                loss_d = gan.discriminator_loss(x_n, x_a, fake_n, fake_a)
            ctx.update(loss_d, opt_d)
            return {**{k: v.detach() for k, v in losses.items()}, "d": loss_d.detach()}

        return [self.phase("cyclegan", step, {"generators": opt_g, "discriminators": opt_d})]

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if self.uses_backbone:
            return super()._state()
        return TrainableDetector._state(self)

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if self.uses_backbone:
            super()._restore(arrays, meta)
        else:
            TrainableDetector._restore(self, arrays, meta)
