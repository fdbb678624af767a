"""Capsule network for imbalanced supervised anomaly detection (Piciarelli, Mishra, Foresti, "Image
anomaly detection with capsule networks and imbalanced datasets", ICIAP 2019), on Sabour, Frosst
and Hinton's CapsNet ("Dynamic routing between capsules", NeurIPS 2017).

Trained on the goods and the few labelled defects: a stem (by default the frozen offline
EfficientNet-Lite0 up to its stride-8 stage, `stem=lite0`; or a small convolutional stem trained
from scratch, `stem=conv`, for grayscale input), primary capsules (a
convolution whose channels are grouped into `primary_dim`-vectors, squashed), routing by agreement
(`components.capsules`, `routing_iterations` iterations) to two class capsules, normal and
anomalous. The image score is the anomalous capsule's length (in [0, 1)). The map is each
primary-capsule position's share of the anomalous capsule: the projection of its coupled votes
c_i,anom u_anom|i on the capsule's direction (these sum to the capsule's length before the squash),
upsampled and smoothed.

Imbalance: every training batch is `batch_size` goods plus `defects_per_batch` labelled defects,
drawn so each defect is used as often as the others (`balanced_draw`) and augmented like the goods
(the `augment` option, on both classes so the augmentation is no cue); the loss averages each class
apart (`class_balanced_mean`), so the few defects weigh as much as the many goods.

Losses (`loss`): Sabour's margin loss (m+ 0.9, m- 0.1, lambda 0.5, default), or the
Wilcoxon-Mann-Whitney ranking loss on the anomalous length (`wmw`), or its full-recall form on the
`full_recall_k` lowest-scoring defects of each batch (`wmw_full_recall`; `components.ranking`).
Papers, choices and deviations: docs/capsnet.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.data.inputs import Batch, Preprocess
from anomalens.models.components.capsules import route_by_agreement, squash
from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.components.ranking import wmw_loss
from anomalens.models.feature_base import BackboneDetector
from anomalens.models.trainable import BackboneTrainableDetector, TrainableDetector, check_choice
from anomalens.models.training import Phase, augment_batch, parse_augment
from anomalens.registry import register

LOSSES = ("margin", "wmw", "wmw_full_recall")
STEMS = ("conv", "lite0")
NORMAL, ANOMALOUS = 0, 1


def balanced_draw(n: int, k: int) -> torch.Tensor:
    """k indices into n labelled defects, each used as often as any other (counts differ by at most
    one): whole random permutations, the last one cut short. From the global torch RNG, which the
    engine re-seeds every epoch."""
    perms = [torch.randperm(n) for _ in range(math.ceil(k / n))]
    return torch.cat(perms)[:k]


def class_balanced_mean(per_sample: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean of each class's mean: the goods and the defects weigh alike whatever their counts."""
    means = [per_sample[labels == c].mean() for c in (NORMAL, ANOMALOUS) if bool((labels == c).any())]
    return torch.stack(means).mean()


def margin_loss(
    lengths: torch.Tensor, labels: torch.Tensor, m_plus: float, m_minus: float, down_weight: float
) -> torch.Tensor:
    """Sabour et al.'s margin loss per image, (B,): the true class capsule longer than m_plus, the
    other shorter than m_minus (down-weighted by lambda)."""
    target = F.one_hot(labels.long(), 2).to(lengths.dtype)
    present = target * F.relu(m_plus - lengths) ** 2
    absent = down_weight * (1 - target) * F.relu(lengths - m_minus) ** 2
    return (present + absent).sum(dim=1)


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    # group norm: the same in training and inference; batch norm's statistics would mix the
    # batches' oversampled defects into what the goods look like
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, 2, 1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1),
        nn.GroupNorm(min(8, c_out), c_out),
        nn.ReLU(inplace=True),
    )


class CapsuleNet(nn.Module):
    """Pixels -> the two class capsules, their coupling and votes.

    Stem: `depth` stages (stride 2), widths doubling from `width` up to 4x. Primary capsules: a
    stride-2 convolution to `types` x `primary_dim` channels, i.e. `types` capsules at every
    position of a (S / 2^(depth+1))^2 grid. Class capsules: votes u_j|i = W_ij u_i, one transform per
    capsule type shared over the grid (`shared`: a defect is a defect wherever it lies, and a few
    labelled defects cannot teach one transform per position) or one per capsule as in Sabour et al.
    The votes are scaled by 1/sqrt(N) (N input capsules), a fixed reparametrization of W that keeps
    the first steps from saturating the squash, then routed by agreement.
    """

    def __init__(
        self,
        channels: int,
        width: int,
        depth: int,
        types: int,
        primary_dim: int,
        class_dim: int,
        iterations: int,
        grid: int,
        shared: bool,
        stem: nn.Module | None = None,
        stem_channels: int = 0,
    ) -> None:
        super().__init__()
        widths = [width * min(2**i, 4) for i in range(depth)]
        if stem is None:
            stem = nn.Sequential(*(_stage(a, b) for a, b in zip([channels, *widths[:-1]], widths)))
            stem_channels = widths[-1]
        self.stem = stem
        self.primary = nn.Conv2d(stem_channels, types * primary_dim, 3, 2, 1)
        self.types, self.primary_dim, self.class_dim, self.iterations = (
            types,
            primary_dim,
            class_dim,
            iterations,
        )
        self.grid, self.shared = grid, shared
        n_transforms = types if shared else types * grid * grid
        self.transforms = nn.Parameter(
            torch.randn(n_transforms, 2 * class_dim, primary_dim) / math.sqrt(primary_dim)
        )
        self.vote_scale = 1 / math.sqrt(types * grid * grid)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(class capsules v (B, 2, D), coupling c (B, N, 2), votes u_hat (B, N, 2, D)); the N input
        capsules run over the grid's rows, columns, then types."""
        p = self.primary(self.stem(x))
        h, w = p.shape[-2:]
        t, pd, d = self.types, self.primary_dim, self.class_dim
        u = squash(p.reshape(-1, t, pd, h, w).permute(0, 3, 4, 1, 2), dim=-1)  # (B, h, w, T, P)
        weights = self.transforms if self.shared else self.transforms.reshape(h, w, t, 2 * d, pd)
        u_hat = (weights @ u.unsqueeze(-1)).reshape(-1, h * w * t, 2, d) * self.vote_scale
        v, c = route_by_agreement(u_hat, self.iterations)
        return v, c, u_hat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The class capsules' lengths (B, 2): normal, anomalous."""
        return self.route(x)[0].norm(dim=-1)


class BackboneStem(nn.Module):
    """The frozen pretrained backbone's deepest requested stage as the stem (stem=lite0)."""

    def __init__(self, extractor: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)[-1]


class CapsnetScorer(nn.Module):
    """Pixels -> (anomalous capsule length (B,), map (B, S, S)): each grid position's share of the
    anomalous capsule, sum over its capsule types of c_i,anom u_anom|i . v_anom / |v_anom|,
    upsampled and smoothed to the input."""

    def __init__(self, net: CapsuleNet, image_size: int, sigma: float) -> None:
        super().__init__()
        self.net = net
        self.smooth = SmoothUpsample(image_size, sigma)

    def shares(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(anomalous capsule length (B,), each grid position's share (B, g, g)); the shares sum to
        the capsule's length before the squash, |s| = sqrt(length / (1 - length))."""
        v, c, u_hat = self.net.route(x)
        anomalous = v[:, ANOMALOUS]
        length = anomalous.norm(dim=-1)
        direction = anomalous / (length.unsqueeze(-1) + 1e-8)
        share = c[:, :, ANOMALOUS] * (u_hat[:, :, ANOMALOUS] * direction.unsqueeze(1)).sum(dim=-1)  # (B, N)
        g = self.net.grid
        return length, share.reshape(-1, g, g, self.net.types).sum(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length, shares = self.shares(x)
        return length, self.smooth(shares)


@register
class Capsnet(BackboneTrainableDetector):
    """Capsule network trained on goods and labelled defects. Options: stem (lite0: the frozen
    pretrained backbone's stage `layers`; conv: trained from scratch, with channels (1 = grayscale),
    width and depth), primary_types and primary_dim (primary capsules per
    position and their size), class_dim (size of the two class capsules), routing_iterations,
    shared_transforms, loss (margin, wmw, wmw_full_recall), m_plus, m_minus, down_weight (margin
    loss), wmw_gamma, wmw_power, full_recall_k (WMW losses), defects_per_batch (labelled defects
    added to every batch of goods), sigma (map smoothing), and the engine's options (augment
    applies to the defects as well)."""

    name = "capsnet"
    uses_defects = "required"
    defaults = {
        "stem": "lite0",
        "layers": (2,),
        "channels": 1,
        "image_size": 128,
        "batch_size": 16,
        "width": 16,
        "depth": 3,
        "primary_types": 16,
        "primary_dim": 8,
        "class_dim": 16,
        "routing_iterations": 3,
        "shared_transforms": True,
        "loss": "margin",
        "m_plus": 0.9,
        "m_minus": 0.1,
        "down_weight": 0.5,
        "wmw_gamma": 0.3,
        "wmw_power": 2.0,
        "full_recall_k": 2,
        "wmw_weight": 1.0,
        "defects_per_batch": 8,
        "sigma": 4.0,
        "augment": "flip,rotate",
        "epochs": 30,
        "min_steps": 1000,
        "lr": 1e-3,
        "max_minutes": 15.0,
    }
    option_bounds = {
        "width": (1, 1024),
        "depth": (1, 8),
        "primary_types": (1, 1024),
        "primary_dim": (1, 256),
        "class_dim": (1, 256),
        "routing_iterations": (1, 20),
        "m_plus": (0.0, 1.0),
        "m_minus": (0.0, 1.0),
        "down_weight": (0.0, 100.0),
        "wmw_gamma": (0.0, 1.0),
        "wmw_power": (1.0, 8.0),
        "full_recall_k": (1, 4096),
        "wmw_weight": (0.0, 1000.0),
        "defects_per_batch": (1, 4096),
        "sigma": (0.0, 64.0),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_choice(self.name, "loss", o["loss"], LOSSES)
        check_choice(self.name, "stem", o["stem"], STEMS)
        if o["stem"] == "lite0" and (o["backbone"] != "efficientnet_lite0" or len(o["layers"]) != 1):
            raise ValueError(
                f"{self.name}: stem=lite0 takes one stage (layers) of backbone=efficientnet_lite0"
            )
        for key in ("width", "depth", "primary_types", "primary_dim", "class_dim", "routing_iterations"):
            if o[key] < 1:
                raise ValueError(f"{self.name}: option {key} must be >= 1, got {o[key]}")
        for key in ("defects_per_batch", "full_recall_k"):
            if o[key] < 1:
                raise ValueError(f"{self.name}: option {key} must be >= 1, got {o[key]}")
        if not 0 <= o["m_minus"] < o["m_plus"] <= 1:
            raise ValueError(
                f"{self.name}: need 0 <= m_minus < m_plus <= 1, got {o['m_minus']}, {o['m_plus']}"
            )
        # Lite0's stage l has stride 2^(l+1); the primary capsules halve it once more
        step = 2 ** (o["layers"][-1] + 2) if o["stem"] == "lite0" else 2 ** (o["depth"] + 1)
        if self.input_side % step:
            raise ValueError(f"{self.name}: image_size {self.input_side} must be a multiple of {step}")
        self._defect_pixels: torch.Tensor | None = None  # the labelled defects, during a fit only

    @property
    def backbone_stem(self) -> bool:
        return self.options["stem"] == "lite0"

    @property
    def grid(self) -> int:
        stride = self.extractor.strides[-1] if self.backbone_stem else 2 ** self.options["depth"]
        return self.input_side // (2 * stride)

    # the conv stem needs no backbone: plain trainable-detector input, state and restore
    def _preprocess(self) -> Preprocess:
        if self.backbone_stem:
            return BackboneDetector._preprocess(self)
        return TrainableDetector._preprocess(self)

    def _state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        return super()._state() if self.backbone_stem else TrainableDetector._state(self)

    def _restore(self, arrays: dict[str, Any], meta: dict[str, Any]) -> None:
        if self.backbone_stem:
            super()._restore(arrays, meta)
        else:
            TrainableDetector._restore(self, arrays, meta)

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        return {
            "net": CapsuleNet(
                o["channels"],
                o["width"],
                o["depth"],
                o["primary_types"],
                o["primary_dim"],
                o["class_dim"],
                o["routing_iterations"],
                self.grid,
                bool(o["shared_transforms"]),
                *((BackboneStem(self.extractor), self.extractor.channels[-1]) if self.backbone_stem else ()),
            )
        }

    def _scorer(self) -> CapsnetScorer:
        return CapsnetScorer(self.modules["net"], self.input_side, self.options["sigma"])

    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        # a few dozen labelled defects: kept as tensors for the fit, dropped after it
        self._defect_pixels, _ = self.labelled_defects()
        try:
            super()._fit_batches(batches, n_images)
        finally:
            self._defect_pixels = None

    def objective(self, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch's class-capsule lengths (B, 2) and labels (B,), 1 = defect."""
        o = self.options
        per_image = margin_loss(lengths, labels, o["m_plus"], o["m_minus"], o["down_weight"])
        loss = class_balanced_mean(per_image, labels)
        if o["loss"] == "margin":
            return loss
        # the ranking rides on the margin loss: alone it is blind to where the lengths lie, and on
        # the synthetic set it either drove every length into the squash's flat end (loss stuck at
        # gamma^2) or ranked the training defects only (see docs/capsnet.md)
        hardest = o["full_recall_k"] if o["loss"] == "wmw_full_recall" else None
        rank = wmw_loss(
            lengths[:, ANOMALOUS], labels, gamma=o["wmw_gamma"], power=o["wmw_power"], hardest=hardest
        )
        return loss + o["wmw_weight"] * rank

    def _phases(self) -> list[Phase]:
        o = self.options
        net = self.modules["net"]
        opt = torch.optim.Adam(net.parameters(), lr=o["lr"])
        kinds = parse_augment(o["augment"])
        defects = self._defect_pixels.to(self.device)

        def loss_of(goods: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
            labels = torch.cat([torch.zeros(len(goods)), torch.ones(len(bad))]).to(goods.device)
            return self.objective(net(torch.cat([goods, bad])), labels)

        def step(x: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            bad = defects[balanced_draw(len(defects), o["defects_per_batch"]).to(defects.device)]
            if kinds:
                bad = augment_batch(bad, kinds)  # the goods got the same from the engine
            with ctx.autocast():
                loss = loss_of(x, bad)
            ctx.update(loss, opt)
            return {"loss": loss.detach()}

        # held-out goods beside every labelled defect (too few to hold any out): the best epoch is
        # the one that keeps the unseen goods down while still separating the defects
        return [self.phase("train", step, {"adam": opt}, val_loss=lambda x: loss_of(x, defects))]
