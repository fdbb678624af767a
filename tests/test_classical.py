"""Classical (PyOD) detectors on image representations, their thresholds, and the study."""

import json
import logging

import numpy as np
import pytest

import anomalens
from anomalens.data import ImageReadError, read_mask
from anomalens.models import classical
from anomalens.models.classical import CLASSICAL_NAMES, expand_models, format_pyod_options, parse_pyod_options
from anomalens.models.components.representations import FeatureSpec, KernelPCAProjection, PCAProjection

PIXELS = {"image_size": 32, "pixel_size": 16}  # tiny: 256 pixel values per image, no backbone
SMALL_PYOD = {
    "lof": "n_neighbors=5",
    "feature_bagging": "n_neighbors=5",
    "lscp": "lof_neighbors=3,5,7;local_region_size=5",
}


def small(name: str, **extra):
    key = name.removeprefix("classical:")
    return anomalens.create(name, **{**PIXELS, "features": "pca:6", "pyod": SMALL_PYOD.get(key, ""), **extra})


def test_the_fifteen_are_registered():
    assert len(CLASSICAL_NAMES) == 15 and set(CLASSICAL_NAMES) <= set(anomalens.available())
    assert expand_models("classical:all,patchcore,knn") == [*CLASSICAL_NAMES, "patchcore"]
    assert anomalens.create("classical:knn", features="raw").localizes is False
    assert anomalens.create("classical:knn", features="patch").localizes is True


@pytest.mark.parametrize("name", CLASSICAL_NAMES)
def test_each_detector_fits_predicts_saves_and_reloads_identically(name, texture, tmp_path):
    det = small(name).fit(texture.train)
    pred = det.predict(texture.test)
    assert np.isfinite(pred.scores).all() and len(pred.scores) == len(texture.test)
    assert all(np.ptp(m) <= 1e-6 * max(1.0, abs(float(m.max()))) for m in pred.maps)  # global: constant maps
    again = anomalens.load(det.save(tmp_path / "m.model"))
    assert again.options == det.options and json.dumps(again.options)
    np.testing.assert_allclose(again.predict(texture.test).scores, pred.scores, rtol=1e-6, atol=1e-9)
    reading = again.pyod_reading(pred.scores)
    assert reading.threshold == pytest.approx(det.pyod_threshold)


# -- representations -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "features",
    [
        "raw",
        "pca:5",
        "kpca-rbf:5",
        "kpca-poly:5",
        "kpca-sigmoid:5",
        "kpca-cosine:5",
        "deep",
        "deep:2+3",
        "patch",
    ],
)
def test_each_representation_roundtrips(features, texture, tmp_path):
    det = anomalens.create(
        "classical:knn",
        features=features,
        image_size=32 if features.startswith("deep") else 64,
        pixel_size=16,
        max_patches=500,
    ).fit(texture.train)
    pred = det.predict(texture.test[:4])
    again = anomalens.load(det.save(tmp_path / "m.model"))
    assert again.options["features"] == str(FeatureSpec.parse(features))
    np.testing.assert_allclose(again.predict(texture.test[:4]).scores, pred.scores, rtol=1e-5, atol=1e-6)
    dim = det.train.shape[1]
    expected = {"raw": 256, "deep": 24 + 40 + 112 + 320, "deep:2+3": 40 + 112, "patch": 40 + 112}.get(
        features, 5
    )
    assert dim == expected


def test_feature_spec_grammar():
    assert str(FeatureSpec.parse("kpca:30")) == "kpca-rbf:30"
    assert FeatureSpec.parse("deep:3+2").layers == (2, 3)
    assert str(FeatureSpec.parse("patch:2+3")) == "patch"
    for bad in ("pixels", "pca", "pca:x", "kpca-linear:3", "deep:a"):
        with pytest.raises(ValueError, match="features"):
            FeatureSpec.parse(bad)
    with pytest.raises(ValueError, match="features"):
        anomalens.create("classical:knn", features="pca")


def test_projections_match_scikit_learn():
    from sklearn.decomposition import PCA, KernelPCA

    rng = np.random.default_rng(0)
    x, y = rng.random((60, 40)).astype(np.float32), rng.random((7, 40)).astype(np.float32)
    ours = PCAProjection.fit(x, 5, seed=0)
    ref = PCA(n_components=5, svd_solver="randomized", random_state=0).fit(x)
    np.testing.assert_allclose(ours.transform(y), ref.transform(y), rtol=1e-4, atol=1e-5)
    for kernel in ("rbf", "poly", "sigmoid", "cosine"):
        ours = KernelPCAProjection.fit(x, 5, kernel, seed=0)
        ref = KernelPCA(n_components=5, kernel=kernel, **ours.params).fit(x.astype(np.float64))
        np.testing.assert_allclose(
            np.abs(ours.transform(y)), np.abs(ref.transform(y.astype(np.float64))), rtol=1e-4, atol=1e-6
        )


# -- options ---------------------------------------------------------------------------------------
def test_pyod_options_string_dict_and_validation(texture, tmp_path):
    assert parse_pyod_options("n_neighbors=3; method=mean;x=1.5,2;flag=true;none=none") == {
        "n_neighbors": 3,
        "method": "mean",
        "x": [1.5, 2],
        "flag": True,
        "none": None,
    }
    assert format_pyod_options({"b": [1, 2], "a": True}) == "a=true;b=1,2"
    det = anomalens.create(
        "classical:knn", pyod={"method": "mean", "n_neighbors": 3}, **PIXELS, features="raw"
    )
    assert det.options["pyod"] == "method=mean;n_neighbors=3" and det.pyod_kwargs["n_neighbors"] == 3
    from anomalens.cli.common import parse_sets

    sets = parse_sets(["pyod=n_neighbors=3;method=mean", "contamination=0.2", "standardize=false"])
    det = anomalens.create("classical:knn", features="raw", **sets)
    assert det.pyod_kwargs["contamination"] == 0.2 and det.options["standardize"] is False
    det.fit(texture.train)
    assert det.model.n_neighbors == 3 and det.model.method == "mean"
    assert anomalens.load(det.save(tmp_path / "k.model")).options == det.options
    with pytest.raises(ValueError, match="unknown PyOD option.*n_neigbors"):
        anomalens.create("classical:knn", pyod="n_neigbors=3")
    with pytest.raises(ValueError, match="pyod"):
        anomalens.create("classical:knn", pyod="justtext")


# -- degenerate inputs -----------------------------------------------------------------------------
def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_identical_images_are_a_clear_error():
    same = [np.full((20, 20), 0.5, dtype=np.float32)] * 6
    for features in ("raw", "pca:2"):
        with pytest.raises(ValueError, match="identical") as excinfo:
            anomalens.create("classical:iforest", features=features, **PIXELS).fit(same)
        _one_line_error(excinfo)


def test_fewer_images_than_components_or_neighbours(texture):
    with pytest.raises(ValueError, match=r"pca:50 need at least 50 training images, got 14: use pca:14") as e:
        anomalens.create("classical:iforest", features="pca:50", **PIXELS).fit(texture.train)
    _one_line_error(e)
    with pytest.raises(
        ValueError, match=r"more training images than n_neighbors=20 \(got 14\).*pyod=n_neighbors=13"
    ):
        anomalens.create("classical:lof", features="raw", **PIXELS).fit(texture.train)
    with pytest.raises(ValueError, match="n_clusters=8"):
        anomalens.create("classical:cblof", features="raw", **PIXELS).fit(texture.train[:6])


def test_nan_images_and_features():
    bad = [np.random.default_rng(i).random((20, 20)).astype(np.float32) for i in range(6)]
    bad[2][3, 3] = np.nan
    with pytest.raises(ImageReadError, match="NaN"):
        anomalens.create("classical:knn", features="raw", **PIXELS).fit(bad)
    x = np.random.default_rng(0).random((10, 4)).astype(np.float32)
    x[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN") as e:
        anomalens.create("classical:knn", features="raw").fit_matrix(x)
    _one_line_error(e)


def test_slow_fit_warns_with_an_estimate_and_max_samples_subsamples(monkeypatch, caplog):
    monkeypatch.setattr(classical, "SLOW_WARNING_S", 0.0)
    x = np.random.default_rng(0).random((50, 8)).astype(np.float32)
    with caplog.at_level(logging.WARNING, logger="anomalens.models.classical"):
        det = anomalens.create("classical:ocsvm", features="raw", max_samples=20).fit_matrix(x)
    assert "estimated" in caplog.text and "max_samples" in caplog.text
    assert det.train.shape == (20, 8) and det.fit_info["subsampled"] == [20, 50]


# -- PyOD's own threshold --------------------------------------------------------------------------
def test_pyod_reading_is_pyods_predict_and_proba(texture):
    det = small("classical:knn").fit(texture.train)
    pred = det.predict(texture.test)
    reading = det.classical_labels(texture.test)
    np.testing.assert_allclose(reading.scores, pred.scores)
    feats = np.concatenate([det.rep.transform(b.pixels) for b in _batches(det, texture.test)])
    z = det._standardized(feats)
    np.testing.assert_array_equal(reading.labels, det.model.predict(z))
    np.testing.assert_allclose(reading.proba, det.model.predict_proba(z)[:, 1])
    np.testing.assert_array_equal(reading.proba_labels, (det.model.predict_proba(z)[:, 1] > 0.5).astype(int))
    assert reading.threshold == det.model.threshold_
    # on the training vectors, the share flagged is the contamination
    assert det.pyod_reading(det.train_scores).labels.mean() == pytest.approx(0.1, abs=0.1)


def _batches(det, samples):
    from anomalens.data.inputs import as_items, iter_batches

    return iter_batches(as_items(samples), det._preprocess(), det.options["batch_size"])


def test_lmdd_scores_do_not_depend_on_the_other_images(texture):
    det = small("classical:lmdd").fit(texture.train)
    together = det.predict(texture.test[:5]).scores
    alone = np.array([det.predict([s]).scores[0] for s in texture.test[:5]])
    np.testing.assert_allclose(together, alone)


def test_lscp_scores_do_not_depend_on_history(texture):
    det = small("classical:lscp").fit(texture.train)
    first = det.predict(texture.test[:4]).scores
    det.predict(texture.test[4:])
    np.testing.assert_allclose(det.predict(texture.test[:4]).scores, first)


# -- patch-level variant ---------------------------------------------------------------------------
def test_patch_features_localize_a_synthetic_defect(texture):
    det = anomalens.create("classical:knn", features="patch", image_size=64, max_patches=2000).fit(
        texture.train
    )
    assert det.localizes
    defects = [s for s in texture.test if s.label == 1 and s.mask_path is not None]
    pred = det.predict(defects)
    hits = 0
    for sample, amap in zip(defects, pred.maps):
        assert np.ptp(amap) > 0
        mask = read_mask(sample.mask_path, shape=amap.shape)
        hits += (
            bool(mask[np.unravel_index(np.argmax(amap), amap.shape)])
            or amap[mask].mean() > amap[~mask].mean()
        )
        assert pred.scores[defects.index(sample)] == pytest.approx(float(amap.max()), rel=1e-4)
    assert hits >= len(defects) - 1
    from anomalens.workflows.evaluate import evaluate

    metrics = evaluate(det, texture, per_type=False).metrics
    assert metrics["pixel_auroc"] is not None and metrics["pixel_auroc"] > 0.8


# -- the study -------------------------------------------------------------------------------------
def test_study_writes_tables_and_resumes(texture_root, tmp_path):
    from anomalens.report.study_report import write_outputs
    from anomalens.workflows.classical_study import run_study

    out = tmp_path / "study"
    kwargs = dict(options=PIXELS, in_process=True)
    first = run_study(texture_root, "knn,hbos", "raw,pca:4", out, **kwargs)
    write_outputs(out, first.config, first.cells, first.features)  # as the classical-study command does
    assert first.n_run == 4 and all(c["status"] == "ok" for c in first.cells)
    cell = first.cells[0]
    for key in (
        "image_auroc",
        "image_ap",
        "f1_pyod",
        "f1_proba",
        "f1_calibrated",
        "fit_s",
        "score_ms_per_image",
    ):
        assert cell[key] is not None
    md = (out / "study.md").read_text()
    assert "Top 5 by F1 at the PyOD threshold" in md and "Top 5 by image AUROC" in md
    assert json.loads((out / "study.json").read_text())["top5_by_auroc"]
    # a crash after three cells: the last line is lost, the rerun only runs that cell
    lines = (out / "cells.jsonl").read_text().splitlines()
    (out / "cells.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    again = run_study(texture_root, "knn,hbos", "raw,pca:4", out, **kwargs)
    assert (again.n_run, again.n_reused) == (1, 3)
    assert (
        run_study(texture_root, "knn,hbos", "raw,pca:4", out, **kwargs).n_reused == 4
    )  # the rerun's record kept
    assert [c["image_auroc"] for c in again.cells] == [c["image_auroc"] for c in first.cells]


def test_study_records_skips_with_reasons(texture_root, tmp_path):
    from anomalens.report.study_report import render_markdown
    from anomalens.workflows.classical_study import run_study

    res = run_study(
        texture_root,
        "lof,knn",
        "pca:50,raw",
        tmp_path / "s",
        options=PIXELS,
        in_process=True,
        cell_budget_s=1e-6,
    )
    by = {(c["detector"], c["features"]): c for c in res.cells}
    assert all(c["status"] == "skipped" for c in res.cells)
    assert "pca:50 need at least 50" in by["classical:knn", "pca:50"]["reason"]
    assert "slow-detector guard" in by["classical:knn", "raw"]["reason"]
    assert "Skipped or failed cells" in render_markdown(res.config, res.cells, res.features)


def test_study_worker_enforces_the_budget(texture_root, tmp_path):
    from anomalens.workflows.classical_study import run_study

    out = tmp_path / "w"
    res = run_study(texture_root, "knn", "raw", out, options=PIXELS, cell_budget_s=0.2, guard=False)
    assert res.cells[0]["status"] == "skipped" and "budget" in res.cells[0]["reason"]
    res = run_study(
        texture_root, "knn", "raw", out, options=PIXELS, cell_budget_s=120
    )  # larger budget: rerun
    assert res.n_run == 1 and res.cells[0]["status"] == "ok"


def test_cli_function(texture_root, tmp_path):
    import typer
    from typer.testing import CliRunner

    from anomalens.cli.benchmark import classical_study

    app = typer.Typer()
    app.command()(classical_study)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(
        app,
        [
            "classical-study",
            str(texture_root),
            "--models",
            "knn,iforest",
            "--features",
            "raw",
            "--set",
            "pixel_size=16",
            "--set",
            "knn.pyod=n_neighbors=3",
            "-o",
            str(tmp_path / "c"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Top 5 by image AUROC" in result.output and (tmp_path / "c" / "study.md").is_file()
    bad = CliRunner().invoke(
        app,
        [
            "classical-study",
            str(texture_root),
            "--models",
            "knn",
            "--features",
            "pixels",
            "-o",
            str(tmp_path / "d"),
        ],
    )
    assert bad.exit_code == 2 and "features 'pixels'" in bad.output
