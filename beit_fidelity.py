"""The fidelity report: does each stage keep PyTorch's Top-1, and what will the fp16 OM score?

    beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py -> atc / beit_infer.py -> beit_eval_acc.py
                                                                                     -> beit_fidelity.py (last)

Scores every stage of a run_all.sh work folder on the same preprocessed images:
pytorch (the reference), onnx, onnxsim, graph_modify, guide_padding (the guide's own
graph_modify.py, reproduced), om_emulation (graph_modify in fp16 with Ascend's fused
operators and Gelu: the OM's accuracy predicted on a CPU), guide_om_emulation (the
guide's OM predicted) and om (ais_bench's outputs, when the device ran).  Writes
fidelity_bs{N}.json and fidelity_bs{N}.md in the work folder and prints the table.
The stages it makes itself (beit_guide_bs{N}.onnx, beit_om_emulation_bs{N}.onnx,
beit_guide_om_emulation_bs{N}.onnx) are written to the work folder too, and remade only
when the model they are made from changes.

--locate STAGE instead finds where STAGE's model starts to differ from the stage
before it (onnxsim <- onnx, graph_modify and guide_padding <- onnxsim, om_emulation <-
graph_modify, guide_om_emulation <- guide_padding), tensor by tensor, on the first batch,
and prints the error after each block; for an emulated stage it also names the first
node whose fp16 rounding saturates (the 310P clamps overflow to +-65504).  It writes no
report.

--keep_dtype FILE builds the om_emulation stage with atc's keep_dtype file (the
operators it lists compute and store fp32), as run_all.sh --keep_dtype builds the OM.

--suggest_keep_dtype instead finds a small set of operators of beit_mg_bs{N}.onnx to
keep in fp32 so that the emulated OM is back within its ordinary error of fp32, and
writes keep_dtype_bs{N}.cfg (atc's format) and keep_dtype_bs{N}.json, then prints the
atc command line with --keep_dtype (an empty list when nothing needs keeping).

Exit status: 0 done; 1 a file the report needs is missing or malformed (nothing written);
2 usage.
"""

import argparse
import sys

from beit_pipeline import cli, fidelity, fidelity_locate, fp16_overflow, keep_dtype, keep_suggestion
from beit_pipeline.cli import log


def build_parser():
    p = argparse.ArgumentParser(description="Score every stage of a work folder against PyTorch and the labels, "
                                            "with the fp16 OM emulated on the CPU.")
    p.add_argument("--workdir", required=True, help="run_all.sh's work folder")
    p.add_argument("--batch_size", type=int, required=True,
                   help="the batch size of the run (prep_image_bs{N}, beit_*_bs{N}.onnx)")
    p.add_argument("--checkpoint", help="the checkpoint for the pytorch stage (default: the one run_all.sh "
                                        "recorded in WORKDIR/run_all_state.json)")
    p.add_argument("--label_file", help="val_label.txt (default: the one run_all.sh's eval step recorded)")
    p.add_argument("--model", help="the exported ONNX file's name without .onnx (default: as recorded, else "
                                   f"{fidelity.DEFAULT_MODEL})")
    p.add_argument("--max_images", type=int, default=fidelity.DEFAULT_MAX_IMAGES,
                   help="score the first K images in name order (default %(default)s: about 2 minutes for "
                        "BEiT-base's 7 model stages on 2 CPU cores, at about 5 img/s per stage)")
    p.add_argument("--stages", help="comma-separated stages to score (default: every stage whose input is in "
                                    f"the work folder); pytorch is always scored. Stages: {', '.join(fidelity.STAGES)}")
    p.add_argument("--locate", metavar="STAGE", choices=sorted(fidelity_locate.PREVIOUS),
                   help="find the first node where STAGE departs from the stage before it (cosine < "
                        f"{fidelity_locate.COSINE_LIMIT} or max|a-b|/max|b| > {fidelity_locate.REL_LIMIT:g}) and "
                        "print the error after each block (and, for an emulated stage, the first node whose fp16 "
                        "rounding saturates); writes no report")
    p.add_argument("--keep_dtype", metavar="FILE",
                   help="atc's keep_dtype file (a node name of beit_mg_bs{N}.onnx or OpType::TypeName per line): the "
                        "om_emulation stage keeps those operators in fp32, as atc --keep_dtype does")
    p.add_argument("--suggest_keep_dtype", action="store_true",
                   help="find operators to keep in fp32 so the emulated OM is back within its ordinary error of "
                        "fp32; writes keep_dtype_bs{N}.cfg and .json and prints the atc command line; no report")
    return p


def check_args(args):
    cli.check(args.batch_size >= 1, "--batch_size must be at least 1")
    cli.check(args.max_images >= 1, "--max_images must be at least 1")
    cli.check(not (args.locate and args.suggest_keep_dtype), "--locate and --suggest_keep_dtype are two modes; "
                                                               "give one")
    if args.keep_dtype:
        keep_dtype.read(args.keep_dtype)  # a missing or malformed file is refused before any work


def run_locate(wf, stage):
    reference = fidelity_locate.PREVIOUS[stage]
    for needed in (reference, stage):
        fidelity.require_stage(wf, needed)  # a clear error when the work folder lacks it
    images = fidelity.select_images(wf, wf.batch_size, with_labels=False)
    record = fidelity.read_derived_record(wf)
    ref_path = fidelity.ensure_model(wf, reference, record)
    cand_path = fidelity.ensure_model(wf, stage, record)
    found = fidelity_locate.locate(ref_path, cand_path, stage, reference, images.batches[0][0], images.image_size)
    fidelity_locate.report(found)
    if stage in fp16_overflow.EMULATED_STAGES:  # issue 20: where fp16 overflows, if it does
        batch_path, rows = images.batches[0]
        keep, _ = keep_dtype.for_stage(wf.keep_dtype, stage)
        first = fp16_overflow.first_saturation(ref_path, keep, images.read(batch_path), images.names[:rows])
        log.info(f"first saturating node: {fp16_overflow.describe(first)}" if first else
                 "no fp16 rounding saturates on this batch")


def run(args):
    wf = fidelity.work_folder(args, scoring=not args.locate)
    if args.locate:
        return run_locate(wf, args.locate)
    if args.suggest_keep_dtype:
        keep_suggestion.run(wf, args.max_images)
        return None
    requested = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else []
    stages = fidelity.choose_stages(wf, requested)
    results = fidelity.run_report(wf, stages, args.max_images)
    fidelity.write_report(wf, results, args.max_images)
    log.info(fidelity.table(results))
    predicted = fidelity.predicted_om_top1(wf.file("json"))
    if predicted is not None:
        log.info(f"predicted OM Top-1 (om_emulation): {predicted:.2f}% (pytorch {results[0].top1:.2f}%)")
    log.info(f"wrote {wf.file('json')} and {wf.file('md')}")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
