"""Small torch building blocks shared by the feature-based methods (ONNX-exportable)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GaussianBlur(nn.Module):
    """Separable Gaussian smoothing of (B, 1, H, W) maps, as PatchCore and PaDiM prescribe."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        radius = max(1, int(math.ceil(4 * sigma)))
        x = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(x**2) / (2 * sigma**2))
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)
        self.radius = radius

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        k = self.kernel.to(maps.dtype)
        maps = F.pad(maps, (self.radius, self.radius, self.radius, self.radius), mode="reflect")
        maps = F.conv2d(maps, k.view(1, 1, 1, -1))
        return F.conv2d(maps, k.view(1, 1, -1, 1))


def upsample_to_input(patch_maps: torch.Tensor, size: int, blur: GaussianBlur) -> torch.Tensor:
    """(B, h, w) patch scores -> (B, size, size) smoothed pixel map."""
    maps = F.interpolate(patch_maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
    return blur(maps).squeeze(1)
