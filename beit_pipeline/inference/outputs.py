"""Inference outputs as ais_bench writes them, read back for evaluation.

``<input_stem>_0.txt`` (one line per batch row, ``%f`` values each followed by a
space), ``<input_stem>_0.bin`` (raw, in the model output's dtype: float32 from ONNX
Runtime, float16 from an OM whose output atc left in fp16) or ``<input_stem>_0.npy``.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np

from beit_pipeline.errors import PipelineFileError
from beit_pipeline.files import write_bytes_atomic, write_text_atomic

NUM_CLASSES = 1000
OUTPUT_FORMATS = ("txt", "bin", "npy")
_OUTPUT_RE = re.compile(r"^(?P<stem>.+)_0\.(?P<fmt>txt|bin|npy)$", re.IGNORECASE)


def output_file_name(input_stem: str, fmt: str) -> str:
    fmt = fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {OUTPUT_FORMATS}")
    return f"{input_stem}_0.{fmt}"


def format_txt(array: np.ndarray) -> str:
    """ais_bench's TXT: one line per row, every value as %f followed by a space."""
    lines = ["".join(f"{v:f} " for v in row) for row in np.asarray(array).reshape(array.shape[0], -1)]
    return "\n".join(lines) + "\n"


def write_output(path: str | os.PathLike[str], array: np.ndarray, fmt: str | None = None) -> None:
    """Write one output tensor (2-D: batch x classes) in ais_bench's format."""
    path = os.fspath(path)
    fmt = (fmt or os.path.splitext(path)[1][1:]).lower()
    array = np.ascontiguousarray(array, dtype=np.float32)
    if fmt == "txt":
        write_text_atomic(path, format_txt(array))
    elif fmt == "bin":
        write_bytes_atomic(path, array.tobytes(order="C"))
    elif fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, array)
        write_bytes_atomic(path, buf.getvalue())
    else:
        raise ValueError(f"output format {fmt!r} is not one of {OUTPUT_FORMATS}")


BIN_DTYPES = {"float32": np.float32, "float16": np.float16}  # what an ONNX model or an OM outputs here


def bin_dtype(path: str, size: int, num_classes: int, batch_size: int | None = None,
              dtype: str | None = None) -> type[np.floating]:
    """The dtype of a raw BIN output: ``dtype`` when known (the summary), else told by the file size.

    An OM writes whole batches (its input is padded), so with ``batch_size`` B a size of exactly
    B x classes x 2 is float16 and B x classes x 4 float32 (by size alone, 8 fp16 rows are 4 float32
    rows).  Any other size is float32 rows if it fits them (ONNX Runtime's outputs, as before), else
    float16 rows; a size that fits no dtype, or more rows than B, is refused.
    """
    names = [dtype] if dtype is not None else list(BIN_DTYPES)
    if dtype is not None and dtype not in BIN_DTYPES:
        raise PipelineFileError(f"{path}: output dtype {dtype!r} is not one of {', '.join(BIN_DTYPES)}")
    row_bytes = {name: np.dtype(name).itemsize * num_classes for name in names}
    fits = [name for name in names if size and size % row_bytes[name] == 0
            and (batch_size is None or size // row_bytes[name] <= batch_size)]
    full = [name for name in fits if batch_size and size == batch_size * row_bytes[name]]
    whole = [name for name in names if size and size % row_bytes[name] == 0]
    if not fits and whole:
        raise PipelineFileError(f"{path}: {size // row_bytes[whole[0]]} rows or more ({size} bytes), more than "
                                f"the batch size {batch_size}")
    if not fits:
        raise PipelineFileError(f"{path}: {size} bytes is not a whole number of {' or '.join(names)} rows of "
                                f"{num_classes} classes: not an output of this model")
    return BIN_DTYPES[(full or fits)[0]]


def read_output(path: str | os.PathLike[str], num_classes: int = NUM_CLASSES, batch_size: int | None = None,
                dtype: str | None = None) -> np.ndarray:
    """Read one output file as a (rows, num_classes) float32 array.

    A BIN file's dtype is ``dtype`` or told by its size (bin_dtype).  Raises PipelineFileError naming
    the file when it is malformed or when a row is not ``num_classes`` wide.
    """
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1][1:].lower()
    try:
        if fmt == "txt":
            rows = []
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        values = [float(v) for v in line.split()]
                    except ValueError as exc:
                        raise PipelineFileError(f"{path}: line {lineno} is not numbers ({exc})") from exc
                    if len(values) != num_classes:
                        raise PipelineFileError(
                            f"{path}: line {lineno} has {len(values)} values, expected {num_classes} classes")
                    rows.append(values)
            if not rows:
                raise PipelineFileError(f"{path}: empty output file")
            arr = np.asarray(rows, dtype=np.float32)
        elif fmt == "bin":
            kind = bin_dtype(path, os.path.getsize(path), num_classes, batch_size, dtype)
            arr = np.fromfile(path, dtype=kind).reshape(-1, num_classes).astype(np.float32)
        elif fmt == "npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise PipelineFileError(f"{path}: not a readable .npy file ({exc})") from exc
            arr = np.asarray(arr, dtype=np.float32)
            if arr.ndim == 1:
                arr = arr.reshape(1, -1)
            arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 2 else arr
            if arr.shape[1] != num_classes:
                raise PipelineFileError(
                    f"{path}: rows are {arr.shape[1]} wide, expected {num_classes} classes")
        else:
            raise PipelineFileError(f"{path}: unknown output format '.{fmt}'")
    except UnicodeDecodeError as exc:
        raise PipelineFileError(f"{path}: not a text output file ({exc})") from exc
    if not np.all(np.isfinite(arr)):
        raise PipelineFileError(f"{path}: holds NaN or infinite values")
    return arr


def find_outputs(folder: str | os.PathLike[str]) -> dict[str, str]:
    """Map input stem -> output file path for the ais_bench outputs in ``folder``.

    Other files (``sumary.json``, ``*_summary.json``, logs) are ignored.  Two
    formats for the same stem are refused: which one is right is not knowable.
    """
    found = {}
    for name in sorted(os.listdir(folder)):
        m = _OUTPUT_RE.match(name)
        if not m or not os.path.isfile(os.path.join(folder, name)):
            continue
        stem = m.group("stem")
        if stem in found:
            raise PipelineFileError(
                f"{folder}: both {os.path.basename(found[stem])} and {name} are outputs of {stem}; "
                "keep one format per folder")
        found[stem] = os.path.join(folder, name)
    return found
