"""What run_all.sh asks about the Ascend toolchain: the SoC name atc needs.

    python3 -m beit_pipeline.ascend soc-version    # prints e.g. Ascend310P3, from `npu-smi info`
"""

import argparse
import re
import shutil
import subprocess
import sys

from beit_pipeline import cli
from beit_pipeline.errors import UsageError

# The chip column of `npu-smi info` (310P3, 310B1, 910B3, 910A, 310), bounded by blanks or table bars.
_CHIP = re.compile(r"(?:^|[\s|])(310P\d+|310B\d+|910B\d*|910[A-Z0-9]*|310)(?=[\s|]|$)", re.MULTILINE)
_HINT = "pass --soc_version (e.g. Ascend310P3)"


def chip_name(npu_smi_text):
    """The first chip name in `npu-smi info`'s table, or None."""
    match = _CHIP.search(npu_smi_text)
    return match.group(1) if match else None


def soc_version():
    """atc's --soc_version for this machine: "Ascend" + the chip `npu-smi info` shows."""
    if shutil.which("npu-smi") is None:
        raise UsageError(f"cannot tell the SoC: 'npu-smi' is not on PATH; {_HINT}")
    proc = subprocess.run(["npu-smi", "info"], capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise UsageError(f"'npu-smi info' failed; {_HINT}:\n{text.strip()}")
    chip = chip_name(text)
    if chip is None:
        raise UsageError(f"cannot find the chip name in 'npu-smi info'; {_HINT}")
    return "Ascend" + chip


def build_parser():
    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.ascend",
                                     description="Questions run_all.sh asks about the Ascend toolchain.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("soc-version", help="print atc's --soc_version from `npu-smi info` (e.g. Ascend310P3)")
    return parser


def run(args):
    print(soc_version())


def main(argv=None):
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
