"""Running the fidelity report's stages on chosen images, and the base they are screened against.

A StageRunner holds one stage's logits for the images it ran ({image index: row}) and computes
more on demand, in model batches of the run's batch size gathered from any batch files (zero rows
pad a static model's last batch).  Its model is loaded on first need and dropped by close();
what it computes also goes to the stage's LogitStore (fidelity_logits_bs{N}/<stage>/), so a
rerun, or an interrupted report run again, computes only what is missing.  The om stage is read
from ais_bench's output files instead (OutputReader).

The base (fidelity_screen.py) is the run's own fp32 logits of the graph_modify model: the
outputs beit_infer.py wrote in ais_out/bs{N} when its record says fp32, that model, and these
very batches; otherwise graph_modify is run here on every image (ONNX Runtime fp32), kept in
its LogitStore, and then is also that stage's own full run.
"""

import dataclasses
import os
import time

import numpy as np

from beit_pipeline import fingerprint, inference_record, onnx_models
from beit_pipeline import outputs as output_files
from beit_pipeline.cli import log
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation import summary_output_dtype
from beit_pipeline.fidelity import (CPU_PRECISION_STAGES, FILE_STAGES, ImageSet, Options, WorkFolder, ensure_model,
                                    inputs_digest, model_digest, read_derived_record)
from beit_pipeline.logit_store import LogitStore

PROGRESS_SECONDS = 30.0


def _torch_model(checkpoint):
    import torch

    from beit_pipeline import model as beit_model

    model = beit_model.build_model(beit_model.load_state_dict(checkpoint))[0]

    def run(batch):
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
    return run, False  # (run, static batch?)


def _onnx_model(path, providers="cpu", precision="fp32"):
    session = onnx_models.open_session(path, providers, precision=precision)
    static = isinstance(session.get_inputs()[0].shape[0], int)
    return (lambda batch: onnx_models.run_session(session, batch, path)), static


def read_image(path: str, row: int, size: int) -> np.ndarray:
    """One image of a batch file: a .bin row read at its offset (the screen's run sets are sparse: reading
    whole batches for one image each would read 8 times the data), a .npy through its memory map."""
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")[row]
    count = 3 * size * size
    image = np.fromfile(path, dtype=np.float32, count=count, offset=row * count * 4)
    if image.size != count:
        raise PipelineFileError(f"{path}: too short for row {row} of {size}x{size} images")
    return image.reshape(3, size, size)


class StageRunner:
    """One stage's logits for the images it ran on ({image index: row}), computed on demand in model batches.

    The model is loaded on first need and dropped by close(); what it computes is also kept in the
    stage's LogitStore, so a rerun (or an interrupted run resumed) computes only what is missing.
    """

    reads_files = False  # True: its logits are read from files for every image, not run

    def __init__(self, wf, stage, images, record, options):
        self.wf, self.stage, self.images, self.record, self.options = wf, stage, images, record, options
        self.logits, self.reused = {}, 0
        self.load_seconds = self.run_seconds = 0.0
        self.source = ""
        self._model = self._stored = self._store = None

    def _open(self):
        """The model's (run, static) pair and the path or checkpoint it runs; loads it."""
        start = time.perf_counter()
        if self.stage == "pytorch":
            model, self.source = _torch_model(self.wf.checkpoint), self.wf.checkpoint
        else:
            path = ensure_model(self.wf, "graph_modify" if self.stage in CPU_PRECISION_STAGES else self.stage,
                                self.record)
            precision = CPU_PRECISION_STAGES.get(self.stage, "fp32")
            model = _onnx_model(path, "openvino" if self.stage in CPU_PRECISION_STAGES else "cpu", precision)
            self.source = path
        self.load_seconds += time.perf_counter() - start
        return model

    def store_key(self):
        """What makes this stage's logits: the model's content, engine, precision, and the input batches."""
        if self.stage == "pytorch":
            model = fingerprint.file_digest(self.wf.checkpoint)
        else:
            model = model_digest(ensure_model(self.wf, "graph_modify" if self.stage in CPU_PRECISION_STAGES
                                              else self.stage, self.record))
        return {"stage": self.stage, "model": model, "inputs": inputs_digest(self.wf),
                "engine": "openvino" if self.stage in CPU_PRECISION_STAGES else
                "torch" if self.stage == "pytorch" else "onnxruntime",
                "precision": CPU_PRECISION_STAGES.get(self.stage, "fp32"), "batch_size": self.wf.batch_size}

    def ensure(self, indices) -> int:
        """Compute the logits of the images ``indices`` that are not here yet; returns how many were new."""
        todo = sorted(set(int(i) for i in indices) - self.logits.keys())
        if not todo:
            return 0
        if self._store is None:  # its key may make the model (the derived stages): a fixed cost, as loading
            start = time.perf_counter()
            self._store = LogitStore(os.path.join(self.wf.file("logits"), self.stage), self.store_key(),
                                     fresh=self.options.fresh)
            self._stored = self._store.load()
            self.load_seconds += time.perf_counter() - start
        kept = [i for i in todo if self.images.names[i] in self._stored]
        for i in kept:
            self.logits[i] = self._stored[self.images.names[i]]
        self.reused += len(kept)
        todo = [i for i in todo if i not in self.logits]
        if todo:
            self._compute(todo)
        return len(kept) + len(todo)

    def _compute(self, todo):
        if self._model is None:
            self._model = self._open()
        run, static = self._model
        n, done, start, shown = self.wf.batch_size, 0, time.perf_counter(), time.perf_counter()
        try:
            for first in range(0, len(todo), n):
                group = todo[first:first + n]
                out = run(self._assemble(group, n if static else len(group)))[:len(group)]
                for i, row in zip(group, out):
                    self.logits[i] = np.asarray(row, np.float32)
                self._store.add([self.images.names[i] for i in group], out)
                done += len(group)
                if time.perf_counter() - shown > PROGRESS_SECONDS and done < len(todo):
                    rate = done / (time.perf_counter() - start)
                    log.info(f"  {self.stage}: {done}/{len(todo)} images, {rate:.2f} img/s, about "
                             f"{(len(todo) - done) / rate / 60:.0f} min left")
                    shown = time.perf_counter()
        finally:  # Ctrl-C, SIGTERM: what was computed is kept (an atomic chunk), the rerun goes on from it
            self._store.flush()
            self.run_seconds += time.perf_counter() - start

    def _assemble(self, group, rows):
        """One model batch: the images of ``group`` (zero rows after them up to ``rows``)."""
        size = self.images.image_size
        batch = np.zeros((rows, 3, size, size), np.float32)
        for k, i in enumerate(group):
            batch[k] = read_image(*self.images.locations[i], size)
        return batch

    def close(self):
        if self._store is not None:
            self._store.flush()
        self._model = None

    def array(self, indices) -> np.ndarray:
        return np.stack([self.logits[i] for i in indices]) if len(indices) else np.zeros((0, 0), np.float32)


class OutputReader(StageRunner):
    """The om stage: ais_bench's output files, read for every image (nothing to run, nothing to keep)."""

    reads_files = True

    def ensure(self, indices) -> int:
        todo = sorted(set(int(i) for i in indices) - self.logits.keys())
        if not todo:
            return 0
        start, folder = time.perf_counter(), self.wf.file("om")
        found, by_file = output_files.find_outputs(folder), {}
        for i in todo:
            by_file.setdefault(self.images.locations[i][0], []).append(i)
        for path, group in by_file.items():
            stem = os.path.splitext(os.path.basename(path))[0]
            if stem not in found:
                raise PipelineFileError(f"{folder}: no output for {os.path.basename(path)}")
            # An OM whose output atc left in fp16 writes fp16 BIN files: the summary's dtype, else whole batches
            rows = output_files.read_output(found[stem], batch_size=self.wf.batch_size,
                                            dtype=summary_output_dtype(folder))
            for i in group:
                self.logits[i] = rows[self.images.locations[i][1]]
        self.source, self.run_seconds = folder, self.run_seconds + time.perf_counter() - start
        return len(todo)


def make_runner(wf: WorkFolder, stage: str, images: ImageSet, record: dict, options: Options) -> StageRunner:
    return (OutputReader if stage in FILE_STAGES else StageRunner)(wf, stage, images, record, options)


# ---------------------------------------------------------------- the base

@dataclasses.dataclass
class Base:
    """fp32 logits of the graph_modify model for every image: what the screen measures stages against."""
    logits: np.ndarray
    source: str  # where they came from, for the report
    stage: str = None  # the stage whose own full run they are (then it ran on every image)


def base_refusal(wf: WorkFolder, record: inference_record.OutputRecord) -> str:
    """Why ais_out/bs{N} cannot be the base (None when it can): it must be beit_infer.py's fp32 run of the
    graph_modify model on exactly these batches, as its record says."""
    if record is None:
        return "no beit_infer.py record there (ais_bench's outputs, or none)"
    if record.precision != "fp32":
        return f"its outputs are {record.engine} {record.precision}, not fp32"
    if record.outputs_per_batch != 1:
        return f"the model that wrote them has {record.outputs_per_batch} outputs"
    if not os.path.isfile(wf.file("graph_modify")) or record.model != model_digest(wf.file("graph_modify")):
        return f"they were not made by {wf.files()['graph_modify']}"
    if record.inputs != inputs_digest(wf):
        return f"they were made from other batches than {wf.files()['prep']}"
    return None


def outputs_base(wf: WorkFolder, images: ImageSet) -> "Base":
    """The Base from the run's own fp32 outputs in ais_out/bs{N}, or None (logged why) when unusable."""
    folder = wf.file("om")
    if not os.path.isdir(folder):
        return None
    record = inference_record.read_record(folder)
    why = base_refusal(wf, record)
    found = output_files.find_outputs(folder) if why is None else {}
    stems = {os.path.splitext(os.path.basename(p))[0] for p, _ in images.locations}
    if why is None and not stems <= found.keys():
        why = f"{len(stems - found.keys())} batches have no output there"
    if why is not None:
        log.info(f"base: not {wf.files()['om']}: {why}")
        return None
    log.info(f"base: reading {len(stems)} output files of {wf.files()['om']} ({record.engine} {record.precision})")
    reader = OutputReader(wf, "om", images, None, None)
    reader.ensure(range(len(images.names)))
    source = f"{wf.files()['om']} ({record.engine} {record.precision}, beit_infer.py)"
    return Base(reader.array(range(len(images.names))), source)


def find_base(wf: WorkFolder, images: ImageSet, runners: dict) -> Base:
    """The run's own fp32 outputs when they qualify, else graph_modify run on every image (kept on disk)."""
    found = outputs_base(wf, images)
    if found is not None:
        return found
    runner = runners.get("graph_modify") or make_runner(wf, "graph_modify", images, read_derived_record(wf),
                                                        runners["pytorch"].options)
    log.info(f"base: running {wf.files()['graph_modify']} (ONNX Runtime fp32) on all {len(images.names)} images, "
             f"kept in {wf.files()['logits']}/graph_modify")
    everything = range(len(images.names))
    runner.ensure(everything)
    runner.close()
    source = f"{wf.files()['graph_modify']} (onnxruntime fp32, run here; {wf.files()['logits']}/graph_modify)"
    return Base(runner.array(everything), source, stage="graph_modify")


