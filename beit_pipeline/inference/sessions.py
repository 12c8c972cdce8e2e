"""ONNX models in ONNX Runtime: the one session factory, running, and comparing two models.

Every step that runs an ONNX model opens it here (beit_infer.py, onnx_check.py,
graph_modify.py's verification, beit_pth2onnx.py's, the benchmarks), so the
provider table, the thread setting and the one-line errors are the same everywhere.

Relative error, everywhere in the pipeline, is max|cand - ref| / max|ref| over the
whole output: scaled by the largest reference logit, because an element-wise ratio
blows up on logits that happen to be near zero and would flag harmless rounding.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from beit_pipeline.errors import BatchShapeError, ModelsDisagree, OnnxCheckError, UsageError

if TYPE_CHECKING:
    import onnxruntime

    from beit_pipeline.inference.engines import OpenVinoSession

log = logging.getLogger(__name__)

Session = Union["onnxruntime.InferenceSession", "OpenVinoSession"]  # open_session's answer: the same interface

DEFAULT_TOLERANCE = 1e-5

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cann": "CANNExecutionProvider",
}
# Providers that take a device id (ais_bench's --device is the NPU id).
_DEVICE_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "CANNExecutionProvider"}

# ---------------------------------------------------------------- errors between outputs

def output_errors(actual: np.ndarray, expected: np.ndarray) -> dict[str, Any]:
    """Max absolute error, relative error (max|a-b| / max|b|) and top-1 agreement of two (N, C) outputs."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ModelsDisagree(f"output shapes differ: {actual.shape} vs reference {expected.shape}")
    diff = np.abs(actual - expected)
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    # An all-zero reference makes any difference infinitely large relative to it.
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(expected))):
        max_abs = max_rel = float("inf")
    flat_a = actual.reshape(actual.shape[0], -1) if actual.ndim > 1 else actual.reshape(1, -1)
    flat_e = expected.reshape(expected.shape[0], -1) if expected.ndim > 1 else expected.reshape(1, -1)
    agree = flat_a.argmax(axis=1) == flat_e.argmax(axis=1)
    return {
        "max_abs": max_abs,
        "max_rel": max_rel,
        "argmax_agreement": float(agree.mean()),
        "argmax_equal": bool(agree.all()),
        "rows": int(flat_a.shape[0]),
    }


def format_errors(errors: Mapping[str, Any]) -> str:
    return (f"max abs error {errors['max_abs']:.3e}, max rel error {errors['max_rel']:.3e} "
            f"(max|a-b|/max|b|), top-1 agrees on {round(errors['argmax_agreement'] * errors['rows'])}"
            f"/{errors['rows']} rows")


# ---------------------------------------------------------------- running models

def session_input_shape(session: Session) -> list[int | None]:
    """The single input's shape, with None for each dynamic axis."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxCheckError(f"expected a model with one input, found {[i.name for i in inputs]}")
    return [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape]


def feed_shape(cand_shape: Sequence[int | None], ref_shape: Sequence[int | None] | None = None,
                batch_size: int | None = None, name: str = "the candidate") -> tuple[int, ...]:
    """The shape to feed both models: static dims of the candidate, then the reference, then --batch_size.

    The batch (first) axis takes ``batch_size`` where it is dynamic in the
    candidate; where it is static, a different ``batch_size`` is an error (BatchShapeError, exit 2).
    """
    shape = []
    for axis, dim in enumerate(cand_shape):
        ref_dim = ref_shape[axis] if ref_shape is not None and axis < len(ref_shape) else None
        if axis == 0:
            if dim is not None and batch_size is not None and dim != batch_size:
                raise BatchShapeError(f"{name}: batch size is fixed at {dim}, not {batch_size}")
            dim = dim or batch_size or ref_dim
            if dim is None:
                raise BatchShapeError("both models take any batch size: give --batch_size")
        elif dim is None:
            dim = ref_dim
            if dim is None:
                raise BatchShapeError(f"input axis {axis} is dynamic in both models; cannot choose its size")
        shape.append(int(dim))
    return tuple(shape)


def random_batch(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A seeded standard-normal float32 batch: the value range of mean/std-normalised images."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def run_session(session: Session, batch: np.ndarray, path: str = "model",
                every_output: bool = False) -> np.ndarray | list[np.ndarray]:
    """The first output of ``session`` on ``batch`` (``every_output``: the list of all its outputs)."""
    name = session.get_inputs()[0].name
    want = session_input_shape(session)
    if len(want) != batch.ndim or any(w is not None and w != b for w, b in zip(want, batch.shape)):
        shown = tuple(w if w is not None else "?" for w in want)
        raise OnnxCheckError(f"{path}: takes input shape {shown}, cannot run a batch of shape {batch.shape}")
    try:
        outputs = session.run(None, {name: batch})
    except Exception as exc:
        raise OnnxCheckError(f"{path}: ONNX Runtime failed on a batch of shape {batch.shape} "
                             f"({_first_line(exc)})") from exc
    return outputs if every_output else outputs[0]


def compare_models(ref_path: str | os.PathLike[str], cand_path: str | os.PathLike[str],
                   batch: np.ndarray | int | None, seed: int = 0) -> dict[str, Any]:
    """Run both models on ``batch`` and return output_errors() plus the batch shape and timings.

    ``batch`` is an (N, C, H, W) float32 array, or an int N (or None where the
    candidate's batch is static) to draw a seeded random batch shaped from the
    candidate's input.
    """
    ref = open_session(ref_path)
    cand = open_session(cand_path)
    if batch is None or isinstance(batch, (int, np.integer)):
        size = None if batch is None else int(batch)
        shape = feed_shape(session_input_shape(cand), session_input_shape(ref), size, os.fspath(cand_path))
        batch = random_batch(shape, seed)
    return compare_sessions(ref, cand, batch, os.fspath(ref_path), os.fspath(cand_path))


def compare_sessions(ref: Session, cand: Session, batch: np.ndarray, ref_name: str = "reference",
                     cand_name: str = "candidate") -> dict[str, Any]:
    """compare_models() on sessions that are already open."""
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    start = time.perf_counter()
    expected = run_session(ref, batch, ref_name)
    mid = time.perf_counter()
    actual = run_session(cand, batch, cand_name)
    end = time.perf_counter()
    try:
        errors = output_errors(actual, expected)
    except ModelsDisagree as exc:
        raise ModelsDisagree(f"{cand_name} vs {ref_name}: {exc}") from exc
    errors.update(shape=tuple(batch.shape), output_shape=tuple(actual.shape),
                  ref_seconds=mid - start, cand_seconds=end - mid)
    return errors


# ---------------------------------------------------------------- model files

def model_input_shape(path: str | os.PathLike[str]) -> list[int | None]:
    """Input shape read from the ONNX file (None for dynamic axes), without ONNX Runtime."""
    import onnx

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxCheckError(f"{path}: ONNX model not found")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise OnnxCheckError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise OnnxCheckError(f"{path}: expected one input, found {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims]


# ---------------------------------------------------------------- sessions

def resolve_providers(requested: str, available: Sequence[str]) -> tuple[list[str], list[str]]:
    """Map ``cpu,cuda,...`` to ONNX Runtime provider names, keeping only the available ones.

    Returns (providers to pass, warnings).  A requested provider that this
    onnxruntime lacks is skipped with a warning; the next requested one is
    tried, and CPU always ends the list so that there is one that runs.
    Which provider really ran is logged once the session exists.
    """
    wanted, warnings = [], []
    for item in [p.strip() for p in requested.split(",") if p.strip()]:
        name = PROVIDERS.get(item.lower(), item)
        if name not in PROVIDERS.values() and name not in available:
            raise UsageError(f"--providers: unknown provider {item!r}; use cpu, cuda, tensorrt, cann, openvino "
                             f"or an ONNX Runtime provider name ({', '.join(available)})")
        if name not in available:
            warnings.append(f"provider {item} ({name}) is not available in this onnxruntime "
                            f"(available: {', '.join(available)}); skipped")
            continue
        if name not in wanted:
            wanted.append(name)
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted, warnings


def open_session(path: str | os.PathLike[str], providers: str = "cpu", device: int = 0, threads: int = 0,
                 precision: str = "fp32") -> Session:
    """An ONNX Runtime session on the first available requested provider (CPU as the fallback).

    ``providers``: comma-separated names of PROVIDERS or ONNX Runtime's own, or ``openvino``
    (then OpenVINO's runtime compiles the file at ``precision``, engines.OpenVinoSession,
    which answers like an ONNX Runtime session); ``threads``: intra-op threads (0: the
    runtime's default, all cores).  Raises OnnxCheckError naming the file when it is
    missing or will not load; logs which provider runs when the first choice did not start.
    """
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxCheckError(f"{path}: ONNX model not found")
    if path.lower().endswith(".om"):
        raise OnnxCheckError(f"{path}: an Ascend .om model runs with ais_bench on the NPU; "
                             "ONNX Runtime takes the .onnx model")
    if providers.split(",")[0].strip().lower() == "openvino":
        return _open_openvino(path, precision, threads)
    wanted, warnings = resolve_providers(providers, ort.get_available_providers())
    for w in warnings:
        log.warning(w)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    provider_args = [(p, {"device_id": str(device)}) if p in _DEVICE_PROVIDERS else p for p in wanted]
    try:
        session = ort.InferenceSession(path, sess_options=options, providers=provider_args)
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, NotImplemented, ... for a bad file
        raise OnnxCheckError(f"{path}: not a model ONNX Runtime can load ({_first_line(exc)})") from exc
    actual = session.get_providers()[0]
    if actual != wanted[0]:
        # The provider was built in but failed to start (e.g. no CUDA libraries).
        log.warning(f"{wanted[0]} did not start; running on {actual}")
    return session


def _open_openvino(path, precision, threads):
    from beit_pipeline.inference import engines

    if not engines.openvino_available():
        raise UsageError("--providers openvino: OpenVINO is not installed (.venv/bin/pip install -r requirements.txt)")
    try:
        return engines.OpenVinoSession(path, precision, threads)
    except Exception as exc:  # OpenVINO raises RuntimeError with its own text for a bad file
        raise OnnxCheckError(f"{path}: not a model OpenVINO can load ({_first_line(exc)})") from exc


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
