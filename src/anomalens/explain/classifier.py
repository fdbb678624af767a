"""A second model that learns the detector's verdicts, so CNN explainers (Grad-CAM, LIME) can ask it why.

The detector ranks images; its most and least anomalous ones become pseudo-labels; a pretrained
backbone with a small head is fine-tuned on them (its last stage and the head train, the rest stays
frozen); its agreement with the detector on held-out pseudo-labelled images says how far its
explanations can speak for the detector. Saved as one safetensors file with a JSON header.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from anomalens.backbones import BackboneError, BackboneSpec, build_backbone
from anomalens.data.inputs import Preprocess, as_items, load_item
from anomalens.models.base import ModelFileError
from anomalens.models.components.ranking import wmw_loss

CLASSIFIER_FORMAT = "anomalens-explain-classifier/1"
LOSSES = ("cross_entropy", "wmw", "wmw_full_recall")


@dataclass(frozen=True)
class PseudoLabels:
    """Indices into the scored images: `anomalous` (label 1) and `normal` (label 0); the rest are left out."""

    anomalous: np.ndarray
    normal: np.ndarray

    def indices_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        idx = np.concatenate([self.normal, self.anomalous])
        return idx, np.concatenate([np.zeros(len(self.normal), int), np.ones(len(self.anomalous), int)])


def pseudo_labels(
    scores: np.ndarray,
    anomalous_fraction: float = 0.2,
    normal_fraction: float = 0.5,
    threshold: float | None = None,
) -> PseudoLabels:
    """Top `anomalous_fraction` of scores = anomalous, bottom `normal_fraction` = normal.

    The images in between are the margin the detector is unsure about and are not used. With a
    `threshold` (e.g. 1.0 on normalized scores), anomalous images must also reach it and normal
    ones stay below it, so a set without defects yields no anomalous pseudo-labels.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not (
        0 < anomalous_fraction < 1 and 0 < normal_fraction < 1 and anomalous_fraction + normal_fraction <= 1
    ):
        raise ValueError(
            f"pseudo-label fractions must be in (0, 1) and sum to at most 1, got anomalous="
            f"{anomalous_fraction}, normal={normal_fraction}"
        )
    order = np.argsort(scores, kind="stable")
    n = len(scores)
    normal = order[: int(round(normal_fraction * n))]
    anomalous = order[n - int(round(anomalous_fraction * n)) :]
    if threshold is not None:
        normal, anomalous = normal[scores[normal] < threshold], anomalous[scores[anomalous] >= threshold]
    return PseudoLabels(anomalous=np.sort(anomalous), normal=np.sort(normal))


class AnomalyClassifier(nn.Module):
    """Pretrained backbone (up to stage `layer`) + global average pool + linear head: logits (normal, anomalous)."""

    def __init__(self, backbone: str = "efficientnet_lite0", layer: int = 3, image_size: int = 128) -> None:
        super().__init__()
        if backbone.startswith("torchvision:"):
            raise BackboneError(
                "the explanation classifier takes timm backbones (e.g. efficientnet_lite0, resnet18)"
            )
        self.config = {"backbone": backbone, "layer": int(layer), "image_size": int(image_size)}
        self.extractor = build_backbone(BackboneSpec(name=backbone, layers=(int(layer),)), device="cpu")
        self.head = nn.Linear(self.extractor.channels[-1], 2)
        # the deepest stage is fine-tuned (and is Grad-CAM's target layer); earlier stages stay frozen
        self.last_stage.requires_grad_(True)
        self.info: dict[str, Any] = {}

    @property
    def last_stage(self) -> nn.Module:
        """The backbone's deepest kept stage (looked up, not registered twice, so weights save once)."""
        return self.extractor.body.get_submodule(self.extractor.body.feature_info.module_name()[-1])

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.config["image_size"], 3, tuple(self.extractor.mean), tuple(self.extractor.std))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(pixels)[-1].mean(dim=(2, 3)))

    def _last_stage_inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """What the frozen stages hand the trained stage: computed once, so training costs little."""
        captured = []
        hook = self.last_stage.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            with torch.no_grad():
                self.extractor(pixels)
        finally:
            hook.remove()
        return captured[0]

    def pixels(self, images: Iterable | np.ndarray) -> torch.Tensor:
        """Preprocess images (paths, samples or arrays) into one batch for this classifier."""
        return torch.stack([self.preprocess(load_item(item)) for item in as_items(images)])

    @torch.no_grad()
    def predict_proba(self, images: Iterable | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """P(anomalous) per image."""
        self.eval()
        x = self.pixels(images)
        return np.concatenate(
            [
                F.softmax(self(x[i : i + batch_size]), dim=1)[:, 1].numpy()
                for i in range(0, len(x), batch_size)
            ]
        )

    def fit(
        self,
        images: Iterable | np.ndarray,
        labels: np.ndarray,
        epochs: int = 30,
        lr: float = 1e-3,
        batch_size: int = 16,
        seed: int = 0,
        loss: str = "cross_entropy",
    ) -> AnomalyClassifier:
        """Fine-tune the last stage and the head on (image, 0/1 label) pairs, both classes needed.

        Horizontal and vertical flips of the cached stage inputs augment the few images. The loss:
        "cross_entropy" weighs the classes equally however unbalanced the labels are; "wmw" ranks
        every defect above every good (`models.components.ranking.wmw_loss`); "wmw_full_recall"
        ranks the hardest defect above the goods, the objective of "miss no defect at the fewest
        false alarms". The ranking losses take whole-set steps: each step needs both classes.
        """
        if loss not in LOSSES:
            raise ValueError(f"unknown classifier loss {loss!r}; choose one of {', '.join(LOSSES)}")
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if set(labels.tolist()) != {0, 1}:
            raise ValueError(
                "the explanation classifier needs both anomalous and normal pseudo-labelled images"
            )
        torch.manual_seed(seed)
        self.head.reset_parameters()  # its first init drew from whatever the global RNG held then
        inputs = torch.cat([self._last_stage_inputs(chunk) for chunk in self.pixels(images).split(32)])
        counts = torch.bincount(labels, minlength=2).float()
        weight = counts.sum() / (2 * counts)
        params = list(self.last_stage.parameters()) + list(self.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed)
        self.train()
        step = batch_size if loss == "cross_entropy" else len(labels)
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=gen).split(step):
                x = inputs[idx]
                flips = [d for d, p in ((2, 0.5), (3, 0.5)) if torch.rand(1, generator=gen).item() < p]
                x = x.flip(flips) if flips else x
                logits = self.head(self.last_stage(x).mean(dim=(2, 3)))
                if loss == "cross_entropy":
                    value = F.cross_entropy(logits, labels[idx], weight=weight)
                else:
                    value = wmw_loss(
                        F.softmax(logits, dim=1)[:, 1],
                        labels[idx],
                        hardest=1 if loss == "wmw_full_recall" else None,
                    )
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
        self.eval()
        self.info.update(n_train=len(labels), n_train_anomalous=int(counts[1]), epochs=epochs, loss=loss)
        return self

    def save(self, path: str | Path) -> Path:
        """One safetensors file: the weights, and the configuration and training info as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(
            state,
            str(path),
            metadata={
                "anomalens": json.dumps(
                    {"format": CLASSIFIER_FORMAT, "config": self.config, "info": self.info}
                )
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> AnomalyClassifier:
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"classifier file '{path}' not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["anomalens"])
            state = load_file(str(path))
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as err:
            raise ModelFileError(
                f"'{path}' is not an anomalens explanation classifier ({type(err).__name__})"
            ) from None
        if header.get("format") != CLASSIFIER_FORMAT:
            raise ModelFileError(
                f"'{path}' is not an anomalens explanation classifier "
                f"(format {header.get('format')!r}, expected {CLASSIFIER_FORMAT!r})"
            )
        model = cls(**header["config"])
        model.load_state_dict(state)
        model.info = header.get("info", {})
        return model.eval()


def train_classifier(
    detector_scores: np.ndarray,
    images: list,
    *,
    anomalous_fraction: float = 0.2,
    normal_fraction: float = 0.5,
    threshold: float | None = None,
    holdout_fraction: float = 0.25,
    backbone: str = "efficientnet_lite0",
    layer: int = 3,
    image_size: int = 128,
    epochs: int = 30,
    seed: int = 0,
    loss: str = "cross_entropy",
) -> AnomalyClassifier:
    """Pseudo-label `images` by the detector's scores, fine-tune a classifier on part of them and
    measure its agreement with the detector on the rest (`classifier.info['agreement']`)."""
    if len(images) != len(detector_scores):
        raise ValueError(f"got {len(images)} images but {len(detector_scores)} detector scores")
    labelled = pseudo_labels(detector_scores, anomalous_fraction, normal_fraction, threshold)
    idx, labels = labelled.indices_and_labels()
    rng = np.random.default_rng(seed)
    held = np.zeros(len(idx), bool)
    for c in (0, 1):  # stratified: both classes in training and in the held-out check
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            raise ValueError(
                f"only {len(members)} {'anomalous' if c else 'normal'} pseudo-labelled image(s): "
                "give more images or larger pseudo-label fractions"
            )
        held[rng.choice(members, max(1, int(round(holdout_fraction * len(members)))), replace=False)] = True
    model = AnomalyClassifier(backbone, layer, image_size)
    model.fit([images[i] for i in idx[~held]], labels[~held], epochs=epochs, seed=seed, loss=loss)
    predicted = model.predict_proba([images[i] for i in idx[held]]) >= 0.5
    model.info.update(
        agreement=round(float((predicted == labels[held]).mean()), 4),
        n_holdout=int(held.sum()),
        anomalous_fraction=anomalous_fraction,
        normal_fraction=normal_fraction,
    )
    return model
