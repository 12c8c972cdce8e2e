"""ais_bench's timing summary: the statistics, the throughput, the summary JSON and the closing lines.

The summary keeps ais_bench's keys (``NPU_compute_time`` with min/max/mean/median/
``percentile(99%)``/count, ``throughput``, ``npu_compute_time_list``, ``filesinfo``,
``args``, ``pid``, ``H2D_latency``, ``D2H_latency``; ais_bench's summary.py); here the
"NPU compute time" is the wall time of one ``session.run`` in ms.  Throughput is
ais_bench's ``1000 * batchsize.mean / compute_time.mean``: images per summed compute
second.  ``args`` is the command line as a list (ais_bench writes ``sys.argv``); the
parsed options are under ``options``.  The CPU engines read the batch where it lies in
host memory, so there is no host-to-device copy to time: H2D_latency and D2H_latency
are ais_bench's empty statistics (zeros, count 0), and ``latency_note`` says why.
"""

import dataclasses
import os
import sys

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


LATENCY_NOTE = ("CPU engines read the input in host memory and return host arrays: no host-device copies, "
                "so H2D_latency and D2H_latency are empty (count 0)")


def command_line(args):
    """ais_bench's ``args``: the argv list (beit_infer.main puts it on the namespace; else this process's)."""
    return list(getattr(args, "argv", None) or sys.argv)


def options(args):
    return {k: v for k, v in vars(args).items() if k != "argv"}


def build_summary(args, model, plan, timings, expected_batch):
    """The summary dict; ``plan`` is None in pure performance mode."""
    from beit_pipeline import engines

    rows = plan.inputs.rows if plan is not None else []
    mean_bs = float(np.mean(timings.batch_sizes)) if timings.batch_sizes else \
        float(expected_batch or (rows[0] if rows else 1))
    return {
        "filesinfo": files_info(plan),
        "args": command_line(args),
        "NPU_compute_time": timing_stats(timings.times_ms),
        "H2D_latency": timing_stats([]),
        "D2H_latency": timing_stats([]),
        "throughput": throughput(timings.batch_sizes, timings.times_ms),
        "batchsize": mean_bs,
        "npu_compute_time_list": [float(t) for t in timings.times_ms],
        "pid": os.getpid(),
        "latency_note": LATENCY_NOTE,
        "options": options(args),
        "runner": engines.engine_version(model.engine),
        "engine": model.engine,
        "precision": model.precision,
        "cpu_instructions": model.instructions,
        "files_per_batch": plan.inputs.files_per_batch if plan is not None else 1,
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


def _stats_line(name, t):
    return (f"{name} (ms): min = {t['min']}, max = {t['max']}, mean = {t['mean']}, "
            f"median = {t['median']}, percentile({PERCENTILE}%) = {t[f'percentile({PERCENTILE}%)']}")


def report_devices(results):
    """ais_bench's multidevice_run closing lines: one per device, then the summed throughput."""
    for r in results:
        log.info(f"i:{r['index']} device_{r['device']} throughput:{r['throughput']} "
                 f"start_time:{r['start_time']} end_time:{r['end_time']}")
    log.info(f"summary throughput:{sum(r['throughput'] for r in results)}")


def report(summary, display_all=False):
    """The closing lines, worded as ais_bench's summary.report prints them (through log.info: ``[INFO] ``)."""
    if "devices" in summary:
        report_devices(summary["devices"])
        return
    t = summary["NPU_compute_time"]
    bs = summary["batchsize"]
    bs_text = int(bs) if float(bs).is_integer() else bs
    log.info("-----------------Performance Summary------------------")
    if display_all:
        log.info(_stats_line("H2D_latency", summary["H2D_latency"]))
    log.info(_stats_line("NPU_compute_time", t))
    if display_all:
        log.info(_stats_line("D2H_latency", summary["D2H_latency"]))
    log.info(f"throughput 1000*batchsize.mean({bs_text})/NPU_compute_time.mean({t['mean']}): "
             f"{summary['throughput']}")
    log.info("------------------------------------------------------")
