"""UTRAD (Chen et al., "UTRAD: Anomaly detection and localization with U-Transformer",
Neural Networks 2022): a U-shaped transformer reconstructs the multi-scale features of a frozen
pretrained CNN; the feature reconstruction error is the anomaly map, its maximum the image score.

`UTransformer` is the paper's network: at each level the token grid is cut into S x S windows,
each window is encoded together with one extra token that becomes the window's single token at
the next, coarser level (patch merging); the window's own tokens pass a bottleneck into the skip
connection. Decoding climbs back: S x S learned queries attend to the coarser token plus the
skip tokens and become the finer level's window (patch expanding). `UtradModel` is the whole
inference graph, backbone included, so it exports to ONNX in one piece.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from anomalens.backbones import FeatureExtractor
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.trainable import BackboneTrainableDetector
from anomalens.models.training import Phase
from anomalens.registry import register


def _init_weights(module: nn.Module) -> None:
    # the reference implementation's N(0, 0.02) initialisation of every linear map
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Standardize(nn.BatchNorm2d):
    """Per-channel standardization with the training set's statistics (cumulative average, no
    affine). In eval mode it is written out as arithmetic: the ONNX exporter's batch norm needs a
    channel count that upsampled, concatenated backbone stages no longer carry in the trace."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return super().forward(x)
        return (x - self.running_mean.view(1, -1, 1, 1)) * torch.rsqrt(
            self.running_var.view(1, -1, 1, 1) + self.eps
        )


class CrossBlock(nn.Module):
    """Pre-norm transformer decoder block: self-attention of the queries, attention to the
    memory, MLP. Written out because timm has no cross-attention block and torch's
    TransformerDecoderLayer takes a fused fast path the ONNX exporter cannot read."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads, qkv_bias=True, proj_drop=dropout)
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_self(x))
        b, n, d = x.shape
        m = memory.shape[1]
        q = self.q(self.norm_q(x)).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(self.norm_kv(memory)).view(b, m, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.proj(attended))
        return x + self.mlp(self.norm_mlp(x))


def to_windows(x: torch.Tensor, s: int) -> torch.Tensor:
    """(B, H, W, D) token grid -> (B * H/s * W/s, s * s, D) windows, row-major inside each."""
    b, h, w, d = x.shape
    return x.view(b, h // s, s, w // s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(-1, s * s, d)


def from_windows(x: torch.Tensor, b: int, p: int, s: int) -> torch.Tensor:
    """Inverse of `to_windows` for a (B, p*s, p*s, D) grid."""
    d = x.shape[-1]
    return x.view(b, p, p, s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(b, p * s, p * s, d)


class UTransformer(nn.Module):
    """Reconstructs a (B, C, G, G) feature map; G must equal the product of `windows`."""

    def __init__(
        self,
        in_dim: int,
        windows: tuple[int, ...],
        dim: int = 128,
        heads: int = 4,
        depth: int = 2,
        mlp_ratio: float = 2.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.windows = tuple(windows)
        self.grid = math.prod(self.windows)
        # Lite0 stage outputs are unbounded linear projections (mean square ~50): a per-channel
        # standardization with the training set's statistics (cumulative average, no affine)
        # puts the reconstruction target on a unit scale, which the paper's ResNet ReLU
        # features did not need; it is part of the model and of its exported graph
        self.standardize = Standardize(in_dim)
        self.embed = nn.Conv2d(in_dim, dim, kernel_size=1)
        self.position = nn.Parameter(torch.zeros(1, self.grid, self.grid, dim))
        self.window_position = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, s * s, dim)) for s in self.windows]
        )
        self.merge_token = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, dim)) for _ in self.windows])
        self.queries = nn.ParameterList([nn.Parameter(torch.zeros(1, s * s, dim)) for s in self.windows])
        self.drop = nn.Dropout(dropout)
        self.encoders = nn.ModuleList(
            nn.Sequential(
                *[
                    Block(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=True, proj_drop=dropout)
                    for _ in range(depth)
                ],
                nn.LayerNorm(dim),
            )
            for _ in self.windows
        )
        # the authors' narrow bottleneck on every skip connection: it keeps the decoder from
        # copying the encoder's tokens through (an identity shortcut reconstructs defects too)
        self.bottlenecks = nn.ModuleList(
            nn.Sequential(
                nn.Linear(dim, dim // 4),
                nn.LayerNorm(dim // 4),
                nn.GELU(),
                nn.Linear(dim // 4, dim),
                nn.LayerNorm(dim),
            )
            for _ in self.windows
        )
        self.decoders = nn.ModuleList(
            nn.ModuleList(CrossBlock(dim, heads, mlp_ratio, dropout) for _ in range(depth))
            for _ in self.windows
        )
        self.decoder_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.windows)
        self.head = nn.Conv2d(dim, in_dim, kernel_size=1)
        self.apply(_init_weights)
        for p in [self.position, *self.window_position, *self.merge_token, *self.queries]:
            nn.init.normal_(p, 0.0, 0.02)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Reconstruction of already standardized features (B, C, G, G)."""
        b = features.shape[0]
        x = self.drop(self.embed(features).permute(0, 2, 3, 1) + self.position)  # (B, G, G, D)
        skips = []
        for s, pos, token, encoder, bottleneck in zip(
            self.windows, self.window_position, self.merge_token, self.encoders, self.bottlenecks
        ):
            p = x.shape[1] // s
            windows = to_windows(x, s) + pos
            out = encoder(torch.cat([token.expand(windows.shape[0], -1, -1), windows], dim=1))
            skips.append(bottleneck(out[:, 1:]))
            x = out[:, 0].reshape(b, p, p, -1)  # patch merging: one token per window
        for i in reversed(range(len(self.windows))):
            s, p = self.windows[i], x.shape[1]
            memory = torch.cat([x.reshape(-1, 1, x.shape[-1]), skips[i]], dim=1)
            y = self.queries[i].expand(memory.shape[0], -1, -1)
            for block in self.decoders[i]:
                y = block(y, memory)
            x = from_windows(self.decoder_norms[i](y), b, p, s)  # patch expanding: s x s tokens per window
        return self.head(x.permute(0, 3, 1, 2))


def multiscale_error(error: torch.Tensor, windows: tuple[int, ...]) -> torch.Tensor:
    """Mean of the (B, G, G) error averaged over patches of 1, S0, S0*S1, ... G cells (each
    level's patch size), as the reference implementation does: one noisy cell alone cannot make
    a defect, a defect spanning a patch raises that patch's average."""
    size = error.shape[-2:]
    e = error.unsqueeze(1)
    out = e
    patch = 1
    for s in windows:
        patch *= s
        pooled = F.avg_pool2d(e, patch, patch)
        out = out + F.interpolate(pooled, size=size, mode="bilinear", align_corners=False)
    return out[:, 0] / (len(windows) + 1)


def backbone_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """Backbone stages upsampled (nearest) to the first stage's grid and concatenated: PaDiM's
    `concat_embedding` without its random channel subset, whose index_select would hide the
    channel count from the ONNX exporter (the standardizing batch norm needs it)."""
    size = features[0].shape[-2:]
    return torch.cat(
        [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in features], dim=1
    )


class UtradModel(nn.Module):
    """Preprocessed pixels -> backbone -> U-Transformer -> (scores (B,), maps (B, S, S))."""

    def __init__(self, extractor: FeatureExtractor, net: UTransformer, image_size: int, sigma: float) -> None:
        super().__init__()
        self.extractor = extractor
        self.net = net
        # SmoothUpsample's (S, G) matrix as a buffer: its per-size cache is keyed by a traced
        # size during ONNX export and would put the float64 matrix construction in the graph
        self.register_buffer(
            "upsample", SmoothUpsample(image_size, sigma).matrix(net.grid, torch.device("cpu"))
        )

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Standardized backbone embedding (B, C, G, G): the reconstruction target."""
        with torch.no_grad():
            embedding = backbone_embedding(self.extractor(pixels))
        return self.net.standardize(embedding)

    def score_features(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        error = torch.linalg.vector_norm(self.net(embedding) - embedding, dim=1)  # (B, G, G)
        maps = self.upsample @ multiscale_error(error, self.net.windows) @ self.upsample.T
        return maps.amax(dim=(1, 2)), maps

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_features(self.embed(pixels))


@register
class Utrad(BackboneTrainableDetector):
    """UTRAD. Options: layers (backbone stages; deeper ones upsampled to the first stage's grid),
    windows (window side at each U level, finest first; their product must equal the feature
    grid, image_size / stride of the first layer), dim, heads, depth (transformer blocks per
    encoder and per decoder level), mlp_ratio, dropout, sigma (map smoothing), and the training
    options of every trainable detector.

    CPU defaults: the paper reconstructs a 64 x 64 grid of ResNet-18 stages 1-3 with 512-wide,
    4-block levels; here EfficientNet-Lite0 stages 2-3 on a 32 x 32 grid (256 px input), three
    levels of windows 4, 4, 2, width 128, 2 blocks, so that training fits the 20-minute budget.
    """

    name = "utrad"
    defaults = {
        "layers": (2, 3),
        "windows": (4, 4, 2),
        "dim": 128,
        "heads": 4,
        "depth": 2,
        "mlp_ratio": 2.0,
        "dropout": 0.1,
        "sigma": 4.0,
        "epochs": 10,
        "min_steps": 800,
        "lr": 2e-4,
        "max_minutes": 15.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o["dim"] % o["heads"] or o["dim"] % 4:
            raise ValueError(f"utrad: dim={o['dim']} must be a multiple of 4 and of heads={o['heads']}")
        self._model: UtradModel | None = None

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        stride = self.extractor.strides[0]
        grid = self.input_side // stride
        if grid * stride != self.input_side or math.prod(o["windows"]) != grid:
            raise ValueError(
                f"utrad: image_size {self.input_side} with layers {tuple(o['layers'])} gives a "
                f"{self.input_side / stride:g}-cell feature grid, but windows {tuple(o['windows'])} "
                f"multiply to {math.prod(o['windows'])}: choose windows whose product is the grid"
            )
        net = UTransformer(
            sum(self.extractor.channels),
            o["windows"],
            o["dim"],
            o["heads"],
            o["depth"],
            o["mlp_ratio"],
            o["dropout"],
        )
        return {"net": net}

    def _scorer(self) -> UtradModel:
        net = self.modules["net"]
        if self._model is None or self._model.net is not net:
            self._model = UtradModel(self.extractor, net, self.input_side, self.options["sigma"])
            self._model.to(self.device).eval()
        return self._model

    def _phases(self) -> list[Phase]:
        model = self._scorer()
        opt = torch.optim.Adam(model.net.parameters(), lr=self.options["lr"])

        def loss(x: torch.Tensor) -> torch.Tensor:
            embedding = model.embed(x)
            return F.mse_loss(model.net(embedding), embedding)

        return [self.loss_phase("train", loss, {"adam": opt})]
