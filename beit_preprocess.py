"""Step 1 of the BEiT offline-inference pipeline: images -> batch files.

    [beit_preprocess.py] -> beit_pth2onnx.py -> onnxsim -> graph_modify.py
    -> atc + ais_bench (Ascend) or beit_infer.py (ONNX Runtime) -> beit_eval_acc.py

Reads a folder of images (ImageNet val as it comes, flat, or one level of
class sub-folders), applies unilm BEiT's eval transform exactly as
torchvision computes it on a PIL image::

    img.convert("RGB") -> Resize(256, bicubic, short side) -> CenterCrop(224)
    -> ToTensor -> Normalize(mean=0.5, std=0.5)

and writes ``input_00000.bin``, ``input_00001.bin``, ... (raw float32, C order,
(batch_size, 3, 224, 224), the last batch zero-padded) plus ``manifest.json``
saying which image is in which row (see beit_io.py).

Usage::

    python3 beit_preprocess.py --image_path imagenet/val --prep_image prep_bs8 --batch_size 8

The output is byte-identical whatever ``--workers`` is, and a run that was
killed finishes where it stopped when started again with the same arguments.
"""

import argparse
import collections
import ctypes
import math
import mmap
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
import warnings

import numpy as np
from PIL import Image, ImageFile
from tqdm import tqdm

import beit_io

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
RESIZE_SIZE = 256  # unilm: int(224 / crop_pct) with crop_pct = 224 / 256
CROP_SIZE = beit_io.IMAGE_SIZE
MEAN = 0.5  # unilm's IMAGENET_INCEPTION_MEAN/STD, the same for the three channels
STD = 0.5
# Pillow's own default; an image above it is refused as a possible decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485
TRANSFORM = ("PIL convert('RGB') -> Resize(256, bicubic, short side) -> CenterCrop(224) -> ToTensor "
             "-> Normalize(mean=0.5, std=0.5), as torchvision computes it on a PIL image")

# A truncated file must be an error, never a silently grey-padded image.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImageError(Exception):
    """An image file that cannot be decoded; the message names the file and the reason."""


class WriteError(Exception):
    """An output file could not be written (disk full, permissions); the message names it."""


def _writing(path, write, *args):
    try:
        write(*args)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------- the transform

def reference_transform():
    """unilm's eval transform as a torchvision Compose (for tests and benchmarks)."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(RESIZE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(CROP_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(mean=[MEAN] * 3, std=[STD] * 3),
    ])


def resize_geometry(width, height, size=RESIZE_SIZE, crop=CROP_SIZE):
    """(new_width, new_height, crop_top, crop_left) exactly as torchvision computes them.

    Resize: the short side becomes ``size`` and the long side is truncated with
    int() (torchvision's _compute_resized_output_size); CenterCrop rounds the
    offsets with round() (banker's rounding, as torchvision does).
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - crop) / 2.0))
    left = int(round((new_w - crop) / 2.0))
    return new_w, new_h, top, left


def _pillow_can_run_vertical_first():
    """Whether the installed Pillow runs the vertical pass first when the height shrinks a lot.

    Pillow 13 does (when the height loses more than twice as many pixels as
    the width); older versions always run the horizontal pass first.  The
    order changes the pixels, so ask Pillow itself, on an image where it shows.
    """
    y, x = np.mgrid[0:64, 0:8]
    img = Image.fromarray(((x * 89 + y * 53 + (x * y) % 7 * 31) % 256).astype(np.uint8), "L")
    both = img.resize((7, 16), Image.BICUBIC)
    horizontal_first = img.resize((7, 64), Image.BICUBIC).resize((7, 16), Image.BICUBIC)
    return both.tobytes() != horizontal_first.tobytes()


_VERTICAL_FIRST_EXISTS = _pillow_can_run_vertical_first()


def pillow_vertical_first(width, height, new_w, new_h):
    """Pillow's choice of pass order for img.resize((new_w, new_h)) (src/libImaging/Resample.c)."""
    shrink_h, shrink_w = height - new_h, width - new_w
    return _VERTICAL_FIRST_EXISTS and shrink_h > 0 and shrink_h > shrink_w * 2


def _source_span(start, count, in_size, out_size):
    """Source pixels [lo, hi) a bicubic pass reads for output pixels [start, start + count).

    The kernel reaches 2 source pixels, times the scale when shrinking; 2 more
    pixels of margin make float rounding irrelevant.
    """
    scale = in_size / out_size
    support = 2.0 * max(scale, 1.0)
    lo = max(0, math.floor(start * scale - support) - 2)
    hi = min(in_size, math.ceil((start + count) * scale + support) + 2)
    return lo, hi


def _crop(img, box):
    return img if box == (0, 0) + img.size else img.crop(box)


def _on_canvas(part, size, offset):
    """``part`` pasted at ``offset`` on a black image of ``size``.

    A pass computes its coefficients from the full source length, so it must
    see the full length; the black pixels only feed outputs that are cropped away.
    """
    if part.size == size:
        return part
    canvas = Image.new(part.mode, size)
    canvas.paste(part, offset)
    return canvas


def resize_center_crop(img, size=RESIZE_SIZE, crop=CROP_SIZE):
    """The 224x224 centre crop of the bicubic resize of an RGB PIL image, as uint8 (H, W, 3).

    Pillow's img.resize((w, h), BICUBIC) is two separable passes, each rounding
    to uint8.  Making the same two passes ourselves, in Pillow's order, gives
    identical pixels but lets each pass skip the rows or columns that the
    centre crop throws away (a tenth less time on 500x375 images), with no
    approximation: a resize with box= would be one, Pillow takes the box in float32.
    """
    width, height = img.size
    new_w, new_h, top, left = resize_geometry(width, height, size, crop)
    if (new_w, new_h) == (width, height):  # torchvision returns the image itself then
        return np.asarray(img)[top:top + crop, left:left + crop]
    if pillow_vertical_first(width, height, new_w, new_h):
        x0, x1 = _source_span(left, crop, width, new_w)
        part = _crop(img, (x0, 0, x1, height)).resize((x1 - x0, new_h), Image.BICUBIC)  # vertical pass
        part = _on_canvas(part.crop((0, top, x1 - x0, top + crop)), (width, crop), (x0, 0))
        part = part.resize((new_w, crop), Image.BICUBIC)  # horizontal pass
        return np.asarray(part)[:, left:left + crop]
    y0, y1 = _source_span(top, crop, height, new_h)
    part = _crop(img, (0, y0, width, y1)).resize((new_w, y1 - y0), Image.BICUBIC)  # horizontal pass
    part = _on_canvas(part.crop((left, 0, left + crop, y1 - y0)), (crop, height), (0, y0))
    part = part.resize((crop, new_h), Image.BICUBIC)  # vertical pass
    return np.asarray(part)[top:top + crop]


def to_float(crops_chw, out=None):
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, the same float32 steps as ToTensor + Normalize."""
    if out is None:
        out = np.empty(crops_chw.shape, np.float32)
    np.copyto(out, crops_chw, casting="unsafe")
    out /= np.float32(255)
    out -= np.float32(MEAN)
    out /= np.float32(STD)
    return out


def decode_rgb(path):
    """Open and fully decode an image as RGB; raise BadImageError naming the file."""
    path = os.fspath(path)
    try:
        # Our own file object: closed on every path out, also when Pillow fails half-way.
        with open(path, "rb") as f, warnings.catch_warnings():
            # Image.open checks the size against Image.MAX_IMAGE_PIXELS: above twice the limit it raises
            # DecompressionBombError, between the limit and twice it only warns; made an error, we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(f)
            img.load()  # Pillow decodes lazily: force the whole file now so truncation shows
        return img if img.mode == "RGB" else img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"{path}: refused as a possible decompression bomb ({exc}); "
                            "raise --max_pixels if the image is genuine") from exc
    except Image.UnidentifiedImageError as exc:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise BadImageError(f"{path}: empty file (0 bytes)" if empty else
                            f"{path}: not a readable image (unknown format or corrupt header)") from exc
    except OSError as exc:
        if exc.errno is not None:  # the file itself: missing, dangling or looping symlink, permissions
            raise BadImageError(f"{path}: cannot open ({exc.strerror or exc})") from exc
        raise BadImageError(f"{path}: cannot decode ({exc})") from exc
    except Exception as exc:  # Pillow's plugins raise many kinds on corrupt data (ValueError, struct.error, ...)
        raise BadImageError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from exc


def load_crop(path):
    """Decode ``path`` and return its resized centre crop as uint8 (3, 224, 224)."""
    crop = resize_center_crop(decode_rgb(path))
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


def preprocess_image(path):
    """One image file -> float32 (3, 224, 224), equal to reference_transform() on img.convert("RGB")."""
    return to_float(load_crop(path))


# ---------------------------------------------------------------- the image folder

def is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder):
    """Relative names of the images in ``folder`` and its class sub-folders (one level), sorted.

    Directory symlinks are not followed, so a link loop cannot hang the walk;
    a file symlink that points nowhere is listed and fails later as a bad image.
    """
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as sub:
                    names.extend(entry.name + "/" + s.name for s in sub
                                 if not s.is_dir(follow_symlinks=False) and is_image_name(s.name))
            elif is_image_name(entry.name):
                names.append(entry.name)
    return sorted(names)


def _load(path):
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
        memory = mmap.mmap(-1, self.in_flight * chunk * 3 * CROP_SIZE * CROP_SIZE)  # shared with forked children
        self.slots = np.frombuffer(memory, np.uint8).reshape(-1, 3, CROP_SIZE, CROP_SIZE)
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


# ---------------------------------------------------------------- the output folder

def check_output_folder(out, batch_size, fingerprint, num_images, source):
    """Refuse a folder made for other settings; return the images an earlier run skipped there.

    Raises beit_io.PipelineFileError with the message to print.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise beit_io.PipelineFileError(f"{out}: exists and is not a folder")
    if not os.path.isdir(out):
        return []
    if not os.path.exists(os.path.join(out, beit_io.MANIFEST_NAME)):
        if beit_io.list_batch_files(out):
            raise beit_io.PipelineFileError(
                f"{out}: holds input_*.bin files but no manifest.json, so where they came from is unknown; "
                f"delete the folder or choose another --prep_image")
        beit_io.remove_stale_temporaries(out)
        return []
    try:
        old = beit_io.load_manifest(out)
    except beit_io.PipelineFileError as exc:
        raise beit_io.PipelineFileError(f"{exc}; delete {out} or choose another --prep_image") from exc
    if (old.get("batch_size"), old.get("fingerprint"), old.get("image_size")) != (
            batch_size, fingerprint, CROP_SIZE):
        raise beit_io.PipelineFileError(
            f"{out} was made with batch size {old.get('batch_size')} from {old.get('num_images')} images "
            f"in {old.get('source')} (image-set fingerprint {old.get('fingerprint')}, image size "
            f"{old.get('image_size')}); this run asks for batch size {batch_size} from {num_images} images "
            f"in {source} (fingerprint {fingerprint}, image size {CROP_SIZE}). Batches of both are never mixed: "
            f"delete {out} or choose another --prep_image")
    skipped = old.get("skipped") or []
    if not all(isinstance(s, dict) and isinstance(s.get("name"), str) for s in skipped):
        raise beit_io.PipelineFileError(
            f"{beit_io.manifest_path(out)}: malformed 'skipped' list; delete {out} or choose another --prep_image")
    beit_io.remove_stale_temporaries(out)  # what a killed run was writing
    return [dict(s) for s in skipped]


def batches_on_disk(out, candidates, batch_size):
    """Manifest entries of the leading batches a killed run already wrote, with the right size.

    Batch k holds candidates[k*bs:(k+1)*bs]: every image skipped before it was
    recorded in the manifest before the batch was written.
    """
    size = beit_io.batch_nbytes(batch_size, CROP_SIZE)
    batches = []
    while len(batches) * batch_size < len(candidates):
        k = len(batches)
        path = os.path.join(out, beit_io.batch_file_name(k))
        if not (os.path.isfile(path) and os.path.getsize(path) == size):
            break
        batches.append(batch_entry(k, candidates[k * batch_size:(k + 1) * batch_size]))
    return batches


def make_manifest(args, names, fingerprint, batches, skipped, complete):
    return {
        "format": beit_io.MANIFEST_FORMAT,
        "complete": complete,
        "batch_size": args.batch_size,
        "image_size": CROP_SIZE,
        "dtype": "float32",
        "layout": "raw C-order (batch_size, 3, 224, 224) per input_NNNNN.bin; the last batch is zero-padded",
        "source": os.path.abspath(args.image_path),
        "num_images": len(names),
        "fingerprint": fingerprint,
        "transform": TRANSFORM,
        "batches": batches,
        "skipped": skipped,
    }


def batch_entry(index, rows):
    return {"file": beit_io.batch_file_name(index), "images": list(rows), "real": len(rows)}


def fill_float_batch(batch, crops, real):
    """Rows [0, real) of ``batch`` from the uint8 crops, the other rows (the last batch's padding) zero."""
    to_float(crops[:real], out=batch[:real])
    batch[real:] = 0
    return batch


class BatchWriter:
    """Writes batch files, in order, on a background thread.

    A batch is 600 KB per image and beit_io's atomic write fsyncs it: about
    1 ms per image here, mostly in the kernel.  File writes and Pillow both
    release the GIL, so the disk works while the next images decode.  The
    batch buffers are reused (a fresh 600 KB per image costs page faults):
    ``depth`` queued + one being written + one being filled, so a buffer comes
    round again only once its file is written.
    """

    def __init__(self, batch_size, depth=2):
        self.queue = queue.Queue(maxsize=depth)
        self.buffers = [np.zeros(beit_io.batch_shape(batch_size), np.float32) for _ in range(depth + 2)]
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
                    beit_io.write_batch(path, batch)
                except OSError as exc:
                    self.error = WriteError(f"cannot write {path}: {exc.strerror or exc}")
                except Exception as exc:  # the thread must live on, or put() would block forever
                    self.error = WriteError(f"cannot write {path}: {type(exc).__name__}: {exc}")

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

    def close(self):
        """Wait for every queued batch; raise the first write error."""
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------- main

def usable_cpus():
    """Cores this process may run on (a container or taskset may allow fewer than os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def build_parser():
    p = argparse.ArgumentParser(
        description="Step 1 of the BEiT pipeline: turn a folder of images into float32 batch files "
                    "(input_00000.bin, ...) and manifest.json, with unilm BEiT's eval transform.")
    p.add_argument("--image_path", required=True,
                   help="folder of images: flat (ImageNet val) or with one level of class sub-folders. Files are "
                        f"images by extension ({', '.join(IMAGE_EXTENSIONS)}, any case); others such as "
                        "val_label.txt, hidden files and directory symlinks are ignored")
    p.add_argument("--prep_image", required=True,
                   help="output folder for input_NNNNN.bin and manifest.json (created if missing); rerunning into "
                        "it resumes, one made with another batch size or image set is refused")
    p.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, required=True,
                   help="images per batch file; must match the batch size of the ONNX/OM model "
                        "(--batchsize is the guide's spelling)")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="processes that decode and resize images (default: all %(default)s usable cores); "
                        "the output is the same for any number")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip images that cannot be decoded (listed at the end and under 'skipped' in the "
                        "manifest) instead of stopping at the first one")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels than this as possible decompression bombs "
                        "(default: Pillow's %(default)s)")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def error(message):
    print(f"error: {message}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size < 1:
        error(f"--batch_size must be at least 1, got {args.batch_size}")
        return 2
    if args.workers < 1:
        error(f"--workers must be at least 1, got {args.workers}")
        return 2
    if args.max_pixels < 1:
        error(f"--max_pixels must be at least 1, got {args.max_pixels}")
        return 2
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = args.max_pixels  # Pillow's guard here; pool workers get it from _worker_init
    try:
        return run(args)
    finally:
        Image.MAX_IMAGE_PIXELS = limit  # main() may be called in-process (tests)


def run(args):
    folder, out, bs = args.image_path, args.prep_image, args.batch_size
    if not os.path.isdir(folder):
        error(f"{folder}: no such folder (--image_path)" if not os.path.exists(folder)
              else f"{folder}: not a folder (--image_path)")
        return 2
    try:
        names = list_images(folder)
    except OSError as exc:
        error(f"{folder}: cannot list images ({exc.strerror or exc})")
        return 2
    if not names:
        error(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files here and one "
              "sub-folder level down)")
        return 2
    fingerprint = beit_io.image_set_fingerprint(names)
    source = os.path.abspath(folder)
    try:
        skipped = check_output_folder(out, bs, fingerprint, len(names), source)
    except beit_io.PipelineFileError as exc:
        error(str(exc))
        return 2
    if skipped and not args.skip_bad:
        error(f"{out}: an earlier run with --skip_bad skipped {len(skipped)} images there "
              f"({skipped[0]['name']}, ...); rerun with --skip_bad or delete the folder")
        return 2

    skipped_names = {s["name"] for s in skipped}
    order = {name: i for i, name in enumerate(names)}
    candidates = [n for n in names if n not in skipped_names]

    manifest_file = os.path.join(out, beit_io.MANIFEST_NAME)

    def save(batches, complete):
        skipped.sort(key=lambda s: order.get(s["name"], -1))
        manifest = make_manifest(args, names, fingerprint, batches, skipped, complete)
        _writing(manifest_file, beit_io.save_manifest, out, manifest)

    try:
        _writing(out, os.makedirs, out, 0o777, True)
        # Written before any batch, so that a rerun can tell whether this folder is its own.
        save([], False)
    except WriteError as exc:
        error(str(exc))
        return 1

    batches = batches_on_disk(out, candidates, bs)
    todo = candidates[len(batches) * bs:]
    if batches:
        print(f"resuming: {len(batches)} batches already in {out}, {len(todo)} images to go")

    workers = max(1, min(args.workers, len(todo)))
    paths = [os.path.join(folder, n) for n in todo]
    crops = np.zeros((bs, 3, CROP_SIZE, CROP_SIZE), np.uint8)
    rows = []
    start = time.perf_counter()
    # The pool forks before the writer thread exists: forking a threaded process is fragile.
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        print("warning: no fork() on this platform; decoding with 1 worker", file=sys.stderr)
        workers = 1
    loader = ParallelLoader(paths, workers, args.max_pixels) if workers > 1 else None
    results = loader if loader is not None else map(_load, paths)
    writer = BatchWriter(bs)
    try:
        with tqdm(total=len(todo), unit="img", desc="preprocess", file=sys.stderr, disable=not todo) as bar:
            for name, (crop, problem) in zip(todo, results):
                bar.update(1)
                if problem is not None:
                    if not args.skip_bad:
                        error(f"{problem}; nothing was written for its batch (use --skip_bad to leave bad "
                              "images out)")
                        return 1
                    skipped.append({"name": name, "error": problem})
                    save([], False)  # recorded before any later batch, which a resume relies on
                    continue
                crops[len(rows)] = crop
                rows.append(name)
                if len(rows) == bs:
                    writer.put(os.path.join(out, beit_io.batch_file_name(len(batches))),
                               fill_float_batch(writer.next_buffer(), crops, bs))
                    batches.append(batch_entry(len(batches), rows))
                    rows = []
        if rows:
            writer.put(os.path.join(out, beit_io.batch_file_name(len(batches))),
                       fill_float_batch(writer.next_buffer(), crops, len(rows)))
            batches.append(batch_entry(len(batches), rows))
        writer.close()
        if not batches:
            for s in skipped:
                print(f"skipped: {s['error']}", file=sys.stderr)
            error(f"{folder}: all {len(names)} images are bad; nothing to write")
            return 1
        # Leftovers of another run (more skips now, fewer batches) must not look like ours.
        for stale in beit_io.list_batch_files(out)[len(batches):]:
            _writing(stale, os.unlink, stale)
        save(batches, True)
    except WriteError as exc:
        error(str(exc))
        return 1
    finally:
        if loader is not None:
            loader.close()
        try:
            writer.close()  # a bad image stops the run, but the batches before it are kept for a rerun
        except WriteError:
            pass  # already reported, or superseded by the error that stopped the run
    elapsed = time.perf_counter() - start

    for s in skipped:
        print(f"skipped: {s['error']}", file=sys.stderr)
    if skipped:
        print(f"warning: {len(skipped)} bad images skipped (listed in {manifest_file} under 'skipped')",
              file=sys.stderr)
    rate = len(todo) / elapsed if elapsed > 0 and todo else 0.0
    print(f"{len(candidates)} images in {len(batches)} batches of {bs} in {out}; "
          f"{len(todo)} processed in {elapsed:.2f} s ({rate:.1f} img/s, {workers} workers)")
    return 0


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


if __name__ == "__main__":
    keep_freed_memory()  # before the pool forks: the workers inherit it
    sys.exit(main())
