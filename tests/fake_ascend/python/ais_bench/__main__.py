"""Stand-in for ``python3 -m ais_bench`` (and for ais_infer.py through AIS_INFER).

Checks the flags the guide passes, then runs beit_infer.py on the ONNX model that
the fake atc put inside the .om, so that outputs, summary and the throughput line
are the real ones.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


def main(argv):
    if os.environ.get("FAKE_ASCEND_LOG"):
        with open(os.environ["FAKE_ASCEND_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps({"tool": "ais_bench", "argv": argv, "cwd": os.getcwd()}) + "\n")
    parser = argparse.ArgumentParser(prog="ais_bench")
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--output_dirname", required=True)
    parser.add_argument("--outfmt", required=True, choices=["TXT", "BIN", "NPY"])
    parser.add_argument("--batchsize", required=True, type=int)
    parser.add_argument("--device", required=True, type=int)
    args = parser.parse_args(argv)
    if not args.model.endswith(".om") or not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such .om file")
    if not os.path.isdir(args.input):
        parser.error(f"--input {args.input}: not a folder")
    expected_device = os.environ.get("FAKE_EXPECT_DEVICE")
    if expected_device is not None and args.device != int(expected_device):
        parser.error(f"--device {args.device}, expected {expected_device}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        os.symlink(os.path.abspath(args.model), onnx_path)
        cmd = [sys.executable, os.path.join(REPO, "beit_infer.py"), "--model", onnx_path, "--input", args.input,
               "--output", args.output, "--output_dirname", args.output_dirname, "--outfmt", args.outfmt,
               "--batchsize", str(args.batchsize), "--no_progress"]
        return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
