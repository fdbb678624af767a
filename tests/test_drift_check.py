"""The drift check end to end: recorded at fit, flagged with its reason wherever images are scored."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

import anomalens
from anomalens.data import load_dataset
from anomalens.workflows.evaluate import evaluate
from anomalens.workflows.predict import predict_to_folder


def part(rng: np.random.Generator, level: float) -> np.ndarray:
    """A textured part whose overall brightness is `level` (0-1)."""
    y, x = np.mgrid[0:64, 0:64]
    image = level + 0.1 * np.sin(x / 3 + rng.uniform(0, 6)) + rng.normal(0, 0.02, (64, 64))
    return np.clip(image, 0, 1).astype(np.float32)


def save(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """Training goods at every brightness from 0.3 to 0.6; test goods all at 0.55-0.6 (each inside
    the training range: only the batch shows the shift), plus two parts far brighter than any."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("drift") / "part"
    save(root / "train" / "good", [part(rng, level) for level in np.linspace(0.3, 0.6, 40)])
    save(root / "test" / "good", [part(rng, rng.uniform(0.55, 0.6)) for _ in range(30)])
    save(root / "test" / "bright", [part(rng, 0.9), part(rng, 0.92)])
    # empty masks, so the set is an ordinary MVTec-layout category
    save(root / "ground_truth" / "bright", [np.zeros((64, 64), np.float32)] * 2)
    for mask in (root / "ground_truth" / "bright").glob("*.png"):
        mask.rename(mask.with_name(mask.stem + "_mask.png"))
    return root


@pytest.fixture(scope="module")
def fitted(shifted):
    return anomalens.create("patchcore", image_size=64).fit(load_dataset(shifted).train)


def test_fit_records_the_goods_and_predict_names_what_is_off(fitted, shifted, tmp_path):
    assert fitted.drift_profile is not None and fitted.drift_profile.n_goods == 40
    pred = fitted.predict(sorted((shifted / "test" / "bright").glob("*.png")))
    assert all(
        any(f.statistic == "mean" and "brighter than every training good" in f.message for f in flags)
        for flags in pred.drift
    )
    again = anomalens.load(fitted.save(tmp_path / "m.model"))
    assert [[f.message for f in flags] for flags in again.predict(pred.keys).drift] == [
        [f.message for f in flags] for flags in pred.drift
    ]


def test_drift_check_can_be_switched_off(shifted):
    det = anomalens.create("patchcore", image_size=64, drift_check=False).fit(load_dataset(shifted).train)
    assert det.drift_profile is None
    assert det.predict(sorted((shifted / "test" / "bright").glob("*.png"))).drift == [[], []]


def test_predict_folder_evaluate_and_the_store_carry_the_flags(fitted, shifted, tmp_path):
    summary = predict_to_folder(fitted, [shifted / "test"], tmp_path / "out", overlays=False)
    rows = list(csv.DictReader(open(tmp_path / "out" / "scores.csv")))
    bright = [r for r in rows if "/bright/" in r["path"]]
    assert summary.n_drift >= 2 and all("brighter than every training good" in r["drift"] for r in bright)
    regions = [json.loads(line) for line in open(tmp_path / "out" / "regions.jsonl")]
    assert all(r["drift"] for r in regions if "/bright/" in r["path"])

    metrics = evaluate(fitted, load_dataset(shifted)).metrics
    drift = metrics["drift"]
    assert drift["n_images_flagged"] >= 2 and drift["by_statistic"]["mean"] >= 2
    # each test good is inside the training range, the batch of them is not
    assert drift["n_goods_flagged"] <= 3
    assert any("brighter than the training goods" in shift for shift in drift["goods_batch_shift"])

    from anomalens.store import ResultStore
    from anomalens.workflows.scoring import Scorer, score_into_store

    with ResultStore(tmp_path / "r.db") as store:
        store.register_model("m", detector="patchcore", file_sha256="0" * 64)
        score_into_store(Scorer(fitted, "m"), store, sorted((shifted / "test" / "bright").glob("*.png")))
        assert all(r.drift and r.drift[0]["statistic"] == "mean" for r in store.results("m"))


def test_a_batch_from_the_training_distribution_shows_no_shift(fitted, shifted):
    rng = np.random.default_rng(5)
    pred = fitted.predict([part(rng, level) for level in rng.uniform(0.3, 0.6, 30)], statistics=True)
    assert fitted.drift_profile.compare_batch(pred.stats) == []
    assert sum(bool(flags) for flags in pred.drift) <= 1
