"""VQGanoDIP (Bougaham, El Adoui, Linden, Frénay, "Composite Score for Anomaly Detection in
Imbalanced Real-World Industrial Dataset", Machine Learning 2023).

Stage 1, on goods: a VQGAN (Esser et al., "Taming Transformers", CVPR 2021) trained as an
autoencoder. The encoder E maps an image to a grid of latents, the codebook Z replaces each by its
nearest code (straight-through gradient, `components.vq`), the generator G decodes; a patch
discriminator D judges G's reconstructions. The autoencoder minimizes

    L_VQ = ||x - G(Z(E(x)))||^2 + ||sg[E(x)] - z_q||^2 + beta ||sg[z_q] - E(x)||^2 + lambda L_GAN,
    L_GAN = -mean D(x_hat),   lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta) * disc_weight,

the gradients taken at G's last layer GL (`adaptive_weight`), and D the hinge loss; the GAN terms
start after a first phase of the autoencoder alone (taming's disc_start).

Stage 2, per image: composite features (`FEATURES`) - statistics of the residual |x - x_hat| (at
pixel level and Gaussian-smoothed), the per-image reconstruction and codebook distances, and the
discriminator's logits on the image - standardized on the goods. With labelled defects a binary
classifier on them (`models.refine`'s kinds, stored as arrays and run in the torch graph) gives the
image score, its defect probability; without, the composite score alone (`composite`: mean of the
z-scores, or their Mahalanobis distance). The map is the smoothed residual. docs/vqganodip.md has
what the paper leaves open and the deviations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalens.models.components.layers import SmoothUpsample
from anomalens.models.components.vq import Quantized, VectorQuantizer
from anomalens.models.refine import CLASSIFIERS, ClassifierModule, fit_classifier
from anomalens.models.trainable import TrainableDetector, check_choice
from anomalens.models.training import Phase, StepContext
from anomalens.registry import register

#: the composite features of one image, in this order
FEATURES = (
    "rec_mse",  # per-image L_rec: mean (x - x_hat)^2
    "res_mean",  # residual |x - x_hat| (mean over channels): mean, std, max, 99th percentile
    "res_std",
    "res_max",
    "res_p99",
    "map_max",  # the smoothed residual (the map): max, 99th percentile
    "map_p99",
    "codebook",  # ||sg[E(x)] - z_q||^2, mean over the latent grid
    "code_max",  # the farthest latent from its code
    "disc_fake",  # -mean D(x): how unreal the discriminator finds the image
    "disc_fake_max",  # -min D(x): its least real patch
)
COMPOSITES = ("zmean", "mahalanobis")
#: validation goods needed to take the goods' statistics from them alone (else training goods join)
MIN_UNSEEN_GOODS = 8


def adaptive_weight(
    rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, delta: float = 1e-4
) -> torch.Tensor:
    """VQGAN's lambda = ||grad_GL L_rec|| / (||grad_GL L_GAN|| + delta), at the generator's last
    layer weight GL, clamped to [0, 1e4] and detached (taming-transformers)."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    return (g_rec.norm() / (g_gan.norm() + delta)).clamp(0.0, 1e4).detach()


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, c), c)  # the same in training and inference (no running statistics)


class ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1), _norm(c), nn.SiLU(), nn.Conv2d(c, c, 3, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def level_widths(width: int, levels: int) -> list[int]:
    return [width * min(2**i, 4) for i in range(levels + 1)]


class Encoder(nn.Module):
    """E: image -> latents (B, code_dim, S / 2**levels, S / 2**levels)."""

    def __init__(self, channels: int, width: int, levels: int, code_dim: int) -> None:
        super().__init__()
        w = level_widths(width, levels)
        layers: list[nn.Module] = [nn.Conv2d(channels, w[0], 3, 1, 1)]
        for i in range(levels):
            layers += [nn.Conv2d(w[i], w[i + 1], 4, 2, 1), _norm(w[i + 1]), nn.SiLU()]
        layers += [ResBlock(w[-1]), _norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Generator(nn.Module):
    """G: codes -> image; `last` is the layer GL whose gradients set the adaptive lambda."""

    def __init__(self, channels: int, width: int, levels: int, code_dim: int) -> None:
        super().__init__()
        w = level_widths(width, levels)
        layers: list[nn.Module] = [nn.Conv2d(code_dim, w[-1], 3, 1, 1), ResBlock(w[-1])]
        for i in reversed(range(levels)):
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w[i + 1], w[i], 3, 1, 1),
                _norm(w[i]),
                nn.SiLU(),
            ]
        self.body = nn.Sequential(*layers)
        self.last = nn.Conv2d(w[0], channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.last(self.body(z))


class PatchDiscriminator(nn.Module):
    """D: taming's NLayerDiscriminator (PatchGAN, Isola et al. 2017), one logit per patch; group norm."""

    def __init__(self, channels: int, width: int, layers: int) -> None:
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        c = width
        for n in range(1, layers + 1):
            c_out = width * min(2**n, 8)
            seq += [nn.Conv2d(c, c_out, 4, 2 if n < layers else 1, 1), _norm(c_out), nn.LeakyReLU(0.2)]
            c = c_out
        seq.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Composite(nn.Module):
    """The goods' feature statistics: z = (f - mean) / std, and the precision of z (Mahalanobis)."""

    def __init__(self, n_features: int = len(FEATURES)) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.register_buffer("precision", torch.eye(n_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class VQGanoDipModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)): reconstruct, composite features, classifier or composite."""

    def __init__(
        self,
        encoder: Encoder,
        quantizer: VectorQuantizer,
        generator: Generator,
        discriminator: PatchDiscriminator,
        composite: Composite,
        smooth: SmoothUpsample | None,
        classifier: ClassifierModule | None,
        rule: str,
    ) -> None:
        super().__init__()
        self.encoder, self.quantizer, self.generator = encoder, quantizer, generator
        self.discriminator, self.composite, self.smooth = discriminator, composite, smooth
        self.classifier, self.rule = classifier, rule

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantizer(self.encoder(x))
        return self.generator(q.z_q), q

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The FEATURES (B, F) of each image and its map (B, S, S)."""
        recon, q = self.reconstruct(x)
        diff = x.float() - recon.float()
        residual = diff.abs().mean(1)
        maps = self.smooth(residual) if self.smooth is not None else residual
        flat, mflat = residual.flatten(1), maps.flatten(1)
        k = max(
            1, round(0.01 * int(flat.shape[1]))
        )  # 99th percentile: the k-th largest; int(): a constant under the ONNX tracer
        mean = flat.mean(1)
        logits = self.discriminator(x).float().flatten(1)
        feats = [
            diff.pow(2).flatten(1).mean(1),
            mean,
            (flat.pow(2).mean(1) - mean.pow(2)).clamp_min(0).sqrt(),
            flat.amax(1),
            flat.topk(k, dim=1).values[:, -1],
            mflat.amax(1),
            mflat.topk(k, dim=1).values[:, -1],
            q.codebook,
            q.distance.flatten(1).amax(1),
            -logits.mean(1),
            (-logits).amax(1),
        ]
        return torch.stack(feats, 1), maps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, maps = self.features(x)
        z = self.composite(feats)
        if self.classifier is not None:
            return self.classifier(z), maps
        if self.rule == "mahalanobis":
            return ((z @ self.composite.precision) * z).sum(1), maps
        return z.mean(1), maps


@register
class VQGanoDip(TrainableDetector):
    """VQGanoDIP. Options: channels, width (first level's channels), levels (downsamplings of E and
    upsamplings of G), code_dim and n_codes (codebook), beta (commitment weight), disc_width and
    disc_layers (patch discriminator), ae_epochs and ae_share (the first
    phase, without the GAN: its epochs and share of max_minutes; `epochs` is the VQGAN phase's),
    disc_weight (factor on the adaptive lambda), delta, sigma (map smoothing), classifier (with labelled
    defects: extra_trees, logistic, adaboost or hist_gradient_boosting), composite (without them:
    zmean, the mean of the features' z-scores, or mahalanobis), lr."""

    name = "vqganodip"
    uses_defects = "optional"
    defaults = {
        "channels": 3,
        "width": 8,
        "levels": 3,
        "code_dim": 64,
        "n_codes": 256,
        "beta": 0.25,
        "disc_width": 16,
        "disc_layers": 2,
        "ae_epochs": 30,
        "ae_share": 0.4,
        "disc_weight": 0.8,
        "delta": 1e-4,
        "sigma": 2.0,
        "classifier": "extra_trees",
        "composite": "zmean",
        "batch_size": 8,
        "epochs": 60,
        "min_steps": 3000,
        "lr": 1e-3,
        "max_minutes": 12.0,
    }
    option_bounds = {
        "width": (1, 1024),
        "levels": (1, 6),
        "code_dim": (1, 4096),
        "n_codes": (2, 65536),
        "beta": (0.0, 100.0),
        "disc_width": (1, 1024),
        "disc_layers": (1, 6),
        "ae_epochs": (1, 10**6),
        "ae_share": (0.0, 1.0),
        "disc_weight": (0.0, 1e4),
        "delta": (1e-12, 1.0),
        "sigma": (0.0, 64.0),
    }

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        check_choice(self.name, "classifier", o["classifier"], CLASSIFIERS)
        check_choice(self.name, "composite", o["composite"], COMPOSITES)
        if not 0 < o["ae_share"] < 1:
            raise ValueError(f"vqganodip: option ae_share must be in (0, 1), got {o['ae_share']}")
        if self.input_side % 2 ** o["levels"]:
            raise ValueError(
                f"vqganodip: image_size {self.input_side} must be a multiple of 2**levels = {2 ** o['levels']}"
            )
        if self.input_side < 2 ** (o["disc_layers"] + 3):
            raise ValueError(
                f"vqganodip: image_size {self.input_side} is too small for disc_layers={o['disc_layers']}"
            )
        self._classifier: tuple[str, dict[str, np.ndarray]] | None = None
        self._classifier_module: ClassifierModule | None = None

    def _build_modules(self) -> dict[str, nn.Module]:
        o = self.options
        c = o["channels"]
        return {
            "encoder": Encoder(c, o["width"], o["levels"], o["code_dim"]),
            "quantizer": VectorQuantizer(o["n_codes"], o["code_dim"]),
            "generator": Generator(c, o["width"], o["levels"], o["code_dim"]),
            "discriminator": PatchDiscriminator(c, o["disc_width"], o["disc_layers"]),
            "composite": Composite(),
        }

    def _scorer(self) -> VQGanoDipModel:
        m, o = self.modules, self.options
        return VQGanoDipModel(
            m["encoder"],
            m["quantizer"],
            m["generator"],
            m["discriminator"],
            m["composite"],
            SmoothUpsample(self.input_side, o["sigma"]) if o["sigma"] > 0 else None,
            self._classifier_module,
            o["composite"],
        )

    def _phases(self) -> list[Phase]:
        o = self.options
        model = self._scorer()
        gen, disc = self.modules["generator"], self.modules["discriminator"]
        autoencoder = [p for k in ("encoder", "quantizer", "generator") for p in self.modules[k].parameters()]
        # taming-transformers' Adam settings
        opt_ae = torch.optim.Adam(autoencoder, lr=o["lr"], betas=(0.5, 0.9))
        opt_d = torch.optim.Adam(disc.parameters(), lr=o["lr"], betas=(0.5, 0.9))

        def vq_losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            recon, q = model.reconstruct(x)
            rec = F.mse_loss(recon.float(), x.float())
            return rec, q.codebook.mean() + o["beta"] * q.commitment.mean(), recon

        def val_loss(x: torch.Tensor) -> torch.Tensor:
            rec, vq, _ = vq_losses(x)
            return rec + vq

        def step(x: torch.Tensor, ctx: StepContext, gan_on: bool) -> dict[str, torch.Tensor]:
            disc.requires_grad_(False)  # the autoencoder's step leaves D's gradients alone
            with ctx.autocast():
                rec, vq, recon = vq_losses(x)
                loss = rec + vq
                out = {"rec": rec.detach(), "vq": vq.detach()}
                if gan_on:
                    gan = -disc(recon).float().mean()
                    lam = adaptive_weight(rec, gan, gen.last.weight, o["delta"]) * o["disc_weight"]
                    loss = loss + lam * gan
                    out["lambda"] = lam
            ctx.update(loss, opt_ae)
            disc.requires_grad_(True)
            out["loss"] = loss.detach()
            if gan_on:
                with ctx.autocast():
                    real, fake = disc(x).float(), disc(recon.detach()).float()
                    d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge
                ctx.update(d_loss, opt_d)
                out["d_loss"] = d_loss.detach()
            return out

        # the discriminator starts after the autoencoder phase (taming's disc_start), which ends after
        # ae_epochs or its share of max_minutes: on a slow CPU the GAN loss still gets its time
        return [
            self.phase(
                "autoencoder",
                lambda x, ctx: step(x, ctx, False),
                {"autoencoder": opt_ae},
                epochs=o["ae_epochs"],
                val_loss=val_loss,
                train_modules=("encoder", "quantizer", "generator"),
                time_share=o["ae_share"],
            ),
            self.phase(
                "vqgan",
                lambda x, ctx: step(x, ctx, True),
                {"autoencoder": opt_ae, "discriminator": opt_d},
                val_loss=val_loss,
                train_modules=("encoder", "quantizer", "generator", "discriminator"),
                time_share=1 - o["ae_share"],
            ),
        ]

    # -- stage 2: composite features, classifier --------------------------------------------------
    @torch.no_grad()
    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        """FEATURES (N, F) of preprocessed images, in batches, on the CPU."""
        model = self._scorer().eval()
        step = self.options["batch_size"]
        return torch.cat(
            [
                model.features(pixels[i : i + step].to(self.device))[0].cpu()
                for i in range(0, len(pixels), step)
            ]
        )

    def _train(self, train: torch.Tensor, val: torch.Tensor | None) -> None:
        super()._train(train, val)
        self._classifier, self._classifier_module = None, None
        # the goods' statistics and the classifier's goods: goods the networks never trained on (the
        # validation goods) where there are enough, since trained-on goods reconstruct better than any
        # new good and would teach the classifier that new goods look defective
        unseen = val is not None and len(val) >= MIN_UNSEEN_GOODS
        goods = self._features(val if unseen else (train if val is None else torch.cat([train, val])))
        composite = self.modules["composite"]
        mean = goods.double().mean(0)
        std = goods.double().std(0, correction=0)
        std = torch.maximum(std, 1e-6 * mean.abs() + 1e-12)
        composite.mean.copy_(mean.float())
        composite.std.copy_(std.float())
        z_goods = composite(goods.to(composite.mean.device)).cpu()
        if len(z_goods) > 1:
            from sklearn.covariance import LedoitWolf  # shrunk: few goods, correlated features

            composite.precision.copy_(torch.from_numpy(LedoitWolf().fit(z_goods.double().numpy()).precision_))
        info: dict[str, Any] = {
            "n_goods": len(goods),
            "goods": "validation (unseen by the networks)" if unseen else "training and validation",
            "composite": self.options["composite"],
        }
        defects, _ = self.labelled_defects()
        if len(defects):
            z_defects = composite(self._features(defects).to(composite.mean.device)).cpu()
            x = torch.cat([z_goods, z_defects]).double().numpy()
            y = np.r_[np.zeros(len(z_goods), int), np.ones(len(z_defects), int)]
            kind = self.options["classifier"]
            self._set_classifier(kind, fit_classifier(x, y, kind, self.options["seed"]))
            info.update(classifier=kind, n_defects=len(z_defects))
        self.fit_info["vqganodip"] = info

    def _set_classifier(self, kind: str, arrays: dict[str, np.ndarray]) -> None:
        self._classifier = (kind, arrays)
        self._classifier_module = ClassifierModule(kind, arrays).to(self.device)

    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays, meta = super()._state()
        meta = {**meta, "features": list(FEATURES), "classifier": None}
        if self._classifier is not None:
            kind, tree_arrays = self._classifier
            arrays.update({f"classifier/{k}": v for k, v in tree_arrays.items()})
            meta["classifier"] = kind
        return arrays, meta

    def _restore(self, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        if meta.get("features") != list(FEATURES):
            raise ValueError("vqganodip: the model file's composite features differ from this version's")
        kind = meta.get("classifier")
        if kind is not None and kind not in CLASSIFIERS:
            raise ValueError(f"vqganodip: unknown classifier {kind!r} in the model file")
        super()._restore({k: v for k, v in arrays.items() if not k.startswith("classifier/")}, meta)
        self._classifier, self._classifier_module = None, None
        if kind is not None:
            prefix = "classifier/"
            self._set_classifier(
                kind, {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            )
