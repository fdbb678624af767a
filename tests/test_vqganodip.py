"""VQGanoDIP: the vector quantizer, the adaptive GAN weight, the classifier stage on labelled defects
(its trees run in torch exactly as scikit-learn runs them) and the composite score without labels."""

import numpy as np
import pytest
import torch
from sklearn.ensemble import AdaBoostClassifier, ExtraTreesClassifier, HistGradientBoostingClassifier
from sklearn.utils.class_weight import compute_sample_weight

import anomalens
from anomalens.data.inputs import as_items, iter_batches
from anomalens.metrics import image_metrics
from anomalens.models.components.vq import VectorQuantizer
from anomalens.models.refine import ClassifierModule, fit_classifier, probability
from anomalens.models.vqganodip import FEATURES, adaptive_weight
from conftest import fast_options

# 32 px, 2 levels, a few seconds: too coarse for the composite score alone to find the synthetic
# defects well (image AUROC 0.58), which the classifier on labelled defects then does better (0.78)
TINY = {**fast_options("vqganodip"), "image_size": 32, "min_steps": 0, "ae_epochs": 20, "epochs": 20}


def test_quantizer_picks_the_nearest_code_and_passes_gradients_straight_through():
    vq = VectorQuantizer(3, 2)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    # a 1 x 2 x 1 x 3 latent grid: nearest codes 1, 2, 0
    z_e = torch.tensor([[[[0.9, 0.1, -0.2]], [[0.2, 1.5, 0.1]]]], requires_grad=True)
    out = vq(z_e)
    assert out.indices.tolist() == [[[1, 2, 0]]]
    codes = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    torch.testing.assert_close(out.z_q[0, :, 0], codes)
    expected = ((z_e.detach()[0, :, 0] - codes) ** 2).sum(0)  # per position
    torch.testing.assert_close(out.distance[0, 0], expected)
    torch.testing.assert_close(out.codebook, expected.sum()[None] / 6)
    torch.testing.assert_close(out.commitment, out.codebook)
    # straight-through: d(sum w * z_q)/d z_e = w
    w = torch.arange(6.0).view(1, 2, 1, 3)
    (g,) = torch.autograd.grad((out.z_q * w).sum(), z_e)
    torch.testing.assert_close(g, w)
    # the codebook term moves the chosen codes towards the latents, the commitment term the latents
    out.codebook.sum().backward()
    grad_codes = vq.embedding.weight.grad
    torch.testing.assert_close(grad_codes[1], 2 * (torch.tensor([1.0, 0.0]) - z_e.detach()[0, :, 0, 0]) / 6)
    assert z_e.grad is None or torch.count_nonzero(z_e.grad) == 0
    (g_commit,) = torch.autograd.grad(vq(z_e).commitment.sum(), z_e)
    torch.testing.assert_close(g_commit[0, :, 0], 2 * (z_e.detach()[0, :, 0] - codes) / 6)


def test_adaptive_lambda_is_the_gradient_ratio_at_the_last_layer():
    first = torch.nn.Linear(2, 2, bias=False)
    last = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0]]))
        last.weight.copy_(torch.tensor([[2.0, -1.0]]))
    x = torch.tensor([[1.0, 1.0]])
    h = first(x)  # (1, 3)
    out = last(h)  # 2 - 3 = -1
    rec = (out - 1).pow(2).sum()  # d/d last.weight = 2 (out - 1) h = -4 h
    gan = -5 * out.sum() + h.pow(2).sum()  # d/d last.weight = -5 h (the h term reaches only `first`)
    delta = 1e-4
    h_norm = float(h.detach().norm())
    lam = adaptive_weight(rec, gan, last.weight, delta)
    assert float(lam) == pytest.approx(4 * h_norm / (5 * h_norm + delta), rel=1e-6)
    # at the first layer the ratio differs: the last layer's is the one taken
    g_rec = torch.autograd.grad(rec, first.weight, retain_graph=True)[0].norm()
    g_gan = torch.autograd.grad(gan, first.weight, retain_graph=True)[0].norm()
    assert abs(float(g_rec / (g_gan + delta)) - float(lam)) > 0.1
    assert not lam.requires_grad


@pytest.mark.parametrize("kind", ["extra_trees", "adaboost", "hist_gradient_boosting", "logistic"])
def test_classifier_in_torch_gives_scikit_learns_probabilities(kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 6)).astype(np.float32).astype(np.float64)
    y = (x[:, 0] + 0.3 * x[:, 1] + 0.5 * rng.normal(size=150) > 1).astype(int)
    probe = (rng.normal(size=(200, 6)) * 1.5).astype(np.float32)
    arrays = fit_classifier(x, y, kind, seed=3)
    if kind != "logistic":  # probes sitting exactly on (float32-rounded) thresholds
        t = arrays["threshold"][arrays["left"] >= 0][:50]
        probe[:50, 0] = t.astype(np.float32)
        probe[50:100, 1] = np.nextafter(t.astype(np.float32), np.float32(np.inf))
    if kind == "extra_trees":
        ref = ExtraTreesClassifier(n_estimators=100, class_weight="balanced", random_state=3).fit(x, y)
    elif kind == "adaboost":
        ref = AdaBoostClassifier(n_estimators=100, random_state=3).fit(
            x, y, sample_weight=compute_sample_weight("balanced", y)
        )
    elif kind == "hist_gradient_boosting":
        # fit_classifier's leaf size for 150 labels: 150 // 10
        ref = HistGradientBoostingClassifier(
            class_weight="balanced", min_samples_leaf=15, random_state=3
        ).fit(x, y)
    expected = probability(kind, arrays, probe.astype(np.float64))
    if kind != "logistic":
        np.testing.assert_allclose(expected, ref.predict_proba(probe.astype(np.float64))[:, 1], atol=1e-12)
    got = ClassifierModule(kind, arrays)(torch.from_numpy(probe)).double().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert 0.05 < expected.mean() < 0.95  # the probes cover both classes


@pytest.fixture(scope="module")
def with_labels(texture, labelled):
    defects = labelled.test_defective
    det = anomalens.create("vqganodip", **TINY)
    return det.fit(texture.train, defects=[s.path for s in defects])


def test_labelled_defects_train_the_classifier_that_scores(with_labels, texture, labelled):
    det = with_labels
    assert det.fit_info["vqganodip"]["classifier"] == "extra_trees"
    assert det.fit_info["vqganodip"]["n_defects"] == len(labelled.test_defective)
    assert det.fit_info["defects"]["n"] == len(labelled.test_defective)
    pred = det.predict(texture.test)
    labels = np.array([s.label for s in texture.test])
    model = det.inference_module()
    assert model.classifier is not None and ((pred.scores >= 0) & (pred.scores <= 1)).all()
    # the same network without the classifier: the composite (mean z-score) - another score
    model.classifier = None
    pixels = torch.cat(
        [b.pixels for b in iter_batches(as_items([s.path for s in texture.test]), det.preprocess(), 64)]
    )
    with torch.no_grad():
        feats, _ = model.features(pixels)
        z = model.composite(feats).double().numpy()
        composite = model(pixels)[0].numpy()
    kind, arrays = det._classifier
    # the score is the classifier's probability of the standardized features (numpy reference)
    np.testing.assert_allclose(probability(kind, arrays, z), pred.scores, atol=1e-5)
    np.testing.assert_allclose(composite, z.mean(1), rtol=1e-5, atol=1e-5)
    assert not np.allclose(composite, pred.scores, atol=1e-2)
    supervised = image_metrics(labels, pred.scores)["image_auroc"]
    assert supervised >= image_metrics(labels, composite)["image_auroc"] + 0.1


def test_without_labels_the_composite_scores_and_saves(texture, tmp_path):
    det = anomalens.create("vqganodip", **{**TINY, "ae_epochs": 4, "epochs": 4, "composite": "mahalanobis"})
    det.fit(texture.train)
    assert "classifier" not in det.fit_info["vqganodip"] and det.inference_module().classifier is None
    pred = det.predict(texture.test)
    assert (pred.scores >= 0).all()  # a squared Mahalanobis distance
    again = anomalens.load(det.save(tmp_path / "v.model"))
    np.testing.assert_allclose(again.predict(texture.test).scores, pred.scores, rtol=1e-5, atol=1e-6)
    comp = det.modules["composite"]
    assert comp.mean.shape == (len(FEATURES),) and (comp.std > 0).all()


def test_options_are_checked():
    with pytest.raises(ValueError, match="classifier"):
        anomalens.create("vqganodip", classifier="svm")
    with pytest.raises(ValueError, match="composite"):
        anomalens.create("vqganodip", composite="max")
    with pytest.raises(ValueError, match="multiple of"):
        anomalens.create("vqganodip", image_size=100, levels=3)
    with pytest.raises(ValueError, match="ae_share"):
        anomalens.create("vqganodip", ae_share=1.0)
