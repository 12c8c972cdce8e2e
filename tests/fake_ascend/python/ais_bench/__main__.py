"""Stand-in for ``python3 -m ais_bench`` (and for ais_infer.py through AIS_INFER).

Parses the real tool's command line (mjlovesz/sync-ait ait/components/benchmark/ais_bench/infer/__main__.py
``get_args``: every flag, its spellings, its types and choices, so that what the real tool refuses is refused
here too), then runs beit_infer.py with the same arguments on the ONNX model that the fake atc put inside the
.om.  beit_infer.py behaves as ais_bench on each of them (dated output folder, files joined into a batch and
split back, pure_infer_data_0.<fmt>, device<id>_<i> folders and the summed throughput), so outputs, summary
and the throughput line are the real ones.  What beit_infer.py writes that ais_bench does not (its record and
its own figures beside the output folder) is removed afterwards: the stand-in leaves what ais_bench leaves.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
OURS = ("_beit_infer.json", "_beit_summary.json")  # beit_infer.py's files beside an output folder


def str2bool(text):
    """ais_bench's str2bool (args_check.py)."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Boolean value expected true, 1, false, 0 with case insensitive: {text}")


def device_ids(text):
    """ais_bench's check_device_range_valid: one id, or a comma-separated list of ids, each in [0, 255]."""
    ids = [int(d) for d in str(text).split(",")]
    if any(d < 0 or d > 255 for d in ids):
        raise argparse.ArgumentTypeError(f"device:{text} is invalid. valid value range is [0, 255]")
    return ids if "," in str(text) else ids[0]


def positive(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is an invalid positive int value")
    return value


def nonnegative(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is an invalid nonnegative int value")
    return value


def build_parser():
    """The real get_args(): every flag with its spellings, types, choices and defaults."""
    parser = argparse.ArgumentParser(prog="ais_bench")
    add = parser.add_argument
    add("--model", "-m", required=True)
    add("--input", "-i", default=None)
    add("--output", "-o", default=None)
    add("--output_dirname", default=None)
    add("--outfmt", default="BIN", choices=["NPY", "BIN", "TXT"])
    add("--loop", "-l", type=positive, default=1)
    add("--debug", type=str2bool, default=False)
    add("--device", "-d", type=device_ids, default=0)
    add("--dymBatch", dest="dym_batch", type=positive, default=0)
    add("--dymHW", dest="dym_hw", default=None)
    add("--dymDims", dest="dym_dims", default=None)
    add("--dymShape", "--dym-shape", dest="dym_shape", default=None)
    add("--outputSize", dest="output_size", default=None)
    add("--auto_set_dymshape_mode", type=str2bool, default=False)
    add("--auto_set_dymdims_mode", type=str2bool, default=False)
    add("--batchsize", type=positive, default=None)
    add("--pure_data_type", default="zero", choices=["zero", "random"])
    add("--profiler", type=str2bool, default=False)
    add("--dump", type=str2bool, default=False)
    add("--acl_json_path", default=None)
    add("--output_batchsize_axis", type=nonnegative, default=0)
    add("--run_mode", default="array", choices=["array", "files", "tensor", "full"])
    add("--display_all_summary", type=str2bool, default=False)
    add("--warmup_count", "--warmup-count", type=nonnegative, default=1)
    add("--dymShape_range", dest="dym_shape_range", default=None)
    add("--aipp_config", default=None)
    add("--energy_consumption", type=str2bool, default=False)
    add("--npu_id", type=nonnegative, default=0)
    add("--backend", default=None, choices=["trtexec"])
    add("--perf", type=str2bool, default=False)
    add("--pipeline", type=str2bool, default=False)
    add("--profiler_rename", type=str2bool, default=True)
    add("--dump_npy", type=str2bool, default=False)
    add("--divide_input", type=str2bool, default=False)
    add("--threads", type=positive, default=1)
    return parser


def without_model(argv):
    """argv without its --model/-m argument (the stand-in passes the ONNX file inside the .om instead)."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--model", "-m"):
            skip = True
        elif not token.startswith(("--model=", "-m=")):
            kept.append(token)
    return kept


def remove_ours(output, since):
    """Delete what beit_infer.py wrote beside its output folders during this run (ais_bench writes none of it)."""
    for folder, _, names in os.walk(output):
        for name in names:
            path = os.path.join(folder, name)
            if name.endswith(OURS) and os.stat(path).st_mtime >= since:
                os.unlink(path)


def main(argv):
    if os.environ.get("FAKE_ASCEND_LOG"):
        import json
        with open(os.environ["FAKE_ASCEND_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": "ais_bench", "argv": argv, "cwd": os.getcwd()}) + "\n")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model.endswith(".om") or not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such .om file")
    if args.input is not None and not all(os.path.exists(p) for p in args.input.split(",")):
        parser.error(f"--input {args.input}: no such folder or file")
    if args.output_dirname and args.output_dirname.startswith("/"):
        raise ValueError("--output_dirname do not support abs path!")  # benchmark_process.py args_rules
    if args.output is None and args.output_dirname is not None:
        # ais_bench: RuntimeError('error bad parameters --output_dirname')
        parser.error("parameter --output_dirname cann't be used alone. Please use it together with the parameter --output!")
    expected_device = os.environ.get("FAKE_EXPECT_DEVICE")
    if expected_device is not None and str(args.device) != expected_device:
        parser.error(f"--device {args.device}, expected {expected_device}")
    start = time.time() - 1
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        os.symlink(os.path.abspath(args.model), onnx_path)
        cmd = [sys.executable, os.path.join(REPO, "beit_infer.py"), "--model", onnx_path] + without_model(argv)
        code = subprocess.run(cmd + ["--no_progress"]).returncode
    if args.output is not None and os.path.isdir(args.output):
        remove_ours(args.output, start)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
