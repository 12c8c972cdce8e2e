"""The command-line layer every script shares: logging, signals and the one place errors become messages.

A script builds its parser and hands its work function to ``run_main``::

    def main(argv=None):
        return cli.run_main(build_parser(), run, argv)

``run`` raises ``PipelineError`` (or lets an ``OSError`` or ``KeyboardInterrupt``
escape); ``run_main`` turns each into one ``error: ...`` line on stderr and the
exit code of errors.py.  Progress and results go to stdout through ``logging``
(INFO, no prefix); warnings and errors to stderr as ``warning: ...`` / ``error: ...``.
"""

import contextlib
import logging
import re
import signal
import sys
import threading

from beit_pipeline.errors import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_TERMINATED, PipelineError,
                                  Terminated, UsageError)

LOGGER_NAME = "beit"
log = logging.getLogger(LOGGER_NAME)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _LevelFormatter(logging.Formatter):
    """INFO as the bare message; WARNING and above as ``warning: message`` / ``error: message``."""

    def __init__(self, info_prefix=""):
        super().__init__()
        self.info_prefix = info_prefix

    def format(self, record):
        message = record.getMessage()
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


def setup_logging(info_prefix=""):
    """Configure the ``beit`` logger once: INFO to stdout, WARNING and above to stderr.

    ``info_prefix`` prefixes INFO lines (beit_infer.py prints ais_bench's ``[INFO] ``).
    Calling it again (a second main() in one process) replaces the handlers.
    """
    log.handlers.clear()
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(_StreamHandler("stdout", _LevelFormatter(info_prefix), (logging.DEBUG, logging.WARNING)))
    log.addHandler(_StreamHandler("stderr", _LevelFormatter(), (logging.WARNING, logging.CRITICAL + 1)))
    return log


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def terminate_as_exception():
    """SIGTERM raises Terminated in the main thread while the block runs, so clean-up code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def describe_os_error(exc):
    """``path: reason`` for an OSError, naming the file whenever the error carries it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    if names:
        shown = " -> ".join(n if isinstance(n, str) else repr(n) for n in names)
        return f"{shown}: {reason}"
    return reason


def error_message(text):
    """One line, without terminal colour codes (torch's messages carry them)."""
    return _ANSI.sub("", str(text)).strip()


def run_main(parser, work, argv=None, interrupted_hint="", info_prefix="", setup=None):
    """Parse ``argv``, run ``work(args)`` and return the exit code; the only place errors are printed.

    ``work`` returns None (success) or an exit code.  ``interrupted_hint`` is
    appended to the Ctrl-C / SIGTERM message (what to rerun, what was kept).
    ``setup(args)`` runs before ``work`` for argument checks that raise UsageError.
    """
    setup_logging(info_prefix)
    args = parser.parse_args(argv)
    hint = f"; {interrupted_hint}" if interrupted_hint else ""
    try:
        with terminate_as_exception():
            if setup is not None:
                setup(args)
            code = work(args)
    except PipelineError as exc:
        log.error(error_message(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        log.error(f"interrupted{hint}")
        return EXIT_INTERRUPTED
    except Terminated:
        log.error(f"terminated (SIGTERM){hint}")
        return EXIT_TERMINATED
    except OSError as exc:
        log.error(describe_os_error(exc))
        return EXIT_FAILED
    except MemoryError:
        log.error("out of memory; use a smaller --batch_size or fewer workers")
        return EXIT_FAILED
    return EXIT_OK if code is None else code


def check(condition, message):
    """Raise UsageError(message) unless ``condition``: for argument checks after parsing."""
    if not condition:
        raise UsageError(message)
