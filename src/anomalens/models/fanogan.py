"""f-AnoGAN (Schlegl et al., Medical Image Analysis 2019): fast unsupervised anomaly detection
with generative adversarial networks.

Phase 1 trains a WGAN-GP generator and critic on good images; phase 2 freezes both and trains
an encoder with the izi_f loss, ||x - G(E(x))||^2 + kappa * ||f(x) - f(G(E(x)))||^2, f being the
critic's last feature map. The paper's anomaly score A(x) is that same sum; the map is the
smoothed residual x - G(E(x)). The DCGAN-style networks are `components.dcgan`'s, shared with GANomaly.

Deviation (`score`, "mean" by default): the image score is the residual map's mean, not A(x). On
every set measured (docs/reconstruction.md, "f-AnoGAN's image score") the critic-feature term was at
or below chance on held-out goods against synthetic defects, and its share of the sum (1.5 to 180
times the pixel term on the goods) decided A(x): 0.35 image AUROC on a synthetic texture where the
map's mean reaches 0.91. `score=izi_f` gives the paper's A(x); `score=residual` the map's maximum.

Deviation (`feature_norm`, on by default): the feature residual is divided by the mean square of
the critic's features over the training goods. WGAN-GP constrains only the critic's gradient
with respect to its input, so its features have no set scale: on cookies the feature residual
was 500 times the pixel residual, alone decided both the encoder's loss and the score, and ranked
cracked cookies below good ones (image AUROC 0.19; the pixel residual alone 0.78).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from anomalens.models.components.dcgan import DCEncoder, DCGenerator, n_levels
from anomalens.models.components.reconstruction import ResidualMap
from anomalens.models.trainable import TrainableDetector, check_choice
from anomalens.models.training import Phase, StepContext
from anomalens.registry import register


def gradient_penalty(critic: DCEncoder, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """WGAN-GP: (||grad critic(mix)|| - 1)^2 on random interpolates of real and fake images."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    mix = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    out, _ = critic(mix)
    (grad,) = torch.autograd.grad(out.sum(), mix, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class FeatureScale(nn.Module):
    """Mean square of the critic's features over the training goods, measured when the encoder
    phase starts (1 = the paper's unscaled feature residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.ones(()))


class FAnoGanModel(nn.Module):
    def __init__(
        self,
        generator: DCGenerator,
        critic: DCEncoder,
        encoder: DCEncoder,
        feature_scale: FeatureScale,
        residual: ResidualMap,
        kappa: float,
        score: str = "izi_f",
    ) -> None:
        super().__init__()
        self.generator, self.critic, self.encoder, self.residual = generator, critic, encoder, residual
        self.feature_scale, self.kappa, self.score = feature_scale, kappa, score

    def izi_f(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image izi_f anomaly score A(x) and the reconstruction G(E(x))."""
        z, _ = self.encoder(x)
        recon = self.generator(z)
        _, f_x = self.critic(x)
        _, f_r = self.critic(recon)
        a_r = ((x.float() - recon.float()) ** 2).flatten(1).mean(1)
        a_d = ((f_x.float() - f_r.float()) ** 2).mean(1) / self.feature_scale.value
        return a_r + self.kappa * a_d, recon

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores, recon = self.izi_f(x)
        maps = self.residual(x, recon)[1]
        if self.score == "izi_f":
            return scores, maps
        return (maps.mean(dim=(1, 2)) if self.score == "mean" else maps.amax(dim=(1, 2))), maps


@register
class FAnoGan(TrainableDetector):
    """f-AnoGAN. Options: latent, width, channels, gan_epochs (phase 1; `epochs` is the encoder
    phase), n_critic (critic steps per generator step), gp_weight, kappa, gan_share (fraction
    of max_minutes for the GAN phase), sigma (map smoothing), score ("mean": the residual map's mean;
    "izi_f": the paper's A(x); "residual": the map's maximum, for small defects that the mean
    dilutes), feature_norm (divide the feature residual by the critic features' mean square on the
    goods in the encoder's loss and A(x); false = the paper's raw sum)."""

    name = "fanogan"
    map_max_setting = "score=residual"
    defaults = {
        "channels": 3,
        "latent": 128,
        "width": 16,
        "gan_epochs": 60,
        "n_critic": 5,
        "gp_weight": 10.0,
        "kappa": 1.0,
        "gan_share": 0.7,
        "sigma": 2.0,
        "score": "mean",
        "feature_norm": True,
        "epochs": 40,
        "min_steps": 1500,
        "lr": 1e-4,
        "max_minutes": 12.0,
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        n_levels(self.input_side)  # validate early
        check_choice(self.name, "score", self.options["score"], ("mean", "izi_f", "residual"))
        if not 0 < self.options["gan_share"] < 1:
            raise ValueError(f"fanogan: option gan_share must be in (0, 1), got {self.options['gan_share']}")

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        return {
            "generator": DCGenerator(o["latent"], o["channels"], self.input_side, o["width"]),
            "critic": DCEncoder(o["channels"], self.input_side, o["width"], 1, batchnorm=False),
            "encoder": DCEncoder(o["channels"], self.input_side, o["width"], o["latent"], batchnorm=False),
            "feature_scale": FeatureScale(),
        }

    def _phases(self) -> list[Phase]:
        o = self.options
        gen, critic, enc = self.modules["generator"], self.modules["critic"], self.modules["encoder"]
        # WGAN-GP's Adam settings (Gulrajani et al. 2017)
        opt_g = torch.optim.Adam(gen.parameters(), lr=o["lr"], betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(critic.parameters(), lr=o["lr"], betas=(0.0, 0.9))
        opt_e = torch.optim.Adam(enc.parameters(), lr=o["lr"], betas=(0.0, 0.9))
        scorer = self._scorer()

        def gan_step(x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
            z = torch.randn(x.shape[0], o["latent"], device=x.device)
            with ctx.autocast():
                fake = gen(z).detach()
                wasserstein = critic(fake)[0].mean() - critic(x)[0].mean()
                loss_d = wasserstein + o["gp_weight"] * gradient_penalty(critic, x, fake)
            ctx.update(loss_d, opt_d)
            losses = {"loss": loss_d, "wasserstein": -wasserstein}
            if ctx.step % o["n_critic"] == o["n_critic"] - 1:
                critic.requires_grad_(False)  # the generator step must not touch the critic's gradients
                with ctx.autocast():
                    loss_g = -critic(gen(torch.randn_like(z)))[0].mean()
                ctx.update(loss_g, opt_g)
                critic.requires_grad_(True)
            return losses

        def measure_feature_scale(train: torch.Tensor) -> None:
            if o["feature_norm"]:
                total = sum(
                    float(critic(b.to(self.device))[1].float().pow(2).mean(1).sum()) for b in train.split(64)
                )
                self.modules["feature_scale"].value.fill_(max(total / len(train), 1e-12))

        def izi_f_loss(x: torch.Tensor) -> torch.Tensor:
            return scorer.izi_f(x)[0].mean()

        def encoder_step(x: torch.Tensor, ctx: StepContext) -> dict[str, torch.Tensor]:
            gen.requires_grad_(False)  # phase 2 trains the encoder only
            critic.requires_grad_(False)
            with ctx.autocast():
                loss = izi_f_loss(x)
            ctx.update(loss, opt_e)
            return {"loss": loss}

        return [
            self.phase(
                "gan",
                gan_step,
                {"generator": opt_g, "critic": opt_d},
                epochs=o["gan_epochs"],
                patience=0,
                train_modules=("generator", "critic"),
                time_share=o["gan_share"],
            ),
            self.phase(
                "encoder",
                encoder_step,
                {"encoder": opt_e},
                val_loss=izi_f_loss,
                on_start=measure_feature_scale,
                train_modules=("encoder",),
                time_share=1 - o["gan_share"],
            ),
        ]

    def _scorer(self) -> FAnoGanModel:
        o = self.options
        m = self.modules
        return FAnoGanModel(
            m["generator"],
            m["critic"],
            m["encoder"],
            m["feature_scale"],
            ResidualMap("l2", self.input_side, o["sigma"]),
            o["kappa"],
            o["score"],
        )
