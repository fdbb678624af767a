"""CycleGAN-AD: needs labelled defects, learns the goods' identity and to move defects toward normal,
and scores by SSE, the map's maximum or the feature distance."""

import numpy as np
import pytest
import torch

import anomalens
from anomalens.data.inputs import as_items, iter_batches
from anomalens.data.io import read_mask
from anomalens.export import OnnxDetector, export_onnx
from anomalens.models.components.cyclegan import ResnetGenerator, flip_shift
from conftest import fast_options, fit_fast


@pytest.fixture(scope="module")
def fitted(texture, labelled):
    return fit_fast("cyclegan_ad", texture, labelled)


def _pixels(det, samples) -> torch.Tensor:
    return torch.cat(
        [b.pixels for b in iter_batches(as_items([s.path for s in samples]), det.preprocess(), 64)]
    )


def test_refuses_a_fit_without_defects(texture):
    det = anomalens.create("cyclegan_ad", **fast_options("cyclegan_ad"))
    with pytest.raises(ValueError, match="cyclegan_ad learns from labelled defects: give some"):
        det.fit(texture.train)


def test_rejects_bad_options():
    with pytest.raises(ValueError, match="score='ssd'; use one of sse, max, feature"):
        anomalens.create("cyclegan_ad", score="ssd")
    with pytest.raises(ValueError, match="image_size 30 must be a multiple of 4"):
        anomalens.create("cyclegan_ad", image_size=30)


def test_learns_from_every_labelled_defect(fitted, labelled):
    assert (
        fitted.fit_info["defects"]["n"]
        == fitted.fit_info["n_defects_trained"]
        == len(labelled.test_defective)
    )
    assert len(fitted.trained_on) == len(labelled.test_defective)


def test_cycle_and_identity_losses_decrease(fitted):
    history = fitted.fit_info["history"]
    for key in ("cycle", "identity"):
        first = np.mean([row[key] for row in history[:3]])
        last = np.mean([row[key] for row in history[-3:]])
        assert last < 0.6 * first, (key, first, last)


def test_goods_translate_close_to_identity(fitted, texture):
    x = _pixels(fitted, texture.test_good)
    o = fitted.options
    untrained = ResnetGenerator(o["channels"], o["width"], o["blocks"], o["norm"]).eval()
    with torch.no_grad():
        trained_error = (fitted.modules["cyclegan"].to_normal(x) - x).abs().mean()
        untrained_error = (untrained(x) - x).abs().mean()
    # in [-1, 1] units (measured 0.098, a fresh generator 0.25)
    assert trained_error < 0.15 and trained_error < 0.5 * untrained_error


def test_defects_move_toward_normal(fitted, texture):
    """The translation changes the defect's pixels, not the rest: the map is larger on the masks."""
    pred = fitted.predict(texture.test_defective)
    ratios = []
    for sample, amap in zip(texture.test_defective, pred.maps):
        mask = read_mask(sample.mask_path, shape=amap.shape)
        ratios.append(amap[mask].mean() / amap[~mask].mean())
    assert np.median(ratios) > 1.5 and min(ratios) > 1.0, ratios


def test_score_options(fitted, texture):
    x = _pixels(fitted, texture.test)
    scorer = fitted._scorer()
    with torch.no_grad():
        residual = x - fitted.modules["cyclegan"].to_normal(x)
        sse, maps = scorer(x)
        scorer.score = "max"
        peak, _ = scorer(x)
    np.testing.assert_allclose(sse.numpy(), residual.pow(2).sum(dim=(1, 2, 3)).numpy(), rtol=1e-5)
    np.testing.assert_allclose(peak.numpy(), maps.amax(dim=(1, 2)).numpy(), rtol=1e-6)
    assert not np.allclose(np.argsort(sse.numpy()), np.argsort(peak.numpy()))


def test_feature_score_saves_loads_and_exports(texture, labelled, tmp_path):
    """score=feature (the default, with batch norm): the backbone joins the graph and its checksum
    the model file."""
    det = fit_fast("cyclegan_ad", texture, labelled, score="feature", norm="batch", image_size=32, epochs=1)
    pred = det.predict(texture.test)
    assert np.isfinite(pred.scores).all() and len(np.unique(pred.scores)) == len(pred.scores)
    again = anomalens.load(det.save(tmp_path / "feature.model"))
    np.testing.assert_allclose(again.predict(texture.test).scores, pred.scores, rtol=1e-5)
    onnx = OnnxDetector.load(export_onnx(det, tmp_path / "feature.onnx"), threads=1).predict(texture.test)
    np.testing.assert_allclose(onnx.scores, pred.scores, rtol=1e-4, atol=1e-4)


def test_defect_augmentation_flips_and_shifts_within_the_image():
    torch.manual_seed(0)
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    out = flip_shift(x.repeat(16, 1, 1, 1), 2)
    assert out.shape == (32, 1, 8, 8)
    assert not torch.equal(out, x.repeat(16, 1, 1, 1))  # something moved
    # reflect padding: every value comes from its own image, never a zero border
    for i in range(32):
        assert set(out[i].unique().tolist()) <= set(x[i % 2].unique().tolist())
    flips = flip_shift(x.repeat(8, 1, 1, 1), 0)
    for i in range(16):
        image = x[i % 2]
        assert any(
            torch.equal(flips[i], f) for f in (image, image.flip(-1), image.flip(-2), image.flip(-1, -2))
        )
