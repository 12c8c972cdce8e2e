"""beit_infer.py: ais_bench-compatible outputs, summary, performance mode, errors, providers, resume."""

import json
import os
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import beit_infer
from beit_pipeline.preprocess import batches as beit_batches
from beit_pipeline.inference import runner as inference
from beit_pipeline.inference import record as inference_record
from beit_pipeline.inference import summary as inference_summary
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.inference import outputs as beit_outputs
from beit_pipeline.errors import PipelineFileError, UsageError
from helpers import run_script

B = 4  # static batch of the exported test model
THREADS = "1"  # the same thread count on both sides keeps ORT's results bit-identical
AIS_KEYS = ["filesinfo", "args", "NPU_compute_time", "H2D_latency", "D2H_latency", "npu_compute_time_list",
            "throughput", "pid"]  # ais_bench's summary.py Summary.record / report, in its order


def record_file(folder):
    """What made the outputs: beside the folder (inference_record.record_path), never inside it."""
    return inference_record.record_path(folder)


def ours(folder):
    """Our figures of a run, beside ais_bench's <folder>_summary.json."""
    with open(str(folder) + "_beit_summary.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny_onnx(onnx_exports):
    return onnx_exports.static("tiny", 17, B)


@pytest.fixture(scope="session")
def tiny_onnx_dynamic(onnx_exports):
    return onnx_exports.dynamic("tiny", 17)


def make_batches(folder, sizes, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i, n in enumerate(sizes):
        arr = rng.standard_normal((n, 3, 224, 224)).astype(np.float32)
        beit_batches.write_batch(os.path.join(folder, beit_batches.batch_file_name(i)), arr)
        arrays.append(arr)
    return arrays


def direct_run(model, arr):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(THREADS)
    sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": arr})[0]


def txt_rounded(arr):
    """What TXT can hold: every value rounded to %f's six decimals."""
    return np.array([[float(f"{v:f}") for v in row] for row in arr], dtype=np.float32)


def infer(argv, capsys):
    # These tests compare with a direct ONNX Runtime run bit for bit, so they pin ONNX Runtime's CPU provider
    # (the default engine is OpenVINO where installed, issue 13); test_engines.py covers the engines.
    argv = [str(a) for a in argv] + ([] if "--providers" in argv else ["--providers", "cpu"])
    rc = beit_infer.main(argv + ["--no_progress", "--engine_threads", THREADS])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("fmt", ["TXT", "BIN", "NPY"])
def test_outputs_equal_direct_onnxruntime_run(tiny_onnx, tmp_path, capsys, fmt):
    arrays = make_batches(tmp_path / "prep", [B, B, B])
    rc, out, err = infer(["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
                          "--output_dirname", "run", "--outfmt", fmt], capsys)
    assert rc == 0, err
    folder = tmp_path / "out" / "run"
    ext = fmt.lower()
    assert sorted(os.listdir(folder)) == [f"input_{i:05d}_0.{ext}" for i in range(3)]
    for i, arr in enumerate(arrays):
        got = beit_outputs.read_output(folder / f"input_{i:05d}_0.{ext}")
        want = direct_run(tiny_onnx, arr)
        assert got.shape == (B, 1000)
        if fmt == "TXT":
            assert np.max(np.abs(got - txt_rounded(want))) == 0
            assert np.max(np.abs(got - want)) <= 5e-7 + 1e-6 * np.max(np.abs(want))
        else:
            assert np.max(np.abs(got - want)) == 0
    if fmt == "TXT":
        lines = (folder / "input_00000_0.txt").read_text().splitlines()
        assert len(lines) == B and lines[0].endswith(" ") and len(lines[0].split(" ")) == 1001


def test_timestamp_folder_summary_and_throughput(tiny_onnx, tmp_path, capsys, monkeypatch):
    arrays = make_batches(tmp_path / "prep", [B, B, B])
    writes, timed = [], []
    real_write, real_timed = beit_outputs.write_output, inference.timed_run
    monkeypatch.setattr(beit_outputs, "write_output", lambda path, *a, **k: (writes.append(path), real_write(path, *a, **k)))
    monkeypatch.setattr(inference, "timed_run", lambda s, m, batch, *a: (timed.append(float(batch[0, 0, 0, 0])),
                                                                         real_timed(s, m, batch, *a))[1])
    rc, out, err = infer(["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
                          "--loop", "2", "--warmup_count", "2"], capsys)
    assert rc == 0, err
    entries = sorted(os.listdir(tmp_path / "out"))
    dirname = entries[0]
    assert re.fullmatch(r"\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}", dirname)
    assert entries == [dirname] + [dirname + suffix for suffix in ("_beit_infer.json", "_beit_summary.json",
                                                                  "_summary.json")]
    # --loop 2 runs each batch twice back to back, as ais_bench's session loop does (ModelInferenceProcessor.cpp
    # Execute 'loop' times per input; the whole set was cycled before issue 18), and writes each output once
    assert timed == [float(arrays[i][0, 0, 0, 0]) for i in (0, 0, 1, 1, 2, 2)]
    assert sorted(os.listdir(tmp_path / "out" / dirname)) == [f"input_{i:05d}_0.bin" for i in range(3)]
    assert len(writes) == 3

    text = (tmp_path / "out" / entries[-1]).read_text()
    summary = json.loads(text)
    # ais_bench's keys only, in its order, as its json.dump writes them: one line (summary.py Summary.report)
    assert list(summary) == AIS_KEYS and text == json.dumps(summary)
    times = summary["npu_compute_time_list"]
    assert len(times) == 6 and all(t > 0 for t in times)
    stats = summary["NPU_compute_time"]
    assert stats["count"] == 6
    assert stats["min"] == pytest.approx(min(times)) and stats["max"] == pytest.approx(max(times))
    assert stats["mean"] == pytest.approx(np.mean(times)) and stats["median"] == pytest.approx(np.median(times))
    assert stats["percentile(99%)"] == pytest.approx(np.percentile(times, 99))
    assert summary["throughput"] == pytest.approx(B * len(times) / sum(times) * 1000, rel=1e-9)
    figures = ours(tmp_path / "out" / dirname)
    assert figures["provider"] == "CPUExecutionProvider" and figures["batchsize"] == B
    # ais_bench writes sys.argv as ``args`` (summary.py add_args); the parsed options are in our file.
    assert summary["args"][:3] == ["beit_infer.py", "--model", tiny_onnx] and "--loop" in summary["args"]
    assert figures["options"]["loop"] == 2 and figures["options"]["model"] == tiny_onnx
    assert summary["filesinfo"]["1"]["infiles"] == [str(tmp_path / "prep" / "input_00001.bin")]
    assert summary["filesinfo"]["1"]["outfiles"] == [str(tmp_path / "out" / dirname / "input_00001_0.bin")]

    # ais_bench's wording; run_all.sh takes the number after the last colon
    line = [ln for ln in out.splitlines() if ln.startswith("[INFO] throughput ")][-1]
    assert line.startswith(f"[INFO] throughput 1000*batchsize.mean({B})/NPU_compute_time.mean(")
    assert float(line.rsplit(":", 1)[1]) == pytest.approx(summary["throughput"], rel=1e-12)
    assert "NPU_compute_time (ms): min = " in out and "percentile(99%) = " in out
    # io_oprations.py get_files_count_per_batch's line, in bytes
    assert f"[INFO] get filesperbatch files0 size:{B * 3 * 224 * 224 * 4} tensor0size:{B * 3 * 224 * 224 * 4} " \
           "filesperbatch:1 runcount:3" in out.splitlines()


def test_performance_mode_writes_summary_and_pure_output(tiny_onnx, tmp_path, capsys):
    """ais_bench's pure inference (benchmark_process.py main/infer_loop_array_run, io_oprations.py
    get_pure_infer_data): zero input by default, and with --output the output is saved as pure_infer_data_0.<fmt>.
    (Before issue 11 this run wrote the summary only.)"""
    rc, out, err = infer(["--model", tiny_onnx, "--output", str(tmp_path / "out"), "--output_dirname", "perf",
                          "--loop", "5"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["perf", "perf_beit_summary.json", "perf_summary.json"]
    assert os.listdir(tmp_path / "out" / "perf") == ["pure_infer_data_0.bin"]
    got = beit_outputs.read_output(tmp_path / "out" / "perf" / "pure_infer_data_0.bin")
    assert np.max(np.abs(got - direct_run(tiny_onnx, np.zeros((B, 3, 224, 224), np.float32)))) == 0
    summary = json.loads((tmp_path / "out" / "perf_summary.json").read_text())
    assert ours(tmp_path / "out" / "perf")["mode"] == "pure" and summary["NPU_compute_time"]["count"] == 5
    assert ours(tmp_path / "out" / "perf")["batchsize"] == B
    # save_tensors_to_file records the pure input as ais_bench's fake file name
    assert summary["filesinfo"] == {"0": {"infiles": ["pure_infer_data"],
                                          "outfiles": [str(tmp_path / "out" / "perf" / "pure_infer_data_0.bin")]}}
    assert summary["throughput"] == pytest.approx(B * 5 / sum(summary["npu_compute_time_list"]) * 1000)
    assert "throughput 1000*batchsize.mean(4)" in out


def test_dynamic_batch_model_takes_each_files_batch(tiny_onnx_dynamic, tmp_path, capsys):
    arrays = make_batches(tmp_path / "prep", [2, 3])
    rc, out, err = infer(["--model", tiny_onnx_dynamic, "--input", str(tmp_path / "prep"),
                          "--output", str(tmp_path / "out"), "--output_dirname", "d", "--outfmt", "NPY"], capsys)
    assert rc == 0, err
    for i, arr in enumerate(arrays):
        got = beit_outputs.read_output(tmp_path / "out" / "d" / f"input_{i:05d}_0.npy")
        assert got.shape == (arr.shape[0], 1000)
        assert np.max(np.abs(got - direct_run(tiny_onnx_dynamic, arr))) == 0
    summary = json.loads((tmp_path / "out" / "d_summary.json").read_text())
    assert ours(tmp_path / "out" / "d")["batchsize"] == 2.5  # ais_bench's batchsize.mean
    assert summary["throughput"] == pytest.approx(5 / sum(summary["npu_compute_time_list"]) * 1000)


def test_comma_separated_files(tiny_onnx, tmp_path, capsys):
    arrays = make_batches(tmp_path / "prep", [B, B])
    npy = tmp_path / "extra.npy"
    np.save(npy, arrays[0])
    files = [str(tmp_path / "prep" / "input_00001.bin"), str(npy)]
    rc, out, err = infer(["--model", tiny_onnx, "--input", ",".join(files), "--output", str(tmp_path / "out"),
                          "--output_dirname", "c"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "out" / "c")) == ["extra_0.bin", "input_00001_0.bin"]
    got = beit_outputs.read_output(tmp_path / "out" / "c" / "extra_0.bin")
    assert np.max(np.abs(got - direct_run(tiny_onnx, arrays[0]))) == 0


def test_batch_size_mismatch_names_file_and_writes_nothing(tiny_onnx, tmp_path, capsys):
    make_batches(tmp_path / "prep", [B, B])
    make_batches(tmp_path / "bad", [2])
    os.replace(tmp_path / "bad" / "input_00000.bin", tmp_path / "prep" / "input_00002.bin")
    rc, out, err = infer(["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
                          "--output_dirname", "x"], capsys)
    assert rc == 1  # a batch file that does not fit the model: bad input (was 2 before the unified exit codes)
    assert "input_00002.bin" in err and "batch of 2 images" in err and "batches of 4" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["missing", "not_onnx", "empty_folder"])
def test_user_errors_exit_nonzero_with_a_message(tiny_onnx, tmp_path, capsys, case):
    model, inp = tiny_onnx, tmp_path / "prep"
    os.makedirs(inp)
    if case == "missing":
        model = str(tmp_path / "nope.onnx")
        make_batches(inp, [B])
    elif case == "not_onnx":
        model = str(tmp_path / "junk.onnx")
        with open(model, "wb") as f:
            f.write(b"this is not a protobuf" * 10)
        make_batches(inp, [B])
    rc, out, err = infer(["--model", model, "--input", str(inp), "--output", str(tmp_path / "out")], capsys)
    # Unified exit codes: a path argument that does not exist is usage (2); a bad file is 1 (all were 2).
    assert rc == {"missing": 2, "not_onnx": 1, "empty_folder": 1}[case]
    assert err.startswith("error: ") and err.count("\n") == 1
    expected = {"missing": f"--model {model}: model not found",
                "not_onnx": f"{model}: not a model ONNX Runtime can load",
                "empty_folder": f"{inp}: no batch files"}[case]
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_cli_error_has_no_traceback(tmp_path):
    proc = run_script(["beit_infer.py", "--model", str(tmp_path / "missing.onnx"), "--output", str(tmp_path)])
    assert proc.returncode == 2
    assert "missing.onnx: model not found" in proc.stderr and "Traceback" not in proc.stderr


def test_unavailable_provider_warns_and_runs_on_cpu(tiny_onnx, tmp_path, capsys):
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # this test needs a CPU-only onnxruntime
    rc, out, err = infer(["--model", tiny_onnx, "--output", str(tmp_path / "out"), "--output_dirname", "p",
                          "--providers", "cuda", "--loop", "1"], capsys)
    assert rc == 0, err
    available = ", ".join(ort.get_available_providers())
    assert (f"warning: provider cuda (CUDAExecutionProvider) is not available in this onnxruntime "
            f"(available: {available}); skipped") in err.splitlines()
    assert "falling back" not in err
    assert "[INFO] provider:CPUExecutionProvider" in out  # the line that says which provider really ran
    summary = ours(tmp_path / "out" / "p")
    assert summary["provider"] == "CPUExecutionProvider" and summary["providers_requested"] == "cuda"


def test_resolve_providers_order_and_fallback():
    avail = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_models.resolve_providers("cuda,cpu", avail) == (["CUDAExecutionProvider", "CPUExecutionProvider"], [])
    wanted, warnings = onnx_models.resolve_providers("tensorrt,cuda", avail)
    assert wanted == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    # CUDA, not CPU, takes over: the warning says only what was skipped.
    assert warnings == ["provider tensorrt (TensorrtExecutionProvider) is not available in this onnxruntime "
                        "(available: CUDAExecutionProvider, CPUExecutionProvider); skipped"]
    with pytest.raises(UsageError, match="--providers: unknown provider 'gpu'"):
        onnx_models.resolve_providers("gpu", avail)


def finished_run(tiny_onnx, tmp_path, capsys, fmt):
    """Three batches run once with --output_dirname r: (argv, output folder, bytes and mtimes of its files)."""
    make_batches(tmp_path / "prep", [B, B, B])
    argv = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r", "--outfmt", fmt]
    assert infer(argv, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}
    stamps = {name: os.stat(folder / name).st_mtime_ns for name in before}
    return argv, folder, before, stamps


@pytest.mark.parametrize("fmt", ["TXT", "BIN", "NPY"])
def test_resume_recomputes_only_missing_output(tiny_onnx, tmp_path, capsys, fmt):
    ext = fmt.lower()
    argv, folder, before, stamps = finished_run(tiny_onnx, tmp_path, capsys, fmt)
    assert sorted(before) == [f"input_{i:05d}_0.{ext}" for i in range(3)]
    os.unlink(folder / f"input_00001_0.{ext}")
    (folder / f".input_00002_0.{ext}.abc.tmp").write_text("half")  # an interrupted atomic write

    rc, out, err = infer(argv, capsys)
    assert rc == 0, err
    assert sorted(os.listdir(folder)) == sorted(before)
    assert (folder / f"input_00001_0.{ext}").read_bytes() == before[f"input_00001_0.{ext}"]
    for name in (f"input_00000_0.{ext}", f"input_00002_0.{ext}"):
        assert os.stat(folder / name).st_mtime_ns == stamps[name]
    summary = json.loads((tmp_path / "out" / "r_summary.json").read_text())
    assert (ours(folder)["outputs_written"], ours(folder)["outputs_kept"]) == (1, 2)
    assert summary["NPU_compute_time"]["count"] == 1
    assert "resume: 2 of 3 outputs already in" in out

    # Another format: --resume refuses and deletes nothing (a second format would leave eval two candidates)...
    other = "BIN" if fmt != "BIN" else "TXT"
    rc, out, err = infer(argv[:-1] + [other, "--resume"], capsys)
    assert rc == 1 and f"the output format changed ({fmt} -> {other})" in err and f"--outfmt {fmt}" in err
    assert sorted(os.listdir(folder)) == sorted(before) and all(
        (folder / name).read_bytes() == data for name, data in before.items())
    # ... and without --resume every old output is replaced by one in the new format, saying why.
    rc, out, err = infer(argv[:-1] + [other], capsys)
    assert rc == 0, err
    assert f"recomputing all 3 outputs there: the output format changed ({fmt} -> {other})" in out
    assert sorted(os.listdir(folder)) == sorted([f"input_{i:05d}_0.{other.lower()}" for i in range(3)])


@pytest.mark.parametrize("fmt", ["TXT", "BIN", "NPY"])
def test_resume_recomputes_output_with_wrong_row_count(tiny_onnx, tmp_path, capsys, fmt):
    ext = fmt.lower()
    argv, folder, before, stamps = finished_run(tiny_onnx, tmp_path, capsys, fmt)
    short = folder / f"input_00001_0.{ext}"
    # A whole, well-formed output of the wrong batch: one row short.
    beit_outputs.write_output(short, beit_outputs.read_output(short)[:B - 1], ext)
    assert beit_outputs.read_output(short).shape == (B - 1, 1000)

    rc, out, err = infer(argv, capsys)
    assert rc == 0, err
    assert (ours(folder)["outputs_written"], ours(folder)["outputs_kept"]) == (1, 2)
    assert short.read_bytes() == before[short.name]
    for name in (f"input_00000_0.{ext}", f"input_00002_0.{ext}"):
        assert os.stat(folder / name).st_mtime_ns == stamps[name]


def test_resume_with_every_output_kept_reads_no_batch(tiny_onnx, tmp_path, capsys, monkeypatch):
    make_batches(tmp_path / "prep", [B, B])
    argv = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r"]
    assert infer(argv, capsys)[0] == 0
    reads = []
    real_read = beit_batches.read_batch
    monkeypatch.setattr(beit_batches, "read_batch", lambda path, *a, **k: (reads.append(path), real_read(path, *a, **k))[1])
    rc, out, err = infer(argv, capsys)
    assert rc == 0, err
    assert reads == []
    summary = json.loads((tmp_path / "out" / "r_summary.json").read_text())
    assert (ours(tmp_path / "out" / "r")["outputs_written"], ours(tmp_path / "out" / "r")["outputs_kept"]) == (0, 2)
    assert summary["NPU_compute_time"]["count"] == 0 and summary["throughput"] == 0  # as ais_bench: nothing ran


@pytest.mark.parametrize("case", ["incomplete", "no_complete_key", "corrupt"])
def test_unfinished_or_corrupt_manifest_is_refused(tiny_onnx, tmp_path, capsys, case):
    prep = tmp_path / "prep"
    make_batches(prep, [B])
    manifest = {"format": beit_batches.MANIFEST_FORMAT, "complete": False, "batch_size": B,
                "batches": [{"file": "input_00000.bin", "images": [f"{i}.JPEG" for i in range(B)], "real": B}]}
    if case == "no_complete_key":
        del manifest["complete"]
    if case == "corrupt":
        (prep / beit_batches.MANIFEST_NAME).write_text('{"format": 1, "batch_')
    else:
        beit_batches.save_manifest(prep, manifest)
    rc, out, err = infer(["--model", tiny_onnx, "--input", str(prep), "--output", str(tmp_path / "out"),
                          "--output_dirname", "x"], capsys)
    assert rc == 1 and err.startswith("error: ") and str(prep / beit_batches.MANIFEST_NAME) in err  # was 2
    assert ("not valid JSON" if case == "corrupt" else "did not finish") in err
    assert not (tmp_path / "out").exists()

    # Once it says complete: true, the same folder runs.
    if case != "corrupt":
        manifest["complete"] = True
        beit_batches.save_manifest(prep, manifest)
        rc, out, err = infer(["--model", tiny_onnx, "--input", str(prep), "--output", str(tmp_path / "out"),
                              "--output_dirname", "x"], capsys)
        assert rc == 0, err
        assert sorted(os.listdir(tmp_path / "out" / "x")) == ["input_00000_0.bin"]


def test_run_inference_takes_the_parsed_arguments(tiny_onnx, tmp_path):
    make_batches(tmp_path / "prep", [B])
    args = beit_infer.build_parser().parse_args(["--model", tiny_onnx, "--input", str(tmp_path / "prep"),
                                               "--output", str(tmp_path / "out"), "--output_dirname", "a",
                                               "--engine_threads", THREADS, "--no_progress"])
    result = inference_devices.run_inference(args)
    assert result.ours["options"] == inference_summary.options(args) and result.ours["outputs_written"] == 1
    assert ours(tmp_path / "out" / "a")["options"]["input"] == str(tmp_path / "prep")
    assert json.loads((tmp_path / "out" / "a_summary.json").read_text()) == result.ais


def test_timing_stats_and_throughput():
    times = [4.0, 1.0, 3.0, 2.0, 10.0]
    s = inference_summary.timing_stats(times)
    assert (s["min"], s["max"], s["mean"], s["median"], s["count"]) == (1.0, 10.0, 4.0, 3.0, 5)
    assert s["percentile(99%)"] == pytest.approx(4.0 + 6.0 * 0.96)  # linear interpolation between 4.0 and 10.0
    assert inference_summary.timing_stats([])["count"] == 0 and inference_summary.timing_stats([])["mean"] == 0.0
    assert inference_summary.throughput([8, 8, 8, 8, 8], times) == pytest.approx(8 * 5 / 20.0 * 1000)
    assert inference_summary.throughput([], []) == 0.0


def test_model_that_is_not_a_one_image_input_model_is_refused(tmp_path, capsys):
    from onnx import TensorProto, helper, save_model
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 3, 224, 224])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 3, 224, 224])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 3, 224, 224])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "two_inputs", [a, b], [c])
    path = str(tmp_path / "two_inputs.onnx")
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    rc, out, err = infer(["--model", path, "--output", str(tmp_path / "out")], capsys)
    assert rc == 1 and "two_inputs.onnx: the model has 2 inputs" in err  # a bad model file: 1 (was 2)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["bin_ok", "npy_ok", "bin_bytes", "bin_empty", "npy_shape", "npy_empty",
                                  "npy_no_rows", "npy_junk"])
def test_batch_rows_and_read_batch_share_checks(tiny_onnx, tmp_path, capsys, kind):
    """beit_batches.batch_rows (header only) and read_batch accept and refuse the same files, with the same text."""
    prep = tmp_path / "prep"
    prep.mkdir()
    ext = kind.split("_")[0]
    path = prep / f"input_00000.{ext}"
    arr = np.random.default_rng(1).standard_normal((B, 3, 224, 224)).astype(np.float32)
    if kind == "bin_ok":
        beit_batches.write_batch(path, arr)
    elif kind == "npy_ok":
        np.save(path, arr)
    elif kind == "bin_bytes":
        path.write_bytes(arr.tobytes()[:-4])
    elif kind == "bin_empty":
        path.write_bytes(b"")
    elif kind == "npy_shape":
        np.save(path, arr[:, :, :200])
    elif kind == "npy_empty":
        path.write_bytes(b"")
    elif kind == "npy_no_rows":
        np.save(path, arr[:0])
    else:
        path.write_bytes(b"\x93NUMPY junk")
    if kind.endswith("_ok"):
        assert beit_batches.batch_rows(path) == B
        assert np.array_equal(beit_batches.read_batch(path, batch_size=B), arr)
        return
    with pytest.raises(PipelineFileError) as by_header:
        beit_batches.batch_rows(path)
    with pytest.raises(PipelineFileError) as by_reading:
        beit_batches.read_batch(path)
    assert str(by_header.value) == str(by_reading.value) and str(by_header.value).startswith(f"{path}: ")
    rc, out, err = infer(["--model", tiny_onnx, "--input", str(prep), "--output", str(tmp_path / "out")], capsys)
    assert rc == 1 and err == f"error: {by_header.value}\n"  # was 2 and "error: beit_infer: ..."
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- issue 10: what made the outputs, locks, errors

def eval_guide_rule(folder, labels, tmp_path, capsys):
    """beit_eval_acc.py by the guide's rule (batch 4) on ``folder``: the result JSON."""
    import beit_eval_acc

    label_file = tmp_path / "val_label.txt"
    label_file.write_text("".join(f"ILSVRC2012_val_{i + 1:08d}.JPEG {c}\n" for i, c in enumerate(labels)))
    res = tmp_path / "res"
    assert beit_eval_acc.main(["--folder_davinci_target", str(folder), "--annotation_file_path", str(label_file),
                               "--result_json_path", str(res), "--json_file_name", "acc.json",
                               "--batch_size", str(B)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((res / "acc_details.json").read_text())  # our figures beside the guide's acc.json


def test_rerun_with_another_input_folder_recomputes_and_eval_scores_the_truth(tiny_onnx, tmp_path, capsys):
    first = make_batches(tmp_path / "a", [B, B, B], seed=0)
    second = make_batches(tmp_path / "b", [B, B, B], seed=1)
    truth = np.concatenate([direct_run(tiny_onnx, arr) for arr in second]).argmax(axis=1)
    stale = np.concatenate([direct_run(tiny_onnx, arr) for arr in first]).argmax(axis=1)
    out = ["--model", tiny_onnx, "--output", str(tmp_path / "out"), "--output_dirname", "r", "--outfmt", "TXT"]
    assert infer(["--input", str(tmp_path / "a")] + out, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    # What the old resume did: it kept these outputs for the other input folder and eval scored them.
    stale_top1 = 100.0 * np.mean(stale == truth)
    assert stale_top1 == pytest.approx(100 / 12)  # 1 of 12, where the truth is 12 of 12
    assert eval_guide_rule(folder, truth, tmp_path, capsys)["top1"] == pytest.approx(stale_top1)

    rc, out_text, err = infer(["--input", str(tmp_path / "b")] + out, capsys)
    assert rc == 0, err
    assert f"[INFO] {folder}: recomputing all 3 outputs there: the input batches changed" in out_text
    assert "resume:" not in out_text
    summary = ours(folder)
    assert (summary["outputs_written"], summary["outputs_kept"]) == (3, 0)
    result = eval_guide_rule(folder, truth, tmp_path, capsys)
    assert (result["num_images"], result["top1_correct"], result["top1"]) == (12, 12, 100.0)


def test_rerun_with_another_model_recomputes_and_resume_refuses(tiny_onnx, onnx_exports, tmp_path, capsys):
    from beit_pipeline.model import build as beit_model
    from helpers import TINY

    onnx_exports.register("tiny_seed7", lambda: beit_model.build_model(
        beit_model.random_checkpoint(TINY, seed=7)["model"], TINY)[0])
    other = onnx_exports.static("tiny_seed7", 17, B)
    arrays = make_batches(tmp_path / "prep", [B, B])
    args = ["--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"), "--output_dirname", "r"]
    assert infer(["--model", tiny_onnx] + args, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    before = {name: (folder / name).read_bytes() for name in os.listdir(folder)}

    rc, out, err = infer(["--model", other, "--resume"] + args, capsys)
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {folder}: --resume, but its outputs cannot be kept: the model changed.")
    assert {name: (folder / name).read_bytes() for name in os.listdir(folder)} == before  # nothing deleted

    rc, out, err = infer(["--model", other] + args, capsys)
    assert rc == 0, err
    assert "recomputing all 2 outputs there: the model changed" in out
    for i, arr in enumerate(arrays):
        got = beit_outputs.read_output(folder / f"input_{i:05d}_0.bin")
        assert np.max(np.abs(got - direct_run(other, arr))) == 0
        assert np.max(np.abs(got - direct_run(tiny_onnx, arr))) > 0
    # The same model again: the record matches, so --resume keeps everything.
    rc, out, err = infer(["--model", other, "--resume"] + args, capsys)
    assert rc == 0 and "resume: 2 of 2 outputs already in" in out


def test_outputs_without_a_record_are_recomputed_or_refused(tiny_onnx, tmp_path, capsys):
    make_batches(tmp_path / "prep", [B, B])
    args = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r"]
    assert infer(args, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    with open(record_file(folder)) as f:
        record = json.load(f)
    assert record["outfmt"] == "bin" and record["outputs_per_batch"] == 1 and record["batch_size"] == B
    assert record["num_batches"] == 2 and len(record["model"]) == 16 and len(record["inputs"]) == 16
    assert record["outputs"] == ["input_00000_0.bin", "input_00001_0.bin"]
    os.unlink(record_file(folder))  # e.g. outputs that ais_bench or an older beit_infer.py wrote
    rc, out, err = infer(args + ["--resume"], capsys)
    assert rc == 1 and "there is no record of what made them" in err
    assert sorted(os.listdir(folder)) == ["input_00000_0.bin", "input_00001_0.bin"]
    rc, out, err = infer(args, capsys)
    assert rc == 0 and "recomputing all 2 outputs there: there is no record of what made them" in out
    with open(record_file(folder)) as f:
        again = json.load(f)
    # the same run writes the same record, but for when it began (an older output is not its own)
    assert again["written_after_ns"] > record["written_after_ns"]
    assert {**again, "written_after_ns": 0} == {**record, "written_after_ns": 0}


def test_overwrite_recomputes_everything(tiny_onnx, tmp_path, capsys):
    make_batches(tmp_path / "prep", [B, B])
    args = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r"]
    assert infer(args, capsys)[0] == 0
    rc, out, err = infer(args + ["--overwrite"], capsys)
    assert rc == 0, err
    summary = ours(tmp_path / "out" / "r")
    assert (summary["outputs_written"], summary["outputs_kept"]) == (2, 0)
    rc, out, err = infer(args + ["--overwrite", "--resume"], capsys)
    assert rc == 2 and "give one" in err


LOCK_HOLDER = r'''
import os, runpy, sys, time
_real_fsync = os.fsync
def _fsync(fd):
    _real_fsync(fd)
    hold = os.environ["HOLD_FILE"]
    while os.path.exists(hold):  # the first write under the folder lock waits until the test lets go
        open(hold + ".reached", "w").close()
        time.sleep(0.01)
os.fsync = _fsync
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def test_second_run_on_the_same_folder_is_refused_or_waits(tiny_onnx, tmp_path):
    import subprocess
    import sys
    import time

    from helpers import REPO

    make_batches(tmp_path / "prep", [B, B])
    args = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r", "--engine_threads", THREADS, "--no_progress"]
    (tmp_path / "holder.py").write_text(LOCK_HOLDER)
    hold = tmp_path / "hold"
    hold.write_text("")
    env = dict(os.environ, HOLD_FILE=str(hold), PYTHONUNBUFFERED="1")
    script = os.path.join(REPO, "beit_infer.py")
    holder = subprocess.Popen([sys.executable, str(tmp_path / "holder.py"), script] + args, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiter = None
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "hold.reached").exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (tmp_path / "hold.reached").exists(), holder.communicate()
        busy = run_script(["beit_infer.py"] + args)
        assert busy.returncode == 4 and "Traceback" not in busy.stderr
        assert f"output folder {tmp_path / 'out' / 'r'} is in use by PID {holder.pid}" in busy.stderr
        assert busy.stderr.count("\n") == 1
        with open(tmp_path / "waiter.out", "w") as sink:
            waiter = subprocess.Popen([sys.executable, script, "--wait_lock"] + args, env=env, stdout=sink,
                                      stderr=subprocess.STDOUT, text=True)
        while f"waiting for PID {holder.pid}" not in (tmp_path / "waiter.out").read_text() \
                and waiter.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        hold.unlink()
        assert holder.wait(timeout=120) == 0
        assert waiter.wait(timeout=120) == 0
    finally:
        for proc in (holder, waiter):
            if proc is not None and proc.poll() is None:
                proc.kill()
    said = (tmp_path / "waiter.out").read_text()
    assert f"waiting for PID {holder.pid}" in said and "resume: 2 of 2 outputs already in" in said
    assert sorted(os.listdir(tmp_path / "out" / "r")) == ["input_00000_0.bin", "input_00001_0.bin"]
    assert not (tmp_path / "out" / ".r.lock").exists()


def test_disk_full_names_the_output_file_and_a_rerun_resumes(tiny_onnx, tmp_path, capsys, monkeypatch):
    import errno

    make_batches(tmp_path / "prep", [B, B, B])
    args = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r", "--outfmt", "TXT"]
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills while input_00001_0.txt is written; the kernel's error names no file
        if ".input_00001_0.txt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, out, err = infer(args, capsys)
    folder = tmp_path / "out" / "r"
    assert rc == 1 and err == f"error: {folder / 'input_00001_0.txt'}: No space left on device\n"
    assert sorted(os.listdir(folder)) == ["input_00000_0.txt"]  # no temporary left behind
    monkeypatch.setattr(os, "fsync", real_fsync)
    rc, out, err = infer(args, capsys)
    assert rc == 0 and "resume: 1 of 3 outputs already in" in out


def test_ctrl_c_is_one_line_with_the_rerun_hint(tiny_onnx, tmp_path, capsys, monkeypatch):
    make_batches(tmp_path / "prep", [B, B, B])
    args = ["--model", tiny_onnx, "--input", str(tmp_path / "prep"), "--output", str(tmp_path / "out"),
            "--output_dirname", "r"]
    real_write, calls = beit_outputs.write_output, []

    def write(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write(path, *a, **k)

    monkeypatch.setattr(beit_outputs, "write_output", write)
    rc, out, err = infer(args, capsys)
    assert rc == 130
    assert err == ("error: interrupted; the outputs written so far are complete. Rerun with the same --output, "
                   "and --output_dirname set to that output folder's name, to run only the missing batches\n")
    assert not (tmp_path / "out" / ".r.lock").exists()  # the lock is released on the way out
    monkeypatch.setattr(beit_outputs, "write_output", real_write)
    rc, out, err = infer(args, capsys)
    assert rc == 0 and "resume: 1 of 3 outputs already in" in out


def test_output_paths_of_the_wrong_kind_are_one_line_errors(tiny_onnx, tmp_path, capsys):
    make_batches(tmp_path / "prep", [B])
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    args = ["--model", tiny_onnx, "--input", str(tmp_path / "prep")]
    rc, out, err = infer(args + ["--output", str(not_a_folder)], capsys)
    assert rc == 2 and err == f"error: --output {not_a_folder}: exists and is not a folder\n"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r").write_text("x")
    rc, out, err = infer(args + ["--output", str(tmp_path / "out"), "--output_dirname", "r"], capsys)
    assert rc == 2 and err == f"error: {tmp_path / 'out' / 'r'}: exists and is not a folder\n"
    # A folder nobody may write into (sysfs refuses even root): the file it could not create is named.
    rc, out, err = infer(args + ["--output", "/sys", "--output_dirname", "beit_out"], capsys)
    assert rc == 1 and err.count("\n") == 1 and err.startswith("error: /sys/.beit_out.lock: ")


def test_outputs_of_another_engine_are_not_mixed_in(onnx_exports, tmp_path, capsys):
    """An interrupted ONNX Runtime run resumed with OpenVINO (or another --precision) would mix two engines'
    logits in one folder: the record names the engine and precision, so the rerun recomputes every output."""
    pytest.importorskip("openvino")
    model = onnx_exports.static("tiny", 17, 4)
    prep = tmp_path / "prep"
    make_batches(prep, [4, 4])
    args = ["--model", model, "--input", str(prep), "--output", str(tmp_path / "out"), "--output_dirname", "run",
            "--outfmt", "BIN", "--no_progress"]
    assert beit_infer.main(args + ["--providers", "cpu"]) == 0
    os.unlink(tmp_path / "out" / "run" / "input_00001_0.bin")  # as a kill would leave it
    capsys.readouterr()
    assert beit_infer.main(args + ["--providers", "openvino"]) == 0
    out = capsys.readouterr().out
    assert "the engine changed (onnxruntime -> openvino)" in out and "resume:" not in out
    with open(record_file(tmp_path / "out" / "run")) as f:
        record = json.load(f)
    assert (record["engine"], record["precision"]) == ("openvino", "fp32")


# ---------------------------------------------------------------- issue 18: drop-in for ais_bench and the guide
# The real tool's behaviour is read from the newer ais_bench (mjlovesz/sync-ait ait/components/benchmark/
# ais_bench/infer/: __main__.py get_args, benchmark_process.py main / multidevice_run / args_rules, args_check.py,
# io_oprations.py, summary.py, utils.py list_share) and the guide's scripts (Ascend/ModelZoo-PyTorch
# ACL_PyTorch/contrib/cv/classfication/Beit); each test names what it matches.

import guide_scripts  # noqa: E402
from beit_pipeline.inference import devices as inference_devices  # noqa: E402


def stand_in_parser():
    """The stand-in ais_bench's parser: the real get_args() flag for flag (tests/fake_ascend)."""
    import importlib.util

    from helpers import REPO
    spec = importlib.util.spec_from_file_location(
        "fake_ais_bench_main", os.path.join(REPO, "tests", "fake_ascend", "python", "ais_bench", "__main__.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def write_photos(folder, layout):
    """Tiny RGB images named as ImageNet val: ``layout`` maps a sub-folder ('' for none) to image numbers."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for sub, numbers in layout.items():
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for n in numbers:
            pixels = rng.integers(0, 256, (40 + n, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, sub, f"ILSVRC2012_val_{n:08d}.JPEG"), quality=90)


def preprocess(images, prep):
    import beit_preprocess
    assert beit_preprocess.main(["--image_path", str(images), "--prep_image", str(prep), "--batch_size", str(B),
                                 "--workers", "1"]) == 0


@pytest.fixture(scope="module")
def photo_sets(tmp_path_factory):
    """Six photos preprocessed at batch 4 (4 + 2 real rows, 2 padding) twice: in one flat folder (rows in image
    number order, as the guide's preprocessing orders them) and in class sub-folders (rows in path order:
    4, 5, 6, 1, 2, 3)."""
    root = tmp_path_factory.mktemp("photo_sets")
    write_photos(root / "flat", {"": range(1, 7)})
    write_photos(root / "classes", {"a_dogs": (4, 5, 6), "b_cats": (1, 2, 3)})
    for kind in ("flat", "classes"):
        preprocess(root / kind, root / f"prep_{kind}")
    labels = root / "val_label.txt"
    labels.write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG {n * 7}\n" for n in range(1, 7)))
    return root


def eval_main(folder, labels, res, *extra):
    import beit_eval_acc
    return beit_eval_acc.main(["--folder_davinci_target", str(folder), "--annotation_file_path", str(labels),
                               "--result_json_path", str(res), "--json_file_name", "acc.json", *map(str, extra)])


def test_the_guides_eval_rule_runs_on_beit_infer_outputs(tiny_onnx, photo_sets, tmp_path, capsys):
    """Fast sibling of test_run_all.py's acceptance test: the guide's beit_eval_acc.py lists every entry of the
    output folder and parses each name (tests/guide_scripts.py); a file of ours in there made it raise ValueError.
    On the rows it counts right (no padding: the first batch), it agrees with ours."""
    rc, out, err = infer(["--model", tiny_onnx, "--input", photo_sets / "prep_flat", "--output", tmp_path / "out",
                          "--output_dirname", "bs4", "--outfmt", "TXT"], capsys)
    assert rc == 0, err
    folder = tmp_path / "out" / "bs4"
    assert sorted(os.listdir(folder)) == ["input_00000_0.txt", "input_00001_0.txt"]
    assert sorted(os.listdir(tmp_path / "out")) == ["bs4", "bs4_beit_infer.json", "bs4_beit_summary.json",
                                                    "bs4_summary.json"]
    logits = np.concatenate([beit_outputs.read_output(folder / f"input_{k:05d}_0.txt") for k in range(2)])
    labels = tmp_path / "labels.txt"  # the first four images labelled with their predictions: 100% when mapped right
    labels.write_text("".join(f"ILSVRC2012_val_{n:08d}.JPEG {int(logits[n - 1].argmax())}\n" for n in range(1, 5)))
    os.unlink(folder / "input_00001_0.txt")  # the last, padded batch: the guide counts a padding row there
    guide = guide_scripts.guide_eval(str(folder), str(labels), B)
    assert (guide["count"], guide["n_labels"], guide["top1"]) == (4, 1000, 100.0)


def test_a_legacy_record_inside_the_folder_is_the_only_file_removed(tiny_onnx, tmp_path, capsys):
    """Item 1: an older beit_infer.py kept .beit_infer.json inside the folder; that one file of ours is removed,
    its outputs (no trusted record) are recomputed in place, and nothing else there is touched."""
    make_batches(tmp_path / "prep", [B, B])
    folder = tmp_path / "out" / "r"
    folder.mkdir(parents=True)
    (folder / ".beit_infer.json").write_text(json.dumps({"format": 2, "model": "x" * 16, "inputs": "y" * 16}))
    (folder / ".notes.json").write_text("mine")
    rc, out, err = infer(["--model", tiny_onnx, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "r"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(folder)) == [".notes.json", "input_00000_0.bin", "input_00001_0.bin"]
    assert "removed the record an older beit_infer.py kept inside the folder" in out
    assert os.path.isfile(record_file(folder))


def test_an_existing_folder_keeps_every_file_this_run_did_not_write(tiny_onnx, tmp_path, capsys):
    """Item 2: ais_bench never deletes (benchmark_process.py main: makedirs, then save_tensors_to_file writes its
    outputs over files of the same name).  Without a record of ours nothing is deleted: the reported bug deleted an
    unrelated model_1.npy and every *_N.txt|bin|npy of the folder."""
    arrays = make_batches(tmp_path / "prep", [B, B])
    folder = tmp_path / "out" / "r"
    folder.mkdir(parents=True)
    mine = {"model_1.npy": b"a user's array", "input_00007_0.bin": b"an old output", "notes.txt": b"text",
            ".cache.x1.tmp": b"a user's temporary", "input_00000_0.bin": b"an output of the same name"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    rc, out, err = infer(["--model", tiny_onnx, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "r"], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(folder)) == sorted(set(mine) | {"input_00001_0.bin"})
    for name, data in mine.items():
        if name != "input_00000_0.bin":  # overwritten by this run's output of that name, as ais_bench does
            assert (folder / name).read_bytes() == data, name
    assert np.array_equal(beit_outputs.read_output(folder / "input_00000_0.bin"), direct_run(tiny_onnx, arrays[0]))
    assert f"warning: {folder}: 2 files there were not written by this run and are left as they are " \
           "(input_00007_0.bin, model_1.npy)" in err


def test_a_changed_run_deletes_only_what_its_record_lists(tiny_onnx, tmp_path, capsys):
    """Item 2: with a record of this folder, a rerun with other inputs deletes exactly the outputs the record
    lists (here the third batch's, which the new input no longer has), never a file added since."""
    make_batches(tmp_path / "prep", [B, B, B])
    args = ["--model", tiny_onnx, "--output", tmp_path / "out", "--output_dirname", "r"]
    assert infer(["--input", tmp_path / "prep"] + args, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    (folder / "extra_0.bin").write_bytes(b"added by the user")
    make_batches(tmp_path / "prep2", [B, B], seed=5)
    rc, out, err = infer(["--input", tmp_path / "prep2"] + args, capsys)
    assert rc == 0, err
    assert "recomputing all 3 outputs there: the input batches changed" in out
    assert "deleted the 3 outputs its record lists as written by an earlier run" in out
    assert sorted(os.listdir(folder)) == ["extra_0.bin", "input_00000_0.bin", "input_00001_0.bin"]
    with open(record_file(folder)) as f:
        assert json.load(f)["outputs"] == ["input_00000_0.bin", "input_00001_0.bin"]


def test_a_record_of_a_replaced_folder_deletes_nothing(tiny_onnx, tmp_path, capsys):
    """Item 2: the record names its folder (device and inode, which a rename keeps); a folder deleted and made
    again (say by ais_bench) is not the one it describes, so its files are neither deleted nor kept."""
    make_batches(tmp_path / "prep", [B, B])
    args = ["--model", tiny_onnx, "--input", tmp_path / "prep", "--output", tmp_path / "out", "--output_dirname", "r"]
    assert infer(args, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "input_00001_0.bin").write_bytes(b"\0" * (B * 1000 * 4))  # a whole output of the right size
    rc, out, err = infer(args + ["--resume"], capsys)
    assert rc == 1 and "there is no record of what made them" in err
    rc, out, err = infer(args, capsys)
    assert rc == 0 and "resume:" not in out and "deleted the" not in out


def test_an_output_folder_that_holds_the_inputs_is_refused(tiny_onnx, tmp_path, capsys):
    """Item 2: pointed at the input folder, the old runner deleted the input batches; now one line, exit 2,
    before anything runs, and every file is left as it was."""
    make_batches(tmp_path / "prep", [B, B])
    before = {name: (tmp_path / "prep" / name).read_bytes() for name in os.listdir(tmp_path / "prep")}
    cases = [(["--input", tmp_path / "prep", "--output", tmp_path, "--output_dirname", "prep"], "is the input"),
             (["--input", f"{tmp_path / 'prep' / 'input_00000.bin'},{tmp_path / 'prep' / 'input_00001.bin'}",
               "--output", tmp_path, "--output_dirname", "prep"], "holds the input"),
             (["--input", tmp_path / "prep", "--output", tmp_path.parent, "--output_dirname", tmp_path.name],
              "holds the input")]
    for argv, said in cases:
        rc, out, err = infer(["--model", tiny_onnx] + argv, capsys)
        assert rc == 2 and err.count("\n") == 1 and said in err and "outputs are never written among" in err, err
        assert "warm up" not in out
    assert {name: (tmp_path / "prep" / name).read_bytes() for name in os.listdir(tmp_path / "prep")} == before


def test_several_devices_each_run_every_file_unless_divide_input(tiny_onnx, tmp_path, capsys):
    """Item 3: the newer ais_bench's multidevice_run gives every device every input unless --divide_input True
    (benchmark_process.py: 'if args.divide_input: cur_args.input = splits[i]'); the old runner always split."""
    arrays = make_batches(tmp_path / "prep", [B, B, B])
    rc, out, err = infer(["--model", tiny_onnx, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "m", "--device", "0,1"], capsys)
    assert rc == 0, err
    root = tmp_path / "out" / "m"
    for folder in ("device0_0", "device1_1"):
        assert sorted(os.listdir(root / folder)) == [f"input_{i:05d}_0.bin" for i in range(3)]
        for i, arr in enumerate(arrays):
            assert np.array_equal(beit_outputs.read_output(root / folder / f"input_{i:05d}_0.bin"),
                                  direct_run(tiny_onnx, arr))
    assert "each device runs every input file" in out and "summary throughput:" in out


def test_divide_input_shares_files_as_list_share():
    """utils.py list_share: len // devices each, one more for the first len % devices (the old runner gave
    ceil(len / devices) each: 3, 3, 1 for 7 files)."""
    files = [f"f{i}" for i in range(7)]
    assert inference_devices.share_files(files, 3) == [["f0", "f1", "f2"], ["f3", "f4"], ["f5", "f6"]]
    assert inference_devices.share_files(files[:2], 3) == [["f0"], ["f1"], []]


def test_every_flag_of_the_newer_ais_bench_is_accepted():
    """Item 4: every option string of ais_bench's get_args (its stand-in mirrors it flag for flag) is one of
    beit_infer.py's, with the same destination of meaning (both spellings where ais_bench has two)."""
    ours = {s for a in beit_infer.build_parser()._actions for s in a.option_strings}
    theirs = {s for a in stand_in_parser()._actions for s in a.option_strings}
    assert theirs - ours == set()
    for dashed in ("--warmup-count", "--dym-shape", "--output-dirname", "--divide-input", "--batch-size"):
        assert dashed in ours


@pytest.mark.parametrize("flag, value, why", [
    ("--profiler", "True", "profiles the NPU with msprof"), ("--dump", "True", "dumps the NPU's operator data"),
    ("--energy_consumption", "True", "reads the NPU's power"), ("--npu_id", "3", "--energy_consumption reads"),
    ("--run_mode", "tensor", "the outputs are the same"), ("--pipeline", "True", "no copies to overlap"),
    ("--outputSize", "4000", "size their outputs themselves"), ("--backend", "trtexec", "only with --perf True"),
    ("--dump_npy", "True", "there is no dump here"), ("--profiler_rename", "False", None)])
def test_flags_without_meaning_on_the_cpu_are_ignored_with_one_line(tiny_onnx, tmp_path, capsys, flag, value, why):
    """Item 4: accepted, one warning line saying why, and the run is the same."""
    rc, out, err = infer(["--model", tiny_onnx, "--output", tmp_path / "out", "--output_dirname", "p", "--loop", "1",
                          flag, value], capsys)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if flag in ln]
    assert (lines == []) if why is None else (len(lines) == 1 and "ignored on the CPU" in lines[0] and why in lines[0])


@pytest.mark.parametrize("argv, said", [
    (["--dymShape_range", "image:1~4,3,224,224"], "runs the model at every shape of a range"),
    (["--perf", "True"], "runs TensorRT's trtexec"), (["--dymHW", "224,224"], "--dynamic_image_size"),
    (["--dymBatch", "4"], "has a static batch"), (["--dym-shape", "image:4,3,224,224"], "has a static batch"),
    (["--auto_set_dymshape_mode", "True"], "has a static shape"),
    (["--profiler", "True", "--dump", "True"], "cannot be true at the same time"),
    (["--acl_json_path", "missing.json"], "only an existing .json file")])
def test_flags_that_would_change_what_runs_are_refused_with_the_reason(tiny_onnx, tmp_path, capsys, argv, said):
    rc, out, err = infer(["--model", tiny_onnx, "--output", tmp_path / "out", "--output_dirname", "p"] + argv, capsys)
    assert rc == 2 and err.count("\n") == 1 and said in err, err
    assert not (tmp_path / "out").exists()


def test_dynamic_batch_flags_choose_the_batch_of_a_dynamic_model(tiny_onnx_dynamic, tmp_path, capsys):
    """Item 4: --dymBatch / --dymShape (set_session_options) are honoured on a dynamic batch axis: files of 2
    rows are joined two to a batch of 4, as ais_bench joins files to the model's input size."""
    arrays = make_batches(tmp_path / "prep", [2, 2, 2])
    for i, argv in enumerate((["--dymBatch", "4"], ["--dymShape", "image:4,3,224,224"])):
        rc, out, err = infer(["--model", tiny_onnx_dynamic, "--input", tmp_path / "prep", "--output",
                              tmp_path / "out", "--output_dirname", f"d{i}"] + argv, capsys)
        assert rc == 0, err
        assert "filesperbatch:2 runcount:2" in out
        summary = json.loads((tmp_path / "out" / f"d{i}_summary.json").read_text())
        assert summary["NPU_compute_time"]["count"] == 2
        for k, arr in enumerate(arrays):
            got = beit_outputs.read_output(tmp_path / "out" / f"d{i}" / f"input_{k:05d}_0.bin")
            assert np.abs(got - direct_run(tiny_onnx_dynamic, arr)).max() <= 1e-5
    rc, out, err = infer(["--model", tiny_onnx_dynamic, "--input", tmp_path / "prep", "--dymShape",
                          "image:4,3,384,384"], capsys)
    assert rc == 2 and "only the batch N can be chosen" in err


def test_leniencies_warn_in_one_line_where_ais_bench_would_refuse(tiny_onnx, tmp_path, capsys):
    """Item 5: each spelling or value taken here but rejected by ais_bench's parser (its stand-in) gets one line."""
    make_batches(tmp_path / "prep", [B])
    lenient = [["--outfmt", "txt"], ["--debug"], ["--batch_size", str(B)], ["--output-dirname", "r"]]
    for extra in lenient:
        with pytest.raises(SystemExit):
            stand_in_parser().parse_args(["--model", "m.om", "--output", "o"] + extra)
    rc, out, err = infer(["--model", tiny_onnx, "--input", tmp_path / "prep", "--output", tmp_path / "out"]
                         + [a for extra in lenient for a in extra], capsys)
    assert rc == 0, err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert warnings == [
        "warning: --outfmt txt: ais_bench takes only NPY/BIN/TXT, in capitals",
        "warning: --debug without a value: ais_bench needs one (--debug True)",
        "warning: --batch_size: ais_bench takes only --batchsize (--batch_size is kept because the guide's README "
        "passes it); a script that passes it fails on the device",
        "warning: --output-dirname: ait benchmark's spelling; python3 -m ais_bench takes only --output_dirname"]
    assert os.listdir(tmp_path / "out" / "r") == ["input_00000_0.txt"]


@pytest.mark.parametrize("argv, said", [
    (["--output_dirname", "/abs/r"], "ais_bench refuses an absolute path"),
    (["--threads", "0"], "invalid positive int value"), (["--device", "256"], "each in [0, 255]"),
    (["--loop", "0"], "invalid positive int value"), (["--outfmt", "CSV"], "invalid choice: 'CSV'")])
def test_what_ais_bench_refuses_is_refused(tiny_onnx, tmp_path, capsys, argv, said):
    """Item 5: benchmark_process.py args_rules ('--output_dirname do not support abs path!') and args_check.py's
    types; the old runner wrote an absolute --output_dirname outside --output."""
    try:
        rc = beit_infer.main(["--model", tiny_onnx, "--output", str(tmp_path / "out")] + argv)
    except SystemExit as exc:  # argparse's own refusal
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and said in err, err


def test_threads_is_ais_bench_s_and_engine_threads_are_their_own_flag(tiny_onnx, tmp_path, capsys):
    """Item 6: --threads is the number of sessions of --pipeline mode (args_rules: more than 1 without --pipeline
    prints its line and uses 1); the engine's threads are --engine_threads."""
    rc, out, err = infer(["--model", tiny_onnx, "--loop", "1", "--threads", "4"], capsys)
    assert rc == 0, err
    assert "[INFO] need to set --pipeline when setting threads number to be more than one." in out.splitlines()
    assert "--threads 4: ais_bench's pipeline sessions, so 1 is used" in err and "--engine_threads" in err
    text = beit_infer.build_parser().format_help()
    assert "ais_bench's --threads: the number of computing sessions of --pipeline mode" in " ".join(text.split())
    assert "intra-op threads of the CPU engine" in " ".join(text.split())


def test_eval_names_the_newest_dated_folder_and_lists_the_others(tmp_path, capsys):
    """Item 9: ais_bench writes into <output>/<%Y_%m_%d-%H_%M_%S>; pointed at <output>, eval names the newest
    run (the old hint named the first by name: the oldest)."""
    out = tmp_path / "ais_out"
    for name in ("2024_01_01-00_00_00", "2024_03_01-00_00_00", "2024_02_01-00_00_00"):
        (out / name).mkdir(parents=True)
        beit_outputs.write_output(out / name / "input_00000_0.txt", np.zeros((B, 1000), np.float32))
    (out / "2024_04_01-00_00_00").mkdir()  # a run that wrote nothing
    labels = tmp_path / "labels.txt"
    labels.write_text("ILSVRC2012_val_00000001.JPEG 1\n")
    assert eval_main(out, labels, tmp_path / "res", "--batch_size", B) == 1
    err = capsys.readouterr().err
    assert f"the newest with outputs is {out / '2024_03_01-00_00_00'}; the others: 2024_02_01-00_00_00, " \
           "2024_01_01-00_00_00)" in err


def test_guide_rule_eval_of_class_sub_folders_is_refused_naming_the_manifest(tiny_onnx, photo_sets, tmp_path,
                                                                             capsys):
    """Item 10: the guide's preprocessing orders images by number, ours by path; with class sub-folders the
    guide's rule (row i of input_k is image k*bs+i+1) names the wrong images.  The outputs' record leads to the
    manifest, which says so: refused with the reason (it scored the mismatched rows before)."""
    for kind in ("classes", "flat"):
        rc, out, err = infer(["--model", tiny_onnx, "--input", photo_sets / f"prep_{kind}", "--output",
                              tmp_path / "out", "--output_dirname", kind], capsys)
        assert rc == 0, err
    rc = eval_main(tmp_path / "out" / "classes", photo_sets / "val_label.txt", tmp_path / "res", "--batch_size", B)
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "the guide's rule names row 0 of input_00000 ILSVRC2012_val_00000001, but the manifest of " \
           f"{photo_sets / 'prep_classes'}" in err and "puts a_dogs/ILSVRC2012_val_00000004.JPEG there" in err
    assert "class sub-folders, ordered by path" in err and f"Pass --prep_image {photo_sets / 'prep_classes'}" in err
    # With --prep_image the same outputs are scored right; a flat folder ordered by number passes the guide rule.
    assert eval_main(tmp_path / "out" / "classes", photo_sets / "val_label.txt", tmp_path / "res", "--prep_image",
                     photo_sets / "prep_classes") == 0
    assert eval_main(tmp_path / "out" / "flat", photo_sets / "val_label.txt", tmp_path / "res2", "--batch_size",
                     B) == 0


def test_eval_refuses_outputs_made_from_another_manifest_naming_both(tiny_onnx, photo_sets, tmp_path, capsys):
    """Issue 17 item 2: outputs of the class sub-folder preprocessing scored against the flat one's manifest
    (the same photos, another row order) printed a wrong Top-1; now refused, naming both folders."""
    rc, out, err = infer(["--model", tiny_onnx, "--input", photo_sets / "prep_classes", "--output", tmp_path / "out",
                          "--output_dirname", "c"], capsys)
    assert rc == 0, err
    rc = eval_main(tmp_path / "out" / "c", photo_sets / "val_label.txt", tmp_path / "res", "--prep_image",
                   photo_sets / "prep_flat")
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert f"these outputs were made from the batches in {photo_sets / 'prep_classes'}" in err
    assert f"--prep_image {photo_sets / 'prep_flat' / 'manifest.json'} maps rows to other images" in err
    assert not (tmp_path / "res" / "acc.json").exists()


def test_throughput_over_real_images_and_a_resumed_run_s_last_full_measurement(tiny_onnx, photo_sets, tmp_path,
                                                                               capsys):
    """Issue 17 item 5: 6 images in 8 rows (2 padding): img/s over the real images beside ais_bench's formula; a
    resumed run that had nothing to run reports the last full measurement with its date (its table said 0.00),
    and where the earlier run was interrupted it says that no full measurement was made."""
    args = ["--model", tiny_onnx, "--input", photo_sets / "prep_flat", "--output", tmp_path / "out",
            "--output_dirname", "r"]
    assert infer(args, capsys)[0] == 0
    folder = tmp_path / "out" / "r"
    summary = json.loads((tmp_path / "out" / "r_summary.json").read_text())
    first = ours(folder)["last_full_measurement"]
    seconds = sum(summary["npu_compute_time_list"]) / 1000
    assert (first["real_images"], first["rows"], first["padding_rows"]) == (6, 8, 2)
    assert first["throughput_real_images"] == pytest.approx(6 / seconds, rel=1e-9)
    assert first["throughput_ais_bench"] == pytest.approx(summary["throughput"]) == pytest.approx(8 / seconds)
    figures = inference_summary.run_figures(str(folder))
    assert (figures.throughput_real_images, figures.measured_at, figures.resumed) == (
        first["throughput_real_images"], first["measured_at"], False)

    rc, out, err = infer(args, capsys)  # nothing left to run
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "r_summary.json").read_text())["throughput"] == 0  # ais_bench's: none ran
    figures = inference_summary.run_figures(str(folder))
    assert (figures.throughput_real_images, figures.measured_at, figures.resumed) == (
        first["throughput_real_images"], first["measured_at"], True)
    assert f"last full measurement of these outputs: {first['throughput_real_images']} img/s over real images" in out
    assert f"measured {first['measured_at']}" in figures.describe()

    os.unlink(folder / "input_00001_0.bin")  # as a kill leaves it: no summaries written
    for path in inference_summary.summary_paths(folder):
        os.unlink(path)
    rc, out, err = infer(args, capsys)
    assert rc == 0 and "resume: 1 of 2 outputs already in" in out
    assert "no full measurement of these outputs was made" in out
    figures = inference_summary.run_figures(str(folder))
    assert figures.throughput_real_images is None and figures.table_value() == "n/a" and figures.resumed
    assert figures.describe().startswith("throughput: not measured (the outputs were resumed from an interrupted run")
