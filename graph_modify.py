"""Step 4 of the pipeline: pad BEiT's 197 tokens to 208, exactly, for the Ascend 310P.

    beit_preprocess.py -> beit_pth2onnx.py -> python3 -m onnxsim -> graph_modify.py -> atc / beit_infer.py
                                                                     ^^^^^^^^^^^^^^^

The 310P keeps its data 16-aligned, so the guide pads the token axis of the
simplified ONNX model from 197 (1 cls token + 14x14 patches) to 208, the next
multiple of 16.  The guide's own script fills the 11 new tokens with zeros and
leaves it there: the padded keys then take softmax weight in every block and
its OM loses 0.6 points Top-1.  This script does the same padding EXACTLY:

* after the cls-token Concat, a Concat with a zero constant (B, 11, D) makes
  the token stream (B, 208, D); B is the static BATCH_SIZE (the graph must be
  simplified with a fixed batch first, as in the guide);
* every attention Softmax masks the padded keys: the relative-position bias
  constant (1, H, 197, 197) that is added before it becomes (1, H, 208, 208),
  the original bias in the real block, MASK_VALUE in the padded KEY columns and
  0 on the real keys of the padded QUERY rows.  A block with no bias Add (a
  model without relative position bias, or an all-zero bias that a simplifier
  removed) gets an Add of a (1, 1, 208, 208) mask constant;
* every Reshape whose shape constant holds the token count 197 (the qkv
  Reshape (B, 197, 3, H, hd), the attention-output Reshape (B, 197, D)) gets 208;
* the mean pooling over the patch tokens (Slice [1:] + ReduceMean over axis 1)
  stops at token 197, so it averages the 196 real patch tokens only.

Padded query rows never reach the output (each token's MLP, LayerNorm and
residual are per token, and the pooling skips them), so the result equals the
input model up to float summation order.  The script checks that in ONNX
Runtime on a seeded random batch and writes the output only if the max
relative error max|a-b|/max|b| is within --tolerance and every argmax agrees.

--no_mask reproduces the guide's flawed padding for comparison: the same zero
tokens and 208-token Reshapes, the bias padded with zeros (padded keys are not
masked and take softmax weight), no mask Add where a block has no bias, and
the pooling Slice left as exported (ends=INT64_MAX), so the mean runs over
tokens 1..207: the 196 real patch tokens and the 11 padded ones.  Its
verification numbers are printed but do not stop the output from being written.

Patterns are found structurally, from anchor ops (the graph input, the Conv,
each Softmax, the pooling ReduceMean), never by node names.  A graph that does
not fit (not a BEiT, already padded, dynamic batch) is refused with a message
naming the missing pattern, and no output file is written.

Usage (the guide's positional arguments)::

    python3 graph_modify.py beit_base_bs8_sim.onnx beit_base_bs8_sim_modify.onnx 8
"""

import argparse
import os
import sys
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

import beit_io
import onnx_check

# Large, exact and finite in fp16 (a multiple of 16 below 2^15), so that atc's
# fp16 conversion keeps it as is.  Scores added to it stay far from fp16's limit
# of 65504 (-65504 would overflow to -inf as soon as a negative score is added,
# and -inf arithmetic inside a softmax kernel can give NaN), while exp(-30000 + s)
# is exactly 0 in fp32 (below ~-104) and in fp16 (below ~-17).  No row is fully
# masked: the real keys never are, so every softmax row keeps a finite maximum.
MASK_VALUE = -30000.0
DEFAULT_PAD_TO = 16
DEFAULT_TOLERANCE = onnx_check.DEFAULT_TOLERANCE
MIN_OPSET = 11
VERIFY_SEED = 0
# Ops that lie between the qkv Reshape and the q/k/v operands of the attention MatMuls.
_QKV_WALK_OPS = ("Transpose", "Split", "Squeeze", "Gather", "Slice", "Mul", "Div")


class PatternError(Exception):
    """The graph lacks a pattern the rewrite relies on, or it is not as expected."""

    def __init__(self, pattern, detail):
        super().__init__(f"pattern '{pattern}' not found: {detail}")
        self.pattern = pattern


# ---------------------------------------------------------------- graph index

class GraphIndex:
    """Producers, consumers, constants and inferred shapes of one graph."""

    def __init__(self, model):
        self.model = model
        self.graph = model.graph
        self.refresh()

    def refresh(self):
        g = self.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer = {}
        self.consumers = defaultdict(list)
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        inferred = infer_shapes(self.model)
        self.shapes = {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for t in g.initializer:
            self.shapes[t.name] = list(t.dims)
        self.names = set(self.inits) | set(self.producer) | {i.name for i in g.input}
        self.names |= {n.name for n in g.node}

    def shape(self, name):
        return self.shapes.get(name)

    def const(self, name):
        """The value of an initializer or Constant-node output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    return np.asarray(helper.get_attribute_value(attr))
        return None

    def is_const(self, name):
        return self.const(name) is not None

    def sole_consumer(self, name, op_types, pattern):
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in op_types:
            found = ", ".join(f"{u.op_type}" for u in users) or "nothing"
            raise PatternError(pattern, f"'{name}' should feed exactly one {'/'.join(op_types)}, "
                                        f"but feeds {found}")
        return users[0]

    def unique_name(self, base):
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_const(self, base, array):
        name = self.unique_name(base)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def downstream(self, start):
        """Every node reachable from tensor ``start``."""
        seen, todo, order = set(), [start], []
        while todo:
            for node in self.consumers.get(todo.pop(), []):
                if id(node) not in seen:
                    seen.add(id(node))
                    order.append(node)
                    todo.extend(node.output)
        return order


def weightless_copy(model):
    """The model with its large float weights turned into typed graph inputs.

    Shape inference needs the values of shape constants but only the shapes of
    weights; serializing a 330 MB model for every inference pass would dominate
    the run time.
    """
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    g = light.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    declared = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        if size <= 64 or t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            g.initializer.append(t)
        elif t.name not in declared:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return light


def infer_shapes(model, strict=False):
    return onnx.shape_inference.infer_shapes(weightless_copy(model), check_type=strict, strict_mode=strict)


def attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_version(model):
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def reduce_axes(gi, node):
    """ReduceMean axes, from the attribute (opset < 18) or the second input."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = gi.const(node.input[1])
        axes = None if value is None else value.tolist()
    return axes


def insert_before(graph, anchor, new_node):
    """Insert ``new_node`` right before ``anchor`` so the node list stays topologically sorted."""
    nodes = list(graph.node)
    idx = next(i for i, n in enumerate(nodes) if n is anchor)
    graph.node.insert(idx, new_node)


# ---------------------------------------------------------------- patterns

def check_input_batch(gi, batch_size):
    """The single image input, with a static batch equal to BATCH_SIZE."""
    pattern = "static image input (B, 3, H, W)"
    inputs = [i for i in gi.graph.input if i.name not in gi.inits]
    if len(inputs) != 1:
        raise PatternError(pattern, f"the graph has {len(inputs)} inputs, expected one image input")
    inp = inputs[0]
    dims = inp.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise PatternError(pattern, f"input '{inp.name}' has rank {len(dims)}, expected 4")
    batch = dims[0]
    if not batch.HasField("dim_value"):
        label = batch.dim_param or "?"
        fixed = ",".join([str(batch_size)] + [str(d.dim_value) if d.HasField("dim_value") else "?" for d in dims[1:]])
        raise PatternError(pattern, f"input '{inp.name}' has a dynamic batch dimension '{label}'; "
                                    f"simplify with a fixed batch first: python3 -m onnxsim IN OUT "
                                    f"--overwrite-input-shape {fixed}")
    if batch.dim_value != batch_size:
        raise PatternError(pattern, f"input '{inp.name}' has batch {batch.dim_value} but BATCH_SIZE is "
                                    f"{batch_size}; pass {batch.dim_value} or re-simplify the model")
    return inp.name


def find_token_concat(gi, input_name, batch_size):
    """graph input -> Conv -> Reshape/Flatten -> Transpose -> cls Concat.  Returns (concat, T, D)."""
    pattern = "patch embedding + cls-token Concat"
    convs = [n for n in gi.consumers.get(input_name, []) if n.op_type == "Conv"]
    if len(convs) != 1:
        raise PatternError(pattern, f"the input should feed exactly one Conv (the patch embedding), "
                                    f"found {len(convs)}")
    conv = convs[0]
    cshape = gi.shape(conv.output[0])
    if not cshape or len(cshape) != 4 or None in cshape:
        raise PatternError(pattern, f"the Conv output has no static (B, D, h, w) shape ({cshape})")
    _, dim, h, w = cshape
    flat = gi.sole_consumer(conv.output[0], ("Reshape", "Flatten"), pattern)
    if gi.shape(flat.output[0]) != [batch_size, dim, h * w]:
        raise PatternError(pattern, f"{flat.op_type} after the Conv gives {gi.shape(flat.output[0])}, "
                                    f"expected {[batch_size, dim, h * w]}")
    trans = gi.sole_consumer(flat.output[0], ("Transpose",), pattern)
    if list(attr(trans, "perm", [])) != [0, 2, 1]:
        raise PatternError(pattern, f"the Transpose after the patch Reshape has perm {attr(trans, 'perm')}, "
                                    "expected [0, 2, 1]")
    concat = gi.sole_consumer(trans.output[0], ("Concat",), pattern)
    if attr(concat, "axis") not in (1, -2) or len(concat.input) != 2:
        raise PatternError(pattern, f"the token Concat has axis {attr(concat, 'axis')} and {len(concat.input)} "
                                    "inputs, expected axis 1 and two inputs (cls token, patches)")
    other = [i for i in concat.input if i != trans.output[0]]
    if len(other) != 1 or gi.shape(other[0]) != [batch_size, 1, dim]:
        raise PatternError(pattern, f"the cls token input of the Concat has shape "
                                    f"{gi.shape(other[0]) if other else None}, expected {[batch_size, 1, dim]}")
    tokens = h * w + 1
    if gi.shape(concat.output[0]) != [batch_size, tokens, dim]:
        raise PatternError(pattern, f"the token Concat gives {gi.shape(concat.output[0])}, "
                                    f"expected {[batch_size, tokens, dim]}")
    for user in gi.consumers.get(concat.output[0], []):
        if user.op_type == "Concat" and attr(user, "axis") in (1, -2):
            grown = gi.shape(user.output[0])
            raise PatternError("unpadded token stream",
                               f"the cls-token Concat ({tokens} tokens) is already followed by a padding "
                               f"Concat to {grown[1] if grown else '?'} tokens: the graph was already modified")
    return concat, tokens, dim


def walk_to_reshape(gi, name, pattern):
    """From a q/k/v operand back through Transpose/Split/Squeeze/... to the qkv Reshape."""
    for _ in range(16):
        node = gi.producer.get(name)
        if node is None:
            break
        if node.op_type == "Reshape":
            return node
        if node.op_type not in _QKV_WALK_OPS:
            break
        live = [i for i in node.input[:2] if i and not gi.is_const(i)] if node.op_type in ("Mul", "Div") \
            else [node.input[0]]
        if len(live) != 1:
            break
        name = live[0]
    raise PatternError(pattern, f"no qkv Reshape above the attention operand '{name}' "
                                f"(walking through {', '.join(_QKV_WALK_OPS)})")


def find_attention(gi, softmax, batch_size, tokens):
    """One attention block, anchored on its Softmax.

    Returns dict(softmax, bias_add, bias_input, qkv_reshapes, out_reshape).
    """
    pattern = "attention block (MatMul -> [Add bias] -> Softmax -> MatMul -> Transpose -> Reshape)"
    sshape = gi.shape(softmax.input[0])
    if not sshape or len(sshape) != 4 or sshape[0] != batch_size or sshape[2:] != [tokens, tokens]:
        raise PatternError(pattern, f"Softmax input has shape {sshape}, expected "
                                    f"[{batch_size}, H, {tokens}, {tokens}]")
    axis = attr(softmax, "axis", -1 if opset_version(gi.model) >= 13 else 1)
    if axis not in (3, -1):
        raise PatternError(pattern, f"Softmax axis is {axis}, expected the key axis (3 or -1)")
    heads = sshape[1]
    prod = gi.producer.get(softmax.input[0])
    bias_add = bias_input = None
    if prod is not None and prod.op_type == "Add":
        consts = [i for i in prod.input if gi.is_const(i)]
        live = [i for i in prod.input if not gi.is_const(i)]
        if len(consts) != 1 or len(live) != 1:
            raise PatternError(pattern, "the Add before a Softmax should add one constant bias to the scores; "
                                        f"it has {len(consts)} constant inputs")
        bias = gi.const(consts[0])
        if bias.ndim < 2 or bias.ndim > 4 or list(bias.shape[-2:]) != [tokens, tokens] \
                or any(d not in (1, heads) for d in bias.shape[:-2][-1:]) \
                or any(d != 1 for d in bias.shape[:-3]):
            raise PatternError(pattern, f"the attention bias constant has shape {list(bias.shape)}, expected "
                                        f"(1, {heads}, {tokens}, {tokens}) or ({heads}, {tokens}, {tokens})")
        bias_add, bias_input = prod, consts[0]
        scores = gi.producer.get(live[0])
    else:
        scores = prod
    if scores is None or scores.op_type != "MatMul":
        raise PatternError(pattern, f"the scores before a Softmax come from "
                                    f"{scores.op_type if scores is not None else 'nowhere'}, expected a MatMul")
    attn_v = gi.sole_consumer(softmax.output[0], ("MatMul",), pattern)
    if attn_v.input[0] != softmax.output[0]:
        raise PatternError(pattern, "the Softmax output should be the left operand of the attention @ v MatMul")
    # ids, not names: node names are optional in ONNX and never relied on here
    qkv = {id(walk_to_reshape(gi, scores.input[0], pattern)),
           id(walk_to_reshape(gi, scores.input[1], pattern)),
           id(walk_to_reshape(gi, attn_v.input[1], pattern))}
    trans = gi.sole_consumer(attn_v.output[0], ("Transpose",), pattern)
    if list(attr(trans, "perm", [])) != [0, 2, 1, 3]:
        raise PatternError(pattern, f"the Transpose after attention @ v has perm {attr(trans, 'perm')}, "
                                    "expected [0, 2, 1, 3]")
    out_reshape = gi.sole_consumer(trans.output[0], ("Reshape",), pattern)
    oshape = gi.shape(out_reshape.output[0])
    if not oshape or len(oshape) != 3 or oshape[:2] != [batch_size, tokens]:
        raise PatternError(pattern, f"the attention-output Reshape gives {oshape}, "
                                    f"expected [{batch_size}, {tokens}, D]")
    return dict(softmax=softmax, bias_add=bias_add, bias_input=bias_input,
                qkv_reshapes=qkv, out_reshape=id(out_reshape))


def find_pooling(gi, after, tokens):
    """The token pooling before the head: Slice [1:] + ReduceMean(axis 1), or a cls-token Gather."""
    pattern = "token pooling (Slice [1:] + ReduceMean over axis 1, before the head Gemm/MatMul)"
    found = []
    for node in gi.downstream(after):
        ishape = gi.shape(node.input[0]) if node.input else None
        if not ishape or len(ishape) != 3 or ishape[1] not in (tokens, tokens - 1):
            continue
        if node.op_type == "ReduceMean":
            axes = reduce_axes(gi, node)
            if axes is not None and any(a % 3 == 1 for a in axes):
                found.append(("mean", node))
        elif node.op_type == "Gather" and attr(node, "axis", 0) in (1, -2):
            found.append(("cls", node))
    if len(found) != 1:
        raise PatternError(pattern, f"expected one pooling over the token axis, found {len(found)}")
    kind, node = found[0]
    if kind == "cls":
        index = gi.const(node.input[1])
        if index is None or index.size != 1 or int(index.reshape(-1)[0]) != 0:
            raise PatternError(pattern, "the Gather over the token axis does not pick the cls token (index 0)")
        slice_node = None
    else:
        if list(reduce_axes(gi, node)) not in ([1], [-2]):
            raise PatternError(pattern, f"the pooling ReduceMean has axes {reduce_axes(gi, node)}, expected [1]")
        slice_node = gi.producer.get(node.input[0])
        if slice_node is not None and slice_node.op_type == "Slice":
            vals = [gi.const(i) if i else None for i in slice_node.input[1:5]]
            starts, ends, axes = vals[0], vals[1], vals[2]
            steps = vals[3] if len(vals) > 3 else None
            if starts is None or ends is None or starts.size != 1 or ends.size != 1 \
                    or axes is None or axes.reshape(-1)[0] % 3 != 1 \
                    or (steps is not None and int(steps.reshape(-1)[0]) != 1):
                raise PatternError(pattern, "the Slice before the pooling ReduceMean should take tokens "
                                            "[start:end] on axis 1 with step 1 and constant bounds")
            if int(ends.reshape(-1)[0]) < tokens:
                raise PatternError(pattern, f"the pooling Slice ends at {int(ends.reshape(-1)[0])}, "
                                            f"before the last token {tokens}")
        elif gi.shape(node.input[0])[1] == tokens:
            slice_node = None  # mean over all tokens: a Slice [0:T] will be inserted
        else:
            raise PatternError(pattern, "the pooling ReduceMean reads neither a Slice nor the token stream")
    if not _reaches_head(gi, node):
        raise PatternError(pattern, "no head Gemm/MatMul follows the pooling on the way to the graph output")
    return kind, node, slice_node


def _reaches_head(gi, node):
    outputs = {o.name for o in gi.graph.output}
    for later in gi.downstream(node.output[0]):
        if later.op_type in ("Gemm", "MatMul") and (
                set(later.output) & outputs or any(set(n.output) & outputs
                                                   for n in gi.downstream(later.output[0]))):
            return True
    return False


# ---------------------------------------------------------------- rewrite

def padded_bias(bias, tokens, padded, masked):
    """(…, T, T) bias -> (1, H, P, P): the real block kept, padded keys masked, padded query rows 0."""
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    out = np.zeros(bias.shape[:2] + (padded, padded), dtype=bias.dtype)
    out[..., :tokens, :tokens] = bias
    if masked:
        out[..., :, tokens:] = MASK_VALUE
    return out


def mask_only(tokens, padded, dtype=np.float32):
    out = np.zeros((1, 1, padded, padded), dtype=dtype)
    out[..., :, tokens:] = MASK_VALUE
    return out


def modify(model, batch_size, pad_to=DEFAULT_PAD_TO, mask=True):
    """Pad the token axis of a simplified BEiT graph in place.

    Returns (counts, tokens, padded): counts per rewritten pattern.
    Raises PatternError when the graph does not fit.
    """
    opset = opset_version(model)
    if opset is None or opset < MIN_OPSET:
        raise PatternError("opset >= 11", f"the graph uses opset {opset}")
    gi = GraphIndex(model)
    input_name = check_input_batch(gi, batch_size)
    concat, tokens, dim = find_token_concat(gi, input_name, batch_size)
    padded = -(-tokens // pad_to) * pad_to
    if padded == tokens:
        raise PatternError("unpadded token stream", f"{tokens} tokens are already a multiple of {pad_to}")
    stream = concat.output[0]
    if stream in {o.name for o in gi.graph.output}:
        raise PatternError("token stream", "the token Concat output is a graph output")
    downstream = gi.downstream(stream)

    softmaxes = [n for n in downstream if n.op_type == "Softmax"]
    if not softmaxes:
        raise PatternError("attention Softmax", "no Softmax after the token Concat")
    blocks = [find_attention(gi, sm, batch_size, tokens) for sm in softmaxes]
    qkv_ids = set().union(*(b["qkv_reshapes"] for b in blocks))
    out_ids = {b["out_reshape"] for b in blocks}
    if len(out_ids) != len(blocks) or len(qkv_ids) != len(blocks):
        raise PatternError("one Softmax per block",
                           f"{len(blocks)} Softmax nodes but {len(qkv_ids)} qkv Reshapes and "
                           f"{len(out_ids)} attention-output Reshapes")
    pool_kind, pool_node, pool_slice = find_pooling(gi, stream, tokens)

    # Per-token constants added to the stream (an absolute position embedding (1, T, D)): padded with zeros.
    token_consts = []
    for node in downstream:
        if node.op_type not in ("Add", "Sub", "Mul") or len(node.input) != 2:
            continue
        consts = [i for i in node.input if gi.is_const(i)]
        if len(consts) != 1:
            continue
        value = gi.const(consts[0])
        other = gi.shape(next(i for i in node.input if i != consts[0]))
        if value.ndim >= 2 and value.shape[-2] == tokens and other and len(other) == 3 and other[1] == tokens:
            if value.ndim != 3 or value.shape[0] != 1:
                raise PatternError("per-token constant (1, T, D)", f"{node.op_type} '{node.name}' uses a constant "
                                                                   f"of shape {list(value.shape)}")
            token_consts.append((node, consts[0], value))

    # Every shape constant downstream that holds the token count must be a Reshape on the token axis.
    reshape_plan = []
    for node in downstream:
        if node.op_type != "Reshape":
            continue
        shape = gi.const(node.input[1])
        if shape is None:
            raise PatternError("constant Reshape shapes", f"Reshape '{node.name}' computes its shape at run "
                                                          "time; simplify the graph with onnxsim first")
        if tokens not in shape.tolist():
            continue
        ishape = gi.shape(node.input[0])
        if shape.ndim != 1 or shape.tolist().count(tokens) != 1 or shape[1] != tokens \
                or not ishape or len(ishape) < 2 or ishape[1] != tokens:
            raise PatternError("token-axis Reshape", f"Reshape '{node.name}' has shape {shape.tolist()} on input "
                                                     f"{ishape}; {tokens} is expected once, on axis 1")
        reshape_plan.append((node, shape))

    counts = defaultdict(int)
    exempt = set()  # constants that carry the token count on purpose (the pooling end)
    # 1. the padding itself
    zeros = np.zeros((batch_size, padded - tokens, dim), dtype=np.float32)
    pad_name = gi.add_const("graph_modify_token_pad", zeros)
    padded_stream = gi.unique_name(stream + "_padded")
    pad_node = helper.make_node("Concat", [stream, pad_name], [padded_stream], axis=1,
                                name=gi.unique_name("graph_modify_pad_tokens"))
    for user in list(gi.consumers[stream]):
        for k, inp in enumerate(user.input):
            if inp == stream:
                user.input[k] = padded_stream
    idx = next(i for i, n in enumerate(gi.graph.node) if n is concat)
    gi.graph.node.insert(idx + 1, pad_node)
    counts["token padding Concat"] += 1

    # 2. attention: pad (and mask) the bias, or insert a mask Add
    new_bias = {}
    for b in blocks:
        if b["bias_add"] is not None:
            old = b["bias_input"]
            if old not in new_bias:
                value = padded_bias(gi.const(old), tokens, padded, mask)
                new_bias[old] = gi.add_const(f"{old}_padded{padded}", value)
            node = b["bias_add"]
            for k, inp in enumerate(node.input):
                if inp == old:
                    node.input[k] = new_bias[old]
            counts["attention bias padded" + (" + masked" if mask else " (zeros)")] += 1
        elif mask:
            sm = b["softmax"]
            if "mask" not in new_bias:
                new_bias["mask"] = gi.add_const("graph_modify_key_mask", mask_only(tokens, padded))
            masked = gi.unique_name(sm.input[0] + "_masked")
            add = helper.make_node("Add", [sm.input[0], new_bias["mask"]], [masked],
                                   name=gi.unique_name("graph_modify_mask_add"))
            insert_before(gi.graph, sm, add)
            sm.input[0] = masked
            counts["attention mask Add inserted"] += 1
        else:
            counts["attention without bias (left unmasked)"] += 1

    for node, name, value in token_consts:
        grown = np.zeros((1, padded, value.shape[2]), dtype=value.dtype)
        grown[:, :tokens] = value
        new_name = gi.add_const(f"{name}_padded{padded}", grown)
        node.input[list(node.input).index(name)] = new_name
        counts["per-token constant (position embedding) padded"] += 1

    # 3. Reshapes that name the token count
    for node, shape in reshape_plan:
        new = shape.copy()
        new[1] = padded
        node.input[1] = gi.add_const(f"{node.input[1]}_tokens{padded}", new.astype(shape.dtype))
        kind = "qkv" if id(node) in qkv_ids else "attention-output" if id(node) in out_ids else "other"
        counts[f"{kind} Reshape {tokens}->{padded}"] += 1

    # 4. the pooling
    if pool_kind == "cls":
        counts["pooling: cls-token Gather (unchanged)"] += 1
    elif not mask:
        counts["pooling: mean left over all tokens (guide)"] += 1
    elif pool_slice is not None:
        ends = gi.const(pool_slice.input[2])
        pool_slice.input[2] = gi.add_const(f"{pool_slice.input[2]}_end{tokens}",
                                           np.array([tokens], dtype=ends.dtype))
        exempt.add(pool_slice.input[2])
        counts[f"pooling Slice end -> {tokens}"] += 1
    else:
        cut = gi.unique_name(pool_node.input[0] + "_real_tokens")
        starts = gi.add_const("graph_modify_pool_starts", np.array([0], np.int64))
        ends = gi.add_const("graph_modify_pool_ends", np.array([tokens], np.int64))
        exempt.add(ends)
        axes = gi.add_const("graph_modify_pool_axes", np.array([1], np.int64))
        sl = helper.make_node("Slice", [pool_node.input[0], starts, ends, axes], [cut],
                              name=gi.unique_name("graph_modify_pool_slice"))
        insert_before(gi.graph, pool_node, sl)
        pool_node.input[0] = cut
        counts[f"pooling Slice [0:{tokens}] inserted"] += 1

    drop_unused_initializers(model)
    check_result(model, batch_size, tokens, padded, pad_node.output[0], exempt)
    return dict(counts), tokens, padded


def drop_unused_initializers(model):
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def check_result(model, batch_size, tokens, padded, padded_stream, exempt):
    """onnx.checker, strict shape inference, and no token count of 197 left on the padded stream."""
    del model.graph.value_info[:]
    try:
        onnx.checker.check_model(model)
        inferred = infer_shapes(model, strict=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PatternError("valid rewritten graph", f"the rewritten graph fails the ONNX checks: {exc}") from exc
    model.graph.value_info.extend(inferred.graph.value_info)
    gi = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type == "Softmax":
            shape = gi.shape(node.input[0])
            if not shape or shape[0] != batch_size or shape[2:] != [padded, padded]:
                raise PatternError("padded attention", f"after the rewrite a Softmax input has shape {shape}, "
                                                       f"expected [{batch_size}, H, {padded}, {padded}]")
    for node in gi.downstream(padded_stream):
        for inp in node.input:
            value = gi.const(inp) if inp else None
            if value is None or inp in exempt:
                continue
            if tokens in value.shape or (value.dtype.kind in "iu" and value.size <= 8 and tokens in value):
                raise PatternError("no token count left",
                                   f"{node.op_type} '{node.name}' still carries {tokens} in constant '{inp}' "
                                   f"(shape {list(value.shape)}); this graph has a pattern graph_modify "
                                   "does not know")


# ---------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pad BEiT's token axis 197 -> 208 in a simplified ONNX graph, "
                                            "exactly (masked attention, pooling over the real tokens).")
    p.add_argument("input", help="simplified ONNX model with a fixed batch (output of python3 -m onnxsim)")
    p.add_argument("output", help="where to write the padded ONNX model (written only after verification)")
    p.add_argument("batch_size", type=int, help="the static batch size the model was simplified with")
    p.add_argument("--pad_to", type=int, default=DEFAULT_PAD_TO,
                   help="pad the token count up to a multiple of this (default 16: 197 -> 208)")
    p.add_argument("--no_mask", action="store_true",
                   help="reproduce the guide's flawed padding: zero tokens, no key mask, pooling over all "
                        "tokens; verification is reported but not enforced")
    p.add_argument("--no_verify", action="store_true",
                   help="skip the ONNX Runtime comparison with the input model")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="largest max|a-b|/max|b| accepted between output and input model (default 1e-5)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("BATCH_SIZE must be at least 1")
    if args.pad_to < 1:
        p.error("--pad_to must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.input):
        print(f"error: {args.input}: ONNX model not found", file=sys.stderr)
        return 2
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        print(f"error: {args.output}: output folder {folder} does not exist", file=sys.stderr)
        return 2
    try:
        model = onnx.load(args.input)
    except Exception as exc:  # protobuf raises DecodeError and others for non-ONNX files
        print(f"error: {args.input}: not a readable ONNX model ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    try:
        counts, tokens, padded = modify(model, args.batch_size, args.pad_to, mask=not args.no_mask)
    except PatternError as exc:
        print(f"error: {args.input}: {exc}; nothing written", file=sys.stderr)
        return 2
    mode = "masked (exact)" if not args.no_mask else "NOT masked (--no_mask, the guide's padding)"
    print(f"graph_modify: {args.input}: tokens {tokens} -> {padded} at batch size {args.batch_size}, "
          f"opset {opset_version(model)}, {mode}")
    for name, count in counts.items():
        print(f"  {name:<44} {count}")
    data = model.SerializeToString()
    with beit_io.temporary_beside(args.output) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        if not args.no_verify:
            try:
                errors = onnx_check.compare_models(args.input, tmp, args.batch_size, seed=VERIFY_SEED)
            except onnx_check.OnnxCheckError as exc:
                print(f"error: {args.input}: cannot verify the padded graph ({exc}); nothing written",
                      file=sys.stderr)
                return 1
            err, same = errors["max_rel"], round(errors["argmax_agreement"] * errors["rows"])
            print(f"verify (ONNX Runtime fp32, seed {VERIFY_SEED}, batch {args.batch_size}): "
                  f"max rel err {err:.3e} (tolerance {args.tolerance:g}), argmax identical {same}/{errors['rows']}")
            # max_rel is inf when an output is not finite.
            ok = err <= args.tolerance and errors["argmax_equal"]
            if not ok and not args.no_mask:
                print(f"error: {args.input}: the padded graph does not reproduce the input model "
                      f"(max rel err {err:.3e}, argmax identical {same}/{errors['rows']}); nothing written",
                      file=sys.stderr)
                return 1
            if not ok:
                print("note: --no_mask output differs from the input model, as the guide's padding does")
        beit_io.publish_temporary(tmp, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
