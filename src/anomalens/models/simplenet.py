"""SimpleNet (Liu et al., "SimpleNet: A Simple Network for Image Anomaly Detection and
Localization", CVPR 2023).

A frozen pretrained backbone gives locally aware patch features (as PatchCore's); a feature
adaptor (one linear layer) maps them to the target domain; anomalous features are synthesized by
adding Gaussian noise (std 0.015) to the adapted features; a discriminator (linear -> batch norm
-> leaky ReLU -> linear) learns to score adapted good features above +th and noisy ones below -th
with the truncated L1 loss (th = 0.5). The anomaly of a patch is the discriminator's negative
output; the map is upsampled and Gaussian-smoothed (sigma 4) and the image score is its maximum.

The backbone is frozen, so its features are extracted once per fit and cached: every training
epoch then runs only the adaptor and the discriminator (cheap on a CPU).

Deviations from the paper (see docs/learners.md):

- Backbone: the offline EfficientNet-Lite0 (stages 2 and 3, 152 channels) instead of
  WideResNet-50, and its features are not pooled to 1536 dimensions: the adaptor keeps their width.
- Noise scale: the features are standardized per channel (training goods' mean and std) before
  the adaptor, and the noise std is 0.1 of that spread. Lite0's raw features spread 1.6 per
  channel on average, and the paper's 0.015 on them (or on the standardized ones) left the loss at
  1.0 (nothing separated) on the synthetic test texture; the paper's 0.015 is on WideResNet-50
  features average-pooled to 1536 dimensions, a different scale.
- Epoch selection: the paper keeps the epoch with the best test AUROC; here the last epoch is kept
  (or, with validation_fraction > 0, the epoch with the lowest loss on held-out goods).
- GLASS's gradient-ascent feature anomalies and image-level synthetic defects are not used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from anomalens.data.inputs import Batch
from anomalens.models.components.features import locally_aware_embedding
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.trainable import BackboneTrainableDetector
from anomalens.models.training import Phase
from anomalens.registry import register


def _xavier(module: nn.Module) -> nn.Module:
    """The reference code's initialisation of every linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
    return module


def discriminator(dim: int, hidden: int) -> nn.Sequential:
    """The paper's two-layer discriminator: one score per feature vector, (P, dim) -> (P, 1)."""
    return _xavier(
        nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
    )


def truncated_l1(true_scores: torch.Tensor, fake_scores: torch.Tensor, margin: float) -> torch.Tensor:
    """Paper's eq. 6: max(0, th - D(q)) + max(0, th + D(q-)), each averaged over its features."""
    return (margin - true_scores).clamp_min(0).mean() + (margin + fake_scores).clamp_min(0).mean()


class FeatureStandardizer(nn.Module):
    """Per-channel standardization with the training goods' statistics (buffers, saved)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, dim, 1, 1))
        self.register_buffer("std", torch.ones(1, dim, 1, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return (emb - self.mean) / self.std


class SimpleNetModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, H, W)): backbone, adaptor, discriminator, smoothed map."""

    def __init__(
        self,
        extractor: nn.Module,
        standardize: FeatureStandardizer,
        adaptor: nn.Module,
        discriminator: nn.Module,
        image_size: tuple[int, int],
        sigma: float,
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.standardize = standardize
        self.adaptor = adaptor
        self.discriminator = discriminator
        self.upsample = SmoothUpsample(image_size, sigma)

    def adapt(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) patch features -> (B*h*w, D) adapted features."""
        emb = self.standardize(emb)
        return self.adaptor(emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]))

    def head(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and maps from the backbone's patch features (B, D, h, w)."""
        b, _, h, w = emb.shape
        patch = -self.discriminator(self.adapt(emb)).view(b, h, w)
        maps = self.upsample(patch)
        return maps.amax(dim=(1, 2)), maps

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(locally_aware_embedding(self.extractor(pixels)))


@register
class SimpleNet(BackboneTrainableDetector):
    """SimpleNet. Options: layers (backbone stages); noise_std (0.1 of the standardized features:
    the paper's 0.015 is on another scale) and margin (th, 0.5, the paper's); hidden (discriminator
    width, 1024); lr (discriminator's Adam, 2e-4, weight decay 1e-5); adaptor_lr (adaptor's AdamW,
    1e-4); sigma (map smoothing); engine (backbone runner, as PatchCore's); epochs, max_minutes.
    Training-time pixel augmentation does not apply (features are extracted once)."""

    name = "simplenet"
    square_input = False  # fully convolutional: any (H, W) canvas
    defaults = {
        "layers": (2, 3),
        # the frozen backbone runs outside the trained graph here (cached features, scoring): the
        # feature runner's engine applies again, as in PatchCore
        "engine": "auto",
        "hidden": 1024,
        "noise_std": 0.1,  # of the standardized features (see the module docstring)
        "margin": 0.5,
        "lr": 2e-4,
        "weight_decay": 1e-5,
        "adaptor_lr": 1e-4,
        "sigma": 4.0,
        "epochs": 20,
        "min_steps": 400,
        "max_minutes": 8.0,
        "validation_fraction": 0.0,  # the paper trains its epochs; > 0 keeps the best held-out epoch
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if self.options["augment"]:
            raise ValueError(
                "simplenet: option augment does not apply: the backbone features are extracted once, "
                "before training"
            )
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def feature_dim(self) -> int:
        return sum(self.extractor.channels)

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return locally_aware_embedding(self.features(pixels.to(self.device)))

    def _build_modules(self) -> dict[str, nn.Module]:
        d = self.feature_dim
        standardize = FeatureStandardizer(d)
        if self._stats is not None:  # fitting: the statistics of this fit's cached features
            standardize.mean.copy_(self._stats[0])
            standardize.std.copy_(self._stats[1])
        return {
            "standardize": standardize,
            "adaptor": _xavier(nn.Linear(d, d)),
            "discriminator": discriminator(d, self.options["hidden"]),
        }

    def _scorer(self) -> SimpleNetModel:
        m = self.modules
        return SimpleNetModel(
            self.extractor,
            m["standardize"],
            m["adaptor"],
            m["discriminator"],
            self.input_size,
            self.options["sigma"],
        )

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        # the frozen backbone runs once; the engine's "images" are the cached (N, D, h, w) features
        train = torch.cat([self._embed(b.pixels) for b in batches])
        val = [self._embed(b.pixels) for b in self._validation_batches()]
        self._stats = (
            train.mean(dim=(0, 2, 3), keepdim=True),
            train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6),
        )
        try:
            self._train(train, torch.cat(val) if val else None)
        finally:
            self._stats = None

    def _phases(self) -> list[Phase]:
        o = self.options
        model = self._scorer()
        adaptor_opt = torch.optim.AdamW(model.adaptor.parameters(), lr=o["adaptor_lr"])
        disc_opt = torch.optim.Adam(
            model.discriminator.parameters(), lr=o["lr"], weight_decay=o["weight_decay"]
        )

        def loss_of(emb: torch.Tensor) -> torch.Tensor:
            true = model.adapt(emb)
            fake = true + o["noise_std"] * torch.randn_like(true)
            scores = model.discriminator(torch.cat([true, fake]))  # one batch norm over both, as the paper
            return truncated_l1(scores[: len(true)], scores[len(true) :], o["margin"])

        def step(emb: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            with ctx.autocast():
                loss = loss_of(emb)
            adaptor_opt.zero_grad(set_to_none=True)
            ctx.update(loss, disc_opt)
            adaptor_opt.step()
            return {"loss": loss.detach()}

        return [
            self.phase("train", step, {"adaptor": adaptor_opt, "discriminator": disc_opt}, val_loss=loss_of)
        ]

    @torch.inference_mode()
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        # the backbone through the feature runner (ONNX Runtime where faster), then the torch head
        scores, maps = self._scorer().head(self._embed(pixels))
        return scores.float().cpu().numpy(), maps.float().cpu().numpy()
