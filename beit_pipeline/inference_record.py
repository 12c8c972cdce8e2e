"""What made the outputs in an inference output folder: ``<out_dir>/.beit_infer.json``.

beit_infer.py writes this record before its first output and reads it on a rerun
into the same folder: outputs are kept only when the model's content, the input
batches, the output format, the number of outputs and the batch size all match.
The record lives INSIDE the folder so that it moves with it (run_all.sh renames
``bs8_partial`` to ``bs8``).  It holds no times or PIDs, so two runs over the same
inputs write the same bytes.
"""

import dataclasses
import os

from beit_pipeline import batches as batch_files
from beit_pipeline import files, fingerprint, onnx_files

RECORD_NAME = ".beit_infer.json"
RECORD_FORMAT = 2  # 2: the engine and precision are part of what made the outputs

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
    batch_size: object  # the model's static batch, --batchsize, or None (each file's own)
    engine: str = "onnxruntime"  # outputs of two engines or precisions are never mixed in one folder
    precision: str = "fp32"
    num_batches: int = 0  # for the reader; covered by ``inputs``

    def to_json(self):
        return {"format": RECORD_FORMAT, **dataclasses.asdict(self)}


def inputs_digest(paths, manifest_fingerprint=None):
    """Digest of the batch files' names, sizes and mtimes (stat only: 50,000 images' batches are GBs)."""
    entries = []
    for path in paths:
        st = os.stat(path)
        entries.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    return fingerprint.digest_json({"batches": entries, "manifest": manifest_fingerprint})


def manifest_fingerprint(spec):
    """The image-set fingerprint of an input folder's manifest, or None (no manifest, or a file list)."""
    if spec is None or not os.path.isdir(spec) or not os.path.lexists(os.path.join(spec, batch_files.MANIFEST_NAME)):
        return None
    return batch_files.load_manifest(spec).get("fingerprint")


def make_record(model_path, input_paths, manifest_print, outfmt, outputs_per_batch, batch_size, engine="onnxruntime",
                precision="fp32"):
    model = "+".join(fingerprint.file_digest(p) for p in onnx_files.model_files(model_path))
    return OutputRecord(model=model,
                        inputs=inputs_digest(input_paths, manifest_print), outfmt=outfmt.lower(),
                        outputs_per_batch=outputs_per_batch, batch_size=batch_size, engine=engine,
                        precision=precision, num_batches=len(input_paths))


def record_path(out_dir):
    return os.path.join(out_dir, RECORD_NAME)


def read_record(out_dir):
    """The OutputRecord in ``out_dir``, or None when it is missing or not one (then nothing is trusted)."""
    data = files.read_json(record_path(out_dir))
    if data is None or data.get("format") != RECORD_FORMAT:
        return None
    try:
        return OutputRecord(**{f.name: data[f.name] for f in dataclasses.fields(OutputRecord)})
    except KeyError:
        return None


def write_record(out_dir, record):
    files.write_json_atomic(record_path(out_dir), record.to_json())


def remove_record(out_dir):
    """Delete the record first, so that a run stopped while clearing the folder leaves nothing trusted."""
    try:
        os.unlink(record_path(out_dir))
    except FileNotFoundError:
        pass


def changes(old, new):
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
