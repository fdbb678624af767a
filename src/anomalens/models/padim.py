"""PaDiM (Defard et al., ICPR 2021): a Gaussian per feature-map position, Mahalanobis distance.

`PadimModel` is the inference compute (exportable nn.Module); `Padim` streams the per-position
mean and covariance over the training images, so memory does not grow with their number.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.data.inputs import Batch
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.feature_base import BackboneDetector
from anomalens.registry import register


def concat_embedding(features: list[torch.Tensor], channel_idx: torch.Tensor) -> torch.Tensor:
    """Deeper stages upsampled (nearest) to the first stage's grid, concatenated, channel subset."""
    size = features[0].shape[-2:]
    emb = torch.cat(
        [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in features], dim=1
    )
    return emb.index_select(1, channel_idx)


class PadimModel(nn.Module):
    def __init__(
        self,
        channel_idx: torch.Tensor,
        mean: torch.Tensor,
        inv_cov: torch.Tensor,
        image_size: int | tuple[int, int],
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.register_buffer("channel_idx", channel_idx)
        self.register_buffer("mean", mean)  # (P, d)
        self.register_buffer("inv_cov", inv_cov)  # (P, d, d)
        self.image_size = image_size
        self.upsample = SmoothUpsample(image_size, sigma)

    def forward(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = concat_embedding(features, self.channel_idx)
        b, d, h, w = emb.shape
        # contiguous: bmm over a permuted view takes a path about 20x slower on CPU
        delta = (emb.reshape(b, d, h * w).permute(2, 0, 1) - self.mean.unsqueeze(1)).contiguous()  # (P, B, d)
        dist2 = (torch.bmm(delta, self.inv_cov) * delta).sum(-1)  # (P, B)
        dist = dist2.clamp_min(0).sqrt().T.reshape(b, h, w)
        maps = self.upsample(dist)
        return maps.amax(dim=(1, 2)), maps


@register
class Padim(BackboneDetector):
    """PaDiM. Options: n_features (random channel subset size), regularization (added to each
    covariance's diagonal), sigma (map smoothing), runtime_precision (int8: an INT8 backbone
    calibrated on the training goods; see BackboneDetector)."""

    name = "padim"
    square_input = False  # fully convolutional; the statistics are per position of the (H, W) grid
    stochastic = True  # the random channel subset
    position_dependent = True  # one Gaussian per position
    defaults = {
        "layers": (1, 2, 3),
        "n_features": 100,
        "regularization": 0.01,
        "sigma": 4.0,
        "runtime_precision": "fp32",  # int8: INT8 backbone, calibrated on the training goods
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model: PadimModel | None = None

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        n = 0
        channel_idx = shift = total = outer = None
        pending: list[torch.Tensor] = []

        def flush() -> None:
            # One bmm over many images: thousands of (d x B) @ (B x d) products with a tiny B
            # are several times slower. Float32 on data shifted by the first batch's mean keeps
            # the E[xx'] - mm' subtraction accurate; sums accumulate in float64.
            x = torch.cat(pending, dim=1)  # (P, B, d)
            pending.clear()
            total.add_(x.sum(1, dtype=torch.float64))
            outer.add_(torch.bmm(x.transpose(1, 2), x).double())

        for batch in batches:
            feats = self.features(batch.pixels.to(self.device))
            if channel_idx is None:
                n_channels = sum(f.shape[1] for f in feats)
                gen = torch.Generator().manual_seed(self.options["seed"])
                k = min(self.options["n_features"], n_channels)
                channel_idx = torch.randperm(n_channels, generator=gen)[:k].sort().values.to(self.device)
            emb = concat_embedding(feats, channel_idx)
            b, d, h, w = emb.shape
            x = emb.reshape(b, d, h * w).permute(2, 0, 1)  # (P, B, d)
            if shift is None:
                shift = x.mean(1, keepdim=True)
                total = torch.zeros(h * w, d, dtype=torch.float64, device=self.device)
                outer = torch.zeros(h * w, d, d, dtype=torch.float64, device=self.device)
            pending.append((x - shift).contiguous())
            n += b
            if sum(p.shape[1] for p in pending) >= 64:
                flush()
        if pending:
            flush()
        if n < 2:
            raise ValueError("padim needs at least 2 training images to estimate covariances")
        mean_shifted = total / n
        cov = (outer - n * mean_shifted.unsqueeze(2) * mean_shifted.unsqueeze(1)) / (n - 1)
        mean = mean_shifted + shift[:, 0].double()
        cov += self.options["regularization"] * torch.eye(cov.shape[1], dtype=cov.dtype, device=cov.device)
        # Cholesky: covariances are symmetric positive definite, and batched linalg.inv is ~20x
        # slower on CPU for thousands of small matrices
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info.max()) > 0:
            raise ValueError(
                "padim: a covariance is not positive definite; raise the regularization option "
                f"(now {self.options['regularization']})"
            )
        inv_cov = torch.cholesky_inverse(chol)
        self._set_model(channel_idx, mean.float(), inv_cov.float())
        self.fit_info.update(grid=list(map(int, (h, w))), n_features=int(d))

    def _set_model(self, channel_idx: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> None:
        self.model = (
            PadimModel(channel_idx, mean, inv_cov, self.input_size, self.options["sigma"])
            .to(self.device)
            .eval()
        )

    @torch.inference_mode()
    def _score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.score_features(self.features(pixels.to(self.device)))

    def score_features(self, features: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and maps from backbone features (a multi-product model extracts them once)."""
        scores, maps = self.model(features)
        return scores.cpu().numpy(), maps.cpu().numpy()

    def inference_module(self) -> nn.Module:
        """Backbone + PadimModel on the CPU (a copy: the detector keeps its device)."""
        return copy.deepcopy(nn.Sequential(self.extractor, self.model)).cpu().eval()

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        m = self.model
        arrays = {
            "channel_idx": m.channel_idx.cpu().numpy(),
            "mean": m.mean.cpu().numpy(),
            "inv_cov": m.inv_cov.cpu().numpy(),
        }
        return arrays, self._backbone_state()

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        self._restore_backbone(meta)
        self._set_model(*(torch.from_numpy(arrays[k]) for k in ("channel_idx", "mean", "inv_cov")))
