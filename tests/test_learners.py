"""SimpleNet and DRAEM: what they learn from synthetic anomalies, and that the anomalies are the
synthesizer's (the contract and export tests cover fit / save / load / ONNX)."""

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

import anomalens
from anomalens.data.defects import DefectSynthesizer
from anomalens.data.inputs import as_items, iter_batches
from anomalens.metrics import image_metrics
from anomalens.models.draem import Draem, DraemModel, UNet, synthetic_batch
from anomalens.models.simplenet import truncated_l1
from conftest import fast_options


@pytest.fixture(scope="module")
def simplenet(texture):
    return anomalens.create("simplenet", **fast_options("simplenet")).fit(texture.train)


def test_truncated_l1_by_hand():
    true, fake = torch.tensor([1.0, 0.2]), torch.tensor([-1.0, 0.0])
    # true: max(0, 0.5 - 1) = 0 and 0.3 -> 0.15; fake: max(0, 0.5 - 1) = 0 and 0.5 -> 0.25
    assert float(truncated_l1(true, fake, 0.5)) == pytest.approx(0.4)


def test_simplenet_discriminator_separates_noised_features(simplenet, texture):
    det = simplenet
    model = det._scorer().eval()
    pixels = next(iter(iter_batches(as_items([s.path for s in texture.train]), det.preprocess(), 16))).pixels
    with torch.no_grad():
        true = model.adapt(det._embed(pixels))
        fake = true + det.options["noise_std"] * torch.randn(
            true.shape, generator=torch.Generator().manual_seed(0)
        )
        d_true, d_fake = model.discriminator(true)[:, 0], model.discriminator(fake)[:, 0]
    labels = [0] * len(d_true) + [1] * len(d_fake)
    # anomaly = -D: noised copies of the goods' features score higher than the features themselves
    # (0.86 of the pairs at the fast options; on unseen images the tiny training set separates 0.62)
    auroc = image_metrics(labels, (-torch.cat([d_true, d_fake])).numpy())["image_auroc"]
    assert auroc > 0.8 and float(d_true.mean()) > float(d_fake.mean())


def test_simplenet_score_is_the_max_of_its_map(simplenet, texture):
    pred = simplenet.predict(texture.test[:3])
    for score, amap in zip(pred.scores, pred.maps):
        assert score == pytest.approx(float(amap.max()), rel=1e-5)


def test_simplenet_is_deterministic_for_a_seed(texture):
    options = {**fast_options("simplenet"), "epochs": 3}
    a, b = (anomalens.create("simplenet", **options).fit(texture.train) for _ in range(2))
    np.testing.assert_array_equal(a.predict(texture.test[:3]).scores, b.predict(texture.test[:3]).scores)


def test_simplenet_rejects_pixel_augmentation():
    with pytest.raises(ValueError, match="simplenet: option augment does not apply"):
        anomalens.create("simplenet", augment="flip")


def test_draem_batch_masks_are_the_synthesizers():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32))
    seeds = [11, None, 7]
    images, masks = synthetic_batch(x, seeds, ("noise",))
    unit = ((x + 1) / 2).permute(0, 2, 3, 1).numpy()
    for i, seed in enumerate(seeds):
        if seed is None:  # kept good: same pixels, empty mask
            assert not masks[i].any() and torch.equal(images[i], x[i])
            continue
        want_image, want_mask = DefectSynthesizer(kinds=("perlin",), seed=seed, textures=("noise",)).make(
            unit[i], unit[(i + 1) % 3]
        )
        np.testing.assert_array_equal(masks[i, 0].numpy().astype(bool), want_mask)
        np.testing.assert_allclose(images[i].permute(1, 2, 0).numpy(), want_image * 2 - 1, atol=1e-6)
        changed = (images[i] != x[i]).any(dim=0).numpy()
        np.testing.assert_array_equal(changed, want_mask)  # exactly the mask's pixels differ


def test_draem_draws_the_same_defects_after_reseeding():
    det = Draem(**fast_options("draem"))
    torch.manual_seed(3)
    first = det.draw_seeds(16)
    torch.manual_seed(3)
    assert det.draw_seeds(16) == first
    assert any(s is None for s in first) and any(s is not None for s in first)  # anomaly_ratio 0.5


def test_draem_score_is_the_max_of_the_mean_filtered_map():
    torch.manual_seed(0)
    model = DraemModel(UNet(1, 1, 4, 2, skips=False), UNet(2, 1, 4, 2, skips=True), score_window=5).eval()
    with torch.no_grad():
        scores, maps = model(torch.randn(2, 1, 16, 16))
    # zero padding counted in the mean, as torch's avg_pool2d (the reference code's filter)
    want = [uniform_filter(m, 5, mode="constant").max() for m in maps.numpy().astype(np.float64)]
    np.testing.assert_allclose(scores.numpy(), want, rtol=1e-5)


def test_draem_options_fail_at_construction():
    with pytest.raises(ValueError, match="multiple of 2\\*\\*depth"):
        Draem(image_size=100, depth=4)
    with pytest.raises(ValueError, match="textures"):
        Draem(textures="dtd")
    with pytest.raises(ValueError, match="score_window"):
        Draem(score_window=4)
