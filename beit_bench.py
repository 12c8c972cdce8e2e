"""Benchmarks: the guide's throughput and accuracy tables, measured on this machine.

Not a pipeline step: it drives the pipeline's own scripts and measures, in one
run and on the same randomly initialised weights and inputs,

  * throughput (img/s) per batch size of PyTorch eager (timm) in fp32 and bf16
    (autocast), of ONNX Runtime on the exported, the onnxsim and the graph_modify
    models, and of OpenVINO's runtime on the onnxsim model in fp32 and bf16: a
    column per engine and precision, all timed in interleaved rounds (one call of
    each in turn) so that a load burst on a shared machine hits every column;
  * the machine's GEMM ceiling per precision: the best GFLOP/s of ONNX Runtime,
    OpenVINO and PyTorch on BEiT-shaped MatMuls in fp32, and of OpenVINO and
    PyTorch in bf16, and from it and BEiT-base's 17.6 GMACs per image the
    fraction of its precision's ceiling each column reaches;
  * preprocessing img/s on realistic JPEGs: the reference pipeline (torchvision
    transforms, one image at a time, one process, as the guide's script does)
    against beit_preprocess.py with 1 worker and with all cores;
  * the end-to-end wall time of run_all.sh on the demo set, split by step.

It writes results.json, results.md (tables in the guide's shape) and
throughput.png into --out.  Shared machines are noisy: compare the ratios
measured in one run, not absolute numbers across runs.  The work is in
beit_pipeline/bench/throughput.py.
"""

import argparse
import os
import sys

from beit_pipeline import cli
from beit_pipeline.bench import throughput
from beit_pipeline.inference.sessions import PROVIDERS

RUNTIMES = throughput.RUNTIMES


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_out", help="folder for results.json, results.md, throughput.png "
                   "and the converted models (reused by a later run)")
    p.add_argument("--model", default="beit_base_patch16_224", help="BEiT variant to build with random weights")
    p.add_argument("--batch_sizes", default="1,4,8,16,32", help="comma-separated batch sizes to time")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per batch size (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per batch size before timing")
    p.add_argument("--ceiling_repeats", type=int, default=10,
                   help="timed calls per GEMM shape, engine and precision for the ceiling (the median is kept)")
    p.add_argument("--runtimes", default=None,
                   help=f"which columns to time, comma-separated from {','.join(RUNTIMES)} (default: every one this "
                        "machine can run: the bf16 ones need the CPU's bf16 instructions, openvino its package)")
    p.add_argument("--providers", default="cpu", choices=sorted(PROVIDERS),
                   help="ONNX Runtime execution provider, as for beit_infer.py (cuda/tensorrt need onnxruntime-gpu)")
    p.add_argument("--torch_device", default="cpu", help="device for PyTorch eager (cpu or cuda)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads for PyTorch and ONNX Runtime")
    p.add_argument("--prep_images", type=int, default=800,
                   help="number of 500x375 quality-90 JPEGs for the preprocessing benchmark (0 skips it)")
    p.add_argument("--skip_e2e", action="store_true", help="skip timing run_all.sh on the demo set")
    p.add_argument("--e2e_batch_size", type=int, default=8, help="batch size of the run_all.sh timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    return p


def check_args(args):
    if args.runtimes is None:
        args.runtimes = ",".join(throughput.default_runtimes())
    unknown = {r for r in args.runtimes.split(",") if r} - set(RUNTIMES)
    cli.check(not unknown, f"unknown runtimes {sorted(unknown)}; choose from {RUNTIMES}")
    cli.check(all(b.strip().isdigit() and int(b) >= 1 for b in args.batch_sizes.split(",") if b),
              f"--batch_sizes must be positive integers, got {args.batch_sizes!r}")


def run(args):
    throughput.report(throughput.measure(args), args.out)


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
