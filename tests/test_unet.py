"""The supervised U-Net (`unet`): it needs masked defects, never scores an image it trained on, learns
(its loss falls) and localizes the synthetic defects; its loss and joint augmentation by hand."""

import json
import math

import numpy as np
import pytest
import torch

import anomalens
from anomalens.data import load_mvtec
from anomalens.data.io import read_mask
from anomalens.data.labels import split_train_defects
from anomalens.metrics import pixel_metrics
from anomalens.models.unet import dice_loss, joint_augment, segmentation_loss
from anomalens.thresholds import image_digests
from anomalens.workflows.evaluate import evaluate
from conftest import fast_options, fit_fast


@pytest.fixture(scope="module")
def unet(texture, labelled):
    return fit_fast("unet", texture, labelled)


def test_refuses_a_fit_without_defects_or_without_masks(texture, labelled):
    det = anomalens.create("unet", **fast_options("unet"))
    with pytest.raises(ValueError, match="learns from labelled defects"):
        det.fit(texture.train)
    defects = labelled.test_defective
    with pytest.raises(ValueError, match="needs a pixel mask"):
        det.fit(texture.train, defects=[s.path for s in defects], defect_masks=[None] * len(defects))
    with pytest.raises(ValueError, match="augment does not apply"):
        anomalens.create("unet", augment="noise")


def test_cli_fit_and_evaluate_with_train_defects_never_score_a_training_defect(texture_root, tmp_path):
    from typer.testing import CliRunner

    from anomalens.cli import app

    model = tmp_path / "unet.model"
    options = {
        "image_size": 64,
        "batch_size": 8,
        "layers": "0,1",
        "frozen_stages": 2,
        "epochs": 2,
        "min_steps": 0,
    }
    sets = [arg for k, v in options.items() for arg in ("--set", f"{k}={v}")]
    runner = CliRunner()
    fit = ["fit", str(texture_root), "-m", "unet", "--train-defects", "1", "--seed", "4", "-q"]
    result = runner.invoke(app, [*fit, *sets, "-o", str(model)])
    assert result.exit_code == 0, result.output
    dataset = load_mvtec(texture_root)
    rest, moved = split_train_defects(dataset, 1, seed=4)
    trained = {s.path for s in moved if s.label == 1}
    assert len(trained) == 3  # one per synthetic defect type
    det = anomalens.load(model)
    assert det.trained_on == set(image_digests(str(p) for p in trained))

    metrics_file = tmp_path / "m.json"
    args = ["evaluate", str(model), str(texture_root), "--train-defects", "1", "--seed", "4", "-q"]
    result = runner.invoke(app, [*args, "--json", str(metrics_file)])
    assert result.exit_code == 0, result.output
    metrics = json.loads(metrics_file.read_text())
    assert metrics["n_left_out_trained_on"] == 0 and metrics["n_images"] == len(rest.test)
    # the same evaluation in Python: its scored paths hold none of the training defects
    split = evaluate(det, rest, per_type=False)
    assert {s.path for s in split.samples} == {s.path for s in rest.test}
    assert not trained & {s.path for s in split.samples}
    # on the whole test split the model's own record still leaves them out
    full = evaluate(det, dataset, per_type=False)
    assert full.metrics["n_left_out_trained_on"] == len(trained)
    assert not trained & {s.path for s in full.samples}


def test_loss_falls_and_it_localizes_the_synthetic_defects(unet, texture):
    losses = [row["loss"] for row in unet.fit_info["history"]]
    assert losses[-1] < 0.8 * losses[0]
    pred = unet.predict(texture.test)
    masks = [
        None if s.mask_path is None else read_mask(s.mask_path, shape=m.shape)
        for s, m in zip(texture.test, pred.maps)
    ]
    masks = [np.zeros(m.shape, bool) if k is None else k for k, m in zip(masks, pred.maps)]
    assert pixel_metrics(masks, pred.maps)["pixel_auroc"] > 0.9
    # the image score is the (smoothed) map's maximum
    np.testing.assert_allclose(pred.scores, [m.max() for m in pred.maps], rtol=1e-5)


def test_focal_dice_by_hand():
    logits = torch.tensor([[[[2.0, -1.0], [0.0, -3.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    p = [1 / (1 + math.exp(-v)) for v in (2.0, -1.0, 0.0, -3.0)]
    y = [1, 0, 1, 0]
    p_t = [pi if yi else 1 - pi for pi, yi in zip(p, y)]
    focal = sum(-((1 - q) ** 2) * math.log(q) for q in p_t) / 4
    dice = 1 - (2 * (p[0] + p[2]) + 1) / (sum(p) + 2 + 1)
    assert float(dice_loss(logits, target)) == pytest.approx(dice, rel=1e-5)
    assert float(segmentation_loss(logits, target, "focal_dice", 2.0)) == pytest.approx(
        focal + dice, rel=1e-5
    )
    bce = -sum(math.log(q) for q in p_t) / 4
    assert float(segmentation_loss(logits, target, "bce", 2.0)) == pytest.approx(bce, rel=1e-5)
    # a good image (empty mask) is pushed towards zero probability, and a confident right answer costs ~0
    empty = torch.zeros_like(target)
    assert float(dice_loss(torch.full_like(logits, -8.0), empty)) < float(dice_loss(logits, empty))
    sure = torch.where(target > 0, 12.0, -12.0)
    assert float(segmentation_loss(sure, target, "focal_dice", 2.0)) < 1e-3


def test_joint_augmentation_moves_image_and_mask_together():
    torch.manual_seed(0)
    mask = torch.zeros(6, 1, 32, 32)
    mask[:, :, 4:12, 20:30] = 1
    image = torch.rand(6, 3, 32, 32) * 0.5 + mask * 2  # the defect is the only bright part
    x, y = joint_augment(image, mask, flips=True, max_shift=0.2)
    assert x.shape == image.shape and y.shape == mask.shape
    assert torch.equal(y > 0.5, (x > 1).all(dim=1, keepdim=True))
    assert not torch.equal(y, mask)  # something moved
