"""Export a BEiT checkpoint to ONNX and check it (pipeline step 2).

beit_preprocess.py (step 1) makes the input batches; this step turns the
unilm checkpoint into the ONNX model that onnxsim (step 3, checked by
onnx_check.py), graph_modify.py and atc / beit_infer.py take next::

    python3 beit_pth2onnx.py --source beit_base_patch16_224_pt22k_ft22kto1k.pth \\
        --target beit_base_patch16_224.onnx --batch_size 1

The checkpoint is read with weights_only=True (a checkpoint never runs code)
and loaded strictly into timm's BEiT, whose variant is read from the tensor
shapes (--model forces one).  The model is exported with the TorchScript
exporter: input ``image`` (N, 3, H, W), output ``class`` (N, classes), the
batch axis dynamic as in the guide unless --static, opset 11 (what CANN 5.1's
atc takes) unless --opset says otherwise.

Before the file gets its final name, ONNX Runtime runs it on a seeded random
batch next to PyTorch; the relative error max|onnx - torch| / max|torch| (see
onnx_check.py for why it is scaled by the largest logit) must be within
--tolerance.  Exit status: 0 written and verified; 1 the checkpoint does not
fit, the export failed or the check failed (no output file is left); 2 bad
arguments.
"""

import argparse
import contextlib
import os
import re
import sys
import time
import warnings

from tqdm import tqdm

import beit_io
from beit_pipeline.export import INPUT_NAME, OUTPUT_NAME, export  # noqa: F401

MIN_OPSET, MAX_OPSET = 11, 17
DEFAULT_TOLERANCE = 1e-4


class ExportError(Exception):
    """The export or its verification failed; the message says which and why."""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Export a BEiT checkpoint (.pth) to ONNX and verify it.")
    parser.add_argument("--source", required=True,
                        help="checkpoint file, e.g. beit_base_patch16_224_pt22k_ft22kto1k.pth "
                             "({'model': state_dict}, {'module': ...} or a bare state dict)")
    parser.add_argument("--target", required=True, help="ONNX file to write, e.g. beit_base_patch16_224.onnx")
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
    parser.add_argument("--no_verify", action="store_true",
                        help="skip the ONNX Runtime vs PyTorch check (not recommended)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest accepted relative error max|onnx-torch|/max|torch| "
                             f"(default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification batch (default 0)")
    return parser.parse_args(argv)


def check_args(args):
    """The first problem with the arguments, as a message, or None."""
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        return f"--opset {args.opset} is not supported; choose {MIN_OPSET}..{MAX_OPSET}"
    if args.batch_size < 1:
        return f"--batch_size must be at least 1, got {args.batch_size}"
    if not args.tolerance >= 0:
        return f"--tolerance must be >= 0, got {args.tolerance}"
    if os.path.isdir(args.target):
        return f"--target {args.target} is a folder; give a file name such as beit_base_patch16_224.onnx"
    return None


def describe_foreign_checkpoint(state_dict):
    """Why a state dict that build_model refused is not a fine-tuned BEiT, when that can be told; else None."""
    keys = set(state_dict)
    if "head.weight" not in keys and ({"lm_head.weight", "mask_token"} & keys):
        return ("this is a BEiT pretraining checkpoint (it has "
                + " and ".join(sorted({"lm_head.weight", "mask_token"} & keys))
                + " but no classification head 'head.weight'); export needs a fine-tuned checkpoint "
                  "such as beit_base_patch16_224_pt22k_ft22kto1k.pth")
    if "patch_embed.proj.weight" not in keys and not any(k.startswith("blocks.") for k in keys):
        shown = ", ".join(sorted(keys)[:6]) + (", ..." if len(keys) > 6 else "")
        return f"this is not a BEiT checkpoint: no patch_embed / blocks tensors (its keys: {shown})"
    if "rel_pos_bias.relative_position_bias_table" in keys:
        return ("this checkpoint shares one relative position bias between blocks "
                "(rel_pos_bias.*); only per-block relative position bias is supported")
    return None


def load_model(source, model_name=None):
    """(model, config, variant name) for a checkpoint file; CheckpointError naming the file otherwise."""
    import beit_model

    state_dict = beit_model.load_state_dict(source)
    try:
        return beit_model.build_model(state_dict, model_name)
    except beit_model.CheckpointError as exc:
        hint = describe_foreign_checkpoint(state_dict)
        message = f"{source}: {hint}\n{exc}" if hint else f"{source}: {exc}"
        raise beit_model.CheckpointError(message) from exc


def check_graph(path, batch_size, num_classes, dynamic):
    """The exported file is valid ONNX with the input and output the later steps expect."""
    import onnx

    onnx.checker.check_model(path)
    graph = onnx.load(path, load_external_data=False).graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"unexpected graph inputs {[i.name for i in inputs]} / outputs "
                          f"{[o.name for o in graph.output]}")
    batch_dim = inputs[0].type.tensor_type.shape.dim[0]
    if dynamic == batch_dim.HasField("dim_value") or (not dynamic and batch_dim.dim_value != batch_size):
        raise ExportError(f"input batch axis came out as {batch_dim}, expected "
                          f"{'dynamic' if dynamic else batch_size}")
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) != 2 or out_dims[1].dim_value != num_classes:
        raise ExportError(f"output shape {[d.dim_value or d.dim_param for d in out_dims]}, "
                          f"expected (N, {num_classes})")


def verify(model, path, batch_sizes, img_size, seed=0):
    """[(batch size, output_errors dict)] of ONNX Runtime against PyTorch on seeded random batches."""
    import torch

    import onnx_check

    session = onnx_check.open_session(path)
    results = []
    for n in batch_sizes:
        batch = onnx_check.random_batch((n, 3, img_size, img_size), seed)
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        actual = onnx_check.run_session(session, batch, path)
        results.append((n, onnx_check.output_errors(actual, expected)))
    return results


def fail(message, code=1):
    # torch's own messages carry terminal colour codes; they are noise in logs.
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message))
    print(f"error: {text}", file=sys.stderr)
    return code


def main(argv=None):
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        return fail(problem, 2)

    import beit_model
    import onnx_check

    start = time.perf_counter()
    progress = tqdm(total=4, desc="load checkpoint", file=sys.stderr, leave=False, delay=1.0,
                    bar_format="{desc}: {n_fmt}/{total_fmt} steps [{elapsed}]")
    try:
        model, config, name = load_model(args.source, args.model)
    except beit_model.CheckpointError as exc:
        progress.close()
        return fail(exc)
    progress.update()
    params = sum(p.numel() for p in model.parameters())
    img_size, num_classes = config["img_size"], config["num_classes"]
    dynamic = not args.static

    target = os.path.abspath(args.target)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(progress.close)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            beit_io.remove_stale_temporaries_of(target)  # what a killed earlier run left (~330 MB)
            tmp = cleanup.enter_context(beit_io.temporary_beside(target))
        except OSError as exc:
            return fail(f"{args.target}: cannot write here ({exc.strerror or exc})")
        progress.set_description_str(f"export opset {args.opset}")
        t0 = time.perf_counter()
        try:
            export(model, tmp, args.batch_size, img_size, args.opset, dynamic)
            check_graph(tmp, args.batch_size, num_classes, dynamic)
        except Exception as exc:  # the exporter and the checker raise many kinds
            return fail(f"{args.source}: ONNX export failed ({type(exc).__name__}: {str(exc).strip()[:2000]})")
        export_seconds = time.perf_counter() - t0
        progress.update()

        results = []
        if not args.no_verify:
            progress.set_description_str("verify with ONNX Runtime")
            # A dynamic model is also run at a second batch size: a batch size baked into a
            # Reshape by the tracer would only show up there.
            sizes = [args.batch_size] + ([1 if args.batch_size != 1 else 2] if dynamic else [])
            t0 = time.perf_counter()
            try:
                results = verify(model, tmp, sizes, img_size, args.seed)
            except onnx_check.OnnxCheckError as exc:
                return fail(f"{args.target}: verification failed: {exc}")
            verify_seconds = time.perf_counter() - t0
        progress.update()
        worst = max((r["max_rel"] for _, r in results), default=0.0)
        if not worst <= args.tolerance:
            for n, errors in results:
                print(f"verify batch {n}: {onnx_check.format_errors(errors)}", file=sys.stderr)
            return fail(f"{args.target}: ONNX Runtime differs from PyTorch by relative error {worst:.3e} "
                        f"> tolerance {args.tolerance:g}; nothing written")
        beit_io.publish_temporary(tmp, target)
        progress.update()

    size_mb = os.path.getsize(target) / 2 ** 20
    print(f"beit_pth2onnx: {args.source} -> {args.target}")
    print(f"  model     {name or 'BEiT (unpublished configuration)'}: {params / 1e6:.2f} M parameters, "
          f"{num_classes} classes, input {img_size}x{img_size}")
    print(f"  export    opset {args.opset}, batch {'dynamic' if dynamic else 'static'} "
          f"(traced with batch {args.batch_size}), {size_mb:.1f} MiB, {export_seconds:.1f} s")
    if args.no_verify:
        print("  verify    skipped (--no_verify)")
    else:
        for n, errors in results:
            print(f"  verify    batch {n}: {onnx_check.format_errors(errors)}")
        print(f"  verify    ONNX Runtime vs PyTorch within tolerance {args.tolerance:g} "
              f"(relative = max|onnx-torch|/max|torch|), {verify_seconds:.1f} s")
    print(f"  total     {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
