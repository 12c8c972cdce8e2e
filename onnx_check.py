"""Check that one ONNX model computes what another does (pipeline step 3).

After beit_pth2onnx.py (step 2) writes the dynamic-batch ONNX model, run_all.sh
fixes its batch size with onnxsim and then runs this tool, before vs after::

    python3 -m onnxsim beit_base_patch16_224.onnx beit_onnxsim_bs8.onnx --overwrite-input-shape 8,3,224,224
    python3 onnx_check.py beit_base_patch16_224.onnx beit_onnxsim_bs8.onnx --batch_size 8

Both models run in ONNX Runtime (CPUExecutionProvider) on the same seeded
random batch, shaped from the candidate's static input shape (or --batch_size
where its batch axis is dynamic).  It prints the largest absolute and
relative error and whether the top-1 classes agree, and exits 1 when the
relative error is above --tolerance or the outputs differ in shape (2 on a
usage or file error).

Relative error, here and in beit_pth2onnx.py, is max|cand - ref| / max|ref|
over the whole output: scaled by the largest reference logit, because an
element-wise ratio blows up on logits that happen to be near zero and would
flag harmless float32 rounding.

graph_modify.py and the tests import compare_models(); beit_bench.py and the
tests use simplify(), which runs ``python -m onnxsim`` with the batch size
fixed and checks its output the same way before keeping it.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

import beit_io

DEFAULT_TOLERANCE = 1e-5


class OnnxCheckError(Exception):
    """A model cannot be read or run, or two models disagree; the message names the file."""


class ModelsDisagree(OnnxCheckError):
    """Both models ran, but their outputs cannot be compared (different shapes)."""


# ---------------------------------------------------------------- errors between outputs

def output_errors(actual, expected):
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


def format_errors(errors):
    return (f"max abs error {errors['max_abs']:.3e}, max rel error {errors['max_rel']:.3e} "
            f"(max|a-b|/max|b|), top-1 agrees on {round(errors['argmax_agreement'] * errors['rows'])}"
            f"/{errors['rows']} rows")


# ---------------------------------------------------------------- running models

def open_session(path):
    """An ONNX Runtime CPU session for ``path``; OnnxCheckError naming the file if it will not load."""
    import onnxruntime as ort

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OnnxCheckError(f"{path}: ONNX model not found")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT's warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for bad files
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxCheckError(f"{path}: not a model ONNX Runtime can load ({text})") from exc


def session_input_shape(session):
    """The single input's shape, with None for each dynamic axis."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OnnxCheckError(f"expected a model with one input, found {[i.name for i in inputs]}")
    return [d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape]


def batch_shape(cand_shape, ref_shape=None, batch_size=None, name="the candidate"):
    """The shape to feed both models: static dims of the candidate, then the reference, then --batch_size.

    The batch (first) axis takes ``batch_size`` where it is dynamic in the
    candidate; where it is static, a different ``batch_size`` is an error.
    """
    shape = []
    for axis, dim in enumerate(cand_shape):
        ref_dim = ref_shape[axis] if ref_shape is not None and axis < len(ref_shape) else None
        if axis == 0:
            if dim is not None and batch_size is not None and dim != batch_size:
                raise OnnxCheckError(f"{name}: batch size is fixed at {dim}, not {batch_size}")
            dim = dim or batch_size or ref_dim
            if dim is None:
                raise OnnxCheckError("both models take any batch size: give --batch_size")
        elif dim is None:
            dim = ref_dim
            if dim is None:
                raise OnnxCheckError(f"input axis {axis} is dynamic in both models; cannot choose its size")
        shape.append(int(dim))
    return tuple(shape)


def random_batch(shape, seed=0):
    """A seeded standard-normal float32 batch: the value range of mean/std-normalised images."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def run_session(session, batch, path="model"):
    """The first output of ``session`` on ``batch``."""
    name = session.get_inputs()[0].name
    want = session_input_shape(session)
    if len(want) != batch.ndim or any(w is not None and w != b for w, b in zip(want, batch.shape)):
        shown = tuple(w if w is not None else "?" for w in want)
        raise OnnxCheckError(f"{path}: takes input shape {shown}, cannot run a batch of shape {batch.shape}")
    try:
        return session.run(None, {name: batch})[0]
    except Exception as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxCheckError(f"{path}: ONNX Runtime failed on a batch of shape {batch.shape} ({text})") from exc


def compare_models(ref_path, cand_path, batch, seed=0):
    """Run both models on ``batch`` and return output_errors() plus the batch shape and timings.

    ``batch`` is an (N, C, H, W) float32 array, or an int N (or None where the
    candidate's batch is static) to draw a seeded random batch shaped from the
    candidate's input.
    """
    ref = open_session(ref_path)
    cand = open_session(cand_path)
    if batch is None or isinstance(batch, (int, np.integer)):
        size = None if batch is None else int(batch)
        shape = batch_shape(session_input_shape(cand), session_input_shape(ref), size, os.fspath(cand_path))
        batch = random_batch(shape, seed)
    return compare_sessions(ref, cand, batch, os.fspath(ref_path), os.fspath(cand_path))


def compare_sessions(ref, cand, batch, ref_name="reference", cand_name="candidate"):
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


# ---------------------------------------------------------------- onnxsim, checked

def model_input_shape(path):
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


def simplify(in_path, out_path, batch_size, tolerance=DEFAULT_TOLERANCE, seed=0, timeout=1800):
    """Run ``python -m onnxsim`` with the batch size fixed, check the result, then keep it.

    onnxsim writes to a temporary file next to ``out_path``; that file is
    compared with ``in_path`` on a seeded batch of ``batch_size`` and renamed
    to ``out_path`` only when its relative error is within ``tolerance``.
    Returns compare_models()'s dict plus ``simplify_seconds``.  Raises
    OnnxCheckError (and leaves no ``out_path``) otherwise.
    """
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    shape = batch_shape(model_input_shape(in_path), batch_size=batch_size, name=in_path)
    with beit_io.temporary_beside(out_path) as tmp:
        cmd = [sys.executable, "-m", "onnxsim", in_path, tmp, "--overwrite-input-shape", ",".join(map(str, shape))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise OnnxCheckError(f"{in_path}: onnxsim exited {proc.returncode}:\n{tail}")
        errors = compare_models(in_path, tmp, random_batch(shape, seed))
        errors["simplify_seconds"] = seconds
        if not errors["max_rel"] <= tolerance:
            raise OnnxCheckError(f"{out_path}: onnxsim changed the results beyond tolerance {tolerance:g}: "
                                 + format_errors(errors))
        beit_io.publish_temporary(tmp, out_path)
    return errors


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Run two ONNX models on the same seeded random batch and compare their outputs.")
    parser.add_argument("reference", help="the model taken as correct (e.g. the exported beit_base_patch16_224.onnx)")
    parser.add_argument("candidate", help="the model to check (e.g. beit_onnxsim_bs8.onnx)")
    parser.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, default=None,
                        help="batch size to run; needed only when the candidate's batch axis is dynamic "
                             "(must equal it when static)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted relative error max|a-b|/max|b| (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input batch (default 0)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        print(f"error: --batch_size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if not args.tolerance >= 0:
        print(f"error: --tolerance must be >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        errors = compare_models(args.reference, args.candidate, args.batch_size, seed=args.seed)
    except OnnxCheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, ModelsDisagree) else 2
    ok = errors["max_rel"] <= args.tolerance
    print(f"onnx_check: {args.candidate} vs {args.reference} on a seeded batch {errors['shape']} (seed {args.seed})")
    print(f"onnx_check: {format_errors(errors)}; tolerance {args.tolerance:g}: {'OK' if ok else 'FAILED'}")
    if not errors["argmax_equal"]:
        print("onnx_check: warning: the top-1 class differs on some rows", file=sys.stderr)
    if not ok:
        print(f"error: {args.candidate}: relative error {errors['max_rel']:.3e} is above the tolerance "
              f"{args.tolerance:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
