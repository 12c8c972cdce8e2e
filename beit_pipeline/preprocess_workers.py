"""The two helpers of a preprocessing run: a pool that decodes images, a thread that writes batches.

Decoding and resizing (about 3 ms an image) run in forked processes; the crops
come back through shared memory.  Batch files (600 KB an image, fsynced) are
written by one background thread while the next images decode.
"""

import collections
import contextlib
import ctypes
import mmap
import multiprocessing
import os
import queue
import signal
import threading

import numpy as np
from PIL import Image

from beit_pipeline import batches
from beit_pipeline.cli import log
from beit_pipeline.errors import PipelineError
from beit_pipeline.preprocess_transform import BadImageError, decode_rgb, geometry, load_crop, resize_center_crop

WRITER_DEPTH = 2  # batches queued for the writer thread


class WriteError(PipelineError):
    """An output file could not be written (disk full, permissions); the message names it."""


def write_error(path, exc):
    reason = (exc.strerror or exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return WriteError(f"cannot write {path}: {reason}")


def usable_cpus():
    """Cores this process may run on (a container or taskset may allow fewer than os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def keep_freed_memory():
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


# ---------------------------------------------------------------- decoding

def load_serial(path):
    """(uint8 crop, None) or (None, error message): a bad image must not stop the others."""
    try:
        return load_crop(path), None
    except BadImageError as exc:
        return None, str(exc)


_SLOTS = None  # in a pool worker: the shared (slots, 3, 224, 224) uint8 array crops are written to


def _worker_init(max_pixels, slots, parent):
    global _SLOTS
    Image.MAX_IMAGE_PIXELS = max_pixels
    _SLOTS = slots
    # Ctrl-C reaches the whole process group: the parent alone reacts and terminates the pool.
    # SIGTERM (which Pool.terminate sends) must kill a worker, not run the parent's inherited handler.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # If the parent is killed (SIGKILL, OOM), a pool worker would wait for tasks forever: ask
    # Linux to kill it with its parent (prctl PR_SET_PDEATHSIG = 1).  Elsewhere a no-op.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


def _load_chunk(first_slot, paths):
    """Pool task: decode ``paths`` into consecutive shared slots; return their errors (None when good)."""
    problems = []
    for slot, path in enumerate(paths, first_slot):
        try:
            _SLOTS[slot] = resize_center_crop(decode_rgb(path)).transpose(2, 0, 1)
            problems.append(None)
        except BadImageError as exc:
            problems.append(str(exc))
    return problems


class ParallelLoader:
    """Decode and crop images in a pool of forked processes; iterate (crop, problem) in input order.

    The crops come back through shared memory rather than the pool's pipe:
    pickling 150 KB per image through a 64 KB pipe cost the parent about
    0.5 ms of CPU per image, against about 3 ms of decoding and resizing.
    At most ``2 * workers + 2`` chunks are in flight, one slot region each,
    and a region is handed out again only after its crops were consumed.
    """

    def __init__(self, paths, workers, max_pixels, chunk=8):
        self.paths, self.chunk = paths, chunk
        self.in_flight = 2 * workers + 2
        crop = geometry().crop  # the model's input size (use_image_size), set before the fork
        memory = mmap.mmap(-1, self.in_flight * chunk * 3 * crop * crop)  # shared with forked children
        self.slots = np.frombuffer(memory, np.uint8).reshape(-1, 3, crop, crop)
        context = multiprocessing.get_context("fork")
        self.pool = context.Pool(workers, initializer=_worker_init, initargs=(max_pixels, self.slots, os.getpid()))

    def __iter__(self):
        pending = collections.deque()
        starts = range(0, len(self.paths), self.chunk)
        for n, start in enumerate(starts):
            if len(pending) == self.in_flight:
                yield from self._collect(*pending.popleft())
            first_slot = (n % self.in_flight) * self.chunk
            part = self.paths[start:start + self.chunk]
            pending.append((self.pool.apply_async(_load_chunk, (first_slot, part)), first_slot))
        while pending:
            yield from self._collect(*pending.popleft())

    def _collect(self, result, first_slot):
        # The consumer copies each crop before asking for the next one, so the region is free afterwards.
        for slot, problem in enumerate(result.get(), first_slot):
            yield (None if problem else self.slots[slot]), problem

    def close(self):
        self.pool.terminate()
        self.pool.join()


def fork_workers(requested):
    """``requested``, or 1 where this platform cannot fork (the pool relies on it)."""
    if requested > 1 and "fork" not in multiprocessing.get_all_start_methods():
        log.warning("no fork() on this platform; decoding with 1 worker")
        return 1
    return requested


@contextlib.contextmanager
def decoded(paths, workers, max_pixels):
    """Yield an iterator of (uint8 crop, problem) for ``paths`` in order; the pool is gone afterwards."""
    if workers <= 1:
        yield map(load_serial, paths)
        return
    loader = ParallelLoader(paths, workers, max_pixels)
    try:
        yield loader
    finally:
        loader.close()


# ---------------------------------------------------------------- writing

class BatchWriter:
    """Writes batch files, in order, on a background thread; a context manager.

    A batch is 600 KB per image and the atomic write fsyncs it: about 1 ms per
    image here, mostly in the kernel.  File writes and Pillow both release the
    GIL, so the disk works while the next images decode.  The batch buffers are
    reused (a fresh 600 KB per image costs page faults): ``depth`` queued + one
    being written + one being filled, so a buffer comes round again only once
    its file is written.  Leaving the block waits for every queued batch (those
    before a bad image or a Ctrl-C are kept for a rerun) and then raises the
    first write error, unless another exception is already on its way.
    """

    def __init__(self, batch_size, depth=WRITER_DEPTH):
        self.queue = queue.Queue(maxsize=depth)
        shape = batches.batch_shape(batch_size, geometry().crop)
        self.buffers = [np.zeros(shape, np.float32) for _ in range(depth + 2)]
        self.written = 0
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
                    batches.write_batch(path, batch)
                except Exception as exc:  # the thread must live on, or put() would block forever
                    self.error = write_error(path, exc)

    def next_buffer(self):
        """The float32 buffer to fill for the next put()."""
        return self.buffers[self.written % len(self.buffers)]

    def put(self, path, batch):
        if self.error is not None:
            raise self.error
        if batch is not self.next_buffer():
            raise ValueError("put() takes the buffer next_buffer() returned")
        self.written += 1
        self.queue.put((path, batch))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if exc_type is None and self.error is not None:
            raise self.error
