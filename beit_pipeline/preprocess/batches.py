"""Batch files and the manifest: what beit_preprocess.py hands to inference and evaluation.

Layout of a preprocessed folder (``--prep_image``)::

    input_00000.bin   raw float32, C order, shape (batch_size, 3, S, S)
    input_00001.bin   ... the last batch is zero-padded to batch_size rows
    manifest.json     which image is in which row, and how many rows are real
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from beit_pipeline.errors import PipelineFileError
from beit_pipeline.files import write_bytes_atomic, write_json_atomic

IMAGE_SIZE = 224
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
BATCH_PREFIX = "input_"
_BATCH_STEM_RE = re.compile(r"^input_(?P<index>\d+)$")
_BATCH_EXTENSIONS = (".bin", ".npy")


def batch_file_name(index: int) -> str:
    """``input_00000.bin``: the name ais_bench keeps as the stem of its output."""
    return f"{BATCH_PREFIX}{index:05d}.bin"


def batch_shape(batch_size: int, image_size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    return (batch_size, 3, image_size, image_size)


def batch_index(stem: str) -> int | None:
    """The k of a batch stem ``input_k`` (``input_00003`` -> 3), or None for any other name.

    Also the stem of its outputs: ais_bench names them ``<input stem>_0.<fmt>``.
    """
    m = _BATCH_STEM_RE.match(stem)
    return int(m.group("index")) if m else None


def list_batch_files(folder: str | os.PathLike[str]) -> list[str]:
    """The ``input_*.bin`` / ``input_*.npy`` files of ``folder`` in batch order."""
    found = []
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        index = batch_index(stem) if ext in _BATCH_EXTENSIONS else None
        if index is not None:
            found.append((index, name))
    return [os.path.join(folder, name) for _, name in sorted(found)]


def image_nbytes(image_size: int = IMAGE_SIZE) -> int:
    """Bytes of one float32 (3, S, S) image in a .bin batch file."""
    return 3 * image_size * image_size * 4


def batch_nbytes(batch_size: int, image_size: int = IMAGE_SIZE) -> int:
    """Size of a .bin batch file of ``batch_size`` images."""
    return batch_size * image_nbytes(image_size)


def _is_npy(path):
    return path.lower().endswith(".npy")


def _bin_rows(path, image_size):
    """Images in a raw float32 .bin batch, from its size; PipelineFileError unless a positive whole number."""
    row = image_nbytes(image_size)
    size = os.path.getsize(path)
    if size == 0 or size % row:
        raise PipelineFileError(
            f"{path}: {size} bytes is not a whole number of float32 (3, {image_size}, {image_size}) "
            f"images ({row} bytes each)")
    return size // row


def _load_npy_batch(path, image_size, mmap_mode=None):
    """np.load a .npy batch (``mmap_mode='r'``: the header only) and check its (N, 3, S, S) shape."""
    try:
        arr = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise PipelineFileError(f"{path}: not a readable .npy file ({exc})") from exc
    if arr.ndim != 4 or tuple(arr.shape[1:]) != (3, image_size, image_size):
        raise PipelineFileError(
            f"{path}: shape {tuple(arr.shape)}, expected (N, 3, {image_size}, {image_size})")
    if arr.shape[0] == 0:
        raise PipelineFileError(f"{path}: holds no images (shape {tuple(arr.shape)})")
    return arr


def batch_rows(path: str | os.PathLike[str], image_size: int = IMAGE_SIZE) -> int:
    """How many (3, S, S) images a batch file holds, without reading its data.

    .bin: from the file size; .npy: from its header.  Raises PipelineFileError
    naming the file with the same checks (and texts) as read_batch().
    """
    path = os.fspath(path)
    if _is_npy(path):
        return int(_load_npy_batch(path, image_size, mmap_mode="r").shape[0])
    return _bin_rows(path, image_size)


def read_batch(path: str | os.PathLike[str], image_size: int = IMAGE_SIZE, batch_size: int | None = None) -> np.ndarray:
    """Read one batch file (.bin raw float32 or .npy) as an (N, 3, S, S) array."""
    path = os.fspath(path)
    if _is_npy(path):
        arr = np.ascontiguousarray(_load_npy_batch(path, image_size), dtype=np.float32)
    else:
        rows = _bin_rows(path, image_size)
        arr = np.fromfile(path, dtype=np.float32).reshape(rows, 3, image_size, image_size)
    if batch_size is not None and arr.shape[0] != batch_size:
        raise PipelineFileError(
            f"{path}: holds {arr.shape[0]} images but the batch size is {batch_size}")
    return arr


def write_batch(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write one batch as raw float32 C-order bytes (no copy when it already is float32 C-order)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    write_bytes_atomic(path, memoryview(array).cast("B"))


# ---------------------------------------------------------------- manifest

def image_set_fingerprint(names: Iterable[str]) -> str:
    """A short digest of the sorted image list: tells two image sets apart."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def manifest_path(path: str | os.PathLike[str]) -> str:
    """Accept either a prep folder or a manifest file."""
    path = os.fspath(path)
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def load_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load and check a manifest; raises PipelineFileError naming the file."""
    mpath = manifest_path(path)
    try:
        with open(mpath, encoding="utf-8", errors="surrogateescape") as f:
            manifest = json.load(f)
    except FileNotFoundError as exc:
        raise PipelineFileError(f"{mpath}: no manifest here (was beit_preprocess.py run?)") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineFileError(f"{mpath}: manifest is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise PipelineFileError(f"{mpath}: cannot read the manifest ({exc.strerror or exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PipelineFileError(f"{mpath}: not a manifest of format {MANIFEST_FORMAT}")
    for key in ("batch_size", "batches"):
        if key not in manifest:
            raise PipelineFileError(f"{mpath}: manifest lacks '{key}'")
    if not _is_count(manifest["batch_size"]) or manifest["batch_size"] < 1:
        raise PipelineFileError(f"{mpath}: 'batch_size' is {manifest['batch_size']!r}, not a positive integer")
    if not isinstance(manifest["batches"], list):
        raise PipelineFileError(f"{mpath}: 'batches' is not a list")
    for batch in manifest["batches"]:
        if not _is_batch_entry(batch):
            raise PipelineFileError(f"{mpath}: malformed batch entry {batch!r}")
        if batch["real"] > manifest["batch_size"]:
            raise PipelineFileError(f"{mpath}: batch {batch['file']} has more rows than the batch size")
    return manifest


def _is_count(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_batch_entry(batch):
    return (isinstance(batch, dict) and isinstance(batch.get("file"), str) and isinstance(batch.get("images"), list)
            and all(isinstance(name, str) for name in batch["images"]) and _is_count(batch.get("real"))
            and batch["real"] == len(batch["images"]))


def require_complete_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """load_manifest(), and refuse a manifest that does not say beit_preprocess.py finished.

    A run that was killed, or stopped by a bad image or a full disk, leaves
    ``complete: false`` and a prefix of the batches: inferring on them or scoring
    them would give a result for part of the images.  Raises PipelineFileError
    naming the manifest file; returns the manifest.
    """
    mpath = manifest_path(path)
    manifest = load_manifest(mpath)
    if manifest.get("complete") is not True:
        said = "complete: false" if manifest.get("complete") is False else \
            f"complete: {json.dumps(manifest.get('complete'))}, not true"
        raise PipelineFileError(
            f"{mpath}: beit_preprocess.py did not finish here ({said}; the run was killed or stopped by an "
            "error), so its batch files hold only part of the images. Rerun beit_preprocess.py with the same "
            "arguments to finish it, then run inference and evaluation")
    return manifest


def save_manifest(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    write_json_atomic(os.path.join(folder, MANIFEST_NAME), manifest)


def rows_from_manifest(manifest: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """[(batch stem, [image names of the real rows])] in batch order."""
    return [(os.path.splitext(b["file"])[0], list(b["images"])) for b in manifest["batches"]]


def guide_image_name(batch_index: int, row: int, batch_size: int) -> str:
    """The guide's rule without a manifest: row i of input_k is image k*bs+i+1."""
    return f"ILSVRC2012_val_{batch_index * batch_size + row + 1:08d}"
