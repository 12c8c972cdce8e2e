"""The fidelity report: does each stage keep PyTorch's Top-1, and what will the fp16 OM score?

    beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py -> atc / beit_infer.py -> beit_eval_acc.py
                                                                                     -> beit_fidelity.py (last)

Scores every stage of a run_all.sh work folder on every preprocessed image (or a seeded random
sample: --max_images, --seed): pytorch (the reference), onnx, onnxsim, graph_modify, cpu_bf16
(where the CPU has bf16), guide_padding (the guide's own graph_modify.py, reproduced),
om_emulation (graph_modify in fp16 with Ascend's fused operators and Gelu: the OM's accuracy
predicted on a CPU), guide_om_emulation (the guide's OM predicted) and om (ais_bench's outputs,
when the device ran).  Each stage runs only on the images where it can change Top-1 or Top-5;
the others take the answer of the run's own fp32 outputs (the screen: README, "The fidelity
report"), so scoring every image costs about one inference pass; --no_screen runs every stage
on every image.  Writes fidelity_bs{N}.json and fidelity_bs{N}.md in the work folder and
prints the table.  The stages it makes itself (beit_guide_bs{N}.onnx, beit_om_emulation_bs{N}.onnx,
beit_guide_om_emulation_bs{N}.onnx) are written to the work folder too, and remade only when
the model they are made from changes; the logits it computes are kept in
fidelity_logits_bs{N}/, so an interrupted report run again goes on where it stopped.

--locate STAGE instead finds where STAGE's model starts to differ from the stage before it
(onnxsim <- onnx, graph_modify and guide_padding <- onnxsim, om_emulation <- graph_modify,
guide_om_emulation <- guide_padding), tensor by tensor, on the first batch, and prints the
error after each block; for an emulated stage it also names the first node whose fp16
rounding saturates (the 310P clamps overflow to +-65504).  It writes no report, only
locate_{STAGE}_bs{N}.json for the HTML report.

The emulated stages report ``saturated_nodes``: the fp16 roundings that clamp on the images
they ran (fp16_overflow.py).  --keep_dtype FILE builds the om_emulation stage with atc's
keep_dtype file (the operators it lists compute and store fp32), as run_all.sh --keep_dtype
builds the OM.

--suggest_keep_dtype instead finds a small set of operators of beit_mg_bs{N}.onnx to keep in
fp32 so that the emulated OM is back within its ordinary error of fp32, measured on the images
where the emulated OM can matter (the screen's: the audit and the images whose margins it can
flip), and writes keep_dtype_bs{N}.cfg (atc's format) and keep_dtype_bs{N}.json, then prints
the atc command line with --keep_dtype (an empty list when nothing needs keeping).

Exit status: 0 done; 1 a file the report needs is missing or malformed (nothing written);
2 usage; 4 another report holds fidelity_logits_bs{N}/.
"""

import argparse
import dataclasses
import sys

from beit_pipeline import cli
from beit_pipeline.cli import log
from beit_pipeline.fidelity import fp16_overflow, keep_dtype, keep_suggestion
from beit_pipeline.fidelity import locate as fidelity_locate
from beit_pipeline.fidelity import report as fidelity_report
from beit_pipeline.fidelity import screen as fidelity_screen
from beit_pipeline.fidelity import stages as fidelity
from beit_pipeline.preprocess.batches import read_batch


def build_parser():
    p = argparse.ArgumentParser(description="Score every stage of a work folder against PyTorch and the labels, "
                                            "with the fp16 OM emulated on the CPU, on every image for about the "
                                            "cost of one inference pass.")
    p.add_argument("--workdir", required=True, help="run_all.sh's work folder")
    p.add_argument("--batch_size", type=int, required=True,
                   help="the batch size of the run (prep_image_bs{N}, beit_*_bs{N}.onnx)")
    p.add_argument("--checkpoint", help="the checkpoint for the pytorch stage (default: the one run_all.sh "
                                        "recorded in WORKDIR/run_all_state.json)")
    p.add_argument("--label_file", help="val_label.txt (default: the one run_all.sh's eval step recorded)")
    p.add_argument("--model", help="the exported ONNX file's name without .onnx (default: as recorded, else "
                                   f"{fidelity.DEFAULT_MODEL})")
    p.add_argument("--max_images", type=int, metavar="K",
                   help="score a seeded random sample of K images (--seed) instead of every image; the report "
                        "says it is a sample (default: every image)")
    p.add_argument("--seed", type=int, default=0,
                   help="the seed of every random choice: the --max_images sample, the audit and the stage "
                        "sample; the same seed gives the same images on any machine (default %(default)s)")
    p.add_argument("--no_screen", action="store_true",
                   help="run every stage on every image (brute force: about one inference pass per stage) "
                        "instead of only where it can change Top-1 or Top-5; the check of the screen")
    p.add_argument("--audit_images", type=int, default=fidelity_screen.AUDIT_IMAGES, metavar="A",
                   help="images (seeded random) that run through every stage to measure each stage's bound "
                        "(default %(default)s; all images when fewer)")
    p.add_argument("--sample_size", type=int, metavar="S",
                   help="by default a stage the screen cannot narrow (its bound would leave most images to run: "
                        "the guide's padding) runs on a seeded random sample of S images instead, and its row "
                        "says so (default: the larger of the audit and "
                        f"{100 * fidelity_screen.SAMPLE_FRACTION:g}%% of the images; S at least the image count: "
                        "no stage is sampled)")
    p.add_argument("--fresh", action="store_true",
                   help="recompute every logit, ignoring what earlier runs kept in fidelity_logits_bs{N}/")
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
                        "fp32, measured on the images where it can change Top-1 or Top-5 (the screen's audit and "
                        "near-ties; --max_images, --seed, --audit_images, --sample_size, --no_screen, --fresh apply); "
                        "writes keep_dtype_bs{N}.cfg and .json and prints the atc command line; no report")
    return p


def check_args(args):
    cli.check(args.batch_size >= 1, "--batch_size must be at least 1")
    cli.check(args.max_images is None or args.max_images >= 1, "--max_images must be at least 1")
    cli.check(args.audit_images >= 1, "--audit_images must be at least 1")
    cli.check(args.sample_size is None or args.sample_size >= 1, "--sample_size must be at least 1")
    cli.check(args.seed >= 0, "--seed must be 0 or more")
    cli.check(not (args.locate and args.suggest_keep_dtype), "--locate and --suggest_keep_dtype are two modes; "
                                                               "give one")
    cli.check(not (args.keep_dtype and args.suggest_keep_dtype), "--suggest_keep_dtype searches from an empty "
                                                                   "keep list; give no --keep_dtype with it")
    if args.keep_dtype:
        keep_dtype.read(args.keep_dtype)  # a missing or malformed file is refused before any work


def run_locate(wf, stage):
    reference = fidelity_locate.PREVIOUS[stage]
    for needed in (reference, stage):
        fidelity.require_stage(wf, needed)  # a clear error when the work folder lacks it
    images = fidelity.select_images(wf, with_labels=False)
    record = fidelity.read_derived_record(wf)
    ref_path = fidelity.ensure_model(wf, reference, record)
    cand_path = fidelity.ensure_model(wf, stage, record)
    found = fidelity_locate.locate(ref_path, cand_path, stage, reference, images.first_batch, images.image_size)
    fidelity_locate.report(found)
    extra = {"first_saturating": first_saturation(wf, stage, ref_path, images)} \
        if stage in fp16_overflow.EMULATED_STAGES else {}
    saved = wf.path(wf.names.locate(stage))  # issue 21: for the HTML report
    fidelity_locate.save(found, saved, extra)
    log.info(f"wrote {saved}")


def first_saturation(wf, stage, src_path, images):
    """Issue 20: the first node whose fp16 rounding saturates on the first batch (logged), as a dict, or None."""
    rows = sum(1 for path, _ in images.locations if path == images.first_batch)
    keep, _ = keep_dtype.for_stage(wf.keep_dtype, stage)
    batch = read_batch(images.first_batch, image_size=images.image_size)
    first = fp16_overflow.first_saturation(src_path, keep, batch, images.names[:rows])
    log.info(f"first saturating node: {fp16_overflow.describe(first)}" if first else
             "no fp16 rounding saturates on this batch")
    return dataclasses.asdict(first) if first else None


def options_of(args) -> fidelity.Options:
    return fidelity.Options(max_images=args.max_images, seed=args.seed, screen=not args.no_screen,
                            audit=args.audit_images, sample=args.sample_size, fresh=args.fresh)


def run(args):
    wf = fidelity.work_folder(args, scoring=not args.locate)
    if args.locate:
        return run_locate(wf, args.locate)
    if args.suggest_keep_dtype:
        keep_suggestion.run(wf, options_of(args))
        return None
    requested = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else []
    stages = fidelity.choose_stages(wf, requested)
    report = fidelity_report.run_report(wf, stages, options_of(args))
    fidelity_report.write_report(report)
    log.info(fidelity_report.table(report.results))
    predicted = next((r for r in report.results if r.name == "om_emulation"), None)
    if predicted is not None:
        where = f"its sample of {predicted.num_images} images" if predicted.mode == "sampled" else \
            fidelity_report.describe_images(report).replace("`", "")
        log.info(f"predicted OM Top-1 (om_emulation): {fidelity_report.prediction_line(predicted, where)}")
    log.info(f"wrote {wf.file('json')} and {wf.file('md')} in {report.seconds:.1f} s")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
