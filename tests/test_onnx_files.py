"""Models past protobuf's 2 GiB (issue 11, beit_large_patch16_512): external data, the held-out simplifier.

A tiny model takes the large models' path here: onnx_files.EXTERNAL_ABOVE (or $BEIT_EXTERNAL_DATA_ABOVE for
a script) is lowered so that it is written as ``<model>.onnx`` + ``<model>.onnx.data``, the layout onnxsim
0.4.36 itself writes past 2 GiB (onnxsim/onnx_simplifier.py, main(): ``basename(output) + '.data'``,
all tensors in one file).  The real large-512 run is test_variants.py's slow test.
"""

import os

import numpy as np
import onnx
import onnxruntime as ort
import onnxsim
import pytest

from beit_pipeline.inference import record as inference_record
from beit_pipeline.graph import onnx_files
from beit_pipeline.graph import simplify
from beit_pipeline.pipeline import workstate
from helpers import run_script

SMALL = "4096"  # bytes: every weight of the tiny model goes to the data file


def outputs(path, batch):
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def image_batch(size=1, seed=0):
    return np.random.default_rng(seed).standard_normal((size, 3, 224, 224), dtype=np.float32)


@pytest.fixture
def external(monkeypatch):
    monkeypatch.setenv(onnx_files.EXTERNAL_ABOVE_ENV, SMALL)


def test_a_model_that_fits_is_written_as_onnx_save_writes_it(onnx_exports, tmp_path):
    model = onnx.load(onnx_exports.simplified())
    onnx_files.write_model(model, tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == model.SerializeToString()


def test_past_the_limit_the_weights_go_to_one_data_file(onnx_exports, tmp_path, external):
    source = onnx_exports.simplified()
    onnx_files.write_model(onnx.load(source), tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
    assert os.path.getsize(tmp_path / "m.onnx") < 60_000 < os.path.getsize(tmp_path / "m.onnx.data")
    batch = image_batch()
    np.testing.assert_array_equal(outputs(tmp_path / "m.onnx", batch), outputs(source, batch))


def test_publishing_a_one_file_model_removes_the_old_data_file(onnx_exports, tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    monkeypatch.setenv(onnx_files.EXTERNAL_ABOVE_ENV, SMALL)
    onnx_files.write_model(onnx.load(onnx_exports.simplified()), target)
    monkeypatch.delenv(onnx_files.EXTERNAL_ABOVE_ENV)
    onnx_files.write_model(onnx.load(onnx_exports.simplified()), target)
    assert os.listdir(tmp_path) == ["m.onnx"]  # no stale m.onnx.data, no temporary folder left


def test_moving_a_model_moves_its_data_and_the_graph_follows(onnx_exports, tmp_path, external):
    """run_all's onnxsim step writes X.partial.onnx (+ X.partial.onnx.data) and promotes it to X.onnx."""
    partial, final = tmp_path / "sim.partial.onnx", tmp_path / "sim.onnx"
    onnx_files.write_model(onnx.load(onnx_exports.simplified()), partial)
    before = outputs(partial, image_batch())
    onnx_files.move_model(partial, final)
    assert sorted(os.listdir(tmp_path)) == ["sim.onnx", "sim.onnx.data"]
    locations = {e.value for t in onnx.load(final, load_external_data=False).graph.initializer
                 for e in t.external_data if e.key == "location"}
    assert locations == {"sim.onnx.data"}
    np.testing.assert_array_equal(outputs(final, image_batch()), before)


@pytest.mark.parametrize("limit, expected", [(SMALL, ["m.onnx", "m.onnx.data"]), ("", ["m.onnx"])])
def test_a_file_per_tensor_export_is_gathered_into_one_data_file(onnx_exports, tmp_path, monkeypatch, limit,
                                                                 expected):
    """torch's exporter writes one file per tensor past 2 GiB; the work folder gets one .data file (none
    where the model fits one file)."""
    monkeypatch.setenv(onnx_files.EXTERNAL_ABOVE_ENV, limit)
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save_model(onnx.load(onnx_exports.dynamic()), folder / "m.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=1024)
    assert len(os.listdir(folder)) > 10
    onnx_files.consolidate(folder / "m.onnx")
    assert sorted(os.listdir(folder)) == expected
    batch = image_batch(2)
    np.testing.assert_array_equal(outputs(folder / "m.onnx", batch), outputs(onnx_exports.dynamic(), batch))


def test_the_held_out_simplifier_makes_onnxsims_graph_byte_for_byte(onnx_exports):
    """onnxsim on the graph with its weights as inputs, the weights put back in their places: the same
    bytes as onnxsim 0.4.36 on the whole model (every tiny weight over 1 KiB held out here)."""
    source = onnx_exports.dynamic()
    reference, ok = onnxsim.simplify(onnx.load(source), overwrite_input_shapes={"image": [2, 3, 224, 224]})
    assert ok
    ours = simplify.simplify_held_out(source, [2, 3, 224, 224], min_bytes=1024)
    model = onnx.load(source, load_external_data=False)
    assert len(simplify.hold_out(model, 1024).tensors) >= 10  # the test holds out real weights
    assert ours.SerializeToString() == reference.SerializeToString()


def test_the_simplifier_command_reads_and_writes_external_data(onnx_exports, tmp_path):
    source = tmp_path / "export.onnx"
    env = {onnx_files.EXTERNAL_ABOVE_ENV: SMALL}
    os.environ[onnx_files.EXTERNAL_ABOVE_ENV] = SMALL
    try:
        onnx_files.write_model(onnx.load(onnx_exports.dynamic()), source)
    finally:
        del os.environ[onnx_files.EXTERNAL_ABOVE_ENV]
    proc = run_script(["python3", "-m", "beit_pipeline.graph.simplify", str(source), str(tmp_path / "sim.onnx"),
                       "--overwrite-input-shape", "2,3,224,224"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(tmp_path / "sim.onnx.data")
    batch = image_batch(2)
    np.testing.assert_allclose(outputs(tmp_path / "sim.onnx", batch), outputs(onnx_exports.dynamic(), batch),
                               rtol=0, atol=1e-5)
    bad = run_script(["python3", "-m", "beit_pipeline.graph.simplify", str(source), str(tmp_path / "x.onnx"),
                      "--overwrite-input-shape", "2,3,224"])
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --overwrite-input-shape")


def test_graph_modify_writes_a_large_model_with_external_data(onnx_exports, tmp_path):
    """The same padded graph as without external data: equal outputs to the last bit."""
    sim = onnx_exports.simplified()
    plain = run_script(["graph_modify.py", sim, str(tmp_path / "plain.onnx"), "1"])
    assert plain.returncode == 0, plain.stderr
    big = run_script(["graph_modify.py", sim, str(tmp_path / "big.onnx"), "1"],
                     env={onnx_files.EXTERNAL_ABOVE_ENV: SMALL})
    assert big.returncode == 0, big.stderr
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data", "plain.onnx"]
    batch = image_batch()
    np.testing.assert_array_equal(outputs(tmp_path / "big.onnx", batch), outputs(tmp_path / "plain.onnx", batch))


def test_a_models_data_file_is_part_of_its_digest(tmp_path):
    """Two equal graphs with other weights are other models: the step after them is redone."""
    model, cache = tmp_path / "m.onnx", str(tmp_path / "cache.json")
    model.write_bytes(b"graph")
    alone = workstate.input_digest(str(model), cache)
    (tmp_path / "m.onnx.data").write_bytes(b"weights 1")
    first = workstate.input_digest(str(model), cache)
    (tmp_path / "m.onnx.data").write_bytes(b"weights 2, longer")
    assert len({alone, first, workstate.input_digest(str(model), cache)}) == 3


def test_large_variants_are_simplified_with_the_weights_held_out():
    assert {n: workstate.simplifier(n) for n in workstate.KNOWN_VARIANTS if "tiny" not in n} == {
        "beit_base_patch16_224": "onnxsim", "beit_base_patch16_384": "onnxsim",
        "beit_large_patch16_224": "beit_pipeline.graph.simplify", "beit_large_patch16_384": "beit_pipeline.graph.simplify",
        "beit_large_patch16_512": "beit_pipeline.graph.simplify"}


def test_other_weights_in_the_data_file_are_another_model(onnx_exports, tmp_path, external):
    """The graph file of a model with external data holds no weights: new weights of the same shapes leave it
    byte-identical, so beit_infer's record (which keeps or recomputes outputs) digests the data file too."""
    path = tmp_path / "m.onnx"
    model = onnx.load(onnx_exports.simplified())
    onnx_files.write_model(model, path)
    graph, first = path.read_bytes(), inference_record.make_record(str(path), [], None, "TXT", 1, 1)
    head = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    head.raw_data = (-onnx.numpy_helper.to_array(head)).tobytes()
    onnx_files.write_model(model, path)
    assert path.read_bytes() == graph
    assert inference_record.make_record(str(path), [], None, "TXT", 1, 1).model != first.model


def test_a_digest_reads_the_data_file_the_graph_names(onnx_exports, tmp_path):
    """Another tool's layout (weights.bin) or a renamed copy: new weights under the same graph file are a new
    model for beit_infer's record and run_all's keys (found in review: the digest read only <name>.onnx.data)."""
    path, cache = tmp_path / "m.onnx", str(tmp_path / "cache.json")
    model = onnx.load(onnx_exports.simplified())
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    assert onnx_files.model_files(path) == [str(path), str(tmp_path / "weights.bin")]
    digests = (workstate.input_digest(str(path), cache), inference_record.make_record(str(path), [], None, "TXT", 1,
                                                                                      1).model)
    data = bytearray((tmp_path / "weights.bin").read_bytes())
    data[-4:] = np.float32(7.0).tobytes()
    (tmp_path / "weights.bin").write_bytes(bytes(data))
    assert workstate.input_digest(str(path), cache) != digests[0]
    assert inference_record.make_record(str(path), [], None, "TXT", 1, 1).model != digests[1]


def test_a_killed_writes_temporary_folder_is_removed_by_the_next_write(onnx_exports, tmp_path, external):
    """SIGKILL (the OOM killer) skips the cleanup: at large-512 a left folder holds 2.9 GB."""
    left = tmp_path / ".m.onnx.abc123.tmp"
    left.mkdir()
    (left / "m.onnx.data").write_bytes(b"x" * 1000)
    onnx_files.write_model(onnx.load(onnx_exports.simplified()), tmp_path / "m.onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.onnx.data"]
