"""U-Net: a supervised segmentation baseline for users with a few defect masks.

Unlike every goods-only method, it learns what a defect looks like from labelled defective images
and their pixel masks (`fit(goods, defects=..., defect_masks=...)`, `fit --labels SOURCE` or the
MVTec-layout `fit --train-defects K`), beside the training goods (all-zero masks): the comparison
VT-ADL's authors draw against supervised segmentation networks (U-Net, FCN, SegNet).

Encoder: the offline EfficientNet-Lite0 (stages at strides 2 to 32), its shallow stages frozen
and the deeper ones fine-tuned at a lower learning rate; decoder: a small U-Net of our own (each
level upsamples the deeper one, concatenates the encoder stage of its resolution and applies two
3x3 conv - group norm - ReLU), a 1x1 logit head at the shallowest stage's resolution, upsampled
bilinearly to the input. The loss is class-imbalance aware (focal + soft Dice by default); the
few defects are oversampled to `defect_share` of every epoch and flipped and shifted together with
their masks. Map: the per-pixel defect probability, mean-filtered over `smooth` pixels; image
score: the map's maximum. The threshold comes from held-out goods like every method's.
Choices and measured numbers: docs/unet.md.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from anomalens.backbones import FeatureExtractor
from anomalens.backbones.extractor import LITE_NAMES
from anomalens.data.inputs import Batch, InputItem
from anomalens.models.components.layers import conv_block
from anomalens.models.trainable import BackboneTrainableDetector, check_choice
from anomalens.models.training import Phase
from anomalens.registry import register

LOSSES = ("focal_dice", "bce", "dice")


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss over the whole batch: 1 - (2 sum(p y) + eps) / (sum(p) + sum(y) + eps).

    Pooled over the batch, not per image: a good image (empty mask) has no Dice of its own, and
    pooled it still pushes its probabilities down."""
    p = torch.sigmoid(logits.float())
    return 1 - (2 * (p * target).sum() + eps) / (p.sum() + target.sum() + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str, gamma: float) -> torch.Tensor:
    """`kind`: focal_dice (sigmoid focal loss, Lin et al. 2017, plus soft Dice), bce or dice."""
    logits, target = logits.float(), target.float()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, target)
    if kind == "dice":
        return dice_loss(logits, target)
    focal = sigmoid_focal_loss(logits, target, alpha=-1, gamma=gamma, reduction="mean")
    return focal + dice_loss(logits, target)


def joint_augment(
    x: torch.Tensor, y: torch.Tensor, flips: bool, max_shift: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random flips and shift (up to `max_shift` of each side, reflected at the border)
    for each image (B, C, H, W) and its mask (B, 1, H, W). Draws from the global torch RNG, which
    the engine re-seeds every epoch (a resumed run draws the same)."""
    both = torch.cat([x, y], dim=1)
    b, _, h, w = both.shape
    if flips:
        horizontal = (torch.rand(b) < 0.5).view(-1, 1, 1, 1).to(both.device)
        vertical = (torch.rand(b) < 0.5).view(-1, 1, 1, 1).to(both.device)
        both = torch.where(horizontal, both.flip(-1), both)
        both = torch.where(vertical, both.flip(-2), both)
    dy, dx = int(max_shift * h), int(max_shift * w)
    if dy or dx:
        padded = F.pad(both, (dx, dx, dy, dy), mode="reflect")
        oy = torch.randint(0, 2 * dy + 1, (b,))
        ox = torch.randint(0, 2 * dx + 1, (b,))
        both = torch.stack([padded[i, :, oy[i] : oy[i] + h, ox[i] : ox[i] + w] for i in range(b)])
    return both[:, : x.shape[1]], both[:, x.shape[1] :]


class Encoder(nn.Module):
    """The pretrained backbone's trunk: its first `frozen_stages` feature stages (and the stem)
    frozen, the rest trainable. Batch norm keeps the pretrained statistics (always in eval mode):
    batches of a few images, half of them defects, would only make them noisy."""

    def __init__(self, extractor: FeatureExtractor, frozen_stages: int) -> None:
        super().__init__()
        self.body = copy.deepcopy(extractor.body).requires_grad_(True)
        if frozen_stages:
            # parameters come in forward order: freeze up to the end of the last frozen stage's module
            last = extractor.body.feature_info.module_name()[frozen_stages - 1] + "."
            seen = False
            for name, param in self.body.named_parameters():
                inside = name.startswith(last)
                if seen and not inside:
                    break
                seen = seen or inside
                param.requires_grad_(False)

    def train(self, mode: bool = True) -> Encoder:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        return list(out.values()) if isinstance(out, dict) else list(out)


class Decoder(nn.Module):
    """Encoder stages (shallow to deep) -> one logit map at the shallowest stage's resolution.
    Each level: upsample the deeper level to the stage's size, concatenate the stage, conv_block."""

    def __init__(self, channels: list[int], width: int) -> None:
        super().__init__()
        widths = [width * 2**i for i in range(len(channels) - 1)]
        deeper = [channels[-1], *widths[:0:-1]]  # what each level (deep to shallow) upsamples
        self.levels = nn.ModuleList(
            conv_block(d + c, w) for d, c, w in zip(deeper, channels[-2::-1], widths[::-1])
        )
        self.head = nn.Conv2d(widths[0] if widths else channels[0], 1, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = feats[-1]
        for level, skip in zip(self.levels, feats[-2::-1]):
            y = F.interpolate(y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = level(torch.cat([y, skip], dim=1))
        return self.head(y)


class UnetModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, H, W)): the defect probability, mean-filtered, and its maximum."""

    def __init__(self, encoder: Encoder, decoder: Decoder, smooth: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.smooth = smooth

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) defect logits at the input's size."""
        out = self.decoder(self.encoder(x))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = torch.sigmoid(self.logits(x).float())
        k = self.smooth
        if k > 1:
            maps = F.avg_pool2d(maps, k, stride=1, padding=k // 2, count_include_pad=False)
        maps = maps[:, 0]
        return maps.amax(dim=(1, 2)), maps


@register
class Unet(BackboneTrainableDetector):
    """Supervised U-Net on the offline EfficientNet-Lite encoder; needs labelled defects with masks.

    Options: layers (encoder stages the decoder sees), frozen_stages (the first stages kept at their
    pretrained weights; len(layers) freezes the whole encoder), encoder_lr (the fine-tuned stages'
    learning rate, a fraction of lr), decoder_width (channels of the shallowest decoder level,
    doubling per level), loss (focal_dice, bce or dice), focal_gamma, defect_share (share of every
    epoch that is labelled defects, oversampled), shift (the largest random shift of the joint
    augmentation, a fraction of the side; augment_flips allows flips), smooth (mean filter of the
    map, odd pixels), epochs, min_steps, lr, max_minutes. validation_fraction and patience do not
    apply: choosing a best epoch would need held-out defects, and the few there are all train.
    """

    name = "unet"
    uses_defects = "required"
    needs_defect_masks = True
    defaults = {
        "layers": (0, 1, 2, 3, 4),
        "frozen_stages": 3,
        "encoder_lr": 0.1,
        "decoder_width": 16,
        "loss": "focal_dice",
        "focal_gamma": 2.0,
        "defect_share": 0.5,
        "shift": 0.1,
        "smooth": 5,
        "epochs": 10,
        "min_steps": 800,
        "lr": 1e-3,
        "max_minutes": 12.0,
        "validation_fraction": 0.0,
    }
    option_bounds = {
        "frozen_stages": (0, 8),
        "encoder_lr": (0.0, 10.0),
        "decoder_width": (1, 256),
        "focal_gamma": (0.0, 10.0),
        "defect_share": (0.0, 1.0),
        "shift": (0.0, 0.5),
        "smooth": (1, 63),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_choice(self.name, "loss", o["loss"], LOSSES)
        if o["backbone"] not in LITE_NAMES:
            raise ValueError(
                f"unet: option backbone={o['backbone']!r}; its encoder is one of {', '.join(LITE_NAMES)}"
            )
        if not 0 <= o["frozen_stages"] <= len(o["layers"]):
            raise ValueError(
                f"unet: option frozen_stages={o['frozen_stages']} must be 0 to {len(o['layers'])} (the layers)"
            )
        if not 0 < o["defect_share"] < 1:
            raise ValueError(f"unet: option defect_share must be in (0, 1), got {o['defect_share']}")
        if not 0 <= o["shift"] < 0.5:
            raise ValueError(f"unet: option shift must be in [0, 0.5), got {o['shift']}")
        if o["smooth"] < 1 or o["smooth"] % 2 == 0:
            raise ValueError(f"unet: option smooth must be an odd number >= 1, got {o['smooth']}")
        if o["augment"]:
            raise ValueError(
                "unet: option augment does not apply: it flips and shifts each image with its mask "
                "itself (options shift, augment_flips)"
            )
        self._pixels = self._masks = None  # the fit's cached canvases and masks

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        encoder = Encoder(self.extractor, o["frozen_stages"])
        return {"encoder": encoder, "decoder": Decoder(self.extractor.channels, o["decoder_width"])}

    def _scorer(self) -> UnetModel:
        return UnetModel(self.modules["encoder"], self.modules["decoder"], self.options["smooth"])

    def _hold_out_validation(self, items: list[InputItem]) -> list[InputItem]:
        self.fit_info["n_validation"] = 0  # see the class docstring: every good trains
        return items

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        # half precision in memory: the 8-bit images lose nothing, and 764 goods at 256 px fit in 0.3 GB
        goods = torch.cat([b.pixels.half() for b in batches])
        d_pixels, d_masks = self.labelled_defects()
        d_pixels, d_masks = d_pixels.half(), d_masks > 0.5
        self._pixels = torch.cat([goods, d_pixels])
        self._masks = torch.cat([torch.zeros(len(goods), *d_masks.shape[1:], dtype=torch.bool), d_masks])
        # the engine shuffles indices into that cache: every good once per epoch, each defect
        # repeated so that defects make up defect_share of the epoch
        share = self.options["defect_share"]
        repeats = max(1, round(share / (1 - share) * len(goods) / len(d_pixels)))
        order = torch.cat(
            [torch.arange(len(goods)), torch.arange(len(goods), len(self._pixels)).repeat(repeats)]
        )
        self.fit_info.update(
            n_defect_canvases=len(d_pixels),
            defect_repeats=repeats,
            defect_pixel_share=round(float(d_masks.float().mean()), 5),
        )
        try:
            self._train(order, None)
        finally:
            self._pixels = self._masks = None

    def _phases(self) -> list[Phase]:
        o = self.options
        model = self._scorer()
        trained = [p for p in model.encoder.parameters() if p.requires_grad]
        groups = [{"params": list(model.decoder.parameters()), "lr": o["lr"]}]
        if trained and o["encoder_lr"] > 0:
            groups.append({"params": trained, "lr": o["lr"] * o["encoder_lr"]})
        else:
            for p in trained:
                p.requires_grad_(False)
        opt = torch.optim.Adam(groups)

        def step(index: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            x = self._pixels[index.cpu()].float().to(self.device)
            y = self._masks[index.cpu()].float().unsqueeze(1).to(self.device)
            x, y = joint_augment(x, y, o["augment_flips"], o["shift"])
            with ctx.autocast():
                loss = segmentation_loss(model.logits(x), y, o["loss"], o["focal_gamma"])
            ctx.update(loss, opt)
            return {"loss": loss.detach()}

        return [self.phase("train", step, {"adam": opt})]
