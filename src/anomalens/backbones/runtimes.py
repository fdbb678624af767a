"""One way to open an ONNX graph on the CPU in each runtime: ONNX Runtime, or OpenVINO's CPU plugin
(an optional extra). The backbone's feature runner and the exported detectors both use these."""

from __future__ import annotations

from pathlib import Path

import numpy as np

OPENVINO_MISSING = (
    "the openvino runtime needs OpenVINO: pip install 'anomalens[openvino]' (or pip install openvino)"
)


def _where(path: str | Path | bytes) -> str:
    return "the ONNX bytes" if isinstance(path, bytes) else f"'{path}'"


def ort_session(path: str | Path | bytes, threads: int | None = None, error: type[Exception] = ValueError):
    """A CPU ONNX Runtime session of an ONNX file (or its bytes); `threads` intra-op threads (None:
    ONNX Runtime's default, one per core). A file it cannot load raises `error` in one line."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or 0
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ENABLE_ALL adds the NCHWc conv layout: ~2x faster than EXTENDED for Lite0 on CPU
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # idle workers would otherwise spin and steal the cores that decoding and the next step need
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own, non-exported exception types
        first_line = (str(exc).splitlines() or [""])[0][:300]
        raise error(f"{_where(path)} is not a loadable ONNX file ({first_line})") from None


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


class OpenVinoSession:
    """An ONNX graph compiled by OpenVINO's CPU plugin, called like an ONNX Runtime session:
    `run(output_names, {input_name: array})` returns the outputs in that order (all for None).

    Inference precision is pinned to f32 (OpenVINO picks bf16 on CPUs that have it, which breaks
    parity with torch); a quantized (QDQ) INT8 graph still runs its INT8 kernels.
    """

    def __init__(
        self, path: str | Path | bytes, threads: int | None = None, error: type[Exception] = ValueError
    ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise ValueError(OPENVINO_MISSING) from None
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            # ONNX bytes hold their weights: the empty tensor says there is no separate weights file
            model = (
                core.read_model(path, ov.Tensor(np.empty(0, np.uint8)))
                if isinstance(path, bytes)
                else (core.read_model(str(path)))
            )
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises plain RuntimeErrors with long multi-line texts
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise error(f"OpenVINO cannot load {_where(path)} ({first_line})") from None
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self.compiled.create_infer_request()
        # every name of every output: OpenVINO merges outputs that are one tensor under several names
        self._outputs = {name: o for o in self.compiled.outputs for name in o.get_names()}
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self._request.infer(feeds)  # copies its outputs: the request's buffers are reused
        return [np.asarray(result[self._outputs[n]]) for n in (output_names or list(self._outputs))]


def onnx_session(
    path: str | Path | bytes,
    runtime: str = "onnx",
    threads: int | None = None,
    error: type[Exception] = ValueError,
):
    """An ONNX Runtime session, or an `OpenVinoSession` for runtime="openvino"."""
    if runtime == "openvino":
        return OpenVinoSession(path, threads, error)
    if runtime != "onnx":
        raise ValueError(f"runtime {runtime!r}: use onnx or openvino for an ONNX graph")
    return ort_session(path, threads, error)
