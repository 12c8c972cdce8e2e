"""What run_all.sh asks about the Ascend toolchain.

    python3 -m beit_pipeline.inference.ascend soc-version      # prints e.g. Ascend310P3, from `npu-smi info`
    python3 -m beit_pipeline.inference.ascend check-ais-bench  # aclruntime importable, --output_dirname supported
    python3 -m beit_pipeline.inference.ascend check-paths DIR  # ais_bench's path rules hold for DIR and what it makes

The rules are the real tools', not ours: ais_bench (Ascend/tools ais-bench_workload/tool/ais_bench, and
its later copy in ait/msit, components/utils/file_open_check.py) refuses a path with a character outside
``[_A-Za-z0-9/.-]`` (PATH_WHITE_LIST_REGEX), a symlink, and an input that is group- or other-writable
(READ_FILE_NOT_PERMITTED_STAT = S_IWGRP | S_IWOTH); its package's ``__init__.py`` is empty, so
``import ais_bench`` succeeds without the ``aclruntime`` wheel it runs on.  atc from CANN 7.0 may name
its output ``<output>_linux_<arch>.om`` (om_candidates).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterable, Sequence

from beit_pipeline import cli
from beit_pipeline.errors import UsageError

ALLOWED_PATH = re.compile(r"[^_A-Za-z0-9/.-]")  # ais_bench's PATH_WHITE_LIST_REGEX: what it refuses
NOT_PERMITTED = stat.S_IWGRP | stat.S_IWOTH  # ais_bench's READ_FILE_NOT_PERMITTED_STAT
OM_ARCHES = ("x86_64", "aarch64")  # atc's <output>_linux_<arch>.om, CANN >= 7.0
AIS_BENCH_HINT = ("install CANN's aclruntime and ais_bench wheels (Ascend/tools ais-bench_workload/tool/ais_bench, "
                  "README: pip3 install ./aclruntime-*.whl ./ais_bench-*.whl)")

# The chip column of `npu-smi info` (310P3, 310B1, 910B3, 910A, 310), bounded by blanks or table bars.
_CHIP = re.compile(r"(?:^|[\s|])(310P\d+|310B\d+|910B\d*|910[A-Z0-9]*|310)(?=[\s|]|$)", re.MULTILINE)
_HINT = "pass --soc_version (e.g. Ascend310P3)"


def chip_name(npu_smi_text: str) -> str | None:
    """The first chip name in `npu-smi info`'s table, or None."""
    match = _CHIP.search(npu_smi_text)
    return match.group(1) if match else None


def soc_version() -> str:
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


def om_candidates(prefix: str) -> list[str]:
    """The file names atc may give ``--output=PREFIX``: PREFIX.om, or PREFIX_linux_<arch>.om from CANN 7.0."""
    return [prefix + ".om"] + [f"{prefix}_linux_{arch}.om" for arch in OM_ARCHES]


def path_problems(path: str) -> list[str]:
    """What ais_bench would refuse about ``path`` (a file or folder, existing or to be made), in words."""
    problems = []
    bad = sorted(set(ALLOWED_PATH.findall(path)))
    if bad:
        problems.append(f"{path}: holds {' '.join(repr(c) for c in bad)}; ais_bench takes only [_A-Za-z0-9/.-] "
                        "in paths: use a --workdir (and image/label paths) made of those characters")
    if os.path.islink(path):
        problems.append(f"{path}: is a symlink, which ais_bench refuses: give the real path "
                        f"({os.path.realpath(path)})")
    elif os.path.exists(path) and os.stat(path).st_mode & NOT_PERMITTED:
        problems.append(f"{path}: is group- or other-writable ({stat.filemode(os.stat(path).st_mode)}), which "
                        f"ais_bench refuses: chmod -R go-w {path}")
    return problems


def umask_problem() -> str | None:
    """Files made under a umask that lets group or others write are refused by ais_bench as its inputs."""
    mask = os.umask(0)
    os.umask(mask)
    if (~mask) & NOT_PERMITTED:
        return (f"the umask is {mask:03o}, so the batch files and the .om would be group- or other-writable, "
                "which ais_bench refuses: run 'umask 022' first")
    return None


def check_paths(paths: Iterable[str]) -> None:
    """UsageError listing every ais_bench rule that ``paths`` or this process's umask breaks."""
    problems = [p for path in paths for p in path_problems(os.path.abspath(path))]
    problems += [p for p in [umask_problem()] if p]
    if problems:
        raise UsageError("the Ascend path's files would break ais_bench's path rules:\n  " + "\n  ".join(problems))


def ais_bench_source(ais_infer: str | None) -> tuple[str, str]:
    """(what runs inference, the text of its command-line code) for AIS_INFER or the ais_bench package."""
    if ais_infer:
        if not os.path.isfile(ais_infer):
            raise UsageError(f"AIS_INFER={ais_infer}: no such file")
        paths = [ais_infer]
    else:
        spec = importlib.util.find_spec("ais_bench")
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"ais_bench is not importable; {AIS_BENCH_HINT}")
        paths = [os.path.join(root, name) for folder in spec.submodule_search_locations
                 for root, _, names in os.walk(folder) for name in names if name.endswith(".py")]
    text = ""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            text += f.read()
    return (ais_infer or "the ais_bench package"), text


def check_ais_bench(ais_infer: str | None = None) -> None:
    """UsageError unless aclruntime imports and the inference tool takes --output_dirname."""
    what, text = ais_bench_source(ais_infer)
    if importlib.util.find_spec("aclruntime") is None:
        raise UsageError(f"'aclruntime' is not importable, which {what} runs on (import ais_bench succeeds "
                         f"without it, inference would not); {AIS_BENCH_HINT}")
    if "output_dirname" not in text:
        raise UsageError(f"{what} has no --output_dirname, which run_all.sh needs to name its output folder "
                         "(ais_infer.py from mid-2022 lacks it); use an ais_bench whose --help lists "
                         "--output_dirname (the ais_bench package of Ascend/tools ais-bench_workload)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.inference.ascend",
                                     description="Questions run_all.sh asks about the Ascend toolchain.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("soc-version", help="print atc's --soc_version from `npu-smi info` (e.g. Ascend310P3)")
    sub.add_parser("check-ais-bench", help="exit 2 unless aclruntime imports and ais_bench (or $AIS_INFER) "
                                           "takes --output_dirname")
    paths = sub.add_parser("check-paths", help="exit 2 unless PATHs and the umask satisfy ais_bench's path rules")
    paths.add_argument("paths", nargs="+", metavar="PATH", help="files and folders ais_bench will read or write")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "check-ais-bench":
        check_ais_bench(os.environ.get("AIS_INFER") or None)
    elif args.command == "check-paths":
        check_paths(args.paths)
    else:
        print(soc_version())


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
