"""Running the fidelity report's stages on chosen images, and the base they are screened against.

A StageRunner holds one stage's logits for the images it ran ({image index: row}) and computes
more on demand, in model batches of the run's batch size gathered from any batch files (zero rows
pad a static model's last batch).  Its model is loaded on first need and dropped by close();
what it computes also goes to the stage's LogitStore (fidelity_logits_bs{N}/<stage>/), so a
rerun, or an interrupted report run again, computes only what is missing.  The om stage is read
from ais_bench's output files instead (OutputReader); the emulated stages run their emulation
with saturation probes and keep the values clamped beside the logits (EmulatedRunner).

The base (screen.py) is the run's own fp32 logits of the graph_modify model: the
outputs beit_infer.py wrote in ais_out/bs{N} when its record says fp32, that model, and these
very batches; otherwise graph_modify is run here on every image (ONNX Runtime fp32), kept in
its LogitStore, and then is also that stage's own full run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from beit_pipeline import fingerprint
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation.accuracy import summary_output_dtype
from beit_pipeline.fidelity import fp16_overflow, keep_dtype, om_emulation
from beit_pipeline.fidelity.logit_store import LogitStore
from beit_pipeline.fidelity.stages import (
    CPU_PRECISION_STAGES,
    DERIVED,
    FILE_STAGES,
    ImageSet,
    Options,
    WorkFolder,
    ensure_model,
    inputs_digest,
    model_digest,
    read_derived_record,
)
from beit_pipeline.graph import onnx_files
from beit_pipeline.inference import outputs as output_files
from beit_pipeline.inference import record as inference_record
from beit_pipeline.inference import sessions as onnx_models

log = logging.getLogger(__name__)

PROGRESS_SECONDS = 30.0
SATURATION_SUFFIX = "_saturation"  # fidelity_logits_bs{N}/<stage>_saturation/: an emulated stage's clamp counts


def _torch_model(checkpoint):
    import torch

    from beit_pipeline.model import build as beit_model

    model = beit_model.build_model(beit_model.load_state_dict(checkpoint))[0]

    def run(batch):
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(batch))).numpy()
    return run, False  # (run, static batch?)


def _onnx_model(path, providers="cpu", precision="fp32", every_output=False):
    """(run, static batch?) of an ONNX file; ``run(batch)`` gives the first output (``every_output``: all)."""
    session = onnx_models.open_session(path, providers, precision=precision)
    static = isinstance(session.get_inputs()[0].shape[0], int)
    return (lambda batch: onnx_models.run_session(session, batch, path, every_output)), static


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


class ImageRows:
    """Some images of an ImageSet as an (N, 3, S, S) array read on demand (fp16_overflow runs its emulations on
    it in batches, so that --suggest_keep_dtype holds no more than a batch of pixels): a slice reads those rows,
    an index array gives the ImageRows of those images."""

    def __init__(self, images: ImageSet, indices: Sequence[int] | np.ndarray):
        self.images, self.indices = images, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple:
        size = self.images.image_size
        return (len(self.indices), 3, size, size)

    def __getitem__(self, key):
        if not isinstance(key, slice):
            return ImageRows(self.images, self.indices[np.asarray(key, dtype=np.int64)])
        chosen = self.indices[key]
        out = np.empty((len(chosen),) + self.shape[1:], np.float32)
        for k, i in enumerate(chosen):
            out[k] = read_image(*self.images.locations[i], self.images.image_size)
        return out


class StageRunner:
    """One stage's logits for the images it ran on ({image index: row}), computed on demand in model batches.

    The model is loaded on first need and dropped by close(); what it computes is also kept in the
    stage's LogitStore, so a rerun (or an interrupted run resumed) computes only what is missing.
    """

    reads_files = False  # True: its logits are read from files for every image, not run

    def __init__(self, wf: WorkFolder, stage: str, images: ImageSet, record: dict[str, dict[str, Any]] | None,
                 options: Options | None):
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

    def store_key(self) -> dict[str, str | int]:
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

    def ensure(self, indices: Iterable[int]) -> int:
        """Compute the logits of the images ``indices`` that are not here yet; returns how many were new."""
        todo = sorted(set(int(i) for i in indices) - self.logits.keys())
        if not todo:
            return 0
        if self._store is None:  # its key may make the model (the derived stages): a fixed cost, as loading
            start = time.perf_counter()
            self._open_stores()
            self.load_seconds += time.perf_counter() - start
        kept = [i for i in todo if self._reuse(i)]
        self.reused += len(kept)
        todo = [i for i in todo if i not in self.logits]
        if todo:
            self._compute(todo)
        return len(kept) + len(todo)

    def _open_stores(self) -> dict:
        """Open the stage's LogitStore (fidelity_logits_bs{N}/<stage>/) and read what it keeps; returns its key."""
        key = self.store_key()
        self._store = LogitStore(os.path.join(self.wf.file("logits"), self.stage), key, fresh=self.options.fresh)
        self._stored = self._store.load()
        return key

    def _reuse(self, i) -> bool:
        """Take image ``i``'s logits from what an earlier run kept; False when it kept none."""
        row = self._stored.get(self.images.names[i])
        if row is None:
            return False
        self.logits[i] = row
        return True

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
                self._keep(group, out)
                done += len(group)
                if time.perf_counter() - shown > PROGRESS_SECONDS and done < len(todo):
                    rate = done / (time.perf_counter() - start)
                    log.info(f"  {self.stage}: {done}/{len(todo)} images, {rate:.2f} img/s, about "
                             f"{(len(todo) - done) / rate / 60:.0f} min left")
                    shown = time.perf_counter()
            self._finish()
        finally:  # Ctrl-C, SIGTERM: what was computed is kept (an atomic chunk), the rerun goes on from it
            self._flush()
            self.run_seconds += time.perf_counter() - start

    def _keep(self, group, out):
        """Keep the logits ``out`` of the images ``group`` on disk (written a chunk at a time)."""
        self._store.add([self.images.names[i] for i in group], out)

    def _finish(self):
        """After the last batch of a _compute: nothing more for a plain stage."""

    def _flush(self):
        self._store.flush()

    def _assemble(self, group, rows):
        """One model batch: the images of ``group`` (zero rows after them up to ``rows``)."""
        size = self.images.image_size
        batch = np.zeros((rows, 3, size, size), np.float32)
        for k, i in enumerate(group):
            batch[k] = read_image(*self.images.locations[i], size)
        return batch

    def close(self) -> None:
        if self._store is not None:
            self._flush()
        self._model = None

    def array(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        return np.stack([self.logits[i] for i in indices]) if len(indices) else np.zeros((0, 0), np.float32)

    def saturated_nodes(self) -> list[dict[str, Any]] | None:
        """fp16 roundings that clamp on the images this stage ran: None, it has no fp16 emulation."""
        return None


class OutputReader(StageRunner):
    """The om stage: ais_bench's output files, read for every image (nothing to run, nothing to keep)."""

    reads_files = True

    def ensure(self, indices: Iterable[int]) -> int:
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


def probe_code_digest() -> str:
    """What decides the clamp counts besides the model: the emulation's and the probes' code."""
    return "+".join(fingerprint.file_digest(m.__file__, "") for m in (om_emulation, fp16_overflow))


class EmulatedRunner(StageRunner):
    """An emulated OM stage (fp16_overflow.EMULATED_STAGES): its logits, and per image the values each fp16
    rounding clamps to +-65504, as the 310P saturates an overflow.

    It runs the emulation with peak probes (om_emulation.emulate(probes=True): per image, each
    rounding's largest and smallest value) in place of the plain model file, so the emulation runs
    once.  The probes only read tensors: the logits are the plain model's bit for bit (tested), and
    the LogitStore's key, the plain file's digest, still says what made them.  The images where a
    probe saw a clamp run a second time, through the emulation with count probes for those roundings
    only (fp16_overflow.ClampCounter: exact counts).  The counts are kept beside the logits in a second
    LogitStore (<stage>_saturation/, the same key plus the probing code's digest); an image counts as
    kept only when both stores hold it, so a rerun that reuses the logits still reports saturation.
    """

    def __init__(self, wf: WorkFolder, stage: str, images: ImageSet, record: dict[str, dict[str, Any]] | None,
                 options: Options | None):
        super().__init__(wf, stage, images, record, options)
        self.clamps = {}  # image index: values clamped per rounding (one per Rounding of the emulation)
        self._emulation = self._flags = self._clamp_store = self._stored_clamps = self._scratch = None
        self._pending = {}  # image index: its clamp flags, until _finish counts them

    def emulation(self) -> om_emulation.Emulation:
        """The probed emulation of the stage's source model with its keep list (made on first need)."""
        if self._emulation is None:
            import onnx

            src = ensure_model(self.wf, DERIVED[self.stage][0], self.record)
            keep, _ = keep_dtype.for_stage(self.wf.keep_dtype, self.stage)
            self._emulation = om_emulation.emulate(onnx.load(src), keep, probes=True)
        return self._emulation

    def _scratch_folder(self) -> str:
        """A temporary folder for the probed models, in the stage's store folder (a leftover is removed there)."""
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix=".", suffix=".tmp",
                                             dir=os.path.join(self.wf.file("logits"), self.stage))
        return self._scratch

    def _open(self):
        start = time.perf_counter()
        self.source = ensure_model(self.wf, self.stage, self.record)  # the plain model: what the key names
        emulation = self.emulation()
        path = os.path.join(self._scratch_folder(), f"{self.stage}_probed.onnx")
        onnx_files.save_model(emulation.model, path)
        run, static = _onnx_model(path, "cpu", "fp32", every_output=True)
        outputs = [o.name for o in emulation.model.graph.output]

        def probed(batch):
            values = run(batch)
            probes = {n: fp16_overflow.per_image(v, len(batch)) for n, v in zip(outputs[1:], values[1:])}
            self._flags = fp16_overflow.clamp_flags(emulation, probes, len(batch))
            return values[0]
        self.load_seconds += time.perf_counter() - start
        return probed, static

    def _open_stores(self) -> dict:
        key = super()._open_stores()
        self._clamp_store = LogitStore(os.path.join(self.wf.file("logits"), self.stage + SATURATION_SUFFIX),
                                       {**key, "values": "fp16 values clamped per rounding",
                                        "code": probe_code_digest()}, fresh=self.options.fresh)
        self._stored_clamps = self._clamp_store.load()
        return key

    def _reuse(self, i) -> bool:
        row = self._stored_clamps.get(self.images.names[i])
        if row is None or not super()._reuse(i):
            return False
        self.clamps[i] = row
        return True

    def _keep(self, group, out):
        super()._keep(group, out)
        clean = []
        for k, i in enumerate(group):
            if self._flags[:, k].any():
                self._pending[i] = self._flags[:, k]
            else:
                clean.append(i)
                self.clamps[i] = np.zeros(len(self._flags), np.float32)
        self._clamp_store.add([self.images.names[i] for i in clean], [self.clamps[i] for i in clean])

    def _finish(self):
        """The second pass: exact counts on the images where a probe saw a clamp, for those roundings only."""
        if not self._pending:
            return
        pending, n = sorted(self._pending), self.wf.batch_size
        rows = sorted({int(k) for i in pending for k in np.flatnonzero(self._pending[i])})
        log.info(f"  {self.stage}: fp16 saturates on {len(pending)} images; counting the values clamped")
        counter = fp16_overflow.ClampCounter(self.emulation(), rows,
                                             os.path.join(self._scratch_folder(), f"{self.stage}_counted.onnx"))
        for first in range(0, len(pending), n):
            group = pending[first:first + n]
            counts = np.zeros((len(group), len(self.emulation().roundings)), np.float32)
            counts[:, rows] = counter.count(self._assemble(group, n), len(group)).T
            for i, row in zip(group, counts):
                self.clamps[i] = row
                del self._pending[i]
            self._clamp_store.add([self.images.names[i] for i in group], counts)

    def _flush(self):
        super()._flush()
        self._clamp_store.flush()

    def close(self) -> None:
        super().close()
        self._emulation = None  # its model is the size of the stage's: made again if saturated_nodes needs it
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def clamp_array(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """(images, roundings): the values each rounding clamps on the images ``indices`` (all ran)."""
        return np.stack([self.clamps[i] for i in indices]).astype(np.int64)

    def saturated_nodes(self) -> list[dict[str, Any]]:
        """[SaturatedNode as a dict] of the roundings that clamp on the images this stage ran, in graph order."""
        ran = sorted(self.logits)
        clamped = self.clamp_array(ran).T if ran else np.zeros((0, 0), np.int64)
        if not clamped.any():
            return []
        import onnx

        emulation = self.emulation()
        if len(emulation.roundings) != len(clamped):
            raise PipelineFileError(f"{self.wf.file('logits')}: clamp counts of {len(clamped)} roundings, the "
                                    f"emulation has {len(emulation.roundings)}; run again with --fresh")
        positions = fp16_overflow.readable_positions(onnx.load(ensure_model(self.wf, DERIVED[self.stage][0],
                                                                            self.record)))
        run = fp16_overflow.EmulatedRun(emulation, None, clamped)
        found = fp16_overflow.saturated_nodes(run, [self.images.names[i] for i in ran], positions)
        self._emulation = None
        return [dataclasses.asdict(node) for node in found]


def make_runner(wf: WorkFolder, stage: str, images: ImageSet, record: dict, options: Options) -> StageRunner:
    kind = OutputReader if stage in FILE_STAGES else EmulatedRunner if stage in fp16_overflow.EMULATED_STAGES \
        else StageRunner
    return kind(wf, stage, images, record, options)


# ---------------------------------------------------------------- the base

@dataclasses.dataclass
class Base:
    """fp32 logits of the graph_modify model for every image: what the screen measures stages against."""
    logits: np.ndarray
    source: str  # where they came from, for the report
    stage: str = None  # the stage whose own full run they are (then it ran on every image)


def base_refusal(wf: WorkFolder, record: inference_record.OutputRecord | None) -> str | None:
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


def outputs_base(wf: WorkFolder, images: ImageSet) -> Base | None:
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


