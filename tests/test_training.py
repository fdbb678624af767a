"""The shared training engine: loss goes down, checkpoints resume exactly, early stopping,
time budget, multi-phase / multi-optimizer runs and augmentations."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from anomalens.models.training import (
    CheckpointError,
    Phase,
    TrainConfig,
    Trainer,
    augment_batch,
    parse_augment,
)


def _data(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 1, 8, 8, generator=g)
    return base.repeat(n // 4, 1, 1, 1) + 0.05 * torch.randn(n, 1, 8, 8, generator=g)


def _setup(lr=1e-2, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.1), nn.Linear(8, 64), nn.Unflatten(1, (1, 8, 8))
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)

    def step(x, ctx):
        with ctx.autocast():
            loss = F.mse_loss(net(x + 0.01 * torch.randn_like(x)), x)  # uses the global RNG on purpose
        ctx.update(loss, opt)
        return {"loss": loss}

    def val_loss(x):
        return F.mse_loss(net(x), x)

    return net, opt, step, val_loss


def _run(tmp_path, epochs, resume=False, patience=0, **cfg):
    net, opt, step, val_loss = _setup()
    trainer = Trainer(
        {"net": net},
        TrainConfig(batch_size=8, seed=3, checkpoint=tmp_path / "c.safetensors", resume=resume, **cfg),
    )
    result = trainer.fit(
        [Phase("train", step, epochs, {"adam": opt}, val_loss=val_loss, patience=patience)],
        _data(),
        _data(8, seed=1),
    )
    return net, result


def test_loss_decreases_and_history_is_recorded(tmp_path):
    _, result = _run(tmp_path, 15)
    losses = [r["loss"] for r in result.history]
    assert len(result.history) == 15 and result.stopped == "completed"
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]


class _Crash(Exception):
    pass


def test_resume_after_crash_matches_an_uninterrupted_run(tmp_path):
    full_net, full = _run(tmp_path / "full", 6)

    # crash in epoch 4: the step function raises (like Ctrl-C) after 3 finished epochs
    net, opt, step, val_loss = _setup()
    calls = {"n": 0}

    def crashing_step(x, ctx):
        calls["n"] += 1
        if calls["n"] > 3 * 3 + 1:  # 3 steps per epoch (24 images / batch 8)
            raise _Crash
        return step(x, ctx)

    cfg = TrainConfig(batch_size=8, seed=3, checkpoint=tmp_path / "crash" / "c.safetensors")
    with pytest.raises(_Crash):
        Trainer({"net": net}, cfg).fit(
            [Phase("train", crashing_step, 6, {"adam": opt}, val_loss=val_loss)], _data(), _data(8, seed=1)
        )
    saved = load_file(str(tmp_path / "crash" / "c.safetensors"))
    assert any(k.startswith("optim/train/adam/") for k in saved)  # optimizer moments are checkpointed

    resumed_net, resumed = _run(tmp_path / "crash", 6, resume=True)
    assert resumed.resumed_from == "train:3"
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for a, b in zip(full_net.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_a_checkpoint_of_another_configuration(tmp_path):
    _run(tmp_path, 2)
    with pytest.raises(CheckpointError, match="another model configuration"):
        _run(tmp_path, 3, resume=True)


def test_resume_of_a_finished_run_restores_its_weights_without_training(tmp_path):
    net, _ = _run(tmp_path, 3)
    again, result = _run(tmp_path, 3, resume=True)
    assert result.history and result.stopped == "completed"
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_early_stopping_restores_the_best_weights(tmp_path):
    net, opt, _, _ = _setup()
    vals = iter([1.0, 0.5, 0.7, 0.8, 0.9, 0.95])
    seen = []

    def step(x, ctx):
        loss = F.mse_loss(net(x), x)
        ctx.update(loss, opt)
        return {"loss": loss}

    def val_loss(x):
        seen.append({k: v.clone() for k, v in net.state_dict().items()})
        return torch.tensor(next(vals))

    result = Trainer({"net": net}, TrainConfig(batch_size=24, seed=0)).fit(
        [Phase("train", step, 10, {"adam": opt}, val_loss=val_loss, patience=2)], _data(), _data(8, seed=1)
    )
    assert len(result.history) == 4 and result.stopped == "early stopping (train)"
    for k, v in net.state_dict().items():
        assert torch.equal(v, seen[1][k])  # epoch 2 had the best validation loss


def test_time_budget_stops_training(tmp_path):
    _, result = _run(tmp_path, 10_000, max_minutes=0.02)
    assert result.stopped == "time budget (train)" and len(result.history) < 10_000
    assert result.seconds < 10


def test_two_phases_and_two_optimizers(tmp_path):
    torch.manual_seed(0)
    a, b = nn.Linear(64, 64), nn.Linear(64, 64)
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.05), torch.optim.Adam(b.parameters(), lr=1e-2)
    mode = {}

    def phase1(x, ctx):
        x = x.flatten(1)
        loss_a = F.mse_loss(a(x), x)
        ctx.update(loss_a, opt_a)
        loss_b = F.mse_loss(b(x), x)
        ctx.update(loss_b, opt_b)
        return {"loss": loss_a + loss_b}

    def phase2(x, ctx):
        mode["a"], mode["b"] = a.training, b.training
        x = x.flatten(1)
        loss = F.mse_loss(b(a(x).detach()), x)
        ctx.update(loss, opt_b)
        return {"loss": loss}

    phases = [
        Phase("first", phase1, 3, {"a": opt_a, "b": opt_b}),
        Phase("second", phase2, 2, {"b2": opt_b}, train_modules=("b",)),
    ]
    result = Trainer({"a": a, "b": b}, TrainConfig(batch_size=8, checkpoint=tmp_path / "c.safetensors")).fit(
        phases, _data()
    )
    assert [r["phase"] for r in result.history] == ["first"] * 3 + ["second"] * 2
    assert mode == {"a": False, "b": True}
    assert not a.training and not b.training  # everything back in eval mode after training


def test_augmentations_change_the_batch_and_are_validated():
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4)
    torch.manual_seed(0)
    noisy = augment_batch(x, ("noise",))
    assert not torch.equal(noisy, x) and (noisy - x).abs().max() < 0.2
    torch.manual_seed(1)
    flipped = augment_batch(x, ("flip",))
    assert sorted(flipped.flatten().tolist()) == sorted(x.flatten().tolist())  # same pixels, moved
    assert augment_batch(x, ("rotate",)).shape == x.shape
    assert parse_augment("flip, noise") == ("flip", "noise")
    with pytest.raises(ValueError, match="unknown kind"):
        parse_augment("flip,shear")


def test_validation_and_calibration_goods_are_apart_from_training_and_each_other(texture):
    import anomalens
    from anomalens.data.inputs import as_items
    from anomalens.models.base import split_items
    from conftest import fast_options

    options = {**fast_options("autoencoder"), "calibration_fraction": 0.1, "validation_fraction": 0.2}
    det = anomalens.create("autoencoder", **options).fit(texture.train)
    # 16 goods: round(1.6) = 2 for calibration, then round(0.2 * 14) = 3 for validation, 11 to train on
    info = det.fit_info
    assert (info["n_calibration"], info["n_validation"], info["n_fit"]) == (2, 3, 11)
    _, calibration = split_items(as_items(texture.train), 0.1, det.options["seed"])
    validation = {it.key for it in det._validation_items}
    assert len(validation) == 3 and validation.isdisjoint(it.key for it in calibration)
    # a set too small for one validation good keeps every remaining good for training
    small = anomalens.create("autoencoder", **options).fit(texture.train[:3])  # 1 calibrates, 2 train
    assert small.fit_info["n_validation"] == 0 and small.fit_info["n_fit"] == 2


def test_patchcore_never_sees_its_calibration_goods(texture):
    import anomalens
    from conftest import fast_options

    det = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    # 64 px images: an 8 x 8 grid of stride-8 patches each; 14 fitted goods, the 2 calibration goods not among them
    assert det.fit_info["n_fit"] == 14 and det.fit_info["n_patches"] == 14 * 64
