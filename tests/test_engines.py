"""CPU engines and precisions (issue 13) and beit_infer.py's ais_bench-compatible flags (issue 11).

The real tool's behaviour that the ais_bench tests check is read from the ait/msit benchmark
component's ais_bench (ait/components/benchmark/ais_bench/infer/: benchmark_process.py,
io_oprations.py, summary.py) and Ascend/tools ais-bench_workload/tool/ais_bench/ais_bench/__main__.py;
each test names the function it matches.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

import beit_infer
from beit_pipeline.preprocess import batches as beit_batches
from beit_pipeline.inference import engines
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.inference import outputs as beit_outputs
from beit_pipeline.errors import UsageError
from helpers import run_script

B = 4
HAS_BF16 = bool(engines.native_support("bf16", engines.cpu_flags()))
# Each precision's own tolerance on max|a-b|/max|b| against PyTorch fp32 (bf16 keeps 8 mantissa bits).
TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2}


@pytest.fixture(scope="module")
def tiny_static(onnx_exports):
    return onnx_exports.static("tiny", 17, B)


def write_batches(folder, rows, count, seed=0):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal((rows, 3, 224, 224)).astype(np.float32) for _ in range(count)]
    for i, arr in enumerate(arrays):
        beit_batches.write_batch(os.path.join(folder, beit_batches.batch_file_name(i)), arr)
    return arrays


def infer(argv, capsys):
    rc = beit_infer.main([str(a) for a in argv] + ["--no_progress", "--engine_threads", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


def ort_run(model, batch):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": batch})[0]


def torch_run(onnx_exports, batch):
    import torch
    with torch.inference_mode():
        return onnx_exports.torch_model("tiny")(torch.from_numpy(batch)).numpy()


# ---------------------------------------------------------------- engines and precisions

MATRIX = [("cpu", "fp32"), ("openvino", "fp32"), (None, "fp32"),
          pytest.param("openvino", "bf16", marks=pytest.mark.skipif(not HAS_BF16, reason="CPU without bf16"))]


@pytest.mark.parametrize("providers,precision", MATRIX)
def test_engine_precision_matrix(onnx_exports, tiny_static, tmp_path, capsys, providers, precision):
    """Every engine and precision: outputs within the precision's tolerance of PyTorch, the same files and
    summary keys as ONNX Runtime's fp32 run, and the engine and precision that ran printed and in the summary."""
    arrays = write_batches(tmp_path / "prep", B, 2)
    extra = ["--providers", providers] if providers else []
    rc, out, err = infer(["--model", tiny_static, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "run", "--precision", precision] + extra, capsys)
    assert rc == 0, err
    engine = "onnxruntime" if providers == "cpu" else "openvino"  # the default is OpenVINO where installed
    assert f"[INFO] engine:{engine} " in out and f"precision:{precision}" in out
    assert ("on the CPU's avx512_bf16" in out or "amx_bf16" in out) == (precision == "bf16")
    folder = tmp_path / "out" / "run"
    assert sorted(os.listdir(folder)) == ["input_00000_0.bin", "input_00001_0.bin"]
    for i, arr in enumerate(arrays):
        got = beit_outputs.read_output(folder / f"input_{i:05d}_0.bin")
        errors = onnx_models_errors(got, torch_run(onnx_exports, arr))
        assert errors["max_rel"] <= TOLERANCE[precision], errors
    summary = json.loads((tmp_path / "out" / "run_summary.json").read_text())
    ours = json.loads((tmp_path / "out" / "run_beit_summary.json").read_text())  # ours beside ais_bench's
    assert ours["engine"] == engine and ours["precision"] == precision
    assert ours["runner"].startswith(engine + " ")
    assert list(summary) == ["filesinfo", "args", "NPU_compute_time", "H2D_latency", "D2H_latency",
                             "npu_compute_time_list", "throughput", "pid"]
    line = [ln for ln in out.splitlines() if ln.startswith("[INFO] throughput ")][-1]
    assert float(line.rsplit(":", 1)[1]) == pytest.approx(summary["throughput"], rel=1e-12)


def onnx_models_errors(actual, expected):
    return onnx_models.output_errors(actual, expected)


def test_bf16_is_refused_on_a_cpu_without_bf16(tiny_static, tmp_path, capsys, monkeypatch):
    """A CPU report without avx512_bf16 / amx_bf16 (simulated through $BEIT_CPUINFO): exit 2 naming them."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags"))
    fake = tmp_path / "cpuinfo"
    fake.write_text(flags.replace("avx512_bf16", "").replace("amx_bf16", ""))
    monkeypatch.setenv(engines.CPUINFO_ENV, str(fake))
    write_batches(tmp_path / "prep", B, 1)
    rc, out, err = infer(["--model", tiny_static, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--precision", "bf16"], capsys)
    assert rc == 2 and err.startswith("error: --precision bf16: this CPU has no bf16 instructions")
    assert "amx_bf16 or avx512_bf16" in err and not (tmp_path / "out").exists()
    # The same request through the script, as a user runs it.
    proc = run_script(["beit_infer.py", "--model", tiny_static, "--precision", "bf16"],
                      env={engines.CPUINFO_ENV: str(fake)})
    assert proc.returncode == 2 and "no bf16 instructions" in proc.stderr and "Traceback" not in proc.stderr


def test_choose_engine_rules(monkeypatch):
    bf16_cpu, plain_cpu = frozenset({"avx512f", "avx512_bf16"}), frozenset({"avx2"})
    assert engines.choose_engine(None, "fp32", bf16_cpu).engine == "openvino"
    choice = engines.choose_engine(None, "bf16", bf16_cpu)
    assert (choice.engine, choice.instructions) == ("openvino", ["avx512_bf16"])
    assert engines.choose_engine("cpu", "fp32", plain_cpu).engine == "onnxruntime"
    with pytest.raises(UsageError, match="ONNX Runtime .cpu. runs this model in fp32 only"):
        engines.choose_engine("cpu", "bf16", bf16_cpu)
    with pytest.raises(UsageError, match="amx_fp16 or avx512_fp16"):
        engines.choose_engine(None, "fp16", bf16_cpu)
    with pytest.raises(UsageError, match="int8 is not built"):
        engines.choose_engine(None, "int8", bf16_cpu)
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    assert engines.choose_engine(None, "fp32", plain_cpu).engine == "onnxruntime"  # the fallback default
    with pytest.raises(UsageError, match="needs OpenVINO"):
        engines.choose_engine(None, "bf16", bf16_cpu)


def test_cpu_flags_reads_the_flags_line(tmp_path):
    report = tmp_path / "cpuinfo"
    report.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse avx512_bf16 amx_bf16\n\n")
    flags = engines.cpu_flags(str(report))
    assert flags == {"fpu", "sse", "avx512_bf16", "amx_bf16"}
    assert engines.native_support("bf16", flags) == ["amx_bf16", "avx512_bf16"]
    assert engines.cpu_flags(str(tmp_path / "missing")) == frozenset()


# ---------------------------------------------------------------- ais_bench's behaviour

def test_small_files_are_joined_into_a_batch_and_split_back(tiny_static, tmp_path, capsys):
    """io_oprations.py get_files_count_per_batch / create_infileslist_from_fileslist / save_tensors_to_file:
    filesperbatch = batch / file rows, the last group padded with its first file, outputs split per file and
    none written for the padding."""
    arrays = write_batches(tmp_path / "prep", 1, 5)
    rc, out, err = infer(["--model", tiny_static, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "j", "--providers", "cpu"], capsys)
    assert rc == 0, err
    assert "filesperbatch:4 runcount:2" in out
    folder = tmp_path / "out" / "j"
    assert sorted(os.listdir(folder)) == [f"input_{i:05d}_0.bin" for i in range(5)]
    first = ort_run(tiny_static, np.concatenate(arrays[:4]))
    second = ort_run(tiny_static, np.concatenate([arrays[4]] * 4))  # file 4 padded with itself
    for i in range(5):
        want = first[i:i + 1] if i < 4 else second[:1]
        assert np.array_equal(beit_outputs.read_output(folder / f"input_{i:05d}_0.bin"), want)
    summary = json.loads((tmp_path / "out" / "j_summary.json").read_text())
    ours = json.loads((tmp_path / "out" / "j_beit_summary.json").read_text())
    assert ours["files_per_batch"] == 4 and summary["NPU_compute_time"]["count"] == 2
    assert ours["batchsize"] == B and sorted(summary["filesinfo"]) == ["0", "1", "2", "3", "4"]


def test_files_of_different_sizes_are_refused(tiny_static, tmp_path, capsys):
    """ais_bench would join a 1-row and a 2-row file and mis-split them (get_narray_from_files_list fails only
    on the total size); the row -> image mapping would break, so this is refused before anything is written."""
    write_batches(tmp_path / "prep", 1, 2)
    beit_batches.write_batch(str(tmp_path / "prep" / "input_00002.bin"), np.zeros((2, 3, 224, 224), np.float32))
    rc, out, err = infer(["--model", tiny_static, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--providers", "cpu"], capsys)
    assert rc == 1 and "input_00002.bin: holds a batch of 2 images" in err
    assert "ais_bench joins 4 files of 1 images into one batch" in err and not (tmp_path / "out").exists()


def test_output_batchsize_axis_must_fit_the_output(tiny_static, tmp_path, capsys):
    """save_tensors_to_file: an axis beyond the output's rank is an error."""
    write_batches(tmp_path / "prep", 2, 2)
    rc, out, err = infer(["--model", tiny_static, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "a", "--output_batchsize_axis", "2", "--providers", "cpu"], capsys)
    assert rc == 1 and "cannot split it into 2 files along --output_batchsize_axis 2" in err


def test_summary_keys_args_list_and_display_all_summary(tiny_static, tmp_path, capsys):
    """summary.py Summary.report: H2D_latency / D2H_latency with min..count, ``args`` the argv list, and the
    H2D/D2H lines only with --display_all_summary (given as ais_bench's ``True``)."""
    argv = ["--model", tiny_static, "--output", tmp_path / "out", "--output_dirname", "p", "--loop", "2",
            "--providers", "cpu", "--display_all_summary", "True", "--debug", "1", "--pure_data_type", "random"]
    rc, out, err = infer(argv, capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "out" / "p_summary.json").read_text())
    assert summary["args"] == ["beit_infer.py"] + [str(a) for a in argv] + ["--no_progress", "--engine_threads", "1"]
    for key in ("H2D_latency", "D2H_latency"):
        assert summary[key] == {"min": 0.0, "max": 0.0, "mean": 0.0, "median": 0.0, "percentile(99%)": 0.0,
                                "count": 0}
    assert "no host-device copies" in json.loads((tmp_path / "out" / "p_beit_summary.json").read_text())["latency_note"]
    assert "[INFO] H2D_latency (ms): min = 0.0" in out and "[INFO] D2H_latency (ms): min = 0.0" in out
    assert "session info: inputs [('image'" in out  # --debug
    # --pure_data_type random: a seeded normal batch instead of zeros, output written as pure_infer_data_0.bin
    got = beit_outputs.read_output(tmp_path / "out" / "p" / "pure_infer_data_0.bin")
    want = ort_run(tiny_static, np.random.default_rng(0).standard_normal((B, 3, 224, 224)).astype(np.float32))
    assert np.array_equal(got, want)
    rc, out, err = infer(argv[:-6], capsys)
    assert rc == 0 and "H2D_latency" not in out and "session info" not in out


def test_several_devices_split_the_input_and_sum_throughput(tiny_static, tmp_path, capsys):
    """benchmark_process.py multidevice_run / seg_input_data_for_multi_process / main: with --divide_input True,
    utils.py list_share's consecutive shares per device, outputs in <dirname>/device<id>_<i>/, each summary beside
    its folder, 'summary throughput:' the sum of the devices' throughputs.  (Without it every device runs every
    file: tests/test_infer.py.)"""
    arrays = write_batches(tmp_path / "prep", B, 3)
    rc, out, err = infer(["--model", tiny_static, "--input", tmp_path / "prep", "--output", tmp_path / "out",
                          "--output_dirname", "m", "--device", "0,1", "--providers", "cpu", "--divide_input", "True"],
                         capsys)
    assert rc == 0, err
    root = tmp_path / "out" / "m"
    assert sorted(n for n in os.listdir(root) if not n.endswith(("_beit_infer.json", "_beit_summary.json"))) == \
        ["device0_0", "device0_0_summary.json", "device1_1", "device1_1_summary.json"]
    assert sorted(os.listdir(root / "device0_0")) == ["input_00000_0.bin", "input_00001_0.bin"]
    assert sorted(os.listdir(root / "device1_1")) == ["input_00002_0.bin"]
    assert np.array_equal(beit_outputs.read_output(root / "device1_1" / "input_00002_0.bin"),
                          ort_run(tiny_static, arrays[2]))
    rates = [json.loads((root / f"device{d}_{d}_summary.json").read_text())["throughput"] for d in (0, 1)]
    line = [ln for ln in out.splitlines() if "summary throughput:" in ln][-1]
    assert float(line.rsplit(":", 1)[1]) == pytest.approx(sum(rates), rel=1e-9)
    assert "on the CPU: 2 concurrent workers of 1 threads each" in out


def test_bad_device_list_is_a_usage_error(tiny_static, capsys):
    rc, out, err = infer(["--model", tiny_static, "--device", "0,x"], capsys)
    assert rc == 2 and "--device '0,x'" in err
