"""The fidelity report: every stage of a work folder scored on the same images, against PyTorch and the labels.

Stages, in pipeline order (each included when what it needs is in the work folder):

    pytorch             the checkpoint in PyTorch, fp32: the reference
    onnx                <model>.onnx (the export, dynamic batch) on ONNX Runtime, fp32
    onnxsim             beit_onnxsim_bs{N}.onnx, fp32
    graph_modify        beit_mg_bs{N}.onnx (this pipeline's exact, masked padding), fp32
    guide_padding       beit_guide_bs{N}.onnx: the guide's own graph_modify.py reproduced (made here from onnxsim)
    om_emulation        beit_om_emulation_bs{N}.onnx: graph_modify in fp16 as atc builds the OM (om_emulation.py)
    guide_om_emulation  beit_guide_om_emulation_bs{N}.onnx: the same emulation of the guide's graph
    om                  the real OM's outputs, when ais_out/bs{N} was written by ais_bench

Every stage runs on the first K images of the preprocessed batches (prep_image_bs{N},
in the manifest's order, which is name order).  Per stage: Top-1 / Top-5 against the
labels, Top-1 agreement with pytorch, max|a-b|/max|b| and the lowest per-image cosine of
the logits against pytorch, and the images whose Top-1 differs from pytorch's.
"""

import dataclasses
import os
import time
from typing import Optional

import numpy as np

from beit_pipeline import (batches, files, fp16_overflow, graph_padding, inference_record, keep_dtype, labels,
                           om_emulation, onnx_files, onnx_models)
from beit_pipeline import outputs as output_files
from beit_pipeline.cli import log
from beit_pipeline.errors import PipelineFileError, UsageError
from beit_pipeline.evaluation import label_ranks, percent

STAGES = ("pytorch", "onnx", "onnxsim", "graph_modify", "cpu_bf16", "guide_padding", "om_emulation",
          "guide_om_emulation", "om")
# Reduced CPU precisions, scored on the graph_modify model with the engine beit_infer.py --precision picks, so a
# user sees the agreement they cost before trusting their Top-1; each only where the CPU has its instructions.
CPU_PRECISION_STAGES = {"cpu_bf16": "bf16"}
# BEiT-base runs at about 5 img/s per stage on 2 cores; 7 model stages on 64 images take about 2 minutes.
DEFAULT_MAX_IMAGES = 64
STATE_NAME, RUN_NAME = "run_all_state.json", ".run_all_run.json"
DERIVED_RECORD = ".fidelity_derived.json"
DERIVED_VERSION = 2  # bump when graph_padding's guide edits or om_emulation change what they write (2: saturation)
DEFAULT_MODEL = "beit_base_patch16_224"


@dataclasses.dataclass
class WorkFolder:
    """The work folder's files, for one batch size, with the checkpoint and label file to use."""
    workdir: str
    batch_size: int
    checkpoint: str
    label_file: str
    model: str
    keep_dtype: str = ""  # issue 20: the atc keep_dtype file the om_emulation stage is built with ("": none)

    def path(self, relative):
        return os.path.join(self.workdir, relative)

    def files(self):
        """{role: relative path} of every file a stage reads or makes."""
        n = self.batch_size
        return {"prep": f"prep_image_bs{n}", "onnx": f"{self.model}.onnx", "onnxsim": f"beit_onnxsim_bs{n}.onnx",
                "graph_modify": f"beit_mg_bs{n}.onnx", "guide_padding": f"beit_guide_bs{n}.onnx",
                "om_emulation": f"beit_om_emulation_bs{n}.onnx",
                "guide_om_emulation": f"beit_guide_om_emulation_bs{n}.onnx", "om": f"ais_out/bs{n}",
                "json": f"fidelity_bs{n}.json", "md": f"fidelity_bs{n}.md"}

    def file(self, role):
        return self.path(self.files()[role])


@dataclasses.dataclass
class StageResult:
    """One row of the report (the JSON keys of the issue, plus the file it came from and its time)."""
    name: str
    top1: float
    top5: float
    agree_top1: float
    max_rel_err: float
    min_cosine: float
    num_images: int
    flipped: list
    source: str = ""
    seconds: float = 0.0
    saturated_nodes: Optional[list] = None  # issue 20: emulated stages: fp16 roundings that clamp (fp16_overflow)


# ---------------------------------------------------------------- where the inputs are

def recorded_inputs(workdir, batch_size):
    """(checkpoint, label file, model) as run_all.sh recorded them in the work folder; None where unknown."""
    state = files.read_json(os.path.join(workdir, STATE_NAME)) or {}
    checkpoint = label_file = model = None
    for output, entry in (state.get("outputs") or {}).items():
        made = ((entry or {}).get("made_from") or {}).get("inputs") or {}
        if "the checkpoint" in made and output.endswith(".onnx"):
            checkpoint, model = made["the checkpoint"].get("path"), output[:-len(".onnx")]
        if output == f"acc_bs{batch_size}.json" and "the label file" in made:
            label_file = made["the label file"].get("path")
    run = files.read_json(os.path.join(workdir, RUN_NAME)) or {}
    return (checkpoint or run.get("checkpoint"), label_file or run.get("label_file"), model or run.get("model"))


def work_folder(args, scoring=True):
    """The WorkFolder of the arguments, the checkpoint and label file defaulting to run_all.sh's record.

    ``scoring``: the report needs both; --locate (False) needs neither.
    """
    cli_check_folder(args.workdir)
    checkpoint, label_file, model = recorded_inputs(args.workdir, args.batch_size)
    checkpoint, label_file = args.checkpoint or checkpoint, args.label_file or label_file
    if scoring and not checkpoint:
        raise UsageError(f"{args.workdir}: run_all.sh's record names no checkpoint; give --checkpoint")
    if scoring and not label_file:
        raise UsageError(f"{args.workdir}: run_all.sh's record names no label file (no eval step for batch size "
                         f"{args.batch_size}); give --label_file")
    return WorkFolder(os.path.abspath(args.workdir), args.batch_size, os.path.abspath(checkpoint or ""),
                      os.path.abspath(label_file or ""), args.model or model or DEFAULT_MODEL,
                      os.path.abspath(args.keep_dtype) if getattr(args, "keep_dtype", None) else "")


def cli_check_folder(workdir):
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir}: not a folder")


def om_written_by_ais_bench(folder):
    """True when ais_out/bs{N} holds outputs that beit_infer.py did not write (no record of its own there)."""
    if not os.path.isdir(folder) or not output_files.find_outputs(folder):
        return False
    return not os.path.exists(inference_record.record_path(folder))


def stage_needs(wf, stage):
    """(the file STAGE needs, a description) in the work folder."""
    source = {"pytorch": ("checkpoint", "the checkpoint"),
              "guide_padding": ("onnxsim", "run_all.sh's onnxsim step"),
              "om_emulation": ("graph_modify", "run_all.sh's graph_modify step"),
              "cpu_bf16": ("graph_modify", "run_all.sh's graph_modify step"),
              "guide_om_emulation": ("onnxsim", "run_all.sh's onnxsim step"),
              "om": ("om", "ais_bench's outputs on the device (run_all.sh --backend ascend)")}
    role, what = source.get(stage, (stage, f"run_all.sh's {stage if stage != 'onnx' else 'pth2onnx'} step"))
    path = wf.checkpoint if role == "checkpoint" else wf.file(role)
    return path, what


def stage_available(wf, stage):
    path, _ = stage_needs(wf, stage)
    if stage in CPU_PRECISION_STAGES and not cpu_runs(CPU_PRECISION_STAGES[stage]):
        return False
    return om_written_by_ais_bench(path) if stage == "om" else os.path.isfile(path)


def cpu_runs(precision):
    """Whether beit_infer.py --precision PRECISION runs here: an engine that has it and the CPU's instructions."""
    from beit_pipeline import engines
    return engines.openvino_available() and bool(engines.native_support(precision, engines.cpu_flags()))


def require_stage(wf, stage):
    """PipelineFileError, naming the missing file and the step that makes it, unless ``stage`` can run."""
    if stage in CPU_PRECISION_STAGES and not cpu_runs(CPU_PRECISION_STAGES[stage]):
        raise UsageError(f"stage {stage}: this CPU or this install cannot run {CPU_PRECISION_STAGES[stage]} "
                         "(beit_infer.py --precision says why); nothing written")
    if not stage_available(wf, stage):
        path, what = stage_needs(wf, stage)
        raise PipelineFileError(f"stage {stage} needs {path} ({what}), which is missing; nothing written")


def choose_stages(wf, requested):
    """The stages to score: ``requested`` (all must be available) or every available one; pytorch first."""
    unknown = [s for s in requested if s not in STAGES]
    if unknown:
        raise UsageError(f"--stages: unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
    for stage in ["pytorch"] + requested:  # pytorch is the reference of every other stage
        require_stage(wf, stage)
    chosen = [s for s in STAGES if (s in requested if requested else stage_available(wf, s))]
    return ["pytorch"] + [s for s in chosen if s != "pytorch"]


# ---------------------------------------------------------------- the images

@dataclasses.dataclass
class ImageSet:
    """The first K images: [(batch file, rows used)] and their names and labels."""
    batches: list
    names: list
    labels: np.ndarray
    image_size: int = batches.IMAGE_SIZE  # the manifest's: 384 and 512 models read larger batches

    def read(self, batch_path):
        return batches.read_batch(batch_path, image_size=self.image_size)


def select_images(wf, max_images, with_labels=True):
    """The first ``max_images`` images of the manifest, with their labels; PipelineFileError when not there."""
    prep = wf.file("prep")
    if not os.path.isdir(prep):
        raise PipelineFileError(f"{prep}: no preprocessed batches (run_all.sh's preprocess step); nothing written")
    manifest = batches.require_complete_manifest(prep)
    if manifest["batch_size"] != wf.batch_size:
        raise PipelineFileError(f"{prep}: holds batches of {manifest['batch_size']}, not {wf.batch_size}")
    chosen, names = [], []
    for stem, rows in batches.rows_from_manifest(manifest):
        take = rows[:max_images - len(names)]
        if not take:
            break
        chosen.append((os.path.join(prep, _batch_file(manifest, stem)), len(take)))
        names += take
    if not names:
        raise PipelineFileError(f"{prep}: the manifest lists no images")
    size = manifest.get("image_size", batches.IMAGE_SIZE)
    if not with_labels:
        return ImageSet(chosen, names, None, size)
    found = labels.read_labels(wf.label_file).match(names)
    return ImageSet(chosen, names, np.array([found[n] for n in names], dtype=np.int64), size)


def _batch_file(manifest, stem):
    return next(b["file"] for b in manifest["batches"] if os.path.splitext(b["file"])[0] == stem)


# ---------------------------------------------------------------- the made models

def make_guide(src, dst, batch_size):
    """The guide's own graph (graph_padding.modify_as_guide) of the onnxsim model."""
    import onnx

    model = onnx.load(src)
    result = graph_padding.modify(model, batch_size, guide=True)
    onnx_files.write_model(model, dst)
    return dict(result.counts)


def make_emulation(src, dst, batch_size, keep=None):
    """The fp16 emulation (om_emulation.emulate) of a padded model, with an atc keep_dtype list (issue 20)."""
    import onnx

    emulation = om_emulation.emulate(onnx.load(src), keep)
    onnx_files.write_model(emulation.model, dst)
    return dict(emulation.counts)


DERIVED = {  # stage: (the stage whose model it is made from, how)
    "guide_padding": ("onnxsim", make_guide),
    "om_emulation": ("graph_modify", make_emulation),
    "guide_om_emulation": ("guide_padding", make_emulation),
}


def read_derived_record(wf):
    """{relative path: how it was made} of the models this report made before."""
    return files.read_json(wf.path(DERIVED_RECORD)) or {}


def _stat(path):
    """Size and mtime of a model's files (its .data file too: new weights can leave the graph file as it was)."""
    return [[st.st_size, st.st_mtime_ns] for st in map(os.stat, onnx_files.model_files(path))]


def ensure_model(wf, stage, record):
    """The ONNX file of ``stage``, made (or remade, when its source changed) for the derived stages."""
    if stage not in DERIVED:
        return wf.file(stage)
    parent, make = DERIVED[stage]
    src, dst = ensure_model(wf, parent, record), wf.file(stage)
    rel = wf.files()[stage]
    made = record.get(rel) or {}
    keep, keep_digest = keep_dtype.for_stage(wf.keep_dtype, stage)  # issue 20: the keep list decides too
    if os.path.isfile(dst) and made.get("source") == _stat(src) and made.get("made") == _stat(dst) \
            and made.get("version") == DERIVED_VERSION and made.get("keep", "") == keep_digest:
        return dst
    start = time.perf_counter()
    counts = make(src, dst, wf.batch_size, **({"keep": keep} if keep else {}))
    log.info(f"made {rel} from {os.path.basename(src)} in {time.perf_counter() - start:.1f} s: "
             + ", ".join(f"{k} {v}" for k, v in counts.items()))
    record[rel] = {"source": _stat(src), "made": _stat(dst), "version": DERIVED_VERSION, "keep": keep_digest}
    files.write_json_atomic(wf.path(DERIVED_RECORD), record)
    return dst


# ---------------------------------------------------------------- running the stages

def pytorch_logits(wf, images):
    import torch

    from beit_pipeline import model as beit_model

    model = beit_model.build_model(beit_model.load_state_dict(wf.checkpoint))[0]
    out = []
    with torch.no_grad():
        for path, rows in images.batches:
            batch = images.read(path)[:rows]
            out.append(model(torch.from_numpy(np.ascontiguousarray(batch))).numpy())
    return np.concatenate(out)


def onnx_logits(path, images, providers="cpu", precision="fp32"):
    session = onnx_models.open_session(path, providers, precision=precision)
    out = []
    for batch_path, rows in images.batches:
        out.append(onnx_models.run_session(session, images.read(batch_path), path)[:rows])
    return np.concatenate(out)


def om_logits(folder, images):
    found = output_files.find_outputs(folder)
    out = []
    for batch_path, rows in images.batches:
        stem = os.path.splitext(os.path.basename(batch_path))[0]
        if stem not in found:
            raise PipelineFileError(f"{folder}: no output for {os.path.basename(batch_path)}")
        out.append(output_files.read_output(found[stem])[:rows])
    return np.concatenate(out)


def stage_logits(wf, stage, images, record):
    """(logits of the images, the file they came from) for one stage."""
    if stage == "pytorch":
        return pytorch_logits(wf, images), wf.checkpoint
    if stage == "om":
        return om_logits(wf.file("om"), images), wf.file("om")
    if stage in CPU_PRECISION_STAGES:
        path = ensure_model(wf, "graph_modify", record)
        return onnx_logits(path, images, "openvino", CPU_PRECISION_STAGES[stage]), path
    path = ensure_model(wf, stage, record)
    return onnx_logits(path, images), path


def emulated_stage_logits(wf, stage, images, record):
    """Issue 20: an emulated stage's (logits, model file, saturated nodes), run with saturation probes."""
    path = ensure_model(wf, stage, record)
    src = ensure_model(wf, DERIVED[stage][0], record)
    pixels = np.concatenate([images.read(p)[:rows] for p, rows in images.batches])
    keep, _ = keep_dtype.for_stage(wf.keep_dtype, stage)
    logits, saturated = fp16_overflow.emulated_stage(src, keep, pixels, wf.batch_size, images.names)
    return logits, path, saturated


# ---------------------------------------------------------------- the numbers

def cosines(a, b):
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (1 for two zero rows)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), np.where(dots == 0, 1.0, 0.0))


def score(name, logits, reference, images):
    """The StageResult of ``logits`` against the labels and the pytorch ``reference``."""
    ranks = label_ranks(logits, images.labels)
    count = len(images.names)
    same = logits.argmax(axis=1) == reference.argmax(axis=1)
    errors = onnx_models.output_errors(logits, reference)
    return StageResult(name=name, top1=percent(np.count_nonzero(ranks == 0), count),
                       top5=percent(np.count_nonzero(ranks < 5), count), agree_top1=percent(same.sum(), count),
                       max_rel_err=errors["max_rel"], min_cosine=float(cosines(logits, reference).min()),
                       num_images=count, flipped=[n for n, s in zip(images.names, same) if not s])


def run_report(wf, stages, max_images):
    """[StageResult] of every stage, pytorch first."""
    images = select_images(wf, max_images)
    record = read_derived_record(wf)
    log.info(f"fidelity: {len(images.names)} images of {wf.file('prep')}, batch size {wf.batch_size}, "
             f"stages {', '.join(stages)}")
    results, reference = [], None
    for stage in stages:
        start = time.perf_counter()
        saturated = None
        if stage in fp16_overflow.EMULATED_STAGES:  # issue 20: run with saturation probes
            logits, source, saturated = emulated_stage_logits(wf, stage, images, record)
        else:
            logits, source = stage_logits(wf, stage, images, record)
        reference = logits if reference is None else reference
        result = score(stage, logits, reference, images)
        result.source, result.seconds = os.path.relpath(source, wf.workdir), time.perf_counter() - start
        result.saturated_nodes = saturated
        log.info(f"  {stage}: Top-1 {result.top1:.2f}%, agrees with pytorch on {result.agree_top1:.2f}%, "
                 f"max rel err {result.max_rel_err:.3e} ({result.seconds:.1f} s)")
        results.append(result)
    return results


# ---------------------------------------------------------------- the files

def table(results):
    """The report as a Markdown table."""
    head = "| stage | Top-1 % | Top-5 % | agree Top-1 % | max rel err | min cosine | images | flipped |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name} | {r.top1:.2f} | {r.top5:.2f} | {r.agree_top1:.2f} | {r.max_rel_err:.3e} | "
                     f"{r.min_cosine:.6f} | {r.num_images} | {len(r.flipped)} |")
    return "\n".join(lines)


def markdown(wf, results, max_images):
    lines = [f"# Fidelity report, batch size {wf.batch_size}", "",
             f"Images: the first {results[0].num_images} of `{wf.files()['prep']}` (--max_images {max_images}); "
             f"labels: `{wf.label_file}`; reference: `pytorch` (`{wf.checkpoint}`, fp32). Relative error is "
             "max|a-b|/max|b| over all logits; cosine is per image, the lowest shown.", "", table(results), ""]
    predicted = next((r for r in results if r.name == "om_emulation"), None)
    if predicted is not None:
        lines.append(f"Predicted OM Top-1 (om_emulation): {predicted.top1:.2f}% against pytorch's "
                     f"{results[0].top1:.2f}% on the same images.")
    lines += [fp16_overflow.markdown_line(r.name, r.saturated_nodes) for r in results
              if r.saturated_nodes is not None]  # issue 20
    for r in results:
        if r.flipped:
            shown = ", ".join(r.flipped[:10]) + (f" and {len(r.flipped) - 10} more" if len(r.flipped) > 10 else "")
            lines.append(f"- {r.name}: Top-1 differs from pytorch on {shown}")
    return "\n".join(lines) + "\n"


def write_report(wf, results, max_images):
    data = {"batch_size": wf.batch_size, "max_images": max_images, "num_images": results[0].num_images,
            "checkpoint": wf.checkpoint, "label_file": wf.label_file,
            "stages": [dataclasses.asdict(r) for r in results]}
    files.write_json_atomic(wf.file("json"), data)
    files.write_text_atomic(wf.file("md"), markdown(wf, results, max_images))


def predicted_om_top1(path):
    """The om_emulation stage's Top-1 (percent) in a fidelity_bs{N}.json, or None when it has none."""
    data = files.read_json(path) or {}
    for stage in data.get("stages") or []:
        if isinstance(stage, dict) and stage.get("name") == "om_emulation":
            return stage.get("top1")
    return None
