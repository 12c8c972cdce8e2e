"""BEiT's patterns in a simplified ONNX graph, found from anchor ops and gathered into a PaddingPlan.

Like ONNX Runtime's fusion passes, each pattern is found from an anchor (the
graph input, the patch-embedding Conv, each Softmax, the pooling ReduceMean),
never by node names, and every assumption the rewrite relies on is checked here,
before padding.py changes anything.  A graph that does not fit raises
PatternError naming the missing pattern.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
from onnx import NodeProto

from beit_pipeline.graph.index import GraphIndex, PatternError, attr, node_key, opset_version, reduce_axes

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 11
# Ops that lie between the qkv Reshape and the q/k/v operands of the attention MatMuls.
QKV_WALK_OPS = ("Transpose", "Split", "Squeeze", "Gather", "Slice", "Mul", "Div")
ATTENTION = "attention block (MatMul -> [Add bias] -> Softmax -> MatMul -> Transpose -> Reshape)"
POOLING = "token pooling (Slice [1:] + ReduceMean over axis 1, before the head Gemm/MatMul)"
PATCHES = "patch embedding + cls-token Concat"


@dataclass
class TokenStream:
    """The cls-token Concat whose output (B, tokens, dim) is the token stream, and its padded length."""
    concat: NodeProto
    batch_size: int
    tokens: int
    padded: int
    dim: int

    @property
    def name(self) -> str:
        return self.concat.output[0]


@dataclass
class AttentionBlock:
    """One attention block, anchored on its Softmax; ``bias_add`` is None when no bias is added."""
    softmax: NodeProto
    bias_add: Optional[NodeProto]
    bias_input: Optional[str]
    qkv_reshapes: tuple  # of Reshape NodeProtos, usually one that q, k and v all come from
    out_reshape: NodeProto


@dataclass
class Pooling:
    """``kind`` "mean" (ReduceMean, reading ``slice`` or, when None, the whole stream) or "cls" (Gather)."""
    kind: str
    node: NodeProto
    slice: Optional[NodeProto]


@dataclass
class TokenConstant:
    """A per-token constant (1, T, D) combined with the stream, e.g. an absolute position embedding."""
    node: NodeProto
    name: str
    value: np.ndarray


@dataclass
class TokenReshape:
    """A Reshape whose shape constant holds the token count on axis 1; ``role`` qkv / attention-output / other."""
    node: NodeProto
    shape: np.ndarray
    role: str


@dataclass
class KeyBranch:
    """The key tensor (B, H, T, hd) of one attention, read by the Transpose that makes k^T for q @ k^T."""
    tensor: str
    transpose: NodeProto
    heads: int
    head_dim: int


@dataclass
class PaddingPlan:
    """Everything the padding rewrites touch, found and checked before any of them runs."""
    stream: TokenStream
    blocks: list[AttentionBlock]
    pooling: Pooling
    token_constants: list[TokenConstant] = field(default_factory=list)
    token_reshapes: list[TokenReshape] = field(default_factory=list)
    key_branches: list[KeyBranch] = field(default_factory=list)  # filled for the guide's padding only


def plan_padding(model: onnx.ModelProto, batch_size: int, pad_to: int,
                 keys: bool = False) -> tuple[GraphIndex, PaddingPlan]:
    """(GraphIndex, PaddingPlan) of a simplified BEiT graph; PatternError when it does not fit.

    ``keys``: also find each attention's key branch (the guide's padding zeroes the padded keys there).
    """
    opset = opset_version(model)
    if opset is None or opset < MIN_OPSET:
        raise PatternError(f"opset >= {MIN_OPSET}", f"the graph uses opset {opset}")
    gi = GraphIndex(model)
    stream = find_token_stream(gi, check_input_batch(gi, batch_size), batch_size, pad_to)
    downstream = gi.downstream(stream.name)
    blocks = find_attention_blocks(gi, downstream, stream)
    pooling = find_pooling(gi, stream.name, stream.tokens)
    plan = PaddingPlan(stream, blocks, pooling, find_token_constants(gi, downstream, stream.tokens),
                       find_token_reshapes(gi, downstream, stream.tokens, blocks))
    if keys:
        plan.key_branches = [find_key_branch(gi, block, stream) for block in blocks]
    return gi, plan


# ---------------------------------------------------------------- input and token stream

def check_input_batch(gi: GraphIndex, batch_size: int) -> str:
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


def find_token_stream(gi: GraphIndex, input_name: str, batch_size: int, pad_to: int) -> TokenStream:
    """graph input -> Conv -> Reshape/Flatten -> Transpose -> cls Concat, not yet padded."""
    patches, dim, count = _patch_embedding(gi, input_name, batch_size)
    concat = _cls_concat(gi, patches, batch_size, dim, count + 1)
    tokens = count + 1
    padded = -(-tokens // pad_to) * pad_to
    if padded == tokens:
        raise PatternError("unpadded token stream", f"{tokens} tokens are already a multiple of {pad_to}")
    if concat.output[0] in gi.output_names():
        raise PatternError("token stream", "the token Concat output is a graph output")
    return TokenStream(concat, batch_size, tokens, padded, dim)


def _patch_embedding(gi, input_name, batch_size):
    """(Transpose giving (B, h*w, D), D, h*w) after the patch-embedding Conv."""
    convs = [n for n in gi.consumers.get(input_name, []) if n.op_type == "Conv"]
    if len(convs) != 1:
        raise PatternError(PATCHES, f"the input should feed exactly one Conv (the patch embedding), "
                                    f"found {len(convs)}")
    cshape = gi.shape(convs[0].output[0])
    if not cshape or len(cshape) != 4 or None in cshape:
        raise PatternError(PATCHES, f"the Conv output has no static (B, D, h, w) shape ({cshape})")
    _, dim, h, w = cshape
    flat = gi.sole_consumer(convs[0].output[0], ("Reshape", "Flatten"), PATCHES)
    if gi.shape(flat.output[0]) != [batch_size, dim, h * w]:
        raise PatternError(PATCHES, f"{flat.op_type} after the Conv gives {gi.shape(flat.output[0])}, "
                                    f"expected {[batch_size, dim, h * w]}")
    trans = gi.sole_consumer(flat.output[0], ("Transpose",), PATCHES)
    if list(attr(trans, "perm", [])) != [0, 2, 1]:
        raise PatternError(PATCHES, f"the Transpose after the patch Reshape has perm {attr(trans, 'perm')}, "
                                    "expected [0, 2, 1]")
    return trans, dim, h * w


def _cls_concat(gi, patches, batch_size, dim, tokens):
    """The Concat of the cls token (B, 1, D) and the patches along axis 1, giving (B, tokens, D)."""
    concat = gi.sole_consumer(patches.output[0], ("Concat",), PATCHES)
    if attr(concat, "axis") not in (1, -2) or len(concat.input) != 2:
        raise PatternError(PATCHES, f"the token Concat has axis {attr(concat, 'axis')} and {len(concat.input)} "
                                    "inputs, expected axis 1 and two inputs (cls token, patches)")
    other = [i for i in concat.input if i != patches.output[0]]
    if len(other) != 1 or gi.shape(other[0]) != [batch_size, 1, dim]:
        raise PatternError(PATCHES, f"the cls token input of the Concat has shape "
                                    f"{gi.shape(other[0]) if other else None}, expected {[batch_size, 1, dim]}")
    if gi.shape(concat.output[0]) != [batch_size, tokens, dim]:
        raise PatternError(PATCHES, f"the token Concat gives {gi.shape(concat.output[0])}, "
                                    f"expected {[batch_size, tokens, dim]}")
    for user in gi.consumers.get(concat.output[0], []):
        if user.op_type == "Concat" and attr(user, "axis") in (1, -2):
            grown = gi.shape(user.output[0])
            raise PatternError("unpadded token stream",
                               f"the cls-token Concat ({tokens} tokens) is already followed by a padding "
                               f"Concat to {grown[1] if grown else '?'} tokens: the graph was already modified")
    return concat


# ---------------------------------------------------------------- attention

def find_attention_blocks(gi: GraphIndex, downstream: list[NodeProto], stream: TokenStream) -> list[AttentionBlock]:
    """One AttentionBlock per Softmax after the token stream, each with its own qkv and output Reshape."""
    softmaxes = [n for n in downstream if n.op_type == "Softmax"]
    if not softmaxes:
        raise PatternError("attention Softmax", "no Softmax after the token Concat")
    blocks = [find_attention(gi, sm, stream.batch_size, stream.tokens) for sm in softmaxes]
    qkv = {node_key(r) for b in blocks for r in b.qkv_reshapes}
    out = {node_key(b.out_reshape) for b in blocks}
    if len(out) != len(blocks) or len(qkv) != len(blocks):
        raise PatternError("one Softmax per block",
                           f"{len(blocks)} Softmax nodes but {len(qkv)} qkv Reshapes and "
                           f"{len(out)} attention-output Reshapes")
    return blocks


def find_attention(gi: GraphIndex, softmax: NodeProto, batch_size: int, tokens: int) -> AttentionBlock:
    """The AttentionBlock anchored on ``softmax``."""
    sshape = gi.shape(softmax.input[0])
    if not sshape or len(sshape) != 4 or sshape[0] != batch_size or sshape[2:] != [tokens, tokens]:
        raise PatternError(ATTENTION, f"Softmax input has shape {sshape}, expected "
                                      f"[{batch_size}, H, {tokens}, {tokens}]")
    axis = attr(softmax, "axis", -1 if opset_version(gi.model) >= 13 else 1)
    if axis not in (3, -1):
        raise PatternError(ATTENTION, f"Softmax axis is {axis}, expected the key axis (3 or -1)")
    bias_add, bias_input, scores = _attention_bias(gi, softmax, tokens, sshape[1])
    if scores is None or scores.op_type != "MatMul":
        raise PatternError(ATTENTION, f"the scores before a Softmax come from "
                                      f"{scores.op_type if scores is not None else 'nowhere'}, expected a MatMul")
    attn_v = gi.sole_consumer(softmax.output[0], ("MatMul",), ATTENTION)
    if attn_v.input[0] != softmax.output[0]:
        raise PatternError(ATTENTION, "the Softmax output should be the left operand of the attention @ v MatMul")
    operands = (scores.input[0], scores.input[1], attn_v.input[1])
    qkv = {node_key(r): r for r in (walk_to_reshape(gi, name) for name in operands)}
    return AttentionBlock(softmax, bias_add, bias_input, tuple(qkv.values()),
                          _attention_output(gi, attn_v, batch_size, tokens))


def _attention_bias(gi, softmax, tokens, heads):
    """(bias Add or None, its constant input or None, the scores MatMul) before ``softmax``."""
    prod = gi.producer.get(softmax.input[0])
    if prod is None or prod.op_type != "Add":
        return None, None, prod
    consts = [i for i in prod.input if gi.is_const(i)]
    live = [i for i in prod.input if not gi.is_const(i)]
    if len(consts) != 1 or len(live) != 1:
        raise PatternError(ATTENTION, "the Add before a Softmax should add one constant bias to the scores; "
                                      f"it has {len(consts)} constant inputs")
    bias = gi.const(consts[0])
    if bias.ndim < 2 or bias.ndim > 4 or list(bias.shape[-2:]) != [tokens, tokens] \
            or any(d not in (1, heads) for d in bias.shape[:-2][-1:]) \
            or any(d != 1 for d in bias.shape[:-3]):
        raise PatternError(ATTENTION, f"the attention bias constant has shape {list(bias.shape)}, expected "
                                      f"(1, {heads}, {tokens}, {tokens}) or ({heads}, {tokens}, {tokens})")
    return prod, consts[0], gi.producer.get(live[0])


def _attention_output(gi, attn_v, batch_size, tokens):
    """attention @ v -> Transpose [0, 2, 1, 3] -> the Reshape back to (B, tokens, D)."""
    trans = gi.sole_consumer(attn_v.output[0], ("Transpose",), ATTENTION)
    if list(attr(trans, "perm", [])) != [0, 2, 1, 3]:
        raise PatternError(ATTENTION, f"the Transpose after attention @ v has perm {attr(trans, 'perm')}, "
                                      "expected [0, 2, 1, 3]")
    out_reshape = gi.sole_consumer(trans.output[0], ("Reshape",), ATTENTION)
    oshape = gi.shape(out_reshape.output[0])
    if not oshape or len(oshape) != 3 or oshape[:2] != [batch_size, tokens]:
        raise PatternError(ATTENTION, f"the attention-output Reshape gives {oshape}, "
                                      f"expected [{batch_size}, {tokens}, D]")
    return out_reshape


def walk_to_reshape(gi: GraphIndex, name: str) -> NodeProto:
    """From a q/k/v operand back through Transpose/Split/Squeeze/... to the qkv Reshape."""
    for _ in range(16):
        node = gi.producer.get(name)
        if node is None:
            break
        if node.op_type == "Reshape":
            return node
        if node.op_type not in QKV_WALK_OPS:
            break
        live = [i for i in node.input[:2] if i and not gi.is_const(i)] if node.op_type in ("Mul", "Div") \
            else [node.input[0]]
        if len(live) != 1:
            break
        name = live[0]
    raise PatternError(ATTENTION, f"no qkv Reshape above the attention operand '{name}' "
                                  f"(walking through {', '.join(QKV_WALK_OPS)})")


def scores_matmul(gi: GraphIndex, block: AttentionBlock) -> NodeProto:
    """The q @ k^T MatMul whose output (plus the bias, if any) the block's Softmax reads."""
    if block.bias_add is None:
        return gi.producer[block.softmax.input[0]]
    live = next(i for i in block.bias_add.input if i != block.bias_input)
    return gi.producer[live]


def find_key_branch(gi: GraphIndex, block: AttentionBlock, stream: TokenStream) -> KeyBranch:
    """The key tensor (B, H, T, hd) before the Transpose [0, 1, 3, 2] that feeds q @ k^T."""
    pattern = "attention key branch (k (B, H, T, hd) -> Transpose [0, 1, 3, 2] -> q @ k^T)"
    scores = scores_matmul(gi, block)
    trans = gi.producer.get(scores.input[1])
    if trans is None or trans.op_type != "Transpose" or list(attr(trans, "perm", [])) != [0, 1, 3, 2]:
        found = "nothing" if trans is None else f"{trans.op_type} {attr(trans, 'perm')}"
        raise PatternError(pattern, f"the right operand of the scores MatMul comes from {found}")
    shape = gi.shape(trans.input[0])
    if not shape or len(shape) != 4 or None in shape or shape[0] != stream.batch_size \
            or shape[2] != stream.tokens or shape[1] * shape[3] != stream.dim:
        raise PatternError(pattern, f"the key tensor has shape {shape}, expected "
                                    f"[{stream.batch_size}, H, {stream.tokens}, {stream.dim} / H]")
    return KeyBranch(trans.input[0], trans, shape[1], shape[3])


# ---------------------------------------------------------------- pooling

def find_pooling(gi: GraphIndex, after: str, tokens: int) -> Pooling:
    """The token pooling before the head: Slice [1:] + ReduceMean(axis 1), or a cls-token Gather."""
    found = _pooling_candidates(gi, after, tokens)
    if len(found) != 1:
        raise PatternError(POOLING, f"expected one pooling over the token axis, found {len(found)}")
    kind, node = found[0]
    if kind == "cls":
        index = gi.const(node.input[1])
        if index is None or index.size != 1 or int(index.reshape(-1)[0]) != 0:
            raise PatternError(POOLING, "the Gather over the token axis does not pick the cls token (index 0)")
        pooling = Pooling("cls", node, None)
    else:
        if list(reduce_axes(gi, node)) not in ([1], [-2]):
            raise PatternError(POOLING, f"the pooling ReduceMean has axes {reduce_axes(gi, node)}, expected [1]")
        pooling = Pooling("mean", node, _pooling_slice(gi, node, tokens))
    if not _reaches_head(gi, node):
        raise PatternError(POOLING, "no head Gemm/MatMul follows the pooling on the way to the graph output")
    return pooling


def _pooling_candidates(gi, after, tokens):
    """[(kind, node)] of the ReduceMeans and Gathers over the token axis after ``after``."""
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
    return found


def _pooling_slice(gi, mean, tokens):
    """The checked Slice [start:end] on axis 1 before the pooling ReduceMean, or None if it reads all tokens."""
    slice_node = gi.producer.get(mean.input[0])
    if slice_node is None or slice_node.op_type != "Slice":
        if gi.shape(mean.input[0])[1] == tokens:
            return None  # mean over all tokens: a Slice [0:T] will be inserted
        raise PatternError(POOLING, "the pooling ReduceMean reads neither a Slice nor the token stream")
    vals = [gi.const(i) if i else None for i in slice_node.input[1:5]]
    starts, ends, axes = vals[0], vals[1], vals[2]
    steps = vals[3] if len(vals) > 3 else None
    if starts is None or ends is None or starts.size != 1 or ends.size != 1 \
            or axes is None or axes.reshape(-1)[0] % 3 != 1 \
            or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        raise PatternError(POOLING, "the Slice before the pooling ReduceMean should take tokens "
                                    "[start:end] on axis 1 with step 1 and constant bounds")
    if int(ends.reshape(-1)[0]) < tokens:
        raise PatternError(POOLING, f"the pooling Slice ends at {int(ends.reshape(-1)[0])}, "
                                    f"before the last token {tokens}")
    return slice_node


def _reaches_head(gi, node):
    outputs = gi.output_names()
    for later in gi.downstream(node.output[0]):
        if later.op_type in ("Gemm", "MatMul") and (
                set(later.output) & outputs or any(set(n.output) & outputs
                                                   for n in gi.downstream(later.output[0]))):
            return True
    return False


# ---------------------------------------------------------------- per-token constants and Reshapes

def find_token_constants(gi: GraphIndex, downstream: list[NodeProto], tokens: int) -> list[TokenConstant]:
    """Per-token constants (1, T, D) added to, subtracted from or multiplied with the stream."""
    found = []
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
            found.append(TokenConstant(node, consts[0], value))
    return found


def find_token_reshapes(gi: GraphIndex, downstream: list[NodeProto], tokens: int,
                        blocks: list[AttentionBlock]) -> list[TokenReshape]:
    """Every Reshape downstream whose shape holds the token count, which must sit on axis 1."""
    qkv = {node_key(r) for b in blocks for r in b.qkv_reshapes}
    out = {node_key(b.out_reshape) for b in blocks}
    found = []
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
        role = "qkv" if node_key(node) in qkv else "attention-output" if node_key(node) in out else "other"
        found.append(TokenReshape(node, shape, role))
    return found
