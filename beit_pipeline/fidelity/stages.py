"""The fidelity report: every stage of a work folder scored on the same images, against PyTorch and the labels.

Stages, in pipeline order (each included when what it needs is in the work folder):

    pytorch             the checkpoint in PyTorch, fp32: the reference
    onnx                <model>.onnx (the export, dynamic batch) on ONNX Runtime, fp32
    onnxsim             beit_onnxsim_bs{N}.onnx, fp32
    graph_modify        beit_mg_bs{N}.onnx (this pipeline's exact, masked padding), fp32
    cpu_bf16            beit_mg_bs{N}.onnx on OpenVINO in bf16 (only where the CPU has bf16 instructions)
    guide_padding       beit_guide_bs{N}.onnx: the guide's own graph_modify.py reproduced (made here from onnxsim)
    om_emulation        beit_om_emulation_bs{N}.onnx: graph_modify in fp16 as atc builds the OM (om_emulation.py:
                        saturating as the 310P does; with the --keep_dtype list, WorkFolder.keep_dtype, in fp32)
    guide_om_emulation  beit_guide_om_emulation_bs{N}.onnx: the same emulation of the guide's graph
    om                  the real OM's outputs, when ais_out/bs{N} was written by ais_bench

Which images: every image of prep_image_bs{N} by default, or a seeded random sample
(``max_images``, ``seed``; never the first K).  What runs: a stage runs only on the images
where it can change Top-1 or Top-5 (screen.py: the base, the audit, the bounds);
every other image takes the base's answer, so every image is scored for about the cost of
one inference pass.  A stage the screen cannot narrow (it would run on most images: the
guide's padding) runs on a seeded random sample instead and says so.  ``screen=False`` runs
every stage on every image (the brute-force check).  Per stage: Top-1 / Top-5 against the
labels and Top-1 agreement with pytorch with 95% intervals, the images gained and lost
against pytorch with a paired interval on the difference (evaluation/stats.py), the images whose Top-1
differs from pytorch's with both top-5 lists, and max|a-b|/max|b| and the lowest cosine on
the images both ran; for the emulated stages, the fp16 roundings that saturate on the images
they ran (``saturated_nodes``, fp16_overflow.py).

This module holds the work folder, the stages, the images and the models the report makes;
runners.py runs stages and finds the base, screen.py decides what runs where,
report.py scores and writes the files, evaluation/stats.py the intervals.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from beit_pipeline import files, fingerprint
from beit_pipeline.errors import PipelineFileError, UsageError
from beit_pipeline.evaluation import labels
from beit_pipeline.fidelity import keep_dtype, om_emulation
from beit_pipeline.fidelity import screen as fidelity_screen
from beit_pipeline.graph import onnx_files
from beit_pipeline.graph import padding as graph_padding
from beit_pipeline.inference import outputs as output_files
from beit_pipeline.inference import record as inference_record
from beit_pipeline.pipeline import chain
from beit_pipeline.preprocess import batches

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

STAGES = ("pytorch", "onnx", "onnxsim", "graph_modify", "cpu_bf16", "guide_padding", "om_emulation",
          "guide_om_emulation", "om")
# Reduced CPU precisions, scored on the graph_modify model with the engine beit_infer.py --precision picks, so a
# user sees the agreement they cost before trusting their Top-1; each only where the CPU has its instructions.
CPU_PRECISION_STAGES = {"cpu_bf16": "bf16"}
FILE_STAGES = ("om",)  # read from output files, not run: every image, nothing to screen
STATE_NAME, RUN_NAME = chain.STATE, chain.RUN
DERIVED_RECORD = chain.FIDELITY_DERIVED
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

    def path(self, relative: str) -> str:
        return os.path.join(self.workdir, relative)

    def files(self) -> dict[str, str]:
        """{role: relative path} of every file a stage reads or makes."""
        names = self.names
        return {"prep": names.prep, "onnx": names.onnx, "onnxsim": names.onnxsim, "graph_modify": names.graph_modify,
                "guide_padding": names.guide_padding, "om_emulation": names.om_emulation,
                "guide_om_emulation": names.guide_om_emulation, "om": names.fp32_outputs,
                "logits": names.fidelity_logits, "json": names.fidelity_json, "md": names.fidelity_md}

    @property
    def names(self) -> chain.ChainFiles:
        """The chain's file names for this batch size and model."""
        return chain.ChainFiles(self.batch_size, self.model)

    def file(self, role: str) -> str:
        return self.path(self.files()[role])


@dataclasses.dataclass
class Options:
    """How the report chooses its images and runs its stages (beit_fidelity.py's flags)."""
    max_images: int = None  # None: every image; else a seeded random sample of this many
    seed: int = 0
    screen: bool = True  # False: every stage on every image (--no_screen)
    audit: int = fidelity_screen.AUDIT_IMAGES
    sample: int = None  # images of a sampled stage; None: fidelity_screen.sample_size
    fresh: bool = False  # recompute, ignoring the logits kept in fidelity_logits_bs{N}/


@dataclasses.dataclass
class StageResult:
    """One row of the report: what the stage scored on its images, and how it was run."""
    name: str
    top1: float
    top5: float
    agree_top1: float
    max_rel_err: float  # over the images both this stage and pytorch ran
    min_cosine: float
    num_images: int  # images scored: all selected, or the stage's sample
    flipped: list  # images whose Top-1 differs from pytorch's
    source: str = ""
    seconds: float = 0.0  # loading (and making) its model plus running it
    seconds_load: float = 0.0  # of which loading or making the model: a fixed cost, whatever the image count
    mode: str = ""  # screened | sampled | all | read (see report.MODES)
    images_run: int = 0  # images that went through the stage's model (or were read, for om)
    images_reused: int = 0  # of those, kept from an earlier run (fidelity_logits_bs{N}/)
    top1_ci95: list = None
    top5_ci95: list = None
    agree_top1_ci95: list = None
    gained: int = 0  # right here, wrong in pytorch
    lost: int = 0  # wrong here, right in pytorch
    delta_top1: float = 0.0  # points, this stage's Top-1 minus pytorch's on the same images
    delta_top1_ci95: list = None
    bound: float = None  # SAFETY_FACTOR x the largest logit difference from the base seen (logits); None: no screen
    bound_rel: float = None  # the same relative to each image's max |logit|
    bound_images: int = 0  # the images it was measured on
    sample: object = None  # {"size", "seed"} when sampled
    flipped_detail: list = None  # per flipped image: its label and both top-5 [class, logit] lists
    saturated_nodes: list = None  # emulated stages: fp16 roundings that clamp on the images it ran (issue 20)


# ---------------------------------------------------------------- where the inputs are

def recorded_inputs(workdir: str, batch_size: int) -> tuple[str | None, str | None, str | None]:
    """(checkpoint, label file, model) as run_all.sh recorded them in the work folder; None where unknown."""
    state = files.read_json(os.path.join(workdir, STATE_NAME)) or {}
    checkpoint = label_file = model = None
    for output, entry in (state.get("outputs") or {}).items():
        made = ((entry or {}).get("made_from") or {}).get("inputs") or {}
        if "the checkpoint" in made and output.endswith(".onnx"):
            checkpoint, model = made["the checkpoint"].get("path"), output[:-len(".onnx")]
        if output == chain.ChainFiles(batch_size).accuracy and "the label file" in made:
            label_file = made["the label file"].get("path")
    run = files.read_json(os.path.join(workdir, RUN_NAME)) or {}
    return (checkpoint or run.get("checkpoint"), label_file or run.get("label_file"), model or run.get("model"))


def work_folder(args: argparse.Namespace, scoring: bool = True) -> WorkFolder:
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


def cli_check_folder(workdir: str) -> None:
    if not os.path.isdir(workdir):
        raise UsageError(f"--workdir {workdir}: not a folder")


def om_written_by_ais_bench(folder: str) -> bool:
    """True when ais_out/bs{N} holds outputs and no file of beit_infer.py's lies beside it (its record, its figures):
    ais_bench writes neither.  A record that describes another folder (this one copied, or replaced since) cannot
    tell who wrote these outputs, so they are not scored as the OM's (a CPU run shown as the OM would be the worse
    error), and the log says how to have them read."""
    if not os.path.isdir(folder) or not output_files.find_outputs(folder):
        return False
    ours = [path for path in inference_record.beside(folder)[1:] if os.path.exists(path)]
    if not ours:
        return True
    if inference_record.read_record(folder) is None and folder not in _WARNED_UNKNOWN_OUTPUTS:
        _WARNED_UNKNOWN_OUTPUTS.add(folder)
        log.warning(f"{folder}: beit_infer.py's {os.path.basename(ours[0])} lies beside it but describes another "
                    "folder (copied or replaced since): its outputs are not scored as the OM's; if ais_bench wrote "
                    f"them, remove {', '.join(os.path.basename(p) for p in ours)}")
    return False


_WARNED_UNKNOWN_OUTPUTS: set = set()


def stage_needs(wf: WorkFolder, stage: str) -> tuple[str, str]:
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


def stage_available(wf: WorkFolder, stage: str) -> bool:
    path, _ = stage_needs(wf, stage)
    if stage in CPU_PRECISION_STAGES and not cpu_runs(CPU_PRECISION_STAGES[stage]):
        return False
    return om_written_by_ais_bench(path) if stage == "om" else os.path.isfile(path)


def cpu_runs(precision: str) -> bool:
    """Whether beit_infer.py --precision PRECISION runs here: an engine that has it and the CPU's instructions."""
    from beit_pipeline.inference import engines
    return engines.openvino_available() and bool(engines.native_support(precision, engines.cpu_flags()))


def require_stage(wf: WorkFolder, stage: str) -> None:
    """PipelineFileError, naming the missing file and the step that makes it, unless ``stage`` can run."""
    if stage in CPU_PRECISION_STAGES and not cpu_runs(CPU_PRECISION_STAGES[stage]):
        raise UsageError(f"stage {stage}: this CPU or this install cannot run {CPU_PRECISION_STAGES[stage]} "
                         "(beit_infer.py --precision says why); nothing written")
    if not stage_available(wf, stage):
        path, what = stage_needs(wf, stage)
        raise PipelineFileError(f"stage {stage} needs {path} ({what}), which is missing; nothing written")


def choose_stages(wf: WorkFolder, requested: list[str]) -> list[str]:
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
    """The images scored: their names and labels and where each lies (batch file, row), in manifest order."""
    names: list
    labels: np.ndarray
    locations: list  # [(batch file path, row)] of each image
    total: int  # images in the manifest
    sample: object = "all"  # "all", or {"size", "seed", "of"} when --max_images drew a sample
    image_size: int = batches.IMAGE_SIZE  # the manifest's: 384 and 512 models read larger batches

    @property
    def first_batch(self) -> str:
        return self.locations[0][0]


def select_images(wf: WorkFolder, max_images: int | None = None, seed: int = 0,
                  with_labels: bool = True) -> ImageSet:
    """Every image of the manifest, or a seeded random sample of ``max_images``; PipelineFileError when absent."""
    prep = wf.file("prep")
    if not os.path.isdir(prep):
        raise PipelineFileError(f"{prep}: no preprocessed batches (run_all.sh's preprocess step); nothing written")
    manifest = batches.require_complete_manifest(prep)
    if manifest["batch_size"] != wf.batch_size:
        raise PipelineFileError(f"{prep}: holds batches of {manifest['batch_size']}, not {wf.batch_size}")
    names, locations = [], []
    for entry in manifest["batches"]:
        path = os.path.join(prep, entry["file"])
        names += entry["images"]
        locations += [(path, row) for row in range(len(entry["images"]))]
    if not names:
        raise PipelineFileError(f"{prep}: the manifest lists no images")
    sample, total = "all", len(names)
    if max_images is not None and max_images < total:
        chosen = fidelity_screen.seeded_sample(names, max_images, seed)
        names, locations = [names[i] for i in chosen], [locations[i] for i in chosen]
        sample = {"size": len(names), "seed": seed, "of": total}
    size = manifest.get("image_size", batches.IMAGE_SIZE)
    found = labels.read_labels(wf.label_file).match(names) if with_labels else None
    classes = np.array([found[n] for n in names], dtype=np.int64) if with_labels else None
    return ImageSet(names, classes, locations, total, sample, size)


# ---------------------------------------------------------------- the made models

def make_guide(src: str, dst: str, batch_size: int) -> dict[str, int]:
    """The guide's own graph (graph_padding.modify_as_guide) of the onnxsim model."""
    import onnx

    model = onnx.load(src)
    result = graph_padding.modify(model, batch_size, guide=True)
    onnx_files.write_model(model, dst)
    return dict(result.counts)


def make_emulation(src: str, dst: str, batch_size: int, keep: keep_dtype.KeepList | None = None) -> dict[str, int]:
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


def read_derived_record(wf: WorkFolder) -> dict[str, dict[str, Any]]:
    """{relative path: how it was made} of the models this report made before."""
    return files.read_json(wf.path(DERIVED_RECORD)) or {}


def _stat(path):
    """Size and mtime of a model's files (its .data file too: new weights can leave the graph file as it was)."""
    return [[st.st_size, st.st_mtime_ns] for st in map(os.stat, onnx_files.model_files(path))]


def ensure_model(wf: WorkFolder, stage: str, record: dict[str, dict[str, Any]]) -> str:
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


def model_digest(path: str) -> str:
    """The content digest of a model's files, as beit_infer.py records it (inference_record.make_record)."""
    return "+".join(fingerprint.file_digest(p) for p in onnx_files.model_files(path))


def inputs_digest(wf: WorkFolder) -> str:
    """The digest of prep_image_bs{N}'s batches as beit_infer.py records it (names, sizes, mtimes, manifest)."""
    prep = wf.file("prep")
    manifest_print = batches.load_manifest(prep).get("fingerprint")
    return inference_record.inputs_digest(batches.list_batch_files(prep), manifest_print)
