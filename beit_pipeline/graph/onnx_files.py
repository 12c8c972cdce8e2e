"""ONNX files over protobuf's 2 GiB: one ``<model>.onnx`` plus its weights in ``<model>.onnx.data``.

A ModelProto cannot be serialised past 2 GiB, and beit_large_patch16_512's padded graph holds 2.9 GB
(1.2 GB of weights, 24 x 16 x 1040^2 floats of relative-position bias).  Such a model is written as
ONNX external data, in the convention onnxsim uses: every tensor in one file named after the model
plus ``.data``, found relative to the model's folder.  A model that fits is written as one file,
byte for byte what ``onnx.save`` writes.

Writes are atomic for the pair: both files are made in a hidden folder beside the target under
their final names (so the location recorded in the graph is already right), and published with the
old model file removed first: a model file never points into another model's data file.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

from beit_pipeline import files

if TYPE_CHECKING:
    import onnx

PROTOBUF_LIMIT = 2 ** 31 - 1  # bytes: the largest message protobuf serialises
EXTERNAL_ABOVE = PROTOBUF_LIMIT - 64 * 2 ** 20  # a model over this is written with external data
# Tests set it low so that a tiny model takes the large models' path through every script.
EXTERNAL_ABOVE_ENV = "BEIT_EXTERNAL_DATA_ABOVE"


def external_above() -> int:
    return int(os.environ.get(EXTERNAL_ABOVE_ENV) or EXTERNAL_ABOVE)


def data_path(path: str | os.PathLike[str]) -> str:
    """Where a model's external data lives, when it has any: ``<model>.onnx.data``."""
    return os.fspath(path) + ".data"


GRAPH_READ_UP_TO = 64 * 2 ** 20  # bytes: a graph file this small is read for the data files it names


def model_files(path: str | os.PathLike[str]) -> list[str]:
    """The files a model consists of: ``[path]``, its ``.data`` file when there is one, and every other
    external-data file its graph names (another tool's layout, a renamed copy that still reads the old
    name's data).  A graph file over GRAPH_READ_UP_TO holds its weights itself and is not parsed."""
    path = os.fspath(path)
    found = [path] + ([data_path(path)] if os.path.exists(data_path(path)) else [])
    if path.endswith(".onnx") and os.path.getsize(path) <= GRAPH_READ_UP_TO:
        folder = os.path.dirname(os.path.abspath(path))
        found += sorted({os.path.join(folder, name) for name in external_locations(path)} - set(found))
    return found


def external_locations(path: str) -> set[str]:
    """The data file names a graph file records (relative to its folder); none for an unreadable file."""
    try:
        with open(path, "rb") as f:
            if b"location" not in f.read():  # every external-data entry has this key: none here, no parse needed
                return set()
    except OSError:  # unreadable: the step that reads it says so
        return set()
    import onnx  # imported late: workstate imports this module for every step, onnx takes 0.2 s (more loaded)
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:  # not ONNX: the step that reads it says so
        return set()
    return {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for entry in t.external_data if entry.key == "location"}


def model_bytes(path: str | os.PathLike[str]) -> int:
    return sum(os.path.getsize(p) for p in model_files(path))


def has_external_data(model: onnx.ModelProto) -> bool:
    import onnx
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def fits_one_file(model: onnx.ModelProto) -> bool:
    """Whether ``model`` serialises as one protobuf message (ByteSize itself fails past 2 GiB)."""
    if has_external_data(model):
        return False
    try:
        return model.ByteSize() <= external_above()
    except Exception:  # google.protobuf.message.EncodeError and the like
        return False


def save_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path``: one file when it fits protobuf, else ``path`` + ``path``.data."""
    import onnx
    path = os.fspath(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(data_path(path))  # onnx appends to an existing data file
    if fits_one_file(model):
        onnx.save_model(model, path)
        return
    # onnx moves the tensors out of the proto it saves: a copy keeps the caller's model whole.
    onnx.save_model(copy.deepcopy(model), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(data_path(path)), size_threshold=1024)


def consolidate(path: str | os.PathLike[str]) -> None:
    """Gather the weights of a model written with a file per tensor (torch's exporter past 2 GiB) into
    ``path``.data; ``path`` must be alone in a folder of its own (temporary_model's)."""
    import onnx
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    extra = [n for n in os.listdir(folder) if n != name]
    if not extra:
        return
    model = onnx.load(path)  # reads every tensor file
    save_model(model, path)
    for n in extra:
        if n != os.path.basename(data_path(path)):
            os.unlink(os.path.join(folder, n))


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def temporary_model(target: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a path named like ``target`` in a new hidden folder beside it; the folder is removed on exit.

    Write the model there (save_model, an exporter, onnxsim) and publish_model() it inside the block.
    """
    target = os.path.abspath(os.fspath(target))
    # An earlier run killed here (the OOM killer, at large-512's 13 GB) left its GBs behind.
    files.remove_stale_temporaries_of(target)
    folder = tempfile.mkdtemp(prefix="." + os.path.basename(target) + ".", suffix=".tmp",
                              dir=os.path.dirname(target))
    try:
        yield os.path.join(folder, os.path.basename(target))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish_model(tmp: str, target: str | os.PathLike[str]) -> None:
    """Move a model written by temporary_model() (and its data file) to ``target``, durably.

    The old ``target`` goes first, then the data file, then the model file: killed in between, the
    step's product is missing (and is redone), never a model file reading another model's weights.
    """
    target = os.fspath(target)
    if os.path.basename(tmp) != os.path.basename(target):
        raise ValueError(f"{tmp}: a temporary model must carry its target's name ({target})")
    for path in model_files(tmp):
        fsync_file(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    if os.path.exists(data_path(tmp)):
        files.publish_temporary(data_path(tmp), data_path(target))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data_path(target))
    files.publish_temporary(tmp, target)
    files.fsync_folder(os.path.dirname(os.path.abspath(target)))


def write_model(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """save_model() and publish_model() in one: ``path`` (and its data) complete or absent."""
    with temporary_model(path) as tmp:
        save_model(model, tmp)
        publish_model(tmp, path)


def move_model(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename a model file and its data file; the graph's record of where its data lives follows.

    onnxsim names the data file after the file it wrote (``X.partial.onnx.data``), and the run's
    partial outputs are renamed once complete.
    """
    import onnx
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(data_path(src)):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(data_path(dst))
        os.replace(src, dst)
        return
    model = onnx.load(src, load_external_data=False)
    new_location = os.path.basename(data_path(dst))
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = new_location
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst)
    os.replace(data_path(src), data_path(dst))
    files.write_bytes_atomic(dst, model.SerializeToString())
    os.unlink(src)
    files.fsync_folder(os.path.dirname(os.path.abspath(dst)))
