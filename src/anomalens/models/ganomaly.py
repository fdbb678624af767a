"""GANomaly (Akcay et al., ACCV 2018): semi-supervised anomaly detection via adversarial training.

The generator is an encoder-decoder-encoder: x -> z = G_E(x) -> x_hat = G_D(z) -> z_hat = E(x_hat).
It is trained on goods with an adversarial loss (feature matching against a discriminator),
a contextual loss |x - x_hat|_1 and a latent loss ||z - z_hat||^2; an anomaly's latent code
is not reproduced, so the score is the latent distance mean((z - z_hat)^2). GANomaly does not
localize by design; its map is the smoothed reconstruction residual, for inspection.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.models.components.dcgan import DCEncoder, DCGenerator, n_levels
from anomalens.models.components.reconstruction import ResidualMap
from anomalens.models.trainable import TrainableDetector, check_choice
from anomalens.models.training import Phase, StepContext
from anomalens.registry import register


class GanomalyGenerator(nn.Module):
    def __init__(self, channels: int, image_size: int, width: int, latent: int) -> None:
        super().__init__()
        self.encoder1 = DCEncoder(channels, image_size, width, latent, batchnorm=True)
        self.decoder = DCGenerator(latent, channels, image_size, width)
        self.encoder2 = DCEncoder(channels, image_size, width, latent, batchnorm=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, latent z, latent of the reconstruction z_hat)."""
        z, _ = self.encoder1(x)
        recon = self.decoder(z)
        z_hat, _ = self.encoder2(recon)
        return recon, z, z_hat


class GanomalyModel(nn.Module):
    def __init__(self, generator: GanomalyGenerator, residual: ResidualMap, score: str = "latent") -> None:
        super().__init__()
        self.generator, self.residual, self.score = generator, residual, score

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        recon, z, z_hat = self.generator(x)
        peaks, maps = self.residual(x, recon)
        return ((z.float() - z_hat.float()) ** 2).mean(1) if self.score == "latent" else peaks, maps


@register
class Ganomaly(TrainableDetector):
    """GANomaly. Options: latent, width, channels, w_adv / w_con / w_enc (loss weights, the
    paper's 1 / 50 / 1), sigma (map smoothing), score ("latent": the paper's latent distance;
    "residual": the residual map's maximum)."""

    name = "ganomaly"
    map_max_setting = "score=residual"
    defaults = {
        "channels": 3,
        "latent": 100,
        "width": 32,
        "w_adv": 1.0,
        "w_con": 50.0,
        "w_enc": 1.0,
        "sigma": 2.0,
        "score": "latent",
        "epochs": 30,
        "min_steps": 1200,
        "lr": 2e-4,
        "max_minutes": 12.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        n_levels(self.input_side)  # validate early
        check_choice(self.name, "score", self.options["score"], ("latent", "residual"))

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        return {
            "generator": GanomalyGenerator(o["channels"], self.input_side, o["width"], o["latent"]),
            "discriminator": DCEncoder(o["channels"], self.input_side, o["width"], 1, batchnorm=True),
        }

    def _phases(self) -> list[Phase]:
        o = self.options
        gen, disc = self.modules["generator"], self.modules["discriminator"]
        opt_g = torch.optim.Adam(gen.parameters(), lr=o["lr"], betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(disc.parameters(), lr=o["lr"], betas=(0.5, 0.999))

        def generator_losses(x: torch.Tensor) -> dict[str, torch.Tensor]:
            recon, z, z_hat = gen(x)
            adv = F.mse_loss(disc(recon)[1], disc(x)[1].detach())  # feature matching
            con = F.l1_loss(recon, x)
            enc = F.mse_loss(z_hat, z)
            return {
                "loss": o["w_adv"] * adv + o["w_con"] * con + o["w_enc"] * enc,
                "adv": adv,
                "con": con,
                "enc": enc,
                "recon": recon,
            }

        def step(x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
            disc.requires_grad_(False)  # the generator update leaves the discriminator's gradients alone
            with ctx.autocast():
                losses = generator_losses(x)
            ctx.update(losses["loss"], opt_g)
            disc.requires_grad_(True)
            with ctx.autocast():
                real, _ = disc(x)
                fake, _ = disc(losses.pop("recon").detach())
                loss_d = (
                    F.binary_cross_entropy_with_logits(real.float(), torch.ones_like(real.float()))
                    + F.binary_cross_entropy_with_logits(fake.float(), torch.zeros_like(fake.float()))
                ) / 2
            ctx.update(loss_d, opt_d)
            if (
                float(loss_d.detach()) < 1e-5
            ):  # the paper re-initializes a discriminator that has won outright
                for module in disc.modules():
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
            return {**losses, "disc": loss_d}

        def val_loss(x: torch.Tensor) -> torch.Tensor:
            return generator_losses(x)["loss"]

        return [self.phase("ganomaly", step, {"generator": opt_g, "discriminator": opt_d}, val_loss=val_loss)]

    def _scorer(self) -> GanomalyModel:
        o = self.options
        return GanomalyModel(
            self.modules["generator"], ResidualMap("l2", self.input_side, o["sigma"]), o["score"]
        )
