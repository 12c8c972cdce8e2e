"""Top-1 / Top-5 accuracy of inference outputs: which row is which image, the counting, the result JSON.

Rows are mapped to images in one of two ways:

- with beit_preprocess.py's manifest (``--prep_image``): each row is the image the
  manifest names, and only the real rows of a batch are counted, never the zero
  padding of the last batch;
- without it, the guide's rule: row i of input_k is ILSVRC2012_val_{k*bs+i+1:08d}.
  The rule only holds for a label file of the consecutive names
  ILSVRC2012_val_00000001 ... _N and outputs of exactly ``bs`` rows (the last may be
  shorter), so both are checked; a row past N is padding and is not counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from beit_pipeline import files
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation.labels import stem_of
from beit_pipeline.inference import outputs as output_files
from beit_pipeline.inference import record as inference_record
from beit_pipeline.preprocess import batches as batch_files

if TYPE_CHECKING:
    from beit_pipeline.evaluation.label_file import LabelFile
    from beit_pipeline.evaluation.label_formats import FolderLabels

log = logging.getLogger(__name__)

TOPN = 5
_GUIDE_NAME_RE = re.compile(r"^ILSVRC2012_val_(\d{8})$")


# ---------------------------------------------------------------- counting

@dataclasses.dataclass
class Accuracy:
    """Top-1 .. Top-k hit counts over ``num_images`` rows."""

    num_images: int
    num_classes: int
    correct: list  # hits for k = 1 .. min(5, num_classes)
    top1_hits: list = dataclasses.field(default_factory=list)  # per counted image, in order: its Top-1 hit

    @property
    def top1(self) -> float:
        return percent(self.correct[0], self.num_images)

    @property
    def top5(self) -> float:
        return percent(self.correct[-1], self.num_images)


@dataclasses.dataclass
class BatchRows:
    """One output file's rows to count, and the image of each row."""

    path: str
    logits: np.ndarray
    names: list


def percent(hits: int, count: int) -> float:
    return 100.0 * float(hits) / count if count else 0.0


def label_ranks(logits: np.ndarray, labels: Sequence[int] | np.ndarray) -> np.ndarray:
    """Rank of each row's true label among its logits (0 = the top prediction).

    Ties are broken by class index (a stable sort), so the result does not
    depend on numpy's sort algorithm.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-logits, axis=1, kind="stable")
    return np.argmax(order == labels[:, None], axis=1)


def evaluate(rows: Iterable[BatchRows], labels: Mapping[str, int], num_classes: int = output_files.NUM_CLASSES,
             label_file: str = "the label file") -> Accuracy:
    """Count Top-1..Top-5 hits over ``rows`` (BatchRows); ``labels`` maps each image name to its class."""
    topn = min(TOPN, num_classes)
    correct = np.zeros(topn, dtype=np.int64)
    count, top1_hits = 0, []
    for batch in rows:
        if batch.logits.shape[0] != len(batch.names):
            raise PipelineFileError(f"{batch.path}: {batch.logits.shape[0]} rows for {len(batch.names)} images")
        missing = [name for name in batch.names if name not in labels]
        if missing:
            raise PipelineFileError(f"{label_file}: no label for image {missing[0]} (row of {batch.path})")
        if not batch.names:
            continue
        ranks = label_ranks(batch.logits, [labels[name] for name in batch.names])
        correct += np.array([np.count_nonzero(ranks <= k) for k in range(topn)], dtype=np.int64)
        count += len(batch.names)
        top1_hits.extend(bool(r == 0) for r in ranks)
    return Accuracy(num_images=count, num_classes=num_classes, correct=[int(c) for c in correct],
                    top1_hits=top1_hits)


def _progress(items):
    from beit_pipeline import progress  # issue 21: plain lines when stderr is a log

    return progress.bar(items, desc="eval", unit="batch", file=sys.stderr)


# ---------------------------------------------------------------- with the manifest

@dataclasses.dataclass
class ManifestBatch:
    stem: str
    path: str  # its output file
    names: list  # the images of its real rows


def plan_from_manifest(manifest: dict[str, Any], outputs: dict[str, str], batch_size: int | None,
                       manifest_file: str) -> tuple[list[ManifestBatch], list[str]]:
    """([ManifestBatch] for every batch the manifest lists, [names of outputs it does not list]).

    Refuses a batch size other than the manifest's, an image listed twice and
    batches with no output file.
    """
    if batch_size is not None and batch_size != manifest["batch_size"]:
        raise PipelineFileError(
            f"{manifest_file}: batch size is {manifest['batch_size']} but --batch_size {batch_size} was given")
    plan, seen, missing = [], set(), []
    for stem, names in batch_files.rows_from_manifest(manifest):
        for name in names:
            if name in seen:
                raise PipelineFileError(f"{manifest_file}: image {name} is listed twice")
            seen.add(name)
        if stem in outputs:
            plan.append(ManifestBatch(stem, outputs[stem], names))
        else:
            missing.append(stem)
    if missing:
        shown = ", ".join(f"{s}_0.*" for s in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PipelineFileError(f"outputs do not cover the manifest {manifest_file}: {len(missing)} of "
                                f"{len(manifest['batches'])} batches have no output ({shown})")
    listed = {b.stem for b in plan}
    extra = sorted(os.path.basename(p) for s, p in outputs.items() if s not in listed)
    return plan, extra


def manifest_rows(plan: list[ManifestBatch], batch_size: int, num_classes: int,
                  dtype: str | None = None) -> Iterator[BatchRows]:
    """Yield BatchRows of the real rows of each planned batch, checking row counts."""
    for batch in _progress(plan):
        logits = output_files.read_output(batch.path, num_classes, batch_size, dtype)
        rows = logits.shape[0]
        if rows < len(batch.names):
            raise PipelineFileError(f"{batch.path}: {rows} rows but batch {batch.stem} holds {len(batch.names)} images")
        if rows > batch_size:
            raise PipelineFileError(f"{batch.path}: {rows} rows, more than the batch size {batch_size}")
        # Rows past len(names) are the zero padding of the last batch: never counted.
        yield BatchRows(batch.path, logits[:len(batch.names)], batch.names)


def manifest_labels(label_file: LabelFile | FolderLabels, plan: list[ManifestBatch]) -> dict[str, int]:
    """{image name: class} for every image of the plan (labels.LabelFile.match's rules)."""
    where = {name: f"row of {batch.path}" for batch in plan for name in batch.names}
    return label_file.match([name for batch in plan for name in batch.names], where)


# ---------------------------------------------------------------- the guide's rule

@dataclasses.dataclass
class GuideBatch:
    stem: str
    path: str
    index: int  # k of input_k


def plan_from_guide_rule(outputs: dict[str, str], folder: str) -> list[GuideBatch]:
    """[GuideBatch] in batch order, for outputs of ``input_NNNNN``.

    Without a manifest, the batch index in the name is all there is to go on,
    so an output of another name, or a gap in the indices, is an error.
    """
    plan = []
    for stem, path in outputs.items():
        index = batch_files.batch_index(stem)
        if index is None:
            raise PipelineFileError(
                f"{path}: without a manifest only outputs of input_NNNNN batches can be matched to images "
                "(pass --prep_image)")
        plan.append(GuideBatch(stem, path, index))
    plan.sort(key=lambda b: b.index)
    present = {b.index for b in plan}
    gaps = [i for i in range(plan[-1].index + 1) if i not in present]
    if gaps:
        shown = ", ".join(f"{batch_files.BATCH_PREFIX}{i:05d}_0.*" for i in gaps[:5])
        raise PipelineFileError(
            f"{folder}: {len(gaps)} batches between input_00000 and {plan[-1].stem} have no output ({shown})")
    return plan


def guide_labels(label_file: LabelFile | FolderLabels) -> dict[str, int]:
    """{ILSVRC2012_val_NNNNNNNN: class}, refusing a label file the guide's rule would misread.

    The rule names row i of input_k ILSVRC2012_val_{k*bs+i+1:08d}, so it is right
    only when the label file lists exactly the images 1 .. N under those names.
    """
    by_number, other = {}, []
    for name, label in label_file.entries.items():
        m = _GUIDE_NAME_RE.match(stem_of(name))
        if m is None:
            other.append(name)
        elif int(m.group(1)) in by_number:
            raise PipelineFileError(f"{label_file.path}: two entries for ILSVRC2012_val_{m.group(1)} "
                                    f"(line {label_file.lines[name]}); the guide's rule needs one per image")
        else:
            by_number[int(m.group(1))] = label
    if other:
        raise PipelineFileError(
            f"{label_file.path}: '{other[0]}' (line {label_file.lines[other[0]]}) is not an ILSVRC2012_val_NNNNNNNN "
            "name; without --prep_image rows can only be matched to images by the guide's rule, so pass "
            "--prep_image (beit_preprocess.py's folder)")
    gaps = [n for n in range(1, len(by_number) + 1) if n not in by_number]
    if gaps:
        raise PipelineFileError(
            f"{label_file.path}: names {len(by_number)} images but not ILSVRC2012_val_{gaps[0]:08d}; the guide's "
            "rule (row i of input_k is image k*bs+i+1) holds only for the consecutive images 00000001 .. "
            f"{len(by_number):08d}, so pass --prep_image (beit_preprocess.py's folder) to match rows to images")
    return {f"ILSVRC2012_val_{n:08d}": label for n, label in by_number.items()}


def check_guide_rows(batch: GuideBatch, rows: int, batch_size: int, last: bool) -> None:
    """Every output holds --batch_size rows under the guide's rule; only the last may hold fewer."""
    if rows > batch_size:
        raise PipelineFileError(f"{batch.path}: {rows} rows, more than the batch size {batch_size}")
    if rows < batch_size and not last:
        raise PipelineFileError(
            f"{batch.path}: {rows} rows, but --batch_size is {batch_size}: under the guide's rule every output "
            "but the last holds one full batch, so the outputs were made with another batch size; pass that "
            "--batch_size (or --prep_image)")


def guide_rows(plan: list[GuideBatch], batch_size: int, labels: Mapping[str, int], num_classes: int,
               uncounted: list[int], dtype: str | None = None) -> Iterator[BatchRows]:
    """Yield BatchRows under the guide's rule; rows past the label file's last image are padding.

    ``uncounted`` (a one-item list) collects how many rows were left out as padding.
    """
    for batch in _progress(plan):
        # --batch_size is only the user's word here: a size that fits B fp16 rows may be B/2 float32 ones,
        # so the dtype comes from the summary or is float32, as the guide's script reads it.
        logits = output_files.read_output(batch.path, num_classes, dtype=dtype)
        check_guide_rows(batch, logits.shape[0], batch_size, batch is plan[-1])
        names = [batch_files.guide_image_name(batch.index, row, batch_size) for row in range(logits.shape[0])]
        keep = [row for row, name in enumerate(names) if name in labels]
        uncounted[0] += len(names) - len(keep)
        yield BatchRows(batch.path, logits[keep], [names[row] for row in keep])


# ---------------------------------------------------------------- the whole evaluation

@dataclasses.dataclass
class Evaluation:
    accuracy: Accuracy
    rows_from: str  # "manifest" or "guide rule"
    skipped: list  # images beit_preprocess.py skipped (from the manifest)
    labelled: int = 0  # images the label file names (the guide's rule: its consecutive ILSVRC2012_val_ names)
    manifest: dict = None  # beit_preprocess.py's manifest, when rows were mapped by it

    @property
    def not_evaluated(self) -> int:
        """Labelled images that were not counted: not in this image set, or skipped as unreadable."""
        return max(0, self.labelled - self.accuracy.num_images)

    def subset_statement(self) -> str | None:
        """``12 of 24 labelled images evaluated (...)``, or None when every labelled image was evaluated."""
        if not self.not_evaluated:
            return None
        skipped = f"; {len(self.skipped)} skipped as unreadable in preprocessing" if self.skipped else ""
        return (f"{self.accuracy.num_images} of {self.labelled} labelled images evaluated: the other "
                f"{self.not_evaluated} are not in these outputs{skipped}")


_DATED_RE = re.compile(r"^\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}$")  # ais_bench's time.strftime("%Y_%m_%d-%H_%M_%S")


def output_subfolders(folder: str) -> list[str]:
    """The subfolders of ``folder`` that hold outputs, newest first: dated names by their date, others by mtime."""
    found = [d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
             and output_files.find_outputs(os.path.join(folder, d))]

    def made(name):
        if _DATED_RE.match(name):
            return time.mktime(time.strptime(name, "%Y_%m_%d-%H_%M_%S"))
        return os.stat(os.path.join(folder, name)).st_mtime

    return sorted(found, key=lambda d: (made(d), d), reverse=True)


def find_outputs_in(folder: str) -> dict[str, str]:
    """output_files.find_outputs(), refusing a folder without any (naming ais_bench's newest dated subfolder)."""
    found = output_files.find_outputs(folder)
    if not found:
        raise PipelineFileError(f"{folder}: no inference outputs (<input_stem>_0.txt/.bin/.npy) here"
                                f"{subfolder_hint(folder)}")
    return found


def subfolder_hint(folder: str) -> str:
    """Where the outputs may be: ais_bench's newest (dated) subfolder that holds some, the others listed."""
    subdirs, which = output_subfolders(folder), "the newest with outputs"
    if not subdirs:
        subdirs = [d for d in sorted(os.listdir(folder), reverse=True) if os.path.isdir(os.path.join(folder, d))]
        which = "none holds outputs; the newest"
    if not subdirs:
        return ""
    others = f"; the others: {', '.join(subdirs[1:6])}{' ...' if len(subdirs) > 6 else ''}" if subdirs[1:] else ""
    return f" (ais_bench writes into a dated subfolder of --output: {which} is {os.path.join(folder, subdirs[0])}{others})"


def summary_output_dtype(folder: str) -> str | None:
    """The outputs' dtype as the run's summary (``<folder>_summary.json``) records it, or None."""
    summary = files.read_json(os.path.normpath(folder) + "_summary.json")
    dtype = summary.get("output_dtype") if isinstance(summary, dict) else None
    return dtype if isinstance(dtype, str) else None


def evaluate_with_manifest(folder: str, outputs: dict[str, str], label_file: LabelFile | FolderLabels,
                           prep_image: str, batch_size: int | None, num_classes: int) -> Evaluation:
    manifest_file = batch_files.manifest_path(prep_image)
    manifest = batch_files.require_complete_manifest(manifest_file)
    inference_record.check_manifest_matches(folder, prep_image)  # outputs of another image set or row order
    plan, extra = plan_from_manifest(manifest, outputs, batch_size, manifest_file)
    if extra:
        log.warning(f"{folder}: {len(extra)} output files are not in the manifest and are ignored "
                    f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})")
    labels = manifest_labels(label_file, plan)
    rows = manifest_rows(plan, manifest["batch_size"], num_classes, summary_output_dtype(folder))
    accuracy = evaluate(rows, labels, num_classes, label_file.path)
    return Evaluation(accuracy, "manifest", list(manifest.get("skipped") or []), labelled_count(label_file, labels),
                      manifest)


def labelled_count(label_file: LabelFile | FolderLabels, labels: dict) -> int:
    """How many images the labels name: a label file's entries; class folders label just the images read."""
    from beit_pipeline.evaluation.label_formats import FolderLabels
    return len(labels) if isinstance(label_file, FolderLabels) else len(label_file.entries)


def evaluate_with_guide_rule(folder: str, outputs: dict[str, str], label_file: LabelFile | FolderLabels,
                             batch_size: int, num_classes: int) -> Evaluation:
    inference_record.check_guide_rule_fits(folder, batch_size)  # images not 1, 2, 3 ... in row order
    plan = plan_from_guide_rule(outputs, folder)
    labels = guide_labels(label_file)
    uncounted = [0]
    accuracy = evaluate(guide_rows(plan, batch_size, labels, num_classes, uncounted, summary_output_dtype(folder)),
                        labels, num_classes, label_file.path)
    if uncounted[0]:
        log.warning(f"no manifest given, so padded rows cannot be told apart: {uncounted[0]} rows whose "
                    f"ILSVRC2012_val_ name is not in {label_file.path} were not counted "
                    "(pass --prep_image to be exact)")
    return Evaluation(accuracy, "guide rule", [], len(labels))


def evaluate_folder(folder: str, label_file: LabelFile | FolderLabels, prep_image: str | None,
                    batch_size: int | None, num_classes: int) -> Evaluation:
    """Evaluation of the outputs in ``folder`` against ``label_file`` (a labels.LabelFile)."""
    outputs = find_outputs_in(folder)
    if prep_image is not None:
        result = evaluate_with_manifest(folder, outputs, label_file, prep_image, batch_size, num_classes)
    else:
        result = evaluate_with_guide_rule(folder, outputs, label_file, batch_size, num_classes)
    if result.accuracy.num_images == 0:
        raise PipelineFileError(f"{folder}: no output row matches an image of {label_file.path}")
    if result.skipped:
        log.warning(f"{len(result.skipped)} images were skipped in preprocessing and are not counted "
                    "(listed under 'skipped' in the details JSON)")
    statement = result.subset_statement()
    if statement:
        log.warning(f"{statement} (label file {label_file.path})")
    return result


# ---------------------------------------------------------------- result lines

def summary_line(accuracy: Accuracy) -> str:
    return (f"Top-1 accuracy: {accuracy.top1:.2f}%  Top-5 accuracy: {accuracy.top5:.2f}%  "
            f"images: {accuracy.num_images}")
