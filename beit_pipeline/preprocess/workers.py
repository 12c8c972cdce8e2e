"""The helpers of a preprocessing run: a ring of batch buffers, workers that decode into it, a writer thread.

Decoding, resizing and the float conversion (about 3 ms an image) run in forked
processes, each straight into its row of a batch buffer in shared memory, so the
parent copies no pixels: it only hands out chunks of images and hands full
buffers to one background thread, which writes them (600 KB an image, fsynced)
with O_DIRECT where the file system allows it.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import errno
import logging
import mmap
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from beit_pipeline import files
from beit_pipeline.errors import PipelineError, WriteError
from beit_pipeline.preprocess import batches
from beit_pipeline.preprocess.transform import (
    BadImageError,
    WideImage,
    decode_noting_mode,
    geometry,
    is_wide_mode,
    resize_center_crop,
    shown,
    to_float,
)

log = logging.getLogger(__name__)

WRITER_DEPTH = 2  # batches queued for the writer thread
CHUNK = 8  # images per worker task
TASKS_PER_WORKER = 2  # one decoding, one queued: a worker never waits for the parent to hand out the next
DIRECT_ALIGN = 4096  # O_DIRECT's alignment of memory, offset and length: a page covers every common disk


def write_error(path: str, exc: Exception) -> WriteError:
    reason = (exc.strerror or exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return WriteError(f"cannot write {path}: {reason}")


def usable_cpus() -> int:
    """Cores this process may run on (a container or taskset may allow fewer than os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    Each image allocates a few buffers of 150 KB to 1 MB, which glibc by
    default maps and unmaps every time: the page faults and unmaps (which
    also interrupt the writer thread) cost about a quarter of the CPU time.
    Process-wide, so only done when run as a script; a no-op without glibc.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


# ---------------------------------------------------------------- the ring of batch buffers

def ring_batches(batch_size: int, workers: int) -> int:
    """Batch buffers a run needs: queued + being written + being filled, and room for the images that workers
    decode ahead (one process decodes into the batch being filled)."""
    ahead = workers * TASKS_PER_WORKER * CHUNK if workers > 1 else 0
    return WRITER_DEPTH + 2 + -(-ahead // batch_size)


class BatchRing:
    """``count`` float32 batch buffers in shared memory, page-aligned; row ``p`` is where image position p goes.

    Position p (the p-th image written by this run) is row p % bs of batch
    p // bs, which lives in buffer (p // bs) % count: a buffer is reused once
    its batch is written, and the decoder never runs ``count`` batches ahead.
    """

    def __init__(self, batch_size: int, count: int):
        crop = geometry().crop
        self.batch_size, self.count = batch_size, count
        nbytes = batches.batch_nbytes(batch_size, crop)
        stride = -(-nbytes // DIRECT_ALIGN) * DIRECT_ALIGN
        memory = mmap.mmap(-1, stride * count)  # MAP_SHARED: the forked workers write into it
        shape = batches.batch_shape(batch_size, crop)
        self.buffers = [np.frombuffer(memory, np.float32, nbytes // 4, k * stride).reshape(shape)
                        for k in range(count)]

    def batch(self, index: int) -> np.ndarray:
        return self.buffers[index % self.count]

    def row(self, position: int) -> np.ndarray:
        return self.batch(position // self.batch_size)[position % self.batch_size]


# ---------------------------------------------------------------- decoding

def decode_into(row: np.ndarray, path: str) -> WideImage | str | None:
    """Decode ``path`` into ``row`` (float32 (3, S, S)).  Returns None; a WideImage (decoded, but its file has
    more than 8 bits per channel); or the message of a bad image (row untouched)."""
    try:
        image, mode = decode_noting_mode(path)
        crop = resize_center_crop(image)
    except BadImageError as exc:
        return str(exc)
    to_float(np.ascontiguousarray(crop.transpose(2, 0, 1)), out=row)  # converting a strided view is slower
    return WideImage(mode) if is_wide_mode(mode) else None


def _worker_init(max_pixels, parent):
    Image.MAX_IMAGE_PIXELS = max_pixels
    # Ctrl-C reaches the whole process group: the parent alone reacts and terminates the workers.
    # SIGTERM (which terminate() sends) must kill a worker, not run the parent's inherited handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # If the parent is killed (SIGKILL, OOM), a worker would wait for tasks forever: ask
    # Linux to kill it with its parent (prctl PR_SET_PDEATHSIG = 1).  Elsewhere a no-op.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _worker_main(conn, paths, ring, max_pixels, parent):
    """A worker: decode each task's images (first image, first position, count) into the ring; reply with
    their problems, or with the exception that stopped it."""
    _worker_init(max_pixels, parent)
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        first, position, count = task
        try:
            reply = [decode_into(ring.row(position + i), paths[first + i]) for i in range(count)]
        except Exception as exc:  # a bug or MemoryError: the parent raises it
            reply = exc
        conn.send(reply)


@dataclasses.dataclass
class Placement:
    """The consumer's progress, which decides where new images are decoded: images consumed, rows filled."""

    consumed: int = 0
    filled: int = 0


class SerialDecoder:
    """Decode in this process, each image straight into its final row."""

    def __init__(self, paths: Sequence[str], ring: BatchRing):
        self.paths, self.ring = paths, ring

    def images(self, placement: Placement, writer: BatchWriter) -> Iterator[tuple[int, int, WideImage | str | None]]:
        """Yield (index, position, outcome) for every path in order (decode_into's outcome); the row at
        ``position`` holds the image."""
        for index, path in enumerate(self.paths):
            position = placement.filled
            writer.wait_done(position // self.ring.batch_size - self.ring.count + 1)
            yield index, position, decode_into(self.ring.row(position), path)

    def close(self) -> None:
        pass


class _Chunk:
    def __init__(self, first, position, count):
        self.first, self.position, self.count, self.problems = first, position, count, None


class ParallelDecoder:
    """Decode in forked worker processes, each image into a ring row chosen when its chunk is handed out.

    A chunk goes to rows from (its first image) - (bad images seen so far), the
    row its first image gets if no image still in flight is bad; when one is, the
    consumer moves the later images back (``position`` > its row).  Rows are never
    handed out twice while in use, and never beyond the batches the writer has freed.
    """

    def __init__(self, paths: Sequence[str], ring: BatchRing, workers: int, max_pixels: int):
        self.paths, self.ring = paths, ring
        context = multiprocessing.get_context("fork")
        self.workers = []
        for _ in range(workers):
            mine, theirs = context.Pipe()
            process = context.Process(target=_worker_main, args=(theirs, paths, ring, max_pixels, os.getpid()),
                                      daemon=True, name="decoder")
            process.start()
            theirs.close()
            self.workers.append((process, mine, collections.deque()))
        self.pending, self.next_first = collections.deque(), 0  # chunks handed out, in order; the next image
        # At once: the workers decode while the parent starts the writer and imports tqdm (25 ms).
        self._hand_out(Placement(), 0)

    def images(self, placement: Placement, writer: BatchWriter) -> Iterator[tuple[int, int, WideImage | str | None]]:
        """Yield (index, position, outcome) for every path in order (decode_into's outcome); the row at
        ``position`` holds the image."""
        pending = self.pending
        while self.next_first < len(self.paths) or pending:
            self._hand_out(placement, writer.done)
            if not pending:  # the ring is full: only the writer can free a batch
                writer.wait_done(writer.done + 1)
                continue
            while pending[0].problems is None:
                self._receive()
                self._hand_out(placement, writer.done)
            chunk = pending.popleft()
            for i, problem in enumerate(chunk.problems):
                yield chunk.first + i, chunk.position + i, problem

    def _hand_out(self, placement, written):
        """Give chunks to the workers with room, as far as the ring allows (``written`` batches are free)."""
        ring, pending = self.ring, self.pending
        while self.next_first < len(self.paths):
            process, conn, tasks = min(self.workers, key=lambda w: len(w[2]))
            position = self.next_first - (placement.consumed - placement.filled)
            if pending:  # after the rows of the chunks still in flight
                position = max(position, pending[-1].position + pending[-1].count)
            count = min(CHUNK, len(self.paths) - self.next_first)
            if len(tasks) >= TASKS_PER_WORKER or (position + count - 1) // ring.batch_size >= written + ring.count:
                return
            chunk = _Chunk(self.next_first, position, count)
            try:
                conn.send((chunk.first, chunk.position, chunk.count))
            except OSError:  # the worker is gone (killed, or crashed in a decoder)
                raise self._died(process, chunk) from None
            tasks.append(chunk)
            pending.append(chunk)
            self.next_first += count

    def _receive(self):
        """Wait for replies and record them; raise what a worker raised, or its death."""
        busy = [worker for worker in self.workers if worker[2]]
        ready = set(multiprocessing.connection.wait([w[1] for w in busy] + [w[0].sentinel for w in busy]))
        for process, conn, tasks in busy:
            if conn in ready or process.sentinel in ready:
                try:
                    reply = conn.recv()
                except (EOFError, OSError):
                    raise self._died(process, tasks[0]) from None
                if isinstance(reply, BaseException):
                    raise reply
                tasks.popleft().problems = reply

    def _died(self, process, chunk):
        process.join(1)
        code = process.exitcode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited ({code})"
        return PipelineError(f"a decoding worker {how} with {shown(self.paths[chunk.first])} or one of the "
                             f"{chunk.count - 1} images after it to decode")

    def close(self) -> None:
        for process, conn, _ in self.workers:
            if process.is_alive():
                process.terminate()
        for process, conn, _ in self.workers:
            process.join()
            conn.close()


def fork_workers(requested: int) -> int:
    """``requested``, or 1 where this platform cannot fork (the workers rely on it)."""
    if requested > 1 and "fork" not in multiprocessing.get_all_start_methods():
        log.warning("no fork() on this platform; decoding with 1 worker")
        return 1
    return requested


@contextlib.contextmanager
def decoded(paths: Sequence[str], ring: BatchRing, workers: int,
            max_pixels: int) -> Iterator[ParallelDecoder | SerialDecoder]:
    """A decoder of ``paths`` into ``ring`` (see images()); its workers are gone afterwards."""
    decoder = ParallelDecoder(paths, ring, workers, max_pixels) if workers > 1 else SerialDecoder(paths, ring)
    try:
        yield decoder
    finally:
        decoder.close()


# ---------------------------------------------------------------- writing

def direct_writable(array: np.ndarray) -> bool:
    """Whether ``array`` (float32, C order) may be written with O_DIRECT: aligned address and length."""
    return (getattr(os, "O_DIRECT", 0) != 0 and array.flags.c_contiguous and array.dtype == np.float32
            and array.ctypes.data % DIRECT_ALIGN == 0 and array.nbytes % DIRECT_ALIGN == 0)


def write_batch_direct(path: str, array: np.ndarray) -> bool:
    """batches.write_batch()'s atomic, fsynced write with O_DIRECT; False (nothing written) where refused.

    The disk reads the batch straight from ``array``: the buffered write's copy
    into the page cache cost the writer thread 2 to 10 ms of CPU per 4.8 MB batch
    here (fresh page-cache pages are slow to touch in a VM), as much as decoding 3 images.
    """
    with files.temporary_beside(path) as tmp:
        try:
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_DIRECT), "wb", buffering=0) as f:
                data, done = memoryview(array).cast("B"), 0
                while done < len(data):
                    done += f.write(data[done:])
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # this file system (or an odd block size) does not take O_DIRECT
                return False
            raise
        files.publish_temporary(tmp, path)
    return True


class BatchWriter:
    """Writes batch files, in order, on a background thread; a context manager.

    A batch is 600 KB per image and the atomic write fsyncs it.  File writes
    release the GIL, so the disk works while the next images decode.  ``done``
    counts the batches finished (written, or dropped after an error): the ring
    reuses a buffer only then.  Leaving the block waits for every queued batch
    (those before a bad image or a Ctrl-C are kept for a rerun) and then raises
    the first write error, unless another exception is already on its way.
    """

    def __init__(self, depth: int = WRITER_DEPTH):
        self.queue = queue.Queue(maxsize=depth)
        self.direct = True  # until the file system refuses O_DIRECT
        self.done = 0
        self.finished = threading.Condition()
        self.error = None
        self.thread = threading.Thread(target=self._run, name="batch-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            item = self.queue.get()
            if item is None:
                return
            path, batch = item
            if self.error is None:  # after a failure, write nothing more: batches stay a prefix
                try:
                    self._write(path, batch)
                except Exception as exc:  # the thread must live on, or put() would block forever
                    self.error = write_error(path, exc)
            with self.finished:
                self.done += 1
                self.finished.notify_all()

    def _write(self, path, batch):
        if self.direct and direct_writable(batch):
            if write_batch_direct(path, batch):
                return
            self.direct = False  # refused once, refused for the rest of the run
        batches.write_batch(path, batch)

    def wait_done(self, count: int) -> None:
        """Wait until ``count`` batches are finished."""
        with self.finished:
            self.finished.wait_for(lambda: self.done >= count)

    def put(self, path: str, batch: np.ndarray) -> None:
        """Queue ``batch`` (a ring buffer, left untouched until ``done`` counts it) to be written to ``path``."""
        if self.error is not None:
            raise self.error
        self.queue.put((path, batch))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error
