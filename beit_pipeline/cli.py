"""The command-line layer every script shares: logging, signals and the one place errors become messages.

A script builds its parser and hands its work function to ``run_main``::

    def main(argv=None):
        return cli.run_main(build_parser(), run, argv)

``run`` raises ``PipelineError`` (or lets an ``OSError`` or ``KeyboardInterrupt``
escape); ``run_main`` turns each into one ``error: ...`` line on stderr and the
exit code of errors.py.  Progress and results go to stdout through ``logging``
(INFO, no prefix); warnings and errors to stderr as ``warning: ...`` / ``error: ...``.

Ctrl-C is never lost.  Python raises KeyboardInterrupt wherever SIGINT lands, and
where that is a weakref callback or a ``__del__`` (an import's module lock, a C
extension's finaliser) it prints "Exception ignored" and carries on.  So the
handler installed by ``catch_interrupts`` (when beit_pipeline is imported) also
records the signal: a file is never published after it (files.publish_temporary
asks ``check_interrupted``), ``run_main`` ends with exit 130 whatever the work did,
and an interrupt outside ``run_main`` (during the imports) is one line and exit 130.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
from typing import TYPE_CHECKING

from beit_pipeline.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    PipelineError,
    Terminated,
    UsageError,
)

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable, Iterator, Sequence

LOGGER_NAME = "beit_pipeline"  # the package: every module logs to getLogger(__name__) below it
log = logging.getLogger(LOGGER_NAME)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_interrupts = []  # the SIGINTs this process received (see the module's docstring)


def printable(text: str) -> str:
    """``text`` with the bytes of non-UTF-8 file names (surrogate escapes) as \\xNN, printable in any locale."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _LevelFormatter(logging.Formatter):
    """INFO as the bare message; WARNING and above as ``warning: message`` / ``error: message``."""

    def __init__(self, info_prefix=""):
        super().__init__()
        self.info_prefix = info_prefix

    def format(self, record):
        message = printable(record.getMessage())
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return self.info_prefix + message


class _StreamHandler(logging.StreamHandler):
    """A handler that looks up sys.stdout / sys.stderr at each record (pytest's capsys swaps them)."""

    def __init__(self, stream_name, formatter, levels):
        super().__init__()
        self.stream_name = stream_name
        self.setFormatter(formatter)
        self.addFilter(lambda record: levels[0] <= record.levelno < levels[1])

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value):  # logging.StreamHandler.__init__ assigns it
        pass

    def flush(self):
        getattr(sys, self.stream_name).flush()


def setup_logging(info_prefix: str = "") -> logging.Logger:
    """Configure the package's logger once: INFO to stdout, WARNING and above to stderr.

    Every module logs to ``logging.getLogger(__name__)``, below this one.  A module run with
    ``python3 -m beit_pipeline.X`` is ``__main__``, so that logger gets the same handlers.
    ``info_prefix`` prefixes INFO lines (beit_infer.py prints ais_bench's ``[INFO] ``).
    Calling it again (a second main() in one process) replaces the handlers.
    """
    for logger in (log, logging.getLogger("__main__")):
        logger.handlers.clear()
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(_StreamHandler("stdout", _LevelFormatter(info_prefix), (logging.DEBUG, logging.WARNING)))
        logger.addHandler(_StreamHandler("stderr", _LevelFormatter(), (logging.WARNING, logging.CRITICAL + 1)))
    return log


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread while the block runs, so clean-up code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_sigint(signum, frame):
    _interrupts.append(signum)
    raise KeyboardInterrupt


def _excepthook(kind, value, traceback):
    """A KeyboardInterrupt that escapes every handler (Ctrl-C during a script's imports): one line, exit 130."""
    if not issubclass(kind, KeyboardInterrupt):
        return _previous_excepthook[0](kind, value, traceback)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        sys.stderr.write("error: interrupted\n")
        sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


_previous_excepthook = [sys.excepthook]


def catch_interrupts() -> None:
    """Record every SIGINT as well as raising KeyboardInterrupt; idempotent, main thread only.

    A SIGINT that the parent set to be ignored (nohup) stays ignored.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)
    if sys.excepthook is not _excepthook:
        _previous_excepthook[0] = sys.excepthook
        sys.excepthook = _excepthook


def interrupted() -> bool:
    """Whether a SIGINT arrived since the last run_main began (even one whose KeyboardInterrupt was swallowed)."""
    return bool(_interrupts)


def check_interrupted() -> None:
    """Raise KeyboardInterrupt if a SIGINT arrived and its exception was swallowed (main thread only).

    Called before a file is given its final name, so that nothing is published after Ctrl-C.
    """
    if _interrupts and threading.current_thread() is threading.main_thread():
        raise KeyboardInterrupt


def describe_os_error(exc: OSError) -> str:
    """``path: reason`` for an OSError, naming the file whenever the error carries it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    if names:
        shown = " -> ".join(n if isinstance(n, str) else repr(n) for n in names)
        return f"{shown}: {reason}"
    return reason


def error_message(text: object) -> str:
    """One line, without terminal colour codes (torch's messages carry them)."""
    return _ANSI.sub("", str(text)).strip()


def run_main(parser: argparse.ArgumentParser, work: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None, interrupted_hint: str = "", info_prefix: str = "",
             setup: Callable[[argparse.Namespace], None] | None = None) -> int:
    """Parse ``argv``, run ``work(args)`` and return the exit code; the only place errors are printed.

    ``work`` returns None (success) or an exit code.  ``interrupted_hint`` is
    appended to the Ctrl-C / SIGTERM message (what to rerun, what was kept).
    ``setup(args)`` runs before ``work`` for argument checks that raise UsageError.
    """
    catch_interrupts()
    setup_logging(info_prefix)
    args = parser.parse_args(argv)
    hint = f"; {interrupted_hint}" if interrupted_hint else ""
    try:
        with terminate_as_exception():
            if setup is not None:
                setup(args)
            code = work(args)
        message, code = None, (EXIT_OK if code is None else code)
    except BaseException as exc:  # noqa: B036 -- every way out of the work is named below
        message, code = _outcome(exc, hint)
    if interrupted() and code != EXIT_INTERRUPTED:
        # A SIGINT whose KeyboardInterrupt Python swallowed, or that ended the work as another error.
        message, code = f"interrupted{hint}", EXIT_INTERRUPTED
    del _interrupts[:]
    if message is not None:
        log.error(message)
    return code


def _outcome(exc, hint):
    """(the ``error:`` message, the exit code) of an exception that ended the work; re-raises unknown ones."""
    if isinstance(exc, PipelineError):
        return error_message(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return f"interrupted{hint}", EXIT_INTERRUPTED
    if isinstance(exc, Terminated):
        return f"terminated (SIGTERM){hint}", EXIT_TERMINATED
    if isinstance(exc, OSError):
        return describe_os_error(exc), EXIT_FAILED
    if isinstance(exc, MemoryError):
        return "out of memory; use a smaller --batch_size or fewer workers", EXIT_FAILED
    if interrupted():  # whatever a swallowed Ctrl-C turned into (a library's wrapped error)
        return f"interrupted{hint}", EXIT_INTERRUPTED
    raise exc


def check(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless ``condition``: for argument checks after parsing."""
    if not condition:
        raise UsageError(message)
