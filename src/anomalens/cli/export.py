"""`export`: one ONNX file that scores like the torch model."""

from __future__ import annotations

from pathlib import Path

import typer

from anomalens.cli.common import fail, out, user_errors


def export(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    output: Path = typer.Option(..., "--output", "-o", help="ONNX file to write"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version"),
    int8: bool = typer.Option(
        False,
        "--int8",
        help="require the INT8 graph: the model must be fitted with --set runtime_precision=int8 "
        "(its backbone quantized on its training goods); the export scores with that very backbone",
    ),
) -> None:
    """Export a fitted model to one ONNX file that scores like the torch model.

    The graph takes float32 images in [0, 1], (batch, channels, S, S) at the model resolution S,
    and returns the raw and normalized image scores and maps; normalization, the detector and the
    calibration are inside, and its metadata (JSON under "anomalens") describes the model. The
    export is checked against torch on a random batch and fails beyond 1e-4. A model fitted with
    --set runtime_precision=int8 exports its INT8 backbone (checked against the model the same way).
    Score with it via `anomalens predict MODEL.onnx ... --runtime onnx` (or openvino).

    A multi-product model exports one ONNX file per product (OUTPUT-<product>.onnx, one file under
    routing=shared), each scoring with its product's own calibration; the router is not exported:
    the caller picks the file by product.

    Example: anomalens export tile.model -o tile.onnx
    """
    from anomalens.export import ExportError, OnnxDetector, export_onnx
    from anomalens.models.base import Detector

    try:
        detector = Detector.load(model_file)
        if detector.name == "multi":
            return _export_products(detector, output, opset)
        if int8 and getattr(detector, "int8_backbone", None) is None:
            fail(
                f"--int8: '{model_file}' was fitted in fp32; refit it with --set runtime_precision=int8 "
                "(PatchCore, PaDiM): the memory bank and threshold must come from the INT8 features"
            )
        path = export_onnx(detector, output, opset=opset)
    except (ExportError, *user_errors()) as e:
        fail(str(e))
    meta = OnnxDetector.load(path).metadata
    parity = meta["parity"]
    out.print(
        f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB, {meta['precision']}); parity with the model "
        f"on {parity['n_images']} random images: max |score diff| {parity['max_score_diff']:.2g}, "
        f"max |map diff| {parity['max_map_diff']:.2g}",
        highlight=False,
    )


def _export_products(detector, output: Path, opset: int) -> None:
    from anomalens.export import export_onnx

    names = ["shared"] if detector.options["routing"] == "shared" else detector.products
    for name in names:
        product = detector.products[0] if name == "shared" else name
        path = output.with_name(f"{output.stem}-{name.replace('/', '_')}{output.suffix or '.onnx'}")
        export_onnx(detector.product_detector(product), path, opset=opset)
        out.print(
            f"wrote {path} ({name}: scores with its own calibration; no router inside)", highlight=False
        )
