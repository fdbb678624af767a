"""ONNX export: every exportable detector scores the same through ONNX Runtime as through torch."""

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.export import ExportError, NotExportableError, OnnxDetector, export_onnx
from anomalens.models.base import Detector, ModelFileError
from anomalens.registry import get_class
from anomalens.workflows.benchmark import onnx_size
from conftest import fast_options, require_openvino

# methods that implement the export hook; a fitted one returning None is skipped in the test
EXPORTABLE = [
    n for n in anomalens.available() if get_class(n).inference_module is not Detector.inference_module
]
TOL = 1e-4
#: OpenVINO's CPU kernels (f32) sum in another order than torch's: up to 1e-3 of max(1, |value|)
OV_TOL = 1e-3


def _close(got: np.ndarray, ref: np.ndarray, tol: float) -> bool:
    return bool(np.all(np.abs(got - ref) <= tol * np.maximum(1.0, np.abs(ref))))


@pytest.fixture(scope="module")
def patchcore(texture):
    return anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)


@pytest.fixture(scope="module")
def classical(texture):
    return anomalens.create("classical:knn", **fast_options("classical:knn")).fit(texture.train)


def test_the_foundation_methods_are_exportable():
    assert {"patchcore", "padim"} <= set(EXPORTABLE)
    assert not any(n.startswith("classical:") for n in EXPORTABLE)


@pytest.mark.parametrize("name", EXPORTABLE)
def test_onnx_runtime_gives_the_torch_scores_and_maps(name, texture, contract_fits, tmp_path):
    det = contract_fits[name]
    if det.inference_module() is None:
        pytest.skip(f"{name} has no inference graph with these options")
    path = export_onnx(det, tmp_path / f"{name}.onnx")
    print(f"{name}: exported {path.stat().st_size / 2**20:.2f} MB")
    ref = det.predict(texture.test)
    got = OnnxDetector.load(path, threads=1).predict(texture.test)
    assert got.keys == ref.keys and got.calibration == det.calibration
    assert np.abs(got.scores - ref.scores).max() < TOL
    assert max(float(np.abs(a - b).max()) for a, b in zip(got.maps, ref.maps)) < TOL
    assert (got.is_anomalous == ref.is_anomalous).all()
    # the graph's own normalized outputs are the calibration's normalization
    onnx_det = OnnxDetector.load(path)
    batch = np.stack([onnx_det.preprocess()(np.full((64, 64, 3), v, np.float32)) for v in (0.2, 0.6)])
    out = onnx_det.run(batch)
    np.testing.assert_allclose(
        out["normalized_score"], det.calibration.normalize(out["score"]), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        out["normalized_map"], det.calibration.normalize_map(out["anomaly_map"]), rtol=1e-5, atol=1e-5
    )
    # the same file in OpenVINO's CPU plugin
    require_openvino()
    ov = OnnxDetector.load(path, threads=1, runtime="openvino").predict(texture.test)
    assert ov.keys == ref.keys and _close(ov.scores, ref.scores, OV_TOL)
    assert all(_close(a, b, OV_TOL) for a, b in zip(ov.maps, ref.maps))


def test_batch_of_one_and_intensity_option_match(texture, tmp_path):
    # intensity runs in the shared numpy pipeline (before resizing), so it must match too
    det = anomalens.create("padim", **fast_options("padim"), intensity="stretch").fit(texture.train)
    path = export_onnx(det, tmp_path / "padim.onnx")
    ref = det.predict(texture.test[:3])
    got = OnnxDetector.load(path, batch_size=1).predict(texture.test[:3])
    assert np.abs(got.scores - ref.scores).max() < TOL
    # an image at another size and grayscale comes back at its own size, like torch's
    image = np.random.default_rng(0).random((50, 90)).astype(np.float32)
    ref_map, got_map = det.predict([image]).maps[0], OnnxDetector.load(path).predict([image]).maps[0]
    assert got_map.shape == (50, 90) and np.abs(got_map - ref_map).max() < TOL


def test_metadata_describes_the_model(patchcore, tmp_path):
    path = export_onnx(patchcore, tmp_path / "pc.onnx")
    model = onnx.load(str(path))
    meta = json.loads({p.key: p.value for p in model.metadata_props}["anomalens"])
    assert meta["detector"] == "patchcore" and meta["options"]["image_size"] == 64
    assert meta["calibration"] == patchcore.calibration.to_dict()
    assert meta["threshold"] == patchcore.calibration.threshold
    assert meta["anomalens_version"] == anomalens.__version__
    assert meta["input"]["layout"] == "NCHW" and meta["input"]["channels"] == 3
    assert meta["parity"]["ok"] and meta["parity"]["max_score_diff"] < TOL
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 3, 64, 64]
    assert [o.name for o in model.graph.output] == [
        "score",
        "normalized_score",
        "anomaly_map",
        "normalized_map",
    ]


def test_operating_point_decides_in_the_export(patchcore, texture, tmp_path, monkeypatch):
    ref = patchcore.predict(texture.test)
    threshold = float(np.median(ref.scores))  # flags about half the images, unlike the calibration
    monkeypatch.setattr(patchcore, "operating_point", {"threshold": threshold})
    ref = patchcore.predict(texture.test)
    onnx_det = OnnxDetector.load(export_onnx(patchcore, tmp_path / "op.onnx"))
    got = onnx_det.predict(texture.test)
    assert onnx_det.metadata["threshold"] == threshold and got.calibration.threshold == threshold
    assert (got.is_anomalous == ref.is_anomalous).all() and 0 < got.is_anomalous.sum() < len(got)
    out = onnx_det.run(np.stack([onnx_det.preprocess()(np.full((64, 64), 0.5, np.float32))]))
    np.testing.assert_allclose(out["normalized_score"], got.calibration.normalize(out["score"]), rtol=1e-5)


class _KernelFromSize(torch.nn.Module):
    """An identity depthwise conv whose kernel is built from the input's size, as pytorch_msssim's
    SSIM window is: the tracer cannot export it along a dynamic batch axis."""

    def __init__(self, core: torch.nn.Module) -> None:
        super().__init__()
        self.core = core

    def forward(self, pixels: torch.Tensor):
        kernel = torch.ones(1, 1, 1, 1).repeat(pixels.shape[1], 1, 1, 1)
        return self.core(torch.nn.functional.conv2d(pixels, kernel, groups=pixels.shape[1]))


def test_untraceable_graph_is_a_one_line_export_error(patchcore, tmp_path, monkeypatch):
    core = patchcore.inference_module()
    monkeypatch.setattr(patchcore, "inference_module", lambda: _KernelFromSize(core))
    with pytest.raises(
        ExportError, match=r"ONNX export of patchcore failed \(\w+: .*kernel of unknown shape"
    ) as err:
        export_onnx(patchcore, tmp_path / "bad.onnx")
    assert "\n" not in str(err.value) and not list(tmp_path.iterdir())


def test_export_fails_when_onnx_disagrees_with_torch(patchcore, tmp_path, monkeypatch):
    real = patchcore._score_batch
    monkeypatch.setattr(patchcore, "_score_batch", lambda pixels: (real(pixels)[0] + 0.01, real(pixels)[1]))
    with pytest.raises(ExportError, match="does not reproduce"):
        export_onnx(patchcore, tmp_path / "bad.onnx")
    assert not list(tmp_path.iterdir())  # no file, not even a temporary one, is left behind


def test_classical_detectors_are_not_exportable(classical, tmp_path):
    with pytest.raises(NotExportableError, match="classical:knn cannot be exported"):
        export_onnx(classical, tmp_path / "knn.onnx")
    assert onnx_size(classical) is None


def test_benchmark_reports_the_exported_size(patchcore, tmp_path):
    size = onnx_size(patchcore)
    # the memory bank is a constant of the graph: at least its bytes
    assert size > patchcore.model.memory_bank.numel() * 4 / 2**20


def test_onnx_detector_rejects_foreign_files_and_sets_threads(patchcore, tmp_path):
    foreign = tmp_path / "plain.onnx"
    torch.onnx.export(torch.nn.Linear(2, 1), (torch.zeros(1, 2),), str(foreign), dynamo=False)
    with pytest.raises(ModelFileError, match="not an anomalens ONNX export"):
        OnnxDetector.load(foreign)
    with pytest.raises(ModelFileError, match="not found"):
        OnnxDetector.load(tmp_path / "missing.onnx")
    det = OnnxDetector.load(export_onnx(patchcore, tmp_path / "pc.onnx"), threads=1)
    assert det.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, 64, 64\)"):
        det.run(np.zeros((1, 3, 32, 32), np.float32))


def test_cli_export_and_predict_with_onnx_runtime(patchcore, classical, texture_root, tmp_path, monkeypatch):
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    model = patchcore.save(tmp_path / "pc.model")
    result = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "pc.onnx")])
    assert result.exit_code == 0, result.output
    assert "MB" in result.output and "max |score diff|" in result.output

    def scores(model_arg, runtime, out):
        threads = ["--threads", "1"] if runtime != "torch" else []
        res = runner.invoke(
            app,
            [
                "predict",
                str(model_arg),
                str(texture_root / "test"),
                "-o",
                str(out),
                "--runtime",
                runtime,
                *threads,
                "--no-overlays",
                "-q",
            ],
        )
        assert res.exit_code == 0, res.output
        return {
            r["path"]: (float(r["score"]), r["anomalous"]) for r in csv.DictReader(open(out / "scores.csv"))
        }

    torch_rows = scores(model, "torch", tmp_path / "t")
    runs = [(tmp_path / "pc.onnx", "onnx", "o"), (model, "onnx", "m")]  # an .onnx file, or a model file
    from anomalens.export import openvino_available

    if openvino_available():  # its parity is required in test_onnx_runtime_gives_the_torch_scores_and_maps
        runs.append((tmp_path / "pc.onnx", "openvino", "v"))
    for model_arg, runtime, out in runs:
        rows = scores(model_arg, runtime, tmp_path / out)
        tol = TOL if runtime == "onnx" else OV_TOL
        assert rows.keys() == torch_rows.keys()
        for key, (score, flag) in torch_rows.items():
            assert abs(rows[key][0] - score) <= tol * max(1.0, abs(score)) and rows[key][1] == flag
    assert (
        len(list((tmp_path / "cache" / "onnx" / "models").glob("*.onnx"))) == 1
    )  # exported once, then cached

    knn = classical.save(tmp_path / "knn.model")
    result = runner.invoke(app, ["export", str(knn), "-o", str(tmp_path / "knn.onnx")])
    assert result.exit_code == 2 and "cannot be exported" in result.output
    result = runner.invoke(
        app, ["predict", str(tmp_path / "pc.onnx"), str(texture_root / "test"), "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "--runtime onnx" in result.output


def test_score_into_the_store_with_the_onnx_runtime(patchcore, texture_root, tmp_path, monkeypatch):
    import sqlite3

    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))
    model = patchcore.save(tmp_path / "pc.model")
    stored = {}
    for runtime in ("torch", "onnx"):
        db = tmp_path / f"{runtime}.db"
        args = ["score", str(model), str(texture_root / "test"), "-o", str(db), "--runtime", runtime, "-q"]
        result = CliRunner().invoke(app, [*args, "--threads", "1"])
        assert result.exit_code == 0, result.output
        with sqlite3.connect(db) as con:
            stored[runtime] = dict(con.execute("select path, score from results"))
    assert len(stored["torch"]) == 12 and stored["onnx"].keys() == stored["torch"].keys()
    for key, score in stored["torch"].items():
        assert abs(stored["onnx"][key] - score) <= TOL * max(1.0, abs(score))
