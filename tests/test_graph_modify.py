"""graph_modify.py: the 197 -> 208 token padding must leave the model's output unchanged.

Models come from conftest's ``onnx_exports`` fixture (exported with
beit_pipeline.model.export, simplified with graph.simplify.simplify_checked at a fixed batch,
cached for the session); the variants without bias and with a position
embedding are registered with it here.  Outputs are compared with
beit_pipeline.inference.sessions' session helpers and output_errors().
"""

import os
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from timm.models.beit import checkpoint_filter_fn

from helpers import BASE, TINY, run_script

import graph_modify
from beit_pipeline.graph import padding as graph_padding
from beit_pipeline.graph import patterns as graph_patterns
from beit_pipeline.inference import sessions
from beit_pipeline.model import build as beit_model
from beit_pipeline.model.export import export
from beit_pipeline.graph.index import GraphIndex, infer_shapes, node_key
from beit_pipeline.graph import simplify

TOKENS, PADDED = 197, 208
INT64_MAX = np.iinfo(np.int64).max
# (embed_dim, depth, num_heads, img_size) from the table the pipeline identifies checkpoints by
TINY_DIM, TINY_DEPTH, TINY_HEADS, _ = beit_model.KNOWN_VARIANTS[TINY]
BASE_DEPTH = beit_model.KNOWN_VARIANTS[BASE][1]
# Tolerance on max|a-b|/max|b|, as graph_modify.py's own default.
REL_TOL = 1e-5


# ---------------------------------------------------------------- helpers

def tiny_variant(config_change, seed):
    """The tiny BEiT with one config flag changed, random weights of its own seed."""
    config = beit_model.config_for(TINY)
    config.update(config_change)
    return beit_model.create_model(config), beit_model.random_checkpoint(TINY, seed=seed)["model"]


def tiny_without_bias():
    """A BEiT without relative position bias: no Add before the Softmax."""
    model, state = tiny_variant({"use_rel_pos_bias": False}, seed=3)
    model.load_state_dict({k: v for k, v in state.items() if "relative_position" not in k}, strict=True)
    return model


def tiny_with_position_embedding():
    """With an absolute position embedding added after the cls Concat."""
    model, state = tiny_variant({"use_abs_pos_emb": True}, seed=4)
    state["pos_embed"] = torch.randn((1, TOKENS, TINY_DIM), generator=torch.Generator().manual_seed(4))
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    return model


@pytest.fixture(scope="module")
def models(onnx_exports):
    """conftest's session-wide ONNX models, with this module's two tiny variants registered."""
    onnx_exports.register("tiny_nobias", tiny_without_bias)
    onnx_exports.register("tiny_posemb", tiny_with_position_embedding)
    return onnx_exports


def logits(path, batch):
    """The model's output in ONNX Runtime, through beit_pipeline.inference.sessions' session helpers."""
    return sessions.run_session(sessions.open_session(path), batch, str(path))


def printed_counts(text):
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S.*?)\s+(\d+)$", text, re.MULTILINE)}


def printed_verification(text):
    m = re.search(r"max rel err (\S+) \(tolerance \S+\), argmax identical (\d+)/(\d+)", text)
    assert m, text
    return float(m.group(1)), int(m.group(2)), int(m.group(3))


def inferred(path):
    """(the model, {tensor: shape}), the shapes inferred with the weights as typed inputs (fast on BEiT-base)."""
    model = onnx.load(str(path))
    shapes = {}
    for vi in list(infer_shapes(model).graph.value_info) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return model, shapes


def check_padded_shapes(path, batch_size, variant):
    """Every Softmax reads (B, H, 208, 208); every token MatMul gives (B, 208, *); H, D, depth of ``variant``."""
    dim, depth, heads, _ = beit_model.KNOWN_VARIANTS[variant]
    model, shapes = inferred(path)
    soft = [shapes[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
    assert soft == [[batch_size, heads, PADDED, PADDED]] * depth
    token_mm = [shapes[n.output[0]] for n in model.graph.node
                if n.op_type == "MatMul" and len(shapes[n.output[0]]) == 3]
    # qkv, proj, fc1, fc2 per block
    assert len(token_mm) == 4 * depth
    assert sorted({tuple(s) for s in token_mm}) == sorted(
        {(batch_size, PADDED, 3 * dim), (batch_size, PADDED, dim), (batch_size, PADDED, 4 * dim)})
    assert shapes[model.graph.output[0].name] == [batch_size, 1000]
    return model


def softmax_biases(model):
    """The constant added before each Softmax, in node order."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out = []
    for node in model.graph.node:
        if node.op_type == "Softmax":
            add = producer[node.input[0]]
            assert add.op_type == "Add"
            out.append(next(inits[i] for i in add.input if i in inits))
    return out


def pooling_slice_end(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    ends = [int(inits[n.input[2]][0]) for n in model.graph.node if n.op_type == "Slice"]
    assert len(ends) == 1
    return ends[0]


def modify(src, out, batch_size, *extra, capsys):
    rc = graph_modify.main([str(src), str(out), str(batch_size), *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------- exactness

# Batch sizes 1, 2, 8, 16 and opsets 11 and 17, each at least once, on the simplified models other tests use
# too (each pair costs an onnxsim run; the full 2 x 3 grid repeated what these show).
@pytest.mark.parametrize("opset, batch_size", [(11, 2), (11, 8), (17, 1), (17, 8), (17, 16)])
def test_tiny_padding_is_exact(models, tmp_path, capsys, opset, batch_size):
    src = models.simplified("tiny", opset, batch_size)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, batch_size, capsys=capsys)
    assert rc == 0, err
    assert out.is_file()
    counts = printed_counts(text)
    assert counts["token padding Concat"] == 1
    assert counts["attention bias padded + masked"] == TINY_DEPTH
    assert counts["qkv Reshape 197->208"] == TINY_DEPTH
    assert counts["pooling Slice end -> 197"] == 1
    err_printed, same, total = printed_verification(text)
    assert err_printed <= REL_TOL and same == total == batch_size

    # Independently of the script's own check: another seed, other sessions.
    batch = sessions.random_batch((batch_size, 3, 224, 224), 100 + batch_size)
    ref, new = logits(src, batch), logits(out, batch)
    assert new.shape == ref.shape == (batch_size, 1000)
    errors = sessions.output_errors(new, ref)
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]

    model = check_padded_shapes(out, batch_size, TINY)
    assert pooling_slice_end(model) == TOKENS
    # The real block is the original bias; padded keys get the mask; padded queries see real keys with bias 0.
    originals = softmax_biases(onnx.load(src))
    for old, new_bias in zip(originals, softmax_biases(model), strict=True):
        assert new_bias.shape == (1, TINY_HEADS, PADDED, PADDED)
        np.testing.assert_array_equal(new_bias[..., :TOKENS, :TOKENS], old.reshape(1, TINY_HEADS, TOKENS, TOKENS))
        assert np.all(new_bias[..., TOKENS:] == graph_padding.MASK_VALUE)
        assert np.all(new_bias[..., TOKENS:, :TOKENS] == 0)


def test_plan_finds_every_pattern_before_any_rewrite(models):
    model = onnx.load(models.simplified("tiny", 11, 8))
    before = model.SerializeToString()
    _, plan = graph_patterns.plan_padding(model, 8, 16)
    assert model.SerializeToString() == before  # finding the patterns changes nothing
    stream = plan.stream
    assert (stream.batch_size, stream.tokens, stream.padded, stream.dim) == (8, TOKENS, PADDED, TINY_DIM)
    assert stream.concat.op_type == "Concat"
    assert len(plan.blocks) == TINY_DEPTH
    for block in plan.blocks:
        assert block.softmax.op_type == "Softmax" and block.bias_add.op_type == "Add"
        assert [r.op_type for r in block.qkv_reshapes] == ["Reshape"]  # q, k and v come from one Reshape
        assert block.out_reshape.op_type == "Reshape"
    assert sum(r.role == "qkv" for r in plan.token_reshapes) == TINY_DEPTH
    assert {r.role for r in plan.token_reshapes} <= {"qkv", "attention-output"}
    assert plan.pooling.kind == "mean" and plan.pooling.slice.op_type == "Slice"
    assert plan.token_constants == []


def test_output_is_deterministic(models, tmp_path, capsys):
    """Two runs write the same bytes: the rewrite depends on the graph only (no set or id order)."""
    src = models.simplified("tiny", 17, 8)
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        assert modify(src, out, 8, "--no_verify", capsys=capsys)[0] == 0
    assert outs[0].read_bytes() == outs[1].read_bytes()
    assert outs[0].read_bytes() != open(src, "rb").read()


def node_names(model):
    return [(n.name, n.op_type) for n in model.graph.node]


@pytest.mark.parametrize("flag", [None, "--guide"])
def test_node_names_survive_and_are_the_same_after_a_rebuild(models, tiny_model, tmp_path, capsys, flag):
    """Issue 20: a keep_dtype file names nodes of beit_mg_bs{N}.onnx; every node graph_modify does not add keeps
    its exported name and op type, and the model rebuilt from the same checkpoint (export, onnxsim, graph_modify
    again) has exactly the same node names, so the file stays valid."""
    src = models.simplified("tiny", 11, 8)
    extra = [flag] if flag else []
    assert modify(src, tmp_path / "a.onnx", 8, "--no_verify", *extra, capsys=capsys)[0] == 0
    before, after = node_names(onnx.load(src)), node_names(onnx.load(str(tmp_path / "a.onnx")))
    assert all(name for name, _ in before) and len({name for name, _ in before}) == len(before)
    added = [pair for pair in after if pair not in before]
    assert [pair for pair in after if pair not in added] == before  # same names, same op types, same order
    assert added and all(name.startswith("graph_modify_") for name, _ in added)
    if flag:
        return
    export(tiny_model, str(tmp_path / "again.onnx"), batch_size=1, img_size=224, opset=11, dynamic=True)
    simplify.simplify_checked(str(tmp_path / "again.onnx"), str(tmp_path / "again_sim.onnx"), 8)
    assert modify(tmp_path / "again_sim.onnx", tmp_path / "b.onnx", 8, "--no_verify", capsys=capsys)[0] == 0
    assert node_names(onnx.load(str(tmp_path / "b.onnx"))) == after


def test_mask_value_is_exact_and_finite_in_fp16():
    value = graph_padding.MASK_VALUE
    assert float(np.float16(value)) == value
    # scores of either sign added to it stay finite in fp16 and vanish in exp
    for score in (-1000.0, 1000.0):
        assert np.isfinite(np.float16(value) + np.float16(score))
        assert np.exp(np.float32(value + score)) == 0.0
        assert np.exp(np.float16(value + score)) == 0.0


def test_base_padding_is_exact(models, tmp_path, capsys):
    """beit_base_patch16_224, opset 11, batch 8: the guide's configuration.

    The script's own verification is covered by the tiny tests; here the test
    compares the models itself (--no_verify keeps the test within its budget).
    """
    src = models.simplified("base", 11, 8)
    out = tmp_path / "base_mod.onnx"
    rc, text, err = modify(src, out, 8, "--no_verify", capsys=capsys)
    assert rc == 0, err
    counts = printed_counts(text)
    assert counts["token padding Concat"] == 1
    assert counts["attention bias padded + masked"] == BASE_DEPTH
    assert counts["qkv Reshape 197->208"] == BASE_DEPTH
    assert counts["pooling Slice end -> 197"] == 1
    assert "max rel err" not in text
    batch = sessions.random_batch((8, 3, 224, 224), 7)
    errors = sessions.output_errors(logits(out, batch), logits(src, batch))
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]
    check_padded_shapes(out, 8, BASE)


# ---------------------------------------------------------------- the graph toolkit

def index_maps(gi):
    """The producer and consumer maps of a GraphIndex, by node key, comparable across indexes."""
    producers = {t: node_key(n) for t, n in gi.producer.items()}
    consumers = {t: sorted(node_key(n) for n in users) for t, users in gi.consumers.items() if users}
    return producers, consumers


def test_graph_index_stays_correct_through_a_rewrite(models):
    """Issue 22's toolkit: after graph_modify's passes (inserts, rewired inputs) and a removal, the index that
    made them describes the graph exactly as a fresh index of it does; paths match from an anchor op."""
    model = onnx.load(models.simplified("tiny", 11, 8))
    gi, plan = graph_patterns.plan_padding(model, 8, 16)
    graph_padding.pad_token_stream(gi, plan)
    for rewrite in (graph_padding.pad_attention, graph_padding.pad_token_reshapes, graph_padding.restrict_pooling):
        rewrite(gi, plan, True)
    assert len(gi.inserted) == 1 and gi.inserted[0].op_type == "Concat"  # the token padding
    assert index_maps(gi) == index_maps(GraphIndex(model, shapes=False))
    softmax = plan.blocks[0].softmax
    add, scores = gi.match_parent_path(softmax, ("Add", "MatMul"), (0, None))
    assert add is plan.blocks[0].bias_add and scores is graph_patterns.scores_matmul(gi, plan.blocks[0])
    assert gi.match_parent_path(softmax, ("Add", "MatMul"), (0, 1)) is None  # the bias is a constant
    assert [n.op_type for n in gi.match_child_path(softmax, ("MatMul", "Transpose", "Reshape"))] == \
        ["MatMul", "Transpose", "Reshape"]
    identity = gi.insert_before(softmax, helper.make_node("Identity", [softmax.input[0]], ["scores_copy"],
                                                          name="copy"))
    gi.set_input(softmax, 0, "scores_copy")
    assert gi.producer["scores_copy"] is identity and gi.consumers["scores_copy"] == [softmax]
    gi.set_input(softmax, 0, identity.input[0])
    gi.remove(identity)
    assert "scores_copy" not in gi.producer and index_maps(gi) == index_maps(GraphIndex(model, shapes=False))


# ---------------------------------------------------------------- why the mask matters

def test_no_mask_reproduces_the_guides_error(models, tmp_path, capsys):
    src = models.simplified("tiny", 11, 8)
    out = tmp_path / "guide.onnx"
    rc, text, err = modify(src, out, 8, "--no_mask", capsys=capsys)
    assert rc == 0, err  # the guide's padding is written even though it is not exact
    counts = printed_counts(text)
    assert counts["attention bias padded (zeros)"] == TINY_DEPTH
    assert counts["pooling: mean left over all tokens (guide)"] == 1
    assert "differs from the input model" in text
    model = onnx.load(str(out))
    assert pooling_slice_end(model) == INT64_MAX
    for bias in softmax_biases(model):
        assert np.all(bias[..., TOKENS:] == 0) and np.all(bias[..., TOKENS:, :] == 0)
    batch = sessions.random_batch((8, 3, 224, 224), 11)
    ref = logits(src, batch)
    guide_out = logits(out, batch)
    err_guide = sessions.output_errors(guide_out, ref)["max_rel"]
    assert np.all(np.isfinite(guide_out)) and err_guide > 1e-2, err_guide

    exact = tmp_path / "exact.onnx"
    assert modify(src, exact, 8, capsys=capsys)[0] == 0
    assert sessions.output_errors(logits(exact, batch), ref)["max_rel"] <= REL_TOL


def test_graph_without_bias_gets_a_mask_add(models, tmp_path, capsys):
    """No Add before the Softmax (no relative position bias): a mask Add is inserted."""
    src = models.simplified("tiny_nobias", 11, 8)
    producers = {o: n.op_type for n in onnx.load(src).graph.node for o in n.output}
    assert all(producers[n.input[0]] == "MatMul" for n in onnx.load(src).graph.node if n.op_type == "Softmax")
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, 8, capsys=capsys)
    assert rc == 0, err
    assert printed_counts(text)["attention mask Add inserted"] == TINY_DEPTH
    model = check_padded_shapes(out, 8, TINY)
    for mask in softmax_biases(model):
        assert mask.shape == (1, 1, PADDED, PADDED)
        assert np.all(mask[..., :TOKENS] == 0) and np.all(mask[..., TOKENS:] == graph_padding.MASK_VALUE)
    batch = sessions.random_batch((8, 3, 224, 224), 5)
    ref = logits(src, batch)
    assert sessions.output_errors(logits(out, batch), ref)["max_rel"] <= REL_TOL

    guide = tmp_path / "guide.onnx"
    assert modify(src, guide, 8, "--no_mask", "--no_verify", capsys=capsys)[0] == 0
    guide_out = logits(guide, batch)
    assert np.all(np.isfinite(guide_out)) and sessions.output_errors(guide_out, ref)["max_rel"] > 1e-2


def test_position_embedding_is_padded(models, tmp_path, capsys):
    src = models.simplified("tiny_posemb", 17, 8)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, 8, capsys=capsys)
    assert rc == 0, err
    assert printed_counts(text)["per-token constant (position embedding) padded"] == 1
    check_padded_shapes(out, 8, TINY)
    batch = sessions.random_batch((8, 3, 224, 224), 9)
    assert sessions.output_errors(logits(out, batch), logits(src, batch))["max_rel"] <= REL_TOL


def test_pad_to_other_multiple(models, tmp_path, capsys):
    src = models.simplified("tiny", 17, 1)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, 1, "--pad_to", "8", capsys=capsys)
    assert rc == 0, err
    assert "tokens 197 -> 200" in text
    model, shapes = inferred(out)
    assert ([shapes[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"]
            == [[1, TINY_HEADS, 200, 200]] * TINY_DEPTH)
    batch = sessions.random_batch((1, 3, 224, 224), 3)
    assert sessions.output_errors(logits(out, batch), logits(src, batch))["max_rel"] <= REL_TOL


def test_failed_verification_writes_nothing(models, tmp_path, capsys, monkeypatch):
    # A mask of 0 leaves the padded keys unmasked: the script's own check must catch it.
    monkeypatch.setattr(graph_padding, "MASK_VALUE", 0.0)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(models.simplified("tiny", 17, 8), out, 8, capsys=capsys)
    assert rc == 3  # a check failed (exit 1 before the unified exit codes)
    assert "does not reproduce the input model" in err
    assert printed_verification(text)[0] > 1e-2
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- refusals

class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 16, stride=16)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def refused(src, batch_size, tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    out = folder / "mod.onnx"
    rc, text, err = modify(src, out, batch_size, capsys=capsys)
    assert rc == 1  # a graph that lacks a pattern is bad input (exit 2 before the unified exit codes)
    assert os.listdir(folder) == []  # no output, no temporary
    return err


def test_refuses_a_cnn(tmp_path, capsys):
    torch.manual_seed(0)
    src = str(tmp_path / "cnn.onnx")
    export(SmallCNN().eval(), src, batch_size=8, img_size=224, opset=11, dynamic=False)
    err = refused(src, 8, tmp_path, capsys)
    assert "pattern 'patch embedding + cls-token Concat' not found" in err
    assert "Relu" in err


def test_refuses_an_already_modified_graph(models, tmp_path, capsys):
    once = tmp_path / "once.onnx"
    assert modify(models.simplified("tiny", 11, 8), once, 8, "--no_verify", capsys=capsys)[0] == 0
    err = refused(once, 8, tmp_path, capsys)
    assert "pattern 'unpadded token stream' not found" in err
    assert "already followed by a padding Concat to 208 tokens" in err


def test_refuses_a_dynamic_batch_from_the_command_line(models, tmp_path):
    out = tmp_path / "mod.onnx"
    proc = run_script(["graph_modify.py", models.dynamic("tiny", 11), str(out), "8"])
    assert proc.returncode == 1
    assert "pattern 'static image input (B, 3, H, W)' not found" in proc.stderr
    assert "dynamic batch dimension 'batch'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_refuses_a_batch_mismatch(models, tmp_path, capsys):
    err = refused(models.simplified("tiny", 17, 8), 16, tmp_path, capsys)
    assert "pattern 'static image input (B, 3, H, W)' not found" in err
    assert "has batch 8 but BATCH_SIZE is 16" in err


def test_unreadable_inputs(tmp_path, capsys):
    absent = tmp_path / "absent.onnx"
    rc, _, err = modify(absent, tmp_path / "o.onnx", 8, capsys=capsys)
    assert rc == 2 and err.startswith(f"error: {absent}: ONNX model not found")
    assert not (tmp_path / "o.onnx").exists()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    rc, _, err = modify(junk, tmp_path / "o.onnx", 8, capsys=capsys)
    assert rc == 1 and "not a readable ONNX model" in err  # a bad file; a missing one is a usage error
    assert not (tmp_path / "o.onnx").exists()
    rc, _, err = modify(junk, tmp_path / "no_such_folder" / "o.onnx", 8, capsys=capsys)
    assert rc == 2 and "does not exist" in err


def test_other_image_size_is_padded_and_verified(tmp_path):
    """A 384-pixel BEiT (577 tokens -> 592): the rewrite and its own check follow the model's input size."""
    model, state = tiny_variant({"img_size": 384}, seed=6)
    model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    raw, sim, out = (str(tmp_path / name) for name in ("raw.onnx", "sim.onnx", "mg.onnx"))
    export(model, raw, batch_size=1, img_size=384, opset=11, dynamic=True)
    simplify.simplify_checked(raw, sim, 2)
    proc = run_script(["graph_modify.py", sim, out, "2"])
    assert proc.returncode == 0, proc.stderr
    assert "tokens 577 -> 592" in proc.stdout
    err, same, rows = printed_verification(proc.stdout)
    assert err <= REL_TOL and same == rows == 2
    errors = sessions.compare_models(sim, out, sessions.random_batch((2, 3, 384, 384), 7))
    assert errors["max_rel"] <= REL_TOL and errors["argmax_equal"]


# ---------------------------------------------------------------- --guide: the guide's own graph

def guide_reproduction(model, batch_size):
    """The guide's graph_modify.py (MagicONNX) re-done by hand on this export, edit for edit, in its order.

    Written from the guide's script, not from graph_padding: it finds things the
    guide's way (every Reshape, the FIRST Concat, every Add with a constant second input,
    every Gather of index 1 for the key; where onnxsim left timm's unbind as a Split, the
    key is the Squeeze of the Split's second output).
    """
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim]
              for vi in onnx.shape_inference.infer_shapes(model).graph.value_info}
    inits = {t.name: t for t in model.graph.initializer}

    def put(name, array):
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    for node in model.graph.node:  # reshape_axis: 197 -> 208 in every Reshape shape
        if node.op_type == "Reshape" and node.input[1] in inits:
            shape = numpy_helper.to_array(inits[node.input[1]]).copy()
            put(node.input[1], np.where(shape == TOKENS, PADDED, shape))
    concat = next(n for n in model.graph.node if n.op_type == "Concat")  # add_concat_tensor
    dim = numpy_helper.to_array(inits[concat.input[0]]).shape[-1]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((batch_size, PADDED - TOKENS, dim), np.float32),
                                                           "1234"))
    concat.input.append("1234")
    for node in model.graph.node:  # add_add_tensor: zero-pad the Add constant holding 197
        if node.op_type == "Add" and node.input[1] in inits:
            value = numpy_helper.to_array(inits[node.input[1]])
            if TOKENS in value.shape:
                grown = np.zeros([PADDED if d == TOKENS else d for d in value.shape], np.float32)
                grown[tuple(slice(0, d) for d in value.shape)] = value
                put(node.input[1], grown)
    refill_zero_keys(model, shapes, batch_size)
    del model.graph.value_info[:]  # the shapes inferred before the edits no longer hold
    return model


def refill_zero_keys(model, shapes, batch_size):
    """refill_zero_gather: after each key, Slice [0:197] on axis 2, then Concat zeros (B, H, 11, hd) on axis 2."""
    idx = 6000
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    keys = [n for n in model.graph.node if n.op_type == "Gather" and n.input[1] in inits
            and inits[n.input[1]].size == 1 and int(inits[n.input[1]]) == 1]
    keys += [n for s in model.graph.node if s.op_type == "Split" and len(s.output) == 3
             for n in model.graph.node if n.op_type == "Squeeze" and n.input[0] == s.output[1]]
    for key in keys:
        k, (_, heads, _, hd) = key.output[0], shapes[key.output[0]]
        consts = {idx + 2: np.zeros((batch_size, heads, PADDED - TOKENS, hd), np.float32)}
        consts.update({idx + 4: np.array([0]), idx + 5: np.array([TOKENS]), idx + 6: np.array([2]),
                       idx + 7: np.array([1])})
        model.graph.initializer.extend(numpy_helper.from_array(v, str(i)) for i, v in consts.items())
        sl = onnx.helper.make_node("Slice", [k] + [str(idx + i) for i in (4, 5, 6, 7)], [f"Slice_{idx + 3}"])
        cat = onnx.helper.make_node("Concat", [f"Slice_{idx + 3}", str(idx + 2)], [f"Concat_{idx + 1}"], axis=2)
        for node in model.graph.node:
            node.input[:] = [f"Concat_{idx + 1}" if i == k else i for i in node.input]
        position = list(model.graph.node).index(key) + 1
        model.graph.node.insert(position, cat)
        model.graph.node.insert(position, sl)
        idx += 8


def graph_signature(model):
    """(one digest per graph output, node count): equal for the same computation, whatever the names and order.

    Each tensor's digest covers how it is made: an initializer by its value, a node output by
    the node's op type, attributes, output index and the digests of its inputs.
    """
    import hashlib

    digest = {t.name: hashlib.sha256(numpy_helper.to_array(t).tobytes() + repr((t.data_type, list(t.dims))).encode())
              .hexdigest() for t in model.graph.initializer}
    digest.update({i.name: i.name for i in model.graph.input if i.name not in digest})
    for node in model.graph.node:  # both graphs are topologically sorted
        attrs = sorted((a.name, repr(onnx.helper.get_attribute_value(a))) for a in node.attribute)
        made = repr((node.op_type, attrs, [digest[i] if i else "" for i in node.input]))
        for k, out in enumerate(node.output):
            digest[out] = hashlib.sha256(f"{made}:{k}".encode()).hexdigest()
    return [digest[o.name] for o in model.graph.output], len(model.graph.node)


@pytest.mark.parametrize("opset", [11, 17])
def test_guide_flag_writes_exactly_the_guides_graph(models, tmp_path, capsys, opset):
    src = models.simplified("tiny", opset, 8)
    out = tmp_path / "guide.onnx"
    rc, text, err = modify(src, out, 8, "--guide", capsys=capsys)
    assert rc == 0, err  # written although it differs from the input model, as the guide's graph does
    counts = printed_counts(text)
    assert counts["guide: zero tokens appended to the cls-token Concat"] == 1
    assert counts["attention bias padded (zeros)"] == TINY_DEPTH
    assert counts["guide: padded keys zeroed (Slice 0:197 + Concat zeros)"] == TINY_DEPTH
    assert counts["qkv Reshape 197->208"] == TINY_DEPTH
    assert "--guide output differs from the input model" in text
    written, expected = onnx.load(str(out)), guide_reproduction(onnx.load(src), 8)
    assert graph_signature(written) == graph_signature(expected)
    batch = sessions.random_batch((8, 3, 224, 224), 21)
    expected_path = tmp_path / "expected.onnx"
    onnx.save(expected, str(expected_path))
    guide_out = logits(out, batch)
    np.testing.assert_array_equal(guide_out, logits(expected_path, batch))
    # not the input model, and not --no_mask either: the zeroed keys change the result again
    ref = logits(src, batch)
    assert sessions.output_errors(guide_out, ref)["max_rel"] > 1e-2
    no_mask = tmp_path / "no_mask.onnx"
    assert modify(src, no_mask, 8, "--no_mask", "--no_verify", capsys=capsys)[0] == 0
    assert sessions.output_errors(logits(no_mask, batch), guide_out)["max_rel"] > 1e-3


def test_guide_and_no_mask_together_are_refused(models, tmp_path, capsys):
    rc, _, err = modify(models.simplified("tiny", 11, 8), tmp_path / "o.onnx", 8, "--guide", "--no_mask",
                        capsys=capsys)
    assert rc == 2 and "--guide and --no_mask" in err
    assert os.listdir(tmp_path) == []
