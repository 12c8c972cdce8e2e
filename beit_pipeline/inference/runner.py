"""Running an ONNX image model over batch files the way ais_bench runs the .om, on the CPU.

The steps of beit_infer.py, each one function: open the model and check that it is
an image model (ModelInfo), list and check the input batches (InputSet), plan the
output folder against its record (folder.py, record.py), warm up,
time and write the outputs (Timings), then the summaries (summary.py).

Input files and model batches follow ais_bench (io_oprations.py): a file holds one
model batch, or, where every file holds the same smaller number of images that divides
the model's batch, ``batch / rows`` files are joined into one model batch (the last
group padded with its own first file) and the output is split back along
``--output_batchsize_axis``, one output file per input file, none for the padding.
The manifest's row -> image mapping stays exact because each output file still holds
its own input file's rows.  Files of different sizes, which ais_bench would join and
split wrongly, are refused; every file is checked before anything is written.

``--loop N`` runs each batch N times back to back, every run timed, and writes the
outputs once, as ais_bench's session loop does (ModelInferenceProcessor.cpp: ``Execute``
``loop`` times per input).  The engine (ONNX Runtime or OpenVINO) and the precision come
from engines.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Optional

import numpy as np

from beit_pipeline import files
from beit_pipeline.cli import LOGGER_NAME, check
from beit_pipeline.errors import InferError
from beit_pipeline.inference import engines
from beit_pipeline.inference import folder as folders
from beit_pipeline.inference import options as inference_options
from beit_pipeline.inference import outputs as output_files
from beit_pipeline.inference import record as records
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.inference import summary as summaries
from beit_pipeline.preprocess import batches as batch_files

if TYPE_CHECKING:
    import argparse

    import onnxruntime

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


# ---------------------------------------------------------------- the model

@dataclasses.dataclass
class ModelInfo:
    """What the run needs to know about the model, read from its ONNX Runtime session."""

    path: str
    input_name: str
    input_dtype: type
    input_shape: list  # as ONNX Runtime reports it: ints, or names / None for dynamic axes
    static_batch: object  # int, or None for a dynamic batch axis
    image_size: int
    num_classes: object  # int, or None when the output's last axis is dynamic
    output_names: list
    provider: str  # the execution provider that really runs
    engine: str = "onnxruntime"  # onnxruntime / openvino
    precision: str = "fp32"  # the precision that really runs
    instructions: list = dataclasses.field(default_factory=list)  # CPU instruction sets a reduced precision uses

    def feed(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {self.input_name: batch.astype(self.input_dtype, copy=False)}


def check_image_model(session: onnxruntime.InferenceSession | engines.OpenVinoSession, path: str) -> None:
    """Refuse a model that is not one (N, 3, H, W) square-image input: the batch files hold nothing else."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InferError(f"{path}: the model has {len(inputs)} inputs; beit_infer.py runs "
                         "image models with one (N, 3, H, W) input")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1] != 3:
        raise InferError(f"{path}: input '{inputs[0].name}' has shape {shape}, expected (N, 3, H, W)")
    if isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] != shape[3]:
        raise InferError(f"{path}: input '{inputs[0].name}' is {shape[2]}x{shape[3]}; "
                         "the batch files hold square images")


def _static(dim):
    return dim if isinstance(dim, int) and dim > 0 else None


def describe_model(session: onnxruntime.InferenceSession | engines.OpenVinoSession, path: str) -> ModelInfo:
    """ModelInfo of an open session (checked with check_image_model)."""
    check_image_model(session, path)
    meta = session.get_inputs()[0]
    out_shape = session.get_outputs()[0].shape
    return ModelInfo(path=path, input_name=meta.name, input_dtype=_ORT_TYPES.get(meta.type, np.float32),
                     input_shape=list(meta.shape), static_batch=_static(meta.shape[0]),
                     image_size=_static(meta.shape[2]) or batch_files.IMAGE_SIZE,
                     num_classes=_static(out_shape[-1]) if out_shape else None,
                     output_names=[o.name for o in session.get_outputs()], provider=session.get_providers()[0])


_OV_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}


def open_model(path: str, providers: str | None = "cpu", device: int = 0, threads: int = 0,
               precision: str = "fp32") -> tuple[onnxruntime.InferenceSession | engines.OpenVinoSession, ModelInfo]:
    """(session, ModelInfo) of an image model, through the pipeline's one session factory.

    ``providers`` None picks the engine (engines.choose_engine); the precision that
    OpenVINO reports it compiled for must be the one asked for, else the run is refused.
    """
    choice = engines.choose_engine(providers, precision)
    session = onnx_models.open_session(path, choice.providers, device, threads, precision)
    model = describe_model(session, path)
    model.engine, model.instructions = choice.engine, choice.instructions
    if choice.engine == "openvino":
        ran = _OV_PRECISIONS.get(session.precision_ran, session.precision_ran)
        if ran != precision:
            raise InferError(f"{path}: OpenVINO compiled the model for {ran}, not the --precision {precision} asked for")
    model.precision = precision
    log.info(f"engine:{engines.engine_version(choice.engine)} ({choice.reason}), precision:{precision}"
             + (f" on the CPU's {', '.join(choice.instructions)} instructions" if choice.instructions else ""))
    return session, model


def expected_batch(model: ModelInfo, batchsize: int | None, dynamic: int | None = None) -> int | None:
    """The batch every file must hold: the model's static batch, else the one ais_bench's dynamic flags chose
    (``dynamic``) or --batchsize, else None (each file's)."""
    if model.static_batch is not None and batchsize is not None and batchsize != model.static_batch:
        raise InferError(f"--batchsize {batchsize} does not match the model {model.path}, whose batch is "
                         f"{model.static_batch} (input '{model.input_name}' shape {model.input_shape})",
                         exit_code=2)
    if dynamic is not None and batchsize is not None and batchsize != dynamic:
        raise InferError(f"--batchsize {batchsize} and the dynamic batch {dynamic} chosen by --dymBatch / --dymDims "
                         "/ --dymShape differ: give one", exit_code=2)
    return model.static_batch or dynamic or batchsize


def model_batch(args: argparse.Namespace, model: ModelInfo) -> tuple[int | None, bool]:
    """(the batch every file must hold or None, whether files run unjoined: ais_bench's auto_set_* modes)."""
    auto = inference_options.auto_shape_mode(args, model)
    batch = expected_batch(model, args.batchsize, inference_options.dynamic_batch(args, model))
    if args.batchsize is None and batch is not None:
        log.info(f"try get model batchsize:{batch}")  # ais_bench's line (set_session_options)
    return batch, auto


# ---------------------------------------------------------------- the input batches

@dataclasses.dataclass
class InputSet:
    files: list  # batch file paths, in order
    stems: list  # ais_bench's output stems (basename up to its first dot)
    rows: list  # images in each file
    manifest_print: object  # the manifest's image-set fingerprint, or None
    files_per_batch: int = 1  # files joined into one model batch (ais_bench's filesperbatch)
    real: Optional[list] = None  # real images in each file, from the manifest (None: no manifest)

    def groups(self) -> list[list[int]]:
        """Indices of the files of each model batch, in order (the last group may be short: padded when run)."""
        n, k = len(self.files), self.files_per_batch
        return [list(range(start, min(start + k, n))) for start in range(0, n, k)]

    def real_in(self, group: Iterable[int]) -> int:
        """Real images in a model batch made of ``group`` (the copies that pad a short group never count)."""
        return sum((self.real or self.rows)[i] for i in group)


def output_stem(path: str) -> str:
    """ais_bench's rule: the basename up to its first dot (``input_00000.bin`` -> ``input_00000``)."""
    return os.path.basename(path).split(".")[0]


output_name = folders.output_name


def _natural_key(path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", os.path.basename(path))]


def list_folder(folder: str) -> list[str]:
    """The batch files of a folder: beit_preprocess.py's, else any .bin/.npy in natural order (as ais_bench)."""
    found = batch_files.list_batch_files(folder)
    if not found:
        found = sorted((os.path.join(folder, n) for n in os.listdir(folder)
                        if n.lower().endswith((".bin", ".npy")) and os.path.isfile(os.path.join(folder, n))),
                       key=_natural_key)
    if not found:
        raise InferError(f"{folder}: no batch files (.bin or .npy) in the input folder (was beit_preprocess.py run?)")
    return found


def list_inputs(spec: str) -> list[str]:
    """The batch files named by --input: a folder, or comma-separated files as ais_bench takes them."""
    parts = [p for p in spec.split(",") if p]
    check(parts, "--input is empty")
    if len(parts) == 1 and os.path.isdir(parts[0]):
        return list_folder(parts[0])
    for p in parts:
        check(not os.path.isdir(p), f"--input {p}: this model has one input, so give one folder "
                                    "or a comma-separated list of files")
        check(os.path.isfile(p), f"--input {p}: no such file")
        check(p.lower().endswith((".bin", ".npy")), f"--input {p}: not a .bin or .npy batch file")
    stems = [output_stem(p) for p in parts]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    check(not dup, f"--input: several files would write the same output ({', '.join(dup)})")
    return parts


def finished_manifest_print(spec: str | None) -> str | None:
    """Refuse an input folder whose manifest says beit_preprocess.py did not finish; its fingerprint or None.

    A folder without a manifest (plain ais_bench input, not ours) is not checked;
    neither is a list of files.
    """
    manifest = records.manifest_of(spec)
    return manifest.get("fingerprint") if manifest else None


def files_per_batch(rows: Sequence[int], expected: int | None) -> int:
    """ais_bench's filesperbatch: model batch / the first file's rows, where that divides; else 1."""
    if expected is None or not rows or rows[0] >= expected or expected % rows[0]:
        return 1
    return expected // rows[0]


def real_images(spec: str | None, paths: Sequence[str], rows: Sequence[int]) -> list[int] | None:
    """Real images of each file, from the manifest of the input folder; None without one."""
    manifest = records.manifest_of(spec)
    if manifest is None:
        return None
    real = {os.path.splitext(b["file"])[0]: b["real"] for b in manifest["batches"]}
    return [real.get(output_stem(p), n) for p, n in zip(paths, rows)]


def log_files_per_batch(paths: Sequence[str], rows: Sequence[int], model: ModelInfo, expected: int | None,
                        per_batch: int) -> None:
    """ais_bench's line (io_oprations.py get_files_count_per_batch): the first file's and the input's bytes."""
    size0 = rows[0] * batch_files.image_nbytes(model.image_size)
    tensor0 = (expected or rows[0]) * batch_files.image_nbytes(model.image_size)
    log.info(f"get filesperbatch files0 size:{size0} tensor0size:{tensor0} filesperbatch:{per_batch} "
             f"runcount:{-(-len(paths) // per_batch)}")


def load_inputs(spec: str, model: ModelInfo, expected: int | None, join: bool = True) -> InputSet:
    """Check every batch file against the model before anything is written: a mismatch half way
    through would leave a folder of outputs that looks complete to a later step.  ``join`` False:
    each file is its own batch (ais_bench's auto_set_* modes, a dynamic model)."""
    manifest_print = finished_manifest_print(spec)
    paths = list_inputs(spec)
    rows = [batch_files.batch_rows(path, model.image_size) for path in paths]
    per_batch = files_per_batch(rows, expected) if join else 1
    for path, n in zip(paths, rows):
        if expected is not None and join and n * per_batch != expected:
            joined = (f"; ais_bench joins {per_batch} files of {rows[0]} images into one batch, so every file "
                      f"must hold {rows[0]}") if per_batch > 1 else ""
            raise InferError(f"{path}: holds a batch of {n} images but the model {os.path.basename(model.path)} "
                             f"takes batches of {expected} (input '{model.input_name}' shape {model.input_shape})"
                             f"{joined}; preprocess with --batch_size {expected} or export the model for batch {n}")
    log_files_per_batch(paths, rows, model, expected if join else None, per_batch)
    return InputSet(files=paths, stems=[output_stem(p) for p in paths], rows=rows, manifest_print=manifest_print,
                    files_per_batch=per_batch, real=real_images(spec, paths, rows))


# ---------------------------------------------------------------- running

def timed_run(session: onnxruntime.InferenceSession | engines.OpenVinoSession, model: ModelInfo, batch: np.ndarray,
              timings: summaries.Timings, real: int | None = None) -> list[np.ndarray]:
    """One engine run, timed into ``timings`` (``real``: the real images in it); returns the outputs."""
    start = time.perf_counter()
    outs = session.run(model.output_names, model.feed(batch))
    timings.add((time.perf_counter() - start) * 1000.0, batch.shape[0], real)
    log.debug(f"run {len(timings.times_ms)}: batch {batch.shape[0]}, {timings.times_ms[-1]:.3f} ms")
    return outs


def warm_up(session: onnxruntime.InferenceSession | engines.OpenVinoSession, model: ModelInfo, batch: np.ndarray,
            count: int) -> None:
    for _ in range(count):
        session.run(model.output_names, model.feed(batch))
    log.info(f"warm up {count} done")


PURE_STEM = "pure_infer_data"  # ais_bench's name for the input of a run without --input


def pure_batch(model: ModelInfo, batch_size: int, data_type: str) -> np.ndarray:
    """ais_bench's pure-inference input: zeros by default; ``random``: a seeded standard-normal batch
    (ais_bench fills random bytes, which as float32 are mostly huge or NaN; normal values time the same)."""
    shape = (batch_size, 3, model.image_size, model.image_size)
    if data_type == "random":
        return np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return np.zeros(shape, dtype=np.float32)


def run_pure(session: onnxruntime.InferenceSession | engines.OpenVinoSession, model: ModelInfo,
             args: argparse.Namespace, batch_size: int,
             out_dir: str | None = None) -> tuple[summaries.Timings, list[str]]:
    """ais_bench without --input: time the pure batch ``--loop`` times; with an output folder, write the
    outputs of the last run as ``pure_infer_data_<k>.<fmt>``, as ais_bench does.  (timings, output paths)."""
    from beit_pipeline import progress  # issue 21: plain lines when stderr is a log

    batch = pure_batch(model, batch_size, args.pure_data_type)
    warm_up(session, model, batch, args.warmup_count)
    timings = summaries.Timings()
    for _ in progress.bar(range(args.loop), desc="Inference pure", file=sys.stderr, disable=args.no_progress):
        outs = timed_run(session, model, batch, timings)
    written = []
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        log.info(f"output path:{out_dir}")
        for k, out in enumerate(outs):
            path = os.path.join(out_dir, f"{PURE_STEM}_{k}.{args.outfmt.lower()}")
            with files.naming_errors(path):
                output_files.write_output(path, out, args.outfmt.lower())
            written.append(path)
    return timings, written


def write_outputs(plan: folders.InferencePlan, i: int, outs: Iterable[np.ndarray]) -> None:
    for k, out in enumerate(outs):
        path = plan.output_path(i, k)
        with files.naming_errors(path):
            output_files.write_output(path, out, plan.fmt)


def join_group(read: Callable[[int], np.ndarray], group: Sequence[int], per_batch: int) -> np.ndarray:
    """One model batch from the files of ``group``, padded with its first file (ais_bench's padding file)."""
    if per_batch == 1:
        return read(group[0])
    arrays = [read(i) for i in group]
    arrays += [arrays[0]] * (per_batch - len(group))
    return np.concatenate(arrays, axis=0)


def split_outputs(outs: Sequence[np.ndarray], per_batch: int, axis: int) -> list[list[np.ndarray]]:
    """Each output split into ``per_batch`` equal parts along ``axis`` (ais_bench's save_tensors_to_file)."""
    parts = []
    for k, out in enumerate(outs):
        if axis >= out.ndim or out.shape[axis] % per_batch:
            raise InferError(f"output {k} has shape {out.shape}: cannot split it into {per_batch} files along "
                             f"--output_batchsize_axis {axis}")
        parts.append(np.split(out, per_batch, axis=axis) if per_batch > 1 else [out])
    return [[p[j] for p in parts] for j in range(per_batch)]


def planned_groups(plan: folders.InferencePlan) -> list[list[int]]:
    """The groups of files with at least one output to write (all of a group runs: it is one batch)."""
    todo = set(plan.todo)
    return [g for g in plan.inputs.groups() if todo.intersection(g)]


def run_files(session: onnxruntime.InferenceSession | engines.OpenVinoSession, model: ModelInfo,
              plan: folders.InferencePlan, args: argparse.Namespace) -> summaries.Timings:
    """Run each planned batch ``--loop`` times back to back (each run timed) and write its outputs once."""
    from beit_pipeline import progress  # issue 21: plain lines when stderr is a log

    timings = summaries.Timings()
    groups, per_batch, todo = planned_groups(plan), plan.inputs.files_per_batch, set(plan.todo)
    if not groups:
        return timings  # every output is already there: nothing to run, nothing to read
    read = lambda i: batch_files.read_batch(plan.inputs.files[i], image_size=model.image_size)  # noqa: E731
    first = join_group(read, groups[0], per_batch)
    warm_up(session, model, first, args.warmup_count)
    with progress.bar(total=len(groups), desc="Inference", unit="batch", file=sys.stderr, disable=args.no_progress) as bar:
        for n, group in enumerate(groups):
            batch = first if n == 0 else join_group(read, group, per_batch)
            for _ in range(args.loop):
                outs = timed_run(session, model, batch, timings, plan.inputs.real_in(group))
            if plan.out_dir is not None:
                for i, file_outs in zip(group, split_outputs(outs, per_batch, args.output_batchsize_axis)):
                    if i in todo:
                        write_outputs(plan, i, file_outs)
                        timings.written.append(i)
            bar.update(1)
    return timings


# ---------------------------------------------------------------- the whole run

def check_arguments(args: argparse.Namespace) -> str | None:
    """Flag values and path arguments (exit 2), before the model is opened; the output folder (or None)."""
    check(args.batchsize is None or args.batchsize >= 1, "--batchsize must be positive")
    check(args.output is not None or args.output_dirname is None, "--output_dirname needs --output (as in ais_bench)")
    check(not (args.resume and args.overwrite), "--resume keeps outputs and --overwrite recomputes them: give one")
    check(not args.resume or args.output_dirname is not None,
          "--resume needs --output_dirname (the folder of the run to resume)")
    check(os.path.isfile(args.model), f"--model {args.model}: model not found" if not os.path.exists(args.model)
          else f"--model {args.model}: is not a file")
    if args.input is not None and "," not in args.input:
        check(os.path.exists(args.input), f"--input {args.input}: no such folder or file")
    if args.output is not None:
        check(not os.path.exists(args.output) or os.path.isdir(args.output),
              f"--output {args.output}: exists and is not a folder")
    out_dir = folders.output_dir(args)
    if args.output_dirname is not None:
        check(args.output_dirname not in ("", ".", ".."), f"--output_dirname {args.output_dirname!r}: give a folder name")
        check(not os.path.exists(out_dir) or os.path.isdir(out_dir), f"{out_dir}: exists and is not a folder")
    if args.input is not None and out_dir is not None:
        folders.refuse_folder_holding_inputs(out_dir, args.input, list_inputs(args.input))
    return out_dir


def run_with_inputs(session: onnxruntime.InferenceSession | engines.OpenVinoSession, model: ModelInfo,
                    args: argparse.Namespace, inputs: InputSet, out_dir: str | None,
                    expected: int | None) -> tuple[folders.InferencePlan, summaries.Timings]:
    """Files mode: plan the output folder (under its lock when there is one), run, write."""
    if out_dir is None:
        plan = folders.InferencePlan(inputs, None, args.outfmt.lower(), len(model.output_names),
                                     todo=list(range(len(inputs.files))), kept=[])
    else:
        new = records.make_record(model.path, inputs.files, inputs.manifest_print, args.outfmt,
                                  len(model.output_names), expected, model.engine, model.precision,
                                  input_spec=args.input, outputs=plan_names(inputs, args.outfmt, model))
        plan = folders.prepare(args, model, inputs, out_dir, new)
        log.info(f"output path:{out_dir}")
    log.info(f"provider:{model.provider}")
    if plan.kept:
        log.info(f"resume: {len(plan.kept)} of {len(inputs.files)} outputs already in {out_dir}; "
                 f"running the other {len(plan.todo)}")
    return plan, run_files(session, model, plan, args)


def plan_names(inputs: InputSet, outfmt: str, model: ModelInfo) -> list[str]:
    return [output_name(stem, k, outfmt) for stem in inputs.stems for k in range(len(model.output_names))]


def run_one_device(args: argparse.Namespace) -> summaries.RunSummary:
    """One device's run (``args.device`` an int); devices.run_inference chooses it or one per device."""
    out_dir = check_arguments(args)
    if getattr(args, "debug", False):
        logging.getLogger(LOGGER_NAME).setLevel(logging.DEBUG)  # the package's logger: setup_logging resets it
    session, model = open_model(args.model, args.providers, args.device, args.engine_threads, args.precision)
    log.debug(f"session info: inputs {[(i.name, i.shape, i.type) for i in session.get_inputs()]}, "
              f"outputs {[(o.name, o.shape, o.type) for o in session.get_outputs()]}, provider {model.provider}")
    expected, auto = model_batch(args, model)
    inputs = load_inputs(args.input, model, expected, join=not auto) if args.input is not None else None
    lock = files.FolderLock(out_dir, f"output folder {out_dir}", wait=args.wait_lock) if out_dir else None
    with lock or contextlib.nullcontext():
        previous = summaries.read_previous(out_dir)
        plan, pure = None, ()
        if inputs is not None:
            plan, timings = run_with_inputs(session, model, args, inputs, out_dir, expected)
        else:
            log.info(f"provider:{model.provider}")
            timings, pure = run_pure(session, model, args, expected or 1, out_dir)
        result = summaries.RunSummary(summaries.ais_bench_summary(args, plan, timings, pure),
                                      summaries.our_summary(args, model, plan, timings, previous))
        result.ours["batchsize"] = report_batch(timings, expected, inputs)
        if out_dir is not None:
            summaries.write_summaries(result, out_dir)
    return result


def report_batch(timings: summaries.Timings, expected: int | None, inputs: InputSet | None) -> float:
    """ais_bench's batchsize of the throughput formula: the timed runs' mean, else the model's batch."""
    if timings.batch_sizes:
        return float(np.mean(timings.batch_sizes))
    return float(expected or (inputs.rows[0] if inputs is not None else 1))
