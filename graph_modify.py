"""Step 4 of the pipeline: pad BEiT's 197 tokens to 208, exactly, for the Ascend 310P.

    beit_preprocess.py -> beit_pth2onnx.py -> python3 -m onnxsim -> graph_modify.py -> atc / beit_infer.py
                                                                     ^^^^^^^^^^^^^^^

The 310P keeps its data 16-aligned, so the guide pads the token axis of the
simplified ONNX model from 197 (1 cls token + 14x14 patches) to 208, the next
multiple of 16.  The guide's own script fills the 11 new tokens with zeros and
leaves it there: the padded keys then take softmax weight in every block and
its OM loses 0.6 points Top-1.  This script does the same padding EXACTLY:

* after the cls-token Concat, a Concat with a zero constant (B, 11, D) makes
  the token stream (B, 208, D); B is the static BATCH_SIZE (the graph must be
  simplified with a fixed batch first, as in the guide);
* every attention Softmax masks the padded keys: the relative-position bias
  constant (1, H, 197, 197) that is added before it becomes (1, H, 208, 208),
  the original bias in the real block, MASK_VALUE in the padded KEY columns and
  0 on the real keys of the padded QUERY rows.  A block with no bias Add (a
  model without relative position bias, or an all-zero bias that a simplifier
  removed) gets an Add of a (1, 1, 208, 208) mask constant;
* every Reshape whose shape constant holds the token count 197 (the qkv
  Reshape (B, 197, 3, H, hd), the attention-output Reshape (B, 197, D)) gets 208;
* the mean pooling over the patch tokens (Slice [1:] + ReduceMean over axis 1)
  stops at token 197, so it averages the 196 real patch tokens only.

Padded query rows never reach the output (each token's MLP, LayerNorm and
residual are per token, and the pooling skips them), so the result equals the
input model up to float summation order.  The script checks that in ONNX
Runtime on a seeded random batch and writes the output only if the max
relative error max|a-b|/max|b| is within --tolerance and every argmax agrees.

--no_mask reproduces the guide's flawed padding for comparison: the same zero
tokens and 208-token Reshapes, the bias padded with zeros (padded keys are not
masked and take softmax weight), no mask Add where a block has no bias, and
the pooling Slice left as exported (ends=INT64_MAX), so the mean runs over
tokens 1..207: the 196 real patch tokens and the 11 padded ones.  Its
verification numbers are printed but do not stop the output from being written.

--guide writes the guide's own graph, edit for edit: every Reshape constant
197 -> 208, a zero (B, 11, D) input appended to the cls-token Concat itself, the
bias constant zero-padded, and after each attention's key tensor a Slice [0:197]
plus a Concat of zeros, so that the padded keys are zero (their scores are then
0, still unmasked).  --no_mask lacks that last edit.  beit_fidelity.py scores it
as the guide_padding stage; its verification is reported, not enforced.

Patterns are found structurally, from anchor ops (the graph input, the Conv,
each Softmax, the pooling ReduceMean), never by node names, and all of them are
found and checked before the graph is changed (beit_pipeline.graph.patterns);
the rewrite passes are in beit_pipeline.graph.padding.  A graph that does not
fit (not a BEiT, already padded, dynamic batch) is refused with a message
naming the missing pattern, and no output file is written.

Exit status: 0 written; 1 the input is not a readable ONNX model or lacks a
pattern; 2 usage (a flag, or a path that does not exist); 3 the padded graph
does not reproduce the input model (nothing written).

Usage (the guide's positional arguments)::

    python3 graph_modify.py beit_base_bs8_sim.onnx beit_base_bs8_sim_modify.onnx 8
"""

import argparse
import os
import sys

import onnx

from beit_pipeline import cli
from beit_pipeline.cli import log
from beit_pipeline.errors import CheckFailed, PipelineError, PipelineFileError
from beit_pipeline.graph import onnx_files
from beit_pipeline.graph import padding as graph_padding
from beit_pipeline.graph.index import PatternError, opset_version
from beit_pipeline.inference import sessions as onnx_models

VERIFY_SEED = 0


def build_parser():
    p = argparse.ArgumentParser(description="Pad BEiT's token axis 197 -> 208 in a simplified ONNX graph, "
                                            "exactly (masked attention, pooling over the real tokens).")
    p.add_argument("input", help="simplified ONNX model with a fixed batch (output of python3 -m onnxsim)")
    p.add_argument("output", help="where to write the padded ONNX model (written only after verification)")
    p.add_argument("batch_size", type=int, help="the static batch size the model was simplified with")
    p.add_argument("--pad_to", type=int, default=graph_padding.DEFAULT_PAD_TO,
                   help="pad the token count up to a multiple of this (default 16: 197 -> 208)")
    p.add_argument("--no_mask", action="store_true",
                   help="reproduce the guide's flawed padding: zero tokens, no key mask, pooling over all "
                        "tokens; verification is reported but not enforced")
    p.add_argument("--guide", action="store_true",
                   help="write the guide's own graph (its graph_modify.py's four edits: Reshapes 197->208, zero "
                        "tokens at the cls-token Concat, zero-padded bias, padded keys zeroed after a Slice "
                        "0:197); not exact, verification reported but not enforced")
    p.add_argument("--no_verify", action="store_true",
                   help="skip the ONNX Runtime comparison with the input model")
    p.add_argument("--tolerance", type=float, default=onnx_models.DEFAULT_TOLERANCE,
                   help="largest max|a-b|/max|b| accepted between output and input model (default 1e-5)")
    return p


def check_args(args):
    cli.check(args.batch_size >= 1, "BATCH_SIZE must be at least 1")
    cli.check(args.pad_to >= 1, "--pad_to must be at least 1")
    cli.check(not (args.guide and args.no_mask), "--guide and --no_mask are two different paddings; give one")
    cli.check(os.path.isfile(args.input), f"{args.input}: ONNX model not found")
    folder = os.path.dirname(os.path.abspath(args.output))
    cli.check(os.path.isdir(folder), f"{args.output}: output folder {folder} does not exist")


def load_onnx_model(path):
    try:
        return onnx.load(path)
    except Exception as exc:  # protobuf raises DecodeError and others for non-ONNX files
        raise PipelineFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc


def report(args, model, result):
    mode = ("the guide's own graph (--guide, not masked)" if args.guide else
            "masked (exact)" if not args.no_mask else "NOT masked (--no_mask, the guide's padding without its key fix)")
    log.info(f"graph_modify: {args.input}: tokens {result.tokens} -> {result.padded} at batch size "
             f"{args.batch_size}, opset {opset_version(model)}, {mode}")
    for name, count in result.counts.items():
        log.info(f"  {name:<44} {count}")


def verify(args, candidate):
    """Compare the written temporary with the input model in ONNX Runtime; CheckFailed when it differs."""
    try:
        errors = onnx_models.compare_models(args.input, candidate, args.batch_size, seed=VERIFY_SEED)
    except onnx_models.OnnxCheckError as exc:
        raise PipelineError(f"{args.input}: cannot verify the padded graph ({exc}); nothing written") from exc
    err, same = errors["max_rel"], round(errors["argmax_agreement"] * errors["rows"])
    log.info(f"verify (ONNX Runtime fp32, seed {VERIFY_SEED}, batch {args.batch_size}): "
             f"max rel err {err:.3e} (tolerance {args.tolerance:g}), argmax identical {same}/{errors['rows']}")
    # max_rel is inf when an output is not finite.
    if err <= args.tolerance and errors["argmax_equal"]:
        return
    if not (args.no_mask or args.guide):
        raise CheckFailed(f"{args.input}: the padded graph does not reproduce the input model "
                          f"(max rel err {err:.3e}, argmax identical {same}/{errors['rows']}); nothing written")
    flag = "--guide" if args.guide else "--no_mask"
    log.info(f"note: {flag} output differs from the input model, as the guide's padding does")


def run(args):
    model = load_onnx_model(args.input)
    try:
        result = graph_padding.modify(model, args.batch_size, args.pad_to, mask=not args.no_mask,
                                      guide=args.guide)
    except PatternError as exc:
        raise PipelineError(f"{args.input}: {exc}; nothing written") from exc
    report(args, model, result)
    # Over protobuf's 2 GiB (large-512: 2.9 GB) the model is written with its weights in OUTPUT.data.
    with onnx_files.temporary_model(args.output) as tmp:
        onnx_files.save_model(model, tmp)
        if not args.no_verify:
            verify(args, tmp)
        onnx_files.publish_model(tmp, args.output)
    log.info(f"wrote {args.output}")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
