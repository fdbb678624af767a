"""Reductions of a backbone's stage features, shared by PatchCore, EfficientAD and the classical
detectors' `deep` / `patch` representations, and the normalized feature distance of STFPM and the
pyramidal autoencoders' perceptual loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def locally_aware_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """3x3 neighbourhood average of each stage, deeper stages upsampled to the first: (B, D, h, w)."""
    size = features[0].shape[-2:]
    out = []
    for f in features:
        f = F.avg_pool2d(f, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        if f.shape[-2:] != size:
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        out.append(f)
    return torch.cat(out, dim=1)


def pooled_features(features: list[torch.Tensor]) -> torch.Tensor:
    """Global average pooling of each stage, concatenated: (B, sum of channels)."""
    return torch.cat([f.mean(dim=(2, 3)) for f in features], dim=1)


def patch_grid(features: list[torch.Tensor]) -> torch.Tensor:
    """PatchCore's locally aware embedding on the first stage's grid, channels last: (B, h, w, D)."""
    return locally_aware_embedding(features).permute(0, 2, 3, 1).contiguous()


def normalized_sq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-position 1/2 ||a/|a| - b/|b| ||^2 over channels: (B, C, h, w) -> (B, h, w) (STFPM's eq. 1)."""
    return 0.5 * (F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(dim=1)
