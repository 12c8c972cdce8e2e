"""Whether this Python can run the pipeline: run_all.sh asks before its first step (standard library only).

    python3 -m beit_pipeline.environment    # exit 0, or one line naming the missing packages and the fix

Without it a Python lacking the packages (no ``.venv`` first on PATH) stopped the first step with
``ModuleNotFoundError: No module named 'PIL'`` and a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Iterable, Sequence

from beit_pipeline import cli
from beit_pipeline.errors import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The modules run_all.sh's steps import, with the distribution that installs each (requirements.txt).
REQUIRED = {"numpy": "numpy", "PIL": "pillow", "onnx": "onnx", "onnxruntime": "onnxruntime", "torch": "torch",
            "timm": "timm", "onnxsim": "onnxsim", "tqdm": "tqdm"}


def missing_modules(names: Iterable[str] = REQUIRED) -> list[str]:
    """The modules of ``names`` that this Python cannot import (found by name: nothing is imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def how_to_fix(repo: str = REPO) -> str:
    """Where this project's packages are (or how to install them), for the refusal's second half."""
    venv_bin = os.path.join(repo, ".venv", "bin")
    if os.access(os.path.join(venv_bin, "python3"), os.X_OK):
        return f"this project's .venv has them: put it first on PATH (PATH=\"{venv_bin}:$PATH\")"
    return f"run `make venv` in {repo} (it installs requirements.txt into .venv), then PATH=\"{venv_bin}:$PATH\""


def check_environment() -> None:
    """UsageError (exit 2) naming the missing packages and the fix, when this Python lacks any."""
    missing = missing_modules()
    if missing:
        packages = ", ".join(REQUIRED[m] for m in missing)
        raise UsageError(f"python3 ({sys.executable}) lacks {packages}, which the pipeline needs; {how_to_fix()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.environment",
                                     description="Exit 2 with one line unless this Python has the pipeline's "
                                                 "packages (run_all.sh asks before its first step).")
    return cli.run_main(parser, lambda args: check_environment(), argv)


if __name__ == "__main__":
    sys.exit(main())
