"""graph_modify.py: the 197 -> 208 token padding must leave the model's output unchanged.

Models are exported here (not with beit_pth2onnx.py) and simplified with
``python -m onnxsim`` at a fixed batch, as the pipeline does; exports are cached
per (model, opset, batch) for the session.
"""

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from timm.models.beit import checkpoint_filter_fn

from conftest import BASE, TINY, run_script

import beit_model
import graph_modify

TOKENS, PADDED = 197, 208
INT64_MAX = np.iinfo(np.int64).max


# ---------------------------------------------------------------- helpers

def export_onnx(model, path, opset, dynamic=True):
    kwargs = dict(dynamic_axes={"image": {0: "batch"}, "class": {0: "batch"}}) if dynamic else {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(model, torch.randn(1 if dynamic else 8, 3, 224, 224), str(path), dynamo=False,
                          input_names=["image"], output_names=["class"], opset_version=opset, **kwargs)
    return str(path)


def simplify(raw, out, batch_size):
    subprocess.run([sys.executable, "-m", "onnxsim", raw, str(out), "--overwrite-input-shape",
                    f"{batch_size},3,224,224"], check=True, capture_output=True, text=True, timeout=600)
    return str(out)


class OnnxModels:
    """Exported + simplified models, made on first use and kept for the session."""

    def __init__(self, folder, request):
        self.folder = folder
        self.request = request
        self.raw, self.sim = {}, {}

    def torch_model(self, kind):
        if kind == "tiny":
            return beit_model.build_model(beit_model.load_state_dict(self.request.getfixturevalue("tiny_checkpoint")))[0]
        if kind == "base":
            return beit_model.build_model(beit_model.load_state_dict(self.request.getfixturevalue("base_checkpoint")))[0]
        if kind == "tiny_nobias":  # a BEiT without relative position bias: no Add before the Softmax
            config = beit_model.config_for(TINY)
            config["use_rel_pos_bias"] = False
            model = beit_model.create_model(config)
            state = beit_model.random_checkpoint(TINY, seed=3)["model"]
            model.load_state_dict({k: v for k, v in state.items() if "relative_position" not in k}, strict=True)
            return model
        if kind == "tiny_posemb":  # with an absolute position embedding added after the cls Concat
            config = beit_model.config_for(TINY)
            config["use_abs_pos_emb"] = True
            model = beit_model.create_model(config)
            state = beit_model.random_checkpoint(TINY, seed=4)["model"]
            state["pos_embed"] = torch.randn((1, TOKENS, 64), generator=torch.Generator().manual_seed(4))
            model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
            return model
        raise KeyError(kind)

    def raw_model(self, kind, opset):
        key = (kind, opset)
        if key not in self.raw:
            self.raw[key] = export_onnx(self.torch_model(kind), self.folder / f"{kind}_op{opset}_raw.onnx", opset)
        return self.raw[key]

    def get(self, kind, opset, batch_size):
        key = (kind, opset, batch_size)
        if key not in self.sim:
            self.sim[key] = simplify(self.raw_model(kind, opset),
                                     self.folder / f"{kind}_op{opset}_bs{batch_size}_sim.onnx", batch_size)
        return self.sim[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory, request):
    return OnnxModels(tmp_path_factory.mktemp("gm_onnx"), request)


def run_ort(path, batch):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: batch})[0]


def rel_err(a, b):
    return float(np.max(np.abs(a.astype(np.float64) - b)) / np.max(np.abs(b.astype(np.float64))))


def seeded_batch(seed, batch_size):
    return np.random.default_rng(seed).standard_normal((batch_size, 3, 224, 224)).astype(np.float32)


def printed_counts(text):
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^  (\S.*?)\s+(\d+)$", text, re.MULTILINE)}


def printed_verification(text):
    m = re.search(r"max rel err (\S+) \(tolerance \S+\), argmax identical (\d+)/(\d+)", text)
    assert m, text
    return float(m.group(1)), int(m.group(2)), int(m.group(3))


def inferred(path):
    model = onnx.load(str(path))
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output):
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
    return model, shapes


def check_padded_shapes(path, batch_size, heads, dim, depth):
    """Every Softmax reads (B, H, 208, 208); every token MatMul gives (B, 208, *)."""
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

@pytest.mark.parametrize("batch_size", [1, 8, 16])
@pytest.mark.parametrize("opset", [11, 17])
def test_tiny_padding_is_exact(models, tmp_path, capsys, opset, batch_size):
    src = models.get("tiny", opset, batch_size)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, batch_size, capsys=capsys)
    assert rc == 0, err
    assert out.is_file()
    counts = printed_counts(text)
    assert counts["token padding Concat"] == 1
    assert counts["attention bias padded + masked"] == 2
    assert counts["qkv Reshape 197->208"] == 2
    assert counts["pooling Slice end -> 197"] == 1
    err_printed, same, total = printed_verification(text)
    assert err_printed <= 1e-5 and same == total == batch_size

    # Independently of the script's own check: another seed, another session.
    batch = seeded_batch(100 + batch_size, batch_size)
    ref, new = run_ort(src, batch), run_ort(out, batch)
    assert new.shape == ref.shape == (batch_size, 1000)
    assert rel_err(new, ref) <= 1e-5
    assert np.array_equal(new.argmax(1), ref.argmax(1))

    model = check_padded_shapes(out, batch_size, heads=2, dim=64, depth=2)
    assert pooling_slice_end(model) == TOKENS
    # The real block is the original bias; padded keys get the mask; padded queries see real keys with bias 0.
    originals = softmax_biases(onnx.load(src))
    for old, new_bias in zip(originals, softmax_biases(model), strict=True):
        assert new_bias.shape == (1, 2, PADDED, PADDED)
        np.testing.assert_array_equal(new_bias[..., :TOKENS, :TOKENS], old.reshape(1, 2, TOKENS, TOKENS))
        assert np.all(new_bias[..., TOKENS:] == graph_modify.MASK_VALUE)
        assert np.all(new_bias[..., TOKENS:, :TOKENS] == 0)


def test_mask_value_is_exact_and_finite_in_fp16():
    value = graph_modify.MASK_VALUE
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
    src = models.get("base", 11, 8)
    out = tmp_path / "base_mod.onnx"
    rc, text, err = modify(src, out, 8, "--no_verify", capsys=capsys)
    assert rc == 0, err
    counts = printed_counts(text)
    assert counts["token padding Concat"] == 1
    assert counts["attention bias padded + masked"] == 12
    assert counts["qkv Reshape 197->208"] == 12
    assert counts["pooling Slice end -> 197"] == 1
    assert "max rel err" not in text
    batch = seeded_batch(7, 8)
    ref, new = run_ort(src, batch), run_ort(out, batch)
    assert rel_err(new, ref) <= 1e-5
    assert np.array_equal(new.argmax(1), ref.argmax(1))
    check_padded_shapes(out, 8, heads=12, dim=768, depth=12)


# ---------------------------------------------------------------- why the mask matters

def test_no_mask_reproduces_the_guides_error(models, tmp_path, capsys):
    src = models.get("tiny", 11, 8)
    out = tmp_path / "guide.onnx"
    rc, text, err = modify(src, out, 8, "--no_mask", capsys=capsys)
    assert rc == 0, err  # the guide's padding is written even though it is not exact
    counts = printed_counts(text)
    assert counts["attention bias padded (zeros)"] == 2
    assert counts["pooling: mean left over all tokens (guide)"] == 1
    assert "differs from the input model" in text
    model = onnx.load(str(out))
    assert pooling_slice_end(model) == INT64_MAX
    for bias in softmax_biases(model):
        assert np.all(bias[..., TOKENS:] == 0) and np.all(bias[..., TOKENS:, :] == 0)
    batch = seeded_batch(11, 8)
    ref = run_ort(src, batch)
    err_guide = rel_err(run_ort(out, batch), ref)
    assert err_guide > 1e-2, err_guide

    exact = tmp_path / "exact.onnx"
    assert modify(src, exact, 8, capsys=capsys)[0] == 0
    assert rel_err(run_ort(exact, batch), ref) <= 1e-5


def test_graph_without_bias_gets_a_mask_add(models, tmp_path, capsys):
    """No Add before the Softmax (no relative position bias): a mask Add is inserted."""
    src = models.get("tiny_nobias", 11, 8)
    producers = {o: n.op_type for n in onnx.load(src).graph.node for o in n.output}
    assert all(producers[n.input[0]] == "MatMul" for n in onnx.load(src).graph.node if n.op_type == "Softmax")
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, 8, capsys=capsys)
    assert rc == 0, err
    assert printed_counts(text)["attention mask Add inserted"] == 2
    model = check_padded_shapes(out, 8, heads=2, dim=64, depth=2)
    for mask in softmax_biases(model):
        assert mask.shape == (1, 1, PADDED, PADDED)
        assert np.all(mask[..., :TOKENS] == 0) and np.all(mask[..., TOKENS:] == graph_modify.MASK_VALUE)
    batch = seeded_batch(5, 8)
    ref = run_ort(src, batch)
    assert rel_err(run_ort(out, batch), ref) <= 1e-5

    guide = tmp_path / "guide.onnx"
    assert modify(src, guide, 8, "--no_mask", "--no_verify", capsys=capsys)[0] == 0
    assert rel_err(run_ort(guide, batch), ref) > 1e-2


def test_position_embedding_is_padded(models, tmp_path, capsys):
    src = models.get("tiny_posemb", 17, 8)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, 8, capsys=capsys)
    assert rc == 0, err
    assert printed_counts(text)["per-token constant (position embedding) padded"] == 1
    check_padded_shapes(out, 8, heads=2, dim=64, depth=2)
    batch = seeded_batch(9, 8)
    assert rel_err(run_ort(out, batch), run_ort(src, batch)) <= 1e-5


def test_pad_to_other_multiple(models, tmp_path, capsys):
    src = models.get("tiny", 17, 1)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(src, out, 1, "--pad_to", "8", capsys=capsys)
    assert rc == 0, err
    assert "tokens 197 -> 200" in text
    model, shapes = inferred(out)
    assert [shapes[n.input[0]] for n in model.graph.node if n.op_type == "Softmax"] == [[1, 2, 200, 200]] * 2
    batch = seeded_batch(3, 1)
    assert rel_err(run_ort(out, batch), run_ort(src, batch)) <= 1e-5


def test_failed_verification_writes_nothing(models, tmp_path, capsys, monkeypatch):
    # A mask of 0 leaves the padded keys unmasked: the script's own check must catch it.
    monkeypatch.setattr(graph_modify, "MASK_VALUE", 0.0)
    out = tmp_path / "mod.onnx"
    rc, text, err = modify(models.get("tiny", 17, 8), out, 8, capsys=capsys)
    assert rc == 1
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
    assert rc == 2
    assert os.listdir(folder) == []  # no output, no temporary
    return err


def test_refuses_a_cnn(tmp_path, capsys):
    torch.manual_seed(0)
    src = export_onnx(SmallCNN().eval(), tmp_path / "cnn.onnx", 11, dynamic=False)
    err = refused(src, 8, tmp_path, capsys)
    assert "pattern 'patch embedding + cls-token Concat' not found" in err
    assert "Relu" in err


def test_refuses_an_already_modified_graph(models, tmp_path, capsys):
    once = tmp_path / "once.onnx"
    assert modify(models.get("tiny", 11, 8), once, 8, "--no_verify", capsys=capsys)[0] == 0
    err = refused(once, 8, tmp_path, capsys)
    assert "pattern 'unpadded token stream' not found" in err
    assert "already followed by a padding Concat to 208 tokens" in err


def test_refuses_a_dynamic_batch_from_the_command_line(models, tmp_path):
    out = tmp_path / "mod.onnx"
    proc = run_script(["graph_modify.py", models.raw_model("tiny", 11), str(out), "8"])
    assert proc.returncode == 2
    assert "pattern 'static image input (B, 3, H, W)' not found" in proc.stderr
    assert "dynamic batch dimension 'batch'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_refuses_a_batch_mismatch(models, tmp_path, capsys):
    err = refused(models.get("tiny", 17, 8), 16, tmp_path, capsys)
    assert "pattern 'static image input (B, 3, H, W)' not found" in err
    assert "has batch 8 but BATCH_SIZE is 16" in err


def test_unreadable_inputs(tmp_path, capsys):
    assert modify(tmp_path / "absent.onnx", tmp_path / "o.onnx", 8, capsys=capsys)[2].startswith("error: ")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a model" * 10)
    rc, _, err = modify(junk, tmp_path / "o.onnx", 8, capsys=capsys)
    assert rc == 2 and "not a readable ONNX model" in err
    assert not (tmp_path / "o.onnx").exists()
    rc, _, err = modify(junk, tmp_path / "no_such_folder" / "o.onnx", 8, capsys=capsys)
    assert rc == 2 and "does not exist" in err
