"""The exact 197 -> 208 token padding of a simplified BEiT graph, as rewrite passes over a PaddingPlan.

graph_patterns.plan_padding finds and checks every pattern first; then each pass
here rewrites one kind of pattern and returns a Counter of what it changed
(graph_modify.py prints those counts).  Finally the graph is checked: ONNX
checker, strict shape inference, every Softmax at the padded size, and no
constant downstream of the padded stream still carrying the old token count.
modify_as_guide makes the guide's own graph instead (its four edits, unmasked),
for the fidelity report's guide_padding stage.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from beit_pipeline.graph import patterns as graph_patterns
from beit_pipeline.graph.index import GraphIndex, PatternError, check_graph, drop_unused_initializers, infer_shapes

if TYPE_CHECKING:
    from numpy.typing import DTypeLike

# Large, exact and finite in fp16 (a multiple of 16 below 2^15), so that atc's
# fp16 conversion keeps it as is.  Scores added to it stay far from fp16's limit
# of 65504 (-65504 would overflow to -inf as soon as a negative score is added,
# and -inf arithmetic inside a softmax kernel can give NaN), while exp(-30000 + s)
# is exactly 0 in fp32 (below ~-104) and in fp16 (below ~-17).  No row is fully
# masked: the real keys never are, so every softmax row keeps a finite maximum.
MASK_VALUE = -30000.0
DEFAULT_PAD_TO = 16


@dataclass
class PaddingResult:
    """What modify() did: counts per rewritten pattern (in the order done), token counts before and after."""
    counts: Counter
    tokens: int
    padded: int


def modify(model: onnx.ModelProto, batch_size: int, pad_to: int = DEFAULT_PAD_TO, mask: bool = True,
           guide: bool = False) -> PaddingResult:
    """Pad the token axis of a simplified BEiT graph in place; PatternError when the graph does not fit.

    ``guide``: the guide's own four edits instead (guide_passes); ``mask`` is then ignored.
    """
    if guide:
        return modify_as_guide(model, batch_size, pad_to)
    gi, plan = graph_patterns.plan_padding(model, batch_size, pad_to)
    # The stream pass comes first and also names the padded stream, which the final check follows.
    padded_stream = pad_token_stream(gi, plan)
    counts = Counter({"token padding Concat": 1})
    for rewrite in (pad_attention, pad_token_constants, pad_token_reshapes, restrict_pooling):
        counts.update(rewrite(gi, plan, mask))
    drop_unused_initializers(model)
    check_result(model, plan.stream, padded_stream, exempt={pooling_end(gi, plan, mask)} - {None})
    return PaddingResult(counts, plan.stream.tokens, plan.stream.padded)


def modify_as_guide(model: onnx.ModelProto, batch_size: int, pad_to: int = DEFAULT_PAD_TO) -> PaddingResult:
    """The guide's graph_modify.py (MagicONNX), edit for edit, found structurally instead of by op counts.

    Its four edits, in its order: every Reshape constant 197 -> 208; a zero (B, 11, D)
    input appended to the cls-token Concat; the constant of the bias Add (and any
    per-token constant) zero-padded to 208; after each attention's key tensor
    (B, H, 208, hd) a Slice [0:197] on axis 2 and a Concat of zeros, so the padded keys
    are zero.  Nothing else: the padded keys still take softmax weight (their score is
    0 + bias 0, not masked), and the mean pooling runs over all 207 non-cls tokens.
    """
    gi, plan = graph_patterns.plan_padding(model, batch_size, pad_to, keys=True)
    counts = Counter()
    counts.update(pad_token_reshapes(gi, plan, False))
    counts.update(append_zero_tokens(gi, plan))
    for rewrite in (pad_attention, pad_token_constants, zero_padded_keys, restrict_pooling):
        counts.update(rewrite(gi, plan, False))
    keys = {key.tensor for key in plan.key_branches}
    slice_ends = {n.input[2] for n in gi.inserted if n.op_type == "Slice" and n.input[0] in keys}
    drop_unused_initializers(model)
    check_result(model, plan.stream, plan.stream.name, exempt=slice_ends)
    return PaddingResult(counts, plan.stream.tokens, plan.stream.padded)


# ---------------------------------------------------------------- constants

def padded_bias(bias: np.ndarray, tokens: int, padded: int, masked: bool) -> np.ndarray:
    """(…, T, T) bias -> (1, H, P, P): the real block kept, padded keys masked, padded query rows 0."""
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    out = np.zeros(bias.shape[:2] + (padded, padded), dtype=bias.dtype)
    out[..., :tokens, :tokens] = bias
    if masked:
        out[..., :, tokens:] = MASK_VALUE
    return out


def mask_only(tokens: int, padded: int, dtype: DTypeLike = np.float32) -> np.ndarray:
    out = np.zeros((1, 1, padded, padded), dtype=dtype)
    out[..., :, tokens:] = MASK_VALUE
    return out


# ---------------------------------------------------------------- rewrite passes

def pad_token_stream(gi: GraphIndex, plan: graph_patterns.PaddingPlan) -> str:
    """A Concat of zero tokens (B, P - T, D) after the cls Concat; every reader takes the padded stream."""
    s = plan.stream
    zeros = np.zeros((s.batch_size, s.padded - s.tokens, s.dim), dtype=np.float32)
    pad_name = gi.add_const("graph_modify_token_pad", zeros)
    padded_stream = gi.unique_name(s.name + "_padded")
    pad_node = helper.make_node("Concat", [s.name, pad_name], [padded_stream], axis=1,
                                name=gi.unique_name("graph_modify_pad_tokens"))
    for user in list(gi.consumers[s.name]):
        gi.replace_input(user, s.name, padded_stream)
    gi.insert_after(s.concat, pad_node)
    return padded_stream


def append_zero_tokens(gi: GraphIndex, plan: graph_patterns.PaddingPlan) -> Counter[str]:
    """The guide's token padding: a zero (B, P - T, D) third input of the cls-token Concat itself."""
    s = plan.stream
    zeros = np.zeros((s.batch_size, s.padded - s.tokens, s.dim), dtype=np.float32)
    gi.add_input(s.concat, gi.add_const("graph_modify_guide_token_pad", zeros))
    return Counter({"guide: zero tokens appended to the cls-token Concat": 1})


def zero_padded_keys(gi: GraphIndex, plan: graph_patterns.PaddingPlan, mask: bool) -> Counter[str]:
    """The guide's key fix: k (B, H, P, hd) -> Slice [0:T] on axis 2 -> Concat zeros (B, H, P - T, hd)."""
    s, counts = plan.stream, Counter()
    bounds = [gi.add_const(f"graph_modify_guide_key_{what}", np.array([value], np.int64))
              for what, value in (("starts", 0), ("ends", s.tokens), ("axes", 2), ("steps", 1))]
    zeros = {}
    for key in plan.key_branches:
        shape = (s.batch_size, key.heads, s.padded - s.tokens, key.head_dim)
        if shape not in zeros:
            zeros[shape] = gi.add_const("graph_modify_guide_key_pad", np.zeros(shape, np.float32))
        real = gi.unique_name(key.tensor + "_real")
        padded = gi.unique_name(key.tensor + "_zero_padded")
        sl = helper.make_node("Slice", [key.tensor, *bounds], [real],
                              name=gi.unique_name("graph_modify_guide_key_slice"))
        cat = helper.make_node("Concat", [real, zeros[shape]], [padded], axis=2,
                               name=gi.unique_name("graph_modify_guide_key_concat"))
        readers = list(gi.consumers[key.tensor])  # as MagicONNX's insert 'after': every reader of k
        gi.insert_before(key.transpose, sl)
        gi.insert_before(key.transpose, cat)
        for reader in readers:
            gi.replace_input(reader, key.tensor, padded)
        counts[f"guide: padded keys zeroed (Slice 0:{s.tokens} + Concat zeros)"] += 1
    return counts


def pad_attention(gi: GraphIndex, plan: graph_patterns.PaddingPlan, mask: bool) -> Counter[str]:
    """Pad (and mask) each block's bias constant, shared constants once; without a bias, add a mask."""
    s, counts, new_bias = plan.stream, Counter(), {}
    for block in plan.blocks:
        if block.bias_add is not None:
            old = block.bias_input
            if old not in new_bias:
                value = padded_bias(gi.const(old), s.tokens, s.padded, mask)
                new_bias[old] = gi.add_const(f"{old}_padded{s.padded}", value)
            gi.replace_input(block.bias_add, old, new_bias[old])
            counts["attention bias padded" + (" + masked" if mask else " (zeros)")] += 1
        elif mask:
            if "mask" not in new_bias:
                new_bias["mask"] = gi.add_const("graph_modify_key_mask", mask_only(s.tokens, s.padded))
            insert_mask_add(gi, block.softmax, new_bias["mask"])
            counts["attention mask Add inserted"] += 1
        else:
            counts["attention without bias (left unmasked)"] += 1
    return counts


def insert_mask_add(gi: GraphIndex, softmax: onnx.NodeProto, mask_name: str) -> None:
    masked = gi.unique_name(softmax.input[0] + "_masked")
    add = helper.make_node("Add", [softmax.input[0], mask_name], [masked],
                           name=gi.unique_name("graph_modify_mask_add"))
    gi.insert_before(softmax, add)
    gi.set_input(softmax, 0, masked)


def pad_token_constants(gi: GraphIndex, plan: graph_patterns.PaddingPlan, mask: bool) -> Counter[str]:
    """Per-token constants (1, T, D) grow to (1, P, D) with zeros (the padded tokens get nothing)."""
    counts, padded = Counter(), plan.stream.padded
    for const in plan.token_constants:
        grown = np.zeros((1, padded, const.value.shape[2]), dtype=const.value.dtype)
        grown[:, :plan.stream.tokens] = const.value
        new_name = gi.add_const(f"{const.name}_padded{padded}", grown)
        gi.replace_input(const.node, const.name, new_name)
        counts["per-token constant (position embedding) padded"] += 1
    return counts


def pad_token_reshapes(gi: GraphIndex, plan: graph_patterns.PaddingPlan, mask: bool) -> Counter[str]:
    """Each Reshape shape naming the token count gets the padded count on axis 1."""
    counts, tokens, padded = Counter(), plan.stream.tokens, plan.stream.padded
    for reshape in plan.token_reshapes:
        new = reshape.shape.copy()
        new[1] = padded
        gi.set_input(reshape.node, 1, gi.add_const(f"{reshape.node.input[1]}_tokens{padded}",
                                                   new.astype(reshape.shape.dtype)))
        counts[f"{reshape.role} Reshape {tokens}->{padded}"] += 1
    return counts


def restrict_pooling(gi: GraphIndex, plan: graph_patterns.PaddingPlan, mask: bool) -> Counter[str]:
    """The mean pooling stops at the last real token: the Slice's end, or a new Slice [0:T]."""
    pooling, tokens = plan.pooling, plan.stream.tokens
    if pooling.kind == "cls":
        return Counter({"pooling: cls-token Gather (unchanged)": 1})
    if not mask:
        return Counter({"pooling: mean left over all tokens (guide)": 1})
    if pooling.slice is not None:
        ends = gi.const(pooling.slice.input[2])
        gi.set_input(pooling.slice, 2, gi.add_const(f"{pooling.slice.input[2]}_end{tokens}",
                                                    np.array([tokens], dtype=ends.dtype)))
        return Counter({f"pooling Slice end -> {tokens}": 1})
    cut = gi.unique_name(pooling.node.input[0] + "_real_tokens")
    bounds = [gi.add_const(f"graph_modify_pool_{what}", np.array([value], np.int64))
              for what, value in (("starts", 0), ("ends", tokens), ("axes", 1))]
    sl = helper.make_node("Slice", [pooling.node.input[0], *bounds], [cut],
                          name=gi.unique_name("graph_modify_pool_slice"))
    gi.insert_before(pooling.node, sl)
    gi.set_input(pooling.node, 0, cut)
    return Counter({f"pooling Slice [0:{tokens}] inserted": 1})


def pooling_end(gi: GraphIndex, plan: graph_patterns.PaddingPlan, mask: bool) -> str | None:
    """The constant that holds the token count on purpose after restrict_pooling (the Slice end), or None."""
    if plan.pooling.kind != "mean" or not mask:
        return None
    return gi.producer[plan.pooling.node.input[0]].input[2]


# ---------------------------------------------------------------- checks

def check_result(model: onnx.ModelProto, stream: graph_patterns.TokenStream, padded_stream: str,
                 exempt: set[str]) -> None:
    """onnx.checker, strict shape inference, and no token count left on the padded stream."""
    del model.graph.value_info[:]
    try:
        check_graph(model)
        inferred = infer_shapes(model, strict=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise PatternError("valid rewritten graph", f"the rewritten graph fails the ONNX checks: {exc}") from exc
    model.graph.value_info.extend(inferred.graph.value_info)
    gi = GraphIndex(model)
    for node in model.graph.node:
        if node.op_type == "Softmax":
            shape = gi.shape(node.input[0])
            if not shape or shape[0] != stream.batch_size or shape[2:] != [stream.padded, stream.padded]:
                raise PatternError("padded attention", f"after the rewrite a Softmax input has shape {shape}, "
                                                       f"expected [{stream.batch_size}, H, {stream.padded}, "
                                                       f"{stream.padded}]")
    for node in gi.downstream(padded_stream):
        for inp in node.input:
            value = gi.const(inp) if inp else None
            if value is None or inp in exempt:
                continue
            if stream.tokens in value.shape or (value.dtype.kind in "iu" and value.size <= 8
                                                and stream.tokens in value):
                raise PatternError("no token count left",
                                   f"{node.op_type} '{node.name}' still carries {stream.tokens} in constant '{inp}' "
                                   f"(shape {list(value.shape)}); this graph has a pattern graph_modify "
                                   "does not know")
