"""Step 2 (beit_pth2onnx.py) and step 3 (onnxsim, checked by onnx_check.py).

The tiny BEiT covers every path quickly and in-process; one test runs the real
beit_base_patch16_224 from checkpoint to the batch-8 onnxsim model with the
same commands run_all.sh uses.
"""

import collections
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import onnx
import pytest
import torch

import beit_pth2onnx
import onnx_check
from beit_pipeline.model import build as beit_model
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.graph import simplify
from helpers import BASE, REPO, TINY, hang_env, make_bad_checkpoint, run_script

TINY_DEPTH = beit_model.KNOWN_VARIANTS[TINY][1]
BASE_DEPTH = beit_model.KNOWN_VARIANTS[BASE][1]
# Measured on this machine: ORT fp32 vs PyTorch and onnxsim vs original are ~1e-6 relative
# (max|a-b|/max|b|) for both models; 1e-5 leaves a margin yet catches any real change.
REL_TOL = 1e-5


def op_counts(path):
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def torch_logits(model, batch):
    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


@pytest.fixture(scope="module")
def tiny_exports(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint exported as the guide does (opset 11, dynamic batch) and at opset 17, static bs 8."""
    out = tmp_path_factory.mktemp("tiny_exports")
    paths = {"dyn11": str(out / "tiny_dyn11.onnx"), "static17": str(out / "tiny_static17.onnx")}
    assert beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", paths["dyn11"], "--batchsize", "1"]) == 0
    assert beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", paths["static17"], "--batch_size", "8",
                               "--opset", "17", "--static"]) == 0
    assert sorted(os.listdir(out)) == ["tiny_dyn11.onnx", "tiny_static17.onnx"]  # no temporaries left
    return paths


# ---------------------------------------------------------------- export: graph and numbers

def test_opset11_dynamic_graph(tiny_exports):
    model = onnx.load(tiny_exports["dyn11"])
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [11]
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    assert [i.name for i in inputs] == ["image"] and [o.name for o in model.graph.output] == ["class"]
    in_dims, out_dims = dims(inputs[0]), dims(model.graph.output[0])
    assert isinstance(in_dims[0], str) and in_dims[0] and in_dims[1:] == [3, 224, 224]
    assert out_dims == [in_dims[0], 1000]  # the same symbolic batch axis on both ends
    counts = op_counts(tiny_exports["dyn11"])
    assert "LayerNormalization" not in counts  # opset 11 has no such op: decomposed
    assert counts["Softmax"] == TINY_DEPTH and counts["Conv"] == 1


@pytest.mark.parametrize("batch_size", [1, 8])
def test_opset11_dynamic_matches_pytorch(tiny_exports, tiny_model, batch_size):
    session = onnx_models.open_session(tiny_exports["dyn11"])
    batch = onnx_models.random_batch((batch_size, 3, 224, 224), seed=3)
    actual = onnx_models.run_session(session, batch)
    expected = torch_logits(tiny_model, batch)
    assert actual.shape == (batch_size, 1000)
    errors = onnx_models.output_errors(actual, expected)
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]
    assert errors["max_abs"] == pytest.approx(np.abs(actual.astype(np.float64) - expected).max())
    # logits of a random model are O(1): the relative bound is a real bound
    assert 0.5 < np.abs(expected).max() < 50


def test_opset17_static_keeps_layernorm_and_matches(tiny_exports, tiny_model):
    model = onnx.load(tiny_exports["static17"])
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert dims(model.graph.input[0]) == [8, 3, 224, 224] and dims(model.graph.output[0]) == [8, 1000]
    counts = op_counts(tiny_exports["static17"])
    # norm1 and norm2 in every block, and fc_norm before the head
    assert counts["LayerNormalization"] == 2 * TINY_DEPTH + 1
    session = onnx_models.open_session(tiny_exports["static17"])
    batch = onnx_models.random_batch((8, 3, 224, 224), seed=4)
    errors = onnx_models.output_errors(onnx_models.run_session(session, batch), torch_logits(tiny_model, batch))
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]
    with pytest.raises(onnx_models.OnnxCheckError, match=r"takes input shape \(8, 3, 224, 224\)"):
        onnx_models.run_session(session, batch[:1])


def test_export_report(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    assert beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", str(target), "--batch_size", "4"]) == 0
    out = capsys.readouterr().out
    assert f"model     {TINY}" in out and "opset 11, batch dynamic (traced with batch 4)" in out
    params = sum(p.numel() for p in beit_model.create_model(beit_model.config_for(TINY)).parameters())
    assert f"{params / 1e6:.2f} M parameters" in out
    assert f"{os.path.getsize(target) / 2 ** 20:.1f} MiB" in out
    # the dummy batch and, because the axis is dynamic, a second batch size
    rels = [float(x) for x in re.findall(r"verify    batch (?:4|1): .*max rel error ([0-9.e+-]+)", out)]
    assert len(rels) == 2 and all(0 <= r <= REL_TOL for r in rels)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: atc may run as another user


def test_verification_failure_leaves_nothing(tiny_checkpoint, tmp_path, capsys):
    # ORT and PyTorch differ by ~1e-7 relative (never exactly 0 in fp32 over 1000 logits), so
    # a tolerance of 1e-12 must make the check fail, and the file must not appear.
    target = tmp_path / "m.onnx"
    rc = beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", str(target), "--tolerance", "1e-12"])
    err = capsys.readouterr().err
    assert rc == 3  # a check failed (exit 1 before the unified exit codes)
    assert "differs from PyTorch by relative error" in err and "nothing written" in err
    measured = float(re.search(r"relative error ([0-9.e+-]+) >", err).group(1))
    assert 1e-12 < measured <= REL_TOL
    assert os.listdir(tmp_path) == []


def test_no_verify_and_other_opset(tiny_checkpoint, tmp_path, capsys):
    target = tmp_path / "m.onnx"
    assert beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", str(target), "--no_verify",
                               "--opset", "13"]) == 0
    out = capsys.readouterr().out
    assert "opset 13, batch dynamic" in out and "verify    skipped" in out and "max rel error" not in out
    assert os.listdir(tmp_path) == ["m.onnx"]
    assert [o.version for o in onnx.load(target).opset_import if o.domain in ("", "ai.onnx")] == [13]


@pytest.mark.parametrize("args,message", [
    (["--opset", "10"], "--opset 10 is not supported; choose 11..17"),
    (["--opset", "18"], "--opset 18 is not supported; choose 11..17"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
])
def test_bad_arguments(tiny_checkpoint, tmp_path, capsys, args, message):
    rc = beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", str(tmp_path / "m.onnx")] + args)
    assert rc == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_during_export_leaves_nothing(tiny_checkpoint, tmp_path):
    """SIGINT while the temporary beside --target exists: one error line, exit 130, no .tmp, no target.
    (Deterministic, issue 17: it landed at a random moment and once was swallowed inside an import.)"""
    out, flag = tmp_path / "out", tmp_path / "hanging"
    out.mkdir()
    # Hung at its first fsync: the temporary beside --target exists, nothing is published; Ctrl-C lands then.
    env = dict(os.environ, PYTHONUNBUFFERED="1", **hang_env(tmp_path, "beit_pth2onnx.py", restore_sigint=True))
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "beit_pth2onnx.py"), "--source", tiny_checkpoint,
                             "--target", str(out / "m.onnx")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export did not reach its first fsync"
        time.sleep(0.01)
    assert any(n.endswith(".tmp") for n in os.listdir(out))
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("error: ") == 1 and "error: interrupted" in err and "Traceback" not in err
    assert os.listdir(out) == []


# ---------------------------------------------------------------- bad checkpoints

def bad_checkpoint(kind, folder, tiny_checkpoint):
    """(path, marker) of helpers.make_bad_checkpoint's ``kind`` written in ``folder``."""
    path, marker = folder / f"{kind}.pth", folder / "MARKER"
    make_bad_checkpoint(kind, path, marker, tiny_checkpoint)
    return path, marker


@pytest.mark.parametrize("kind,message", [
    ("torch_save_code", "refused: the file holds Python objects other than tensors"),
    ("plain_pickle_code", "refused: the file holds Python objects other than tensors"),
    ("resnet18", "this is not a BEiT checkpoint: no patch_embed / blocks tensors (its keys: bn1.bias"),
    ("pretraining", "this is a BEiT pretraining checkpoint (it has lm_head.weight and mask_token but no "
                    "classification head 'head.weight')"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("empty", "not a readable PyTorch checkpoint"),
    ("not_tensors", "does not hold a state dict of tensors"),
    ("missing", "checkpoint not found"),
])
def test_bad_checkpoint(kind, message, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    path, marker = bad_checkpoint(kind, src, tiny_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = beit_pth2onnx.main(["--source", str(path), "--target", str(out_dir / "m.onnx")])
    captured = capsys.readouterr()
    assert rc == 1
    assert captured.err.startswith(f"error: {path}: ") and message in captured.err
    assert "Traceback" not in captured.err and "\x1b[" not in captured.err
    assert os.listdir(out_dir) == []
    assert not marker.exists()


def test_code_pickle_would_run_code(tmp_path):
    """The control for test_bad_checkpoint: loaded unsafely, the same file does write its marker."""
    path, marker = bad_checkpoint("plain_pickle_code", tmp_path, None)
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.read_text() == "ran"


def test_forced_model_mismatch_names_the_fitting_variant(base_checkpoint, tmp_path, capsys):
    # base forced into the tiny variant (building tiny is cheap; building base to refuse tiny is not)
    rc = beit_pth2onnx.main(["--source", base_checkpoint, "--target", str(tmp_path / "m.onnx"),
                             "--model", TINY])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"does not fit {TINY}" in err and "The checkpoint's shapes fit beit_base_patch16_224." in err
    assert "unexpected keys: blocks.10." in err and "(160 in all)" in err  # blocks 2..11, 16 tensors each
    assert "shape mismatches: blocks.0.attn.proj.bias: checkpoint (768,) vs model (64,)" in err
    assert os.listdir(tmp_path) == []


def test_forced_model_that_fits(tiny_checkpoint, tmp_path, capsys):
    assert beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", str(tmp_path / "m.onnx"),
                               "--model", TINY, "--no_verify"]) == 0
    assert f"model     {TINY}" in capsys.readouterr().out


# ---------------------------------------------------------------- onnxsim and onnx_check

@pytest.mark.parametrize("batch_size", [1, 8])
def test_simplify_fixes_batch_and_keeps_results(tiny_exports, tiny_model, tmp_path, batch_size):
    out = tmp_path / f"sim_bs{batch_size}.onnx"
    errors = simplify.simplify_checked(tiny_exports["dyn11"], out, batch_size)
    assert os.listdir(tmp_path) == [out.name]
    assert errors["shape"] == (batch_size, 3, 224, 224) and errors["output_shape"] == (batch_size, 1000)
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]
    model = onnx.load(out)
    assert dims(model.graph.input[0]) == [batch_size, 3, 224, 224]
    assert dims(model.graph.output[0]) == [batch_size, 1000]
    before, after = op_counts(tiny_exports["dyn11"]), op_counts(str(out))
    assert before["Shape"] > 0 and after["Shape"] == 0  # the shape arithmetic was folded away
    assert after["Softmax"] == TINY_DEPTH and after["MatMul"] == before["MatMul"]
    batch = onnx_models.random_batch((batch_size, 3, 224, 224), seed=7)
    sim = onnx_models.run_session(onnx_models.open_session(out), batch)
    errors = onnx_models.output_errors(sim, torch_logits(tiny_model, batch))
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]


def test_simplify_keeps_nothing_on_failure(tiny_exports, tmp_path):
    out = tmp_path / "sim.onnx"
    with pytest.raises(onnx_models.OnnxCheckError, match="batch size is fixed at 8, not 2"):
        simplify.simplify_checked(tiny_exports["static17"], out, 2)
    # a negative tolerance fails every comparison: the path where onnxsim's output is rejected
    with pytest.raises(onnx_models.OnnxCheckError, match="onnxsim changed the results beyond tolerance -1"):
        simplify.simplify_checked(tiny_exports["dyn11"], out, 2, tolerance=-1.0)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(onnx_models.OnnxCheckError, match="junk.onnx: not a readable ONNX file"):
        simplify.simplify_checked(junk, out, 2)
    assert os.listdir(tmp_path) == ["junk.onnx"]


def test_unwritable_target(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = beit_pth2onnx.main(["--source", tiny_checkpoint, "--target", str(blocker / "m.onnx")])
    assert rc == 1 and f"error: {blocker / 'm.onnx'}: cannot write here" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["a_file"]


def perturbed_copy(src, dst, delta):
    """The model with ``delta`` added to the classifier bias: every logit moves by exactly delta."""
    model = onnx.load(src)
    (bias,) = [t for t in model.graph.initializer if t.name == "head.bias"]
    values = onnx.numpy_helper.to_array(bias) + np.float32(delta)
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), "head.bias"))
    onnx.save(model, dst)


def test_compare_models_measures_a_known_difference(tiny_exports, tmp_path):
    cand = tmp_path / "bias.onnx"
    perturbed_copy(tiny_exports["dyn11"], cand, 0.01)
    batch = onnx_models.random_batch((3, 3, 224, 224), seed=0)
    ref_logits = onnx_models.run_session(onnx_models.open_session(tiny_exports["dyn11"]), batch)
    errors = onnx_models.compare_models(tiny_exports["dyn11"], cand, batch)
    assert errors["max_abs"] == pytest.approx(0.01, rel=1e-3)
    assert errors["max_rel"] == pytest.approx(0.01 / np.abs(ref_logits).max(), rel=1e-3)
    assert errors["argmax_equal"] and errors["rows"] == 3
    # an int draws the seeded batch itself, the same one the CLI uses: random_batch(shape, seed 0)
    drawn = onnx_models.compare_models(tiny_exports["dyn11"], cand, 3)
    explicit = onnx_models.compare_models(tiny_exports["dyn11"], cand, onnx_models.random_batch((3, 3, 224, 224), 0))
    assert drawn["shape"] == explicit["shape"] == (3, 3, 224, 224)
    assert drawn["max_abs"] == explicit["max_abs"] and drawn["max_rel"] == explicit["max_rel"]
    # the control: another seed gives another batch, so the equality above is not one any batch would meet
    assert onnx_models.compare_models(tiny_exports["dyn11"], cand, 3, seed=1)["max_rel"] != explicit["max_rel"]


def test_onnx_check_cli(tiny_exports, tmp_path, capsys):
    assert onnx_check.main([tiny_exports["dyn11"], tiny_exports["static17"]]) == 0
    out = capsys.readouterr().out
    assert "seeded batch (8, 3, 224, 224)" in out and "top-1 agrees on 8/8 rows" in out and "OK" in out
    assert float(re.search(r"max rel error ([0-9.e+-]+)", out).group(1)) <= REL_TOL

    cand = tmp_path / "bias.onnx"
    perturbed_copy(tiny_exports["dyn11"], cand, 0.01)
    assert onnx_check.main([tiny_exports["dyn11"], str(cand), "--batch_size", "2"]) == 3  # was 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "is above the tolerance 1e-05" in captured.err
    assert onnx_check.main([tiny_exports["dyn11"], str(cand), "--batch_size", "2", "--tolerance", "0.1"]) == 0
    capsys.readouterr()

    assert onnx_check.main([tiny_exports["dyn11"], tiny_exports["static17"], "--batch_size", "2"]) == 2
    assert f"{tiny_exports['static17']}: batch size is fixed at 8, not 2" in capsys.readouterr().err
    # a missing or unloadable model is bad input, 1 (was 2); the wrong --batch_size above stays usage, 2
    assert onnx_check.main([tiny_exports["dyn11"], str(tmp_path / "nope.onnx")]) == 1
    assert "nope.onnx: ONNX model not found" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    assert onnx_check.main([tiny_exports["dyn11"], str(junk)]) == 1
    assert "junk.onnx: not a model ONNX Runtime can load" in capsys.readouterr().err


# ---------------------------------------------------------------- the real model, end to end

@pytest.mark.slow  # 57 s; the default run exports BEiT-base in conftest (test_fidelity, test_graph_modify)
def test_base_checkpoint_to_onnxsim_bs8(base_checkpoint, tmp_path):
    """beit_base_patch16_224: checkpoint -> ONNX opset 11 (dynamic) -> onnxsim bs8 -> onnx_check, as run_all.sh."""
    exported = tmp_path / "beit_base_patch16_224.onnx"
    simplified = tmp_path / "beit_onnxsim_bs8.onnx"
    proc = run_script(["beit_pth2onnx.py", "--source", base_checkpoint, "--target", str(exported)], timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "model     beit_base_patch16_224: 86.53 M parameters, 1000 classes" in proc.stdout
    assert "opset 11, batch dynamic" in proc.stdout
    rels = [float(x) for x in re.findall(r"max rel error ([0-9.e+-]+)", proc.stdout)]
    assert len(rels) == 2 and all(r <= REL_TOL for r in rels)  # batch 1 and batch 2

    proc = subprocess.run([sys.executable, "-m", "onnxsim", str(exported), str(simplified),
                           "--overwrite-input-shape", "8,3,224,224"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = onnx.load(simplified, load_external_data=False)
    assert dims(model.graph.input[0]) == [8, 3, 224, 224] and dims(model.graph.output[0]) == [8, 1000]
    counts = collections.Counter(n.op_type for n in model.graph.node)
    # one Softmax per block; six MatMuls per block (qkv, scores q@k^T, attn@v, proj, fc1, fc2), so
    # 6 * 12 = 72 for base; the classifier head is a Gemm, not a MatMul
    assert counts["Softmax"] == BASE_DEPTH and counts["Shape"] == 0 and counts["MatMul"] == 6 * BASE_DEPTH
    del model

    proc = run_script(["onnx_check.py", str(exported), str(simplified), "--batch_size", "8"], timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "seeded batch (8, 3, 224, 224)" in proc.stdout and "top-1 agrees on 8/8 rows" in proc.stdout
    assert float(re.search(r"max rel error ([0-9.e+-]+)", proc.stdout).group(1)) <= REL_TOL
    assert sorted(os.listdir(tmp_path)) == sorted([exported.name, simplified.name])


# ---------------------------------------------------------------- q/k/v as unilm indexes them (issue 11)

def guide_selected_gathers(model):
    """The Gathers the guide's graph_modify.py edits: refill_zero_gather takes every Gather whose
    indices input holds the value 1 (Ascend/ModelZoo-PyTorch ACL_PyTorch/contrib/cv/classfication/Beit/
    graph_modify.py: ``if graph[node.inputs[1]].value == 1``), meant to be k = qkv[1] of each block."""
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] in consts
            and consts[n.input[1]].size == 1 and int(consts[n.input[1]]) == 1]


def test_export_indexes_qkv_with_gather_so_the_guides_edit_applies(onnx_exports, tiny_model, tmp_path):
    """unilm's Attention.forward takes ``q, k, v = qkv[0], qkv[1], qkv[2]`` (beit/modeling_finetune.py),
    which exports as Gathers; timm's ``qkv.unbind(0)`` exports as Split + Squeeze, where the guide's
    refill_zero_gather finds no Gather of index 1 and silently skips its edit.  Our export now gives the
    guide's selection exactly the key tensors that our graph_modify's reproduction (--guide) edits."""
    from beit_pipeline.model import export as beit_export
    from beit_pipeline.graph import patterns as graph_patterns
    sim = onnx.load(onnx_exports.simplified("tiny", 11, 2))
    assert op_counts_of(sim)["Split"] == 0 and op_counts_of(sim)["Squeeze"] == 0
    _, plan = graph_patterns.plan_padding(sim, 2, 16, keys=True)
    keys = {k.tensor for k in plan.key_branches}
    assert len(keys) == TINY_DEPTH
    assert {g.output[0] for g in guide_selected_gathers(sim)} == keys
    # timm's own forward (what the export wrote before) leaves the guide's edit nothing to select.
    timm_path = str(tmp_path / "timm_unbind.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(tiny_model, (torch.zeros(1, 3, 224, 224),), timm_path, dynamo=False, opset_version=11)
    assert guide_selected_gathers(onnx.load(timm_path)) == []
    # The same numbers either way: the indexing changes the graph, not the arithmetic.
    batch = onnx_models_random(2)
    with beit_export.unilm_qkv_indexing(tiny_model), torch.no_grad():
        unilm = tiny_model(torch.from_numpy(batch)).numpy()
    assert np.array_equal(unilm, torch_logits(tiny_model, batch))


def op_counts_of(model):
    return collections.Counter(n.op_type for n in model.graph.node)


def onnx_models_random(n):
    return onnx_models.random_batch((n, 3, 224, 224), 0)


def test_guide_graph_modify_reproduction_edits_every_block(onnx_exports, tmp_path):
    """graph_modify.py --guide (the guide's four edits) on our export zeroes the padded keys of every block."""
    out = tmp_path / "guide.onnx"
    proc = run_script(["graph_modify.py", onnx_exports.simplified("tiny", 11, 2), str(out), "2", "--guide"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"padded keys zeroed \(Slice 0:197 \+ Concat zeros\)\D+{TINY_DEPTH}\b", proc.stdout), proc.stdout


def test_a_random_checkpoint_is_the_same_bytes_whatever_its_path(tmp_path):
    """torch.save named the archive's folder after the temporary file it wrote, so two saves of the same weights
    differed and the demo's checkpoint SHA-256 (recorded in acc_bs{N}_details.json) changed from run to run."""
    first, second = tmp_path / "a" / "random_checkpoint.pth", tmp_path / "b.pth"
    first.parent.mkdir()
    beit_model.save_random_checkpoint(first, TINY, seed=3)
    beit_model.save_random_checkpoint(second, TINY, seed=3)
    assert first.read_bytes() == second.read_bytes()
    beit_model.save_random_checkpoint(second, TINY, seed=4)
    assert first.read_bytes() != second.read_bytes()
