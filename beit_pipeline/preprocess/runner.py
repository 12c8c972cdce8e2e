"""Step 1's folder run: a folder of images -> ``input_NNNNN.bin`` batch files and ``manifest.json``.

The run holds the output folder's lock throughout, and is planned before any
work: which images there are, what an earlier run in the folder already wrote
(a killed run resumes), which images it skipped as bad (tried again: one that
now decodes makes the folder start from scratch).  Then the images are decoded
by worker processes straight into shared batch buffers, batched in order and
written by a background thread; the manifest is written first (``complete:
false``) and last (``complete: true``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from beit_pipeline import cli, files
from beit_pipeline.errors import EXIT_USAGE, PipelineFileError, UsageError
from beit_pipeline.preprocess import batches
from beit_pipeline.preprocess.transform import BadImageError, WideImage, geometry, load_crop, shown, use_image_size
from beit_pipeline.preprocess.workers import (
    BatchRing,
    BatchWriter,
    Placement,
    decoded,
    fork_workers,
    ring_batches,
    usable_cpus,
    write_error,
)

if TYPE_CHECKING:
    import argparse

    from beit_pipeline.preprocess.workers import ParallelDecoder, SerialDecoder

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
INTERRUPTED_HINT = "the batches written so far are kept; rerun the same command to resume"


# ---------------------------------------------------------------- the image folder

def is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


@dataclasses.dataclass
class ImageListing:
    """The images of a folder (relative names, sorted) and what else was there, by extension."""

    names: list
    ignored: collections.Counter


def _kind(name):
    """How an ignored file is counted: hidden files apart, others by their (lower-case) extension."""
    if name.startswith("."):
        return "hidden"
    return os.path.splitext(name)[1].lower() or "no extension"


def scan_images(folder: str) -> ImageListing:
    """The images in ``folder`` and its class sub-folders (one level), and the other files seen.

    Directory symlinks are not followed, so a link loop cannot hang the walk;
    a file symlink that points nowhere is listed and fails later as a bad image.
    """
    names, ignored = [], collections.Counter()

    def take(name, shown_as):
        if is_image_name(name):
            names.append(shown_as)
        else:
            ignored[_kind(name)] += 1

    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                with os.scandir(entry.path) as sub:
                    for s in sub:
                        if not s.is_dir(follow_symlinks=False):
                            take(s.name, entry.name + "/" + s.name)
            else:
                take(entry.name, entry.name)
    return ImageListing(sorted(names), ignored)


def list_images(folder: str) -> list[str]:
    """Relative names of the images in ``folder`` and its class sub-folders (one level), sorted."""
    return scan_images(folder).names


def describe_ignored(ignored: collections.Counter[str]) -> str | None:
    """``ignored 3 files that are not images: .txt 2, .gif 1`` (most frequent first), or None."""
    if not ignored:
        return None
    kinds = sorted(ignored.items(), key=lambda item: (-item[1], item[0]))
    total = sum(ignored.values())
    return (f"ignored {total} file{'s' if total != 1 else ''} that are not images: "
            + ", ".join(f"{kind} {count}" for kind, count in kinds))


def read_listing(folder: str) -> ImageListing:
    """scan_images() with the refusals of a folder that cannot be used (usage errors, exit 2)."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder (--image_path)" if not os.path.exists(folder)
                         else f"{folder}: not a folder (--image_path)")
    try:
        listing = scan_images(folder)
    except OSError as exc:
        raise UsageError(f"{folder}: cannot list images ({cli.describe_os_error(exc)})") from exc
    if not listing.names:
        raise UsageError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} files here and "
                         "one sub-folder level down)")
    return listing


# ---------------------------------------------------------------- argument checks

def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def buffer_bytes(batch_size: int, workers: int = 1) -> int:
    """Memory the batch buffers take: the ring of float32 batches that the images are decoded into."""
    return ring_batches(batch_size, workers) * batches.batch_nbytes(batch_size, geometry().crop)


def check_memory(batch_size: int, workers: int) -> None:
    """Refuse a batch size whose buffers cannot fit in memory (it used to end in a MemoryError traceback)."""
    need, have = buffer_bytes(batch_size, workers), available_memory()
    if have is not None and need > have:
        raise UsageError(f"--batch_size {batch_size} needs {need / 2**30:.1f} GiB for its batch buffers "
                         f"({ring_batches(batch_size, workers)} float32 batches of {batch_size} images) but only "
                         f"{have / 2**30:.1f} GiB of memory is available; use a smaller --batch_size")


def cap_workers(requested: int, force: bool) -> int:
    """``--workers``, at most the usable cores unless ``--force_workers``: more only thrash."""
    cores = usable_cpus()
    if requested <= cores or force:
        return requested
    log.warning(f"--workers {requested} is more than the {cores} usable cores; using {cores} "
                f"(--force_workers starts {requested})")
    return cores


def check_args(args: argparse.Namespace) -> None:
    """Usage checks before any work (UsageError, exit 2); caps ``args.workers``."""
    cli.check(args.batch_size >= 1, f"--batch_size must be at least 1, got {args.batch_size}")
    cli.check(args.workers >= 1, f"--workers must be at least 1, got {args.workers}")
    cli.check(args.max_pixels >= 1, f"--max_pixels must be at least 1, got {args.max_pixels}")
    image_size = getattr(args, "image_size", batches.IMAGE_SIZE)
    cli.check(16 <= image_size <= 4096 and image_size % 16 == 0,
              f"--image_size must be a multiple of 16 (BEiT's patch) in [16, 4096], got {image_size}")
    use_image_size(image_size)  # before the workers fork: they inherit it
    args.workers = cap_workers(args.workers, args.force_workers)
    check_memory(args.batch_size, args.workers)


# ---------------------------------------------------------------- the output folder

def make_manifest(args: argparse.Namespace, names: list[str], fingerprint: str, batch_entries: list[dict[str, Any]],
                  skipped: list[dict[str, str]], complete: bool,
                  wide: Mapping[str, str] | None = None) -> dict[str, Any]:
    geo = geometry()
    return {
        "format": batches.MANIFEST_FORMAT,
        "complete": complete,
        "batch_size": args.batch_size,
        "image_size": geo.crop,
        "resize_size": geo.resize,
        "dtype": "float32",
        "layout": f"raw C-order (batch_size, 3, {geo.crop}, {geo.crop}) per input_NNNNN.bin; the last batch is "
                  "zero-padded",
        "source": os.path.abspath(args.image_path),
        "num_images": len(names),
        "fingerprint": fingerprint,
        "transform": geo.description,
        "batches": batch_entries,
        "skipped": skipped,
        # Images of more than 8 bits per channel: {name: PIL mode}; converted as torchvision does (clipped).
        "high_bit_depth": dict(wide or {}),
    }


def batch_entry(index: int, rows: Sequence[str]) -> dict[str, Any]:
    return {"file": batches.batch_file_name(index), "images": list(rows), "real": len(rows)}


def _refused(message, out):
    return PipelineFileError(f"{message}; delete {out} or choose another --prep_image", exit_code=EXIT_USAGE)


def _check_settings(old, out, batch_size, fingerprint, num_images, source):
    crop = geometry().crop
    if (old.get("batch_size"), old.get("fingerprint"), old.get("image_size")) != (batch_size, fingerprint, crop):
        raise _refused(
            f"{out} was made with batch size {old.get('batch_size')} from {old.get('num_images')} images "
            f"in {old.get('source')} (image-set fingerprint {old.get('fingerprint')}, image size "
            f"{old.get('image_size')}); this run asks for batch size {batch_size} from {num_images} images "
            f"in {source} (fingerprint {fingerprint}, image size {crop}). Batches of both are never mixed", out)


def read_old_manifest(out: str, batch_size: int, fingerprint: str, num_images: int,
                      source: str) -> dict[str, Any] | None:
    """The manifest an earlier run left in ``out`` (None when there is none); refuse one for other settings.

    Raises PipelineFileError (exit 2) with the message to print.  Call it holding the folder's lock:
    it deletes what a killed run was writing.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise PipelineFileError(f"{out}: exists and is not a folder", exit_code=EXIT_USAGE)
    if not os.path.isdir(out):
        return None
    if not os.path.exists(os.path.join(out, batches.MANIFEST_NAME)):
        if batches.list_batch_files(out):
            raise _refused(f"{out}: holds input_*.bin files but no manifest.json, so where they came from "
                           "is unknown", out)
        files.remove_stale_temporaries(out)
        return None
    try:
        old = batches.load_manifest(out)
    except PipelineFileError as exc:
        raise _refused(str(exc), out) from exc
    _check_settings(old, out, batch_size, fingerprint, num_images, source)
    skipped = old.get("skipped") or []
    if not isinstance(skipped, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                for s in skipped):
        raise _refused(f"{batches.manifest_path(out)}: malformed 'skipped' list", out)
    files.remove_stale_temporaries(out)  # what a killed run was writing
    return old


def batches_on_disk(out: str, candidates: list[str], batch_size: int) -> list[dict[str, Any]]:
    """Manifest entries of the leading batches a killed run already wrote, with the right size.

    Batch k holds candidates[k*bs:(k+1)*bs]: every image skipped before it was
    recorded in the manifest before the batch was written.
    """
    size = batches.batch_nbytes(batch_size, geometry().crop)
    found = []
    while len(found) * batch_size < len(candidates):
        k = len(found)
        path = os.path.join(out, batches.batch_file_name(k))
        if not (os.path.isfile(path) and os.path.getsize(path) == size):
            break
        found.append(batch_entry(k, candidates[k * batch_size:(k + 1) * batch_size]))
    return found


def _writing(path, write, *args):
    try:
        write(*args)
    except OSError as exc:
        raise write_error(path, exc) from exc


# ---------------------------------------------------------------- the plan

@dataclasses.dataclass
class RunPlan:
    """What one run does: the images, what an earlier run left, what is still to decode."""

    args: object
    names: list              # every image of the folder, sorted
    fingerprint: str
    skipped: list            # [{"name", "error"}]: bad images, recorded in the manifest
    batches: list            # manifest entries of the batches already written, in order
    todo: list               # the images still to decode, in order
    already_complete: bool = False
    resumed: int = 0         # batches an earlier run wrote (this run's batch k is file resumed + k)
    wide: dict = dataclasses.field(default_factory=dict)  # {name: PIL mode} of images over 8 bits per channel

    @property
    def out(self) -> str:
        return self.args.prep_image

    @property
    def candidates(self) -> list[str]:
        bad = {s["name"] for s in self.skipped}
        return [n for n in self.names if n not in bad]

    def manifest(self, complete: bool) -> dict[str, Any]:
        """The manifest to write; an unfinished one lists no batches (a resume looks at the files)."""
        order = {name: i for i, name in enumerate(self.names)}
        self.skipped.sort(key=lambda s: order.get(s["name"], -1))
        return make_manifest(self.args, self.names, self.fingerprint, self.batches if complete else [],
                             self.skipped, complete, {n: self.wide[n] for n in sorted(self.wide)})

    def save(self, complete: bool) -> None:
        path = os.path.join(self.out, batches.MANIFEST_NAME)
        _writing(path, batches.save_manifest, self.out, self.manifest(complete))


def now_decoding(folder: str, skipped: list[dict[str, str]]) -> list[str]:
    """The names among ``skipped`` (an earlier run's bad images) that decode now."""
    fixed = []
    for s in skipped:
        try:
            load_crop(os.path.join(folder, s["name"]))
        except BadImageError:
            continue
        fixed.append(s["name"])
    return fixed


def start_over(out: str, fixed: list[str]) -> None:
    """Delete an earlier run's batches: a fixed image moves every later row, so none of them is valid."""
    log.info(f"redoing {out} from scratch: {len(fixed)} image{'s' if len(fixed) != 1 else ''} that an earlier "
             f"run skipped as bad now decode{'s' if len(fixed) == 1 else ''} ({', '.join(map(shown, fixed[:3]))}"
             f"{', ...' if len(fixed) > 3 else ''}), which changes the batch layout")
    # Before the manifest forgets the skips: a kill in between must not leave old batches that look valid.
    for path in batches.list_batch_files(out):
        _writing(path, os.unlink, path)


def plan_run(args: argparse.Namespace, listing: ImageListing) -> RunPlan:
    """The RunPlan for ``listing`` into ``args.prep_image``; call it holding the folder's lock."""
    out, bs, names = args.prep_image, args.batch_size, listing.names
    fingerprint = batches.image_set_fingerprint(names)
    old = read_old_manifest(out, bs, fingerprint, len(names), os.path.abspath(args.image_path))
    skipped = [dict(s) for s in (old or {}).get("skipped") or []]
    fixed = now_decoding(args.image_path, skipped)
    if fixed:
        start_over(out, fixed)
        skipped, old = [], None
    if skipped and not args.skip_bad:
        raise PipelineFileError(
            f"{out}: an earlier run with --skip_bad skipped {len(skipped)} images there "
            f"({shown(skipped[0]['name'])}, ...); rerun with --skip_bad or delete the folder", exit_code=EXIT_USAGE)
    plan = RunPlan(args, names, fingerprint, skipped, [], [])
    plan.wide = dict((old or {}).get("high_bit_depth") or {})  # those of the batches an earlier run wrote
    candidates = plan.candidates
    plan.batches = batches_on_disk(out, candidates, bs) if old is not None else []
    plan.todo = candidates[len(plan.batches) * bs:]
    plan.already_complete = (old is not None and old.get("complete") is True and old.get("batches") == plan.batches
                             and not plan.todo and len(batches.list_batch_files(out)) == len(plan.batches))
    return plan


# ---------------------------------------------------------------- the run

def put_batch(plan: RunPlan, writer: BatchWriter, ring: BatchRing, rows: list[str]) -> None:
    """Hand this run's next batch to ``writer``; its rows [len(rows), bs) (the last batch's padding) zeroed."""
    index = len(plan.batches) - plan.resumed
    batch = ring.batch(index)
    batch[len(rows):] = 0
    writer.put(os.path.join(plan.out, batches.batch_file_name(len(plan.batches))), batch)
    plan.batches.append(batch_entry(len(plan.batches), rows))


def record_bad(plan: RunPlan, name: str, problem: str) -> None:
    if not plan.args.skip_bad:
        raise BadImageError(f"{problem}; nothing was written for its batch (use --skip_bad to leave bad "
                            "images out)")
    plan.skipped.append({"name": name, "error": problem})
    plan.save(False)  # recorded before any later batch, which a resume relies on


def batch_images(plan: RunPlan, decoder: SerialDecoder | ParallelDecoder, writer: BatchWriter,
                 ring: BatchRing) -> None:
    """Take the decoded images in the order of ``plan.todo``; hand every full batch, then the rest, to ``writer``.

    An image sits at the row where the decoder put it; after a skipped image the
    later ones may have to move back to their row (position > placement.filled).
    """
    from beit_pipeline import progress  # here, not at the top: tqdm's 25 ms import runs while the workers decode
    placement, rows = Placement(), []
    with progress.bar(total=len(plan.todo), unit="img", desc="preprocess", file=sys.stderr,
              disable=not plan.todo) as bar:
        for index, position, outcome in decoder.images(placement, writer):
            bar.update(1)
            placement.consumed += 1
            if isinstance(outcome, str):
                record_bad(plan, plan.todo[index], outcome)
                continue
            if isinstance(outcome, WideImage):
                plan.wide[plan.todo[index]] = outcome.mode
                plan.save(False)  # before its batch is written: a resumed run's manifest names it too
            if position != placement.filled:
                ring.row(placement.filled)[...] = ring.row(position)
            placement.filled += 1
            rows.append(plan.todo[index])
            if len(rows) == plan.args.batch_size:
                put_batch(plan, writer, ring, rows)
                rows = []
    if rows:
        put_batch(plan, writer, ring, rows)


def process(plan: RunPlan) -> int:
    """Decode, batch and write ``plan.todo``; returns the number of workers used."""
    args = plan.args
    workers = fork_workers(max(1, min(args.workers, len(plan.todo))))
    paths = [os.path.join(args.image_path, n) for n in plan.todo]
    ring = BatchRing(args.batch_size, ring_batches(args.batch_size, workers))
    plan.resumed = len(plan.batches)
    # The workers fork before the writer thread exists: forking a threaded process is fragile.
    with decoded(paths, ring, workers, args.max_pixels) as decoder, BatchWriter() as writer:
        batch_images(plan, decoder, writer, ring)
    return workers


def finish(plan: RunPlan) -> None:
    """Delete batch files beyond this run's (another run had fewer skips), then write the final manifest."""
    if not plan.batches:
        report_skipped(plan)
        raise BadImageError(f"{plan.args.image_path}: all {len(plan.names)} images are bad; nothing to write")
    for stale in batches.list_batch_files(plan.out)[len(plan.batches):]:
        _writing(stale, os.unlink, stale)
    plan.save(True)


def report_skipped(plan: RunPlan) -> None:
    for s in plan.skipped:
        log.warning(f"skipped: {shown(s['error'])}")
    report_wide(plan.wide)


def report_wide(wide: Mapping[str, str]) -> None:
    """One line for the images of more than 8 bits per channel (torchvision's loader clips them too)."""
    if not wide:
        return
    names = sorted(wide)
    modes = ", ".join(sorted(set(wide.values())))
    log.warning(f"{len(names)} image{'s have' if len(names) != 1 else ' has'} more than 8 bits per channel "
                f"(PIL mode {modes}: {', '.join(map(shown, names[:3]))}{', ...' if len(names) > 3 else ''}): "
                "converted to RGB as torchvision's loader does, which clips values above 255 (mostly white); "
                "listed under 'high_bit_depth' in the manifest; convert them to 8 bits first if that is not "
                "what you want")


def report(plan: RunPlan, workers: int, elapsed: float) -> None:
    report_skipped(plan)
    if plan.skipped:
        log.warning(f"{len(plan.skipped)} bad images skipped (listed in "
                    f"{os.path.join(plan.out, batches.MANIFEST_NAME)} under 'skipped')")
    rate = len(plan.todo) / elapsed if elapsed > 0 and plan.todo else 0.0
    log.info(f"{len(plan.candidates)} images in {len(plan.batches)} batches of {plan.args.batch_size} in "
             f"{plan.out}; {len(plan.todo)} processed in {elapsed:.2f} s ({rate:.1f} img/s, {workers} workers)")


def run_locked(args: argparse.Namespace, listing: ImageListing) -> None:
    """The run proper, holding the lock: plan, write, finish, report."""
    plan = plan_run(args, listing)
    if plan.already_complete:
        report_skipped(plan)
        log.info(f"{plan.out} is already complete: {len(plan.candidates)} images in {len(plan.batches)} batches "
                 f"of {args.batch_size}; nothing to do")
        return
    _writing(plan.out, os.makedirs, plan.out, 0o777, True)
    plan.save(False)  # before any batch, so that a rerun can tell whether this folder is its own
    if plan.batches:
        log.info(f"resuming: {len(plan.batches)} batches already in {plan.out}, {len(plan.todo)} images to go")
    start = time.perf_counter()
    workers = process(plan)
    finish(plan)
    report(plan, workers, time.perf_counter() - start)


def run(args: argparse.Namespace) -> None:
    """beit_preprocess.py's work: list the images, then the run holding ``--prep_image``'s lock."""
    listing = read_listing(args.image_path)
    ignored = describe_ignored(listing.ignored)
    if ignored:
        log.info(ignored)
    with pillow_limit(args.max_pixels), \
            files.FolderLock(args.prep_image, f"{args.prep_image} (--prep_image)", wait=args.wait_lock):
        run_locked(args, listing)


@contextlib.contextmanager
def pillow_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb guard at ``max_pixels`` here (pool workers get it from their initializer).

    Put back afterwards: run() may be called in-process (tests).
    """
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit
