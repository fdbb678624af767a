"""Export a fitted detector to one self-describing ONNX file.

The graph takes a float32 image batch in [0, 1], (B, C, S, S) at the model resolution (the layout
`Preprocess` yields before normalizing), and holds the mean/std normalization, the detector's
inference module and the calibrated score normalization. Resizing and the `intensity` option stay
in the shared numpy input pipeline (data/inputs.py): `intensity` takes its statistics from the
image at its own resolution, before resizing, which a graph at model resolution cannot see.
The ONNX metadata_props key "anomalens" holds a JSON header: detector, options, calibration,
threshold, input description, anomalens version and the parity measured at export.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from anomalens._version import __version__
from anomalens.data.inputs import Preprocess
from anomalens.export.session import ort_session
from anomalens.thresholds import Calibration
from anomalens.thresholds.calibrate import _scale

FORMAT_VERSION = 2  # 2: geometry, map score and region of interest in the metadata
METADATA_KEY = "anomalens"
INPUT_NAME = "image"
OUTPUT_NAMES = ("score", "normalized_score", "anomaly_map", "normalized_map")
#: parity bound: absolute for values up to 1, relative above (float32 resolves 500 only to 3e-5)
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The detector could not be exported, or its export does not reproduce its scores."""


class NotExportableError(ExportError):
    """The detector has no inference graph (classical PyOD methods)."""


class ExportGraph(nn.Module):
    """[0, 1] image batch -> raw and calibrated image scores and maps, in one graph; with
    features=True the core is a detector's head and the graph takes the backbone's feature maps."""

    def __init__(
        self, core: nn.Module, preprocess: Preprocess, calibration: Calibration | None, features: bool = False
    ) -> None:
        super().__init__()
        self.features = features
        c = preprocess.channels
        self.core = core
        self.register_buffer("mean", torch.tensor(preprocess.mean[:c]).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std[:c]).view(1, c, 1, 1))
        # an uncalibrated detector exports its raw values as the "normalized" ones
        cal = calibration or Calibration(
            threshold=1.0, center=0.0, pixel_threshold=1.0, pixel_center=0.0, quantile=1.0, n_images=0
        )
        self.center, self.scale = cal.center, _scale(cal.threshold, cal.center)
        self.pixel_center, self.pixel_scale = cal.pixel_center, _scale(cal.pixel_threshold, cal.pixel_center)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.features:
            scores, maps = self.core(list(inputs))
        else:  # the same arithmetic as Preprocess
            scores, maps = self.core((inputs[0] - self.mean) / self.std)
        return (
            scores,
            (scores - self.center) / self.scale,
            maps,
            (maps - self.pixel_center) / self.pixel_scale,
        )


def export_onnx(detector, path: str | Path, opset: int = 17) -> Path:
    """Write `detector` as one ONNX file at `path` and check it against the torch detector.

    Raises NotExportableError for methods without an inference graph and ExportError when
    export fails or ONNX Runtime's scores or maps differ by more than 1e-4 on a random batch
    (relative to the value where it exceeds 1). The file is written atomically.
    """
    import onnx

    if not getattr(detector, "_fitted", False):
        raise ExportError(f"{detector.name} is not fitted: fit it or load a model file first")
    core = detector.inference_module()
    if core is None:
        raise NotExportableError(
            f"{detector.name} cannot be exported to ONNX: its scoring is not a neural "
            "network graph (classical detectors run scikit-learn/PyOD models)"
        )
    pre = detector.preprocess()
    example = torch.rand(
        2, pre.channels, *pre.input_size, generator=torch.Generator().manual_seed(0)
    )  # batch 2: no shape fixed to 1
    int8 = getattr(detector, "int8_backbone", None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        try:
            if int8 is None:
                _trace(
                    ExportGraph(core, pre, detector.decision_calibration).eval(),
                    (example,),
                    [INPUT_NAME],
                    tmp,
                    opset,
                )
            else:
                _compose_int8(core, int8, pre, detector.decision_calibration, example, tmp, opset)
        except Exception as exc:  # the exporter fails with many error types
            # e.g. "kernel of unknown shape": a kernel or channel count built from a tensor's size
            # is unknown along the dynamic batch axis; int(...) sizes or a buffer avoid it
            first_line = (str(exc).splitlines() or [""])[0][:300]
            raise ExportError(
                f"ONNX export of {detector.name} failed ({type(exc).__name__}: {first_line})"
            ) from exc
        parity = check_parity(detector, tmp, example.numpy())
        if not parity["ok"]:
            raise ExportError(
                f"ONNX export of {detector.name} does not reproduce its scores: max |score diff| "
                f"{parity['max_score_diff']:.3g}, max |map diff| {parity['max_map_diff']:.3g}"
            )
        meta = export_metadata(detector, pre, opset, parity)
        if int8 is not None:
            meta["precision"] = "int8"
        model = onnx.load(str(tmp))
        model.producer_name, model.producer_version = "anomalens", __version__
        model.doc_string = f"anomalens {detector.name} detector; see the '{METADATA_KEY}' metadata entry"
        entry = model.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        onnx.save(model, str(tmp))
        os.replace(tmp, path)  # a failed export never leaves a half file under the real name
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _trace(
    graph: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: list[str],
    path: Path,
    opset: int,
    outputs: tuple[str, ...] = OUTPUT_NAMES,
) -> None:
    """torch.onnx.export of `graph` with a dynamic batch axis on every input and output."""
    with torch.no_grad():
        graph(*example)  # an eager call first builds cached constants (smoothing matrices) outside the trace
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings about Python ints taken from shapes are expected: S is fixed by design
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,  # dynamo needs onnxscript
            opset_version=opset,
            input_names=inputs,
            output_names=list(outputs),
            dynamic_axes={n: {0: "batch"} for n in (*inputs, *outputs)},
            do_constant_folding=True,
        )


class _Normalize(nn.Module):
    """The mean/std normalization of a [0, 1] image batch, as Preprocess does it."""

    def __init__(self, preprocess: Preprocess) -> None:
        super().__init__()
        c = preprocess.channels
        self.register_buffer("mean", torch.tensor(preprocess.mean[:c]).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std[:c]).view(1, c, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def _compose_int8(
    core: nn.Module, int8: bytes, pre: Preprocess, calibration, example: torch.Tensor, path: Path, opset: int
) -> None:
    """One graph from three: the normalization, the INT8 backbone the detector was fitted with
    (its own quantized ONNX, so the export scores with the very same INT8 features) and the
    detector's head (core = Sequential(backbone, head)) with the calibration."""
    import onnx
    from onnx import compose

    backbone = onnx.load_from_string(int8)
    names = [o.name for o in backbone.graph.output]
    normalize = _Normalize(pre).eval()
    feats = ort_session(int8).run(names, {"input": normalize(example).numpy()})
    head = ExportGraph(core[1], pre, calibration, features=True).eval()
    part = path.with_name(path.name + ".part")
    parts = {"b_": backbone}
    try:
        for prefix, module, inputs, example_in, outputs in (
            ("n_", normalize, [INPUT_NAME], (example,), ("input",)),
            ("h_", head, names, tuple(map(torch.from_numpy, feats)), OUTPUT_NAMES),
        ):
            _trace(module, example_in, inputs, part, opset, outputs)
            parts[prefix] = onnx.load(str(part))
    finally:
        part.unlink(missing_ok=True)
    ir = max(m.ir_version for m in parts.values())
    for prefix, model in parts.items():
        model.ir_version = ir
        # unique node, edge and initializer names; the graphs' own inputs and outputs keep theirs
        compose.add_prefix(model, prefix, rename_inputs=False, rename_outputs=False, inplace=True)
    merged = compose.merge_models(parts["n_"], parts["b_"], io_map=[("input", "input")])
    onnx.save(compose.merge_models(merged, parts["h_"], io_map=[(n, n) for n in names]), str(path))


def export_metadata(detector, preprocess: Preprocess, opset: int, parity: dict[str, Any]) -> dict[str, Any]:
    """The JSON header stored in the ONNX file: everything needed to use it without anomalens' model file."""
    cal, decision = detector.calibration, detector.decision_calibration
    return {
        "format": "anomalens-onnx",
        "format_version": FORMAT_VERSION,
        "anomalens_version": __version__,
        "detector": detector.name,
        "options": detector.options,
        "localizes": detector.localizes,
        "calibration": cal.to_dict() if cal else None,
        "operating_point": detector.operating_point,
        "threshold": decision.threshold if decision else None,  # the image score that flags, as normalized
        "fit_info": detector.fit_info,
        "opset": opset,
        "precision": "fp32",  # "int8": quantized convolutions, see the "int8" entry
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "channels": preprocess.channels,
            "size": list(preprocess.input_size),
            "resize": f"{preprocess.canvas_geometry.resize}: bilinear, antialiased, from the image's own size",
            "intensity": preprocess.intensity,
            "intensity_applied": "before resizing, outside the graph",
            "geometry_applied": "outside the graph, by anomalens' shared predict loop (padding, tiles, "
            "stitching and the region of interest: data/geometry.py, models/base.py)",
        },
        "preprocess": preprocess.to_dict(),
        "map_score": detector.map_score,
        "drift": None if detector.drift_profile is None else _arrays_json(detector.drift_profile),
        "refine": None if detector.refiner is None else _arrays_json(detector.refiner),
        "roi_png": None if detector.roi is None else base64.b64encode(_png(detector.roi)).decode(),
        "outputs": list(OUTPUT_NAMES),
        "parity": parity,
    }


def _arrays_json(part) -> dict[str, Any]:
    """A drift profile or refine stage as JSON: its metadata, and its arrays as base64 .npy (read
    back without pickle)."""
    arrays, meta = part.to_arrays_and_meta()
    encoded = {}
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        encoded[name] = base64.b64encode(buffer.getvalue()).decode()
    return {"meta": meta, "arrays": encoded}


def _png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    return buffer.getvalue()


def check_parity(detector, onnx_path: str | Path, images: np.ndarray) -> dict[str, Any]:
    """Max |difference| of raw scores and maps between the torch detector and the ONNX file
    on `images`, float32 (B, C, S, S) in [0, 1]; "ok" applies the export's tolerance."""
    pre = detector.preprocess()
    c = pre.channels
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    ref_scores, ref_maps = detector.score_batch(
        (x - torch.tensor(pre.mean[:c]).view(1, c, 1, 1)) / torch.tensor(pre.std[:c]).view(1, c, 1, 1)
    )
    scores, _, maps, _ = ort_session(onnx_path).run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
    score_diff = float(np.abs(scores - ref_scores).max())
    map_diff = float(np.abs(maps - ref_maps).max())
    ok = score_diff <= TOLERANCE * max(1.0, float(np.abs(ref_scores).max())) and map_diff <= TOLERANCE * max(
        1.0, float(np.abs(ref_maps).max())
    )
    return {"max_score_diff": score_diff, "max_map_diff": map_diff, "n_images": int(x.shape[0]), "ok": ok}


def cached_export(model_file: str | Path, opset: int = 17, cache_dir: str | Path | None = None) -> Path:
    """The ONNX export of a saved model file, made once and then reused: keyed by the file's
    bytes, the export format, the anomalens and torch versions and the opset, so a refit or
    upgrade re-exports."""
    from anomalens.backbones import onnx_cache_dir
    from anomalens.models.base import Detector, check_model_path

    model_file = check_model_path(model_file)
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{__version__}|{torch.__version__}|{opset}|".encode())
    with open(model_file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    folder = Path(cache_dir) if cache_dir is not None else onnx_cache_dir() / "models"
    path = folder / f"{model_file.stem}_{digest.hexdigest()[:16]}.onnx"
    if not path.is_file():
        export_onnx(Detector.load(model_file), path, opset)
    return path
