"""DRAEM (Zavrtanik et al., "DRAEM - A discriminatively trained reconstruction embedding for
surface anomaly detection", ICCV 2021).

Training images get synthetic defects: a thresholded Perlin-noise mask filled with a texture
blended into the image (`anomalens.data.defects`, DRAEM's recipe), on half of the images. A
reconstructive sub-network (an encoder-decoder without skips) learns to restore the clean image
(L2 + SSIM loss); a discriminative sub-network (a U-Net on the defect image concatenated with its
reconstruction) learns to segment the defect (focal loss, gamma 2). The anomaly map is the
segmentation's probability, the image score the maximum of its mean-filtered map (paper).

Deviations from the paper (a CPU default that trains in minutes; see docs/learners.md):

- 128 px instead of 256, sub-networks 16 wide instead of 128 (reconstructive) and 64
  (discriminative); epochs bounded by `max_minutes` instead of 700 epochs, constant learning rate.
- Textures: DTD is not available offline; the mask is filled with generated Perlin-noise texture
  (default), or with another good image of the batch, flipped and rescaled in intensity
  (textures="source" or "source,noise"). On the synthetic test texture, source textures (the same
  texture as the goods) taught the segmentation nothing useful; noise did.
- The segmentation head has one logit (sigmoid focal loss) instead of two softmax channels: the
  same two-class model with half the output weights.
- The mean filter of the image score is `score_window` pixels (11 at 128 px: the paper's 21 at 256).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from anomalens.data.defects import DefectSynthesizer
from anomalens.models.components.layers import conv_block, group_norm
from anomalens.models.components.reconstruction import reconstruction_loss
from anomalens.models.trainable import TrainableDetector
from anomalens.models.training import Phase
from anomalens.registry import register


def _up(c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
        nn.Conv2d(c, c, 3, padding=1),
        group_norm(c),
        nn.ReLU(inplace=True),
    )


def level_widths(width: int, depth: int) -> list[int]:
    """Channels of each level: doubling up to 8x width, then constant (DRAEM's 1, 2, 4, 8, 8, 8)."""
    return [width * min(2**i, 8) for i in range(depth + 1)]


class UNet(nn.Module):
    """`depth` max-pool levels; with `skips` each decoder level also sees its encoder level
    (the discriminative sub-network), without them it is a plain encoder-decoder (the
    reconstructive one, which must not copy the defect through). Group norm, not the paper's batch
    norm: batch norm's running statistics, over batches half synthetic defects and far from converged
    in a CPU budget, turned the segmentation's ranking upside down on unseen images."""

    def __init__(self, c_in: int, c_out: int, width: int, depth: int, skips: bool) -> None:
        super().__init__()
        widths = level_widths(width, depth)
        self.skips = skips
        self.down = nn.ModuleList([conv_block(c_in, widths[0])])
        self.down.extend(conv_block(widths[i], widths[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(_up(widths[i + 1]) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(
            conv_block(widths[i + 1] + (widths[i] if skips else 0), widths[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(widths[0], c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [self.down[0](x)]
        for block in self.down[1:]:
            feats.append(block(F.max_pool2d(feats[-1], 2)))
        y = feats.pop()
        for up, dec in zip(self.ups, self.dec):
            y = up(y)
            skip = feats.pop()
            y = dec(torch.cat([y, skip], dim=1) if self.skips else y)
        return self.out(y)


class DraemModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)): reconstruct, segment, mean-filtered maximum."""

    def __init__(self, reconstructive: nn.Module, discriminative: nn.Module, score_window: int) -> None:
        super().__init__()
        self.reconstructive = reconstructive
        self.discriminative = discriminative
        self.score_window = score_window

    def segment(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, segmentation logits (B, 1, S, S))."""
        recon = self.reconstructive(x)
        return recon, self.discriminative(torch.cat([x, recon], dim=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, logits = self.segment(x)
        maps = torch.sigmoid(logits.float())
        k = self.score_window
        smoothed = F.avg_pool2d(maps, k, stride=1, padding=k // 2) if k > 1 else maps
        return smoothed.amax(dim=(1, 2, 3)), maps[:, 0]


def synthetic_batch(
    x: torch.Tensor, seeds: list[int | None], textures: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """DRAEM's training input: image i gets a Perlin defect from `DefectSynthesizer(seed=seeds[i])`
    whose texture source is the next image of the batch, or stays good where seeds[i] is None.
    x: (B, C, H, W) in [-1, 1]; returns the images and their masks (B, 1, H, W), 1 = defect."""
    unit = ((x.detach().float().cpu() + 1) / 2).permute(0, 2, 3, 1).contiguous().numpy()
    out = unit.copy()
    masks = np.zeros((len(x), 1, *x.shape[-2:]), np.float32)
    for i, seed in enumerate(seeds):
        if seed is None:
            continue
        synth = DefectSynthesizer(kinds=("perlin",), seed=seed, textures=textures)
        source = unit[(i + 1) % len(x)] if len(x) > 1 else None
        out[i], mask = synth.make(unit[i], source)
        masks[i, 0] = mask
    masks_t = torch.from_numpy(masks).to(x.device)
    images = (torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1).to(x.device, x.dtype)
    # outside the mask the input itself: the unit-range round trip would move it by float rounding
    return torch.where(masks_t.bool(), images, x.detach()), masks_t


@register
class Draem(TrainableDetector):
    """DRAEM. Options: channels, recon_width and seg_width (sub-network widths; paper 128 and 64),
    depth (pooling levels of both), anomaly_ratio (share of training images given a defect, paper
    0.5), textures ("source", "noise" or "source,noise": what fills a defect), focal_gamma (2),
    score_window (mean filter of the image score), lr, epochs, max_minutes."""

    name = "draem"
    defaults = {
        "channels": 3,
        "recon_width": 16,
        "seg_width": 16,
        "depth": 4,
        "anomaly_ratio": 0.5,
        "textures": "noise",
        "focal_gamma": 2.0,
        "score_window": 11,
        "epochs": 100,
        "min_steps": 1500,
        "lr": 5e-4,
        "max_minutes": 12.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if self.input_side % 2 ** o["depth"]:
            raise ValueError(
                f"draem: image_size {self.input_side} must be a multiple of 2**depth = {2 ** o['depth']}"
            )
        if not 0 <= o["anomaly_ratio"] <= 1:
            raise ValueError(f"draem: option anomaly_ratio must be in [0, 1], got {o['anomaly_ratio']}")
        if o["score_window"] < 1 or o["score_window"] % 2 == 0:
            raise ValueError(
                f"draem: option score_window must be an odd number >= 1, got {o['score_window']}"
            )
        DefectSynthesizer(kinds=("perlin",), textures=self.textures)  # validates textures now

    @property
    def textures(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.options["textures"].split(",") if t.strip())

    def _build_modules(self) -> dict[str, nn.Module]:
        o, c = self.options, self.options["channels"]
        return {
            "reconstructive": UNet(c, c, o["recon_width"], o["depth"], skips=False),
            "discriminative": UNet(2 * c, 1, o["seg_width"], o["depth"], skips=True),
        }

    def _scorer(self) -> DraemModel:
        m = self.modules
        return DraemModel(m["reconstructive"], m["discriminative"], self.options["score_window"])

    def draw_seeds(self, n: int) -> list[int | None]:
        """Per image: a synthesizer seed, or None (kept good), from the global torch RNG that the
        engine re-seeds every epoch (a resumed run draws the same defects)."""
        defect = torch.rand(n) < self.options["anomaly_ratio"]
        seeds = torch.randint(2**31 - 1, (n,))
        return [int(s) if d else None for s, d in zip(seeds, defect)]

    def _phases(self) -> list[Phase]:
        o = self.options
        model = self._scorer()
        opt = torch.optim.Adam(model.parameters(), lr=o["lr"])

        def losses(x: torch.Tensor) -> dict[str, torch.Tensor]:
            images, masks = synthetic_batch(x, self.draw_seeds(len(x)), self.textures)
            recon, logits = model.segment(images)
            loss_recon = reconstruction_loss(x, recon, "l2+ssim")
            loss_focal = sigmoid_focal_loss(
                logits.float(), masks, alpha=-1, gamma=o["focal_gamma"], reduction="mean"
            )
            return {"loss": loss_recon + loss_focal, "loss_recon": loss_recon, "loss_focal": loss_focal}

        def step(x: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            with ctx.autocast():
                out = losses(x)
            ctx.update(out["loss"], opt)
            return {k: v.detach() for k, v in out.items()}

        return [self.phase("train", step, {"adam": opt}, val_loss=lambda x: losses(x)["loss"])]
