"""Export a BEiT checkpoint to ONNX and check it (pipeline step 2).

beit_preprocess.py (step 1) makes the input batches; this step turns the
unilm checkpoint into the ONNX model that onnxsim (step 3, checked by
onnx_check.py), graph_modify.py and atc / beit_infer.py take next::

    python3 beit_pth2onnx.py --source beit_base_patch16_224_pt22k_ft22kto1k.pth \\
        --target beit_base_patch16_224.onnx --batch_size 1

The checkpoint is read without running code (torch's weights_only loader, or
safetensors), in any form of beit_pipeline/model/checkpoints.py (unilm, DDP, EMA,
Hugging Face transformers), and loaded strictly into timm's BEiT, whose variant is read from the tensor
shapes (--model forces one).  The model is exported with the TorchScript
exporter: input ``image`` (N, 3, H, W), output ``class`` (N, classes), the
batch axis dynamic as in the guide unless --static, opset 11 (what CANN 5.1's
atc takes) unless --opset says otherwise.

Before the file gets its final name, ONNX Runtime runs it on a seeded random
batch next to PyTorch; the relative error max|onnx - torch| / max|torch| (see
beit_pipeline/inference/sessions.py for why it is scaled by the largest logit) must be
within --tolerance.  Exit status: 0 written and verified; 1 the checkpoint does
not fit or the export failed; 2 bad arguments; 3 ONNX Runtime differs from
PyTorch beyond --tolerance; 130 interrupted (Ctrl-C).  On any failure no output
file and no temporary is left; an existing --target is kept.

The work is in beit_pipeline/model/export.py.
"""

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field

from beit_pipeline import cli, progress
from beit_pipeline.cli import log
from beit_pipeline.errors import CheckFailed, PipelineError
from beit_pipeline.graph import onnx_files
from beit_pipeline.model.checkpoints import WEIGHTS_CHOICES
from beit_pipeline.model.export import (
    DEFAULT_TOLERANCE,
    MAX_OPSET,
    MIN_OPSET,
    ExportError,
    check_exported_graph,
    export,
    load_torch_model,
    verification_sizes,
    verify,
)


def build_parser():
    parser = argparse.ArgumentParser(description="Export a BEiT checkpoint (.pth) to ONNX and verify it.")
    parser.add_argument("--source", default="beit_base_patch16_224_pt22k_ft22kto1k.pth",
                        help="checkpoint file (default: the guide's %(default)s): unilm's "
                             "({'model': ...}, {'model_ema': ...}, a training checkpoint with its args, a bare "
                             "state dict), DDP ('module.' keys), timm's .safetensors, or Hugging Face "
                             "transformers' BeitForImageClassification (pytorch_model.bin, model.safetensors or "
                             "the folder holding it); one line says which form and weights were read")
    parser.add_argument("--target", default="beit_base_patch16_224.onnx",
                        help="ONNX file to write (default: the guide's %(default)s)")
    parser.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, default=1,
                        help="batch size of the dummy input used for tracing and verification; "
                             "with --static, the model's fixed batch size (default 1)")
    parser.add_argument("--opset", type=int, default=11,
                        help=f"ONNX opset, {MIN_OPSET}..{MAX_OPSET} (default 11, what CANN 5.1's atc takes; "
                             ">=17 keeps LayerNormalization as one node)")
    parser.add_argument("--static", action="store_true",
                        help="fix the batch axis to --batch_size instead of leaving it dynamic")
    parser.add_argument("--model", default=None,
                        help="BEiT variant to build (e.g. beit_base_patch16_224); default: read from the "
                             "checkpoint's tensor shapes")
    parser.add_argument("--weights", choices=WEIGHTS_CHOICES, default="auto",
                        help="which weights of a checkpoint that holds both 'model' and 'model_ema' (unilm's "
                             "training checkpoints): model, or ema (the exponential moving average); default "
                             "auto: model when there, else the only weights it holds")
    parser.add_argument("--no_verify", action="store_true",
                        help="skip the ONNX Runtime vs PyTorch check (not recommended)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted relative error max|onnx-torch|/max|torch| "
                             f"(default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification batch (default 0)")
    return parser


def check_args(args):
    cli.check(MIN_OPSET <= args.opset <= MAX_OPSET,
              f"--opset {args.opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}")
    cli.check(args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}")
    cli.check(args.tolerance >= 0, f"--tolerance must be >= 0, got {args.tolerance}")
    cli.check(not os.path.isdir(args.target),
              f"--target {args.target} is a folder; give a file name such as beit_base_patch16_224.onnx")


@dataclass
class Exported:
    """What the report prints: the model's description and the step times and errors."""
    name: str
    params: int
    img_size: int
    num_classes: int
    export_seconds: float = 0.0
    verify_seconds: float = 0.0
    results: list = field(default_factory=list)


def temporary_target(cleanup, target, shown):
    """A temporary beside ``target``, removed by ``cleanup`` unless published; ``shown`` names it in errors."""
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # temporary_model first removes what a killed earlier run left (~330 MB, 2.7 GB at large-512).
        return cleanup.enter_context(onnx_files.temporary_model(target))
    except OSError as exc:
        raise PipelineError(f"{shown}: cannot write here ({exc.strerror or exc})") from exc


def export_checked(args, model, info, tmp):
    """Export to ``tmp`` and check its interface; ExportError naming the checkpoint on any failure."""
    t0 = time.perf_counter()
    try:
        export(model, tmp, args.batch_size, info.img_size, args.opset, not args.static)
        onnx_files.consolidate(tmp)
        check_exported_graph(tmp, args.batch_size, info.num_classes, not args.static)
    except Exception as exc:  # the exporter and the checker raise many kinds
        raise ExportError(f"{args.source}: ONNX export failed "
                          f"({type(exc).__name__}: {str(exc).strip()[:2000]})") from exc
    info.export_seconds = time.perf_counter() - t0


def verify_against_torch(args, model, info, tmp):
    """ONNX Runtime vs PyTorch on seeded batches; CheckFailed (nothing written) beyond --tolerance."""
    from beit_pipeline.inference import sessions as onnx_models

    t0 = time.perf_counter()
    try:
        info.results = verify(model, tmp, verification_sizes(args.batch_size, not args.static), info.img_size,
                              args.seed)
    except onnx_models.OnnxCheckError as exc:
        raise ExportError(f"{args.target}: verification failed: {exc}") from exc
    info.verify_seconds = time.perf_counter() - t0
    worst = max((r["max_rel"] for _, r in info.results), default=0.0)
    if not worst <= args.tolerance:
        for n, errors in info.results:
            log.warning(f"verify batch {n}: {onnx_models.format_errors(errors)}")
        raise CheckFailed(f"{args.target}: ONNX Runtime differs from PyTorch by relative error {worst:.3e} "
                          f"> tolerance {args.tolerance:g}; nothing written")


def report(args, info, target, start):
    from beit_pipeline.inference import sessions as onnx_models

    size_mb = onnx_files.model_bytes(target) / 2 ** 20
    log.info(f"beit_pth2onnx: {args.source} -> {args.target}")
    log.info(f"  model     {info.name or 'BEiT (unpublished configuration)'}: {info.params / 1e6:.2f} M "
             f"parameters, {info.num_classes} classes, input {info.img_size}x{info.img_size}")
    log.info(f"  export    opset {args.opset}, batch {'static' if args.static else 'dynamic'} "
             f"(traced with batch {args.batch_size}), {size_mb:.1f} MiB, {info.export_seconds:.1f} s")
    if args.no_verify:
        log.info("  verify    skipped (--no_verify)")
    else:
        for n, errors in info.results:
            log.info(f"  verify    batch {n}: {onnx_models.format_errors(errors)}")
        log.info(f"  verify    ONNX Runtime vs PyTorch within tolerance {args.tolerance:g} "
                 f"(relative = max|onnx-torch|/max|torch|), {info.verify_seconds:.1f} s")
    log.info(f"  total     {time.perf_counter() - start:.1f} s")


def run(args):
    start = time.perf_counter()
    target = os.path.abspath(args.target)
    with contextlib.ExitStack() as cleanup:
        steps = progress.bar(total=4, desc="load checkpoint", file=sys.stderr, leave=False, delay=1.0,
                             bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}]")
        cleanup.callback(steps.close)
        model, config, name = load_torch_model(args.source, args.model, args.weights)
        info = Exported(name, sum(p.numel() for p in model.parameters()), config["img_size"], config["num_classes"])
        steps.update()
        tmp = temporary_target(cleanup, target, args.target)
        steps.set_description_str(f"export opset {args.opset}")
        export_checked(args, model, info, tmp)
        steps.update()
        if not args.no_verify:
            steps.set_description_str("verify with ONNX Runtime")
            verify_against_torch(args, model, info, tmp)
        steps.update()
        onnx_files.publish_model(tmp, target)
        steps.update()
    report(args, info, target, start)


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args,
                        interrupted_hint="nothing written; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
