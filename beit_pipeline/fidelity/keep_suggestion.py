"""beit_fidelity.py --suggest_keep_dtype: the keep_dtype file for atc, found on the CPU.

It runs the fidelity report's screen for the om_emulation stage (fidelity_report.run_report with
pytorch and om_emulation: every stored logit is reused) and takes the images where the emulated
OM can matter (images_that_can_matter: the audit and every image whose base margins the
emulation and pytorch can move enough to change Top-1 or Top-5; within the stage's sample when
the screen sampled it).  On those it emulates the OM of beit_mg_bs{N}.onnx (the model given to
atc, whose node names the file holds), finds a small set of operators to keep in fp32
(fp16_overflow.suggest) and writes

* ``keep_dtype_bs{N}.cfg``: atc's format, a ``#`` line saying what made it, one node
  name per line, and ``OpType::`` alternatives commented out;
* ``keep_dtype_bs{N}.json``: the list, the emulated stage with it and without it
  (``top1``, ``agree_top1``, ``max_rel_err``, ``min_cosine``, ``num_images``: on those images),
  which images (``measured_on``), the share of the model's FLOPs the list keeps in fp32, and why;

then prints the atc command line with ``--keep_dtype``.  An empty list is an answer:
the files are written and the reason is printed.
"""

import dataclasses
import logging
import os
import tempfile

import numpy as np
import onnx

from beit_pipeline import files
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation.accuracy import label_ranks, percent
from beit_pipeline.fidelity import fp16_overflow, keep_dtype
from beit_pipeline.fidelity import report as fidelity_report
from beit_pipeline.fidelity import runners as fidelity_runners
from beit_pipeline.fidelity import stages as fidelity
from beit_pipeline.graph.index import GraphIndex, node_key
from beit_pipeline.inference import sessions as onnx_models

log = logging.getLogger(__name__)

STAGE = "om_emulation"


def paths(wf: fidelity.WorkFolder) -> tuple:
    """(keep_dtype_bs{N}.cfg, keep_dtype_bs{N}.json) in the work folder."""
    return wf.path(wf.names.keep_dtype_cfg), wf.path(wf.names.keep_dtype_json)


@dataclasses.dataclass
class Images:
    """The images a suggestion is measured on: names, labels and pixels (read on demand), and how chosen."""
    names: list
    labels: np.ndarray
    pixels: fidelity_runners.ImageRows  # (N, 3, S, S)
    measured_on: dict


def images_that_can_matter(report: fidelity_report.Report) -> np.ndarray:
    """Sorted indices of the images where the emulated OM can change Top-1 or Top-5: the report's screen for
    om_emulation (its audit plus every image whose base margins om_emulation and pytorch can move together
    past a tie, screen.images_at_risk); within its sample when the report sampled the stage (the
    screen would have run most images); every image with --no_screen."""
    plan = report.plan
    if plan.base is None:
        return plan.everything
    chosen = plan.at_risk(STAGE)
    return np.intersect1d(chosen, plan.sample) if plan.modes[STAGE] == "sampled" else chosen


def describe_choice(report: fidelity_report.Report, chosen: np.ndarray) -> dict:
    plan = report.plan
    how = ("every image (--no_screen)" if plan.base is None else
           "the audit and the images whose margins the emulated OM and pytorch can move past a tie"
           + (f", within the stage's seeded sample of {len(plan.sample)}" if plan.modes[STAGE] == "sampled" else ""))
    return {"images": len(chosen), "of": len(plan.images.names), "audit_images": len(plan.audit),
            "bound": plan.bounds[STAGE].abs if STAGE in plan.bounds else None, "how": how}


def read_images(report: fidelity_report.Report) -> Images:
    """The images of images_that_can_matter, with their labels; pixels read a batch at a time."""
    chosen = images_that_can_matter(report)
    images = report.plan.images
    return Images([images.names[i] for i in chosen], images.labels[chosen],
                  fidelity_runners.ImageRows(images, chosen), describe_choice(report, chosen))


def measured_logits(report: fidelity_report.Report, chosen: np.ndarray) -> tuple:
    """(pytorch, fp32 graph_modify, the baseline EmulatedRun) on the images ``chosen``, from the report's runners
    (what they did not run yet is computed and kept as the report keeps it)."""
    runners, base = report.runners, report.plan.base
    what = f"the fidelity report's logits ({report.wf.files()['logits']})"
    with files.FolderLock(report.wf.file("logits"), what=what):
        for stage in runners:
            runners[stage].ensure(chosen)
            runners[stage].close()
        emulated = runners[STAGE]
        baseline = fp16_overflow.EmulatedRun(emulated.emulation(), emulated.array(chosen),
                                             emulated.clamp_array(chosen).T)
    fp32 = base.logits[chosen] if base is not None else runners["graph_modify"].array(chosen)
    return runners["pytorch"].array(chosen), fp32, baseline


def run(wf: fidelity.WorkFolder, options: fidelity.Options) -> dict:
    """Search, write the two files, print the atc command line; returns the JSON record."""
    fidelity.require_stage(wf, "graph_modify")
    report = fidelity_report.run_report(wf, ["pytorch", STAGE] + ([] if options.screen else ["graph_modify"]),
                                        options)
    images = read_images(report)
    reference, fp32, baseline = measured_logits(report, images.pixels.indices)
    mg_path = fidelity.ensure_model(wf, "graph_modify", fidelity.read_derived_record(wf))
    model = onnx.load(mg_path)
    log.info(f"suggest keep_dtype: {len(images.names)} of {len(report.plan.images.names)} images "
             f"({images.measured_on['how']}), {os.path.basename(mg_path)}")
    with tempfile.TemporaryDirectory(prefix=".keep_dtype_", dir=wf.workdir) as folder:
        found = fp16_overflow.suggest(model, images.pixels, fp32, wf.batch_size, folder, baseline)
        final = baseline if not found.operators else fp16_overflow.run_emulated(
            model, found.keep, images.pixels, wf.batch_size, folder)
    result = build_record(wf, model, mg_path, found, images, reference, fp32, baseline, final)
    write(wf, result, found)
    announce(wf, result, mg_path, images)
    return result


def stage_numbers(name: str, logits: np.ndarray, reference: np.ndarray, images: Images) -> dict:
    """top1, agree_top1, max_rel_err, min_cosine, num_images of ``logits`` (labels; the pytorch ``reference``)."""
    count = len(images.names)
    ranks = label_ranks(logits, images.labels)
    a, b = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return {"name": name, "top1": percent(np.count_nonzero(ranks == 0), count),
            "agree_top1": percent(np.count_nonzero(logits.argmax(1) == reference.argmax(1)), count),
            "max_rel_err": onnx_models.output_errors(logits, reference)["max_rel"],
            "min_cosine": float(cosine.min()), "num_images": count}


def build_record(wf: fidelity.WorkFolder, model: onnx.ModelProto, mg_path: str, found: fp16_overflow.Suggestion,
                 images: Images, reference: np.ndarray, fp32: np.ndarray,
                 baseline: fp16_overflow.EmulatedRun, final: fp16_overflow.EmulatedRun) -> dict:
    """The JSON record of a suggestion (see the module's docstring)."""
    gi = GraphIndex(model)
    operators = baseline.emulation.operators
    kept_keys = {node_key(op.last) for op in found.operators}
    positions = fp16_overflow.readable_positions(model)
    verdict = fp16_overflow.judge(final, fp32)
    names = {n.name for n in model.graph.node}
    missing = keep_dtype.check_names(found.keep, names, mg_path)
    if missing:
        raise PipelineFileError(f"{mg_path}: the suggested names {missing} are not in the model atc is given")
    alternatives = fp16_overflow.optype_alternatives(found.operators)
    return {
        "model": os.path.basename(mg_path), "batch_size": wf.batch_size,
        "keep": found.keep.lines(),
        "operators": [{"kind": op.kind, "nodes": [n.name for n in op.nodes], "position": positions.get(op.output, "?"),
                       "fp32_flops_share": fp16_overflow.flops_share(gi, operators, {node_key(op.last)})}
                      for op in found.operators],
        "fp32_flops_share": fp16_overflow.flops_share(gi, operators, kept_keys),
        "why": ("nothing needs keeping: " if not found.operators else "") + verdict.why,
        "good": verdict.good,
        "stage": stage_numbers("om_emulation", final.logits, reference, images),
        "without_keep_dtype": stage_numbers("om_emulation", baseline.logits, reference, images),
        "fp32": stage_numbers("graph_modify", fp32, reference, images),
        "saturated_without_keep_dtype": [dataclasses.asdict(s) for s in fp16_overflow.saturated_nodes(
            baseline, images.names, positions)],
        "search": {"images": [images.names[i] for i in found.images], "trials": found.trials,
                   "ordinary_rel_err": fp16_overflow.ORDINARY_REL_ERR},
        "optype_alternatives": [{"line": keep_dtype.OPTYPE_PREFIX + t, "keeps_operators": sum(
            keep_dtype.ASCEND_TYPES.get(op.kind) == t for op in operators)} for t in alternatives],
        "names_checked_against": os.path.basename(mg_path),
        "measured_on": images.measured_on,
    }


def write(wf: fidelity.WorkFolder, result: dict, found: fp16_overflow.Suggestion) -> None:
    cfg, js = paths(wf)
    made_by = (f"made by beit_fidelity.py --suggest_keep_dtype for {result['model']} on "
               f"{result['stage']['num_images']} images: {result['why']}")
    keep_dtype.write_files(cfg, js, found.keep, made_by, result,
                           [a["line"][len(keep_dtype.OPTYPE_PREFIX):] for a in result["optype_alternatives"]])


def announce(wf: fidelity.WorkFolder, result: dict, mg_path: str, images: Images) -> None:
    """Print what was found and the atc command line."""
    cfg, js = paths(wf)
    before, after = result["without_keep_dtype"], result["stage"]
    if result["keep"]:
        log.info(f"keep in fp32: {len(result['operators'])} operator(s), {len(result['keep'])} node name(s), "
                 f"{100 * result['fp32_flops_share']:.3f}% of the model's FLOPs")
        for op in result["operators"]:
            log.info(f"  {op['kind']} at {op['position']}: {', '.join(op['nodes'])}")
    else:
        log.info(result["why"])
    log.info(f"emulated OM without the list: Top-1 agrees with pytorch on {before['agree_top1']:.2f}%, max rel err "
             f"{before['max_rel_err']:.3e}; with it: {after['agree_top1']:.2f}%, {after['max_rel_err']:.3e} "
             f"(fp32: {result['fp32']['agree_top1']:.2f}%; {after['num_images']} images)")
    log.info(f"wrote {cfg} and {js}")
    size = images.pixels.shape[-1]
    command = keep_dtype.atc_command(os.path.basename(mg_path), os.path.basename(mg_path)[:-len(".onnx")],
                                     wf.batch_size, size, os.path.basename(cfg))
    log.info(f"atc with it (in {wf.workdir}; --soc_version as npu-smi reports):\n  {command}")
