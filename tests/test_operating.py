"""Operating points (hand-computed cases), high-recall metrics against sklearn, and the chosen
point travelling in the model file into predict and the `threshold` command."""

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, roc_auc_score, roc_curve
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.metrics import full_recall_metrics, high_recall_metrics, partial_auroc_high_recall
from anomalens.thresholds import Calibration, apply_operating_point, select_operating_point, threshold_curve
from anomalens.workflows.evaluate import evaluate
from conftest import fast_options

# goods 0.1 0.2 0.3 0.6, defects 0.5 0.7 0.9; descending: 0.9d 0.7d 0.6g 0.5d 0.3g 0.2g 0.1g
LABELS = [0, 0, 0, 0, 1, 1, 1]
SCORES = [0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.9]


@pytest.mark.parametrize(
    "rule, target, threshold, recall, fpr, precision",
    [
        ("recall", 1.0, 0.5, 1.0, 0.25, 0.75),  # no missed defect costs one false alarm
        ("recall", 0.6, 0.7, 2 / 3, 0.0, 1.0),  # 2 of 3 defects reach 0.6 at the highest threshold
        ("fpr", 0.0, 0.7, 2 / 3, 0.0, 1.0),  # lowest threshold with no false alarm
        ("fpr", 0.25, 0.5, 1.0, 0.25, 0.75),  # one false alarm allowed: 0.5 still has fp = 1
        ("f1", None, 0.5, 1.0, 0.25, 0.75),  # F1: 0.5, 0.8, 0.667, 0.857 (best), 0.75, ...
        ("good_quantile", 0.5, 0.25, 1.0, 0.5, 0.6),  # median of goods 0.1..0.6 = 0.25
    ],
)
def test_rules_pick_the_hand_computed_point(rule, target, threshold, recall, fpr, precision):
    p = select_operating_point(LABELS, SCORES, rule, target)
    assert p.threshold == pytest.approx(threshold)
    assert (p.recall, p.fpr, p.precision) == pytest.approx((recall, fpr, precision))
    assert p.good_pass_rate == pytest.approx(1 - fpr)
    assert p.tp + p.fn == 3 and p.fp + p.tn == 4
    assert p.rule == rule and p.target == target


def test_tied_scores_are_flagged_together():
    p = select_operating_point([0, 1, 1], [0.5, 0.5, 0.9], "recall", 1.0)
    assert (p.threshold, p.fp, p.fn, p.precision) == (0.5, 1, 0, pytest.approx(2 / 3))


def test_rule_errors_name_the_problem():
    with pytest.raises(ValueError, match="rule must be one of"):
        select_operating_point(LABELS, SCORES, "youden", 0.5)
    with pytest.raises(ValueError, match="needs a target"):
        select_operating_point(LABELS, SCORES, "recall")
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        select_operating_point(LABELS, SCORES, "fpr", 5)
    with pytest.raises(ValueError, match="needs defective images"):
        select_operating_point([0, 0], [0.1, 0.2], "recall", 1.0)
    with pytest.raises(ValueError, match="top-scoring image is a good one"):
        select_operating_point([0, 1], [0.9, 0.5], "fpr", 0.0)


def test_threshold_curve_matches_sklearn_roc():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    curve = threshold_curve(y, s)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(curve.thresholds, thr[1:])
    np.testing.assert_allclose(curve.recall, tpr[1:])
    np.testing.assert_allclose(curve.fpr, fpr[1:])


def test_high_recall_metrics_by_hand_and_against_sklearn():
    m = high_recall_metrics(LABELS, SCORES)
    # TPR >= 0.9 only from FPR 0.25 on, at height 1.0: area 0.75 * 0.1, over its maximum 0.1
    assert m["image_pauroc_high_recall"] == pytest.approx(0.75)
    assert (m["threshold_at_full_recall"], m["fpr_at_full_recall"]) == (0.5, 0.25)
    assert m["accuracy_at_full_recall"] == pytest.approx(6 / 7)
    assert (
        partial_auroc_high_recall([0, 1], [0, 1]) == 1.0 and partial_auroc_high_recall([0, 1], [1, 0]) == 0.0
    )
    rng = np.random.default_rng(0)
    for _ in range(5):
        y = rng.integers(0, 2, 80)
        s = np.round(rng.normal(size=80) + 1.2 * y, 1)
        # sklearn's partial AUC over FPR <= 0.1 of the swapped problem, McClish standardization undone
        v, mx = roc_auc_score(1 - y, -s, max_fpr=0.1), 0.1
        expected = (mx * mx / 2 + (2 * v - 1) * (mx - mx * mx / 2)) / mx
        assert partial_auroc_high_recall(y, s, 0.9) == pytest.approx(expected)
        fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
        first_full = int(np.argmax(tpr >= 1))
        full = full_recall_metrics(y, s)
        assert full["fpr_at_full_recall"] == pytest.approx(fpr[first_full])
        assert full["accuracy_at_full_recall"] == pytest.approx(accuracy_score(y, s >= thr[first_full]))
    assert full_recall_metrics([0, 0], [0.1, 0.2])["fpr_at_full_recall"] is None


def test_applied_point_puts_normalized_one_at_the_threshold():
    cal = Calibration(
        threshold=10.0, center=4.0, pixel_threshold=1.0, pixel_center=0.0, quantile=0.99, n_images=9
    )
    assert apply_operating_point(cal, 7.0).normalize(7.0) == pytest.approx(1.0)
    below = apply_operating_point(cal, 3.0)  # below the goods' median: the calibration's spread is kept
    assert below.normalize(3.0) == pytest.approx(1.0) and below.normalize(9.0) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def fitted(texture, tmp_path_factory):
    det = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    path = det.save(tmp_path_factory.mktemp("op") / "tex.model")
    return det, path


def test_operating_point_round_trips_and_decides_predict(fitted, texture, tmp_path):
    det, _ = fitted
    plain = det.predict(texture.test)
    labels = [s.label for s in texture.test]
    point = select_operating_point(labels, plain.scores, "recall", 1.0)
    det_op = anomalens.load(fitted[1])
    assert det_op.operating_point is None
    det_op.operating_point = point.to_dict()
    loaded = anomalens.load(det_op.save(tmp_path / "op.model"))
    assert loaded.operating_point == point.to_dict()
    pred = loaded.predict(texture.test)
    np.testing.assert_array_equal(pred.is_anomalous, pred.scores >= point.threshold)
    assert pred.is_anomalous[np.array(labels) == 1].all()  # recall 1.0 on these images
    assert loaded.decision_calibration.threshold == point.threshold
    assert loaded.calibration.threshold == det.calibration.threshold  # the calibration itself is unchanged
    loaded.fit(texture.train)
    assert loaded.operating_point is None  # a refit invalidates the chosen point


def test_evaluate_reports_high_recall_metrics(fitted, texture):
    result = evaluate(fitted[0], texture, per_type=False)
    labels = [s.label for s in result.samples]
    expected = high_recall_metrics(labels, result.prediction.scores)
    assert {k: result.metrics[k] for k in expected} == expected


def test_threshold_command_stores_the_point(fitted, texture_root, tmp_path):
    out_model, js, curve = tmp_path / "line.model", tmp_path / "op.json", tmp_path / "curve.csv"
    res = CliRunner().invoke(
        app,
        [
            "threshold",
            str(fitted[1]),
            str(texture_root),
            "--rule",
            "recall",
            "--target",
            "1.0",
            "-o",
            str(out_model),
            "--json",
            str(js),
            "--curve",
            str(curve),
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "recall 1.0000 (0 missed)" in res.output and "goods passing" in res.output
    point = json.loads(js.read_text())["operating_point"]
    assert point["recall"] == 1.0 and point["fn"] == 0
    stored = anomalens.load(out_model).operating_point
    assert {k: stored[k] for k in point} == point
    assert stored["chosen_on"]["dataset"] == str(texture_root) and stored["chosen_on"]["n_images"] == 12
    assert anomalens.load(fitted[1]).operating_point is None  # -o leaves the original alone
    rows = list(csv.DictReader(open(curve)))
    assert float(rows[-1]["recall"]) == 1.0 and {"threshold", "fpr", "precision", "good_pass_rate"} <= set(
        rows[0]
    )
    bad = CliRunner().invoke(
        app, ["threshold", str(fitted[1]), str(texture_root), "--rule", "nope", "--no-save"]
    )
    assert bad.exit_code == 2 and "rule must be one of" in bad.output


def test_evaluate_says_where_the_threshold_came_from_and_when_it_saw_the_images(
    fitted, texture_root, tmp_path
):
    from anomalens.data import load_dataset
    from anomalens.report.html_report import write_evaluation_report

    det, model_file = fitted
    dataset = load_dataset(texture_root)
    plain = evaluate(det, dataset, per_type=False).metrics["threshold_source"]
    assert plain["kind"] == "goods_quantile" and "held-out training goods" in plain["text"]
    assert "warning" not in plain

    out_model = tmp_path / "op.model"
    res = CliRunner().invoke(
        app, ["threshold", str(model_file), str(texture_root), "-o", str(out_model), "-q"]
    )
    assert res.exit_code == 0, res.output
    chosen = anomalens.load(out_model)
    evaluation = evaluate(chosen, dataset, per_type=False)
    source = evaluation.metrics["threshold_source"]
    assert source["kind"] == "operating_point" and source["n_evaluated_images_chosen_on"] == 12
    assert source["warning"] == "chosen on 12 of these images: optimistic"
    html = write_evaluation_report(evaluation, chosen, tmp_path / "r.html", n_gallery=0).read_text()
    assert "chosen on 12 of these images: optimistic" in html and "held-out training goods" not in html
    cli = CliRunner().invoke(app, ["evaluate", str(out_model), str(texture_root), "-q"])
    assert "optimistic" in cli.output and "operating point" in cli.output


def test_holdout_chooses_on_one_half_and_reports_the_other(fitted, texture_root):
    from anomalens.data import load_dataset
    from anomalens.thresholds import image_digests
    from anomalens.workflows.threshold import choose_operating_point

    det, _ = fitted
    dataset = load_dataset(texture_root)
    choice = choose_operating_point(det, dataset, "recall", 1.0, holdout=0.5)
    assert choice.n_holdout == 6 and len(choice.labels) == 6 and sum(choice.labels) == 3  # per label halves
    all_digests = set(image_digests(str(s.path) for s in dataset.test))
    chosen = set(choice.chosen_on["image_digests"])
    assert len(chosen) == 6 and chosen < all_digests  # the held-out half is not among them
    # the held-out numbers are the threshold applied to the other images, computed by hand
    pred = det.predict(dataset.test)
    held = [i for i, d in enumerate(image_digests(pred.keys)) if d not in chosen]
    y = np.array([dataset.test[i].label for i in held])
    flagged = pred.scores[held] >= choice.point.threshold
    assert choice.holdout.tp == int((flagged & (y == 1)).sum()) and choice.holdout.fp == int(
        (flagged & (y == 0)).sum()
    )
    again = choose_operating_point(det, dataset, "recall", 1.0, holdout=0.5)
    assert again.chosen_on == choice.chosen_on  # seeded
