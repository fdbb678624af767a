"""DCGAN-style networks (Radford et al., ICLR 2016) shared by f-AnoGAN and GANomaly: a strided
convolutional encoder / critic down to a 4x4 grid and the transposed-convolution generator back."""

from __future__ import annotations

import math

import torch
from torch import nn


def n_levels(image_size: int) -> int:
    """Stride-2 levels between a 4x4 grid and the image; image_size must be 4 * 2**k."""
    k = math.log2(image_size / 4) if image_size >= 8 else 0
    if k < 1 or k != int(k):
        raise ValueError(
            f"image_size must be 4 * a power of two (8, 16, ..., 64, 128, 256), got {image_size}"
        )
    return int(k)


def level_channels(image_size: int, width: int) -> list[int]:
    """Channels from the full-resolution level down: width, 2 width, ... capped at 8 width."""
    return [width * min(2**i, 8) for i in range(n_levels(image_size))]


class DCEncoder(nn.Module):
    """(B, C, S, S) -> (output (B, out_dim), features (B, F)): 4x4 stride-2 convs to a 4x4 grid
    (features), then a 4x4 conv to `out_dim`. BatchNorm is optional: a WGAN-GP critic must not
    use it (the gradient penalty is per sample)."""

    def __init__(self, channels: int, image_size: int, width: int, out_dim: int, batchnorm: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = channels
        for i, c in enumerate(level_channels(image_size, width)):
            layers.append(nn.Conv2d(c_in, c, 4, 2, 1, bias=not (batchnorm and i > 0)))
            if batchnorm and i > 0:  # DCGAN: no BatchNorm on the input layer
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.LeakyReLU(0.2))
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(c_in, out_dim, 4, 1, 0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.head(f).flatten(1), f.flatten(1)


class DCGenerator(nn.Module):
    """(B, latent) -> (B, C, S, S) in [-1, 1]: 4x4 transposed convs up from a 4x4 grid."""

    def __init__(self, latent: int, channels: int, image_size: int, width: int) -> None:
        super().__init__()
        widths = level_channels(image_size, width)[::-1]
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent, widths[0], 4, 1, 0, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        for i, c in enumerate(widths):
            if i == len(widths) - 1:
                layers += [nn.ConvTranspose2d(c, channels, 4, 2, 1), nn.Tanh()]
            else:
                layers += [
                    nn.ConvTranspose2d(c, widths[i + 1], 4, 2, 1, bias=False),
                    nn.BatchNorm2d(widths[i + 1]),
                    nn.ReLU(),
                ]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], -1, 1, 1))
