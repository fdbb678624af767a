"""Labelled defects in, honestly: label sources, the --train-defects protocol (no image both trains
and is evaluated), the refine stage (its classifier stored as arrays, cross-validated report)."""

import csv
import json

import numpy as np
import pytest
from sklearn.ensemble import ExtraTreesClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data import DatasetError, load_mvtec, make_synthetic_dataset
from anomalens.data.labels import load_labelled, split_train_defects
from anomalens.models.refine import fit_classifier, probability
from anomalens.store import ResultRecord, ResultStore
from anomalens.workflows.evaluate import evaluate
from anomalens.workflows.refine import read_labels, refine
from conftest import fast_options


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two defect types, enough of each to lend some to training and test the rest."""
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("planted") / "cat",
        n_train=12,
        n_test_good=12,
        n_test_defect=16,
        size=64,
        seed=3,
    )


@pytest.fixture(scope="module")
def patchcore(planted):
    return anomalens.create("patchcore", **fast_options("patchcore")).fit(load_mvtec(planted).train)


def test_tree_arrays_give_scikit_learns_probabilities():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 8))
    y = (x[:, 0] + 0.5 * rng.normal(size=80) > 0).astype(int)
    probe = rng.normal(size=(50, 8)) * 2
    arrays = fit_classifier(x, y, "extra_trees", seed=4)
    forest = ExtraTreesClassifier(n_estimators=100, class_weight="balanced", random_state=4).fit(x, y)
    np.testing.assert_allclose(
        probability("extra_trees", arrays, probe), forest.predict_proba(probe)[:, 1], atol=1e-12
    )
    scaler = StandardScaler().fit(x)
    logistic = LogisticRegression(class_weight="balanced", max_iter=1000).fit(scaler.transform(x), y)
    np.testing.assert_allclose(
        probability("logistic", fit_classifier(x, y, "logistic"), probe),
        logistic.predict_proba(scaler.transform(probe))[:, 1],
        atol=1e-10,
    )


def test_train_defects_lends_k_per_type_and_tests_the_rest(planted):
    dataset = load_mvtec(planted)
    rest, lent = split_train_defects(dataset, 2, seed=1)
    defects = [s for s in lent if s.label == 1]
    assert sorted(s.defect_type for s in defects) == sorted(t for t in dataset.defect_types for _ in range(2))
    assert sum(s.label == 0 for s in lent) == len(defects)
    assert not {s.path for s in lent} & {s.path for s in rest.test}
    assert len(rest.test) + len(lent) == len(dataset.test)
    again, _ = split_train_defects(dataset, 2, seed=1)
    other, _ = split_train_defects(dataset, 2, seed=2)
    assert [s.path for s in again.test] == [s.path for s in rest.test] != [s.path for s in other.test]
    with pytest.raises(DatasetError, match="must be >= 1"):
        split_train_defects(dataset, 0)


def test_label_sources_folder_csv_and_store(planted, tmp_path):
    dataset = load_mvtec(planted)
    rows = [(s.path, "good" if s.label == 0 else s.defect_type) for s in dataset.test]
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    from_csv = load_labelled(table)
    assert sorted((str(s.path), s.label) for s in from_csv) == sorted(
        (str(p), int(lab != "good")) for p, lab in rows
    )
    # the test folder itself: good/ beside one folder per defect type
    from_folder = load_labelled(planted / "test")
    assert {(s.path, s.label) for s in from_folder} == {(s.path, s.label) for s in dataset.test}
    with ResultStore(tmp_path / "review.db") as store:
        store.register_model("m1", detector="patchcore", file_sha256="0" * 64)
        store.add_results(ResultRecord("m1", str(p), score=0.0) for p, _ in rows[:6])
        store.set_label(str(rows[0][0]), "defect")
        store.set_label(str(rows[1][0]), "good")
    labelled = read_labels(tmp_path / "review.db")
    assert {(str(s.path), s.label) for s in labelled} == {(str(rows[0][0]), 1), (str(rows[1][0]), 0)}
    with pytest.raises(DatasetError, match="no defective images"):
        load_labelled(planted / "train")


def test_refine_cross_validates_and_never_scores_its_training_images(patchcore, planted, tmp_path):
    dataset = load_mvtec(planted)
    rest, lent = split_train_defects(dataset, 4, seed=0)
    refined, report = refine(patchcore, lent, seed=0, source="planted")
    assert report.n_defect == 4 * len(dataset.defect_types) and report.folds >= 2
    for side in (report.before, report.after):
        assert 0 <= side["false_alarm_rate"] <= 1 and 0 <= side["recall"] <= 1
    # the saved model scores probabilities, identically after loading, and decides at its CV threshold
    path = refined.save(tmp_path / "refined.model")
    again = anomalens.load(path)
    pred, pred2 = refined.predict(rest.test), again.predict(rest.test)
    np.testing.assert_allclose(pred.scores, pred2.scores)
    assert ((pred.scores >= 0) & (pred.scores <= 1)).all()
    assert again.operating_point["rule"] == "recall" and again.operating_point["cross_validated"]
    # evaluating on the whole test set leaves out exactly the images the stage trained on
    full = evaluate(again, dataset, per_type=False)
    assert full.metrics["n_left_out_trained_on"] == len(lent)
    assert {s.path for s in full.samples} == {s.path for s in rest.test}
    # the base model is untouched
    assert patchcore.refiner is None and patchcore.predict(rest.test[:2]).scores.max() > 1.0


def test_refine_report_is_not_measured_on_training_images(patchcore, planted):
    """Labels that are noise: a classifier judged on its own training images would look perfect
    (trees memorize); judged out of fold it cannot beat chance by much."""
    dataset = load_mvtec(planted)
    noise = np.random.default_rng(5).permutation([s.label for s in dataset.test])
    shuffled = [s.__class__(s.path, int(lab)) for s, lab in zip(dataset.test, noise)]
    _, report = refine(patchcore, shuffled, seed=0)
    assert report.after["false_alarm_rate"] > 0.3


def test_cli_refine_then_evaluate_with_the_same_split(patchcore, planted, tmp_path):
    model = patchcore.save(tmp_path / "base.model")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "refine",
            str(model),
            "--data",
            str(planted),
            "--train-defects",
            "2",
            "--seed",
            "1",
            "-o",
            str(tmp_path / "r.model"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "ZFN accuracy" in result.output and "false-alarm rate" in result.output
    result = runner.invoke(
        app,
        [
            "evaluate",
            str(tmp_path / "r.model"),
            str(planted),
            "--train-defects",
            "2",
            "--seed",
            "1",
            "-q",
            "--json",
            str(tmp_path / "m.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["n_left_out_trained_on"] == 0 and metrics["threshold_source"]["kind"] == "operating_point"
    assert metrics["n_images"] == len(split_train_defects(load_mvtec(planted), 2, seed=1)[0].test)
    assert "ZFN" in result.output
    bad = runner.invoke(app, ["refine", str(model), "-o", str(tmp_path / "x.model")])
    assert bad.exit_code == 2 and "--labels" in bad.output


def test_refined_model_scores_the_same_from_onnx(patchcore, planted, tmp_path):
    from anomalens.export import OnnxDetector, export_onnx

    rest, lent = split_train_defects(load_mvtec(planted), 3, seed=0)
    # logistic: continuous in the features, so ONNX's last-digit map differences stay last-digit
    refined, _ = refine(patchcore, lent, classifier="logistic", seed=0)
    onnx = OnnxDetector.load(export_onnx(refined, tmp_path / "r.onnx"))
    images = rest.test[:6]
    np.testing.assert_allclose(onnx.predict(images).scores, refined.predict(images).scores, atol=1e-4)
    assert (
        onnx.refiner is not None
        and onnx.decision_calibration.threshold == refined.decision_calibration.threshold
    )


def test_wmw_loss_and_its_gradient_on_a_hand_made_case():
    import torch

    from anomalens.models.components.ranking import wmw_loss

    scores = torch.tensor([0.5, 0.9, 0.4, 0.1], requires_grad=True)
    labels = torch.tensor([1, 1, 0, 0])
    loss = wmw_loss(scores, labels, gamma=0.3, power=2)
    # pairs (defect, good): (0.5, 0.4) is 0.2 short of the margin; the other three clear it
    assert loss.item() == pytest.approx(0.2**2 / 4)
    loss.backward()
    np.testing.assert_allclose(scores.grad.numpy(), [-2 * 0.2 / 4, 0, 2 * 0.2 / 4, 0], atol=1e-7)
    # full recall: only the lowest-scoring defect counts
    hard = wmw_loss(scores.detach(), labels, gamma=0.3, hardest=1)
    assert hard.item() == pytest.approx(0.2**2 / 2)
    with pytest.raises(ValueError, match="both"):
        wmw_loss(scores.detach(), torch.ones(4))


def test_review_page_counts_labels_since_the_last_refine(patchcore, planted, tmp_path):
    from fastapi.testclient import TestClient

    from anomalens.serve import ServeConfig, create_app, load_inferencer

    rest, lent = split_train_defects(load_mvtec(planted), 2, seed=0)
    refined, _ = refine(patchcore, lent, classifier="logistic")
    assert refined.refiner.info["refined_at"] >= "2026"
    refined.refiner.info["refined_at"] = "2001-01-01T00:00:00+00:00"  # labels given later all count
    path = refined.save(tmp_path / "r.model")
    inferencer = load_inferencer(path, runtime="torch", threads=1)
    client = TestClient(
        create_app(ServeConfig(model=path, runtime="torch", store=tmp_path / "s.db"), inferencer=inferencer)
    )
    ids = [
        client.post("/predict", files={"file": (s.path.name, s.path.read_bytes(), "image/png")}).json()["id"]
        for s in rest.test[:3]
    ]
    summary = client.get("/api/review/summary").json()
    assert summary["refined_at"] == "2001-01-01T00:00:00+00:00"
    assert client.get("/api/review/stats").json()["labels_since_refine"] == 0
    client.post(f"/api/review/items/{ids[0]}/label", json={"label": "defect"})
    client.post(f"/api/review/items/{ids[1]}/label", json={"label": "good"})
    assert client.get("/api/review/stats").json()["labels_since_refine"] == 2


@pytest.mark.parametrize("kind", ["adaboost", "hist_gradient_boosting"])
def test_refine_with_boosted_trees_saves_and_scores_probabilities(patchcore, planted, tmp_path, kind):
    rest, lent = split_train_defects(load_mvtec(planted), 3, seed=0)
    refined, _ = refine(patchcore, lent, classifier=kind, seed=0)
    again = anomalens.load(refined.save(tmp_path / f"{kind}.model"))
    scores = refined.predict(rest.test).scores
    np.testing.assert_allclose(again.predict(rest.test).scores, scores)
    assert ((scores >= 0) & (scores <= 1)).all() and np.ptp(scores) > 0
