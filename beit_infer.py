"""Step 5 without CANN: run the ONNX model over the batch files the way ais_bench runs the .om.

Pipeline: beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py ->
(atc + ais_bench on an Ascend 310P) | beit_infer.py (OpenVINO / ONNX Runtime anywhere else) -> beit_eval_acc.py

It reads the folder of batch files (``input_00000.bin`` ... from beit_preprocess.py)
and writes what ais_bench writes, so that beit_eval_acc.py and run_all.sh cannot
tell the two apart:

    <output>/<%Y_%m_%d-%H_%M_%S or --output_dirname>/<input_stem>_0.<bin|txt|npy>
    <output>/<same name>_summary.json

The summary keeps ais_bench's keys (``NPU_compute_time`` with min/max/mean/median/
``percentile(99%)``/count, ``throughput``, ``npu_compute_time_list``, ``filesinfo``,
``args`` as the argv list, ``pid``, ``H2D_latency``/``D2H_latency``); here the "NPU compute
time" is the wall time of one ``session.run`` in ms, and ``engine``, ``precision`` and
``provider`` say what really ran.
Throughput is ais_bench's ``1000 * batchsize.mean / compute_time.mean``, which is
images / summed compute seconds.  The last lines printed are ais_bench's, e.g.

    [INFO] throughput 1000*batchsize.mean(8)/NPU_compute_time.mean(712.5): 11.228

Engines (beit_pipeline/engines.py): without ``--providers`` the fastest exact CPU
engine measured (OpenVINO's runtime in f32 where installed, else ONNX Runtime);
``--providers openvino`` or ``cpu,cuda,...`` choose.  ``--precision bf16`` runs OpenVINO
on the CPU's bf16 instructions and is refused on a CPU without them.

Without ``--input`` it times zero input of the model's shape (``ais_bench --loop 100``;
``--pure_data_type random`` for seeded normal values) and, with ``--output``, writes
``pure_infer_data_0.<fmt>``.  ``--loop N`` with ``--input`` runs the whole input set N
times for timing and writes each output once.  ``--device 0,1`` runs one worker per
device on its share of the files and sums the throughput (beit_pipeline/inference_devices.py).

As ais_bench, files smaller than the model's batch are joined into one batch and the
output split back per file (``--output_batchsize_axis``).  Differences, on purpose:
- Files of different sizes, which ais_bench would join and split wrongly (breaking
  the manifest's row -> image mapping), are an error naming the file and both sizes,
  before anything is written.
- Resume: with ``--output_dirname``, outputs already in that folder (complete, since
  every file is written atomically) are kept and only the missing batches are run,
  but only when the folder's record ``.beit_infer.json`` says they were made from
  the same model content, input batches, output format, number of outputs and
  batch size; otherwise every output there is deleted and recomputed, and the log
  says what changed.  ``--resume`` refuses (exit 1, nothing deleted) instead of
  recomputing; ``--overwrite`` recomputes everything.  Without ``--output_dirname``
  every run gets a fresh timestamped folder.
- One run per output folder: a second one on the same folder exits 4 naming the
  PID that holds it (``--wait_lock`` waits instead).
"""

import argparse
import sys

from beit_pipeline import cli, engines, inference, inference_summary
from beit_pipeline.cli import log

INTERRUPTED_HINT = ("the outputs written so far are complete. Rerun with the same --output, and --output_dirname "
                    "set to that output folder's name, to run only the missing batches")


def str2bool(text):
    """ais_bench's boolean flag values (its str2bool): yes/true/t/y/1 and no/false/f/n/0."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean value (True/False), got {text!r}")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Run an ONNX image model over batch files with ONNX Runtime and write ais_bench's outputs.")
    parser.add_argument("--model", "-m", required=True, help="the .onnx model (after onnxsim / graph_modify.py)")
    parser.add_argument("--input", "-i", default=None,
                        help="folder of batch files (input_00000.bin ...) or comma-separated .bin/.npy files; "
                             "leave out for pure performance mode on random input")
    parser.add_argument("--output", "-o", default=None,
                        help="where to write; outputs go to a subfolder named by the date or --output_dirname, "
                             "the summary next to it as <subfolder>_summary.json")
    parser.add_argument("--output_dirname", default=None,
                        help="name of the output subfolder instead of the date; an existing one is resumed "
                             "(batches with complete outputs are skipped) when its record matches this run")
    parser.add_argument("--outfmt", default="BIN", type=str.upper, choices=["TXT", "BIN", "NPY"],
                        help="output file format (default BIN, as ais_bench)")
    parser.add_argument("--batchsize", "--batch_size", dest="batchsize", type=int, default=None,
                        help="batch size; must match a static model, sets the random batch of a dynamic one "
                             "(default: the model's, or each file's for a dynamic model)")
    parser.add_argument("--loop", "-l", type=int, default=1,
                        help="run the whole input set (or the random batch) this many times for timing; "
                             "outputs are written once")
    parser.add_argument("--warmup_count", type=int, default=1,
                        help="untimed runs of the first batch before timing (default 1, as ais_bench)")
    parser.add_argument("--device", "-d", default="0",
                        help="device id for the cuda/tensorrt/cann providers; several (0,1) run one worker per "
                             "device on its share of the input files and sum their throughput, as ais_bench does "
                             "(on the CPU: that many concurrent workers sharing the cores)")
    parser.add_argument("--providers", default=None,
                        help="openvino (OpenVINO's runtime on the ONNX file), or ONNX Runtime execution providers "
                             "in order of preference: cpu, cuda, tensorrt, cann (unavailable ones are skipped with "
                             "a warning; CPU is the fallback). Default: the fastest exact CPU engine measured "
                             "(OpenVINO where installed, else ONNX Runtime's CPU provider; README)")
    parser.add_argument("--precision", default="fp32", choices=list(engines.PRECISIONS),
                        help="fp32 (default, exact); bf16 / fp16 run on OpenVINO with the CPU's bf16 (avx512_bf16, "
                             "amx_bf16) or fp16 (avx512_fp16, amx_fp16) instructions and are refused on a CPU "
                             "without them; int8 is not built (README)")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads of the engine (0: its default, all cores)")
    parser.add_argument("--output_batchsize_axis", type=int, default=0,
                        help="axis of the outputs along which a batch joined from several input files is split "
                             "back into one output per file (as ais_bench; default 0)")
    parser.add_argument("--pure_data_type", default="zero", choices=["zero", "random"],
                        help="input of a run without --input: zero (default, as ais_bench) or random (seeded "
                             "normal values); with --output its outputs are written as pure_infer_data_0.<fmt>")
    parser.add_argument("--display_all_summary", nargs="?", const=True, default=False, type=str2bool,
                        help="also print the H2D_latency and D2H_latency lines (zero on the CPU: no copies); "
                             "takes ais_bench's form --display_all_summary True too")
    parser.add_argument("--debug", nargs="?", const=True, default=False, type=str2bool,
                        help="log debug lines (the engine's inputs and outputs, each batch's time); "
                             "takes ais_bench's form --debug True too")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --output_dirname, recompute outputs that an earlier run already wrote")
    parser.add_argument("--resume", action="store_true",
                        help="with --output_dirname, keep the outputs an earlier run left, and refuse (exit 1, "
                             "deleting nothing) when its record shows another model, input, format or batch size")
    parser.add_argument("--wait_lock", action="store_true",
                        help="wait for another run that holds the output folder instead of exiting 4")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def run(args):
    summary = inference.run_inference(args)
    if summary.get("summary_path"):
        log.info(f"summary:{summary['summary_path']}")
    inference_summary.report(summary, args.display_all_summary)


def main(argv=None):
    parser = build_parser()
    # The summary's ``args`` is the command line as a list, as ais_bench writes sys.argv.
    parser.set_defaults(argv=[sys.argv[0] if argv is None else "beit_infer.py"]
                        + list(sys.argv[1:] if argv is None else argv))
    return cli.run_main(parser, run, argv, interrupted_hint=INTERRUPTED_HINT, info_prefix="[INFO] ")


if __name__ == "__main__":
    sys.exit(main())
