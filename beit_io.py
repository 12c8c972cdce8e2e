"""TRANSITION SHIM, to be deleted: files that the pipeline's steps hand to each other.

Shared by beit_preprocess.py (writes batches and the manifest), beit_infer.py
(reads batches, writes outputs the way ais_bench does) and beit_eval_acc.py
(reads outputs, the manifest and the label file).  Everything about the
on-disk layout lives here so that the steps cannot drift apart.

Layout of a preprocessed folder (``--prep_image``)::

    input_00000.bin   raw float32, C order, shape (batch_size, 3, 224, 224)
    input_00001.bin   ... the last batch is zero-padded to batch_size rows
    manifest.json     which image is in which row, and how many rows are real

Inference outputs, as ais_bench writes them: ``<input_stem>_0.txt`` (one line
per batch row, ``%f`` values each followed by a space), ``<input_stem>_0.bin``
(raw float32) or ``<input_stem>_0.npy``.
"""

import contextlib
import hashlib
import json
import os
import re
import tempfile

import numpy as np

IMAGE_SIZE = 224
NUM_CLASSES = 1000
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
BATCH_PREFIX = "input_"
OUTPUT_FORMATS = ("txt", "bin", "npy")
_OUTPUT_RE = re.compile(r"^(?P<stem>.+)_0\.(?P<fmt>txt|bin|npy)$", re.IGNORECASE)
_BATCH_STEM_RE = re.compile(r"^input_(?P<index>\d+)$")
_BATCH_EXTENSIONS = (".bin", ".npy")


from beit_pipeline.errors import PipelineFileError  # noqa: E402  (transition shim)


# ---------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def temporary_beside(path):
    """Yield a new temporary file's path in ``path``'s folder; it is deleted unless renamed by then.

    Publish it with publish_temporary() inside the block.  A killed process
    leaves at worst a ``.<name>.XXXX.tmp`` file, never a half-written file under
    the final name that a later step would trust.
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


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    with temporary_beside(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_temporary(tmp, path)


def publish_temporary(tmp, path):
    """Give a finished mkstemp file its final name, with the mode a plain open() would give it.

    mkstemp makes files 0600, but atc and ais_bench often run as another user (HwHiAiUser)
    than the one who converted the model.
    """
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def remove_stale_temporaries_of(path):
    """Delete the ``.tmp`` files that an interrupted atomic write of ``path`` left beside it."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    prefix = "." + os.path.basename(os.fspath(path)) + "."
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def write_text_atomic(path, text):
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, obj):
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def remove_stale_temporaries(folder):
    """Delete the ``.tmp`` leftovers of an interrupted atomic write."""
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


# ---------------------------------------------------------------- batch files

def batch_file_name(index):
    """``input_00000.bin``: the name ais_bench keeps as the stem of its output."""
    return f"{BATCH_PREFIX}{index:05d}.bin"


def batch_shape(batch_size, image_size=IMAGE_SIZE):
    return (batch_size, 3, image_size, image_size)


def batch_index(stem):
    """The k of a batch stem ``input_k`` (``input_00003`` -> 3), or None for any other name.

    Also the stem of its outputs: ais_bench names them ``<input stem>_0.<fmt>``.
    """
    m = _BATCH_STEM_RE.match(stem)
    return int(m.group("index")) if m else None


def list_batch_files(folder):
    """The ``input_*.bin`` / ``input_*.npy`` files of ``folder`` in batch order."""
    found = []
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        index = batch_index(stem) if ext in _BATCH_EXTENSIONS else None
        if index is not None:
            found.append((index, name))
    return [os.path.join(folder, name) for _, name in sorted(found)]


def image_nbytes(image_size=IMAGE_SIZE):
    """Bytes of one float32 (3, S, S) image in a .bin batch file."""
    return 3 * image_size * image_size * 4


def batch_nbytes(batch_size, image_size=IMAGE_SIZE):
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


def batch_rows(path, image_size=IMAGE_SIZE):
    """How many (3, S, S) images a batch file holds, without reading its data.

    .bin: from the file size; .npy: from its header.  Raises PipelineFileError
    naming the file with the same checks (and texts) as read_batch().
    """
    path = os.fspath(path)
    if _is_npy(path):
        return int(_load_npy_batch(path, image_size, mmap_mode="r").shape[0])
    return _bin_rows(path, image_size)


def read_batch(path, image_size=IMAGE_SIZE, batch_size=None):
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


def write_batch(path, array):
    """Write one batch as raw float32 C-order bytes (no copy when it already is float32 C-order)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    write_bytes_atomic(path, memoryview(array).cast("B"))


# ---------------------------------------------------------------- manifest

def image_set_fingerprint(names):
    """A short digest of the sorted image list: tells two image sets apart."""
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()[:16]


def manifest_path(path):
    """Accept either a prep folder or a manifest file."""
    path = os.fspath(path)
    return os.path.join(path, MANIFEST_NAME) if os.path.isdir(path) else path


def load_manifest(path):
    """Load and check a manifest; raises PipelineFileError naming the file."""
    mpath = manifest_path(path)
    try:
        with open(mpath, encoding="utf-8") as f:
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
    for batch in manifest["batches"]:
        if not {"file", "images", "real"} <= set(batch) or batch["real"] != len(batch["images"]):
            raise PipelineFileError(f"{mpath}: malformed batch entry {batch!r}")
        if batch["real"] > manifest["batch_size"]:
            raise PipelineFileError(f"{mpath}: batch {batch['file']} has more rows than the batch size")
    return manifest


def require_complete_manifest(path):
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


def save_manifest(folder, manifest):
    write_json_atomic(os.path.join(folder, MANIFEST_NAME), manifest)


def rows_from_manifest(manifest):
    """[(batch stem, [image names of the real rows])] in batch order."""
    return [(os.path.splitext(b["file"])[0], list(b["images"])) for b in manifest["batches"]]


def guide_image_name(batch_index, row, batch_size):
    """The guide's rule without a manifest: row i of input_k is image k*bs+i+1."""
    return f"ILSVRC2012_val_{batch_index * batch_size + row + 1:08d}"


# ---------------------------------------------------------------- inference outputs

def output_file_name(input_stem, fmt):
    fmt = fmt.lower()
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format {fmt!r} is not one of {OUTPUT_FORMATS}")
    return f"{input_stem}_0.{fmt}"


def format_txt(array):
    """ais_bench's TXT: one line per row, every value as %f followed by a space."""
    lines = ["".join(f"{v:f} " for v in row) for row in np.asarray(array).reshape(array.shape[0], -1)]
    return "\n".join(lines) + "\n"


def write_output(path, array, fmt=None):
    """Write one output tensor (2-D: batch x classes) in ais_bench's format."""
    path = os.fspath(path)
    fmt = (fmt or os.path.splitext(path)[1][1:]).lower()
    array = np.ascontiguousarray(array, dtype=np.float32)
    if fmt == "txt":
        write_text_atomic(path, format_txt(array))
    elif fmt == "bin":
        write_bytes_atomic(path, array.tobytes(order="C"))
    elif fmt == "npy":
        import io
        buf = io.BytesIO()
        np.save(buf, array)
        write_bytes_atomic(path, buf.getvalue())
    else:
        raise ValueError(f"output format {fmt!r} is not one of {OUTPUT_FORMATS}")


def read_output(path, num_classes=NUM_CLASSES):
    """Read one output file as a (rows, num_classes) float32 array.

    Raises PipelineFileError naming the file when it is malformed or when a
    row is not ``num_classes`` wide.
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
            size = os.path.getsize(path)
            if size == 0 or size % (4 * num_classes):
                raise PipelineFileError(
                    f"{path}: {size} bytes is not a whole number of float32 rows of {num_classes} classes")
            arr = np.fromfile(path, dtype=np.float32).reshape(-1, num_classes)
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


def find_outputs(folder):
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


# ---------------------------------------------------------------- labels

def read_labels(path, num_classes=NUM_CLASSES):
    """Read ``val_label.txt`` lines ``ILSVRC2012_val_00000001.JPEG 65``.

    Keys are image names without extension, so that a manifest's names and the
    guide's generated names both match.  Windows line endings, trailing blanks
    and blank lines are accepted; a duplicate name, a label that is not an
    integer in [0, num_classes) or a line of the wrong shape is an error that
    names the file and the line.
    """
    path = os.fspath(path)
    labels = {}
    try:
        with open(path, encoding="utf-8-sig", newline=None) as f:
            lines = f.read().splitlines()
    except FileNotFoundError as exc:
        raise PipelineFileError(f"{path}: label file not found") from exc
    except UnicodeDecodeError as exc:
        raise PipelineFileError(f"{path}: label file is not UTF-8 text ({exc})") from exc
    for lineno, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise PipelineFileError(f"{path}:{lineno}: expected 'IMAGE_NAME LABEL', got {line.strip()!r}")
        name, label = parts
        try:
            value = int(label)
        except ValueError as exc:
            raise PipelineFileError(f"{path}:{lineno}: label {label!r} is not an integer") from exc
        if not 0 <= value < num_classes:
            raise PipelineFileError(f"{path}:{lineno}: label {value} is outside [0, {num_classes})")
        key = image_key(name)
        if key in labels:
            raise PipelineFileError(f"{path}:{lineno}: image {name} is listed twice")
        labels[key] = value
    if not labels:
        raise PipelineFileError(f"{path}: label file has no labels")
    return labels


def image_key(name):
    """An image's name without folder and extension: the key labels are kept by."""
    return os.path.splitext(os.path.basename(name))[0]
