"""Pyramidal reconstruction shared by `pyramid_ae` and `piade` (Mishra, Piciarelli, Foresti 2020):
one convolutional encoder per level of an image pyramid, their codes on one common grid, a
bottleneck (a 1x1 convolution, or PIADE's dynamic routing), a decoder back to the full image, and
the perceptual residual against a frozen pretrained backbone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.models.components.capsules import route_by_agreement
from anomalens.models.components.features import normalized_sq_distance
from anomalens.models.components.layers import SmoothUpsample


def _block(conv: nn.Module, channels: int) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(channels), nn.LeakyReLU(0.2))


def check_pyramid(image_size: int, levels: int, depth: int) -> None:
    """One-line errors for pyramids that do not fit the image."""
    if levels < 1 or depth < levels:
        raise ValueError(f"pyramid: need 1 <= levels <= depth, got levels {levels}, depth {depth}")
    if image_size % 2**depth:
        raise ValueError(f"pyramid: image_size {image_size} must be a multiple of 2**depth = {2**depth}")


class PyramidEncoder(nn.Module):
    """(B, C, S, S) -> L codes (B, code, S/2^depth, S/2^depth), one per pyramid level.

    Level l sees the image average-pooled by 2^l and has its own stride-2 convolutions (depth - l
    of them, widths doubling from `width`), so every level lands on the same grid.
    """

    def __init__(self, channels: int, levels: int, depth: int, width: int, code: int) -> None:
        super().__init__()
        self.levels = levels
        branches = []
        for level in range(levels):
            layers: list[nn.Module] = []
            c_in = channels
            for i in range(depth - level):
                c = width * 2 ** min(i + level, 3)
                layers.append(_block(nn.Conv2d(c_in, c, 4, 2, 1), c))
                c_in = c
            layers.append(_block(nn.Conv2d(c_in, code, 1), code))
            branches.append(nn.Sequential(*layers))
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        codes = []
        for level, branch in enumerate(self.branches):
            xl = x if level == 0 else F.avg_pool2d(x, 2**level)
            codes.append(branch(xl))
        return codes


class DynamicRouting(nn.Module):
    """Routing by agreement (Sabour et al. 2017) from the L pyramid codes to K latent capsules,
    at every position of the grid: the input capsules are the levels' code vectors u_i, their
    predictions u_j|i = W_ij u_i (a 1x1 convolution per level), the coupling coefficients
    c_ij = softmax_j(b_ij) (each level's coefficients sum to one over the latent capsules), the
    outputs v_j = squash(sum_i c_ij u_j|i), and b_ij grows by the agreement u_j|i . v_j over a
    fixed number of iterations (`components.capsules.route_by_agreement`: a static graph)."""

    def __init__(self, levels: int, code: int, capsules: int, capsule_dim: int, iterations: int) -> None:
        super().__init__()
        self.levels, self.capsules, self.capsule_dim, self.iterations = (
            levels,
            capsules,
            capsule_dim,
            iterations,
        )
        self.predict = nn.ModuleList(nn.Conv2d(code, capsules * capsule_dim, 1) for _ in range(levels))

    @property
    def out_channels(self) -> int:
        return self.capsules * self.capsule_dim

    def route(self, codes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(v (B, K*D, h, w), coupling coefficients c (B, L, K, h, w))."""
        b, _, h, w = codes[0].shape
        k, d = self.capsules, self.capsule_dim
        # (B, L, K, D, h, w)
        u_hat = torch.stack([p(c).reshape(b, k, d, h, w) for p, c in zip(self.predict, codes)], dim=1)
        v, c = route_by_agreement(u_hat, self.iterations)  # (B, K, D, h, w), (B, L, K, h, w)
        return v.reshape(b, k * d, h, w), c

    def forward(self, codes: list[torch.Tensor]) -> torch.Tensor:
        return self.route(codes)[0]


class ConcatBottleneck(nn.Module):
    """The deep pyramidal autoencoder's aggregation: the levels' codes concatenated, a 1x1 conv to
    `latent` channels (linear)."""

    def __init__(self, levels: int, code: int, latent: int) -> None:
        super().__init__()
        self.out_channels = latent
        self.mix = nn.Conv2d(levels * code, latent, 1)

    def forward(self, codes: list[torch.Tensor]) -> torch.Tensor:
        return self.mix(torch.cat(codes, dim=1))


class PyramidDecoder(nn.Module):
    """(B, latent, g, g) -> (B, C, g * 2^depth, ...): stride-2 transposed convs, widths halving, linear output."""

    def __init__(self, channels: int, depth: int, width: int, latent: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = latent
        for i in reversed(range(depth)):
            c = width * 2 ** min(i, 3)
            layers.append(_block(nn.ConvTranspose2d(c_in, c, 4, 2, 1), c))
            c_in = c
        layers.append(nn.Conv2d(c_in, channels, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PyramidAutoencoder(nn.Module):
    """Pyramid encoder, bottleneck (concatenation or dynamic routing), decoder."""

    def __init__(self, encoder: PyramidEncoder, bottleneck: nn.Module, decoder: PyramidDecoder) -> None:
        super().__init__()
        self.encoder, self.bottleneck, self.decoder = encoder, bottleneck, decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.bottleneck(self.encoder(x)))


class PerceptualResidual(nn.Module):
    """Image and reconstruction -> per-pixel squared error (mean over channels) and per-feature
    residual of the frozen backbone (LPIPS-style: channel-normalized squared distance per
    position, summed over the layers), both (B, h, w) at their own resolution."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pixel = ((x - recon) ** 2).mean(dim=1)
        with torch.no_grad():
            fx = self.backbone(x)
        features = [normalized_sq_distance(a, b) for a, b in zip(fx, self.backbone(recon))]
        return pixel, features

    @staticmethod
    def loss(pixel: torch.Tensor, features: list[torch.Tensor], weight: float) -> torch.Tensor:
        """Per image: mean pixel error + weight * sum over layers of the mean feature residual, (B,)."""
        return pixel.mean(dim=(1, 2)) + weight * sum(f.mean(dim=(1, 2)) for f in features)


class PyramidScorer(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)). The map is the pixel residual plus `weight` times
    the feature residuals upsampled (bilinear) to the image, Gaussian-smoothed; the score is the
    image's similarity loss (`loss`, the papers' score) or the map's maximum (`max`)."""

    def __init__(
        self,
        ae: PyramidAutoencoder,
        residual: PerceptualResidual,
        image_size: int,
        weight: float,
        sigma: float,
        score: str,
    ) -> None:
        super().__init__()
        self.ae, self.residual = ae, residual
        self.image_size, self.weight, self.score = image_size, weight, score
        self.smooth = SmoothUpsample(image_size, sigma) if sigma > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pixel, features = self.residual(x, self.ae(x))
        size = (self.image_size, self.image_size)
        maps = pixel
        for f in features:
            up = F.interpolate(f.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
            maps = maps + self.weight * up
        if self.score == "loss":
            scores = PerceptualResidual.loss(pixel, features, self.weight)
        if self.smooth is not None:
            maps = self.smooth(maps)
        if self.score == "max":
            scores = maps.amax(dim=(1, 2))
        return scores, maps
