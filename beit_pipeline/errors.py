"""The one error type of the pipeline, and the exit codes it carries.

Every script exits with one of these codes (README, "Exit codes"):

    0    done
    1    bad input or a failed step: an image, checkpoint, graph, manifest, label or
         output file that is missing or malformed, a write that failed (disk full,
         permissions), an external tool that failed
    2    usage: a flag or its value is wrong (argparse's own code too)
    3    a check failed: the step ran, but its result differs from the reference
         beyond the tolerance, so nothing was written
    4    busy: another run holds the folder's lock
    130  interrupted (Ctrl-C, SIGINT); 143 terminated (SIGTERM)

and, between run_all.sh and workstate.py only, 10: the step is complete for these inputs (skip it).
run_all.sh reads them from here (shell_assignments).
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECK = 3
EXIT_BUSY = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_SKIP = 10  # workstate.py start: the step is complete for these inputs


class PipelineError(Exception):
    """An error a person can act on; the message names the file or flag, the exit code says what kind.

    Raise it (or a subclass) anywhere; ``cli.run_main`` prints ``error: <message>``
    and exits with ``exit_code``.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(PipelineError):
    """A flag or its value is wrong."""

    exit_code = EXIT_USAGE


class PipelineFileError(PipelineError):
    """A file that one step hands to another is missing or malformed; the message names it."""


class CheckFailed(PipelineError):
    """A step's result differs from its reference beyond the tolerance."""

    exit_code = EXIT_CHECK


class FolderBusy(PipelineError):
    """Another live process holds the lock of a folder."""

    exit_code = EXIT_BUSY


# raised by model.export
class ExportError(PipelineError):
    """The export or its verification failed; the message says which and why."""


# raised by model.checkpoints
class CheckpointError(PipelineError):
    """The checkpoint cannot be read or does not fit a BEiT model."""


# raised by graph.index
class PatternError(PipelineError):
    """The graph lacks a pattern the rewrite relies on, or it is not as expected (exit 1)."""

    def __init__(self, pattern: str, detail: str):
        super().__init__(f"pattern '{pattern}' not found: {detail}")
        self.pattern = pattern


# raised by inference.sessions
class OnnxCheckError(PipelineError):
    """A model cannot be read or run, or two models disagree; the message names the file."""


# raised by inference.sessions
class BatchShapeError(OnnxCheckError):
    """The models cannot take the batch size asked for, or none can be chosen (a usage error)."""

    exit_code = EXIT_USAGE


# raised by inference.sessions
class ModelsDisagree(OnnxCheckError):
    """Both models ran, but their outputs cannot be compared (different shapes)."""

    exit_code = EXIT_CHECK


# raised by inference.runner
class InferError(PipelineError):
    """A model or an input that does not fit an image model run (exit 1); the message names the file."""


# raised by preprocess.workers
class WriteError(PipelineError):
    """An output file could not be written (disk full, permissions); the message names it."""


# raised by preprocess.transform
class BadImageError(PipelineFileError):
    """An image file that cannot be decoded; the message names the file and the reason."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks clean up as on Ctrl-C.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """


def shell_assignments() -> str:
    """``readonly EXIT_OK=0 EXIT_FAILED=1 ...``: every exit code of this module, for run_all.sh to eval."""
    codes = {name: value for name, value in globals().items() if name.startswith("EXIT_")}
    return "readonly " + " ".join(f"{name}={value}" for name, value in codes.items())
