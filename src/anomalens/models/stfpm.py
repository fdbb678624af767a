"""STFPM (Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection", BMVC 2021).

A frozen pretrained teacher and a randomly initialised student of the same architecture; the
student learns to reproduce the teacher's feature pyramid on good images only. The loss is the
squared L2 distance of channel-normalized features, averaged over positions and summed over the
three scales; the anomaly map is the product of the per-scale distance maps upsampled to the
image (bilinear), and the image score is its maximum.

Deviation from the paper: the backbone is the offline EfficientNet-Lite0 (stages 1-3, strides
4/8/16) instead of ResNet-18, so the student is a randomly initialised EfficientNet-Lite0 trunk.

This file also holds `BackboneTrainableDetector`, the plumbing shared with reverse distillation
and EfficientAD (a trained model on top of a frozen pretrained backbone).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from anomalens.backbones import FeatureExtractor
from anomalens.models.components.features import normalized_sq_distance
from anomalens.models.trainable import BackboneTrainableDetector
from anomalens.models.training import Phase
from anomalens.registry import register


def random_student(teacher: FeatureExtractor) -> nn.Module:
    """The teacher's trunk with every layer re-initialised: same architecture, no pretrained knowledge."""
    student = copy.deepcopy(teacher.body)
    for module in student.modules():
        if module is not student and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return student.requires_grad_(True)


class StfpmModel(nn.Module):
    """Pixels -> (scores (B,), maps (B, S, S)): teacher and student pyramids, product of distances."""

    def __init__(self, teacher: FeatureExtractor, student: nn.Module, image_size: int) -> None:
        super().__init__()
        self.teacher = teacher
        self.student = student
        self.image_size = image_size

    def layer_distances(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """One (B, h_l, w_l) distance map per pyramid level."""
        with torch.no_grad():
            t_feats = self.teacher(pixels)
        return [normalized_sq_distance(t, s) for t, s in zip(t_feats, self.student(pixels))]

    def loss(self, pixels: torch.Tensor) -> torch.Tensor:
        """Sum over levels of the mean per-position distance (paper's eq. 2-3)."""
        return sum(d.mean() for d in self.layer_distances(pixels))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = (self.image_size, self.image_size)
        maps = None
        for d in self.layer_distances(pixels):
            up = F.interpolate(d.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
            maps = up if maps is None else maps * up
        maps = maps[:, 0]
        return maps.amax(dim=(1, 2)), maps


@register
class Stfpm(BackboneTrainableDetector):
    """STFPM. Options: layers (teacher stages matched), epochs, batch_size, and the paper's SGD
    (lr 0.4, momentum 0.9, weight_decay 1e-4). The paper trains 100 epochs at batch 32; the CPU
    default is far shorter (`epochs`, `max_minutes`)."""

    name = "stfpm"
    defaults = {
        "layers": (1, 2, 3),
        "epochs": 10,
        "min_steps": 400,
        "batch_size": 16,
        "lr": 0.4,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "max_minutes": 15.0,
    }

    def _build_modules(self) -> dict[str, nn.Module]:
        return {"student": random_student(self.extractor)}

    def _scorer(self) -> StfpmModel:
        return StfpmModel(self.extractor, self.modules["student"], self.input_side)

    def _phases(self) -> list[Phase]:
        o = self.options
        model = self._scorer()
        opt = torch.optim.SGD(
            model.student.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
        )

        return [self.loss_phase("train", model.loss, {"sgd": opt})]
