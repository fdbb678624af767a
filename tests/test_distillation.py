"""Distillation detectors (EfficientAD-S, reverse distillation, STFPM): the paper's building blocks,
training lowers the loss, planted defects are found, save/load and ONNX Runtime reproduce scores."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import save_file
from torch import nn

import anomalens
from anomalens.data import read_image, read_mask
from anomalens.data.inputs import as_items, iter_batches
from anomalens.export import export_onnx, ort_session
from anomalens.metrics import image_metrics
from anomalens.models import ModelFileError
from anomalens.models.base import read_model_file
from anomalens.models.components.features import locally_aware_embedding, normalized_sq_distance
from anomalens.models.efficientad import (
    EfficientAd,
    EfficientAdAutoencoder,
    aggregate_channels,
    hard_feature_loss,
    pdn_output_size,
    pdn_small,
    penalty_textures,
)
from anomalens.models.reverse_distillation import OneClassBottleneck, ReverseDistillation, StudentDecoder
from anomalens.models.training import StepContext
from conftest import fast_options

NAMES = ("efficientad", "reverse_distillation", "stfpm")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """EfficientAD's distilled-teacher cache, private to this module."""
    path = tmp_path_factory.mktemp("anomalens_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANOMALENS_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def fitted(texture, cache_dir):
    return {name: anomalens.create(name, **fast_options(name)).fit(texture.train) for name in NAMES}


# -- building blocks ---------------------------------------------------------------------------
def test_pdn_and_autoencoder_have_the_papers_sizes():
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        assert pdn_small(8, padding=True)(x).shape == (1, 8, 32, 32)  # teacher pretraining: image / 4
        assert pdn_small(8)(x).shape == (1, 8, pdn_output_size(128), pdn_output_size(128)) == (1, 8, 24, 24)
        ae = EfficientAdAutoencoder(256, 384).eval()
        assert ae.encoder(torch.zeros(1, 3, 256, 256)).shape == (1, 64, 1, 1)  # a 1x1 global code
        assert ae(torch.zeros(1, 3, 256, 256)).shape == (1, 384, 56, 56)  # PDN-S's grid at 256 px
    sizes = [m.size for m in ae.decoder if isinstance(m, torch.nn.Upsample)]
    assert sizes == [3, 8, 15, 32, 63, 127, 56]  # the reference decoder at 256 px
    # same parameters with or without padding: the padded teacher's weights load unchanged
    assert pdn_small(384, padding=True).state_dict().keys() == pdn_small(384).state_dict().keys()


def test_hard_feature_loss_is_the_mean_of_the_top_tenth_percent():
    d = torch.arange(10000, dtype=torch.float32).view(1, 10, 10, 100)
    assert float(hard_feature_loss(d)) == pytest.approx(np.mean(np.arange(9990, 10000)))


def test_penalty_textures_are_varied_normalized_images():
    torch.manual_seed(0)
    t = penalty_textures(4, 64, torch.device("cpu"))
    assert t.shape == (4, 3, 64, 64) and float(t.min()) >= -1 - 1e-5 and float(t.max()) <= 1 + 1e-5
    assert float((t[0] - t[1]).abs().mean()) > 0.05


def test_efficientad_teacher_is_as_wide_as_a_narrower_backbone_without_copied_channels():
    det = EfficientAd(**{**fast_options("efficientad"), "out_channels": 384})
    backbone_channels = sum(det.extractor.channels)  # Lite0 stages 2 and 3: 40 + 112
    assert backbone_channels == 152 and det.teacher_channels == 152
    m = det._build_modules()
    assert m["teacher"][-1].out_channels == 152 and m["student"][-1].out_channels == 2 * 152
    assert m["autoencoder"].decoder[-1].out_channels == 152 and m["norm"].teacher_mean.shape[1] == 152
    torch.manual_seed(0)
    target = det._distillation_target(torch.randn(2, 3, 32, 32), 8)
    assert target.shape == (2, 152, 8, 8)
    flat = target.transpose(0, 1).flatten(1)
    gaps = (flat[:, None] - flat[None]).abs().amax(-1) + torch.eye(152) * 1e9
    assert float(gaps.min()) > 1e-4  # no two channels identical


def test_efficientad_wide_backbone_is_average_pooled_over_channel_groups():
    x = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 2, 2)
    assert aggregate_channels(x, 4)[0, :, 0, 0].tolist() == [0.5, 2.5, 4.5, 6.5]
    assert torch.equal(aggregate_channels(x, 8), x)
    with pytest.raises(ValueError, match="cannot aggregate 8 backbone channels to 16"):
        aggregate_channels(x, 16)

    class WideBackbone(nn.Module):
        """Two stages of 48 and 80 channels (128 in all) at strides 8 and 16."""

        channels = [48, 80]

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(3, 128, 1)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            f = self.proj(x)
            return [F.avg_pool2d(f[:, :48], 8), F.avg_pool2d(f[:, 48:], 16)]

    det = EfficientAd(**{**fast_options("efficientad"), "out_channels": 32})
    det._extractor = WideBackbone().requires_grad_(False)
    assert det.teacher_channels == 32
    x = torch.randn(2, 3, 32, 32)
    emb = locally_aware_embedding(det._extractor(F.interpolate(x, scale_factor=2, mode="bilinear")))
    expected = F.interpolate(emb, size=(8, 8), mode="bilinear").view(2, 32, 4, 8, 8).mean(2)
    torch.testing.assert_close(det._distillation_target(x, 8), expected)


def test_stfpm_distance_ignores_feature_scale():
    t = torch.randn(2, 8, 4, 4)
    assert torch.allclose(normalized_sq_distance(t, 3 * t), torch.zeros(2, 4, 4), atol=1e-6)
    assert torch.allclose(normalized_sq_distance(t, -t), torch.full((2, 4, 4), 2.0), atol=1e-5)


def test_reverse_distillation_bottleneck_and_decoder_mirror_the_encoder():
    feats = [torch.randn(2, 24, 16, 16), torch.randn(2, 40, 8, 8), torch.randn(2, 112, 4, 4)]
    code = OneClassBottleneck((24, 40, 112))(feats)
    assert code.shape == (2, 224, 2, 2)  # stride 32, twice the deepest width
    assert [tuple(d.shape) for d in StudentDecoder((24, 40, 112))(code)] == [tuple(f.shape) for f in feats]


@pytest.mark.parametrize("name", NAMES)
def test_training_steps_lower_the_loss(name, texture, cache_dir):
    det = anomalens.create(name, **fast_options(name))
    det._n_train = 4  # what fit sets before building the phases (EfficientAD's learning-rate schedule)
    det._set_modules(det._build_modules())
    phase = det._phases()[0]
    x = next(iter_batches(as_items(texture.train[:4]), det._preprocess(), 4)).pixels
    torch.manual_seed(0)

    def val() -> float:
        for m in det.modules.values():
            m.eval()
        with torch.no_grad():
            return float(phase.val_loss(x))

    before = val()
    for _ in range(5):
        for key, m in det.modules.items():
            m.train(phase.train_modules is None or key in phase.train_modules)
        phase.step(x, StepContext(torch.device("cpu"), None))
    assert val() < 0.9 * before


# -- fitted detectors --------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_planted_defects_found(name, fitted, texture):
    det = fitted[name]
    x = torch.randn(3, 3, 64, 64)
    scores, maps = det.inference_module()(x)
    assert scores.shape == (3,) and maps.shape == (3, 64, 64)
    assert torch.allclose(scores, maps.amax(dim=(1, 2)))  # the image score is the map's maximum
    pred = det.predict(texture.test)
    assert image_metrics([s.label for s in texture.test], pred.scores)["image_auroc"] >= 0.9
    # the map peaks inside the planted defect for most defective images
    inside = [
        amap[read_mask(s.mask_path, amap.shape) > 0].max() >= np.quantile(amap, 0.99)
        for s, amap in zip(texture.test, pred.maps)
        if s.label == 1
    ]
    assert np.mean(inside) >= 0.5


@pytest.mark.parametrize("name", NAMES)
def test_save_load_gives_identical_scores(name, fitted, texture, tmp_path):
    det = fitted[name]
    again = anomalens.load(det.save(tmp_path / f"{name}.model"))
    a, b = det.predict(texture.test[:4]), again.predict(texture.test[:4])
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-6, atol=1e-6)
    for m1, m2 in zip(a.maps, b.maps):
        np.testing.assert_allclose(m2, m1, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_onnx_runtime_reproduces_scores(name, fitted, texture, tmp_path):
    det = fitted[name]
    path = export_onnx(det, tmp_path / f"{name}.onnx")
    pre = det._preprocess()
    x = torch.stack([pre(read_image(s.path)) for s in texture.test[:4]])
    ref_scores, ref_maps = det._score_batch(x)
    mean, std = torch.tensor(pre.mean).view(1, 3, 1, 1), torch.tensor(pre.std).view(1, 3, 1, 1)
    scores, _, maps, _ = ort_session(path).run(None, {"image": (x * std + mean).numpy()})
    assert np.abs(scores - ref_scores).max() < 1e-4
    assert np.abs(maps - ref_maps).max() < 1e-4


def test_efficientad_teacher_is_cached_and_reused(fitted, texture, cache_dir):
    first = fitted["efficientad"]
    assert first.fit_info["teacher"].startswith("distilled")
    assert len(list((cache_dir / "efficientad").glob("teacher-*.safetensors"))) == 1
    again = EfficientAd(**fast_options("efficientad")).fit(texture.train)
    assert again.fit_info["teacher"].startswith("cached")
    np.testing.assert_allclose(
        again.predict(texture.test[:4]).scores, first.predict(texture.test[:4]).scores, rtol=1e-5, atol=1e-6
    )


def test_efficientad_map_quantiles_come_from_goods(fitted):
    norm = fitted["efficientad"].modules["norm"]
    for q in (norm.st_quantiles, norm.ae_quantiles):
        assert 0 < float(q[0]) < float(q[1])  # fitted, q_a < q_b


def test_efficientad_model_file_of_another_teacher_width_fails_in_one_line(fitted, tmp_path):
    """A model file whose teacher width the options no longer give (e.g. saved before the width was
    capped at the backbone's channels) is refused with a ModelFileError, not a size-mismatch traceback."""
    path = fitted["efficientad"].save(tmp_path / "efficientad.model")
    header, arrays = read_model_file(path)
    header["options"]["out_channels"] = 384  # now 152 wide on Lite0; the file's teacher is 64 wide
    old = tmp_path / "old.model"
    save_file(arrays, str(old), metadata={"anomalens": json.dumps(header)})
    with pytest.raises(ModelFileError, match="teacher has 64 channels, but out_channels=384") as err:
        anomalens.load(old)
    assert "\n" not in str(err.value)


def test_bad_options_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="image_size must be a multiple of 32"):
        EfficientAd(image_size=100)
    with pytest.raises(ValueError, match="three encoder stages"):
        ReverseDistillation(layers=(2, 3))
