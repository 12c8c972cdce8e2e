"""What the OM computes, emulated on a CPU: the padded ONNX model in fp16, with Ascend's fused operators.

atc builds the OM in its default precision mode for inference, force_fp16: every
tensor and weight is fp16, while the model's input and output keep their fp32 type
(a Cast at each end).  The guide's atc line also asks for Gelu's high_performance
implementation.  This module rewrites an fp32 ONNX model the same way:

* every float tensor between operators is fp16, every float weight is stored as fp16
  (the MatMul weights too), the graph input is cast to fp16 and the output back to fp32;
* operators that only move values (Reshape, Transpose, Concat, Slice, Split, ...) run on
  the fp16 tensors as they are;
* every other operator reads fp16, computes in fp32 and writes fp16, through explicit
  Cast nodes around it: an Ascend vector or cube unit computes each operator in its own
  precision (the cube accumulates fp16 products in fp32) and rounds its output once.
  ONNX Runtime's CPU provider has few fp16 kernels and would insert such casts itself,
  but it treats its own casts as precision-free and may remove a down-and-up pair between
  two fp32 kernels, losing the fp16 rounding; casts in the model are kept (checked in
  the tests: the emulation's error is measurably non-zero);
* where atc fuses a pattern into one operator, the whole pattern is one such operator
  (fp16 in and out, fp32 inside): LayerNorm (opset 11's ReduceMean/Sub/Pow/ReduceMean/
  Add/Sqrt/Div chain with its scale and shift), Gelu, Softmax, and MatMul with its bias
  Add.  A literal fp16 Pow overflows above 256; the device's fused LayerNorm does not;
* every Gelu (the Erf pattern x * 0.5 * (1 + erf(x / sqrt 2)) of the export) becomes
  the formula Ascend's Gelu operator computes:
  x / (1 + exp(-sqrt(8/pi) * (x + 0.044715 * x^3))).

Original tensor names are kept for the fp16 tensors (the fidelity report matches
intermediate tensors across the fp32 and fp16 graphs by name).  Scalar constants
inside a fused operator (LayerNorm's epsilon) stay exact fp32, as the attributes
of a fused operator are.
"""

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from beit_pipeline.graph_index import (GraphIndex, PatternError, check_graph, node_key, reduce_axes,
                                       weightless_copy)

GELU_SQRT_8_OVER_PI = math.sqrt(8.0 / math.pi)
GELU_CUBIC = 0.044715
FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT
# Operators that move or select values without arithmetic: exact on fp16 tensors.
MOVES = frozenset({"Reshape", "Transpose", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "Gather",
                   "Flatten", "Identity", "Expand"})
LAYERNORM, GELU, SOFTMAX, MATMUL_BIAS = "LayerNorm", "Gelu", "Softmax", "MatMul+bias"


@dataclass
class FusedOp:
    """A pattern atc runs as one operator: fp16 in and out, fp32 inside."""
    kind: str
    nodes: list  # its NodeProtos, in graph order
    output: str  # the one tensor that leaves it

    def keys(self):
        return {node_key(n) for n in self.nodes}


@dataclass
class Emulation:
    """The fp16 model and what the rewrite did (printed by beit_fidelity.py)."""
    model: onnx.ModelProto
    counts: Counter


# ---------------------------------------------------------------- finding the fused operators

def _const_scalar(gi, node):
    """The value of ``node``'s one size-1 constant input, else None."""
    values = [gi.const(i) for i in node.input if i and gi.is_const(i)]
    return float(values[0].reshape(-1)[0]) if len(values) == 1 and values[0].size == 1 else None


def _only_readers(gi, node, members):
    """True when every reader of ``node``'s output is one of ``members``."""
    keys = {node_key(m) for m in members}
    return all(node_key(r) in keys for r in gi.consumers.get(node.output[0], []))


def _sole(gi, node, op_type):
    users = gi.consumers.get(node.output[0], [])
    return users[0] if len(users) == 1 and users[0].op_type == op_type else None


def find_layernorm(gi, mean):
    """The LayerNorm chain that starts at ReduceMean ``mean`` (over the last axis), or None."""
    x = mean.input[0]
    rank = len(gi.shape(x) or [])
    if not rank or [a % rank for a in (reduce_axes(gi, mean) or [])] != [rank - 1]:
        return None
    sub = next((u for u in gi.consumers.get(mean.output[0], []) if u.op_type == "Sub"
                and list(u.input) == [x, mean.output[0]]), None)
    if sub is None:
        return None
    readers = {u.op_type: u for u in gi.consumers.get(sub.output[0], [])}
    pow_, div = readers.get("Pow"), readers.get("Div")
    if len(readers) != 2 or pow_ is None or div is None or _const_scalar(gi, pow_) != 2.0:
        return None
    chain = [_sole(gi, pow_, "ReduceMean")]
    for op in ("Add", "Sqrt"):
        chain.append(_sole(gi, chain[-1], op) if chain[-1] is not None else None)
    if None in chain or _sole(gi, chain[-1], "Div") is not div or _const_scalar(gi, chain[1]) is None:
        return None
    nodes = [mean, sub, pow_, *chain, div]
    for op in ("Mul", "Add"):  # the scale and shift, when there is one
        nxt = _sole(gi, nodes[-1], op)
        if nxt is None or sum(gi.is_const(i) for i in nxt.input) != 1:
            break
        nodes.append(nxt)
    if not all(_only_readers(gi, n, nodes) for n in nodes[:-1]):
        return None
    return FusedOp(LAYERNORM, nodes, nodes[-1].output[0])


def find_gelu(gi, erf):
    """The exported Gelu x * 0.5 * (1 + erf(x / sqrt 2)) around ``erf``, or None."""
    scale = gi.producer.get(erf.input[0])
    if scale is None or scale.op_type not in ("Div", "Mul"):
        return None
    want = math.sqrt(2.0) if scale.op_type == "Div" else 1.0 / math.sqrt(2.0)
    value = _const_scalar(gi, scale)
    if value is None or abs(value - want) > 1e-4 or gi.is_const(scale.input[0]):
        return None
    x = scale.input[0]
    plus = _sole(gi, erf, "Add")
    times_x = _sole(gi, plus, "Mul") if plus is not None and _const_scalar(gi, plus) == 1.0 else None
    if times_x is None or x not in times_x.input:
        return None
    half = _sole(gi, times_x, "Mul")
    if half is None or _const_scalar(gi, half) != 0.5:
        return None
    nodes = [scale, erf, plus, times_x, half]
    if not all(_only_readers(gi, n, nodes) for n in nodes[:-1]):
        return None
    return FusedOp(GELU, nodes, half.output[0])


def find_matmul_bias(gi, matmul):
    """MatMul by a constant weight followed by the Add of a 1-D constant bias (atc fuses them), or None."""
    if not gi.is_const(matmul.input[1]) or gi.is_const(matmul.input[0]):
        return None
    add = _sole(gi, matmul, "Add")
    if add is None:
        return None
    bias = [gi.const(i) for i in add.input if gi.is_const(i)]
    if len(bias) != 1 or bias[0].ndim != 1:
        return None
    return FusedOp(MATMUL_BIAS, [matmul, add], add.output[0])


def find_fused_ops(gi):
    """Every fused operator of the graph; PatternError for a Pow or Erf left outside one."""
    found = []
    for node in gi.graph.node:
        op = None
        if node.op_type == "ReduceMean":
            op = find_layernorm(gi, node)
        elif node.op_type == "Erf":
            op = find_gelu(gi, node)
        elif node.op_type == "MatMul":
            op = find_matmul_bias(gi, node)
        elif node.op_type in ("Softmax", "LayerNormalization", "Gelu"):
            op = FusedOp({"Softmax": SOFTMAX, "Gelu": GELU}.get(node.op_type, LAYERNORM), [node], node.output[0])
        if op is not None:
            found.append(op)
    fused = set().union(*(op.keys() for op in found)) if found else set()
    for node in gi.graph.node:
        if node.op_type in ("Pow", "Erf") and node_key(node) not in fused:
            what = "LayerNorm chain" if node.op_type == "Pow" else "Gelu pattern"
            raise PatternError(f"fusable {what}", f"{node.op_type} '{node.name}' is not part of a {what}; "
                                                  "emulated in plain fp16 it would not be what the device runs")
    return found


# ---------------------------------------------------------------- the fp16 graph

def float_tensors(model):
    """Names of every fp32 tensor of the graph (inputs, outputs, intermediates, constants)."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model)).graph
    names = {vi.name for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
             if vi.type.tensor_type.elem_type == FP32}
    names |= {t.name for t in model.graph.initializer if t.data_type == FP32}
    for node in model.graph.node:
        if node.op_type == "Constant" and any(a.name == "value" and a.t.data_type == FP32 for a in node.attribute):
            names.add(node.output[0])
    return names


class Fp16Graph:
    """Builds the fp16 node list: fp16 tensors between operators, fp32 inside each one."""

    def __init__(self, gi, floats):
        self.gi, self.floats = gi, floats
        self.nodes, self.inits, self.pending = [], [], []
        self.fp32_view = {}  # (tensor, exact scalar?) -> the name of its fp32 value
        outputs = gi.output_names()
        self.rename = {o: gi.unique_name(o + "_fp16") for o in outputs}  # graph outputs stay fp32
        self.rename.update({i.name: gi.unique_name(i.name + "_fp16") for i in gi.graph.input
                            if i.name in floats and i.name not in gi.inits})

    def name16(self, name):
        return self.rename.get(name, name)

    def cast(self, src, dst, to):
        self.nodes.append(helper.make_node("Cast", [src], [dst], to=to, name=self.gi.unique_name(f"om_cast_{dst}")))
        return dst

    def as_fp32(self, name, fused=False):
        """The fp32 value of a float tensor: a Cast of its fp16 value, or, for a scalar constant of a
        fused operator, its exact fp32 value (an attribute of the operator on the device: LayerNorm's
        epsilon)."""
        value = self.gi.const(name) if fused else None
        exact = value is not None and value.size == 1 and value.dtype == np.float32
        if (name, exact) not in self.fp32_view:
            fresh = self.gi.unique_name(name + "_fp32")
            if exact:
                self.inits.append(numpy_helper.from_array(value.astype(np.float32), fresh))
            else:
                self.cast(self.name16(name), fresh, FP32)
            self.fp32_view[name, exact] = fresh
        return self.fp32_view[name, exact]

    def emit_move(self, node):
        """An operator that only moves values: as it is, on the fp16 tensors."""
        new = _copy_node(node)
        new.input[:] = [self.name16(i) for i in node.input]
        new.output[:] = [self.name16(o) for o in node.output]
        self.nodes.append(new)

    def emit_constant(self, node):
        new = _copy_node(node)
        new.output[:] = [self.name16(o) for o in node.output]
        for a in new.attribute:
            if a.name == "value" and a.t.data_type == FP32:
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        self.nodes.append(new)

    def emit_fp32(self, nodes, fused=False):
        """Nodes computed in fp32: float inputs from outside read as fp32, outputs leaving rounded to fp16.

        ``fused``: the nodes are one fused operator; the tensors between them stay fp32.
        """
        inside = {o for n in nodes[:-1] for o in n.output} if fused else set()
        for node in nodes:
            new = _copy_node(node)
            new.input[:] = [i if (i in inside or i not in self.floats) else self.as_fp32(i, fused)
                            for i in node.input]
            new.output[:] = [o if (o in inside or o not in self.floats) else self._result(o) for o in node.output]
            self.nodes.append(new)
        for fp32_name, name in self.pending:
            self.cast(fp32_name, self.name16(name), FP16)
        self.pending = []

    def _result(self, name):
        """A name for the fp32 result that becomes fp16 tensor ``name`` (its Cast follows the operator)."""
        fp32_name = self.gi.unique_name(name + "_fp32out")
        self.pending.append((fp32_name, name))
        return fp32_name

    def emit_gelu(self, op):
        """Ascend's Gelu: x / (1 + exp(-sqrt(8/pi) * (x + 0.044715 x^3))), in fp32, rounded to fp16 once."""
        x = self.as_fp32(op.nodes[0].input[0])
        c = {k: self._scalar(k, v) for k, v in (("cubic", GELU_CUBIC), ("scale", -GELU_SQRT_8_OVER_PI), ("one", 1.0))}
        steps = [("Mul", [x, x]), ("Mul", ["@0", x]), ("Mul", ["@1", c["cubic"]]), ("Add", [x, "@2"]),
                 ("Mul", ["@3", c["scale"]]), ("Exp", ["@4"]), ("Add", ["@5", c["one"]]), ("Div", [x, "@6"])]
        made = []
        for k, (op_type, inputs) in enumerate(steps):
            inputs = [made[int(i[1:])] if i.startswith("@") else i for i in inputs]
            made.append(self.gi.unique_name(f"{op.output}_gelu{k}"))
            self.nodes.append(helper.make_node(op_type, inputs, [made[-1]], name=self.gi.unique_name(made[-1])))
        self.cast(made[-1], self.name16(op.output), FP16)

    def _scalar(self, what, value):
        name = self.gi.unique_name(f"om_gelu_{what}")
        self.inits.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    def finish_outputs(self):
        for out, fp16 in self.rename.items():
            if out in self.gi.output_names():
                self.cast(fp16, out, FP32)

    def start_inputs(self):
        for name, fp16 in self.rename.items():
            if name not in self.gi.output_names():
                self.cast(name, fp16, FP16)


def _copy_node(node):
    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


def schedule(gi, fused):
    """(node, FusedOp or None) in graph order; a fused operator comes once, at its last node."""
    owner = {node_key(n): op for op in fused for n in op.nodes}
    last = {node_key(op.nodes[-1]) for op in fused}
    for node in gi.graph.node:
        op = owner.get(node_key(node))
        if op is None:
            yield node, None
        elif node_key(node) in last:
            yield node, op


def emulate(model):
    """The fp16 emulation of ``model`` (a new ModelProto; ``model`` is not changed), with counts."""
    gi = GraphIndex(model)
    fused = find_fused_ops(gi)
    g = Fp16Graph(gi, float_tensors(model))
    counts = Counter()
    g.start_inputs()
    for node, op in schedule(gi, fused):
        if op is not None:
            if op.kind == GELU and op.nodes[0].op_type != "Gelu":
                g.emit_gelu(op)
                counts["Gelu -> Ascend's tanh-form Gelu (fp32 inside)"] += 1
            else:
                g.emit_fp32(op.nodes, fused=True)
                counts[f"{op.kind} as one fp16 operator (fp32 inside)"] += 1
        elif node.op_type == "Constant":
            g.emit_constant(node)
        elif node.op_type in MOVES:
            g.emit_move(node)
            counts["data movement on fp16 tensors"] += 1
        else:
            g.emit_fp32([node])
            counts["other operators (fp16 in and out, fp32 inside)"] += 1
    g.finish_outputs()
    out = _assemble(model, g)
    counts["weights stored as fp16"] = sum(t.data_type == FP16 for t in out.graph.initializer)
    return Emulation(out, counts)


def _assemble(model, g):
    """The new ModelProto: the fp16 initializers, the node list, fp32 input and output as before."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:]
    out.graph.node.extend(g.nodes)
    for t in model.graph.initializer:
        value = numpy_helper.to_array(t)
        out.graph.initializer.append(numpy_helper.from_array(
            value.astype(np.float16) if value.dtype == np.float32 else value, t.name))
    out.graph.initializer.extend(g.inits)
    _drop_unused(out)
    check_graph(out)
    return out


def _drop_unused(model):
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def fp16_matmul_weights(model):
    """(fp16, all) counts of the constant MatMul/Gemm weights of a model: how many are stored as fp16."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    weights = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                src = producer.get(name)
                if src is not None and src.op_type == "Cast":  # the fp32 view of an fp16 weight
                    name = src.input[0]
                if name in inits:
                    weights.append(inits[name])
    return sum(t == FP16 for t in weights), len(weights)
