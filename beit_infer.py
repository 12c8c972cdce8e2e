"""Step 5 without CANN: run the ONNX model over the batch files the way ais_bench runs the .om.

Pipeline: beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py ->
(atc + ais_bench on an Ascend 310P) | beit_infer.py (OpenVINO / ONNX Runtime anywhere else) -> beit_eval_acc.py

It takes the newer ais_bench's command line (every flag of ``python3 -m ais_bench``; what each
means on a CPU: beit_pipeline/inference/options.py and README's ais_bench section) and writes
what ais_bench writes, so that beit_eval_acc.py, run_all.sh and the guide's own scripts cannot
tell the two apart:

    <output>/<%Y_%m_%d-%H_%M_%S or --output_dirname>/<input_stem>_0.<bin|txt|npy>   nothing else
    <output>/<same name>_summary.json        ais_bench's keys only, in its layout (one line)
    <output>/<same name>_beit_summary.json   ours: engine, precision, img/s over the real images, its date
    <output>/<same name>_beit_infer.json     what made the outputs (the record; resume and deletion)

Throughput is ais_bench's ``1000 * batchsize.mean / NPU_compute_time.mean``, where the "NPU
compute time" is the wall time of one engine run; the last lines printed are ais_bench's, e.g.

    [INFO] throughput 1000*batchsize.mean(8)/NPU_compute_time.mean(712.5): 11.228

and, before them, the throughput over the real images (the manifest's rows, not the padding).

Engines (beit_pipeline/inference/engines.py): without ``--providers`` the fastest exact CPU engine
measured (OpenVINO's runtime in f32 where installed, else ONNX Runtime); ``--providers openvino``
or ``cpu,cuda,...`` choose; ``--engine_threads`` sets its threads (``--threads`` is ais_bench's
pipeline sessions).  ``--precision bf16`` runs OpenVINO on the CPU's bf16 instructions and is
refused on a CPU without them.

As ais_bench: files smaller than the model's batch are joined into one batch and the output split
back per file; ``--loop N`` runs each batch N times back to back; ``--device 0,1`` runs every file
on every device unless ``--divide_input True``.  Differences, on purpose:
- Files of different sizes, which ais_bench would join and split wrongly (breaking the
  manifest's row -> image mapping), are an error naming the file and both sizes.
- Resume: with ``--output_dirname``, outputs already in that folder are kept and only the
  missing batches run, when the record says they were made from the same model content, input
  batches, format, batch size, engine and precision; otherwise they are recomputed, and the log
  says what changed (``--resume`` refuses instead; ``--overwrite`` recomputes everything).
- Nothing is deleted but the files the record lists as written by an earlier run of this
  folder; an output folder that is the input folder, or holds the inputs, is refused.
- One run per output folder: a second one exits 4 naming the PID that holds it.
"""

import argparse
import sys

from beit_pipeline import cli
from beit_pipeline.inference import devices as inference_devices
from beit_pipeline.inference import engines
from beit_pipeline.inference import options as inference_options
from beit_pipeline.inference import summary as inference_summary
from beit_pipeline.inference.options import AisFlag, nonnegative_int, positive_int

INTERRUPTED_HINT = ("the outputs written so far are complete. Rerun with the same --output, and --output_dirname "
                    "set to that output folder's name, to run only the missing batches")


def ais_flag(group, ais, other=(), **kwargs):
    """One of ais_bench's flags: ``ais`` its spellings in python3 -m ais_bench, ``other`` the ones we also take."""
    group.add_argument(*ais, *other, action=AisFlag, ais=ais, **kwargs)


def add_io_flags(group):
    ais_flag(group, ("--model", "-m"), ("--om-model",), dest="model", required=True,
             help="the model: an .onnx file (after onnxsim / graph_modify.py), where ais_bench takes the .om")
    ais_flag(group, ("--input", "-i"), dest="input", default=None,
             help="folder of batch files (input_00000.bin ...) or comma-separated .bin/.npy files; leave out for "
                  "pure performance mode on zero (or --pure_data_type random) input")
    ais_flag(group, ("--output", "-o"), dest="output", default=None,
             help="where to write: outputs go to a subfolder named by the date or --output_dirname, ais_bench's "
                  "summary beside it as <subfolder>_summary.json, ours as <subfolder>_beit_summary.json")
    ais_flag(group, ("--output_dirname",), ("--output-dirname",), dest="output_dirname", default=None,
             help="name of the output subfolder instead of the date (not an absolute path: ais_bench refuses one); "
                  "an existing one is resumed when its record (<subfolder>_beit_infer.json) matches this run")
    ais_flag(group, ("--outfmt",), dest="outfmt", default="BIN", upper=("NPY", "BIN", "TXT"),
             help="output file format: NPY, BIN (default, as ais_bench) or TXT (a lower-case value is taken with a "
                  "warning: ais_bench refuses it)")
    ais_flag(group, ("--batchsize",), ("--batch_size", "--batch-size"), dest="batchsize", type=positive_int,
             default=None, help="batch size; must match a static model, sets the batch of a dynamic one (default: "
                                "the model's, or each file's for a dynamic model). --batch_size, the guide README's "
                                "spelling, is taken with a warning: ais_bench refuses it")
    ais_flag(group, ("--output_batchsize_axis",), ("--output-batchsize-axis",), dest="output_batchsize_axis",
             type=nonnegative_int, default=0,
             help="axis of the outputs along which a batch joined from several input files is split back into "
                  "one output per file (as ais_bench; default 0)")
    ais_flag(group, ("--pure_data_type",), ("--pure-data-type",), dest="pure_data_type", default="zero",
             choices=["zero", "random"], help="input of a run without --input: zero (default, as ais_bench) or "
                                              "random (seeded normal values); with --output its outputs are "
                                              "written as pure_infer_data_0.<fmt>")


def add_run_flags(group):
    ais_flag(group, ("--loop", "-l"), dest="loop", type=positive_int, default=1,
             help="run each batch this many times back to back, as ais_bench's session loop does; every run is "
                  "timed, the outputs are written once")
    ais_flag(group, ("--warmup_count", "--warmup-count"), dest="warmup_count", type=nonnegative_int, default=1,
             help="untimed runs of the first batch before timing (default 1, as ais_bench)")
    ais_flag(group, ("--device", "-d"), dest="device", default="0",
             help="device id (0-255) for the cuda/tensorrt/cann providers; several (0,1) run one worker per device, "
                  "each on EVERY input file into <dirname>/device<id>_<i>/ unless --divide_input True splits the "
                  "files among them, and print the summed throughput, as ais_bench does (on the CPU: that many "
                  "concurrent workers sharing the cores)")
    ais_flag(group, ("--divide_input",), ("--divide-input",), dest="divide_input", boolean=True, default=False,
             help="with several --device ids, give each device its share of the input files (ais_bench's "
                  "list_share: the first len %% devices get one more) instead of all of them")
    ais_flag(group, ("--threads",), dest="threads", type=positive_int, default=1,
             help="ais_bench's --threads: the number of computing sessions of --pipeline mode (more than 1 needs "
                  "--pipeline True; without it ais_bench uses 1). There is no pipeline on the CPU: ignored with a "
                  "line. The engine's own threads are --engine_threads")
    ais_flag(group, ("--display_all_summary",), ("--display-all-summary",), dest="display_all_summary",
             boolean=True, default=False, help="also print the H2D_latency and D2H_latency lines (empty on the "
                                               "CPU: no copies); give it as ais_bench does: --display_all_summary "
                                               "True")
    ais_flag(group, ("--debug",), dest="debug", boolean=True, default=False,
             help="log debug lines (the engine's inputs and outputs, each batch's time): --debug True")


def add_dynamic_flags(group):
    kinds = {"dym_batch": ("--dymBatch", "--dym-batch", positive_int, "the batch of a model with a dynamic batch "
                                                                       "axis (honoured; refused on a static model)"),
             "dym_hw": ("--dymHW", "--dym-hw", str, "refused: the batch files hold images of the model's size"),
             "dym_dims": ("--dymDims", "--dym-dims", str, "image:N,3,H,W: honoured as batch N on a dynamic-batch "
                                                          "model at the files' H,W; refused otherwise"),
             "dym_shape_range": ("--dymShape_range", "--dym-shape-range", str, "refused: a sweep over shapes, "
                                                                                "not a run of the input"),
             "output_size": ("--outputSize", "--output-size", str, "ignored: the engine sizes its outputs")}
    for dest, (ais, ait, kind, text) in kinds.items():
        ais_flag(group, (ais,), (ait,), dest=dest, type=kind, default=0 if dest == "dym_batch" else None,
                 help=f"ais_bench's {ais}: {text}")
    ais_flag(group, ("--dymShape", "--dym-shape"), dest="dym_shape", default=None,
             help="ais_bench's --dymShape: as --dymDims")
    for dest in ("auto_set_dymshape_mode", "auto_set_dymdims_mode"):
        ais_flag(group, (f"--{dest}",), (f"--{dest.replace('_', '-')}",), dest=dest, boolean=True, default=False,
                 help=f"ais_bench's --{dest}: True runs each file as its own batch (a dynamic-batch model; "
                      "refused on a static one)")


def add_npu_flags(group):
    for dest in ("profiler", "dump", "profiler_rename", "dump_npy", "energy_consumption", "pipeline", "perf"):
        ais_flag(group, (f"--{dest}",), (f"--{dest.replace('_', '-')}",) if "_" in dest else (), dest=dest,
                 boolean=True, default=dest == "profiler_rename",
                 help=f"ais_bench's --{dest} True: " + ("ignored on the CPU with one line (README)"
                                                        if dest in inference_options.IGNORED else "refused (README)"))
    ais_flag(group, ("--acl_json_path",), ("--acl-json-path",), dest="acl_json_path", default=None,
             help="ais_bench's acl.json for profiling or dump: must exist; ignored on the CPU")
    ais_flag(group, ("--aipp_config",), ("--aipp-config",), dest="aipp_config", default=None,
             help="ais_bench's .config of a dynamic AIPP input: must exist; ignored (an ONNX model has no AIPP)")
    ais_flag(group, ("--npu_id",), ("--npu-id",), dest="npu_id", type=nonnegative_int, default=0,
             help="ais_bench's chip for --energy_consumption; ignored on the CPU")
    ais_flag(group, ("--run_mode",), ("--run-mode",), dest="run_mode", default="array",
             choices=["array", "files", "tensor", "full"], help="ais_bench's input feeding mode; ignored on the CPU "
                                                                 "(the outputs are the same)")
    ais_flag(group, ("--backend",), dest="backend", default=None, choices=["trtexec"],
             help="ais_bench's --backend trtexec (used only with --perf True, which is refused here)")


def add_our_flags(parser):
    parser.add_argument("--providers", default=None,
                        help="openvino (OpenVINO's runtime on the ONNX file), or ONNX Runtime execution providers "
                             "in order of preference: cpu, cuda, tensorrt, cann (unavailable ones are skipped with "
                             "a warning; CPU is the fallback). Default: the fastest exact CPU engine measured "
                             "(OpenVINO where installed, else ONNX Runtime's CPU provider; README)")
    parser.add_argument("--precision", default="fp32", choices=list(engines.PRECISIONS),
                        help="fp32 (default, exact); bf16 / fp16 run on OpenVINO with the CPU's bf16 (avx512_bf16, "
                             "amx_bf16) or fp16 (avx512_fp16, amx_fp16) instructions and are refused on a CPU "
                             "without them; int8 is not built (README)")
    parser.add_argument("--engine_threads", type=int, default=0,
                        help="intra-op threads of the CPU engine (0: its default, all cores); before issue 18 this "
                             "was --threads, which is now ais_bench's")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --output_dirname, recompute outputs that an earlier run already wrote")
    parser.add_argument("--resume", action="store_true",
                        help="with --output_dirname, keep the outputs an earlier run left, and refuse (exit 1, "
                             "deleting nothing) when its record shows another model, input, format or batch size")
    parser.add_argument("--wait_lock", action="store_true",
                        help="wait for another run that holds the output folder instead of exiting 4")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")


def build_parser():
    parser = argparse.ArgumentParser(
        description="Run an ONNX image model over batch files on the CPU (OpenVINO or ONNX Runtime) and write "
                    "ais_bench's outputs. Every flag of the newer ais_bench (python3 -m ais_bench) is accepted; "
                    "README's ais_bench section lists what is identical, ignored on a CPU, or refused.")
    add_io_flags(parser.add_argument_group("ais_bench's input and output flags"))
    add_run_flags(parser.add_argument_group("ais_bench's run flags"))
    add_dynamic_flags(parser.add_argument_group("ais_bench's dynamic batch and shape flags"))
    add_npu_flags(parser.add_argument_group("ais_bench's NPU flags (ignored on the CPU with one line, or refused "
                                            "where they would change what runs)"))
    add_our_flags(parser.add_argument_group("this runner's own flags (ais_bench has none of these)"))
    parser.set_defaults(given=None, lenient=None)
    return parser


def run(args):
    summary = inference_devices.run_inference(args)
    inference_summary.report(summary, args.display_all_summary)


def main(argv=None):
    parser = build_parser()
    # The summary's ``args`` is the command line as a list, as ais_bench writes sys.argv.
    parser.set_defaults(argv=[sys.argv[0] if argv is None else "beit_infer.py"]
                        + list(sys.argv[1:] if argv is None else argv))
    return cli.run_main(parser, run, argv, interrupted_hint=INTERRUPTED_HINT, info_prefix="[INFO] ",
                        setup=inference_options.review)


if __name__ == "__main__":
    sys.exit(main())
