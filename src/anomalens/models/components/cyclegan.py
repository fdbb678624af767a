"""CycleGAN building blocks (Zhu et al., "Unpaired Image-to-Image Translation using Cycle-Consistent
Adversarial Networks", ICCV 2017): the ResNet generator, the PatchGAN discriminator, the LSGAN
objective and one training step of the two generators and two discriminators; plus the
flip-and-shift augmentation of a small image domain (CycleGAN-AD's few labelled defects)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "instance")


def _norm(kind: str, c: int) -> nn.Module:
    # instance norm (CycleGAN's photos) discards each image's mean level: a generator built on it
    # cannot give back the brightness of an input whose brightness varies (magnetic tile: identity
    # loss stuck at 0.46), so batch norm, as the CycleGAN-AD code, is the default
    return nn.BatchNorm2d(c) if kind == "batch" else nn.InstanceNorm2d(c)


def init_weights(module: nn.Module) -> None:
    """CycleGAN's initialisation: conv weights N(0, 0.02), batch-norm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class ResnetBlock(nn.Module):
    """Two reflect-padded 3x3 conv - norm, with a skip connection."""

    def __init__(self, c: int, norm: str) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"),
            _norm(norm, c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect"),
            _norm(norm, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """CycleGAN's generator: c7s1-w, `n_down` stride-2 convs (doubling the width), `n_blocks`
    residual blocks, as many transposed convs back, c7s1-C and tanh. (B, C, S, S) in [-1, 1] ->
    the same shape; S must be a multiple of 2**n_down."""

    def __init__(
        self, channels: int, width: int, n_blocks: int, norm: str = "batch", n_down: int = 2
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(channels, width, 7, padding=3, padding_mode="reflect"),
            _norm(norm, width),
            nn.ReLU(inplace=True),
        ]
        c = width
        for _ in range(n_down):
            layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), _norm(norm, 2 * c), nn.ReLU(inplace=True)]
            c *= 2
        layers += [ResnetBlock(c, norm) for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [
                nn.ConvTranspose2d(c, c // 2, 3, stride=2, padding=1, output_padding=1),
                _norm(norm, c // 2),
                nn.ReLU(inplace=True),
            ]
            c //= 2
        layers += [nn.Conv2d(c, channels, 7, padding=3, padding_mode="reflect"), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / CycleGAN): 4x4 convs, `n_layers` of them stride 2, widths doubling up to
    8x; one real/fake logit per overlapping patch, (B, 1, h, w). No sigmoid (LSGAN)."""

    def __init__(self, channels: int, width: int, n_layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        c = width
        for i in range(1, n_layers + 1):
            c_out = width * min(2**i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1), _norm(norm, c_out), nn.LeakyReLU(0.2, inplace=True)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def lsgan(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al. 2017): mean (pred - 1)^2 for real, pred^2 for fake."""
    target = torch.ones_like(pred) if real else torch.zeros_like(pred)
    return F.mse_loss(pred.float(), target.float())


def flip_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Random horizontal / vertical flips and shifts of up to `max_shift` pixels (reflect-padded, so
    no empty border), per image of (B, C, H, W); draws from the global torch RNG."""
    b, _, h, w = x.shape
    hflip = torch.rand(b, device=x.device) < 0.5
    vflip = torch.rand(b, device=x.device) < 0.5
    x = torch.where(hflip.view(-1, 1, 1, 1), x.flip(-1), x)
    x = torch.where(vflip.view(-1, 1, 1, 1), x.flip(-2), x)
    if max_shift <= 0:
        return x
    s = min(max_shift, h - 1, w - 1)
    padded = F.pad(x, (s, s, s, s), mode="reflect")
    offsets = torch.randint(0, 2 * s + 1, (b, 2)).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


class CycleGan(nn.Module):
    """The four networks between a normal domain N and an abnormal domain A: generators A->N and
    N->A, discriminators of N and of A."""

    def __init__(
        self, channels: int, width: int, n_blocks: int, d_width: int, d_layers: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.to_normal = ResnetGenerator(channels, width, n_blocks, norm)
        self.to_abnormal = ResnetGenerator(channels, width, n_blocks, norm)
        self.d_normal = PatchDiscriminator(channels, d_width, d_layers, norm)
        self.d_abnormal = PatchDiscriminator(channels, d_width, d_layers, norm)

    def generator_parameters(self):
        return itertools.chain(self.to_normal.parameters(), self.to_abnormal.parameters())

    def discriminator_parameters(self):
        return itertools.chain(self.d_normal.parameters(), self.d_abnormal.parameters())

    def generator_losses(
        self, x_n: torch.Tensor, x_a: torch.Tensor, cycle_weight: float, identity_weight: float
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """CycleGAN's generator objective on a normal and an abnormal batch: LSGAN (fool both
        discriminators) + cycle_weight * L1 cycle + identity_weight * L1 identity. Returns the
        losses ("loss" is the total) and the two translations (for the discriminators' step)."""
        fake_n, fake_a = self.to_normal(x_a), self.to_abnormal(x_n)
        gan = lsgan(self.d_normal(fake_n), True) + lsgan(self.d_abnormal(fake_a), True)
        cycle = F.l1_loss(self.to_normal(fake_a), x_n) + F.l1_loss(self.to_abnormal(fake_n), x_a)
        identity = F.l1_loss(self.to_normal(x_n), x_n) + F.l1_loss(self.to_abnormal(x_a), x_a)
        loss = gan + cycle_weight * cycle + identity_weight * identity
        return {"loss": loss, "gan": gan, "cycle": cycle, "identity": identity}, fake_n, fake_a

    def discriminator_loss(
        self, x_n: torch.Tensor, x_a: torch.Tensor, fake_n: torch.Tensor, fake_a: torch.Tensor
    ) -> torch.Tensor:
        """Both discriminators' LSGAN loss, halved as in CycleGAN (slows D relative to G)."""
        d_n = lsgan(self.d_normal(x_n), True) + lsgan(self.d_normal(fake_n.detach()), False)
        d_a = lsgan(self.d_abnormal(x_a), True) + lsgan(self.d_abnormal(fake_a.detach()), False)
        return 0.5 * (d_n + d_a)
