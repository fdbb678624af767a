"""Small torch building blocks shared by several methods (ONNX-exportable)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(c: int) -> nn.GroupNorm:
    """Group norm of up to 8 groups: the same in training and inference, unlike batch norm, whose
    running statistics over small batches of mixed goods and defects are unreliable."""
    return nn.GroupNorm(min(8, c), c)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """A U-Net level: two 3x3 conv - group norm - ReLU."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        group_norm(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        group_norm(c_out),
        nn.ReLU(inplace=True),
    )


def _gaussian_kernel(sigma: float) -> tuple[torch.Tensor, int]:
    radius = max(1, int(math.ceil(4 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum(), radius


def _upsample_blur_matrix(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D bilinear upsampling followed by reflect-padded Gaussian blur.

    Both steps are linear and separable, so a whole 2-D map is A @ P @ B.T: two small matmuls
    instead of a 33-tap convolution over the full-size map (about 20x cheaper on a CPU).
    """
    basis = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)  # (n_in, 1, n_in): one unit impulse each
    up = F.interpolate(basis, size=n_out, mode="linear", align_corners=False)
    kernel, radius = _gaussian_kernel(sigma)
    pad = min(radius, n_out - 1)  # reflect padding cannot exceed the signal; tiny maps clip the tails
    up = F.pad(up, (pad, pad), mode="reflect")
    k = kernel[radius - pad : radius + pad + 1]
    cols = F.conv1d(up, (k / k.sum()).view(1, 1, -1))  # (n_in, 1, n_out)
    return cols[:, 0, :].T.float().contiguous()


class SmoothUpsample(nn.Module):
    """(B, h, w) patch scores -> (B, H, W) pixel map: bilinear upsampling then Gaussian smoothing,
    as PatchCore and PaDiM prescribe. `size` is H = W, or (H, W) for a non-square input."""

    def __init__(self, size: int | tuple[int, int], sigma: float) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.sigma = sigma
        self._matrices: dict[tuple[int, int], torch.Tensor] = {}

    def matrix(self, n_in: int, device: torch.device, n_out: int | None = None) -> torch.Tensor:
        """The (n_out, n_in) matrix of one axis; n_out defaults to the height (= the side when square)."""
        key = (n_in, self.size[0] if n_out is None else n_out)
        if key not in self._matrices:
            self._matrices[key] = _upsample_blur_matrix(key[0], key[1], self.sigma)
        return self._matrices[key].to(device)

    def forward(self, patch_maps: torch.Tensor) -> torch.Tensor:
        # int(): under the ONNX tracer shapes are tensors, which would miss the cache and trace
        # the float64 matrix construction; the matrices must enter the graph as constants
        a = self.matrix(int(patch_maps.shape[-2]), patch_maps.device, self.size[0])
        b = self.matrix(int(patch_maps.shape[-1]), patch_maps.device, self.size[1])
        return a @ patch_maps @ b.T
