"""Progress that reads well in a terminal and in a log file.

``bar(...)`` takes tqdm's arguments.  In a terminal it is tqdm as usual (one line redrawn in place).  When
stderr is not a terminal (run_all.sh piped to a file, CI) it writes one plain line per update interval
(``BEIT_PROGRESS_INTERVAL`` seconds, default 10) and one at the end, each ending in a newline, without
carriage returns or bar characters::

    preprocess:  37% 300/800 img [00:12<00:20, 24.5 img/s]

``python3 -m beit_pipeline.progress --label onnxsim -- python3 -m onnxsim IN OUT ...`` runs a command that
says nothing while it works (onnxsim: tens of seconds on BEiT-base) with a heartbeat on stderr: the time
so far and the command's last line of output, which is passed through.  The exit status is the command's.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

INTERVAL_ENV = "BEIT_PROGRESS_INTERVAL"
DEFAULT_LOG_INTERVAL = 10.0
TERMINAL_INTERVAL = 0.5
LOG_FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]"
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} {unit} [{elapsed}, {rate_fmt}]"


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def log_interval() -> float:
    """Seconds between lines in a log: $BEIT_PROGRESS_INTERVAL, else 10."""
    try:
        return max(0.0, float(os.environ.get(INTERVAL_ENV, DEFAULT_LOG_INTERVAL)))
    except ValueError:
        return DEFAULT_LOG_INTERVAL


class LineWriter:
    """A file for tqdm that turns its redraws (``\\r`` + text + padding) into whole lines, repeats dropped.

    It looks up sys.stderr at each write, so that a test's captured stderr gets the lines.
    """

    def __init__(self):
        self.last = None

    def write(self, text: str) -> int:
        for part in text.replace("\n", "\r").split("\r"):
            line = part.rstrip()
            finished_again = self.last and "100%" in line and line.split("[")[0] == self.last.split("[")[0]
            if line and line != self.last and not finished_again:
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
                self.last = line
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments); in a log, plain lines every log_interval() seconds and at the end."""
    from tqdm import tqdm

    kwargs.setdefault("file", sys.stderr)
    if stderr_is_terminal() or kwargs["file"] is not sys.stderr:
        return tqdm(iterable, **kwargs)
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    kwargs.update(file=LineWriter(), mininterval=log_interval(), maxinterval=max(log_interval(), 10.0), miniters=1,
                  dynamic_ncols=False, ascii=True, leave=True)
    kwargs.setdefault("bar_format", LOG_FORMAT if total is not None else LOG_FORMAT_NO_TOTAL)
    kwargs.setdefault("unit", "it")
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------- a heartbeat for a silent command

class OutputRelay:
    """Passes a child's output through to our stdout, remembering its last line with words in it."""

    def __init__(self, stream: IO[str]):
        self.last = ""
        self.thread = threading.Thread(target=self.relay, args=(stream,), daemon=True)
        self.thread.start()

    def relay(self, stream: IO[str]) -> None:
        for line in stream:
            sys.stdout.write(line)
            sys.stdout.flush()
            if any(c.isalnum() for c in line):  # not a table's border
                self.last = line.strip()


def run_with_heartbeat(command: list[str], label: str) -> int:
    """Run ``command``; a line of progress (time so far, its last output) per interval; its exit status."""
    tick = TERMINAL_INTERVAL if stderr_is_terminal() else max(log_interval(), 0.05)
    progress = bar(total=None, desc=f"{label}: started", bar_format="{desc}")  # tqdm imported before the start
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    try:  # from here on, a signal to us stops the command too
        relay = OutputRelay(proc.stdout)
        while True:
            try:
                proc.wait(timeout=tick)
                break
            except subprocess.TimeoutExpired:
                last = f"; its last output: {relay.last[:80]}" if relay.last else ""
                progress.set_description_str(f"{label}: running for {time.monotonic() - start:.1f} s{last}")
        relay.thread.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()
        progress.set_description_str(f"{label}: finished in {time.monotonic() - start:.1f} s (exit status "
                                     f"{proc.returncode})", refresh=False)
        progress.close()
    return proc.returncode if proc.returncode >= 0 else 128 - proc.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.progress",
                                     description="Run a command with a progress heartbeat on stderr (run_all.sh "
                                                 "wraps onnxsim in it); the exit status is the command's.")
    parser.add_argument("--label", default="step", help="name shown in the progress lines (default: step)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from beit_pipeline import cli
    from beit_pipeline.errors import UsageError

    def run(args):
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            raise UsageError("give the command after --")
        return run_with_heartbeat(command, args.label)

    return cli.run_main(build_parser(), run, argv, interrupted_hint="the command was stopped too")


if __name__ == "__main__":
    sys.exit(main())
