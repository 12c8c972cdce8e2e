"""Stand-in for ``python3 -m ais_bench`` (and for ais_infer.py through AIS_INFER).

Takes the real tool's flags (ais_bench/__main__.py get_args: optional --input,
--output, --output_dirname, --batchsize; --device 0 or 0,1; --pure_data_type;
--output_batchsize_axis; --display_all_summary/--debug as True/False), then runs
beit_infer.py on the ONNX model that the fake atc put inside the .om; beit_infer.py
behaves as ais_bench on each of them (dated output folder, files joined into a
batch and split back, pure_infer_data_0.<fmt>, device<id>_<i> folders and the
summed throughput), so outputs, summary and the throughput line are the real ones.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


def str2bool(text):
    """ais_bench's str2bool."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Boolean value expected: {text}")


def device_ids(text):
    """ais_bench's check_device_range_valid: one id, or a comma-separated list of ids, each in [0, 255]."""
    ids = [int(d) for d in str(text).split(",")]
    if any(d < 0 or d > 255 for d in ids):
        raise argparse.ArgumentTypeError(f"device:{text} is invalid. valid value range is [0, 255]")
    return ids if "," in str(text) else ids[0]


def build_parser():
    """The flags of the real tool's get_args() (ais_bench/__main__.py) that the pipeline can meet."""
    parser = argparse.ArgumentParser(prog="ais_bench")
    parser.add_argument("--model", "-m", required=True)
    parser.add_argument("--input", "-i", default=None)
    parser.add_argument("--output", "-o", default=None)
    parser.add_argument("--output_dirname", default=None)
    parser.add_argument("--outfmt", default="BIN", choices=["NPY", "BIN", "TXT"])
    parser.add_argument("--loop", "-l", type=int, default=1)
    parser.add_argument("--debug", type=str2bool, default=False)
    parser.add_argument("--device", "-d", type=device_ids, default=0)
    parser.add_argument("--batchsize", type=int, default=None)
    parser.add_argument("--pure_data_type", default="zero", choices=["zero", "random"])
    parser.add_argument("--output_batchsize_axis", type=int, default=0)
    parser.add_argument("--display_all_summary", type=str2bool, default=False)
    parser.add_argument("--warmup_count", type=int, default=1)
    return parser


def infer_command(args, onnx_path):
    """beit_infer.py with the same flags (it behaves as ais_bench on every one of them)."""
    cmd = [sys.executable, os.path.join(REPO, "beit_infer.py"), "--model", onnx_path, "--outfmt", args.outfmt,
           "--loop", str(args.loop), "--warmup_count", str(args.warmup_count), "--pure_data_type",
           args.pure_data_type, "--output_batchsize_axis", str(args.output_batchsize_axis), "--no_progress",
           "--device", ",".join(map(str, args.device)) if isinstance(args.device, list) else str(args.device),
           "--display_all_summary", str(args.display_all_summary), "--debug", str(args.debug)]
    for flag in ("input", "output", "output_dirname", "batchsize"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", str(getattr(args, flag))]
    return cmd


def main(argv):
    if os.environ.get("FAKE_ASCEND_LOG"):
        with open(os.environ["FAKE_ASCEND_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": "ais_bench", "argv": argv, "cwd": os.getcwd()}) + "\n")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.model.endswith(".om") or not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such .om file")
    if args.input is not None and not all(os.path.exists(p) for p in args.input.split(",")):
        parser.error(f"--input {args.input}: no such folder or file")
    if args.output is None and args.output_dirname is not None:
        # ais_bench: RuntimeError('error bad parameters --output_dirname')
        parser.error("parameter --output_dirname cann't be used alone. Please use it together with the parameter --output!")
    expected_device = os.environ.get("FAKE_EXPECT_DEVICE")
    if expected_device is not None and str(args.device) != expected_device:
        parser.error(f"--device {args.device}, expected {expected_device}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        os.symlink(os.path.abspath(args.model), onnx_path)
        return subprocess.run(infer_command(args, onnx_path)).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
