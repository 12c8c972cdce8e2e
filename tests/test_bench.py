"""beit_bench.py on the tiny model: every measurement is taken and reported, and the ratios are computed right."""

import json

import pytest
from helpers import TINY

import beit_bench
from beit_pipeline.bench import throughput


def test_summary_ratios_from_crafted_numbers():
    def crafted():
        return {name: [{"batch_size": 8, "img_per_s": v}] for name, v in
                (("pytorch", 4.0), ("onnx", 8.0), ("onnxsim", 10.0), ("graph_modify", 9.5))}

    tp = crafted()
    results = {"args": {"torch_device": "cpu"}, "ceiling": {"peak_gflop_per_s": 352.0}, "throughput": tp}
    summary = throughput.summarize(results, "beit_base_patch16_224")
    assert summary["ceiling_img_per_s"] == pytest.approx(352.0 / (2 * 17.6))  # 10 img/s
    assert tp["onnxsim"][0]["fraction_of_ceiling"] == pytest.approx(1.0)
    assert tp["pytorch"][0]["fraction_of_ceiling"] == pytest.approx(0.4)
    assert summary["bs8_onnxsim_over_pytorch"] == pytest.approx(2.5)
    assert summary["bs8_graph_modify_over_onnxsim"] == pytest.approx(0.95)
    # PyTorch on a GPU is not compared with ONNX Runtime's CPU ceiling.
    gpu = {"args": {"torch_device": "cuda"}, "ceiling": {"peak_gflop_per_s": 352.0},
           "throughput": crafted()}
    gpu_summary = throughput.summarize(gpu, "beit_base_patch16_224")
    assert "fraction_of_ceiling" not in gpu["throughput"]["pytorch"][0]
    assert "bs8_onnxsim_over_pytorch" not in gpu_summary


def test_bench_runs_end_to_end_on_the_tiny_model(tmp_path):
    out = tmp_path / "bench"
    rc = beit_bench.main(["--out", str(out), "--model", TINY, "--batch_sizes", "1,2", "--repeats", "2",
                          "--ceiling_repeats", "1", "--prep_images", "12", "--skip_e2e"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    # A column per engine and precision this machine runs (issue 13: openvino, and bf16 where the CPU has it).
    assert list(results["throughput"]) == throughput.default_runtimes()
    assert {"pytorch", "onnx", "onnxsim", "graph_modify"} <= set(results["throughput"])
    for entries in results["throughput"].values():
        assert [e["batch_size"] for e in entries] == [1, 2]
        for e in entries:
            assert e["runs"] == 2 and e["img_per_s"] == pytest.approx(e["batch_size"] / e["median_ms"] * 1e3)
    assert len(results["ceiling"]["per_shape"]) == 4 and results["ceiling"]["peak_gflop_per_s"] > 0
    by_precision = results["ceiling"]["by_precision"]
    assert by_precision["fp32"]["peak_gflop_per_s"] == max(by_precision["fp32"]["engines"].values())
    assert ("bf16" in by_precision) == ("openvino_bf16" in results["throughput"])
    prep = results["preprocess"]
    assert prep["images"] == 12 and prep["workers_1_speedup"] == pytest.approx(
        prep["workers_1_img_per_s"] / prep["reference_img_per_s"])
    table = (out / "results.md").read_text()
    header = "| Batch Size | " + " | ".join(throughput.default_runtimes()) + " |"
    assert header in table and "\n| 2 | " in table
    assert (out / "throughput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bf16_columns_need_the_cpus_bf16_instructions():
    with_bf16 = throughput.default_runtimes(frozenset({"avx512_bf16"}))
    without = throughput.default_runtimes(frozenset({"avx2"}))
    assert {"pytorch_bf16", "openvino_bf16"} <= set(with_bf16)
    assert not {"pytorch_bf16", "openvino_bf16"} & set(without) and "pytorch" in without


def test_ratios_per_precision_ceiling():
    tp = {name: [{"batch_size": 8, "img_per_s": v}] for name, v in
          (("pytorch", 4.0), ("onnxsim", 4.4), ("openvino", 5.0), ("openvino_bf16", 10.0))}
    results = {"args": {"torch_device": "cpu"}, "throughput": tp,
               "ceiling": {"peak_gflop_per_s": 176.0, "by_precision": {
                   "fp32": {"peak_gflop_per_s": 176.0, "engines": {}},
                   "bf16": {"peak_gflop_per_s": 704.0, "engines": {}}}}}
    summary = throughput.summarize(results, "beit_base_patch16_224")
    assert summary["ceiling_fp32_img_per_s"] == pytest.approx(5.0)
    assert summary["ceiling_bf16_img_per_s"] == pytest.approx(20.0)
    assert tp["openvino"][0]["fraction_of_ceiling"] == pytest.approx(1.0)
    assert tp["openvino_bf16"][0]["fraction_of_ceiling"] == pytest.approx(0.5)  # against the bf16 ceiling
    assert summary["default_exact_column"] == "openvino"
    assert summary["bs8_default_exact_over_pytorch"] == pytest.approx(1.25)
    assert summary["bs8_openvino_bf16_over_pytorch"] == pytest.approx(2.5)
    assert summary["bs8_default_exact_fraction_of_fp32_ceiling"] == pytest.approx(1.0)


def test_unknown_runtime_is_a_usage_error(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = beit_bench.main(["--out", str(out), "--runtimes", "onnx,tflite", "--skip_e2e"])
    assert rc == 2 and "error: unknown runtimes ['tflite']" in capsys.readouterr().err
    assert not out.exists()  # refused before any measurement
