"""Run a :class:`FeatureExtractor` through ONNX Runtime (fast on CPU), OpenVINO or torch eager.

Both runners map a normalized float32 numpy batch (N, 3, H, W) to a list of
numpy feature maps, so callers do not care which engine is underneath.
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .extractor import BackboneError, FeatureExtractor, resolve_device, weights_checksum
from .runtimes import onnx_session

__all__ = ["OnnxFeatureRunner", "TorchFeatureRunner", "make_feature_runner", "onnx_cache_dir"]

OPSET = 17
ENGINES = ("auto", "onnx", "openvino", "torch")
FeatureRunner = Callable[[np.ndarray], list[np.ndarray]]
_warned: set[str] = set()


def onnx_cache_dir() -> Path:
    """``$ANOMALENS_CACHE/onnx`` if set, else ``~/.cache/anomalens/onnx``."""
    root = os.environ.get("ANOMALENS_CACHE") or Path.home() / ".cache" / "anomalens"
    return Path(root) / "onnx"


def _hw(input_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return input_size, input_size
    h, w = input_size
    return int(h), int(w)


def _as_batch(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise BackboneError(f"expected a float32 batch of shape (N, 3, H, W), got {x.shape}")
    return x


class OnnxFeatureRunner:
    """ONNX Runtime (CPUExecutionProvider) or, with runtime="openvino", OpenVINO version of a
    FeatureExtractor.

    The graph has a dynamic batch axis and the fixed ``input_size`` (H, W).
    The exported file is cached under :func:`onnx_cache_dir`, keyed by the
    weights checksum, architecture, layers and size; ``exported`` tells
    whether this instance had to export it. ``graph``: run these ONNX bytes
    instead (the INT8 backbone a detector was fitted with, see quantize.py).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        input_size: int | tuple[int, int],
        cache_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        runtime: str = "onnx",
        graph: bytes | None = None,
    ) -> None:
        self.input_size = _hw(input_size)
        h, w = self.input_size
        layers = extractor.spec.layers
        # torch version in the key: a newer exporter may emit a different graph.
        key = hashlib.sha256(
            f"{extractor.arch}|{weights_checksum(extractor)}|{layers}|{h}x{w}|{OPSET}|{torch.__version__}".encode()
        ).hexdigest()[:16]
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", extractor.arch)
        directory = Path(cache_dir) if cache_dir is not None else onnx_cache_dir()
        self.path = directory / f"{stem}_l{'-'.join(map(str, layers))}_{h}x{w}_{key}.onnx"
        self.exported = graph is None and not self.path.is_file()
        if self.exported:
            _export(extractor, self.path, h, w)

        self.runtime = runtime
        source = self.path if graph is None else graph
        self.session = onnx_session(source, runtime, threads or torch.get_num_threads(), BackboneError)
        self._input_name = "input"  # as _export names it

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = _as_batch(x)
        if x.shape[2:] != self.input_size:
            raise BackboneError(
                f"ONNX runner built for {self.input_size} inputs, got {x.shape[2:]}: resize images"
            )
        return self.session.run(None, {self._input_name: x})


def _export(extractor: FeatureExtractor, path: Path, h: int, w: int) -> None:
    """Export to ``path`` atomically (temp file + rename), so readers never see half a file."""
    model = extractor if next(extractor.parameters()).device.type == "cpu" else copy.deepcopy(extractor).cpu()
    names = [f"feat{i}" for i in range(len(extractor.spec.layers))]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    os.close(fd)
    try:
        # Batch 2 so the tracer cannot specialise any shape to a batch of 1.
        dummy = torch.zeros(2, 3, h, w)
        with torch.no_grad(), warnings.catch_warnings():
            # Legacy-exporter deprecation and TracerWarnings about shape math
            # are expected: H and W are fixed by design.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (dummy,),
                tmp,
                dynamo=False,  # the dynamo exporter needs onnxscript, which is not a dependency
                opset_version=OPSET,
                input_names=["input"],
                output_names=names,
                dynamic_axes={n: {0: "batch"} for n in ["input", *names]},
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except Exception as exc:  # the exporter fails with many error types
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise BackboneError(
            f"ONNX export of {extractor.arch} failed ({type(exc).__name__}: {first_line})"
        ) from exc
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class TorchFeatureRunner:
    """Torch eager version of a FeatureExtractor (any input size, CPU or CUDA)."""

    def __init__(self, extractor: FeatureExtractor, device: str | torch.device = "cpu") -> None:
        self.device = resolve_device(device)
        self.extractor = extractor.to(self.device)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        batch = torch.from_numpy(_as_batch(x)).to(self.device)
        with torch.inference_mode():
            return [f.float().cpu().numpy() for f in self.extractor(batch)]


def make_feature_runner(
    extractor: FeatureExtractor,
    input_size: int | tuple[int, int],
    device: str | torch.device = "cpu",
    engine: str = "auto",
    int8_graph: bytes | None = None,
) -> FeatureRunner:
    """Return a callable: normalized float32 (N, 3, H, W) numpy batch -> list of feature maps.

    engine "onnx": :class:`OnnxFeatureRunner` (CPU only); "openvino": the same
    graph in OpenVINO (CPU only); "torch": eager torch on ``device``; "auto":
    ONNX on CPU when onnxruntime imports and the exported graph reproduces
    torch's outputs, otherwise torch (warning once about why).
    ``int8_graph``: the backbone's INT8 ONNX bytes, run by ONNX Runtime
    ("auto", "onnx") or OpenVINO; torch and CUDA cannot run them.
    """
    if engine not in ENGINES:
        raise BackboneError(f"unknown engine {engine!r}: use one of {', '.join(map(repr, ENGINES))}")
    torch_device = resolve_device(device)
    if int8_graph is not None:
        if engine == "torch" or torch_device.type != "cpu":
            raise BackboneError(
                "an INT8 backbone (runtime_precision=int8) runs on the CPU in ONNX Runtime or "
                "OpenVINO: use device=cpu and engine=auto, onnx or openvino"
            )
        engine = "onnx" if engine == "auto" else engine
    if engine in ("onnx", "openvino"):
        if torch_device.type != "cpu":
            raise BackboneError(f"engine={engine!r} runs on CPU only: use device='cpu' or engine='torch'")
        try:
            return OnnxFeatureRunner(extractor, input_size, runtime=engine, graph=int8_graph)
        except ValueError as exc:  # OpenVINO not installed
            raise BackboneError(str(exc)) from None
    eager = TorchFeatureRunner(extractor, torch_device)
    if engine == "torch" or torch_device.type != "cpu":
        return eager
    try:
        import onnxruntime

        runner = OnnxFeatureRunner(extractor, input_size)
        # a fixed cost of every fit and load: the cached graph is checked once per ONNX Runtime version
        checked = runner.path.with_name(f"{runner.path.name}.agrees-ort{onnxruntime.__version__}")
        if not checked.is_file():
            _check_agreement(runner, eager, runner.input_size)
            checked.touch()
    except (ImportError, BackboneError) as exc:
        _warn_once(f"ONNX engine unavailable, using torch: {exc}")
        return eager
    return runner


def _check_agreement(runner: FeatureRunner, reference: FeatureRunner, size: tuple[int, int]) -> None:
    """Raise BackboneError unless ``runner`` matches ``reference`` to 1e-4 (relative to the feature scale)."""
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).numpy()
    for got, ref in zip(runner(x), reference(x), strict=True):
        scale = max(1.0, float(np.abs(ref).max()))
        if got.shape != ref.shape or float(np.abs(got - ref).max()) > 1e-4 * scale:
            raise BackboneError("ONNX outputs differ from torch beyond 1e-4")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
