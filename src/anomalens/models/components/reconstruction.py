"""Reconstruction residuals shared by the autoencoder, f-AnoGAN and GANomaly: per-pixel SSIM,
the L2 / SSIM training loss, and `ResidualMap` (image and reconstruction -> scores and map)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d
from torch import nn

from anomalens.models.components.layers import SmoothUpsample


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Model pixels in [-1, 1] -> [0, 1], the range SSIM's constants assume."""
    return (x + 1) / 2


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-pixel SSIM (B, C, H, W) of [-1, 1] images, same size as the input.

    pytorch_msssim only returns averaged SSIM (over a valid-convolution map), so the map is built
    here from its Gaussian window with the standard constants (K1 = 0.01, K2 = 0.03, data range
    1). Near the border the Gaussian averages only the pixels inside the image (zero padding
    divided by the blurred ones), which also keeps the graph ONNX-exportable (no reflect Pad).
    """
    x, y = _unit(x.float()), _unit(y.float())
    pad = window // 2
    win = _fspecial_gauss_1d(window, sigma).to(x.device)  # (1, 1, window)
    row, col = win.view(1, 1, 1, window), win.view(1, 1, window, 1)

    def gauss(t: torch.Tensor) -> torch.Tensor:
        # channels folded into the batch: one fixed-shape kernel, as ONNX export needs
        flat = t.reshape(-1, 1, t.shape[-2], t.shape[-1])
        flat = F.conv2d(F.conv2d(flat, row, padding=(0, pad)), col, padding=(pad, 0))
        return flat.reshape(t.shape)

    weight = gauss(torch.ones_like(x[:1, :1]))

    def blur(t: torch.Tensor) -> torch.Tensor:
        return gauss(t) / weight

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def reconstruction_loss(x: torch.Tensor, recon: torch.Tensor, kind: str, window: int = 11) -> torch.Tensor:
    """Mean L2, 1 - SSIM, or their sum, in float32 (SSIM is unstable in half precision)."""
    x, recon = x.float(), recon.float()
    loss = x.new_zeros(())
    if "l2" in kind:
        loss = loss + F.mse_loss(recon, x)
    if "ssim" in kind:
        loss = loss + 1 - ssim(_unit(recon), _unit(x), data_range=1.0, win_size=window)
    return loss


class ResidualMap(nn.Module):
    """(image, reconstruction) -> (scores (B,), maps (B, S, S)): squared error or 1 - SSIM,
    max over channels, Gaussian-smoothed; score = max (or mean) of the map."""

    def __init__(
        self, kind: str, image_size: int, sigma: float, window: int = 11, score: str = "max"
    ) -> None:
        super().__init__()
        self.kind, self.window, self.score = kind, window, score
        self.smooth = SmoothUpsample(image_size, sigma) if sigma > 0 else None

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "ssim":
            maps = (1 - ssim_map(x, recon, self.window)).amax(1)
        else:
            maps = ((x.float() - recon.float()) ** 2).amax(1)
        if self.smooth is not None:
            maps = self.smooth(maps)
        scores = maps.amax(dim=(1, 2)) if self.score == "max" else maps.mean(dim=(1, 2))
        return scores, maps
