"""The HTML evaluation report: one self-contained file with every section, on tiny synthetic data."""

import base64
import dataclasses
import io
import re
import warnings

import pytest
from PIL import Image

import anomalens
from anomalens.data import Dataset
from anomalens.report.html_report import write_evaluation_report
from anomalens.workflows.evaluate import compute_metrics, evaluate
from conftest import fast_options

SECTIONS = ("id=metrics", "id=curves", "id=scores", "id=gallery")


@pytest.fixture(scope="module")
def detector(texture):
    return anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)


@pytest.fixture(scope="module")
def evaluation(detector, texture):
    return evaluate(detector, texture)


def links(text: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", text, flags=re.I)


def assert_self_contained(text: str) -> None:
    targets = links(text)
    assert targets, "no images or links at all"
    for target in targets:
        assert target.startswith(("data:image/png;base64,", "#")), target[:80]
    assert "<link" not in text and "<script" not in text and "url(" not in text and "@import" not in text


def embedded_images(text: str) -> list[Image.Image]:
    out = []
    for b64 in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", text):
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        image.load()
        out.append(image)
    return out


def test_report_is_self_contained_with_every_section(evaluation, detector, tmp_path):
    path = write_evaluation_report(evaluation, detector, tmp_path / "sub" / "report.html", n_gallery=3)
    assert path == tmp_path / "sub" / "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert_self_contained(text)
    for section in SECTIONS:
        assert section in text
    m = evaluation.metrics
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro"):
        assert m[key] is not None and f"{m[key]:.4f}" in text, key
    for dtype, d in m["per_defect_type"].items():
        assert f">{dtype}<" in text and f"{d['image_auroc']:.4f}" in text
    at = m["at_threshold"]
    assert f"{at['precision']:.4f}" in text and f"{at['recall']:.4f}" in text
    # header: model, dataset, verdict counts; histogram axis says where the threshold is
    assert "patchcore" in text and m["dataset"] in text and "false alarm" in text and "missed" in text
    assert "normalized score is ≥ 1.0" in text
    assert "Confusion matrix" in text and f">{at['tp']}<small>" in text and f">{at['fp']}<small>" in text
    images = embedded_images(text)
    # ROC+PR, histogram, and 3 galleries of at most 3 (each image | overlay | ground truth)
    gallery = [im for im in images if im.mode == "RGB"]  # matplotlib figures are RGBA
    assert len(images) >= 2 + 3 and 3 <= len(gallery) <= 9
    assert text.count("<figure") == len(gallery)


def test_report_without_defect_masks(evaluation, detector, tmp_path):
    samples = [dataclasses.replace(s, mask_path=None) for s in evaluation.samples]
    masks = [m if s.label == 0 else None for s, m in zip(samples, evaluation.masks)]
    metrics = {**evaluation.metrics, **compute_metrics(samples, evaluation.prediction, masks)}
    ev = dataclasses.replace(evaluation, samples=samples, masks=masks, metrics=metrics)
    assert ev.metrics["pixel_auroc"] is None
    text = write_evaluation_report(ev, detector, tmp_path / "r.html").read_text()
    assert_self_contained(text)
    assert all(s in text for s in SECTIONS)
    assert "<td class='na'>n/a</td>" in text  # pixel metrics
    embedded_images(text)


def test_report_without_defective_images(detector, texture, tmp_path):
    ds = Dataset(texture.name, texture.root, texture.train, texture.test_good)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # image AUROC undefined with one class
        ev = evaluate(detector, ds)
    text = write_evaluation_report(ev, detector, tmp_path / "r.html", n_gallery=2).read_text()
    assert_self_contained(text)
    assert all(s in text for s in SECTIONS)
    assert "Not available" in text and "No defective images in the test set." in text
    assert text.count("<figure") == 2  # only the highest-scoring goods
    embedded_images(text)


def test_report_of_an_uncalibrated_prediction(evaluation, detector, tmp_path):
    pred = dataclasses.replace(evaluation.prediction, calibration=None)
    metrics = {k: v for k, v in evaluation.metrics.items() if k != "at_threshold"}
    ev = dataclasses.replace(evaluation, prediction=pred, metrics=metrics)
    text = write_evaluation_report(ev, detector, tmp_path / "r.html", n_gallery=1).read_text()
    assert "not calibrated" in text and "raw score" in text
    assert_self_contained(text)


def test_report_refuses_an_empty_evaluation(evaluation, detector, tmp_path):
    empty = dataclasses.replace(evaluation, samples=[], masks=[])
    with pytest.raises(ValueError, match="no scored images"):
        write_evaluation_report(empty, detector, tmp_path / "r.html")


def test_cli_piece_writes_the_report(evaluation, detector, tmp_path, capsys):
    from anomalens.cli.core import write_report

    path = write_report(evaluation, detector, tmp_path / "report.html", n_gallery=1)
    assert path.is_file() and "wrote" in capsys.readouterr().out


def test_score_guard_bounds_and_setting():
    from anomalens.workflows.evaluate import score_guard

    assert score_guard({"image_auroc": 0.6, "pixel_auroc": 0.99}, "score=residual") is None
    assert score_guard({"image_auroc": 0.3, "pixel_auroc": 0.85}, "score=residual") is None
    assert score_guard({"image_auroc": 0.3, "pixel_auroc": None}, "score=residual") is None
    text = score_guard({"image_auroc": 0.59, "pixel_auroc": 0.86}, "score=residual")
    assert text.startswith("the image score does not follow the map") and text.endswith(
        "try --set score=residual"
    )
    assert score_guard({"image_auroc": 0.5, "pixel_auroc": 0.9}, None).endswith("pixel AUROC 0.900 > 0.85)")


def test_guard_in_evaluate_cli_notes_and_report(evaluation, detector, texture, tmp_path, monkeypatch):
    from anomalens.cli.core import _notes
    from anomalens.workflows.evaluate import _map_max_setting

    assert evaluation.metrics["score_warning"] is None  # PatchCore on the texture: the score follows the map
    assert not any("does not follow" in line for line in _notes(evaluation.metrics))
    assert _map_max_setting(anomalens.create("fanogan", score="residual")) is None
    assert _map_max_setting(anomalens.create("fanogan", score="izi_f")) == "score=residual"
    # the same maps with the image scores reversed: the map still localizes, the score ranks defects last
    predict = detector.predict

    def reversed_scores(*args, **kwargs):
        pred = predict(*args, **kwargs)
        return dataclasses.replace(pred, scores=-pred.scores)

    monkeypatch.setattr(detector, "predict", reversed_scores)
    monkeypatch.setattr(detector, "map_max_setting", "score=residual")
    bad = evaluate(detector, texture)
    m = bad.metrics
    assert m["image_auroc"] < 0.6 and m["pixel_auroc"] > 0.85
    assert m["score_warning"].startswith("the image score does not follow the map")
    assert m["score_warning"].endswith("try --set score=residual")
    assert any("does not follow the map" in line for line in _notes(m))
    text = write_evaluation_report(bad, detector, tmp_path / "r.html", n_gallery=1).read_text()
    assert "the image score does not follow the map" in text and "try --set score=residual" in text
    clean = write_evaluation_report(evaluation, detector, tmp_path / "c.html", n_gallery=1).read_text()
    assert "does not follow the map" not in clean
