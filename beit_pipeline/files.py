"""Atomic writes and folder locks: a file is either absent or complete, and one run owns a folder.

A killed process leaves at worst a ``.<name>.XXXX.tmp`` file beside the file it was
writing, never a half-written file under the final name that a later step would
trust.  ``FolderLock`` keeps two runs out of one output folder; the kernel drops
the lock of a process that dies, so a stale lock is simply taken over.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from beit_pipeline.cli import check_interrupted
from beit_pipeline.errors import FolderBusy

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def temporary_beside(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a new temporary file's path in ``path``'s folder; it is deleted unless renamed by then.

    Publish it with publish_temporary() inside the block.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            try:
                os.unlink(tmp)
            except OSError:
                pass


def publish_temporary(tmp: str, path: str | os.PathLike[str]) -> None:
    """Give a finished mkstemp file its final name, with the mode a plain open() would give it.

    mkstemp makes files 0600, but atc and ais_bench often run as another user (HwHiAiUser)
    than the one who converted the model.
    """
    check_interrupted()  # never publish after Ctrl-C, also one whose KeyboardInterrupt Python swallowed
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete (and fsynced).

    An OSError names ``path`` (a full disk's ENOSPC carries no file name of its own).
    """
    with naming_errors(path), temporary_beside(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_temporary(tmp, path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"))


_SURROGATE = re.compile("[\udc80-\udcff]")


def json_text(obj: object, indent: int | None = 2) -> str:
    """JSON text that is valid UTF-8 even for file names that are not (their bytes, surrogate-escaped by
    os.listdir, written as \\udcXX escapes): json.load gives the same str back, os.fsencode the same bytes."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def write_json_atomic(path: str | os.PathLike[str], obj: object) -> None:
    write_text_atomic(path, json_text(obj) + "\n")


@contextlib.contextmanager
def naming_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Re-raise an OSError that carries no file name (a write's ENOSPC, EIO) with ``path`` as its file name.

    cli.run_main prints ``path: reason``, so a full disk says which file it stopped.
    """
    try:
        yield
    except OSError as exc:
        named = exc.filename is not None and not is_temporary_of(exc.filename, path)
        if named or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc


def is_temporary_of(name: str | bytes | os.PathLike[str] | os.PathLike[bytes], path: str | os.PathLike[str]) -> bool:
    """Whether ``name`` is one of temporary_beside(path)'s files (``.NAME.XXXX.tmp`` beside it)."""
    base = os.path.basename(os.fspath(name))
    return isinstance(base, str) and base.startswith("." + os.path.basename(os.fspath(path)) + ".") \
        and base.endswith(".tmp")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def remove_stale_temporaries_of(path: str | os.PathLike[str]) -> None:
    """Delete the ``.tmp`` files that an interrupted atomic write of ``path`` left beside it."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    prefix = "." + os.path.basename(os.fspath(path)) + "."
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".tmp"):
            remove_temporary(os.path.join(folder, name))


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> None:
    """Delete every ``.tmp`` leftover of an interrupted atomic write in ``folder``.

    Only call it while holding the folder's lock: another run's live temporaries look the same.
    """
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            remove_temporary(os.path.join(folder, name))


def remove_temporary(path: str) -> None:
    """A temporary file, or a temporary folder (a model written with its data file, onnx_files)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def fsync_folder(folder: str) -> None:
    """Make renames in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- locks

def lock_path_for(folder: str | os.PathLike[str]) -> str:
    """The lock file of ``folder``: ``.<name>.lock`` beside it, so that the folder holds only outputs."""
    folder = os.path.abspath(os.fspath(folder)).rstrip(os.sep) or os.sep
    return os.path.join(os.path.dirname(folder), "." + os.path.basename(folder) + ".lock")


def processes_using(path: str) -> list[int]:
    """PIDs of the live processes (this one aside) that have ``path`` open, from Linux's /proc; [] elsewhere.

    A flock belongs to the open file, so after ``kill -9`` of the process that took it, the children
    that inherited the descriptor (run_all.sh's running step) still hold it: these are they.
    """
    try:
        target = os.stat(path)
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []
    found = []
    for pid in sorted(pids):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                found.append(pid)
                break
    return found


def command_of(pid: int, width: int = 100) -> str:
    """The command line of a process, shortened to ``width`` characters; "" when unknown."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = [os.fsdecode(w) for w in f.read().split(b"\0") if w]
    except OSError:
        return ""
    text = " ".join(os.path.basename(w) if i < 2 and os.sep in w else w for i, w in enumerate(words))
    return text if len(text) <= width else text[:width - 3] + "..."


def describe_lock_holder(path: str) -> str:
    """Who holds the lock file ``path``, in words: the PID written in it when that process is alive, else the
    live processes that still have it open (the steps of a killed run_all.sh), or "another process"."""
    recorded = lock_holder(path)
    if recorded and _pid_alive(recorded):
        command = command_of(recorded)
        return f"PID {recorded}" + (f" ({command})" if command else "")
    users = processes_using(path)
    if not users:
        return f"PID {recorded}" if recorded else "another process"
    command = command_of(users[0])
    shown = f"PID {users[0]}" + (f" ({command})" if command else "")
    if len(users) > 1:
        shown += f" and {len(users) - 1} more process{'es' if len(users) > 2 else ''}"
    return shown + (f", left running by PID {recorded}, which is no longer running" if recorded else "")


def lock_holder(path: str) -> int | None:
    """The PID written in a lock file, or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class FolderLock:
    """An exclusive flock(2) on ``.<folder>.lock`` beside a folder, holding the owner's PID.

    ``FolderLock(folder, what, wait=False)`` as a context manager: raises FolderBusy
    naming the PID when another live process holds it (or, with ``wait``, blocks
    until it is free).  The kernel releases the lock of a dead process, so a lock
    file left by a killed run is taken over.  The file is removed on release; the
    inode check after locking makes that safe against a racing second run.
    """

    def __init__(self, folder: str | os.PathLike[str], what: str | None = None, wait: bool = False):
        self.folder = os.fspath(folder)
        self.path = lock_path_for(self.folder)
        self.what = what or self.folder
        self.wait = wait
        self.fd = None

    def acquire(self) -> FolderLock:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        previous = lock_holder(self.path)
        if previous and previous != os.getpid() and not _pid_alive(previous):
            log.info(f"taking over the lock of {self.what} left by PID {previous}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def _lock(self, fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        who = describe_lock_holder(self.path)
        if not self.wait:
            raise FolderBusy(f"{self.what} is in use by {who} (lock {self.path}); wait for it to finish, "
                             "or pass --wait_lock to wait")
        log.info(f"waiting for {who}, which holds {self.what} ...")
        fcntl.flock(fd, fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
