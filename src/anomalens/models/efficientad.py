"""EfficientAD, small variant (Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at
Millisecond-Level Latencies", WACV 2024).

Three networks on 256 px images: a patch description network (PDN-S) teacher distilled from a
pretrained backbone and then frozen; a student PDN with twice the output channels, whose first
half imitates the teacher (local anomalies) and whose second half imitates an autoencoder
(logical anomalies: the autoencoder reproduces the teacher from a 1x1 global code). Training
follows the paper's Algorithm 1: teacher outputs standardized per channel over the training
goods, the hard-feature loss (mean of the 0.1 % largest student-teacher squared differences),
a penalty keeping the student's output near zero on images unlike the goods, the autoencoder
trained on colour-jittered goods, the student's second half trained on the autoencoder's
output; Adam (lr 1e-4, weight decay 1e-5) with a 10x learning-rate drop at 95 % of the steps.
Both maps are normalized with quantiles of validation goods' maps (q_a = 0.9 -> 0, q_b = 0.995 ->
0.1), averaged, padded by 4 and upsampled to the image; the image score is the map's maximum.

Deviations (offline, CPU budget; see docs/distillation.md):

- Teacher pretraining. The paper distils PDN-S from WideResNet-101 features on ImageNet (60k
  steps). Here the teacher is distilled from the offline EfficientNet-Lite0 (stages 2 and 3 at
  twice the resolution, 3x3 locally aware patch features as in PatchCore, standardized per
  channel) on random crops of the training goods and synthetic textures, for `distill_steps`
  steps. Lite0's 152 channels are fewer than the paper's 384, so the teacher, autoencoder and
  student halves are 152 wide (out_channels is capped at the backbone's channel count); a wider
  backbone is average-pooled over channel groups to out_channels like the reference. The distilled
  teacher is cached under $ANOMALENS_CACHE/efficientad (default ~/.cache/anomalens/efficientad),
  keyed by backbone weights, image size, crop, steps, seed and the training images, so the next
  fit on the same data reuses it.
- Penalty images. ImageNet is unavailable offline: the penalty uses synthetic multi-octave
  colour noise textures drawn fresh every step.
- Autoencoder sizes. The paper's decoder upsampling sizes are those of 256 px images; here they
  scale with `image_size` (identical at 256), so small test images work too.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from anomalens.data.inputs import Batch, iter_batches
from anomalens.models.base import ModelFileError
from anomalens.models.components.features import locally_aware_embedding
from anomalens.models.trainable import BackboneTrainableDetector
from anomalens.models.training import Phase, TrainConfig, Trainer
from anomalens.registry import register

#: the map padding of the reference code: PDN-S without padding loses 4 output cells per side
MAP_PAD = 4


def pdn_small(out_channels: int, padding: bool = False) -> nn.Sequential:
    """PDN-S (paper's Table 6). With padding the output is image_size / 4 (teacher pretraining);
    without, image_size / 4 - 8 (training and inference); the weights are the same."""
    p = 1 if padding else 0
    return nn.Sequential(
        nn.Conv2d(3, 128, 4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(128, 256, 4, padding=3 * p),
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2, 2, padding=p),
        nn.Conv2d(256, 256, 3, padding=p),
        nn.ReLU(inplace=True),
        nn.Conv2d(256, out_channels, 4),
    )


def pdn_output_size(image_size: int) -> int:
    return image_size // 4 - 2 * MAP_PAD


class EfficientAdAutoencoder(nn.Module):
    """The paper's autoencoder (Table 7): six strided convolutions to a 1x1 code, then bilinear
    upsampling and convolutions back to the student's output grid."""

    def __init__(self, image_size: int, out_channels: int) -> None:
        super().__init__()
        if image_size % 32 or image_size < 64:
            raise ValueError(
                f"efficientad: image_size must be a multiple of 32 and at least 64, got {image_size}"
            )
        s = image_size
        enc: list[nn.Module] = []
        for c_in, c_out in ((3, 32), (32, 32), (32, 64), (64, 64), (64, 64)):
            enc += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*enc, nn.Conv2d(64, 64, s // 32))  # s/32 x s/32 -> 1 x 1 (8 at 256 px)
        dec: list[nn.Module] = []
        # 3, 8, 15, 32, 63, 127 at 256 px; each 4x4 convolution with padding 2 adds one cell
        for size in (s // 64 - 1, s // 32, s // 16 - 1, s // 8, s // 4 - 1, s // 2 - 1):
            dec += [
                nn.Upsample(size=max(1, size), mode="bilinear"),
                nn.Conv2d(64, 64, 4, padding=2),
                nn.ReLU(inplace=True),
                nn.Dropout(0.2),
            ]
        self.decoder = nn.Sequential(
            *dec,
            nn.Upsample(size=pdn_output_size(s), mode="bilinear"),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, out_channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class MapNormalization(nn.Module):
    """Fitted constants: the teacher's per-channel mean/std and the maps' quantiles (q_a, q_b)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("teacher_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, channels, 1, 1))
        # (q_a, q_b) of the student-teacher and autoencoder-student maps; identity until fitted
        self.register_buffer("st_quantiles", torch.tensor([0.0, 0.1]))
        self.register_buffer("ae_quantiles", torch.tensor([0.0, 0.1]))


def hard_feature_loss(distance: torch.Tensor, quantile: float = 0.999) -> torch.Tensor:
    """Mean of the squared differences at or above their `quantile` (paper's L_hard, p_hard = 0.999).

    topk instead of torch.quantile, which refuses tensors over 16M elements (batches > 13 at 256 px).
    """
    flat = distance.flatten()
    # values at or above the quantile's (linearly interpolated) position among the sorted values
    k = flat.numel() - math.ceil(quantile * (flat.numel() - 1))
    return flat.topk(k).values.mean()


def penalty_textures(n: int, size: int, device: torch.device) -> torch.Tensor:
    """Offline stand-in for the paper's ImageNet penalty images: random multi-octave colour noise,
    30 % grey, in [-1, 1] (the backbone's normalization). Uses the global RNG (seeded by the trainer)."""
    image = torch.zeros(n, 3, size, size, device=device)
    for octave in (4, 16, 64):
        noise = torch.randn(n, 3, octave, octave, device=device)
        image += torch.rand(n, 1, 1, 1, device=device) * F.interpolate(
            noise, size=(size, size), mode="bicubic", align_corners=False
        )
    grey = torch.rand(n, 1, 1, 1, device=device) < 0.3
    image = torch.where(grey, image.mean(1, keepdim=True).expand_as(image), image)
    lo = image.amin(dim=(1, 2, 3), keepdim=True)
    hi = image.amax(dim=(1, 2, 3), keepdim=True)
    return (image - lo) / (hi - lo + 1e-6) * 2 - 1


def colour_jitter(x: torch.Tensor) -> torch.Tensor:
    """The paper's autoencoder augmentation: one of brightness, contrast or saturation, factor in
    [0.8, 1.2], per image, on [-1, 1] pixels."""
    img = (x + 1) / 2
    b = x.shape[0]
    factor = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, device=x.device)
    kind = torch.randint(3, (b, 1, 1, 1), device=x.device)
    grey = (img * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    brightness = img * factor
    contrast = (img - grey.mean(dim=(2, 3), keepdim=True)) * factor + grey.mean(dim=(2, 3), keepdim=True)
    saturation = (img - grey) * factor + grey
    out = torch.where(kind == 0, brightness, torch.where(kind == 1, contrast, saturation))
    return out.clamp(0, 1) * 2 - 1


class EfficientAdModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)): normalized student-teacher and autoencoder maps."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        autoencoder: EfficientAdAutoencoder,
        norm: MapNormalization,
        image_size: int,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.autoencoder = autoencoder
        self.norm = norm
        self.image_size = image_size

    def teacher_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.teacher(pixels) - self.norm.teacher_mean) / self.norm.teacher_std

    def raw_maps(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unnormalized (B, h, w) student-teacher and autoencoder-student maps."""
        t = self.teacher_features(pixels)
        s = self.student(pixels)
        c = t.shape[1]
        return (t - s[:, :c]).pow(2).mean(1), (self.autoencoder(pixels) - s[:, c:]).pow(2).mean(1)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        map_st, map_ae = self.raw_maps(pixels)
        q_st, q_ae = self.norm.st_quantiles, self.norm.ae_quantiles
        map_st = 0.1 * (map_st - q_st[0]) / (q_st[1] - q_st[0])
        map_ae = 0.1 * (map_ae - q_ae[0]) / (q_ae[1] - q_ae[0])
        combined = F.pad(0.5 * map_st + 0.5 * map_ae, (MAP_PAD,) * 4).unsqueeze(1)
        maps = F.interpolate(
            combined, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
        )[:, 0]
        return maps.amax(dim=(1, 2)), maps


def aggregate_channels(features: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, D, h, w) -> (B, channels, h, w), each output the average of a group of consecutive input
    channels: the reference code's adaptive average pooling (WideResNet-101's 1536 channels to 384,
    groups of 4). D < channels is refused: pooling would copy channels, not aggregate them."""
    b, d, h, w = features.shape
    if d < channels:
        raise ValueError(f"efficientad: cannot aggregate {d} backbone channels to {channels}")
    flat = F.adaptive_avg_pool1d(features.permute(0, 2, 3, 1).reshape(-1, 1, d), channels)
    return flat.reshape(b, h, w, channels).permute(0, 3, 1, 2)


def _cache_dir() -> Path:
    return Path(os.environ.get("ANOMALENS_CACHE") or Path.home() / ".cache" / "anomalens") / "efficientad"


@register
class EfficientAd(BackboneTrainableDetector):
    """EfficientAD-S. Options: epochs and max_minutes (student/autoencoder training; the paper runs
    70k steps at batch 1), lr and weight_decay (paper: 1e-4, 1e-5), out_channels (the teacher's
    width, 384, at most the backbone's channel count: see `teacher_channels`),
    layers (backbone stages the teacher is distilled from), distill_steps, distill_batch_size and
    distill_crop (teacher pretraining, cached), norm_images (goods used for the teacher's channel
    statistics)."""

    name = "efficientad"
    defaults = {
        "layers": (2, 3),
        "out_channels": 384,
        "epochs": 2,
        "min_steps": 1300,
        "batch_size": 1,
        "lr": 1e-4,
        "weight_decay": 1e-5,
        "max_minutes": 8.0,
        "distill_steps": 150,
        "distill_batch_size": 8,
        "distill_crop": 128,
        "norm_images": 64,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        EfficientAdAutoencoder(self.input_side, 1)  # validates image_size now, not after reading images
        self._teacher_init: tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor] | None = None

    # -- modules -----------------------------------------------------------------------------
    @property
    def teacher_channels(self) -> int:
        """Width of the teacher, the autoencoder and each student half: out_channels, capped at the
        backbone's channel count. The paper pools WideResNet-101's 1536 channels to 384; a narrower
        backbone (Lite0: 152) cannot fill 384 without copying channels, and copies only weight some
        features twice in every loss and map. A learned projection (e.g. PCA) to the full width is a
        rotation that adds no information either, so the teacher keeps the backbone's width."""
        return min(self.options["out_channels"], sum(self.extractor.channels))

    def _build_modules(self) -> dict[str, nn.Module]:
        c, s = self.teacher_channels, self.input_side
        teacher, norm = pdn_small(c), MapNormalization(c)
        if self._teacher_init is not None:  # fitting: the distilled teacher and its statistics
            state, mean, std = self._teacher_init
            teacher.load_state_dict(state)
            norm.teacher_mean.copy_(mean)
            norm.teacher_std.copy_(std)
        return {
            "teacher": teacher.requires_grad_(False),
            "student": pdn_small(2 * c),
            "autoencoder": EfficientAdAutoencoder(s, c),
            "norm": norm,
        }

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        # model files from before the teacher_channels cap hold a 384-wide teacher distilled from
        # copied channels: one line saying so instead of load_state_dict's size-mismatch traceback.
        # The backbone's checksum first, so that building the extractor here still checks it.
        self._restore_backbone(meta)
        saved = arrays["norm/teacher_mean"].shape[1]
        if saved != self.teacher_channels:
            raise ModelFileError(
                f"efficientad: the model file's teacher has {saved} channels, but out_channels="
                f"{self.options['out_channels']} on {self.options['backbone']} (layers "
                f"{tuple(self.options['layers'])}) now gives {self.teacher_channels}: the teacher is at "
                "most as wide as the backbone's channels since the distillation stopped copying them; "
                "refit the model"
            )
        super()._restore(arrays, meta)

    def _scorer(self) -> EfficientAdModel:
        m = self.modules
        return EfficientAdModel(m["teacher"], m["student"], m["autoencoder"], m["norm"], self.input_side)

    # -- training ----------------------------------------------------------------------------
    def _fit_batches(self, batches: Iterable[Batch], n_images: int) -> None:
        train = torch.cat([b.pixels for b in batches])
        # the padded PDN's weights in the unpadded PDN used from here on, as in the reference code
        teacher = pdn_small(self.teacher_channels).to(self.device)
        teacher.load_state_dict(self._distilled_teacher(train).state_dict())
        mean, std = self._teacher_statistics(teacher.eval(), train[: self.options["norm_images"]])
        self._teacher_init = (teacher.state_dict(), mean, std)
        # distilling draws random numbers, loading the cached teacher does not: the same student and
        # autoencoder initialisation either way
        torch.manual_seed(self.options["seed"])
        try:
            super()._fit_batches([Batch([], [], train)], n_images)
        finally:
            self._teacher_init = None
        # the paper takes the quantiles on validation goods; without them, on training goods
        self._fit_quantiles(self._validation_pixels() or list(train[: self.options["norm_images"]].split(8)))

    def _phases(self) -> list[Phase]:
        o = self.options
        model = self._scorer()
        params = [*model.student.parameters(), *model.autoencoder.parameters()]
        opt = torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"])
        total = self.phase_epochs(o["epochs"]) * self.steps_per_epoch
        # the paper's StepLR: learning rate x 0.1 after 95 % of the steps
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, int(0.95 * total)), gamma=0.1)
        c = self.teacher_channels

        def losses(
            x: torch.Tensor, penalty: torch.Tensor | None, jitter: bool = True
        ) -> dict[str, torch.Tensor]:
            t = model.teacher_features(x)
            loss_st = hard_feature_loss((t - model.student(x)[:, :c]).pow(2))
            if penalty is not None:
                loss_st = loss_st + model.student(penalty)[:, :c].pow(2).mean()
            x_ae = colour_jitter(x) if jitter else x
            ae = model.autoencoder(x_ae)
            loss_ae = (model.teacher_features(x_ae) - ae).pow(2).mean()
            loss_stae = (ae - model.student(x_ae)[:, c:]).pow(2).mean()
            return {
                "loss": loss_st + loss_ae + loss_stae,
                "loss_st": loss_st,
                "loss_ae": loss_ae,
                "loss_stae": loss_stae,
            }

        def step(x: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            with ctx.autocast():
                out = losses(x, penalty_textures(x.shape[0], x.shape[-1], x.device))
            ctx.update(out["loss"], opt)
            scheduler.step()
            return {k: v.detach() for k, v in out.items()}

        return [
            self.phase(
                "train",
                step,
                {"adam": opt},
                val_loss=lambda x: losses(x, None, jitter=False)["loss"],
                train_modules=("student", "autoencoder"),
            )
        ]

    def _validation_pixels(self) -> list[torch.Tensor]:
        return [
            b.pixels
            for b in iter_batches(self._validation_items, self.preprocess(), self.options["batch_size"])
        ]

    @torch.no_grad()
    def _fit_quantiles(self, pixel_batches: list[torch.Tensor]) -> None:
        """q_a = 0.9 and q_b = 0.995 quantiles of the goods' raw maps (paper's map normalization)."""
        model = self._scorer().eval()
        st, ae = zip(*(model.raw_maps(p.to(self.device)) for p in pixel_batches))
        norm = self.modules["norm"]
        for maps, buffer in ((st, norm.st_quantiles), (ae, norm.ae_quantiles)):
            values = torch.cat([m.flatten() for m in maps]).float().cpu().numpy()
            buffer.copy_(torch.from_numpy(np.quantile(values, [0.9, 0.995]).astype(np.float32)))

    @torch.no_grad()
    def _teacher_statistics(
        self, teacher: nn.Module, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std of the teacher's outputs over (a subset of) the goods."""
        outs = torch.cat([teacher(pixels[i : i + 8].to(self.device)) for i in range(0, len(pixels), 8)])
        return outs.mean(dim=(0, 2, 3), keepdim=True), outs.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    # -- teacher pretraining ---------------------------------------------------------------------
    def _teacher_cache_path(self, train: torch.Tensor) -> Path:
        o = self.options
        _ = self.extractor  # computes the backbone checksum
        data = hashlib.sha256(train.contiguous().numpy()).hexdigest()[:16]
        key = (
            f"{o['backbone']}-{self._backbone_checksum[:12]}-layers{'_'.join(map(str, o['layers']))}"
            f"-size{self.input_side}-crop{o['distill_crop']}-steps{o['distill_steps']}x{o['distill_batch_size']}"
            f"-seed{o['seed']}-c{self.teacher_channels}-data{data}"
        )
        return _cache_dir() / f"teacher-{key}.safetensors"

    def _distilled_teacher(self, train: torch.Tensor) -> nn.Module:
        """The padded PDN-S distilled from the backbone, from the cache when this configuration ran before."""
        path = self._teacher_cache_path(train)
        teacher = pdn_small(self.teacher_channels, padding=True).to(self.device)
        if path.is_file():
            teacher.load_state_dict(load_file(str(path), device=str(self.device)))
            self.fit_info["teacher"] = f"cached {path.name}"
        else:
            self._distil(teacher, train)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, str(tmp))
            tmp.replace(path)
            self.fit_info["teacher"] = f"distilled {path.name}"
        return teacher.eval().requires_grad_(False)

    def _distillation_target(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """The backbone's patch features of crops x, on the padded PDN's size x size grid, aggregated
        to `teacher_channels` (unstandardized)."""
        # the backbone sees the crop at twice the PDN's resolution, as in the reference pretraining
        feats = self.extractor(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        emb = F.interpolate(
            locally_aware_embedding(feats), size=(size, size), mode="bilinear", align_corners=False
        )
        return aggregate_channels(emb, self.teacher_channels)

    def _distil(self, teacher: nn.Module, train: torch.Tensor) -> None:
        """Train the padded PDN to regress the backbone's standardized patch features on random crops
        of the goods (half of each batch) and synthetic textures (the other half)."""
        o = self.options
        crop = min(o["distill_crop"] or self.input_side, self.input_side)
        if crop % 4:
            raise ValueError(f"efficientad: distill_crop must be a multiple of 4, got {crop}")

        def target(x: torch.Tensor) -> torch.Tensor:
            return self._distillation_target(x, crop // 4)

        def sample(idx: torch.Tensor) -> torch.Tensor:
            x = train[idx.cpu()].to(self.device)
            n = x.shape[0]
            i, j = torch.randint(self.input_side - crop + 1, (2,)).tolist()
            goods = x[: (n + 1) // 2, :, i : i + crop, j : j + crop]
            goods = torch.where(
                torch.rand(goods.shape[0], 1, 1, 1, device=x.device) < 0.5, goods.flip(-1), goods
            )
            return torch.cat([goods, penalty_textures(n - goods.shape[0], crop, x.device)])

        gen = torch.Generator().manual_seed(o["seed"])
        with torch.no_grad():  # target standardization, estimated on a few batches as in the reference
            probe = torch.cat(
                [
                    target(sample(torch.randint(len(train), (o["distill_batch_size"],), generator=gen)))
                    for _ in range(4)
                ]
            )
            t_mean = probe.mean(dim=(0, 2, 3), keepdim=True)
            t_std = probe.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        opt = torch.optim.Adam(teacher.parameters(), lr=1e-4, weight_decay=1e-5)

        def step(idx: torch.Tensor, ctx) -> dict[str, torch.Tensor]:
            x = sample(idx)
            with torch.no_grad():
                y = (target(x) - t_mean) / t_std
            with ctx.autocast():
                loss = (teacher(x) - y).pow(2).mean()
            ctx.update(loss, opt)
            return {"loss": loss.detach()}

        # the engine iterates over image indices: one epoch of exactly distill_steps shuffled batches
        bs = o["distill_batch_size"]
        indices = torch.arange(o["distill_steps"] * bs) % len(train)
        config = TrainConfig(
            batch_size=bs,
            seed=o["seed"],
            device=self.device,
            amp=o["amp"],
            progress=self._show_progress,
            desc=f"{self.name}: teacher",
        )
        result = Trainer({"teacher": teacher}, config).fit(
            [Phase("distill", step, 1, {"adam": opt})], indices
        )
        self.fit_info["teacher_distillation"] = result.summary()
