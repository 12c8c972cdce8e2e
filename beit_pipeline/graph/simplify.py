"""onnxsim for models too large for it: the same graph, simplified with the weights held out.

``python3 -m beit_pipeline.graph.simplify INPUT OUTPUT --overwrite-input-shape N,3,S,S`` takes onnxsim's
arguments.  onnxsim 0.4.36 needs about ten times the model in memory (3.7 GB for BEiT-base's 351 MB;
killed at 24 GB on large-512) and cannot write a graph past protobuf's 2 GiB.  After the export's
constant folding nothing left to fold depends on the weights' values, only on shapes: so every
initializer over HOLD_BYTES becomes a graph input of its shape while onnxsim runs (it folds the shape
arithmetic and never needs them), and goes back in its place afterwards.  On BEiT-base and the tiny
test model the result is byte-identical to onnxsim's own output (tests/test_simplify.py).
run_all.sh takes this route for the large variants (workstate.simplifier).
"""

import argparse
import dataclasses
import logging
import os
import sys
import time

from beit_pipeline import cli
from beit_pipeline.errors import PipelineError, PipelineFileError
from beit_pipeline.graph import onnx_files

log = logging.getLogger(__name__)

HOLD_BYTES = 1 << 20  # weights are MiBs; shape constants and small biases stay for onnxsim to fold


@dataclasses.dataclass
class HeldOut:
    """The initializers taken out of a model while onnxsim runs, and the original order of all of them."""

    tensors: dict  # name -> TensorProto (its data, or its external-data reference)
    order: dict  # initializer name -> index in the source model


def tensor_bytes(tensor):
    import numpy as np
    from onnx import helper

    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def hold_out(model, min_bytes=HOLD_BYTES):
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


def put_back(model, held):
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


def simplify_held_out(source, input_shape, min_bytes=HOLD_BYTES):
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


def build_parser():
    p = argparse.ArgumentParser(
        prog="python3 -m beit_pipeline.graph.simplify",
        description="onnxsim with the weights held out, for models onnxsim cannot hold in memory or write "
                    "(over 2 GiB); same arguments and same graph as `python3 -m onnxsim`.")
    p.add_argument("input_model", help="the ONNX model to simplify (its .data file beside it, if any)")
    p.add_argument("output_model", help="where to write the simplified model (plus OUTPUT.data over 2 GiB)")
    p.add_argument("--overwrite-input-shape", dest="input_shape", required=True,
                   help="the model input's fixed shape, comma-separated, e.g. 8,3,512,512")
    return p


def parse_shape(text):
    try:
        shape = [int(d) for d in text.split(":")[-1].split(",")]
    except ValueError:
        shape = []
    cli.check(len(shape) == 4 and all(d > 0 for d in shape),
              f"--overwrite-input-shape {text}: expected N,C,H,W (positive integers)")
    return shape


def run(args):
    start = time.perf_counter()
    cli.check(os.path.isfile(args.input_model), f"{args.input_model}: ONNX model not found")
    shape = parse_shape(args.input_shape)
    model = simplify_held_out(args.input_model, shape)
    onnx_files.write_model(model, args.output_model)
    log.info(f"simplify: {args.input_model} -> {args.output_model} (input {shape}, {len(model.graph.node)} nodes, "
             f"{onnx_files.model_bytes(args.output_model) / 2 ** 20:.1f} MiB) in {time.perf_counter() - start:.1f} s")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
