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
"""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CHECK = 3
EXIT_BUSY = 4
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class PipelineError(Exception):
    """An error a person can act on; the message names the file or flag, the exit code says what kind.

    Raise it (or a subclass) anywhere; ``cli.run_main`` prints ``error: <message>``
    and exits with ``exit_code``.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message, exit_code=None):
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


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks clean up as on Ctrl-C.

    A BaseException, like KeyboardInterrupt, so that ``except Exception`` does not swallow it.
    """
