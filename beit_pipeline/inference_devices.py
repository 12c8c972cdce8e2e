"""``beit_infer.py --device 0,1``: one worker per device, as ais_bench's multidevice_run does.

ais_bench (benchmark_process.py, ``multidevice_run`` and ``seg_input_data_for_multi_process``)
splits the input files into one contiguous share per device (``ceil(files / devices)``
each), runs one process per device on its share, writes each into
``<output>/<dirname or the date>/device<id>_<i>/`` with its summary beside it as
``device<id>_<i>_summary.json``, prints each device's throughput, and then
``summary throughput:`` as their SUM.

On a GPU provider each worker opens its own device.  On the CPU (ONNX Runtime's CPU
provider or OpenVINO) there is one device: ``--device 0,1`` means two workers that
share the CPU's cores, each given ``cores / workers`` threads (unless ``--threads``
says otherwise), running at the same time, so the summed throughput is what the CPU
delivers with that many concurrent streams.
"""

import copy
import math
import multiprocessing
import os
import time

from beit_pipeline import inference, inference_summary
from beit_pipeline.cli import check, log, setup_logging
from beit_pipeline.errors import PipelineError


def split_files(paths, jobs):
    """ais_bench's shares: ``ceil(len / jobs)`` consecutive files each (the last ones may be short or empty)."""
    size = max(1, math.ceil(len(paths) / jobs))
    return [paths[i * size:(i + 1) * size] for i in range(jobs)]


def device_args(args, devices, index, share, dirname, threads):
    """The namespace of worker ``index``: its device, its share of the input, its own output subfolder."""
    worker = copy.copy(args)
    worker.device = devices[index]
    worker.input = ",".join(share) if share is not None else None
    if args.output is not None:
        worker.output_dirname = os.path.join(dirname, f"device{devices[index]}_{index}")
    worker.threads = threads
    return worker


def _worker(payload):
    """One device's run in its own process; returns its throughput and times, or its error."""
    index, args, info_prefix = payload
    setup_logging(info_prefix)
    log.info(f"subprocess_{index} main run")
    start = time.time()
    try:
        summary = inference.run_one_device(args)
    except PipelineError as exc:
        log.error(f"device {args.device}: {exc}")
        return {"index": index, "device": args.device, "exit_code": exc.exit_code}
    inference_summary.report(summary, getattr(args, "display_all_summary", False))
    return {"index": index, "device": args.device, "exit_code": 0, "throughput": summary["throughput"],
            "start_time": start, "end_time": time.time(), "summary_path": summary.get("summary_path")}


def worker_threads(args, providers_cpu, jobs):
    if args.threads or not providers_cpu:
        return args.threads
    return max(1, (os.cpu_count() or 1) // jobs)


def run_devices(args, devices):
    """Run one worker per device at the same time; the summary of the whole: each device's figures and the sum."""
    inference.check_arguments(args)
    shares = [None] * len(devices)
    if args.input is not None:
        inference.finished_manifest_print(args.input)
        shares = split_files(inference.list_inputs(args.input), len(devices))
        check(all(shares), f"--device {args.device}: {sum(map(len, shares))} input files cannot give each of "
                           f"{len(devices)} devices a share; use fewer devices")
    dirname = args.output_dirname or time.strftime("%Y_%m_%d-%H_%M_%S")
    cpu = (args.providers or "cpu").split(",")[0].strip().lower() in ("cpu", "openvino")
    threads = worker_threads(args, cpu, len(devices))
    log.info(f"multidevice:{devices} run begin" + (f" (on the CPU: {len(devices)} concurrent workers of "
                                                   f"{threads} threads each)" if cpu else ""))
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
