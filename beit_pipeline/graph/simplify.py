"""onnxsim for models too large for it: the same graph, simplified with the weights held out.

``python3 -m beit_pipeline.graph.simplify INPUT OUTPUT --overwrite-input-shape N,3,S,S`` takes onnxsim's
arguments.  onnxsim 0.4.36 needs about ten times the model in memory (3.7 GB for BEiT-base's 351 MB;
killed at 24 GB on large-512) and cannot write a graph past protobuf's 2 GiB.  After the export's
constant folding nothing left to fold depends on the weights' values, only on shapes: so every
initializer over HOLD_BYTES becomes a graph input of its shape while onnxsim runs (it folds the shape
arithmetic and never needs them), and goes back in its place afterwards.  On BEiT-base and the tiny
test model the result is byte-identical to onnxsim's own output (tests/test_onnx_files.py).
run_all.sh takes this route for the large variants (workstate.simplifier); simplify_checked runs either
module and keeps the result only when it computes what its input does.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from beit_pipeline import cli, files
from beit_pipeline.errors import OnnxCheckError, PipelineError, PipelineFileError
from beit_pipeline.graph import onnx_files

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

HOLD_BYTES = 1 << 20  # weights are MiBs; shape constants and small biases stay for onnxsim to fold


@dataclasses.dataclass
class HeldOut:
    """The initializers taken out of a model while onnxsim runs, and the original order of all of them."""

    tensors: dict  # name -> TensorProto (its data, or its external-data reference)
    order: dict  # initializer name -> index in the source model


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    import numpy as np
    from onnx import helper

    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def hold_out(model: onnx.ModelProto, min_bytes: int = HOLD_BYTES) -> HeldOut:
    """Make every initializer of ``min_bytes`` or more a typed graph input; return what was taken."""
    import onnx
    from onnx import helper

    inits = list(model.graph.initializer)
    held = HeldOut({}, {t.name: i for i, t in enumerate(inits)})
    declared = {i.name for i in model.graph.input}
    for t in inits:
        if (t.data_location == onnx.TensorProto.EXTERNAL or tensor_bytes(t) >= min_bytes) \
                and t.name not in declared:
            held.tensors[t.name] = t
    del model.graph.initializer[:]
    model.graph.initializer.extend(t for t in inits if t.name not in held.tensors)
    model.graph.input.extend(helper.make_tensor_value_info(n, t.data_type, list(t.dims))
                             for n, t in held.tensors.items())
    return held


def put_back(model: onnx.ModelProto, held: HeldOut) -> None:
    """Initializers again, in the source's order (new folded constants after them, as onnxsim orders them)."""
    used = {name for node in model.graph.node for name in node.input}
    inputs = [i for i in model.graph.input if i.name not in held.tensors]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    inits = list(model.graph.initializer) + [t for n, t in held.tensors.items() if n in used]
    tail = len(held.order)
    ranked = sorted(enumerate(inits), key=lambda it: (held.order.get(it[1].name, tail + it[0]), it[0]))
    del model.graph.initializer[:]
    model.graph.initializer.extend(t for _, t in ranked)


def simplify_held_out(source: str, input_shape: Sequence[int], min_bytes: int = HOLD_BYTES) -> onnx.ModelProto:
    """The simplified ModelProto of the model at ``source`` (its external data loaded)."""
    import onnx
    import onnxsim

    model = onnx.load(source, load_external_data=False)
    held = hold_out(model, min_bytes)
    image = [i.name for i in model.graph.input if i.name not in held.tensors and i.name not in held.order]
    if len(image) != 1:
        raise PipelineFileError(f"{source}: expected one model input besides the weights, found {image}")
    simplified, ok = onnxsim.simplify(model, overwrite_input_shapes={image[0]: input_shape})
    if not ok:
        raise PipelineError(f"{source}: onnxsim's check of the simplified graph failed")
    put_back(simplified, held)
    onnx.load_external_data_for_model(simplified, os.path.dirname(os.path.abspath(source)))
    return simplified


# ---------------------------------------------------------------- the checked run

def simplify_checked(in_path: str | os.PathLike[str], out_path: str | os.PathLike[str], batch_size: int,
                     tolerance: float | None = None, seed: int = 0, timeout: float = 1800,
                     module: str = "onnxsim") -> dict:
    """Run ``python -m onnxsim`` (or ``module``: this module takes its command line and writes the same graph) with
    the batch size fixed, check the result, then keep it: the two commands run_all.sh runs (onnxsim, then
    onnx_check.py), in one call, for the benchmarks and the tests.

    onnxsim writes to a temporary file next to ``out_path``; that file is
    compared with ``in_path`` on a seeded batch of ``batch_size`` and renamed
    to ``out_path`` only when its relative error is within ``tolerance``.
    Returns compare_models()'s dict plus ``simplify_seconds``.  Raises
    OnnxCheckError (and leaves no ``out_path``) otherwise.
    """
    from beit_pipeline.inference.sessions import (
        DEFAULT_TOLERANCE,
        compare_models,
        feed_shape,
        format_errors,
        model_input_shape,
        random_batch,
    )
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    in_path, out_path = os.fspath(in_path), os.fspath(out_path)
    shape = feed_shape(model_input_shape(in_path), batch_size=batch_size, name=in_path)
    with files.temporary_beside(out_path) as tmp:
        cmd = [sys.executable, "-m", module, in_path, tmp, "--overwrite-input-shape", ",".join(map(str, shape))]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or os.path.getsize(tmp) == 0:
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
            raise OnnxCheckError(f"{in_path}: {module} exited {proc.returncode}:\n{tail}")
        errors = compare_models(in_path, tmp, random_batch(shape, seed))
        errors["simplify_seconds"] = seconds
        if not errors["max_rel"] <= tolerance:
            raise OnnxCheckError(f"{out_path}: onnxsim changed the results beyond tolerance {tolerance:g}: "
                                 + format_errors(errors))
        files.publish_temporary(tmp, out_path)
    return errors


# ---------------------------------------------------------------- the command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m beit_pipeline.graph.simplify",
        description="onnxsim with the weights held out, for models onnxsim cannot hold in memory or write "
                    "(over 2 GiB); same arguments and same graph as `python3 -m onnxsim`.")
    p.add_argument("input_model", help="the ONNX model to simplify (its .data file beside it, if any)")
    p.add_argument("output_model", help="where to write the simplified model (plus OUTPUT.data over 2 GiB)")
    p.add_argument("--overwrite-input-shape", dest="input_shape", required=True,
                   help="the model input's fixed shape, comma-separated, e.g. 8,3,512,512")
    return p


def parse_shape(text: str) -> list[int]:
    try:
        shape = [int(d) for d in text.split(":")[-1].split(",")]
    except ValueError:
        shape = []
    cli.check(len(shape) == 4 and all(d > 0 for d in shape),
              f"--overwrite-input-shape {text}: expected N,C,H,W (positive integers)")
    return shape


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    cli.check(os.path.isfile(args.input_model), f"{args.input_model}: ONNX model not found")
    shape = parse_shape(args.input_shape)
    model = simplify_held_out(args.input_model, shape)
    onnx_files.write_model(model, args.output_model)
    log.info(f"simplify: {args.input_model} -> {args.output_model} (input {shape}, {len(model.graph.node)} nodes, "
             f"{onnx_files.model_bytes(args.output_model) / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
