"""Issue 20: fp16 overflow saturates as on the 310P, is named where it happens, and atc's keep_dtype fix is found.

The acceptance model is conftest's tiny BEiT with the q and k weights of block 0 scaled by
QK_SCALE: its first attention scores reach about 1e6, fine in fp32 (a peaked softmax) but
past fp16's 65504, so the 310P clamps them and the attention spreads over the clamped keys.
Small hand-made graphs check the saturation, the probes and the keep list one at a time.
Sources matched: CANN's aclrtFloatOverflowMode (saturation is the only mode of "Atlas
inference products"; inf -> the largest value, NaN -> 0) and ATC's --keep_dtype parameter
(one original-model operator name or OpType::TypeName per line, with --precision_mode).
"""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from helpers import REPO, TINY, copy_work_folder, run_script, stored_logits

import beit_fidelity
import beit_preprocess
from beit_pipeline.fidelity import report as fidelity_report
from beit_pipeline.fidelity import runners as fidelity_runners
from beit_pipeline.fidelity import screen as fidelity_screen
from beit_pipeline.fidelity import fp16_overflow
from beit_pipeline.graph import padding as graph_padding
from beit_pipeline.fidelity import keep_dtype
from beit_pipeline.fidelity import keep_suggestion
from beit_pipeline.fidelity import om_emulation
from beit_pipeline.pipeline import workstate
from beit_pipeline.model import build as beit_model
from beit_pipeline.inference import sessions
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.fidelity.stages import ImageSet, Options
from beit_pipeline.fidelity.keep_dtype import KeepList
from beit_pipeline.data.synthetic import write_image_set

BS = 8
IMAGES = 16
QK_SCALE = 300.0
FAKE_ATC = os.path.join(REPO, "tests", "fake_ascend", "bin", "atc")


# ---------------------------------------------------------------- small graphs

def graph_model(nodes, inits, shape, opset=11):
    """A one-input one-output fp32 graph ``x -> y``."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


def run_model(model, x, folder, name="m.onnx"):
    path = os.path.join(folder, name)
    onnx.save(model, path)
    session = sessions.open_session(path)
    return session.run(None, {"x": x})


def test_overflow_saturates_to_65504_where_fp16_gives_inf(tmp_path):
    n = helper.make_node
    model = graph_model([n("MatMul", ["x", "w"], ["m"], name="big"), n("Div", ["m", "d"], ["y"], name="div")],
                        {"w": np.full((2, 2), 1000.0), "d": [1.0, 0.0]}, (1, 3, 2))
    x = np.array([[[100.0, 20.0], [-100.0, -20.0], [0.0, 0.0]]], np.float32)  # rows: 1.2e5, -1.2e5, 0
    emulated = om_emulation.emulate(model)
    (y,) = run_model(emulated.model, x, tmp_path)
    with np.errstate(over="ignore"):
        assert np.float16(120000.0) == np.inf  # a plain fp16 rounding of the MatMul's result
    np.testing.assert_array_equal(y[0, :, 0], [65504.0, -65504.0, 0.0])
    # x / 0: +-65504 / 0 = +-inf in fp32, saturated; 0 / 0 = NaN, which the 310P writes as 0
    np.testing.assert_array_equal(y[0, :, 1], [65504.0, -65504.0, 0.0])
    assert np.all(np.isfinite(y))
    assert emulated.counts["fp16 roundings (saturating: +-65504, NaN -> 0)"] == 3  # input, MatMul, Div
    # weights beyond fp16's range are stored saturated too
    stored = om_emulation.fp16_saturated(np.array([1e6, -1e6, np.nan, 1.5], np.float32))
    np.testing.assert_array_equal(stored, np.array([65504, -65504, 0, 1.5], np.float16))


def test_probes_count_what_is_clamped_and_leave_the_output(tmp_path):
    n = helper.make_node
    model = graph_model([n("Mul", ["x", "c"], ["y"], name="scale")], {"c": 2.0}, (3, 4))
    # per row (image): 2x = 65510 rounds to 65504 (not clamped); 32760.5 * 2 = 65521 and +-1e5 are clamped
    x = np.array([[1.0, 32755.0, 2.0, 3.0], [32760.5, 5e4, -5e4, 1.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    plain = run_model(om_emulation.emulate(model).model, x, tmp_path, "plain.onnx")[0]
    np.testing.assert_array_equal(plain[1], [65504, 65504, -65504, 2])
    probed = om_emulation.emulate(model, probes=True)
    np.testing.assert_array_equal(run_model(probed.model, x, tmp_path, "probed.onnx")[0], plain)
    rows = x  # three images of 4 values at batch size 1: the probes read one image at a time
    for count, expected in ((False, [0, 1, 0]), (True, [0, 3, 0])):
        run = fp16_overflow.run_emulated(graph_model([n("Mul", ["x", "c"], ["y"], name="scale")], {"c": 2.0},
                                                     (1, 4)), KeepList([]), rows, 1, str(tmp_path), count=count)
        by_tensor = dict(zip((r.tensor for r in run.emulation.roundings), run.clamped))
        np.testing.assert_array_equal(by_tensor["y"], expected)
        np.testing.assert_array_equal(by_tensor["x"], [0, 0, 0])  # the input rounding: nothing out of range
        np.testing.assert_array_equal(run.logits, plain)
    nan = graph_model([n("Div", ["x", "x"], ["y"], name="self_ratio")], {}, (1, 4))  # 0 / 0 in the third image
    run = fp16_overflow.run_emulated(nan, KeepList([]), rows, 1, str(tmp_path), count=True)
    np.testing.assert_array_equal(dict(zip((r.tensor for r in run.emulation.roundings), run.clamped))["y"], [0, 0, 4])
    np.testing.assert_array_equal(run.logits[2], [0, 0, 0, 0])


def test_kept_operator_computes_and_stores_fp32(tmp_path):
    n = helper.make_node
    third = np.float32(1.0 / 3.0)
    model = graph_model([n("Mul", ["x", "c"], ["t"], name="times_third"), n("Add", ["t", "t"], ["y"], name="twice")],
                        {"c": third}, (1, 5))
    x = np.array([[1.0, 3.0, 7.0, 1e5, 0.5]], np.float32)
    x16 = np.float32(np.clip(x, -65504, 65504).astype(np.float16))
    fp16 = run_model(om_emulation.emulate(model).model, x, tmp_path)[0]
    expected16 = (np.float16(x16 * np.float32(np.float16(third))).astype(np.float32) * 2).astype(np.float16)
    np.testing.assert_array_equal(fp16, expected16.astype(np.float32))
    for keep in (KeepList(["times_third", "twice"]), KeepList([], ["Mul", "Add"])):
        emulated = om_emulation.emulate(model, keep)
        assert sorted(op.last.name for op in emulated.kept) == ["times_third", "twice"]
        np.testing.assert_array_equal(run_model(emulated.model, x, tmp_path)[0], (x16 * third) * 2)  # no rounding
    # Only the Mul kept: its fp32 result is rounded (saturating) where the fp16 Add reads it.
    emulated = om_emulation.emulate(model, KeepList(["times_third"]))
    reread = [r for r in emulated.roundings if r.readers]
    assert len(reread) == 1 and [op.last.name for op in reread[0].fixers] == ["twice"]
    got = run_model(emulated.model, x, tmp_path)[0]
    np.testing.assert_array_equal(got, (np.float16(x16 * third).astype(np.float32) * 2).astype(np.float16))


def test_keep_file_format(tmp_path):
    text = "\ufeff# made by a test\n\n/blocks.0/attn/MatMul_1\n  /blocks.0/attn/Add_1  \nOpType::SoftmaxV2\n" \
           "/blocks.0/attn/MatMul_1\n"
    keep = keep_dtype.parse(text)
    assert keep.names == ["/blocks.0/attn/MatMul_1", "/blocks.0/attn/Add_1"] and keep.op_types == ["SoftmaxV2"]
    assert keep.lines() == ["/blocks.0/attn/MatMul_1", "/blocks.0/attn/Add_1", "OpType::SoftmaxV2"]
    with pytest.raises(PipelineFileError, match=r"cfg:2: 'OpType::' is not OpType::TypeName"):
        keep_dtype.parse("a\nOpType::\n", "x.cfg")
    written = keep_dtype.cfg_text(keep, "made by the test", ["SoftmaxV2"])
    assert written.splitlines()[0] == "# made by the test"
    assert keep_dtype.parse(written).lines() == keep.lines()  # the commented alternatives stay comments
    line = keep_dtype.atc_command("beit_mg_bs8.onnx", "beit_mg_bs8", 8, 224, "keep dtype.cfg")
    assert line.endswith("--precision_mode=force_fp16 '--keep_dtype=keep dtype.cfg'")
    assert "--input_shape=image:8,3,224,224" in line and "--optypelist_for_implmode=Gelu" in line


def test_search_logic_adds_greedily_then_drops():
    """fp16_overflow's add and drop steps on a stand-in judge: only operators 'b' and 'd' matter."""
    ops = [om_emulation.FusedOp("Add", [helper.make_node("Add", ["i", "j"], [k], name=k)], k) for k in "abcde"]

    def measure(chosen):
        names = {op.last.name for op in chosen}
        good = {"b", "d"} <= names
        return fp16_overflow.Verdict(good, "", 0.0, 100.0, 0, 0 if good else 1), None

    chosen, verdict = fp16_overflow.add_until_good([], ops, measure)
    assert verdict.good and [op.last.name for op in chosen] == ["a", "b", "c", "d"]
    chosen, verdict = fp16_overflow.drop_unneeded(chosen, verdict, measure)
    assert verdict.good and [op.last.name for op in chosen] == ["b", "d"]


def test_trials_prefer_flips_saturation_and_small_margins():
    reference = np.zeros((10, 3), np.float32)
    reference[:, 0] = np.arange(1, 11)  # image i's margin grows with i
    logits = reference.copy()
    logits[7] = [0, 20, 0]  # a flip
    clamped = np.zeros((2, 10), np.int64)
    clamped[1, 9] = 5  # saturates
    run = fp16_overflow.EmulatedRun(None, logits, clamped)
    chosen = fp16_overflow.trial_images(reference, run, limit=6)
    assert len(chosen) == 6 and {7, 9, 0, 1} <= set(chosen)


def test_the_suggestion_is_measured_where_the_screen_says_the_om_can_matter():
    """keep_suggestion.images_that_can_matter is the fidelity report's screen for om_emulation: the audit plus the
    images whose top-1 margin or label-to-top-5 gap is within 2 x (its bound + pytorch's); within the stage's
    sample when the report sampled it; every image without a screen.  Checked against margins computed here."""
    rng = np.random.default_rng(3)
    count, classes = 400, 10
    base = rng.normal(size=(count, classes)).astype(np.float32) * 3
    labels = rng.integers(0, classes, count)
    images = ImageSet([f"i{k:03d}" for k in range(count)], labels, [], count)
    plan = fidelity_screen.make_plan(images, fidelity_runners.Base(base, "synthetic"), 16, 100, 0)
    plan.bounds = {"pytorch": fidelity_screen.Bound(abs=1e-3), "om_emulation": fidelity_screen.Bound(abs=0.05)}
    plan.modes = {"pytorch": "screened", "om_emulation": "screened"}
    report = fidelity_report.Report(None, Options(), plan, [])
    ordered = np.sort(base, axis=1)
    top1 = ordered[:, -1] - ordered[:, -2]
    others = base.copy()
    others[np.arange(count), labels] = -np.inf
    gap5 = np.abs(base[np.arange(count), labels] - np.sort(others, axis=1)[:, -5])
    limit = 2 * (0.05 + 1e-3)
    expected = set(np.flatnonzero((top1 <= limit) | (gap5 <= limit))) | set(plan.audit.tolist())
    chosen = keep_suggestion.images_that_can_matter(report)
    assert set(chosen.tolist()) == expected and len(plan.audit) < len(chosen) < count / 2
    plan.modes["om_emulation"] = "sampled"
    assert set(keep_suggestion.images_that_can_matter(report).tolist()) == expected & set(plan.sample.tolist())
    report.plan = fidelity_screen.make_plan(images, None, 16, 100, 0)  # --no_screen: no base, every image
    assert keep_suggestion.images_that_can_matter(report).tolist() == list(range(count))


# ---------------------------------------------------------------- the acceptance model

def overflow_state():
    state = beit_model.random_checkpoint(TINY, seed=1)["model"]
    qkv = state["blocks.0.attn.qkv.weight"]
    dim = qkv.shape[1]
    qkv[:2 * dim] *= QK_SCALE  # q and k of block 0
    return state


@pytest.fixture(scope="module")
def overflow_work(tmp_path_factory, onnx_exports):
    """A work folder of the overflowing tiny BEiT: its checkpoint, prep_image_bs8 (16 images), onnxsim and
    graph_modify models, labels = PyTorch's own Top-1."""
    work = tmp_path_factory.mktemp("overflow_work")
    state = overflow_state()
    torch.save({"model": state}, work / "overflow.pth")
    onnx_exports.register("tiny_qk_overflow", lambda: beit_model.build_model(overflow_state())[0])
    write_image_set(work / "images", IMAGES, seed=7)
    assert beit_preprocess.main(["--image_path", str(work / "images"), "--prep_image", str(work / "prep_image_bs8"),
                                 "--batch_size", str(BS)]) == 0
    shutil.copy(onnx_exports.simplified("tiny_qk_overflow", 11, BS), work / "beit_onnxsim_bs8.onnx")
    model = onnx.load(str(work / "beit_onnxsim_bs8.onnx"))
    graph_padding.modify(model, BS)
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    manifest = json.loads((work / "prep_image_bs8" / "manifest.json").read_text())
    names = [n for b in manifest["batches"] for n in b["images"]]
    batches = [np.fromfile(work / "prep_image_bs8" / b["file"], np.float32).reshape(BS, 3, 224, 224)
               for b in manifest["batches"]]
    with torch.no_grad():
        logits = onnx_exports.torch_model("tiny_qk_overflow")(torch.from_numpy(np.concatenate(batches))).numpy()
    (work / "val_label.txt").write_text("".join(f"{n} {int(k)}\n" for n, k in zip(names, logits.argmax(1))))
    return work


def fidelity(work, *extra, capsys):
    rc = beit_fidelity.main(["--workdir", str(work), "--batch_size", str(BS), "--checkpoint",
                             str(work / "overflow.pth"), "--label_file", str(work / "val_label.txt"), *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


@pytest.fixture(scope="module")
def suggestion(overflow_work):
    """beit_fidelity.py --suggest_keep_dtype on the overflowing model: (stdout, JSON, cfg text)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = beit_fidelity.main(["--workdir", str(overflow_work), "--batch_size", str(BS), "--checkpoint",
                                 str(overflow_work / "overflow.pth"), "--label_file",
                                 str(overflow_work / "val_label.txt"), "--suggest_keep_dtype"])
    assert rc == 0, out.getvalue()
    return (out.getvalue(), json.loads((overflow_work / "keep_dtype_bs8.json").read_text()),
            (overflow_work / "keep_dtype_bs8.cfg").read_text())


def test_report_names_the_saturating_node(overflow_work, capsys):
    text = fidelity(overflow_work, "--stages", "graph_modify,om_emulation", capsys=capsys)
    report = {s["name"]: s for s in json.loads((overflow_work / "fidelity_bs8.json").read_text())["stages"]}
    emulated = report["om_emulation"]
    assert np.isfinite(emulated["max_rel_err"]) and emulated["max_rel_err"] > 5e-2  # finite, and far off
    assert report["graph_modify"]["saturated_nodes"] is None  # fp32 stages have no fp16 rounding
    first = emulated["saturated_nodes"][0]
    assert (first["node"], first["op_type"]) == ("/blocks.0/attn/MatMul_1", "MatMul")
    assert first["position"] == "block 0, attention scores q @ k^T" and first["where"] == "output"
    assert len(first["images"]) == first["num_images"] == IMAGES and first["values_clamped"] > 1000
    assert all(n["position"].startswith("block 0,") for n in emulated["saturated_nodes"])
    assert "om_emulation: fp16 saturates: MatMul node '/blocks.0/attn/MatMul_1' at block 0" in text
    md = (overflow_work / "fidelity_bs8.md").read_text()
    assert f"- om_emulation: fp16 saturates at {len(emulated['saturated_nodes'])} node(s) on the {IMAGES} images " \
           "this stage ran: first MatMul node" in md and "--suggest_keep_dtype" in md
    # A rerun reuses the stored logits and clamp counts: the same nodes, nothing computed again.
    again = fidelity(overflow_work, "--stages", "graph_modify,om_emulation", capsys=capsys)
    rerun = {s["name"]: s for s in json.loads((overflow_work / "fidelity_bs8.json").read_text())["stages"]}
    assert rerun["om_emulation"]["images_reused"] == rerun["om_emulation"]["images_run"] == IMAGES
    assert rerun["om_emulation"]["saturated_nodes"] == emulated["saturated_nodes"]
    assert "counting the values clamped" in text and "counting the values clamped" not in again


def test_probed_emulation_gives_the_plain_models_logits_bit_for_bit(overflow_work, tmp_path, capsys):
    """The report runs the probed emulation in place of beit_om_emulation_bs8.onnx, under that file's LogitStore
    key: its logits must be the plain file's, bit for bit, here where the probes watch roundings that clamp."""
    work = copy_work_folder(overflow_work, tmp_path / "work")
    fidelity(work, "--stages", "om_emulation", "--no_screen", capsys=capsys)
    stored = stored_logits(work / "fidelity_logits_bs8" / "om_emulation")
    clamps = stored_logits(work / "fidelity_logits_bs8" / "om_emulation_saturation")
    session = sessions.open_session(str(work / "beit_om_emulation_bs8.onnx"))
    manifest = json.loads((work / "prep_image_bs8" / "manifest.json").read_text())
    for entry in manifest["batches"]:
        batch = np.fromfile(work / "prep_image_bs8" / entry["file"], np.float32).reshape(BS, 3, 224, 224)
        plain = sessions.run_session(session, batch)
        np.testing.assert_array_equal(np.stack([stored[n] for n in entry["images"]]), plain)
        assert all(clamps[n].sum() > 1000 for n in entry["images"])  # every image clamps (count probes)


def test_suggested_list_brings_the_om_back(suggestion, overflow_work):
    text, result, cfg = suggestion
    assert 1 <= len(result["operators"]) <= 5, result["operators"]
    before, after, fp32 = result["without_keep_dtype"], result["stage"], result["fp32"]
    assert after["max_rel_err"] * 5 <= before["max_rel_err"], (before, after)
    assert before["agree_top1"] < fp32["agree_top1"] == after["agree_top1"] == 100.0
    assert after["num_images"] == IMAGES and result["good"]
    assert [op["position"] for op in result["operators"]][0] == "block 0, attention scores q @ k^T"
    assert 0 < result["fp32_flops_share"] < 0.1  # the tiny model (dim 64): attention is a large share
    assert result["saturated_without_keep_dtype"][0]["node"] == "/blocks.0/attn/MatMul_1"
    names = {n.name for n in onnx.load(str(overflow_work / "beit_mg_bs8.onnx")).graph.node}
    lines = [line for line in cfg.splitlines() if line and not line.startswith("#")]
    assert lines == result["keep"] and set(lines) <= names
    assert cfg.startswith("# made by beit_fidelity.py --suggest_keep_dtype for beit_mg_bs8.onnx on 16 images")
    assert re.search(r"^  atc .*--model=beit_mg_bs8.onnx .*--precision_mode=force_fp16 "
                     r"--keep_dtype=keep_dtype_bs8.cfg$", text, re.MULTILINE), text


def test_keep_dtype_flag_builds_the_emulation_with_the_list(suggestion, overflow_work, capsys):
    cfg = overflow_work / "keep_dtype_bs8.cfg"
    text = fidelity(overflow_work, "--stages", "om_emulation", "--keep_dtype", str(cfg), capsys=capsys)
    assert "kept in fp32 (keep_dtype)" in text  # remade: the keep list is part of what decides
    emulated = json.loads((overflow_work / "fidelity_bs8.json").read_text())["stages"][1]
    assert emulated["saturated_nodes"] == [] and emulated["agree_top1"] == 100.0
    assert emulated["max_rel_err"] == pytest.approx(suggestion[1]["stage"]["max_rel_err"], rel=1e-6)
    assert "made beit_om_emulation" not in fidelity(overflow_work, "--stages", "om_emulation", "--keep_dtype",
                                                    str(cfg), capsys=capsys)
    cfg.write_text(cfg.read_text() + "# edited\n")  # another file content: remade
    assert "made beit_om_emulation" in fidelity(overflow_work, "--stages", "om_emulation", "--keep_dtype", str(cfg),
                                                capsys=capsys)


def test_locate_names_the_first_saturating_node(overflow_work, capsys):
    rc = beit_fidelity.main(["--workdir", str(overflow_work), "--batch_size", str(BS), "--locate", "om_emulation"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert re.search(r"^first saturating node: MatMul node '/blocks.0/attn/MatMul_1' at block 0, attention scores "
                     r"q @ k\^T \(output\): \d+ values clamped to \+-65504 on 8 image\(s\)$", text, re.MULTILINE), text
    saved = json.loads((overflow_work / "locate_om_emulation_bs8.json").read_text())  # what the HTML report shows
    first = saved["first_saturating"]
    assert (first["node"], first["num_images"], first["where"]) == ("/blocks.0/attn/MatMul_1", BS, "output")
    assert first["values_clamped"] > 1000 and len(saved["blocks"]) == 2


def test_a_model_without_overflow_gets_an_empty_list(onnx_exports, tmp_path):
    """The plain tiny BEiT: nothing saturates, nothing needs keeping (the search is not even run)."""
    model = onnx.load(onnx_exports.simplified("tiny", 11, BS))
    graph_padding.modify(model, BS)
    images = sessions.random_batch((BS, 3, 224, 224), 5)
    fp32_path = tmp_path / "mg.onnx"
    onnx.save(model, str(fp32_path))
    fp32 = sessions.run_session(sessions.open_session(str(fp32_path)), images)
    found = fp16_overflow.suggest(model, images, fp32, BS, str(tmp_path))
    assert found.operators == [] and found.trials == 0 and found.verdict.good
    assert found.verdict.why.startswith("no rounding saturates, max rel err")


# ---------------------------------------------------------------- atc and run_all.sh

def test_stand_in_atc_writes_what_the_om_computes(overflow_work, suggestion, tmp_path):
    cfg = overflow_work / "keep_dtype_bs8.cfg"
    base = [sys.executable, FAKE_ATC, "--framework=5", f"--model={overflow_work / 'beit_mg_bs8.onnx'}",
            "--input_format=NCHW", "--input_shape=image:8,3,224,224", "--log=error", "--soc_version=Ascend310P3",
            "--optypelist_for_implmode=Gelu", "--op_select_implmode=high_performance"]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    refused = subprocess.run(base + [f"--output={tmp_path / 'x'}", f"--keep_dtype={cfg}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "--keep_dtype needs --precision_mode" in refused.stderr
    outputs = {}
    for label, extra in (("plain", []), ("kept", [f"--keep_dtype={cfg}", "--precision_mode=force_fp16"])):
        proc = subprocess.run(base + [f"--output={tmp_path / label}"] + extra, cwd=tmp_path, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        om = onnx.load(str(tmp_path / f"{label}.om"))
        assert om_emulation.fp16_matmul_weights(om)[0] > 0  # an fp16 model, not a copy of the ONNX file
        shutil.copy(tmp_path / f"{label}.om", tmp_path / f"{label}.onnx")
        batch = np.fromfile(overflow_work / "prep_image_bs8" / "input_00000.bin", np.float32).reshape(BS, 3, 224, 224)
        outputs[label] = sessions.run_session(sessions.open_session(str(tmp_path / f"{label}.onnx")), batch)
    assert "operator(s) kept in fp32" in proc.stdout
    mg = sessions.run_session(sessions.open_session(str(overflow_work / "beit_mg_bs8.onnx")), batch)
    plain, kept = (sessions.output_errors(outputs[k], mg)["max_rel"] for k in ("plain", "kept"))
    assert kept * 5 <= plain, (plain, kept)


def test_run_all_keys_atc_and_fidelity_on_the_keep_file(tmp_path):
    cfg = tmp_path / "keep.cfg"
    cfg.write_text("/blocks.0/attn/MatMul_1\n")
    run = workstate.RunParams(workdir=str(tmp_path), batch_size=8, backend="ascend", model=TINY, image_path="i",
                              label_file="l", checkpoint="c", keep_dtype=str(cfg))
    specs = workstate.step_specs(run)
    for step in ("atc", "fidelity"):
        assert specs[step].inputs["the keep_dtype file"] == str(cfg)
    assert "the keep_dtype file" not in specs["graph_modify"].inputs
    without = workstate.step_specs(workstate.RunParams(**{**run.__dict__, "keep_dtype": ""}))
    assert "the keep_dtype file" not in without["atc"].inputs
    proc = run_script(["run_all.sh", "--batch_size", "8", "--keep_dtype", str(tmp_path / "absent.cfg")])
    assert proc.returncode == 2 and "--keep_dtype" in proc.stderr and "file not found" in proc.stderr


@pytest.mark.slow
def test_run_all_builds_the_om_with_the_keep_file(overflow_work, suggestion, tmp_path):
    """run_all.sh --keep_dtype on the Ascend path (stand-in tools): atc gets the flag with force_fp16, the OM is
    the emulation with the list, the fidelity step builds its emulation with it; a changed file redoes atc."""
    fake = os.path.join(REPO, "tests", "fake_ascend")
    log = tmp_path / "calls.jsonl"
    env = {"PATH": os.path.join(fake, "bin") + os.pathsep + os.environ["PATH"], "FAKE_ASCEND_LOG": str(log),
           "PYTHONPATH": os.path.join(fake, "python")}
    cfg = tmp_path / "keep.cfg"
    shutil.copy(overflow_work / "keep_dtype_bs8.cfg", cfg)
    args = ["run_all.sh", "--batch_size", "8", "--workdir", str(tmp_path / "w"), "--image_path",
            str(overflow_work / "images"), "--label_file", str(overflow_work / "val_label.txt"), "--checkpoint",
            str(overflow_work / "overflow.pth"), "--model", TINY, "--backend", "ascend", "--keep_dtype", str(cfg)]
    proc = run_script(args, env=env, check=True)
    atc = [json.loads(line) for line in log.read_text().splitlines() if '"atc"' in line][0]["argv"]
    assert f"--keep_dtype={cfg}" in atc and "--precision_mode=force_fp16" in atc
    assert "--keep_dtype" in re.search(r"step fidelity:.*", proc.stdout).group(0)
    report = json.loads((tmp_path / "w" / "fidelity_bs8.json").read_text())
    assert {s["name"]: s for s in report["stages"]}["om_emulation"]["saturated_nodes"] == []
    # the stand-in OM (the emulation with the list) scores what PyTorch scores: 81.25% without the list
    assert json.loads((tmp_path / "w" / "acc_bs8_details.json").read_text())["top1"] == 100.0
    cfg.write_text(cfg.read_text() + "# changed\n")
    again = run_script(args, env=env, check=True)
    assert "[run_all] redo atc: " in again.stdout and "the keep_dtype file changed" in again.stdout


@pytest.mark.slow
def test_beit_base_needs_nothing_kept(onnx_exports, base_checkpoint, tmp_path, capsys):
    """BEiT-base with random weights: no fp16 rounding saturates and the suggestion is an empty list, with why.
    (slow: BEiT-base's export, onnxsim and three runs of 8 images take minutes on 2 shared cores)"""
    work = tmp_path
    write_image_set(work / "images", BS, seed=3)
    assert beit_preprocess.main(["--image_path", str(work / "images"), "--prep_image", str(work / "prep_image_bs8"),
                                 "--batch_size", str(BS)]) == 0
    model = onnx.load(onnx_exports.simplified("base", 11, BS))
    graph_padding.modify(model, BS)
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    names = json.loads((work / "prep_image_bs8" / "manifest.json").read_text())["batches"][0]["images"]
    (work / "val_label.txt").write_text("".join(f"{n} 0\n" for n in names))
    capsys.readouterr()
    rc = beit_fidelity.main(["--workdir", str(work), "--batch_size", str(BS), "--checkpoint", base_checkpoint,
                             "--label_file", str(work / "val_label.txt"), "--suggest_keep_dtype"])
    text = capsys.readouterr().out
    assert rc == 0, text
    result = json.loads((work / "keep_dtype_bs8.json").read_text())
    assert result["keep"] == [] and result["operators"] == [] and result["fp32_flops_share"] == 0
    assert result["saturated_without_keep_dtype"] == []
    assert result["why"].startswith("nothing needs keeping: no rounding saturates, max rel err")
    assert result["stage"] == result["without_keep_dtype"] and result["stage"]["max_rel_err"] < 5e-3
    assert [line for line in (work / "keep_dtype_bs8.cfg").read_text().splitlines() if not line.startswith("#")] == []
    assert "nothing needs keeping" in text
