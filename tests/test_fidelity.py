"""beit_fidelity.py: every stage scored against PyTorch; the fp16 OM emulation; --locate.

The acceptance tests run on a BEiT-base work folder (conftest's base checkpoint and its
exported / simplified ONNX files, 8 synthetic images at batch size 8); the emulation's
fused operators are checked on small hand-made graphs.
"""

import json
import math
import os
import re
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import beit_fidelity
import beit_preprocess
from beit_pipeline import fidelity, fidelity_locate, graph_padding, inference_record, om_emulation
from beit_pipeline import onnx_models as ort_models  # the name onnx_models is conftest's fixture
from beit_pipeline.synthetic import write_image_set

BS = 8
BF16_HERE = fidelity.cpu_runs("bf16")  # the cpu_bf16 stage is scored only where the CPU has bf16 instructions
MODEL_STAGES = ["pytorch", "onnx", "onnxsim", "graph_modify"] + (["cpu_bf16"] if BF16_HERE else []) + \
    ["guide_padding", "om_emulation", "guide_om_emulation"]


# ---------------------------------------------------------------- a BEiT-base work folder

def write_labels(path, names, logits):
    """PyTorch's own Top-1 for all but the last two images: the 7th gets its 2nd choice, the 8th its last."""
    order = np.argsort(-logits, axis=1, kind="stable")
    chosen = [int(order[i, 0]) for i in range(len(names) - 2)] + [int(order[-2, 1]), int(order[-1, -1])]
    with open(path, "w") as f:
        f.writelines(f"{name} {label}\n" for name, label in zip(names, chosen))


@pytest.fixture(scope="module")
def base_workdir(tmp_path_factory, onnx_models, base_checkpoint):
    """prep_image_bs8 (8 images), the three fp32 ONNX files as run_all.sh names them, labels."""
    import torch

    work = tmp_path_factory.mktemp("fidelity_work")
    write_image_set(work / "images", BS, seed=3)
    assert beit_preprocess.main(["--image_path", str(work / "images"), "--prep_image", str(work / "prep_image_bs8"),
                                 "--batch_size", str(BS)]) == 0
    shutil.copy(onnx_models.dynamic("base", 11), work / "beit_base_patch16_224.onnx")
    shutil.copy(onnx_models.simplified("base", 11, BS), work / "beit_onnxsim_bs8.onnx")
    model = onnx.load(str(work / "beit_onnxsim_bs8.onnx"))
    graph_padding.modify(model, BS)
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    manifest = json.loads((work / "prep_image_bs8" / "manifest.json").read_text())
    names = manifest["batches"][0]["images"]
    batch = np.fromfile(work / "prep_image_bs8" / manifest["batches"][0]["file"], np.float32).reshape(BS, 3, 224, 224)
    with torch.no_grad():
        logits = onnx_models.torch_model("base")(torch.from_numpy(batch)).numpy()
    write_labels(work / "val_label.txt", names, logits)
    np.save(work / "torch_logits.npy", logits)  # for the om stage's stand-in outputs
    return work


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory, onnx_models, base_workdir):
    """The tiny BEiT's onnxsim and graph_modify models at batch 8 beside the same preprocessed images."""
    work = tmp_path_factory.mktemp("fidelity_tiny")
    shutil.copytree(base_workdir / "prep_image_bs8", work / "prep_image_bs8")
    shutil.copy(onnx_models.simplified("tiny", 11, BS), work / "beit_onnxsim_bs8.onnx")
    model = onnx.load(str(work / "beit_onnxsim_bs8.onnx"))
    graph_padding.modify(model, BS)
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    return work


def fidelity_args(work, checkpoint, *extra):
    return ["--workdir", str(work), "--batch_size", str(BS), "--checkpoint", checkpoint,
            "--label_file", str(work / "val_label.txt"), *extra]


@pytest.fixture(scope="module")
def base_report(base_workdir, base_checkpoint):
    """beit_fidelity.py run once on the base work folder: (exit code, stdout, the JSON)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = beit_fidelity.main(fidelity_args(base_workdir, base_checkpoint, "--max_images", "8"))
    path = base_workdir / "fidelity_bs8.json"
    return rc, out.getvalue(), json.loads(path.read_text()) if path.exists() else None


def stages_of(report):
    return {s["name"]: s for s in report["stages"]}


# ---------------------------------------------------------------- the report (acceptance)

def test_report_scores_every_stage(base_report, base_workdir):
    rc, text, report = base_report
    assert rc == 0, text
    assert [s["name"] for s in report["stages"]] == MODEL_STAGES  # no ais_bench outputs: no om stage
    for s in report["stages"]:
        assert set(s) >= {"name", "top1", "top5", "agree_top1", "max_rel_err", "min_cosine", "num_images", "flipped"}
        assert s["num_images"] == BS
    ref = stages_of(report)["pytorch"]
    # Labels: PyTorch's Top-1 for 6 images, its 2nd choice for the 7th, its last choice for the 8th.
    assert (ref["top1"], ref["top5"], ref["agree_top1"], ref["max_rel_err"]) == (75.0, 87.5, 100.0, 0.0)
    for name in ("onnx", "onnxsim", "graph_modify"):
        s = stages_of(report)[name]
        assert s["agree_top1"] == 100.0 and s["flipped"] == [], s
        assert s["max_rel_err"] <= 1e-4 and s["min_cosine"] > 0.999999, s
        assert (s["top1"], s["top5"]) == (75.0, 87.5)
    assert (base_workdir / "fidelity_bs8.md").read_text().count("\n| ") == len(MODEL_STAGES) + 1
    assert re.search(r"^\| om_emulation \| [\d.]+ \|", text, re.MULTILINE)
    assert "predicted OM Top-1 (om_emulation)" in text


def test_om_emulation_is_genuinely_fp16_and_close(base_report, base_workdir):
    emulation = stages_of(base_report[2])["om_emulation"]
    assert 1e-6 < emulation["max_rel_err"] <= 5e-2, emulation
    assert emulation["min_cosine"] > 0.999
    model = onnx.load(str(base_workdir / "beit_om_emulation_bs8.onnx"))
    fp16, total = om_emulation.fp16_matmul_weights(model)
    assert fp16 == total == 4 * 12 + 1  # qkv, proj, fc1, fc2 per block and the head
    assert not [n for n in model.graph.node if n.op_type == "Erf"]
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]
    assert os.path.getsize(base_workdir / "beit_om_emulation_bs8.onnx") < 0.55 * os.path.getsize(
        base_workdir / "beit_mg_bs8.onnx")


def test_guide_padding_error_dwarfs_graph_modify(base_report):
    stages = stages_of(base_report[2])
    guide, exact = stages["guide_padding"], stages["graph_modify"]
    assert guide["max_rel_err"] >= 100 * exact["max_rel_err"] and guide["max_rel_err"] > 1e-3, (guide, exact)
    # its fp16 emulation carries the same padding error
    assert stages["guide_om_emulation"]["max_rel_err"] > 1e-3


@pytest.mark.skipif(not BF16_HERE, reason="this CPU has no bf16 instructions (or OpenVINO is missing)")
def test_cpu_bf16_stage_shows_what_bf16_costs(base_report):
    """Issue 13: the reduced CPU precision gets its own row; it is genuinely reduced and still close."""
    bf16 = stages_of(base_report[2])["cpu_bf16"]
    graph_modify = stages_of(base_report[2])["graph_modify"]
    assert 1e-4 < bf16["max_rel_err"] < 5e-2 and bf16["max_rel_err"] > 100 * graph_modify["max_rel_err"], bf16
    assert bf16["source"].endswith("beit_mg_bs8.onnx")


def test_cpu_bf16_stage_is_refused_on_a_cpu_without_bf16(tiny_workdir, tiny_checkpoint, tmp_path, monkeypatch,
                                                         capsys):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setenv("BEIT_CPUINFO", str(cpuinfo))
    assert not fidelity.cpu_runs("bf16")
    rc = beit_fidelity.main(fidelity_args(tiny_workdir, tiny_checkpoint, "--stages", "cpu_bf16"))
    err = capsys.readouterr().err
    assert rc == 2 and "stage cpu_bf16: this CPU or this install cannot run bf16" in err
    assert not (tiny_workdir / "fidelity_bs8.json").exists()


def test_emulation_runs_with_beit_infer(tiny_workdir, tmp_path, capsys):
    import beit_infer

    rc = beit_fidelity.main(["--workdir", str(tiny_workdir), "--batch_size", "8", "--locate", "om_emulation"])
    assert rc == 0, capsys.readouterr().err  # makes beit_om_emulation_bs8.onnx (--locate writes no report)
    assert not (tiny_workdir / "fidelity_bs8.json").exists()
    emu = str(tiny_workdir / "beit_om_emulation_bs8.onnx")
    rc = beit_infer.main(["--model", emu, "--input", str(tiny_workdir / "prep_image_bs8"), "--output",
                          str(tmp_path), "--output_dirname", "bs8", "--outfmt", "NPY", "--batchsize", "8",
                          "--providers", "cpu", "--no_progress"])
    assert rc == 0
    written = np.load(tmp_path / "bs8" / "input_00000_0.npy")
    batch = np.fromfile(tiny_workdir / "prep_image_bs8" / "input_00000.bin", np.float32).reshape(BS, 3, 224, 224)
    direct = ort_models.run_session(ort_models.open_session(emu), batch)
    assert written.shape == (BS, 1000)
    assert ort_models.output_errors(written, direct)["max_rel"] <= 1e-6


def test_om_stage_reads_ais_bench_outputs(base_report, base_workdir, base_checkpoint, capsys):
    """ais_out/bs8 written by ais_bench (no beit_infer.py record there) is the om stage; a second run
    reuses the models the first one made."""
    from beit_pipeline import outputs as output_files

    made = base_workdir / "beit_om_emulation_bs8.onnx"
    before = made.stat().st_mtime_ns
    folder = base_workdir / "ais_out" / "bs8"
    folder.mkdir(parents=True)
    logits = np.load(base_workdir / "torch_logits.npy")
    logits[3] = -logits[3]  # one image the "device" gets wrong
    output_files.write_output(str(folder / "input_00000_0.bin"), logits.astype(np.float32))
    try:
        rc = beit_fidelity.main(fidelity_args(base_workdir, base_checkpoint, "--stages", "om,om_emulation"))
        text = capsys.readouterr().out
        assert rc == 0 and made.stat().st_mtime_ns == before and "made " not in text
        report = json.loads((base_workdir / "fidelity_bs8.json").read_text())
        assert [s["name"] for s in report["stages"]] == ["pytorch", "om_emulation", "om"]
        om = stages_of(report)["om"]
        assert om["agree_top1"] == 87.5 and len(om["flipped"]) == 1 and om["min_cosine"] < -0.99
        with open(inference_record.record_path(folder), "w") as f:  # beit_infer.py's outputs are not the OM's
            f.write("{}")
        assert beit_fidelity.main(fidelity_args(base_workdir, base_checkpoint, "--stages", "om")) == 1
        assert "stage om needs" in capsys.readouterr().err
    finally:
        shutil.rmtree(base_workdir / "ais_out")


# ---------------------------------------------------------------- --locate

def test_locate_guide_padding_points_into_the_first_block(base_report, base_workdir, capsys):
    rc = beit_fidelity.main(["--workdir", str(base_workdir), "--batch_size", "8", "--locate", "guide_padding"])
    text = capsys.readouterr().out
    assert rc == 0, text
    first = re.search(r"^first departure: (\S+) node '.*' at block (\d+), (.*?) \(", text, re.MULTILINE)
    assert first, text
    assert first.group(2) == "0" and first.group(3).startswith("attention"), first.group(0)
    assert first.group(1) == "Softmax"  # the padded keys take softmax weight from block 0 on
    assert len(re.findall(r"^\| \d+ \| ", text, re.MULTILINE)) == 12


def check_om_emulation_locate(work, depth, capsys):
    rc = beit_fidelity.main(["--workdir", str(work), "--batch_size", "8", "--locate", "om_emulation"])
    text = capsys.readouterr().out
    assert rc == 0, text
    largest = r"^largest error \(of the \d+ tensors compared\): \S+ node '.+' at (block \d+|head|patch)"
    assert re.search(largest, text, re.MULTILINE), text
    rows = [(int(b), float(e), float(c)) for b, e, c in
            re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \|", text, re.MULTILINE)]
    assert [r[0] for r in rows] == list(range(depth))
    errors = [r[1] for r in rows]
    assert all(1e-5 < e < 5e-2 for e in errors), errors
    assert errors[-1] > errors[0]  # fp16 rounding accumulates through the blocks
    assert all(c > 0.999 for _, _, c in rows)


def test_locate_om_emulation_names_a_node_and_the_growth(tiny_workdir, capsys):
    check_om_emulation_locate(tiny_workdir, 2, capsys)


def test_locate_om_emulation_on_base(base_report, base_workdir, capsys):
    """The same on BEiT-base: every tensor of 12 blocks compared (about 20 s on 2 idle cores)."""
    check_om_emulation_locate(base_workdir, 12, capsys)


# ---------------------------------------------------------------- refusals

def test_missing_stage_input_is_an_error_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "val_label.txt").write_text("a.jpg 1\n")
    before = sorted(os.listdir(tmp_path))
    rc = beit_fidelity.main(fidelity_args(tmp_path, tiny_checkpoint, "--stages", "om_emulation"))
    err = capsys.readouterr().err
    assert rc == 1 and "stage om_emulation needs" in err and "beit_mg_bs8.onnx" in err and "graph_modify" in err
    rc = beit_fidelity.main(["--workdir", str(tmp_path), "--batch_size", "8", "--locate", "guide_padding"])
    err = capsys.readouterr().err
    assert rc == 1 and "beit_onnxsim_bs8.onnx" in err
    rc = beit_fidelity.main(fidelity_args(tmp_path, tiny_checkpoint))  # every stage but pytorch absent
    err = capsys.readouterr().err
    assert rc == 1 and "prep_image_bs8" in err
    rc = beit_fidelity.main(fidelity_args(tmp_path, str(tmp_path / "absent.pth")))
    err = capsys.readouterr().err
    assert rc == 1 and "absent.pth" in err and "stage pytorch needs" in err
    assert sorted(os.listdir(tmp_path)) == before
    assert beit_fidelity.main(fidelity_args(tmp_path, tiny_checkpoint, "--stages", "fp8")) == 2


def test_checkpoint_and_labels_default_to_run_alls_record(tmp_path, capsys):
    state = {"format": 1, "outputs": {
        "beit_large_patch16_224.onnx": {"made_from": {"inputs": {"the checkpoint": {"path": "/ck/x.pth"}}}},
        "acc_bs8.json": {"made_from": {"inputs": {"the label file": {"path": "/lab/val.txt"}}}},
        "acc_bs16.json": {"made_from": {"inputs": {"the label file": {"path": "/lab/other.txt"}}}}}}
    (tmp_path / "run_all_state.json").write_text(json.dumps(state))
    args = beit_fidelity.build_parser().parse_args(["--workdir", str(tmp_path), "--batch_size", "8"])
    wf = fidelity.work_folder(args)
    assert (wf.checkpoint, wf.label_file, wf.model) == ("/ck/x.pth", "/lab/val.txt", "beit_large_patch16_224")
    assert wf.file("onnx") == str(tmp_path / "beit_large_patch16_224.onnx")
    rc = beit_fidelity.main(["--workdir", str(tmp_path), "--batch_size", "4"])
    assert rc == 2 and "give --label_file" in capsys.readouterr().err


# ---------------------------------------------------------------- the emulated operators

def run_graph(nodes, inits, x, folder, opset=11):
    """Run a one-input one-output fp32 graph and its fp16 emulation on ``x``: (fp32 out, emulated out, model)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    emulated = om_emulation.emulate(model)
    outs = []
    for k, m in enumerate((model, emulated.model)):
        path = os.path.join(folder, f"m{k}.onnx")
        onnx.save(m, path)
        outs.append(ort_models.run_session(ort_models.open_session(path), x))
    return outs[0], outs[1], emulated


def layernorm_nodes():
    """opset 11's LayerNorm chain, as torch exports it."""
    n = helper.make_node
    return [n("ReduceMean", ["x"], ["m"], axes=[-1]), n("Sub", ["x", "m"], ["d"]), n("Pow", ["d", "two"], ["p"]),
            n("ReduceMean", ["p"], ["v"], axes=[-1]), n("Add", ["v", "eps"], ["ve"]), n("Sqrt", ["ve"], ["s"]),
            n("Div", ["d", "s"], ["z"]), n("Mul", ["z", "gamma"], ["zg"]), n("Add", ["zg", "beta"], ["y"])]


def test_fused_layernorm_does_not_overflow_where_fp16_pow_would(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 64)) * 300).astype(np.float32)  # (x - mean)^2 up to ~1e6 > fp16's 65504
    gamma, beta = rng.standard_normal(64), rng.standard_normal(64)
    ref, emu, emulated = run_graph(layernorm_nodes(), {"two": 2.0, "eps": 1e-6, "gamma": gamma, "beta": beta}, x,
                                  tmp_path)
    assert np.max((x - x.mean(-1, keepdims=True)) ** 2) > np.finfo(np.float16).max  # fp16 Pow: inf
    assert emulated.counts["LayerNorm as one fp16 operator (fp32 inside)"] == 1
    assert np.all(np.isfinite(emu))
    err = ort_models.output_errors(emu, ref)["max_rel"]
    assert 1e-6 < err < 2e-3, err  # fp16 input, weights and output: a few fp16 roundings


def test_gelu_becomes_ascends_tanh_form(tmp_path):
    n = helper.make_node
    nodes = [n("Div", ["x", "sqrt2"], ["a"]), n("Erf", ["a"], ["b"]), n("Add", ["b", "one"], ["c"]),
             n("Mul", ["x", "c"], ["d"]), n("Mul", ["d", "half"], ["y"])]
    x = np.linspace(-6, 6, 4801, dtype=np.float32).reshape(1, -1)
    ref, emu, emulated = run_graph(nodes, {"sqrt2": math.sqrt(2), "one": 1.0, "half": 0.5}, x, tmp_path)
    assert emulated.counts["Gelu -> Ascend's tanh-form Gelu (fp32 inside)"] == 1
    assert not [m for m in emulated.model.graph.node if m.op_type == "Erf"]
    x16 = x.astype(np.float16).astype(np.float64)
    tanh_form = x16 / (1 + np.exp(-math.sqrt(8 / math.pi) * (x16 + 0.044715 * x16 ** 3)))
    expected = tanh_form.astype(np.float16).astype(np.float32)
    ulp = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(emu - expected) <= ulp)  # the formula, rounded to fp16 once
    # and not the exact erf Gelu: the two differ by up to ~5e-4 around |x| = 2
    assert np.max(np.abs(emu - ref)) > 3e-4


def test_pow_outside_a_layernorm_is_refused(tmp_path):
    n = helper.make_node
    x = np.ones((1, 4), np.float32)
    with pytest.raises(om_emulation.PatternError, match="fusable LayerNorm chain"):
        run_graph([n("Pow", ["x", "two"], ["y"])], {"two": 2.0}, x, tmp_path)


def test_tiny_emulation_counts(onnx_models, tmp_path):
    model = onnx.load(onnx_models.simplified("tiny", 11, 2))
    graph_padding.modify(model, 2)
    emulated = om_emulation.emulate(model)
    counts = emulated.counts
    assert counts["LayerNorm as one fp16 operator (fp32 inside)"] == 2 * 2 + 1  # norm1, norm2 per block, fc_norm
    assert counts["Softmax as one fp16 operator (fp32 inside)"] == 2
    assert counts["MatMul+bias as one fp16 operator (fp32 inside)"] == 4 * 2
    assert counts["Gelu -> Ascend's tanh-form Gelu (fp32 inside)"] == 2
    # every tensor name of the fp32 graph outside a replaced Gelu is still there (--locate matches by name)
    names = {o for node in emulated.model.graph.node for o in node.output}
    kept = [o for node in model.graph.node for o in node.output if "/act/" not in o]
    assert set(kept) <= names
    assert fidelity_locate.REL_LIMIT == 1e-2 and fidelity_locate.COSINE_LIMIT == 0.99
