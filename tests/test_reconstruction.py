"""Autoencoder, f-AnoGAN and GANomaly with tiny models on synthetic data: training lowers the
loss, a resumed fit equals an uninterrupted one, save/load and the exportable inference module
give identical scores, residual maps find planted defects, pixel F1 at tau, CLI resume."""

from collections import Counter

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data.inputs import as_items, iter_batches
from anomalens.metrics.pixel import pixel_f1_at_threshold
from anomalens.models.autoencoder import ConvAutoencoder
from anomalens.models.components.dcgan import DCEncoder
from anomalens.models.components.reconstruction import ResidualMap, ssim_map
from anomalens.models.fanogan import gradient_penalty
from anomalens.workflows.evaluate import evaluate

TINY = {
    "autoencoder": {
        "image_size": 32,
        "depth": 2,
        "width": 8,
        "latent": 32,
        "epochs": 3,
        "lr": 2e-3,
        "min_steps": 0,
    },
    "fanogan": {
        "image_size": 16,
        "width": 8,
        "latent": 16,
        "gan_epochs": 2,
        "epochs": 3,
        "lr": 1e-3,
        "min_steps": 0,
    },
    "ganomaly": {"image_size": 16, "width": 8, "latent": 16, "epochs": 3, "lr": 1e-3, "min_steps": 0},
}
MODELS = list(TINY)


def _tiny(name, **extra):
    return anomalens.create(name, batch_size=8, **{**TINY[name], **extra})


@pytest.fixture(scope="module")
def fitted(texture):
    # 16 goods: 2 calibrate, 3 validate (20 % of the 14 left), 11 train
    return {name: _tiny(name, validation_fraction=0.2).fit(texture.train) for name in MODELS}


def test_autoencoder_loss_decreases(texture):
    det = _tiny("autoencoder", epochs=8).fit(texture.train)
    history = det.fit_info["history"]
    assert len(history) == 8 and history[-1]["loss"] < 0.7 * history[0]["loss"]
    assert det.fit_info["training"]["stopped"] == "completed"


@pytest.mark.parametrize("name", MODELS)
def test_training_history_and_validation(name, fitted):
    info = fitted[name].fit_info
    phases = [r["phase"] for r in info["history"]]
    assert len(phases) == (5 if name == "fanogan" else 3)  # f-AnoGAN: GAN phase, then encoder phase
    assert all(np.isfinite(r["loss"]) for r in info["history"])
    assert np.isfinite(info["history"][-1]["val_loss"])  # validation on its own held-out goods
    assert info["n_validation"] == 3 and info["n_fit"] == 11


@pytest.mark.parametrize("name", MODELS)
def test_save_load_and_inference_module_give_identical_scores(name, fitted, texture, tmp_path):
    det = fitted[name]
    pred = det.predict(texture.test)
    again = anomalens.load(det.save(tmp_path / f"{name}.model"))
    pred2 = again.predict(texture.test)
    np.testing.assert_array_equal(pred.scores, pred2.scores)
    for a, b in zip(pred.maps, pred2.maps):
        np.testing.assert_array_equal(a, b)
    pixels = next(iter_batches(as_items(texture.test), det._preprocess(), 4)).pixels
    with torch.no_grad():
        scores, maps = det.inference_module()(pixels)
    np.testing.assert_allclose(scores.numpy(), pred.scores[:4], rtol=1e-5)
    assert maps.shape == (4, det.options["image_size"], det.options["image_size"])


def test_fanogan_feature_residual_is_scaled_by_the_goods_features(fitted, texture):
    det = fitted["fanogan"]
    pixels = torch.cat([b.pixels for b in iter_batches(as_items(texture.train), det._preprocess(), 8)])
    with torch.no_grad():
        goods_square = float(det.modules["critic"](pixels)[1].pow(2).mean())
    # measured on the fit's training goods (the calibration goods held out): close to all goods' value
    assert float(det.modules["feature_scale"].value) == pytest.approx(goods_square, rel=0.2)
    raw = _tiny("fanogan", feature_norm=False).fit(texture.train)
    assert float(raw.modules["feature_scale"].value) == 1.0  # the paper's unscaled A(x)


def test_fanogan_scores_by_default_the_maps_mean_and_izi_f_on_request(fitted, texture):
    det = fitted["fanogan"]
    assert det.options["score"] == "mean" and det.map_max_setting == "score=residual"
    pixels = next(iter_batches(as_items(texture.test), det._preprocess(), 6)).pixels
    with torch.no_grad():
        scores, maps = det._scorer()(pixels)
        torch.testing.assert_close(scores, maps.mean(dim=(1, 2)))
        # A(x) by hand: mean squared pixel residual + kappa * feature residual / the goods' feature scale
        m = det._scorer()
        recon = m.generator(m.encoder(pixels)[0])
        f_x, f_r = m.critic(pixels)[1], m.critic(recon)[1]
        a_x = (pixels - recon).pow(2).flatten(1).mean(1) + det.options["kappa"] * (f_x - f_r).pow(2).mean(
            1
        ) / float(det.modules["feature_scale"].value)
        for score, expected in (("izi_f", a_x), ("residual", maps.amax(dim=(1, 2)))):
            det.options["score"] = score
            try:
                torch.testing.assert_close(det._scorer()(pixels)[0], expected)
            finally:
                det.options["score"] = "mean"


class _Crash(Exception):
    pass


@pytest.mark.parametrize("name", ["autoencoder", "fanogan"])
def test_resumed_fit_equals_uninterrupted_fit(name, texture, tmp_path):
    full = _tiny(name).fit(texture.train, checkpoint_dir=tmp_path / "full")

    crashing = _tiny(name)
    build_phases = crashing._phases

    def phases_that_crash():
        phases = build_phases()
        last = phases[-1]
        inner, calls = last.step, []

        def step(x, ctx):  # dies in the last phase's second epoch (2 steps per epoch)
            calls.append(1)
            if len(calls) > 3:
                raise _Crash
            return inner(x, ctx)

        last.step = step
        return phases

    crashing._phases = phases_that_crash
    with pytest.raises(_Crash):
        crashing.fit(texture.train, checkpoint_dir=tmp_path / "crash")
    assert crashing.checkpoint_path.is_file()

    resumed = _tiny(name).fit(texture.train, checkpoint_dir=tmp_path / "crash", resume=True)
    assert resumed.fit_info["training"]["resumed_from"].endswith(":1")
    assert [r["loss"] for r in resumed.fit_info["history"]] == [r["loss"] for r in full.fit_info["history"]]
    np.testing.assert_array_equal(resumed.predict(texture.test).scores, full.predict(texture.test).scores)


def test_resume_needs_a_checkpoint_dir(texture):
    with pytest.raises(ValueError, match="checkpoint_dir"):
        _tiny("autoencoder").fit(texture.train, resume=True)


def test_min_steps_scales_every_phase_on_a_small_training_set(texture):
    # 16 goods less the calibration share at batch 8: 2 steps an epoch; 30 steps need 15 encoder epochs
    det = _tiny("fanogan", min_steps=30).fit(texture.train)
    epochs = Counter(row["phase"] for row in det.fit_info["history"])
    assert det.steps_per_epoch == 2 and epochs == {"gan": 10, "encoder": 15}
    assert Counter(r["phase"] for r in _tiny("fanogan").fit(texture.train).fit_info["history"]) == {
        "gan": 2,
        "encoder": 3,
    }
    with pytest.raises(ValueError, match="min_steps must be >= 0"):
        _tiny("autoencoder", min_steps=-1)


def test_autoencoder_residual_map_finds_planted_defects(texture):
    det = anomalens.create(
        "autoencoder",
        image_size=64,
        depth=2,
        width=16,
        latent=128,
        loss="l2",
        channels=1,
        epochs=25,
        lr=2e-3,
        batch_size=8,
        min_steps=0,
    ).fit(texture.train)
    m = evaluate(det, texture, per_type=False).metrics
    assert m["pixel_auroc"] >= 0.9
    at = m["at_threshold"]  # pixel F1 at the calibrated pixel threshold tau
    assert at["pixel_threshold"] == det.calibration.pixel_threshold and 0 < at["pixel_f1"] <= 1


def test_ssim_map_and_residual_map():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 3, 32, 32), atol=1e-4)
    y = x.clone()
    y[:, :, 10:14, 20:24] = -1.0  # a dark patch in one place
    for kind in ("l2", "ssim"):
        scores, maps = ResidualMap(kind, 32, sigma=1.0)(x, y)
        assert maps.shape == (2, 32, 32)
        peak = np.unravel_index(int(maps[0].argmax()), (32, 32))
        assert 8 <= peak[0] <= 15 and 18 <= peak[1] <= 25
        assert torch.allclose(scores, maps.amax(dim=(1, 2)))


def test_pixel_f1_at_threshold_counts_pixels():
    mask = np.zeros((4, 4), bool)
    mask[0, :2] = True
    amap = np.zeros((4, 4), np.float32)
    amap[0, :3] = 1.0  # 2 true positives, 1 false positive, no miss
    r = pixel_f1_at_threshold([mask, None], [amap, amap], threshold=0.5)
    assert r["pixel_precision"] == pytest.approx(2 / 3) and r["pixel_recall"] == 1.0
    assert r["pixel_f1"] == pytest.approx(0.8)


def test_bergmann_preset_and_explicit_options():
    det = anomalens.create("autoencoder", preset="bergmann", epochs=1)
    o = det.options
    assert (o["image_size"], o["depth"], o["latent"], o["loss"]) == (256, 5, 500, "l2+ssim")
    assert anomalens.create("autoencoder", preset="bergmann", latent=64).options["latent"] == 64
    ae = ConvAutoencoder(3, 256, 5, 32, 500)
    acts = [m for m in ae.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert acts and all(a.negative_slope == 0.01 for a in acts)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in ae.modules())
    with torch.no_grad():
        assert ae.encoder(torch.zeros(1, 3, 256, 256)).shape == (1, 500, 1, 1)
        assert ae(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 256, 256)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("autoencoder", {"loss": "l1"}, "loss='l1'"),
        ("autoencoder", {"image_size": 100}, "multiple of"),
        ("autoencoder", {"preset": "huge"}, "preset"),
        ("fanogan", {"image_size": 96}, "power of two"),
        ("ganomaly", {"augment": "shear"}, "unknown kind"),
        ("fanogan", {"gan_share": 1.5}, "gan_share"),
    ],
)
def test_bad_options_fail_clearly(name, options, message):
    with pytest.raises(ValueError, match=message):
        anomalens.create(name, **options)


def test_gradient_penalty_is_zero_for_a_unit_lipschitz_critic():
    critic = DCEncoder(1, 8, 2, 1, batchnorm=False)
    real, fake = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    gp = gradient_penalty(critic, real, fake)
    assert gp > 0

    class Linear(torch.nn.Module):  # f(x) = sum(x) * w with |w| * sqrt(64) = 1: gradient norm 1 everywhere
        def forward(self, x):
            return x.flatten(1).sum(1, keepdim=True) / 8.0, x

    assert float(gradient_penalty(Linear(), real, fake)) == pytest.approx(0.0, abs=1e-10)


def test_augmented_training_runs_and_differs(texture):
    plain = _tiny("autoencoder", epochs=1).fit(texture.train)
    aug = _tiny("autoencoder", epochs=1, augment="flip,rotate,noise").fit(texture.train)
    assert plain.fit_info["history"][0]["loss"] != aug.fit_info["history"][0]["loss"]


def test_cli_fit_resume_and_max_minutes(texture_root, texture, tmp_path):
    runner = CliRunner()
    out = tmp_path / "ae.model"
    args = [
        "fit",
        str(texture_root),
        "-m",
        "autoencoder",
        "-o",
        str(out),
        "-q",
        "--max-minutes",
        "5",
        *[f"--set={k}={v}" for k, v in TINY["autoencoder"].items()],
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert (tmp_path / "ae.model.checkpoints" / "autoencoder.ckpt.safetensors").is_file()
    first_model = anomalens.load(out)
    assert first_model.options["max_minutes"] == 5.0
    again = runner.invoke(app, [*args, "--resume"])  # the finished run is reloaded, not retrained
    assert again.exit_code == 0, again.output
    resumed = anomalens.load(out)
    assert resumed.fit_info["training"]["resumed_from"] is not None
    np.testing.assert_array_equal(
        resumed.predict(texture.test).scores, first_model.predict(texture.test).scores
    )
    bad = runner.invoke(
        app, ["fit", str(texture_root), "-m", "padim", "-o", str(tmp_path / "p.model"), "--resume"]
    )
    assert bad.exit_code == 2 and "not trained by epochs" in bad.output


def test_ssim_residual_exports_to_onnx_with_the_same_scores(texture, tmp_path):
    from anomalens.export import OnnxDetector, export_onnx

    det = _tiny("autoencoder", epochs=1, residual="ssim").fit(texture.train)
    path = export_onnx(det, tmp_path / "ae.onnx")
    ref, got = det.predict(texture.test), OnnxDetector.load(path, threads=1).predict(texture.test)
    assert np.abs(got.scores - ref.scores).max() < 1e-4
    assert max(float(np.abs(a - b).max()) for a, b in zip(got.maps, ref.maps)) < 1e-4


def _planted_squares(rng: np.random.Generator, n: int, defects: bool) -> list[np.ndarray]:
    """32 px grey noise; with `defects`, a 10 px black or white square at a random place."""
    images = [np.clip(0.5 + 0.05 * rng.standard_normal((32, 32)), 0, 1).astype(np.float32) for _ in range(n)]
    if defects:
        for i, im in enumerate(images):
            y, x = rng.integers(4, 18, 2)
            im[y : y + 10, x : x + 10] = float(i % 2)
    return images


@pytest.mark.parametrize("seed", [1])
def test_fanogan_default_score_finds_planted_defects(seed):
    """f-AnoGAN at its default image score (the residual map's mean), not the map-max setting the
    contract uses: a planted square ranks above every good (measured 1.0 on seeds 0-2). GANomaly's
    paper score is not tested this way: at this scale its latent distance stays near chance on
    2 of 3 seeds even after 40 epochs (1.0, 0.64, 0.50), see docs/reconstruction.md."""
    rng = np.random.default_rng(seed)
    train, goods, defects = (_planted_squares(rng, n, d) for n, d in ((24, False), (8, False), (8, True)))
    det = anomalens.create(
        "fanogan",
        image_size=32,
        width=8,
        latent=16,
        gan_epochs=10,
        epochs=10,
        lr=1e-3,
        channels=1,
        batch_size=8,
        min_steps=0,
        seed=seed,
    ).fit(train)
    assert det.options["score"] == "mean"
    scores = det.predict(goods + defects).scores
    assert scores[8:].min() > scores[:8].max()
