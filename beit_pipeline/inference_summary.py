"""ais_bench's timing summary: the statistics, the throughput, the summary JSON and the closing lines.

The summary keeps ais_bench's keys (``NPU_compute_time`` with min/max/mean/median/
``percentile(99%)``/count, ``throughput``, ``npu_compute_time_list``, ``filesinfo``,
``args``, ``pid``); here the "NPU compute time" is the wall time of one ONNX Runtime
``session.run`` in ms.  Throughput is ais_bench's ``1000 * batchsize.mean /
compute_time.mean``: images per summed compute second.
"""

import dataclasses
import os

import numpy as np

from beit_pipeline import files
from beit_pipeline.cli import log

PERCENTILE = 99


@dataclasses.dataclass
class Timings:
    """What one run timed and wrote."""

    times_ms: list = dataclasses.field(default_factory=list)  # one per timed session.run
    batch_sizes: list = dataclasses.field(default_factory=list)  # the batch of each timed run
    written: list = dataclasses.field(default_factory=list)  # indices of the input files whose outputs were written

    def add(self, ms, batch_size):
        self.times_ms.append(ms)
        self.batch_sizes.append(batch_size)


def timing_stats(times_ms):
    """min/max/mean/median/percentile(99%)/count of compute times in ms, as ais_bench reports them.

    An empty list gives zeros (ais_bench does the same), so that a resumed run with
    nothing left to do still has a well-formed summary.
    """
    key = f"percentile({PERCENTILE}%)"
    if len(times_ms) == 0:
        return {"min": 0.0, "max": 0.0, "mean": 0.0, "median": 0.0, key: 0.0, "count": 0}
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean()),
            "median": float(np.median(arr)), key: float(np.percentile(arr, PERCENTILE)),
            "count": int(arr.size)}


def throughput(batch_sizes, times_ms):
    """ais_bench's 1000 * batchsize.mean / compute_time.mean (images per second); 0 when nothing ran."""
    if len(times_ms) == 0 or float(np.sum(times_ms)) == 0.0:
        return 0.0
    return 1000.0 * float(np.mean(batch_sizes)) / float(np.mean(times_ms))


def files_info(plan):
    """ais_bench's ``filesinfo``: for each input file, its path and the outputs it has."""
    if plan is None:
        return {}
    return {str(i): {"infiles": [path],
                     "outfiles": plan.output_paths(i) if plan.out_dir else []}
            for i, path in enumerate(plan.inputs.files)}


def build_summary(args, model, plan, timings, expected_batch):
    """The summary dict; ``plan`` is None in pure performance mode."""
    import onnxruntime

    rows = plan.inputs.rows if plan is not None else []
    mean_bs = float(np.mean(timings.batch_sizes)) if timings.batch_sizes else \
        float(expected_batch or (rows[0] if rows else 1))
    return {
        "filesinfo": files_info(plan),
        "args": vars(args),
        "NPU_compute_time": timing_stats(timings.times_ms),
        "throughput": throughput(timings.batch_sizes, timings.times_ms),
        "batchsize": mean_bs,
        "npu_compute_time_list": [float(t) for t in timings.times_ms],
        "pid": os.getpid(),
        "runner": "onnxruntime " + onnxruntime.__version__,
        "provider": model.provider,
        "providers_requested": args.providers,
        "model": os.path.abspath(model.path),
        "mode": "files" if plan is not None else "pure",
        "outputs_written": len(timings.written),
        "outputs_kept": len(plan.kept) if plan is not None else 0,
        "output_dir": plan.out_dir if plan is not None else None,
    }


def write_summary(summary, out_dir):
    """Write ``<out_dir>_summary.json`` (beside the output folder, as ais_bench does)."""
    summary["summary_path"] = out_dir + "_summary.json"
    files.write_json_atomic(summary["summary_path"], summary)
    return summary["summary_path"]


def report(summary):
    """The closing lines, worded as ais_bench's summary.report prints them (through log.info: ``[INFO] ``)."""
    t = summary["NPU_compute_time"]
    p = t[f"percentile({PERCENTILE}%)"]
    bs = summary["batchsize"]
    bs_text = int(bs) if float(bs).is_integer() else bs
    log.info("-----------------Performance Summary------------------")
    log.info(f"NPU_compute_time (ms): min = {t['min']}, max = {t['max']}, mean = {t['mean']}, "
             f"median = {t['median']}, percentile({PERCENTILE}%) = {p}")
    log.info(f"throughput 1000*batchsize.mean({bs_text})/NPU_compute_time.mean({t['mean']}): "
             f"{summary['throughput']}")
    log.info("------------------------------------------------------")
