"""Convolutional autoencoder (Bergmann et al., VISAPP 2019: "Improving unsupervised defect
segmentation by applying structural similarity to autoencoders").

The autoencoder learns to reconstruct good images; a defect is reconstructed badly, so the
per-pixel residual (squared error or 1 - SSIM, max over channels, Gaussian-smoothed) is the
anomaly map and its maximum the image score (`components.reconstruction.ResidualMap`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anomalens.models.components.reconstruction import ResidualMap, reconstruction_loss
from anomalens.models.trainable import TrainableDetector, check_choice
from anomalens.models.training import Phase
from anomalens.registry import register

LOSSES = ("l2", "ssim", "l2+ssim")
RESIDUALS = ("auto", "l2", "ssim")
# Bergmann et al.'s deep AE for 256 px textures: 5 stride-2 levels to an 8x8 grid, latent 500
PRESETS: dict[str, dict[str, Any]] = {
    "bergmann": {"image_size": 256, "depth": 5, "width": 32, "latent": 500, "channels": 3, "loss": "l2+ssim"},
}


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.01))


def level_widths(depth: int, width: int) -> list[int]:
    """Channels after each stride-2 level: width, ..., then doubling over the last two
    (Bergmann's 32, 32, 32, 64, 128 for depth 5, width 32)."""
    return [width * 2 ** max(0, i - depth + 3) for i in range(depth)]


class ConvEncoder(nn.Module):
    """(B, C, S, S) -> (B, latent, 1, 1): `depth` stride-2 4x4 convs (each but the first and last
    followed by a 3x3 conv), 3x3 convs down to `width`, then a conv over the whole remaining grid."""

    def __init__(self, channels: int, image_size: int, depth: int, width: int, latent: int) -> None:
        super().__init__()
        grid = image_size // 2**depth
        if grid < 1 or grid * 2**depth != image_size:
            raise ValueError(f"image_size {image_size} must be a multiple of 2**depth = {2**depth}")
        widths = level_widths(depth, width)
        layers: list[nn.Module] = []
        c_in = channels
        for i, c in enumerate(widths):
            layers.append(_block(nn.Conv2d(c_in, c, 4, 2, 1), c))
            if 0 < i < depth - 1:
                layers.append(_block(nn.Conv2d(c, c, 3, 1, 1), c))
            c_in = c
        layers += [
            _block(nn.Conv2d(c_in, width * 2, 3, 1, 1), width * 2),
            _block(nn.Conv2d(width * 2, width, 3, 1, 1), width),
            nn.Conv2d(width, latent, grid),
        ]  # linear bottleneck
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """Mirror of `ConvEncoder`: (B, latent, 1, 1) -> (B, C, S, S), linear output."""

    def __init__(self, channels: int, image_size: int, depth: int, width: int, latent: int) -> None:
        super().__init__()
        grid = image_size // 2**depth
        widths = level_widths(depth, width)[::-1]
        layers: list[nn.Module] = [
            _block(nn.ConvTranspose2d(latent, width, grid), width),
            _block(nn.Conv2d(width, width * 2, 3, 1, 1), width * 2),
            _block(nn.Conv2d(width * 2, widths[0], 3, 1, 1), widths[0]),
        ]
        for i, c in enumerate(widths):
            last = i == depth - 1
            c_out = channels if last else widths[i + 1]
            if 0 < i < depth - 1:
                layers.append(_block(nn.Conv2d(c, c, 3, 1, 1), c))
            up = nn.ConvTranspose2d(c, c_out, 4, 2, 1)
            layers.append(up if last else _block(up, c_out))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class ConvAutoencoder(nn.Module):
    def __init__(self, channels: int, image_size: int, depth: int, width: int, latent: int) -> None:
        super().__init__()
        self.encoder = ConvEncoder(channels, image_size, depth, width, latent)
        self.decoder = ConvDecoder(channels, image_size, depth, width, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class AutoencoderModel(nn.Module):
    def __init__(self, ae: ConvAutoencoder, residual: ResidualMap) -> None:
        super().__init__()
        self.ae, self.residual = ae, residual

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.residual(x, self.ae(x))


@register
class Autoencoder(TrainableDetector):
    """Convolutional autoencoder. Options: preset ("bergmann": 256 px, depth 5, latent 500),
    depth (stride-2 levels), width, latent, channels, loss (l2, ssim, l2+ssim), residual (map:
    l2, ssim, or auto = ssim when the loss uses it), ssim_window, sigma (map smoothing), score
    (max or mean of the map)."""

    name = "autoencoder"
    map_max_setting = "score=max"
    defaults = {
        "preset": "",
        "channels": 3,
        "depth": 4,
        "width": 32,
        "latent": 100,
        "loss": "l2+ssim",
        "residual": "auto",
        "ssim_window": 11,
        "sigma": 2.0,
        "score": "max",
        "epochs": 40,
        "min_steps": 1500,
        "lr": 5e-4,
        "weight_decay": 1e-5,
        "max_minutes": 12.0,
    }

    def __init__(self, **options: Any) -> None:
        preset = options.get("preset", "")
        if preset:
            check_choice(self.name, "preset", preset, tuple(PRESETS))
            options = {**PRESETS[preset], **options}  # explicit options win over the preset
        super().__init__(**options)
        o = self.options
        check_choice(self.name, "loss", o["loss"], LOSSES)
        check_choice(self.name, "residual", o["residual"], RESIDUALS)
        check_choice(self.name, "score", o["score"], ("max", "mean"))
        ConvEncoder(o["channels"], self.input_side, o["depth"], 1, 1)  # validates image_size vs depth early

    @property
    def residual_kind(self) -> str:
        if self.options["residual"] != "auto":
            return self.options["residual"]
        return "ssim" if "ssim" in self.options["loss"] else "l2"

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        return {"ae": ConvAutoencoder(o["channels"], self.input_side, o["depth"], o["width"], o["latent"])}

    def _phases(self) -> list[Phase]:
        ae, o = self.modules["ae"], self.options
        opt = torch.optim.Adam(ae.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return reconstruction_loss(x, ae(x), o["loss"], o["ssim_window"])

        return [self.loss_phase("reconstruct", loss_of, {"adam": opt})]

    def _scorer(self) -> AutoencoderModel:
        o = self.options
        return AutoencoderModel(
            self.modules["ae"],
            ResidualMap(self.residual_kind, self.input_side, o["sigma"], o["ssim_window"], o["score"]),
        )
