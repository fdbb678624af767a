"""INT8 backbones (runtime_precision=int8): calibrated on training goods only, saved in the model
file, exported as they score, and within the accuracy budget of docs/speed.md on a synthetic set."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

import anomalens
from anomalens.backbones import BackboneError
from anomalens.export import OnnxDetector, export_onnx
from conftest import fast_options, require_openvino

TOL = 1e-4
#: the synthetic budget: INT8 against fp32 image AUROC and verdicts (docs/speed.md states the
#: real sets' change); the images are 64 px, where quantization noise weighs more than at 256
AUROC_BUDGET = 0.02
FLIPS_BUDGET = 1


@pytest.fixture(scope="module")
def pair(texture):
    opts = fast_options("patchcore")
    return (
        anomalens.create("patchcore", **opts).fit(texture.train),
        anomalens.create("patchcore", **opts, runtime_precision="int8").fit(texture.train),
    )


def test_int8_stays_within_its_budget(pair, texture):
    fp32, int8 = (det.predict(texture.test) for det in pair)
    labels = np.array([s.label for s in texture.test])
    auroc = [roc_auc_score(labels, p.scores) for p in (fp32, int8)]
    assert auroc[1] >= auroc[0] - AUROC_BUDGET, auroc
    assert (fp32.is_anomalous != int8.is_anomalous).sum() <= FLIPS_BUDGET
    assert not np.allclose(fp32.scores, int8.scores)  # the INT8 backbone is really used


def test_int8_calibrates_on_the_fitted_goods_only(pair):
    info = pair[1].fit_info
    # the 2 calibration goods are held out: every canvas the quantizer saw was fitted on
    assert info["int8"]["calibration_canvases"] == info["n_fit"] == 14 and info["n_calibration"] == 2
    assert "int8" not in pair[0].fit_info and pair[0].int8_backbone is None


def test_int8_model_file_and_export_score_the_same(pair, texture, tmp_path):
    det = pair[1]
    ref = det.predict(texture.test)
    loaded = anomalens.load(det.save(tmp_path / "int8.model"))
    assert loaded.int8_backbone == det.int8_backbone
    assert np.array_equal(loaded.predict(texture.test).scores, ref.scores)
    path = export_onnx(det, tmp_path / "int8.onnx")
    onnx_det = OnnxDetector.load(path, threads=1)
    assert onnx_det.metadata["precision"] == "int8"
    got = onnx_det.predict(texture.test)
    assert np.abs(got.scores - ref.scores).max() <= TOL * max(1.0, float(np.abs(ref.scores).max()))
    assert (got.is_anomalous == ref.is_anomalous).all()
    require_openvino()
    # OpenVINO runs the same QDQ graph with its own INT8 kernels: not bit-equal, within the budget
    ov = OnnxDetector.load(path, threads=1, runtime="openvino").predict(texture.test)
    labels = np.array([s.label for s in texture.test])
    assert roc_auc_score(labels, ov.scores) >= roc_auc_score(labels, ref.scores) - AUROC_BUDGET
    assert (ov.is_anomalous != ref.is_anomalous).sum() <= FLIPS_BUDGET


def test_bad_precision_and_torch_engine_are_one_line_errors(texture):
    with pytest.raises(ValueError, match=r"runtime_precision='int4': use one of fp32, int8"):
        anomalens.create("patchcore", runtime_precision="int4")
    det = anomalens.create("padim", **fast_options("padim"), runtime_precision="int8", engine="torch")
    with pytest.raises(BackboneError, match="runs on the CPU in ONNX Runtime or OpenVINO"):
        det.fit(texture.train)


def test_cli_export_int8(pair, tmp_path):
    from typer.testing import CliRunner

    from anomalens.cli import app

    fp32, int8 = (det.save(tmp_path / f"{n}.model") for n, det in zip(("fp32", "int8"), pair))
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(fp32), "-o", str(tmp_path / "a.onnx"), "--int8"])
    assert result.exit_code == 2 and "refit it with --set runtime_precision=int8" in result.output
    assert not (tmp_path / "a.onnx").exists()
    result = runner.invoke(app, ["export", str(int8), "-o", str(tmp_path / "b.onnx"), "--int8"])
    assert result.exit_code == 0 and "MB, int8)" in result.output, result.output
