"""What every command shares: the consoles, the one-line error exit, option parsing, the runtime choice."""

from __future__ import annotations

from enum import Enum

import typer
from rich.console import Console

err = Console(stderr=True, soft_wrap=True)  # never break a file path across lines
out = Console(soft_wrap=True)

SET_HELP = "Model option as key=value, repeatable (see `anomalens models`), e.g. --set coreset_ratio=0.05"


class Runtime(str, Enum):
    """`--runtime`: what scores the images."""

    torch = "torch"
    onnx = "onnx"
    openvino = "openvino"


RUNTIME_HELP = (
    "torch; onnx: ONNX Runtime; openvino: OpenVINO's CPU plugin (an optional extra: pip install openvino). "
    "onnx and openvino take an exported .onnx file, or a model file (exported once and cached)"
)
THREADS_HELP = "threads per model call (default: the runtime's choice, one per core)"


def fail(message: str, code: int = 2) -> None:
    """End the command with one line `error: message` and exit code `code` (2: a user error)."""
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's input, not a bug: each ends in `fail` with its message."""
    from anomalens.backbones import BackboneError
    from anomalens.data import DatasetError, ImageReadError
    from anomalens.models.base import ModelFileError

    return ImageReadError, DatasetError, BackboneError, ModelFileError, ValueError, FileNotFoundError


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """`--set key=value` pairs as a dict of strings (each detector coerces them to its types)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--set expects key=value, got {pair!r}")
        options[key.strip()] = value.strip()
    return options
