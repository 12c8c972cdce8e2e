"""The figures of a run: ais_bench's summary (its keys only, its layout), ours beside it, and the closing lines.

``<out_dir>_summary.json`` is what ais_bench's summary.py ``Summary.report`` writes (mjlovesz/sync-ait
ait/components/benchmark/ais_bench/infer/summary.py, and Ascend/tools ais-bench_workload/tool/ais_bench):
``json.dump`` of ``filesinfo``, ``args`` (sys.argv), ``NPU_compute_time`` (min/max/mean/median/
``percentile(99%)``/count), ``H2D_latency``, ``D2H_latency``, ``npu_compute_time_list``, ``throughput`` and
``pid``, in that order, on one line.  Here the "NPU compute time" is the wall time of one engine run in ms;
the CPU engines read host memory, so H2D/D2H are ais_bench's empty statistics (zeros, count 0).  Throughput
is ais_bench's ``1000 * batchsize.mean / NPU_compute_time.mean``: it counts every row of a batch, the zero
padding of the last batch too.

Our own figures go to ``<out_dir>_beit_summary.json`` (``OUR_SUFFIX``): the engine, precision and provider
that ran, the throughput over REAL images (the manifest's rows, not padding) beside ais_bench's formula, when
the measurement was made, and whether this run resumed an earlier one.  A resumed run times only the batches
it ran, so it carries the last FULL measurement of the same outputs (every batch timed) with its date, or
says that none was made.  ``run_figures(out_dir)`` is how other modules read them (run_all.sh's table).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from beit_pipeline import files
from beit_pipeline.inference import record as records
from beit_pipeline.preprocess import batches as batch_files

if TYPE_CHECKING:
    import argparse

    from beit_pipeline.inference.folder import InferencePlan
    from beit_pipeline.inference.runner import ModelInfo

log = logging.getLogger(__name__)

PERCENTILE = 99
AIS_SUFFIX = records.AIS_SUMMARY_SUFFIX
OUR_SUFFIX = records.FIGURES_SUFFIX
OUR_FORMAT = 1
LATENCY_NOTE = ("CPU engines read the input in host memory and return host arrays: no host-device copies, "
                "so H2D_latency and D2H_latency are empty (count 0)")


@dataclasses.dataclass
class Timings:
    """What one run timed and wrote."""

    times_ms: list = dataclasses.field(default_factory=list)  # one per timed engine run
    batch_sizes: list = dataclasses.field(default_factory=list)  # the rows of each timed run
    real_images: list = dataclasses.field(default_factory=list)  # the manifest's real images in each timed run
    written: list = dataclasses.field(default_factory=list)  # indices of the input files whose outputs were written
    started: str = ""  # when the timed runs began (ISO 8601, local time with its offset)

    def add(self, ms: float, batch_size: int, real: Optional[int] = None) -> None:
        if not self.times_ms:
            self.started = now()
        self.times_ms.append(ms)
        self.batch_sizes.append(batch_size)
        self.real_images.append(batch_size if real is None else real)


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ---------------------------------------------------------------- ais_bench's statistics

def timing_stats(times_ms: Sequence[float]) -> dict:
    """min/max/mean/median/percentile(99%)/count of compute times in ms, as ais_bench reports them.

    An empty list gives zeros (ais_bench's ListInfo defaults), so that a resumed run with
    nothing left to do still has a well-formed summary.
    """
    key = f"percentile({PERCENTILE}%)"
    if len(times_ms) == 0:
        return {"min": 0.0, "max": 0.0, "mean": 0.0, "median": 0.0, key: 0.0, "count": 0}
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean()),
            "median": float(np.median(arr)), key: float(np.percentile(arr, PERCENTILE)),
            "count": int(arr.size)}


def throughput(batch_sizes: Sequence[int], times_ms: Sequence[float]) -> float:
    """ais_bench's 1000 * batchsize.mean / compute_time.mean (rows per second); 0 when nothing ran (as ais_bench)."""
    if len(times_ms) == 0 or float(np.sum(times_ms)) == 0.0:
        return 0
    return 1000.0 * float(np.mean(batch_sizes)) / float(np.mean(times_ms))


def real_image_rate(timings: Timings) -> Optional[float]:
    """Real images per second of compute: 1000 * sum(real images) / sum(compute ms), padding rows left out."""
    total = float(np.sum(timings.times_ms)) if timings.times_ms else 0.0
    return 1000.0 * float(np.sum(timings.real_images)) / total if total else None


def files_info(plan: InferencePlan | None, pure_outputs: Sequence[str] = ()) -> dict:
    """ais_bench's ``filesinfo``: for each input file (sample id), its path and its output files."""
    if plan is None:
        return {"0": {"infiles": ["pure_infer_data"], "outfiles": list(pure_outputs)}} if pure_outputs else {}
    return {str(i): {"infiles": [path], "outfiles": plan.output_paths(i) if plan.out_dir else []}
            for i, path in enumerate(plan.inputs.files)}


def command_line(args: argparse.Namespace) -> list:
    """ais_bench's ``args``: the argv list (beit_infer.main puts it on the namespace; else this process's)."""
    return list(getattr(args, "argv", None) or sys.argv)


def ais_bench_summary(args: argparse.Namespace, plan: InferencePlan | None, timings: Timings,
                      pure_outputs: Sequence[str] = ()) -> dict:
    """Exactly the keys of ais_bench's summary JSON, in its order (summary.py Summary.record)."""
    return {
        "filesinfo": files_info(plan, pure_outputs),
        "args": command_line(args),
        "NPU_compute_time": timing_stats(timings.times_ms),
        "H2D_latency": timing_stats([]),
        "D2H_latency": timing_stats([]),
        "npu_compute_time_list": [float(t) for t in timings.times_ms],
        "throughput": throughput(timings.batch_sizes, timings.times_ms),
        "pid": os.getpid(),
    }


# ---------------------------------------------------------------- our figures

def measurement(timings: Timings, batches_total: int, full: bool, images: bool) -> Optional[dict]:
    """One measurement: when, how much was timed, both throughputs; None when nothing was timed."""
    if not timings.times_ms:
        return None
    rows = int(np.sum(timings.batch_sizes))
    real = int(np.sum(timings.real_images)) if images else None
    return {"measured_at": timings.started, "full": full, "timed_runs": len(timings.times_ms),
            "batches_total": batches_total, "compute_s": float(np.sum(timings.times_ms)) / 1000.0,
            "rows": rows, "real_images": real, "padding_rows": rows - real if images else None,
            "throughput_real_images": real_image_rate(timings) if images else None,
            "throughput_ais_bench": throughput(timings.batch_sizes, timings.times_ms)}


def options(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("argv", "given", "lenient")}


def our_summary(args: argparse.Namespace, model: ModelInfo, plan: InferencePlan | None, timings: Timings,
                previous: Optional[dict]) -> dict:
    """Our figures of a run (``plan`` None: pure input).  ``previous``: the summary an earlier run left."""
    from beit_pipeline.inference import engines

    made_from = records.identity(plan.record) if plan is not None and plan.record is not None else None
    full = plan is None or not plan.kept
    this = measurement(timings, len(plan.groups()) if plan else 1, full, plan is not None and plan.images)
    last = this if full else None
    if last is None and previous and previous.get("made_from") == made_from and made_from is not None:
        last = previous.get("last_full_measurement")  # the same outputs, timed whole by an earlier run
    return {
        "format": OUR_FORMAT, "engine": model.engine, "precision": model.precision, "provider": model.provider,
        "runner": engines.engine_version(model.engine), "cpu_instructions": model.instructions,
        "providers_requested": args.providers, "model": os.path.abspath(model.path),
        "mode": "files" if plan is not None else "pure",
        "files_per_batch": plan.inputs.files_per_batch if plan is not None else 1,
        "images_from": "manifest" if plan is not None and plan.images else "rows",
        "outputs_written": len(timings.written), "outputs_kept": len(plan.kept) if plan is not None else 0,
        "output_dir": plan.out_dir if plan is not None else None,
        "resumed": bool(plan is not None and plan.kept), "this_run": this, "last_full_measurement": last,
        "made_from": made_from, "latency_note": LATENCY_NOTE, "options": options(args),
    }


@dataclasses.dataclass
class RunSummary:
    """What run_inference returns: ais_bench's summary, ours, and where they were written (None: not written)."""

    ais: dict
    ours: dict
    ais_path: Optional[str] = None
    ours_path: Optional[str] = None

    @property
    def throughput(self) -> float:
        return self.ais["throughput"]


def summary_paths(out_dir: str | os.PathLike[str]) -> tuple:
    """(ais_bench's ``<out_dir>_summary.json``, our ``<out_dir>_beit_summary.json``)."""
    ais, _, ours = records.beside(out_dir)
    return ais, ours


def read_previous(out_dir: str | None) -> Optional[dict]:
    data = files.read_json(summary_paths(out_dir)[1]) if out_dir else None
    return data if isinstance(data, dict) and data.get("format") == OUR_FORMAT else None


def write_summaries(result: RunSummary, out_dir: str) -> None:
    """``<out_dir>_summary.json`` as ais_bench writes it (json.dump, one line), ours beside it."""
    result.ais_path, result.ours_path = summary_paths(out_dir)
    with files.naming_errors(result.ais_path):
        files.write_text_atomic(result.ais_path, json.dumps(result.ais))
    with files.naming_errors(result.ours_path):
        files.write_json_atomic(result.ours_path, result.ours)


# ---------------------------------------------------------------- reading them back: run_figures

@dataclasses.dataclass
class RunFigures:
    """An output folder's figures, for run_all.sh's table and anyone else who reports them."""

    engine: Optional[str]  # onnxruntime / openvino; None for outputs ais_bench wrote
    precision: Optional[str]
    throughput_real_images: Optional[float]  # img/s over the manifest's real images, of the last full measurement
    throughput_ais_bench: Optional[float]  # ais_bench's 1000*batchsize.mean/NPU_compute_time.mean of the same
    real_images: Optional[int]  # real images in that measurement (each counted once per timed run)
    measured_at: Optional[str]  # ISO 8601 date of that measurement
    resumed: bool  # the latest run resumed an earlier one's outputs
    source: Optional[str]  # the file the figures come from

    def table_value(self) -> str:
        value = self.throughput_real_images
        return f"{value:.2f}" if value is not None else "n/a"

    def describe(self) -> str:
        """One line: what the throughput is, or why there is none."""
        if self.measured_at is None:
            why = ("the outputs were resumed from an interrupted run and no run timed every batch"
                   if self.resumed else "no summary of the run was found")
            return (f"throughput: not measured ({why}); rerun beit_infer.py with --overwrite "
                    "(run_all.sh --force) to measure it")
        real = (f"{self.throughput_real_images:.2f} img/s over {self.real_images} real images"
                if self.throughput_real_images is not None else "img/s over real images unknown (no manifest)")
        ais = f"{self.throughput_ais_bench:.2f}" if self.throughput_ais_bench is not None else "n/a"
        when = f"measured {self.measured_at}" + (" by an earlier run (the latest run resumed it)" if self.resumed
                                                 else "")
        return (f"throughput: {real}; ais_bench's 1000*batchsize.mean/NPU_compute_time.mean, padding rows "
                f"counted: {ais}; {when}")


def run_figures(out_dir: str, prep_image: str | None = None) -> RunFigures:
    """The figures of the outputs in ``out_dir``: ours where beit_infer.py wrote them, else ais_bench's summary.

    For ais_bench's outputs the real-image rate needs ``prep_image`` (the manifest) and a summary that
    timed each of its batches once; the date is that summary's mtime.
    """
    ais_path, ours_path = summary_paths(out_dir)
    ours = files.read_json(ours_path)
    if isinstance(ours, dict) and ours.get("format") == OUR_FORMAT:
        last = ours.get("last_full_measurement") or {}
        return RunFigures(ours.get("engine"), ours.get("precision"), last.get("throughput_real_images"),
                          last.get("throughput_ais_bench"), last.get("real_images"), last.get("measured_at"),
                          bool(ours.get("resumed")), ours_path)
    ais = files.read_json(ais_path)
    if not isinstance(ais, dict) or not isinstance(ais.get("throughput"), (int, float)):
        return RunFigures(None, None, None, None, None, None, False, None)
    real, rate = ais_bench_real_rate(ais, prep_image)
    when = datetime.datetime.fromtimestamp(os.stat(ais_path).st_mtime).astimezone().isoformat(timespec="seconds")
    return RunFigures(None, None, rate, float(ais["throughput"]), real, when, False, ais_path)


def ais_bench_real_rate(ais: dict, prep_image: str | None) -> tuple:
    """(real images, img/s over them) from ais_bench's compute-time list, when it timed each batch once."""
    if prep_image is None or not os.path.exists(batch_files.manifest_path(prep_image)):
        return None, None
    manifest = batch_files.load_manifest(prep_image)
    times = ais.get("npu_compute_time_list") or []
    if len(times) != len(manifest["batches"]) or not sum(times):
        return None, None
    real = sum(b["real"] for b in manifest["batches"])
    return real, 1000.0 * real / float(sum(times))


# ---------------------------------------------------------------- the closing lines

def _stats_line(name, t):
    return (f"{name} (ms): min = {t['min']}, max = {t['max']}, mean = {t['mean']}, "
            f"median = {t['median']}, percentile({PERCENTILE}%) = {t[f'percentile({PERCENTILE}%)']}")


def report_devices(results: Sequence[dict[str, Any]]) -> None:
    """ais_bench's multidevice_run closing lines: one per device, then the summed throughput."""
    log.info(f"multidevice run end qsize:{2 * len(results)} result:0")
    for r in results:
        log.info(f"i:{r['index']} device_{r['device']} throughput:{r['throughput']} "
                 f"start_time:{r['start_time']} end_time:{r['end_time']}")
    log.info(f"summary throughput:{sum(r['throughput'] for r in results)}")


def report_ours(ours: dict) -> None:
    """Our lines, before ais_bench's closing block: real-image throughput, and what a resumed run measured."""
    this, last = ours.get("this_run"), ours.get("last_full_measurement")
    if ours["mode"] == "files" and this is not None:
        counted = (f"real images: {this['real_images']} in {this['rows']} rows run ({this['padding_rows']} padding "
                   f"rows not counted)" if this["real_images"] is not None else
                   f"no manifest, so every one of the {this['rows']} rows run is counted as an image")
        rate = this["throughput_real_images"] or this["throughput_ais_bench"]
        log.info(f"{counted}; throughput over them: {rate} img/s (1000*images/sum of NPU_compute_time)")
    if not ours["resumed"]:
        return
    timed = f"this run timed {this['timed_runs']} runs of the batches left" if this else "nothing was left to run"
    log.info(f"resumed: {ours['outputs_kept']} outputs were already in {ours['output_dir']}; {timed} (a partial "
             "measurement)")
    if last:
        log.info(f"last full measurement of these outputs: {last['throughput_real_images']} img/s over real images "
                 f"(ais_bench's formula: {last['throughput_ais_bench']}), measured {last['measured_at']}")
    else:
        log.info("no full measurement of these outputs was made (the run that wrote the others was interrupted); "
                 "rerun with --overwrite to time every batch")


def report(result: RunSummary | dict[str, Any], display_all: bool = False) -> None:
    """Our lines, then the closing lines worded as ais_bench's summary.display prints them (``[INFO] ``)."""
    if isinstance(result, dict) and "devices" in result:
        report_devices(result["devices"])
        return
    report_ours(result.ours)
    t = result.ais["NPU_compute_time"]
    bs = result.ours["batchsize"]
    bs_text = int(bs) if float(bs).is_integer() else bs
    log.info("-----------------Performance Summary------------------")
    if display_all:
        log.info(_stats_line("H2D_latency", result.ais["H2D_latency"]))
    log.info(_stats_line("NPU_compute_time", t))
    if display_all:
        log.info(_stats_line("D2H_latency", result.ais["D2H_latency"]))
    log.info(f"throughput 1000*batchsize.mean({bs_text})/NPU_compute_time.mean({t['mean']}): "
             f"{result.ais['throughput']}")
    log.info("------------------------------------------------------")
