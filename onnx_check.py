"""Check that one ONNX model computes what another does (pipeline step 3).

After beit_pth2onnx.py (step 2) writes the dynamic-batch ONNX model, run_all.sh
fixes its batch size with onnxsim and then runs this tool, before vs after::

    python3 -m onnxsim beit_base_patch16_224.onnx beit_onnxsim_bs8.onnx --overwrite-input-shape 8,3,224,224
    python3 onnx_check.py beit_base_patch16_224.onnx beit_onnxsim_bs8.onnx --batch_size 8

Both models run in ONNX Runtime (CPUExecutionProvider) on the same seeded
random batch, shaped from the candidate's static input shape (or --batch_size
where its batch axis is dynamic).  It prints the largest absolute and
relative error and whether the top-1 classes agree.  Exit status: 0 within
--tolerance; 1 a model is missing or cannot be loaded or run; 2 usage (a flag's
value, a batch size the models cannot take); 3 the relative error is above
--tolerance or the outputs differ in shape.

Relative error, here and in beit_pth2onnx.py, is max|cand - ref| / max|ref|
over the whole output: scaled by the largest reference logit, because an
element-wise ratio blows up on logits that happen to be near zero and would
flag harmless float32 rounding.

The comparison itself is beit_pipeline.inference.sessions.compare_models, which graph_modify.py's
verification and graph.simplify.simplify_checked (onnxsim and this check in one call, for the benchmarks
and the tests) use too; beit_pth2onnx.py compares against PyTorch with the same run_session and
output_errors.
"""

import argparse
import sys

from beit_pipeline import cli
from beit_pipeline.cli import log
from beit_pipeline.errors import CheckFailed
from beit_pipeline.inference import sessions as onnx_models

DEFAULT_TOLERANCE = onnx_models.DEFAULT_TOLERANCE


def build_parser():
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
    return parser


def check_args(args):
    cli.check(args.batch_size is None or args.batch_size >= 1,
              f"--batch_size must be at least 1, got {args.batch_size}")
    cli.check(args.tolerance >= 0, f"--tolerance must be >= 0, got {args.tolerance}")


def run(args):
    errors = onnx_models.compare_models(args.reference, args.candidate, args.batch_size, args.seed)
    ok = errors["max_rel"] <= args.tolerance
    log.info(f"onnx_check: {args.candidate} vs {args.reference} on a seeded batch {errors['shape']} "
             f"(seed {args.seed})")
    log.info(f"onnx_check: {onnx_models.format_errors(errors)}; tolerance {args.tolerance:g}: "
             f"{'OK' if ok else 'FAILED'}")
    if not errors["argmax_equal"]:
        log.warning("onnx_check: the top-1 class differs on some rows")
    if not ok:
        raise CheckFailed(f"{args.candidate}: relative error {errors['max_rel']:.3e} is above the tolerance "
                          f"{args.tolerance:g}")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
