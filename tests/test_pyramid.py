"""Deep pyramidal autoencoder and PIADE: the perceptual loss falls on goods, dynamic routing
matches Sabour et al.'s equations (coupling coefficients sum to one over the latent capsules),
bad options fail in one line."""

import numpy as np
import pytest
import torch

import anomalens
from anomalens.data.inputs import as_items, iter_batches
from anomalens.models.components.capsules import squash
from anomalens.models.components.pyramid import DynamicRouting, PerceptualResidual
from conftest import fast_options


def _perceptual_term(det, images) -> float:
    """Mean feature residual (the perceptual part of the loss) over `images`, no pixel term."""
    residual = PerceptualResidual(det.extractor)
    total, n = 0.0, 0
    with torch.no_grad():
        for batch in iter_batches(as_items(images), det.preprocess(), 8):
            _, features = residual(batch.pixels, det.modules["ae"](batch.pixels))
            total += float(sum(f.mean(dim=(1, 2)) for f in features).sum())
            n += len(batch.pixels)
    return total / n


# PIADE's perceptual term falls more slowly over these 8 epochs than pyramid_ae's: a smaller drop asked
@pytest.mark.parametrize(("name", "ratio"), [("pyramid_ae", 0.7), ("piade", 0.9)])
def test_perceptual_loss_decreases_on_goods(name, ratio, texture):
    det = anomalens.create(name, **{**fast_options(name), "epochs": 8}).fit(texture.train)
    trained = _perceptual_term(det, texture.train)
    det._set_modules(det._build_modules())  # same options, untrained weights
    untrained = _perceptual_term(det, texture.train)
    history = det.fit_info["history"]
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    assert trained < ratio * untrained


def _reference_routing(u_hat: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Sabour et al.'s Procedure 1 for one position, u_hat (L inputs, K outputs, D), in plain numpy."""
    b = np.zeros(u_hat.shape[:2])
    for it in range(iterations):
        c = np.exp(b) / np.exp(b).sum(axis=1, keepdims=True)
        s = (c[:, :, None] * u_hat).sum(axis=0)
        norm2 = (s**2).sum(axis=1, keepdims=True)
        v = norm2 / (1 + norm2) * s / np.sqrt(norm2)
        if it + 1 < iterations:
            b = b + (u_hat * v[None]).sum(axis=2)
    return v, c


def test_routing_coefficients_sum_to_one_and_follow_the_agreement():
    torch.manual_seed(0)
    routing = DynamicRouting(levels=3, code=5, capsules=4, capsule_dim=2, iterations=3)
    codes = [torch.randn(2, 5, 3, 3) for _ in range(3)]
    v, c = routing.route(codes)
    assert v.shape == (2, 8, 3, 3) and c.shape == (2, 3, 4, 3, 3)
    torch.testing.assert_close(c.sum(dim=2), torch.ones(2, 3, 3, 3))
    # against the reference at one position
    u_hat = torch.stack([p(x) for p, x in zip(routing.predict, codes)], 1).reshape(2, 3, 4, 2, 3, 3)
    ref_v, ref_c = _reference_routing(u_hat[1, :, :, :, 2, 0].detach().double().numpy(), 3)
    np.testing.assert_allclose(c[1, :, :, 2, 0].detach().numpy(), ref_c, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(v[1, :, 2, 0].detach().numpy(), ref_v.reshape(-1), rtol=1e-4, atol=1e-6)
    # routing moves weight off uniform: every level then favours the capsule it agrees with most
    assert (c.amax(dim=2) > 0.25 + 1e-3).all()
    short = squash(torch.tensor([[3.0, 4.0]]), dim=1)
    torch.testing.assert_close(short, torch.tensor([[3.0, 4.0]]) * 25 / 26 / 5)


def test_piade_rejects_bad_routing_options():
    with pytest.raises(ValueError, match="routing_iterations"):
        anomalens.create("piade", routing_iterations=0)
    with pytest.raises(ValueError, match="levels"):
        anomalens.create("pyramid_ae", levels=5, depth=4)
