"""``beit_infer.py --device 0,1``: one worker per device, as the newer ais_bench's multidevice_run does.

ais_bench (mjlovesz/sync-ait ait/components/benchmark/ais_bench/infer/benchmark_process.py,
``multidevice_run``, ``main`` and ``seg_input_data_for_multi_process``) runs one process per
device, each on EVERY input file unless ``--divide_input True`` (default False); with it, the
files are shared out by utils.py ``list_share``: ``len // devices`` each, one more for the first
``len % devices``.  Each writes into ``<output>/<dirname or the date>/device<id>_<i>/`` with its
summary beside it as ``device<id>_<i>_summary.json``, prints its throughput, and then
``summary throughput:`` is their SUM.  (The older Ascend/tools ais_bench always split the
files, ``ceil(files / devices)`` each, into ``device<id>/``.)

On a GPU provider each worker opens its own device.  On the CPU (ONNX Runtime's CPU
provider or OpenVINO) there is one device: ``--device 0,1`` means two workers that share
the CPU's cores, each given ``cores / workers`` engine threads (unless ``--engine_threads``
says otherwise), running at the same time, so the summed throughput is what the CPU
delivers with that many concurrent streams.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from beit_pipeline.cli import check, setup_logging
from beit_pipeline.errors import PipelineError
from beit_pipeline.inference import runner as inference
from beit_pipeline.inference import summary as inference_summary

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)


def parse_devices(text: str | int) -> list[int]:
    """``--device 0`` or ``0,1``: the device ids, each in [0, 255] (ais_bench's check_device_range_valid)."""
    try:
        devices = [int(d) for d in str(text).split(",")]
    except ValueError:
        devices = []
    check(devices and all(0 <= d <= 255 for d in devices),
          f"--device {text!r}: give a device id or comma-separated ids, each in [0, 255] (0 or 0,1)")
    return devices


def run_inference(args: argparse.Namespace) -> inference_summary.RunSummary | dict[str, Any]:
    """Run the model over the batch files (or the pure input) and write ais_bench's outputs.

    ``args`` is the namespace beit_infer.build_parser() parses.  Returns the run's
    summaries (inference_summary.RunSummary; with several ``--device`` ids the devices'
    results), written beside the output folder when ``--output``
    is given.  Raises PipelineError naming the file or flag, before any folder is made,
    for a model or input that does not fit.
    """
    devices = parse_devices(args.device)
    if len(devices) > 1:
        return run_devices(args, devices)
    args.device = devices[0]
    return inference.run_one_device(args)


def share_files(paths: Sequence[str], jobs: int) -> list:
    """ais_bench's list_share: ``len // jobs`` consecutive files each, one more for the first ``len % jobs``."""
    each, left = divmod(len(paths), jobs)
    shares, head = [], 0
    for i in range(jobs):
        size = each + (1 if i < left else 0)
        shares.append(paths[head:head + size])
        head += size
    return shares


def device_args(args: argparse.Namespace, devices: Sequence[int], index: int, share: Sequence[str] | None, dirname: str,
                threads: int) -> argparse.Namespace:
    """The namespace of worker ``index``: its device, its input (all files, or its share), its own subfolder."""
    worker = copy.copy(args)
    worker.device = devices[index]
    if share is not None:
        worker.input = ",".join(share)
    if args.output is not None:
        worker.output_dirname = os.path.join(dirname, f"device{devices[index]}_{index}")
    worker.engine_threads = threads
    return worker


def _worker(payload):
    """One device's run in its own process; returns its throughput and times, or its error."""
    index, args, info_prefix = payload
    setup_logging(info_prefix)
    log.info(f"subprocess_{index} main run")
    start = time.time()
    try:
        result = inference.run_one_device(args)
    except PipelineError as exc:
        log.error(f"device {args.device}: {exc}")
        return {"index": index, "device": args.device, "exit_code": exc.exit_code}
    inference_summary.report(result, getattr(args, "display_all_summary", False))
    return {"index": index, "device": args.device, "exit_code": 0, "throughput": result.throughput,
            "start_time": start, "end_time": time.time(), "summary_path": result.ais_path}


def worker_threads(args: argparse.Namespace, providers_cpu: bool, jobs: int) -> int:
    if args.engine_threads or not providers_cpu:
        return args.engine_threads
    return max(1, (os.cpu_count() or 1) // jobs)


def input_shares(args: argparse.Namespace, devices: Sequence[int]) -> list:
    """Each worker's input files: None (every file, ais_bench's default) or its share (--divide_input True)."""
    if args.input is None or not args.divide_input:
        return [None] * len(devices)
    inference.finished_manifest_print(args.input)
    shares = share_files(inference.list_inputs(args.input), len(devices))
    check(all(shares), f"--device {args.device} --divide_input True: {sum(map(len, shares))} input files cannot "
                       f"give each of {len(devices)} devices a share; use fewer devices")
    return shares


def run_devices(args: argparse.Namespace, devices: Sequence[int]) -> dict[str, Any]:
    """Run one worker per device at the same time; the summary of the whole: each device's figures and the sum."""
    inference.check_arguments(args)
    shares = input_shares(args, devices)
    dirname = args.output_dirname or time.strftime("%Y_%m_%d-%H_%M_%S")
    cpu = (args.providers or "cpu").split(",")[0].strip().lower() in ("cpu", "openvino")
    threads = worker_threads(args, cpu, len(devices))
    what = "its share of the input files" if shares[0] is not None else "every input file"
    log.info(f"multidevice:{devices} run begin" + (f" (each device runs {what}" if args.input else " (")
             + (f"; on the CPU: {len(devices)} concurrent workers of {threads} threads each)" if cpu else ")"))
    payloads = [(i, device_args(args, devices, i, shares[i], dirname, threads), "[INFO] ")
                for i in range(len(devices))]
    pool = multiprocessing.get_context("spawn").Pool(len(devices))
    try:
        results = pool.map(_worker, payloads)
    finally:
        pool.close()  # close + join, not terminate: the workers' engines shut down cleanly
        pool.join()
    failed = [r for r in results if r["exit_code"]]
    if failed:
        raise PipelineError(f"{len(failed)} of {len(devices)} device workers failed "
                            f"(devices {', '.join(str(r['device']) for r in failed)}); see their errors above",
                            exit_code=failed[0]["exit_code"])
    return {"devices": results, "throughput": sum(r["throughput"] for r in results),
            "output_dir": os.path.join(args.output, dirname) if args.output is not None else None}
