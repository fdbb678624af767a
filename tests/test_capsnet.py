"""The capsule network: squash and routing by agreement as Sabour et al. define them, the class
balance of its batches and loss, that it refuses goods alone, that the WMW options train, and that
its map points at the defects."""

import numpy as np
import pytest
import torch

import anomalens
from anomalens.data.inputs import as_items, iter_batches
from anomalens.data.io import read_mask
from anomalens.export import OnnxDetector, export_onnx
from anomalens.metrics import image_metrics, pixel_metrics
from anomalens.models.capsnet import balanced_draw, class_balanced_mean
from anomalens.models.components.capsules import route_by_agreement, squash
from anomalens.models.components.ranking import wmw_loss
from conftest import fast_options, fit_fast


def _defects(labelled):
    return [s.path for s in labelled.test_defective]


@pytest.fixture(scope="module")
def capsnet(texture, labelled):
    return fit_fast("capsnet", texture, labelled)


def test_squash_keeps_the_direction_and_a_length_below_one():
    s = torch.randn(5, 3, 16) * torch.tensor([0.01, 1.0, 100.0]).view(1, 3, 1)
    v = squash(s, dim=-1)
    lengths, norms = v.norm(dim=-1), s.norm(dim=-1)
    assert (lengths < 1).all() and (lengths[:, 0] < 0.01).all() and (lengths[:, 2] > 0.99).all()
    torch.testing.assert_close(lengths, norms**2 / (1 + norms**2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v / lengths.unsqueeze(-1), s / norms.unsqueeze(-1), rtol=1e-4, atol=1e-5)


def test_routing_couples_each_input_to_the_parents_it_agrees_with():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 12, 2, 4) * 0.3
    # inputs 0-5 vote alike for parent 0, inputs 6-11 alike for parent 1; their other votes are noise
    u_hat[:, :6, 0] = torch.tensor([1.0, 0.5, 0.0, 0.0]) + 0.05 * torch.randn(2, 6, 4)
    u_hat[:, 6:, 1] = torch.tensor([0.0, 0.0, 1.0, -0.5]) + 0.05 * torch.randn(2, 6, 4)
    v, c = route_by_agreement(u_hat, iterations=3)
    assert v.shape == (2, 2, 4) and c.shape == (2, 12, 2)
    torch.testing.assert_close(c.sum(dim=2), torch.ones(2, 12))  # each input's couplings sum to one
    assert (v.norm(dim=-1) < 1).all()
    assert (c[:, :6, 0] > 0.6).all() and (c[:, 6:, 1] > 0.6).all()
    _, c1 = route_by_agreement(u_hat, iterations=1)
    torch.testing.assert_close(c1, torch.full_like(c1, 0.5))  # one iteration: uniform coupling


def test_refuses_a_fit_without_labelled_defects(texture):
    with pytest.raises(ValueError, match="learns from labelled defects"):
        anomalens.create("capsnet", **fast_options("capsnet")).fit(texture.train)


def test_batches_and_loss_balance_the_classes():
    torch.manual_seed(0)
    draws = torch.stack([torch.bincount(balanced_draw(5, 13), minlength=5) for _ in range(20)])
    assert (draws.sum(dim=1) == 13).all() and (draws.amax(dim=1) - draws.amin(dim=1) <= 1).all()
    few = balanced_draw(8, 3)
    assert len(set(few.tolist())) == 3 and few.max() < 8  # fewer than the defects: no repeats
    # 12 goods and 2 defects: each class carries half of the loss, and half of its gradient
    labels = torch.tensor([0] * 12 + [1] * 2)
    per_image = torch.ones(14, requires_grad=True)
    loss = class_balanced_mean(per_image * torch.where(labels == 1, 3.0, 1.0), labels)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(2.0)
    grad = per_image.grad
    assert float(grad[labels == 0].sum()) == pytest.approx(0.5) and float(
        grad[labels == 1].sum()
    ) == pytest.approx(1.5)


def test_wmw_option_adds_the_ranking_and_trains(texture, labelled):
    options = {**fast_options("capsnet"), "loss": "wmw"}
    det = anomalens.create("capsnet", **options)
    lengths = torch.tensor([[0.8, 0.3], [0.7, 0.2], [0.2, 0.25], [0.3, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    margin = anomalens.create("capsnet", **fast_options("capsnet")).objective(lengths, labels)
    rank = wmw_loss(lengths[:, 1], labels, gamma=0.3)
    torch.testing.assert_close(det.objective(lengths, labels), margin + rank)
    full_recall = anomalens.create("capsnet", **{**options, "loss": "wmw_full_recall", "full_recall_k": 1})
    hardest = torch.clamp(0.3 - (0.25 - lengths[:2, 1]), min=0).pow(2).mean()  # the lowest defect only
    torch.testing.assert_close(full_recall.objective(lengths, labels), margin + hardest)
    det.fit(texture.train, defects=_defects(labelled))
    assert det.fit_info["training"]["final_loss"] < det.fit_info["history"][0]["loss"]
    # the labelled defects it trained on rank above the goods it never saw
    goods = det.predict([s for s in texture.test if s.label == 0]).scores
    bad = det.predict(_defects(labelled)).scores
    labels = np.r_[np.zeros(len(goods)), np.ones(len(bad))]
    assert image_metrics(labels, np.r_[goods, bad])["image_auroc"] >= 0.9


def test_the_map_sums_the_capsule_and_points_at_the_defects(capsnet, texture):
    pixels = next(iter_batches(as_items(texture.test), capsnet.preprocess(), 64)).pixels
    length, shares = capsnet.inference_module().shares(pixels)
    torch.testing.assert_close(
        shares.sum(dim=(1, 2)), torch.sqrt(length / (1 - length)), rtol=1e-3, atol=1e-4
    )
    pred = capsnet.predict(texture.test)
    masks = [
        read_mask(s.mask_path, shape=m.shape) if s.mask_path else np.zeros(m.shape, bool)
        for s, m in zip(texture.test, pred.maps)
    ]
    assert pixel_metrics(masks, pred.maps)["pixel_auroc"] >= 0.6


def test_lite0_stem_is_frozen_saved_and_exported(texture, labelled, tmp_path):
    det = fit_fast("capsnet", texture, labelled, stem="lite0", image_size=32, epochs=2)
    stem = det.modules["net"].stem.extractor
    assert not any(p.requires_grad for p in stem.parameters()) and not stem.training
    path = det.save(tmp_path / "caps.model")
    again = anomalens.load(path)
    ref = det.predict(texture.test)
    np.testing.assert_array_equal(again.predict(texture.test).scores, ref.scores)
    got = OnnxDetector.load(export_onnx(det, tmp_path / "caps.onnx"), threads=1).predict(texture.test)
    assert np.abs(got.scores - ref.scores).max() < 1e-4
