"""VT-ADL (Mishra et al., "VT-ADL: A Vision Transformer Network for Image Anomaly Detection and
Localization", ISIE 2021).

A ViT encoder turns the image's patches into embeddings; a convolutional decoder reconstructs
the image from them (global anomaly: reconstruction error), and a Gaussian mixture density
network models the distribution of the encoded patches (localization: each patch's negative
log-likelihood). Training minimises, with the reference code's weights, 5 * MSE + 0.5 * (1 - SSIM)
+ the mean patch negative log-likelihood; the image score is the image's reconstruction error
(5 * MSE + 0.5 * (1 - SSIM)), the map each patch's negative log-likelihood, upsampled and
Gaussian-smoothed.

Deviations: the capsule layer of the reference code between encoder and decoder is left out;
the likelihood is per embedding dimension (nats / dim, so the loss weights do not depend on the
width); the encoder ends in a LayerNorm without affine and the mixture reads a bottleneck of the
embedding, because the mixture is conditioned on the very embedding it scores: without these
the encoder could shrink its embeddings, or the mixture copy them, and make every patch likely.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_msssim import SSIM
from timm.models.vision_transformer import Block
from torch import nn

from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.trainable import TrainableDetector, check_choice
from anomalens.models.training import Phase
from anomalens.registry import register


class MixtureDensity(nn.Module):
    """Gaussian mixture density network: z (..., D) -> K mixture weights, means and diagonal
    variances, predicted from a `hidden`-wide bottleneck of z.

    As in the reference code the log-variances pass a softplus (variances >= 1). The bottleneck
    is ours: with the reference's linear heads on z itself the means can learn the identity map,
    and every embedding, anomalous or not, is then likely.
    """

    def __init__(self, dim: int, n_gaussians: int, hidden: int) -> None:
        super().__init__()
        self.k = n_gaussians
        self.hidden = nn.Sequential(nn.Linear(dim, hidden), nn.GELU())
        self.logits = nn.Linear(hidden, n_gaussians)
        self.mu = nn.Linear(hidden, n_gaussians * dim)
        self.logvar = nn.Linear(hidden, n_gaussians * dim)

    def nll(self, z: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each embedding under its mixture, per dimension: (...,)."""
        h = self.hidden(z)
        shape = (*z.shape[:-1], self.k, z.shape[-1])
        mu = self.mu(h).view(shape)
        logvar = F.softplus(self.logvar(h)).view(shape)
        log_normal = -0.5 * ((z.unsqueeze(-2) - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))
        log_mix = torch.log_softmax(self.logits(h), dim=-1) + log_normal.sum(-1)
        # logsumexp written out (as torch computes it): OpenVINO's ONNX reader takes the exported
        # ReduceLogSumExp for a reduction over every axis and cannot convert the graph
        peak = log_mix.amax(dim=-1, keepdim=True)
        lse = peak.squeeze(-1) + torch.log(torch.exp(log_mix - peak).sum(dim=-1))
        return -lse / z.shape[-1]


def deconv_decoder(dim: int, channels: int, patch_size: int) -> nn.Sequential:
    """Encoded patch grid (B, D, g, g) -> image (B, C, g*p, g*p): log2(p) transposed convolutions
    that each double the size and halve the width (at least 16), then a 3 x 3 convolution."""
    layers: list[nn.Module] = []
    width = dim
    for _ in range(int(math.log2(patch_size))):
        out = max(16, width // 2)
        layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        width = out
    layers.append(nn.Conv2d(width, channels, 3, padding=1))
    return nn.Sequential(*layers)


class VTADLNet(nn.Module):
    """ViT encoder over patches, reconstruction decoder and mixture density network."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        channels: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        n_gaussians: int,
        mdn_hidden: int,
    ) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.channels = channels
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, stride=patch_size)  # linear patch projection
        self.position = nn.Parameter(torch.randn(1, self.grid * self.grid, dim) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Sequential(
            *[Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout) for _ in range(depth)],
            # no affine: the encoder cannot shrink its embeddings to make
            # them likely, the decoder's batch norms would undo the scale
            nn.LayerNorm(dim, elementwise_affine=False),
        )
        self.decoder = deconv_decoder(dim, channels, patch_size)
        self.mdn = MixtureDensity(dim, n_gaussians, mdn_hidden)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) -> encoded patches (B, N, D), row-major."""
        tokens = self.patch_embed(pixels).flatten(2).transpose(1, 2)
        return self.encoder(self.drop(tokens + self.position))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded patches (B, N, D), reconstruction (B, C, S, S))."""
        z = self.encode(pixels)
        grid = z.transpose(1, 2).reshape(z.shape[0], z.shape[2], self.grid, self.grid)
        return z, self.decoder(grid)


def reconstruction_error(
    pixels: torch.Tensor, recon: torch.Tensor, ssim: SSIM, mse_weight: float, ssim_weight: float
) -> torch.Tensor:
    """Per image: mse_weight * MSE + ssim_weight * (1 - SSIM), on pixels normalized to [-1, 1]."""
    mse = (recon - pixels).pow(2).mean(dim=(1, 2, 3))
    return mse_weight * mse + ssim_weight * (1 - ssim(recon, pixels))


class VtadlModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)); also the training loss."""

    def __init__(
        self,
        net: VTADLNet,
        image_size: int,
        sigma: float,
        mse_weight: float,
        ssim_weight: float,
        nll_weight: float,
    ) -> None:
        super().__init__()
        self.net = net
        self.weights = (mse_weight, ssim_weight, nll_weight)
        # SmoothUpsample's matrix as a buffer: its per-size cache is keyed by a traced size during
        # ONNX export and would put the float64 matrix construction in the graph
        self.register_buffer(
            "upsample", SmoothUpsample(image_size, sigma).matrix(net.grid, torch.device("cpu"))
        )
        # the module form of SSIM builds its Gaussian window once: the functional form builds it
        # from the input's shape, a convolution kernel of unknown shape for the ONNX exporter
        self.ssim = SSIM(data_range=2.0, size_average=False, channel=net.channels)
        self.score = "reconstruction"  # or "map": the likelihood map's maximum

    def terms(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted reconstruction error (B,), patch negative log-likelihoods (B, g, g))."""
        z, recon = self.net(pixels)
        nll = self.net.mdn.nll(z).view(-1, self.net.grid, self.net.grid)
        return reconstruction_error(pixels, recon, self.ssim, *self.weights[:2]), nll

    def loss(self, pixels: torch.Tensor) -> torch.Tensor:
        recon, nll = self.terms(pixels)
        return recon.mean() + self.weights[2] * nll.mean()

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon, nll = self.terms(pixels)
        maps = self.upsample @ nll @ self.upsample.T
        return (maps.amax(dim=(1, 2)) if self.score == "map" else recon), maps


@register
class Vtadl(TrainableDetector):
    """VT-ADL. Options: patch_size (power of two dividing image_size), dim, depth, heads,
    mlp_ratio, dropout (ViT encoder), n_gaussians and mdn_hidden (mixture density network),
    mse_weight, ssim_weight (loss and image score), nll_weight (loss), sigma (map smoothing), score
    ("reconstruction": the paper's reconstruction error; "map": the likelihood map's maximum), channels,
    and the training options of every trainable detector.

    CPU defaults: the paper encodes 512 px images in 64 px patches (an 8 x 8 map) with a 512-wide,
    6-block ViT; here 128 px images in 8 px patches (a 16 x 16 map) with a 128-wide, 4-block ViT:
    the full-resolution decoder and SSIM cost most of a training step, so the image is smaller.
    """

    name = "vtadl"
    map_max_setting = "score=map"
    defaults = {
        "image_size": 128,
        "batch_size": 8,
        "channels": 3,
        "patch_size": 8,
        "dim": 128,
        "depth": 4,
        "heads": 4,
        "mlp_ratio": 2.0,
        "dropout": 0.0,
        "n_gaussians": 10,
        "mdn_hidden": 32,
        "mse_weight": 5.0,
        "ssim_weight": 0.5,
        "nll_weight": 1.0,
        "sigma": 4.0,
        "score": "reconstruction",
        "epochs": 30,
        "min_steps": 2500,
        "lr": 5e-4,
        "weight_decay": 1e-4,
        "max_minutes": 15.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        p = o["patch_size"]
        if p < 2 or p & (p - 1) or self.input_side % p:
            raise ValueError(
                f"vtadl: patch_size={p} must be a power of two dividing image_size={self.input_side}"
            )
        if o["dim"] % o["heads"]:
            raise ValueError(f"vtadl: dim={o['dim']} must be a multiple of heads={o['heads']}")
        check_choice(self.name, "score", o["score"], ("reconstruction", "map"))
        if o["channels"] not in (1, 3):
            raise ValueError(f"vtadl: channels={o['channels']} must be 1 or 3")
        self._model: VtadlModel | None = None

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        return {
            "net": VTADLNet(
                self.input_side,
                o["patch_size"],
                o["channels"],
                o["dim"],
                o["depth"],
                o["heads"],
                o["mlp_ratio"],
                o["dropout"],
                o["n_gaussians"],
                o["mdn_hidden"],
            )
        }

    def _scorer(self) -> VtadlModel:
        net = self.modules["net"]
        if self._model is None or self._model.net is not net:
            o = self.options
            self._model = (
                VtadlModel(
                    net, self.input_side, o["sigma"], o["mse_weight"], o["ssim_weight"], o["nll_weight"]
                )
                .to(self.device)
                .eval()
            )
        self._model.score = self.options["score"]
        return self._model

    def _phases(self) -> list[Phase]:
        model = self._scorer()
        # the reference implementation's Adam with weight decay 1e-4; its lr is 1e-4, the default
        # here 5e-4 because a CPU budget allows about a tenth of its training steps
        opt = torch.optim.Adam(
            model.net.parameters(), lr=self.options["lr"], weight_decay=self.options["weight_decay"]
        )

        return [self.loss_phase("train", model.loss, {"adam": opt})]
