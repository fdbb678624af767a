"""Model files are checked on load: a clear ModelFileError for any file that is not a usable model,
never a traceback or a model that scores NaN; a NaN score is an error, never a pass."""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import anomalens
from anomalens.data import synthetic_image
from anomalens.inference import decide
from anomalens.models.base import Detector, ModelFileError
from anomalens.thresholds import Calibration, NonFiniteScoreError
from conftest import TINY_AUTOENCODER as TINY


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    goods = [synthetic_image("texture", 32, rng=rng) for _ in range(6)]
    path = tmp_path_factory.mktemp("model") / "tiny.model"
    anomalens.create("autoencoder", **TINY).fit(goods).save(path)
    return path


def parts(path):
    with safe_open(str(path), framework="numpy") as f:
        header = json.loads(f.metadata()["anomalens"])
    return header, load_file(str(path))


def write(path, header, arrays):
    save_file(arrays, str(path), metadata={"anomalens": json.dumps(header)})
    return path


def refused(path, *words):
    with pytest.raises(ModelFileError) as err:
        Detector.load(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    for word in words:
        assert word in message, message
    return message


def test_the_tiny_model_loads_and_scores(model_file):
    det = Detector.load(model_file)
    assert det.name == "autoencoder" and np.isfinite(det.calibration.threshold)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda h: ["a", "list"], ("JSON object",)),
        (lambda h: {**h, "detector": "nonesuch"}, ("unknown detector",)),
        (lambda h: {**h, "options": {**h["options"], "image_size": 100000}}, ("image_size",)),
        (lambda h: {**h, "options": {**h["options"], "image_size": -5}}, ("image_size",)),
        (lambda h: {**h, "options": {**h["options"], "image_size": "12x99999"}}, ("image_size",)),
        (lambda h: {**h, "options": {**h["options"], "depth": "2"}}, ("depth", "integer")),
        (lambda h: {**h, "options": {**h["options"], "width": 10**9}}, ("width",)),
        (lambda h: {**h, "options": {**h["options"], "lr": float("nan")}}, ("lr", "finite")),
        (lambda h: {**h, "options": {**h["options"], "batch_size": 0}}, ("batch_size",)),
        (lambda h: {**h, "options": {**h["options"], "nonesuch": 1}}, ("unknown option",)),
        (lambda h: {**h, "options": [1, 2]}, ("options",)),
        (lambda h: {**h, "calibration": {**h["calibration"], "threshold": float("nan")}}, ("threshold",)),
        (lambda h: {**h, "calibration": {**h["calibration"], "center": "0"}}, ("center",)),
        (lambda h: {**h, "calibration": {"threshold": 1.0}}, ("calibration",)),
        (lambda h: {**h, "operating_point": {"threshold": float("inf")}}, ("operating_point",)),
        (lambda h: {k: v for k, v in h.items() if k != "state"}, ("'state'",)),
        (lambda h: {**h, "format_version": 7}, ("format 7",)),
    ],
)
def test_bad_headers_are_refused_in_one_line(model_file, tmp_path, change, words):
    header, arrays = parts(model_file)
    refused(write(tmp_path / "bad.model", change(header), arrays), *words)


def test_missing_misshapen_or_nan_arrays_are_refused(model_file, tmp_path):
    header, arrays = parts(model_file)
    weight = "ae/encoder.net.0.0.weight"
    refused(
        write(tmp_path / "a.model", header, {k: v for k, v in arrays.items() if k != weight}),
        weight,
        "missing",
    )
    wide = {**arrays, weight: np.zeros((9, *arrays[weight].shape[1:]), np.float32)}
    refused(write(tmp_path / "b.model", header, wide), weight, "shape")
    nan = {**arrays, weight: np.full_like(arrays[weight], np.nan)}
    refused(write(tmp_path / "c.model", header, nan), weight, "NaN")
    odd = {**arrays, weight: arrays[weight].astype(np.complex64)}
    refused(write(tmp_path / "d.model", header, odd), weight, "dtype")


def test_a_folder_or_garbage_is_not_a_model(tmp_path):
    assert "folder" in refused(tmp_path)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00" * 64)
    refused(junk, "not an anomalens model file")


def test_a_nan_score_is_an_error_never_a_pass():
    cal = Calibration(
        threshold=1.0, center=0.0, pixel_threshold=1.0, pixel_center=0.0, quantile=0.99, n_images=5
    )
    assert cal.is_anomalous(2.0) and not cal.is_anomalous(0.5)
    with pytest.raises(NonFiniteScoreError, match="NaN"):
        cal.is_anomalous(np.array([0.5, np.nan]))
    with pytest.raises(NonFiniteScoreError):
        decide(float("nan"), np.zeros((8, 8), np.float32), cal)


def _mutations(header, arrays):
    """Hypothesis strategy: the file's header and arrays with one or more hostile changes."""
    nasty = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=8),
        st.lists(st.integers(-3, 3), max_size=3),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
    )
    keys = sorted(header)
    option_keys = sorted(header["options"])
    cal_keys = sorted(header["calibration"])
    array_keys = sorted(arrays)

    def header_key(h, a, key, value):
        return {**h, key: value}, a

    def drop_header_key(h, a, key, _):
        return {k: v for k, v in h.items() if k != key}, a

    def section(name):
        def change(h, a, key, value):
            old = h.get(name) if isinstance(h.get(name), dict) else {}
            return {**h, name: {**old, key: value}}, a

        return change

    option, calibration = section("options"), section("calibration")

    def drop_array(h, a, key, _):
        return h, {k: v for k, v in a.items() if k != key}

    def reshape_array(h, a, key, value):
        if key not in a:  # dropped by an earlier step
            return h, a
        shape = (abs(value) % 5 + 1,) if isinstance(value, int) else (2, 3)
        return h, {**a, key: np.zeros(shape, a[key].dtype)}

    def poison_array(h, a, key, value):
        if key not in a or a[key].dtype.kind != "f" or not a[key].size:
            return h, a
        poisoned = a[key].copy()
        with np.errstate(over="ignore"):
            poisoned.flat[0] = value
        return h, {**a, key: poisoned}

    one = st.one_of(
        st.tuples(st.just(header_key), st.sampled_from(keys), nasty),
        st.tuples(st.just(drop_header_key), st.sampled_from(keys), st.none()),
        st.tuples(st.just(option), st.sampled_from([*option_keys, "bogus"]), nasty),
        st.tuples(st.just(calibration), st.sampled_from(cal_keys), nasty),
        st.tuples(st.just(drop_array), st.sampled_from(array_keys), st.none()),
        st.tuples(st.just(reshape_array), st.sampled_from(array_keys), st.integers(-9, 9)),
        st.tuples(st.just(poison_array), st.sampled_from(array_keys), st.floats()),
    )
    return st.lists(one, min_size=1, max_size=3)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_fuzzed_model_files_end_in_a_model_file_error_or_a_valid_model(model_file, fuzz_dir):
    header, arrays = parts(model_file)
    target = fuzz_dir / "fuzzed.model"

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(_mutations(header, arrays))
    def check(steps):
        h, a = header, dict(arrays)
        for change, key, value in steps:
            h, a = change(h, a, key, value)
        try:
            write(target, h, a)
        except (TypeError, ValueError, OverflowError):
            return  # not even writable as safetensors + JSON: nothing to load
        try:
            det = Detector.load(target)
        except ModelFileError as err:
            assert "\n" not in str(err)
            return
        # what loads is a usable model: finite calibration, scores that are never NaN
        scores, _ = det.score_batch(torch.zeros(1, 1, *det.input_size))
        assert not np.isnan(scores).any()
        if det.calibration is not None:
            assert np.isfinite(det.calibration.threshold)

    check()
    shutil.rmtree(fuzz_dir, ignore_errors=True)


def test_onnx_exports_with_bad_metadata_are_refused(model_file, tmp_path):
    import onnx

    from anomalens.export import OnnxDetector, export_onnx

    exported = export_onnx(Detector.load(model_file), tmp_path / "tiny.onnx")
    assert OnnxDetector.load(exported).calibration is not None
    proto = onnx.load(str(exported))
    entry = next(p for p in proto.metadata_props if p.key == "anomalens")
    good = json.loads(entry.value)
    for bad, word in [
        ({**good, "calibration": {**good["calibration"], "threshold": float("nan")}}, "threshold"),
        ({**good, "options": {**good["options"], "image_size": -5}}, "image_size"),
        ({**good, "operating_point": {"threshold": "high"}}, "operating_point"),
        ({**good, "detector": "nonesuch"}, "unknown detector"),
        ([good], "JSON object"),
    ]:
        entry.value = json.dumps(bad)
        path = tmp_path / "bad.onnx"
        onnx.save(proto, str(path))
        with pytest.raises(ModelFileError, match=word):
            OnnxDetector.load(path)
