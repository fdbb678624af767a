"""Multi-product models (routing, the unmatched product, shared bank, CLI, service), few-shot fitting
from one good, and a ViT backbone from a local weight file."""

import csv
import io
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data import load_mvtec, load_products, make_synthetic_dataset
from anomalens.data.inputs import as_items
from anomalens.export import OnnxDetector, export_onnx
from anomalens.metrics import image_metrics
from anomalens.serve import ServeConfig, create_app, load_inferencer
from conftest import fast_options

MULTI = {**fast_options("multi")}


@pytest.fixture(scope="module")
def line_root(texture_root, tmp_path_factory):
    """Two products: the shared synthetic texture and a synthetic part seen from above."""
    root = tmp_path_factory.mktemp("line")
    shutil.copytree(texture_root, root / "texture")
    make_synthetic_dataset(
        root / "part", kind="object", n_train=16, n_test_good=6, n_test_defect=6, size=64, seed=2
    )
    return root


@pytest.fixture(scope="module")
def products(line_root):
    return load_products(line_root)


@pytest.fixture(scope="module")
def multi(products):
    return anomalens.create("multi", **MULTI).fit({name: d.train for name, d in products.items()})


def noise_image(seed=0):
    return np.random.default_rng(seed).random((64, 64, 3)).astype(np.float32)


def test_routes_each_product_to_its_own_detector_and_calibration(multi, products):
    assert sorted(multi.products) == ["part", "texture"]
    for name, data in products.items():
        routes = multi.route(data.test)
        assert all(r.product == name for r in routes)
        assert all(r.matched for r, s in zip(routes, data.test) if s.label == 0)
        pred = multi.predict(data.test)
        labels = [s.label for s in data.test]
        assert image_metrics(labels, pred.scores)["image_auroc"] >= 0.9
        # the multi model's score is the product detector's score over the product's own threshold
        own = multi.product_detector(name)
        ref = own.predict(data.test)
        matched = np.array([r.matched for r in routes])
        np.testing.assert_allclose(
            pred.scores[matched], ref.scores[matched] / own.calibration.threshold, rtol=1e-5, atol=1e-6
        )
        assert (pred.is_anomalous[matched] == ref.is_anomalous[matched]).all()
    assert multi.calibration.threshold == 1.0 and multi.calibration.center == 0.0


def test_an_image_matching_no_product_is_flagged_with_the_reason(multi):
    route = multi.route([noise_image()])[0]
    assert not route.matched and route.distance > route.limit
    assert "matches no product" in route.reason and route.product in route.reason
    pred = multi.predict([noise_image()])
    assert pred.is_anomalous[0] and pred.scores[0] >= route.distance / route.limit
    assert (pred.maps[0] >= route.distance / route.limit - 1e-5).all()  # the whole image is unexpected


def test_one_file_with_tensors_namespaced_per_product(multi, products, tmp_path):
    from safetensors import safe_open

    path = multi.save(tmp_path / "line.model")
    with safe_open(str(path), framework="numpy") as f:
        keys = set(f.keys())
    assert {"part/memory_bank", "texture/memory_bank", "router/centroids", "router/limits"} <= keys
    again = anomalens.load(path)
    test = products["part"].test + products["texture"].test
    np.testing.assert_allclose(again.predict(test).scores, multi.predict(test).scores, rtol=1e-5, atol=1e-6)
    assert [r.product for r in again.route(test)] == [r.product for r in multi.route(test)]


def test_shared_bank_variant_detects_and_still_flags_strangers(products):
    det = anomalens.create("multi", **MULTI, routing="shared", seed=1)
    det.fit({name: d.train for name, d in products.items()})
    assert det.product_detector("part") is det.product_detector("texture")
    for data in products.values():
        labels = [s.label for s in data.test]
        assert image_metrics(labels, det.predict(data.test).scores)["image_auroc"] >= 0.9
    assert det.predict([noise_image(1)]).is_anomalous[0]


def test_products_from_a_csv_column(line_root, tmp_path):
    path = tmp_path / "line.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "product"])
        for name in ("part", "texture"):
            for img in sorted((line_root / name / "train" / "good").glob("*.png"))[:3]:
                w.writerow([img, "good", "train", name])
    got = load_products(path)
    assert sorted(got) == ["part", "texture"] and all(len(d.train) == 3 for d in got.values())
    assert all(s.product == "part" for s in got["part"].train)


def test_bad_options_and_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="method="):
        anomalens.create("multi", method="autoencoder")
    with pytest.raises(ValueError, match="routing="):
        anomalens.create("multi", routing="nearest")
    with pytest.raises(ValueError, match="method_options"):
        anomalens.create("multi", method_options="coreset_ratio")
    with pytest.raises(ValueError, match="no good images for product"):
        anomalens.create("multi", **MULTI).fit({"a": []})


def test_cli_fit_evaluate_export_and_the_service(line_root, tmp_path):
    runner = CliRunner()
    model = tmp_path / "line.model"
    res = runner.invoke(
        app,
        ["fit", str(line_root), "--multi", "-o", str(model), "-q"]
        + [a for k, v in MULTI.items() for a in ("--set", f"{k}={v}")],
    )
    assert res.exit_code == 0, res.output
    assert "for 2 products" in res.output
    res = runner.invoke(
        app, ["evaluate", str(model), str(line_root), "--json", str(tmp_path / "m.json"), "-q"]
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics["products"]) == {"part", "texture"}
    assert metrics["routing"]["accuracy"] == 1.0
    assert all(m["image_auroc"] >= 0.9 for m in metrics["products"].values())
    # over both products, scores meet on the calibrations' common scale: as good as its few held-out goods
    assert metrics["overall"]["image_auroc"] > 0.6
    assert metrics["overall"]["n_images"] == sum(m["n_images"] for m in metrics["products"].values())
    # one ONNX per product, each scoring like its product's detector
    res = runner.invoke(app, ["export", str(model), "-o", str(tmp_path / "line.onnx")])
    assert res.exit_code == 0, res.output
    det = anomalens.load(model)
    onnx_part = OnnxDetector.load(tmp_path / "line-part.onnx", threads=1)
    test = load_mvtec(line_root / "part").test
    np.testing.assert_allclose(
        onnx_part.predict(test).scores, det.product_detector("part").predict(test).scores, atol=1e-4
    )
    # the service takes it like any model (torch runtime: the router is not in an ONNX graph)
    served = load_inferencer(model, runtime="torch", threads=1)
    client = TestClient(create_app(ServeConfig(model=model, runtime="torch"), inferencer=served))
    good, bad = (next(s for s in test if s.label == label) for label in (0, 1))
    for sample in (good, bad):
        got = client.post("/predict", files={"file": ("x.png", sample.path.read_bytes(), "image/png")}).json()
        ref = det.predict([sample.path])
        assert (
            got["score"] == pytest.approx(ref.scores[0], rel=1e-5) and got["anomalous"] == ref.is_anomalous[0]
        )
    buf = io.BytesIO()
    Image.fromarray((noise_image() * 255).astype(np.uint8)).save(buf, format="PNG")
    got = client.post("/predict", files={"file": ("noise.png", buf.getvalue(), "image/png")}).json()
    assert got["anomalous"] is True


# -- few-shot ---------------------------------------------------------------------------------------


def test_one_shot_fit_predict_save_load(texture, tmp_path):
    det = anomalens.create("patchcore", **fast_options("patchcore"), shots=1, augment_copies=3, seed=3)
    det.fit(texture.train)
    info = det.fit_info
    assert len(info["shots"]) == 1 and info["n_fit"] == 4  # the good and its 3 augmented copies
    assert "leave-one-out" in info["calibration"] and "uncertain" in info["warnings"][0]
    assert det.calibration.n_images == 4  # LOO_VIEWS augmented views of the one good
    pred = det.predict(texture.test)
    labels = [s.label for s in texture.test]
    assert image_metrics(labels, pred.scores)["image_auroc"] >= 0.8
    again = anomalens.load(det.save(tmp_path / "one.model"))
    assert again.calibration == det.calibration and again.fit_info["shots"] == info["shots"]
    np.testing.assert_allclose(again.predict(texture.test).scores, pred.scores, rtol=1e-5, atol=1e-6)


def test_few_shots_calibrate_leave_one_out_and_more_hold_out(texture):
    two = anomalens.create("patchcore", **fast_options("patchcore"), shots=2).fit(texture.train)
    assert two.fit_info["n_fit"] == 2 and two.calibration.n_images == 8  # 4 views of each good
    # a good that was never fitted scores near the leave-one-out threshold, not far above it
    unseen = [s for s in texture.train if str(s.path) not in two.fit_info["shots"]]
    assert np.median(two.predict(unseen).normalized_scores) < 1.5
    ten = anomalens.create("patchcore", **fast_options("patchcore"), shots=10).fit(texture.train)
    assert ten.fit_info["n_calibration"] == 1 and "calibration" not in ten.fit_info
    with pytest.raises(ValueError, match="shots=99"):
        anomalens.create("patchcore", **fast_options("patchcore"), shots=99).fit(texture.train)


def test_seeded_shots_pick_other_goods(texture):
    items = as_items(texture.train)
    picks = {
        tuple(it.key for it in anomalens.create("patchcore", shots=3, seed=s)._pick_shots(items))
        for s in range(4)
    }
    assert len(picks) > 1 and all(len(p) == 3 for p in picks)


# -- ViT backbone -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory):
    """A small randomly initialised ViT (2 blocks), saved as a whole model's state dict: no download."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2)
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_vit_patch_tokens_as_patchcore_features_at_any_size(vit_file, texture, tmp_path):
    opts = {**fast_options("patchcore"), "backbone": "timm:vit_tiny_patch16_224", "weights": str(vit_file)}
    opts["image_size"] = 72  # not a whole number of 16 px patches: padded, embeddings interpolated
    det = anomalens.create("patchcore", **opts, layers=(0, 1)).fit(texture.train)
    ex = det.extractor
    assert ex.strides == [16, 16] and ex.channels == [192, 192]
    # positional embeddings interpolated from the 14 x 14 grid to 72 px padded to 5 x 5 patches
    assert tuple(ex.body.model.pos_embed.shape) == (1, 1 + 25, 192)
    pred = det.predict(texture.test)
    assert [m.shape for m in pred.maps] == [(64, 64)] * len(texture.test)
    again = anomalens.load(det.save(tmp_path / "vit.model"))
    np.testing.assert_allclose(again.predict(texture.test).scores, pred.scores, rtol=1e-5, atol=1e-6)
    got = OnnxDetector.load(export_onnx(det, tmp_path / "vit.onnx"), threads=1).predict(texture.test)
    assert np.abs(got.scores - pred.scores).max() < 1e-4


def test_vit_weight_file_for_another_architecture_is_a_clear_error(vit_file):
    from anomalens.backbones import BackboneError

    det = anomalens.create(
        "patchcore", backbone="timm:vit_small_patch16_224", weights=str(vit_file), layers=(1,), image_size=64
    )
    with pytest.raises(BackboneError, match="wrong shape"):
        _ = det.extractor
