"""Explanations: regions, pseudo-label classifier with Grad-CAM / LIME, LIME on the score, faithfulness, CLI.

A planted bright square on good synthetic texture is the defect every explanation must point at.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from sklearn.metrics import roc_auc_score

import anomalens
from anomalens.data import load_mvtec, make_synthetic_dataset, read_image
from anomalens.data.synthetic import synthetic_image
from anomalens.explain import (
    AnomalyClassifier,
    explain_images,
    gallery_explanations,
    pseudo_labels,
    train_classifier,
)
from anomalens.explain.cam import gradcam_maps
from anomalens.explain.faithfulness import (
    deletion_curve,
    explanation_auroc,
    faithfulness_summary,
    pointing_hit,
)
from anomalens.explain.lime_maps import baseline_image, lime_classifier_map
from anomalens.inference import find_regions
from anomalens.report.html_report import write_evaluation_report
from anomalens.workflows.evaluate import evaluate, gallery_indices
from conftest import fast_options

EXE = str(Path(sys.executable).parent / "anomalens")
SIZE = 128
SPOTS = [(24, 80), (84, 28), (70, 76)]  # (y, x) of the planted squares, away from the borders
SIDE = 14


def plant(image: np.ndarray, y: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    out, mask = image.copy(), np.zeros(image.shape, bool)
    mask[y : y + SIDE, x : x + SIDE] = True
    out[mask] = 0.95
    return out, mask


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_synthetic_dataset(
        tmp_path_factory.mktemp("explain") / "tex",
        kind="texture",
        n_train=16,
        n_test_good=3,
        n_test_defect=0,
        size=SIZE,
        seed=3,
    )
    return load_mvtec(root)


@pytest.fixture(scope="module")
def planted(data):
    pairs = [plant(read_image(s.path), y, x) for s, (y, x) in zip(data.test, SPOTS)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.fixture(scope="module")
def patchcore(data):
    return anomalens.create("patchcore", image_size=SIZE, batch_size=8, coreset_min_size=200).fit(data.train)


# -- regions --------------------------------------------------------------------------------------
def test_regions_report_area_share_mean_and_filter_by_share():
    nmap = np.zeros((100, 100), np.float32)
    nmap[10:20, 10:20] = 2.0  # 100 px = 1 % of the image
    nmap[50:52, 50:52] = 3.0  # 4 px speck
    (big,) = find_regions(nmap, min_area=16)
    assert (big.x0, big.y0, big.x1, big.y1, big.area) == (10, 10, 20, 20, 100)
    assert big.area_share == pytest.approx(0.01) and big.mean == pytest.approx(2.0) and big.peak == 2.0
    assert len(find_regions(nmap, min_area=0)) == 2
    assert find_regions(nmap, min_area=0, min_share=0.02) == []  # the 1 % region is under a 2 % floor
    assert len(find_regions(nmap, min_area=0, threshold=2.5)) == 1
    with pytest.raises(ValueError, match="min_share"):
        find_regions(nmap, min_share=1.5)


# -- pseudo-labels and faithfulness ----------------------------------------------------------------
def test_pseudo_labels_take_the_extremes_and_leave_the_margin():
    scores = np.arange(10.0)
    labels = pseudo_labels(scores, anomalous_fraction=0.2, normal_fraction=0.5)
    assert labels.anomalous.tolist() == [8, 9] and labels.normal.tolist() == [0, 1, 2, 3, 4]
    assert pseudo_labels(scores, 0.2, 0.5, threshold=9.0).anomalous.tolist() == [9]
    with pytest.raises(ValueError, match="fractions"):
        pseudo_labels(scores, 0.7, 0.5)


def test_pointing_game_auroc_and_deletion_curve_on_known_maps():
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    good = np.zeros((64, 64))
    good[22:28, 22:28] = 1.0
    wrong = np.zeros((64, 64))
    wrong[50:60, 50:60] = 1.0
    assert pointing_hit(good, mask) and not pointing_hit(wrong, mask)
    assert pointing_hit(wrong, mask, tolerance=36)  # 35 px from the mask corner
    assert not pointing_hit(np.ones((64, 64)), mask)  # a constant map points nowhere
    assert explanation_auroc(good, mask) == pytest.approx(
        0.36 + 0.5 * 0.64
    )  # 36 % of the defect above, rest tied
    assert explanation_auroc(wrong, mask) < 0.5
    assert explanation_auroc(good, np.zeros((64, 64), bool)) is None
    summary = faithfulness_summary([good, wrong], [mask, mask])
    assert summary["pointing_game"] == 0.5 and summary["n_images"] == 2

    image = np.zeros((64, 64))
    image[mask] = 1.0  # the "defect"; the score is how much of it is left
    curve = deletion_curve(
        lambda batch: batch[:, mask].mean(axis=1), image, good + 0.5 * mask, np.zeros_like(image)
    )
    assert curve["scores"][0] == 1.0 and curve["scores"][-1] == 0.0
    assert curve["auc"] < curve["random_auc"] - 0.3  # deleting explained pixels first removes the defect fast


# -- detector explanations -------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["map", "lime-score"])
def test_explanations_point_at_the_planted_defect(patchcore, data, planted, method):
    images, masks = planted
    explanations = explain_images(
        patchcore, images, method, normal_images=[s.path for s in data.train], n_segments=32, num_samples=96
    )
    assert all(e.flagged for e in explanations)
    for e, mask in zip(explanations, masks):
        assert e.map.shape == mask.shape
        assert pointing_hit(e.map, mask, tolerance=4), (method, e.peak())
        assert explanation_auroc(e.map, mask) > 0.9
        region = e.regions()[0]  # the largest region holds the defect
        assert region.x0 <= e.peak()[0] < region.x1 and region.y0 <= e.peak()[1] < region.y1


def test_lime_on_the_score_localizes_a_detector_without_a_map(data, planted):
    knn = anomalens.create("classical:knn", image_size=SIZE, features="deep:3").fit(data.train)
    assert not knn.localizes
    images, masks = planted
    with pytest.raises(ValueError, match="lime-score"):
        explain_images(knn, images, "map")
    explanations = explain_images(
        knn, images, "lime-score", normal_images=[s.path for s in data.train], n_segments=32, num_samples=96
    )
    assert faithfulness_summary([e.map for e in explanations], masks)["pointing_game"] == 1.0


def test_baselines_replace_with_normal_content(data, planted):
    image = planted[0][0]
    normals = [s.path for s in data.train[:4]]
    nearest = baseline_image(image, normals, "normal")
    assert any(np.allclose(nearest, read_image(p), atol=1e-3) for p in normals)
    assert baseline_image(image, normals, "mean").std() < nearest.std()  # averaging washes texture out
    assert baseline_image(image, None, "auto").shape == image.shape  # a blur when no normals are given
    with pytest.raises(ValueError, match="needs normal images"):
        baseline_image(image, None, "mean")


# -- the two-model pipeline ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def easy_set():
    """16 goods and 16 with a planted square, at random places."""
    rng = np.random.default_rng(0)
    images, masks = [], []
    for i in range(32):
        image = synthetic_image("texture", SIZE, 1, np.random.default_rng([7, i]))
        mask = np.zeros(image.shape, bool)
        if i % 2:
            image, mask = plant(image, *rng.integers(16, SIZE - 16 - SIDE, 2))
        images.append(image)
        masks.append(mask)
    return images, masks


def test_classifier_learns_the_pseudo_labels_and_is_explained(patchcore, data, easy_set, tmp_path):
    images, masks = easy_set
    scores = patchcore.predict(images).normalized_scores
    classifier = train_classifier(
        scores, images, anomalous_fraction=0.4, normal_fraction=0.4, image_size=64, epochs=12
    )
    assert classifier.info["agreement"] >= 0.75 and classifier.info["n_holdout"] == 6
    proba = classifier.predict_proba(images)
    truth = np.array([m.any() for m in masks])
    assert ((proba >= 0.5) == truth).mean() >= 0.8  # the pseudo-labels were right, so is the classifier

    path = classifier.save(tmp_path / "clf.safetensors")
    with safe_open(str(path), framework="pt") as f:  # weights + JSON only, no pickle
        assert json.loads(f.metadata()["anomalens"])["config"]["image_size"] == 64
    again = AnomalyClassifier.load(path)
    np.testing.assert_allclose(again.predict_proba(images[:4]), proba[:4], atol=1e-6)
    with pytest.raises(anomalens.models.base.ModelFileError):
        AnomalyClassifier.load(tmp_path / "missing.safetensors")

    defective = [i for i in range(len(images)) if truth[i]][:3]
    cams = gradcam_maps(again, [images[i] for i in defective])
    assert all(c.shape == (SIZE, SIZE) and c.min() >= 0 and c.max() <= 1 for c in cams)
    assert np.mean([explanation_auroc(c, masks[i]) for c, i in zip(cams, defective)]) > 0.7
    lime = lime_classifier_map(
        again, images[defective[0]], [s.path for s in data.train], n_segments=24, num_samples=48
    )
    assert lime.shape == (SIZE, SIZE) and lime.max() == 1.0


def test_classifier_trained_for_full_recall_ranks_defects_first(patchcore, easy_set):
    images, masks = easy_set
    scores = patchcore.predict(images).normalized_scores
    classifier = train_classifier(
        scores,
        images,
        anomalous_fraction=0.4,
        normal_fraction=0.4,
        image_size=64,
        epochs=12,
        loss="wmw_full_recall",
    )
    truth = np.array([m.any() for m in masks])
    assert classifier.info["loss"] == "wmw_full_recall"
    assert roc_auc_score(truth, classifier.predict_proba(images)) >= 0.9


# -- CLI and report --------------------------------------------------------------------------------
def run(*args, ok=True):
    proc = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_cli_explain_and_predict_regions(patchcore, data, planted, tmp_path):
    model = patchcore.save(tmp_path / "tex.model")
    folder = tmp_path / "flagged"
    folder.mkdir()
    for i, image in enumerate(planted[0]):
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"part{i}.png")
    out = tmp_path / "why"
    proc = run(
        "explain",
        model,
        folder,
        "--method",
        "lime-score",
        "--normal",
        data.root / "train" / "good",
        "--segments",
        "32",
        "--samples",
        "64",
        "-o",
        out,
    )
    assert "explained 3 images with lime-score" in proc.stdout
    summary = json.loads((out / "explain.json").read_text())
    assert summary["method"] == "lime-score" and len(summary["images"]) == 3
    for row, (y, x) in zip(sorted(summary["images"], key=lambda r: r["path"]), SPOTS):
        px, py = row["peak_xy"]
        assert x - 8 <= px < x + SIDE + 8 and y - 8 <= py < y + SIDE + 8 and row["flagged"]
        assert row["regions"] and {"area_share", "mean", "peak"} <= set(row["regions"][0])
        assert Image.open(out / row["figure"]).size[0] == 2 * SIZE + 4  # image | heat map

    bad = run("explain", model, folder, "--method", "shap", "-o", out, ok=False)
    assert bad.returncode == 2 and "use one of" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1

    pred = tmp_path / "pred"
    run("predict", model, folder, "-o", pred, "--min-region-area", "1%", "-q")
    rows = list(csv.DictReader(open(pred / "scores.csv")))
    assert all(int(r["n_regions"]) >= 1 and float(r["defect_area_share"]) >= 0.01 for r in rows)
    regions = [json.loads(line)["regions"] for line in open(pred / "regions.jsonl")]
    assert all(r["area_share"] >= 0.01 for rs in regions for r in rs)
    assert run("predict", model, folder, "-o", pred, "--min-region-area", "lots", ok=False).returncode == 2


def test_report_explains_gallery_images_of_a_detector_without_a_map(texture, tmp_path):
    knn = anomalens.create("classical:knn", **fast_options("classical:knn")).fit(texture.train)
    evaluation = evaluate(knn, texture)
    plain = write_evaluation_report(evaluation, knn, tmp_path / "plain.html", n_gallery=1).read_text()
    assert "LIME on the score" not in plain  # the report computes no explanation itself
    explanations = gallery_explanations(knn, evaluation, n_gallery=1)
    shown = {str(evaluation.samples[i].path) for idx in gallery_indices(evaluation, 1).values() for i in idx}
    assert set(explanations) == shown and len(shown) >= 2  # the gallery's images, and only those
    assert all(m.min() >= 0 and m.max() <= 1 for m in explanations.values())
    text = write_evaluation_report(
        evaluation, knn, tmp_path / "r.html", n_gallery=1, explanations=explanations
    ).read_text()
    assert "LIME on the score" in text and "of the image, peak" in text
