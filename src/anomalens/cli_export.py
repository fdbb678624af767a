"""`anomalens export` and the `predict --runtime` choices, used by cli.py:

    from anomalens.cli_export import Runtime, export
    app.command()(export)

Thin: the work lives in anomalens.export. Helpers of cli.py are imported inside the function,
so cli.py may import this module at its top.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class Runtime(str, Enum):
    """`predict --runtime`: what scores the images."""

    torch = "torch"
    onnx = "onnx"


def export(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    output: Path = typer.Option(..., "--output", "-o", help="ONNX file to write"),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version"),
) -> None:
    """Export a fitted model to one ONNX file that scores like the torch model.

    The graph takes float32 images in [0, 1], (batch, channels, S, S) at the model resolution S,
    and returns the raw and normalized image scores and maps; normalization, the detector and the
    calibration are inside, and its metadata (JSON under "anomalens") describes the model. The
    export is checked against torch on a random batch and fails beyond 1e-4. Score with it via
    `anomalens predict MODEL.onnx ... --runtime onnx`.

    Example: anomalens export tile.model -o tile.onnx
    """
    import anomalens
    from anomalens.cli import _fail, _user_errors, out
    from anomalens.export import ExportError, OnnxDetector, export_onnx

    try:
        path = export_onnx(anomalens.load(model_file), output, opset=opset)
    except (ExportError, *_user_errors()) as e:
        _fail(str(e))
    parity = OnnxDetector.load(path).metadata["parity"]
    out.print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MB); parity with torch on {parity['n_images']} "
              f"random images: max |score diff| {parity['max_score_diff']:.2g}, "
              f"max |map diff| {parity['max_map_diff']:.2g}", highlight=False)
