"""What made the outputs of an inference output folder: ``<out_dir>_beit_infer.json``, BESIDE the folder.

beit_infer.py writes this record before its first output and reads it on a rerun into
the same folder: outputs are kept only when the model's content, the input batches, the
output format, the number of outputs, the batch size, the engine and the precision all
match.  It lives beside the folder, as ais_bench's ``<out_dir>_summary.json`` does, so
that the folder holds nothing but outputs: the guide's beit_eval_acc.py lists every entry
of the folder and parses each name as ``<prefix>_<5-digit batch>``, and a file of ours
in there made it raise ValueError.  ``record_path(folder)`` is the one way every module
finds it (fidelity/stages.py tells beit_infer's outputs from ais_bench's by it; workstate.py
moves it with the folder when run_all.sh renames ``bs8_partial`` to ``bs8``).

The record also says which files the run writes (``outputs``) and which folder it is
for (its device and inode, which a rename keeps): beit_infer.py deletes only those
files, only in that folder, and nothing at all when the record is missing or belongs to
another folder.  An older version kept the record inside the folder as
``.beit_infer.json``: that one file is removed, and its outputs are treated as made by
an unknown run (recomputed, never deleted).

For beit_eval_acc.py the record names the input folder and the manifest's row -> image
mapping the outputs were made from: ``check_manifest_matches`` refuses to score outputs
against another manifest, ``check_guide_rule_fits`` refuses the guide's naming rule where
that manifest's rows are not the images 1, 2, 3 ... in order.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Optional

from beit_pipeline import files, fingerprint
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation.labels import stem_of
from beit_pipeline.graph import onnx_files

log = logging.getLogger(__name__)

RECORD_SUFFIX = "_beit_infer.json"
AIS_SUMMARY_SUFFIX = "_summary.json"  # ais_bench's <dir>_summary.json
FIGURES_SUFFIX = "_beit_summary.json"  # beit_infer.py's own figures (summary.py)
LEGACY_RECORD_NAME = ".beit_infer.json"  # inside the output folder, before issue 18
RECORD_FORMAT = 3  # 3: beside the folder, with the files written, the folder's identity and the row mapping

# field -> how a change is told in the log and in --resume's refusal
_CHANGES = {
    "model": "the model changed",
    "inputs": "the input batches changed",
    "outfmt": "the output format changed",
    "outputs_per_batch": "the number of model outputs changed",
    "batch_size": "the batch size changed",
    "engine": "the engine changed",
    "precision": "the precision changed",
}


@dataclasses.dataclass
class OutputRecord:
    model: str  # content digest of the model file (and of its .data file, where its weights are past 2 GiB)
    inputs: str  # digest of each batch file's name, size and mtime, and of the manifest's fingerprint
    outfmt: str  # txt / bin / npy
    outputs_per_batch: int  # the model's number of outputs
    batch_size: Optional[int]  # the model's static batch, --batchsize, or None (each file's own)
    engine: str = "onnxruntime"  # outputs of two engines or precisions are never mixed in one folder
    precision: str = "fp32"
    num_batches: int = 0  # for the reader; covered by ``inputs``
    outputs: list = dataclasses.field(default_factory=list)  # names of the files this run writes in the folder
    folder_id: Optional[list] = None  # [st_dev, st_ino] of the output folder: a rename keeps it
    input_folder: Optional[str] = None  # absolute path of the --input folder (None for a list of files)
    manifest_fingerprint: Optional[str] = None  # the manifest's image-set fingerprint
    manifest_rows: Optional[str] = None  # digest of the manifest's batch -> image names mapping
    image_source: Optional[str] = None  # the manifest's "source": where the images came from
    written_after_ns: int = 0  # time.time_ns() when the run began: an output older than this is not its own

    def to_json(self) -> dict:
        return {"format": RECORD_FORMAT, **dataclasses.asdict(self)}


# ---------------------------------------------------------------- making it

def inputs_digest(paths: Iterable[str], manifest_fingerprint: str | None = None) -> str:
    """Digest of the batch files' names, sizes and mtimes (stat only: 50,000 images' batches are GBs)."""
    entries = []
    for path in paths:
        st = os.stat(path)
        entries.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    return fingerprint.digest_json({"batches": entries, "manifest": manifest_fingerprint})


def rows_digest(manifest: dict) -> str:
    """Digest of which image is in which row of which batch: what evaluation relies on."""
    from beit_pipeline.preprocess import batches as batch_files  # numpy: not for workstate.py's every call
    return fingerprint.digest_json(batch_files.rows_from_manifest(manifest))


def manifest_of(spec: str | None) -> Optional[dict]:
    """The complete manifest of an input folder, or None (no manifest, or a list of files)."""
    from beit_pipeline.preprocess import batches as batch_files
    if spec is None or not os.path.isdir(spec) or not os.path.lexists(os.path.join(spec, batch_files.MANIFEST_NAME)):
        return None
    return batch_files.require_complete_manifest(spec)


def manifest_fingerprint(spec: str | None) -> Optional[str]:
    """The image-set fingerprint of an input folder's manifest, or None (no manifest, or a file list)."""
    manifest = manifest_of(spec)
    return manifest.get("fingerprint") if manifest else None


def make_record(model_path: str, input_paths: Sequence[str], manifest_print: str | None, outfmt: str,
                outputs_per_batch: int, batch_size: int | None, engine: str = "onnxruntime", precision: str = "fp32",
                input_spec: str | None = None, outputs: Iterable[str] = ()) -> OutputRecord:
    model = "+".join(fingerprint.file_digest(p) for p in onnx_files.model_files(model_path))
    manifest = manifest_of(input_spec)
    return OutputRecord(model=model,
                        inputs=inputs_digest(input_paths, manifest_print), outfmt=outfmt.lower(),
                        outputs_per_batch=outputs_per_batch, batch_size=batch_size, engine=engine,
                        precision=precision, num_batches=len(input_paths), outputs=list(outputs),
                        input_folder=os.path.abspath(input_spec) if manifest is not None else None,
                        manifest_fingerprint=manifest.get("fingerprint") if manifest else None,
                        manifest_rows=rows_digest(manifest) if manifest else None,
                        image_source=manifest.get("source") if manifest else None)


def folder_identity(out_dir: str) -> list:
    st = os.stat(out_dir)
    return [st.st_dev, st.st_ino]


# ---------------------------------------------------------------- where it is, reading and writing

def record_path(out_dir: str | os.PathLike[str]) -> str:
    """``<out_dir>_beit_infer.json``: beside the folder, never inside it (a trailing slash is ignored)."""
    return os.path.normpath(os.fspath(out_dir)) + RECORD_SUFFIX


def beside(out_dir: str | os.PathLike[str]) -> list:
    """Every file kept beside an output folder, which moves with it: ais_bench's summary, the record, our figures."""
    base = os.path.normpath(os.fspath(out_dir))
    return [base + AIS_SUMMARY_SUFFIX, record_path(out_dir), base + FIGURES_SUFFIX]


def legacy_record_path(out_dir: str) -> str:
    return os.path.join(out_dir, LEGACY_RECORD_NAME)


def read_record(out_dir: str) -> Optional[OutputRecord]:
    """The OutputRecord of ``out_dir``, or None when it is missing, not one, or another folder's."""
    data = files.read_json(record_path(out_dir))
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        return None
    try:
        record = OutputRecord(**{f.name: data[f.name] for f in dataclasses.fields(OutputRecord)})
    except KeyError:
        return None
    if not os.path.isdir(out_dir) or record.folder_id != folder_identity(out_dir):
        return None  # the folder was replaced (or copied) since: the record does not describe its files
    return record


def write_record(out_dir: str, record: OutputRecord) -> None:
    record.folder_id = folder_identity(out_dir)
    files.write_json_atomic(record_path(out_dir), record.to_json())


def remove_record(out_dir: str) -> None:
    try:
        os.unlink(record_path(out_dir))
    except FileNotFoundError:
        pass


def remove_legacy_record(out_dir: str) -> bool:
    """Remove an older version's ``.beit_infer.json`` inside the folder (only that file); True if there was one."""
    path = legacy_record_path(out_dir)
    data = files.read_json(path) if os.path.isfile(path) and not os.path.islink(path) else None
    if not isinstance(data, dict) or data.get("format") not in (1, 2) or "model" not in data:
        return False
    os.unlink(path)
    log.info(f"{path}: removed the record an older beit_infer.py kept inside the folder (it now lives in "
             f"{os.path.basename(record_path(out_dir))}, beside it)")
    return True


def changes(old: Optional[OutputRecord], new: OutputRecord) -> list:
    """What differs between two records, as phrases for the log ("the model changed", ...)."""
    if old is None:
        return ["there is no record of what made them"]
    found = []
    for field, phrase in _CHANGES.items():
        before, after = getattr(old, field), getattr(new, field)
        if before != after:
            shown = f" ({str(before).upper()} -> {str(after).upper()})" if field == "outfmt" else ""
            shown = f" ({before} -> {after})" if field in ("batch_size", "outputs_per_batch", "engine",
                                                         "precision") else shown
            found.append(phrase + shown)
    return found


def identity(record: OutputRecord) -> dict:
    """What makes two runs' outputs the same outputs: the fields whose change recomputes them."""
    return {field: getattr(record, field) for field in _CHANGES}


# ---------------------------------------------------------------- what evaluation asks of it

def _describe(record: OutputRecord) -> str:
    return (f"the batches in {record.input_folder} (images from {record.image_source}, image-set fingerprint "
            f"{record.manifest_fingerprint})")


def check_manifest_matches(out_dir: str, prep_image: str) -> None:
    """Refuse to score outputs against a manifest other than the one their record says they were made from.

    Outputs without a record of ours (ais_bench's) cannot be checked and pass.
    """
    from beit_pipeline.preprocess import batches as batch_files
    record = read_record(out_dir)
    if record is None or record.manifest_rows is None:
        return
    manifest = batch_files.require_complete_manifest(prep_image)
    if rows_digest(manifest) == record.manifest_rows:
        return
    given = batch_files.manifest_path(prep_image)
    raise PipelineFileError(
        f"{out_dir}: these outputs were made from {_describe(record)}, but --prep_image {given} maps rows to "
        f"other images (images from {manifest.get('source')}, image-set fingerprint {manifest.get('fingerprint')}); "
        f"scoring them against it would match rows to the wrong images. Evaluate with --prep_image "
        f"{record.input_folder}, or rerun beit_infer.py on {os.path.dirname(given)}")


def guide_rule_mismatch(manifest: dict, batch_size: int) -> Optional[tuple]:
    """The first (batch stem, row, image) where the guide's rule names another image than the manifest, or None."""
    from beit_pipeline.preprocess import batches as batch_files
    for stem, names in batch_files.rows_from_manifest(manifest):
        index = batch_files.batch_index(stem)
        for row, name in enumerate(names):
            if index is None or stem_of(name) != batch_files.guide_image_name(index, row, batch_size):
                return stem, row, name
    return None


def check_guide_rule_fits(out_dir: str, batch_size: int) -> None:
    """Refuse the guide's rule (row i of input_k is image k*bs+i+1) where the outputs' manifest says otherwise.

    The guide's preprocessing orders images by their number; ours orders by path, so class
    sub-folders (or a skipped image, or a subset) put other images in those rows.  Only
    outputs with a record of ours can be checked.
    """
    from beit_pipeline.preprocess import batches as batch_files
    record = read_record(out_dir)
    if record is None or record.input_folder is None:
        return
    try:
        manifest = batch_files.require_complete_manifest(record.input_folder)
    except PipelineFileError as exc:
        log.warning(f"cannot check that the guide's rule fits {out_dir}: {exc}")
        return
    if rows_digest(manifest) != record.manifest_rows:
        log.warning(f"cannot check that the guide's rule fits {out_dir}: {record.input_folder} was preprocessed "
                    "again after these outputs were made")
        return
    found = guide_rule_mismatch(manifest, batch_size)
    if found is None:
        return
    stem, row, name = found
    layout = "class sub-folders, ordered by path" if any("/" in n for _, ns in batch_files.rows_from_manifest(manifest)
                                                          for n in ns) else "one folder, ordered by name"
    index = batch_files.batch_index(stem)
    expected = batch_files.guide_image_name(index, row, batch_size) if index is not None else "no image"
    raise PipelineFileError(
        f"{out_dir}: without --prep_image the guide's rule names row {row} of {stem} {expected}, but the "
        f"manifest of {record.input_folder} (images from {record.image_source}, {layout}) puts {name} there: the "
        "guide's rule holds only for one flat folder of ILSVRC2012_val_ images ordered by number from 1. Pass "
        f"--prep_image {record.input_folder} to match every row to its image")
