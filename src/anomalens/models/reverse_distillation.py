"""Reverse distillation (Deng and Li, "Anomaly Detection via Reverse Distillation from One-Class
Embedding", CVPR 2022; RD4AD).

A frozen pretrained encoder (teacher) gives three feature scales; the one-class bottleneck
embedding (OCBE) fuses them (multi-scale feature fusion: the shallower scales brought down to
the deepest by strided 3x3 convolutions, concatenated) and compresses them with a strided
residual stage (one-class embedding) into a low-resolution code; a student decoder mirroring
the encoder (residual stages upsampling by transposed convolutions) reconstructs the three
scales from that code. Trained on goods with 1 - cosine similarity of the flattened feature
maps; the anomaly map is the per-position cosine distance of each scale upsampled to the
image, summed, and Gaussian smoothed (sigma 4); the image score is the map's maximum.

Deviations from the paper: the encoder is the offline EfficientNet-Lite0 (stages 1-3, 24/40/112
channels at strides 4/8/16) instead of WideResNet-50, so the bottleneck and decoder have
EfficientNet-Lite0's widths (bottleneck 2 x 112 channels at stride 32, as the paper's is twice
its deepest encoder width). EfficientNet stage outputs are linear (no ReLU after the projection),
so each decoder stage ends without the ReLU of the paper's ResNet blocks, letting it reproduce
negative features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import FeatureExtractor
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.trainable import BackboneTrainableDetector
from anomalens.models.training import Phase
from anomalens.registry import register


def _conv_bn(c_in: int, c_out: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """ResNet basic block; `scale` 2 halves the resolution (strided conv), 0.5 doubles it
    (2x2 transposed conv, the paper's decoder block); `final_relu` False keeps the output linear."""

    def __init__(self, c_in: int, c_out: int, scale: float = 1, final_relu: bool = True) -> None:
        super().__init__()
        if scale == 0.5:
            first: nn.Module = nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False)
            shortcut: nn.Module | None = nn.Sequential(
                nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False), nn.BatchNorm2d(c_out)
            )
        else:
            stride = int(scale)
            first = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            shortcut = (
                None
                if stride == 1 and c_in == c_out
                else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            )
        self.body = nn.Sequential(
            first,
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.shortcut = shortcut
        self.final_relu = final_relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out) if self.final_relu else out


class OneClassBottleneck(nn.Module):
    """OCBE: multi-scale feature fusion then a strided residual stage (one-class embedding)."""

    def __init__(self, channels: tuple[int, int, int], blocks: int = 2) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.fuse1 = nn.Sequential(_conv_bn(c1, c2, 2), _conv_bn(c2, c3, 2))
        self.fuse2 = _conv_bn(c2, c3, 2)
        self.embed = nn.Sequential(
            ResidualBlock(3 * c3, 2 * c3, scale=2),
            *(ResidualBlock(2 * c3, 2 * c3) for _ in range(blocks - 1)),
        )

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.embed(torch.cat([self.fuse1(feats[0]), self.fuse2(feats[1]), feats[2]], dim=1))


class StudentDecoder(nn.Module):
    """Mirror of the encoder: stride 32 code -> the three encoder scales, shallow to deep order."""

    def __init__(self, channels: tuple[int, int, int], blocks: int = 2) -> None:
        super().__init__()
        c1, c2, c3 = channels

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                ResidualBlock(c_in, c_out, scale=0.5, final_relu=blocks > 1),
                *(ResidualBlock(c_out, c_out, final_relu=i < blocks - 2) for i in range(blocks - 1)),
            )

        self.stages = nn.ModuleList([stage(2 * c3, c3), stage(c3, c2), stage(c2, c1)])

    def forward(self, code: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for stage in self.stages:
            code = stage(code)
            outs.append(code)
        return outs[::-1]


def cosine_distance_loss(encoded: list[torch.Tensor], decoded: list[torch.Tensor]) -> torch.Tensor:
    """Paper's eq. 2: sum over scales of 1 - cosine similarity of the flattened maps, batch mean."""
    return sum(
        (1 - F.cosine_similarity(e.flatten(1), d.flatten(1), dim=1)).mean() for e, d in zip(encoded, decoded)
    )


class ReverseDistillationModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)) for RD4AD."""

    def __init__(
        self,
        encoder: FeatureExtractor,
        bottleneck: OneClassBottleneck,
        decoder: StudentDecoder,
        image_size: int,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.bottleneck = bottleneck
        self.decoder = decoder
        self.upsample = SmoothUpsample(image_size, sigma)

    def encode_decode(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            encoded = self.encoder(pixels)
        return encoded, self.decoder(self.bottleneck(encoded))

    def loss(self, pixels: torch.Tensor) -> torch.Tensor:
        return cosine_distance_loss(*self.encode_decode(pixels))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, decoded = self.encode_decode(pixels)
        # upsampling and blurring are linear: blurring each upsampled scale then summing is the
        # paper's sum-then-blur
        maps = sum(self.upsample(1 - F.cosine_similarity(e, d, dim=1)) for e, d in zip(encoded, decoded))
        return maps.amax(dim=(1, 2)), maps


@register
class ReverseDistillation(BackboneTrainableDetector):
    """RD4AD. Options: layers (three encoder stages), blocks (residual blocks per bottleneck and
    decoder stage; 2 as in the paper's ResNet-18 decoder), sigma (map smoothing), and the paper's
    Adam (lr 0.005, betas 0.5/0.999). The paper trains 200 epochs at batch 16; the CPU default
    is far shorter (`epochs`, `max_minutes`)."""

    name = "reverse_distillation"
    defaults = {
        "layers": (1, 2, 3),
        "blocks": 2,
        "sigma": 4.0,
        "epochs": 10,
        "min_steps": 400,
        "batch_size": 16,
        "lr": 0.005,
        "max_minutes": 15.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        if len(self.options["layers"]) != 3:
            raise ValueError(
                f"{self.name}: layers must name three encoder stages, got {self.options['layers']}"
            )

    def _build_modules(self) -> dict[str, nn.Module]:
        channels = tuple(self.extractor.channels)
        return {
            "bottleneck": OneClassBottleneck(channels, self.options["blocks"]),
            "decoder": StudentDecoder(channels, self.options["blocks"]),
        }

    def _scorer(self) -> ReverseDistillationModel:
        return ReverseDistillationModel(
            self.extractor,
            self.modules["bottleneck"],
            self.modules["decoder"],
            self.input_side,
            self.options["sigma"],
        )

    def _phases(self) -> list[Phase]:
        model = self._scorer()
        params = [*model.bottleneck.parameters(), *model.decoder.parameters()]
        opt = torch.optim.Adam(params, lr=self.options["lr"], betas=(0.5, 0.999))

        return [self.loss_phase("train", model.loss, {"adam": opt})]
