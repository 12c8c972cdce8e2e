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

Overflow is the 310P's: it runs only in saturation mode (CANN's aclrtFloatOverflowMode:
an inf result becomes the largest finite value, a NaN becomes 0), so every rounding to
fp16 is a Clip to +-65504 before its Cast (NaN -> 0 where NaN can arise), and weights
are stored clamped.  Each rounding is recorded (``Rounding``: which operator, what would
remove it); ``emulate(probes=True)`` adds per-image outputs that show where one clamps
(fp16_overflow reads them).  An atc keep_dtype list (keep_dtype.KeepList) keeps the
operators it names in fp32: inputs read in fp32, weights in fp32, result stored fp32,
rounded (saturating) only where an fp16 operator reads it.
"""

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import onnx
from onnx import NodeProto, TensorProto, helper, numpy_helper

from beit_pipeline.fidelity.keep_dtype import KeepList
from beit_pipeline.graph.index import (
    GraphIndex,
    PatternError,
    check_graph,
    drop_unused_initializers,
    node_key,
    opset_version,
    reduce_axes,
    weightless_copy,
)

log = logging.getLogger(__name__)

GELU_SQRT_8_OVER_PI = math.sqrt(8.0 / math.pi)
GELU_CUBIC = 0.044715
FP16, FP32 = TensorProto.FLOAT16, TensorProto.FLOAT
FP16_MAX = 65504.0  # the largest finite fp16 value: what the 310P saturates an overflow to
# The smallest magnitude whose round-to-nearest fp16 value is inf: values from here on are clamped (below it
# they round to 65504 anyway, as IEEE rounding does).
FP16_OVERFLOW = 65520.0
# Operators that compute NaN from finite inputs (0/0, sqrt(-1), log(-1), ...).  Every other operator of
# the emulation reads finite, saturated fp16 values and cannot make NaN in fp32 (products of two fp16
# values stay below 4.3e9, sums of 3072 of them below 1.4e13), so the NaN->0 step is added only after these
# and after fp32 (kept) results; the graph input gets it too.
NAN_SOURCES = frozenset({"Div", "Sqrt", "Log", "Pow", "Mod", "Acos", "Asin", "Acosh", "Atanh", "Reciprocal"})
# Operators whose result from finite fp16 inputs is within fp16's range by construction (Softmax in [0, 1];
# |Gelu(x)| <= |x| <= 65504; Sigmoid, Tanh, Erf in [-1, 1]): their rounding needs no clamp and cannot saturate.
# They hold BEiT's largest tensors (attention weights, the MLP's hidden layer): half of the clamps' cost.
BOUNDED = frozenset({"Softmax", "Gelu", "Sigmoid", "Tanh", "Erf"})
# Operators that move or select values without arithmetic: exact on fp16 tensors.
MOVES = frozenset({"Reshape", "Transpose", "Concat", "Slice", "Split", "Squeeze", "Unsqueeze", "Gather",
                   "Flatten", "Identity", "Expand"})
LAYERNORM, GELU, SOFTMAX, MATMUL_BIAS = "LayerNorm", "Gelu", "Softmax", "MatMul+bias"


@dataclass
class FusedOp:
    """One operator of the OM: a pattern atc runs as one operator, or a single node; fp16 in and out, fp32
    inside (fp32 throughout when the keep list names it)."""
    kind: str  # LAYERNORM, GELU, SOFTMAX, MATMUL_BIAS, or the node's op type
    nodes: list  # its NodeProtos, in graph order
    output: str  # the one tensor that leaves it

    def keys(self) -> set:
        return {node_key(n) for n in self.nodes}

    @property
    def last(self) -> NodeProto:
        return self.nodes[-1]

    @property
    def fused(self) -> bool:
        """One of the operators atc fuses (LayerNorm, Gelu, Softmax, MatMul + bias), not a plain node."""
        return self.kind in (LAYERNORM, GELU, SOFTMAX, MATMUL_BIAS)


@dataclass
class Rounding:
    """One place the OM rounds an fp32 value to fp16 (saturating it), with what would remove it.

    ``source`` is the fp32 tensor of the emulated graph, ``tensor`` the original tensor it stands
    for.  An operator's output rounding has ``operator``; an fp32 (kept) tensor rounded for fp16
    readers has ``readers`` (keep them too to remove it); the graph input has neither.
    """
    source: str
    tensor: str
    operator: Optional[FusedOp] = None
    readers: list = field(default_factory=list)
    nan: bool = False  # NaN can arise here (NaN -> 0 is applied)
    bounded: bool = False  # the operator's result is within fp16's range by construction: no clamp, no probe
    rank: int = 0  # of the tensor (0: unknown)
    probes: dict = field(default_factory=dict)  # graph outputs per image: "max", "min", "nan" (emulate(probes=True))

    @property
    def fixers(self) -> list:
        return [self.operator] if self.operator is not None else list(self.readers)


@dataclass
class Emulation:
    """The fp16 model and what the rewrite did (printed by beit_fidelity.py)."""
    model: onnx.ModelProto
    counts: Counter
    roundings: list = field(default_factory=list)  # [Rounding], in graph order
    kept: list = field(default_factory=list)  # [FusedOp] the keep list kept in fp32
    operators: list = field(default_factory=list)  # [FusedOp] every arithmetic operator


# ---------------------------------------------------------------- finding the fused operators

def find_layernorm(gi: GraphIndex, mean: NodeProto) -> Optional[FusedOp]:
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
    if len(readers) != 2 or pow_ is None or div is None or gi.const_scalar(pow_) != 2.0:
        return None
    chain = gi.match_child_path(pow_, ("ReduceMean", "Add", "Sqrt", "Div"))
    if chain is None or chain[-1] is not div or gi.const_scalar(chain[1]) is None:
        return None
    nodes = [mean, sub, pow_, *chain]
    for op in ("Mul", "Add"):  # the scale and shift, when there is one
        nxt = gi.sole_child(nodes[-1], op)
        if nxt is None or sum(gi.is_const(i) for i in nxt.input) != 1:
            break
        nodes.append(nxt)
    if not gi.only_read_inside(nodes):
        return None
    return FusedOp(LAYERNORM, nodes, nodes[-1].output[0])


def find_gelu(gi: GraphIndex, erf: NodeProto) -> Optional[FusedOp]:
    """The exported Gelu x * 0.5 * (1 + erf(x / sqrt 2)) around ``erf``, or None."""
    path = gi.match_parent_path(erf, ("Div",), (0,)) or gi.match_parent_path(erf, ("Mul",), (0,))
    if path is None:
        return None
    scale = path[0]
    want = math.sqrt(2.0) if scale.op_type == "Div" else 1.0 / math.sqrt(2.0)
    value = gi.const_scalar(scale)
    if value is None or abs(value - want) > 1e-4 or gi.is_const(scale.input[0]):
        return None
    x = scale.input[0]
    chain = gi.match_child_path(erf, ("Add", "Mul", "Mul"))
    if chain is None or gi.const_scalar(chain[0]) != 1.0 or x not in chain[1].input \
            or gi.const_scalar(chain[2]) != 0.5:
        return None
    nodes = [scale, erf, *chain]
    if not gi.only_read_inside(nodes):
        return None
    return FusedOp(GELU, nodes, nodes[-1].output[0])


def find_matmul_bias(gi: GraphIndex, matmul: NodeProto) -> Optional[FusedOp]:
    """MatMul by a constant weight followed by the Add of a 1-D constant bias (atc fuses them), or None."""
    if not gi.is_const(matmul.input[1]) or gi.is_const(matmul.input[0]):
        return None
    add = gi.sole_child(matmul, "Add")
    if add is None:
        return None
    bias = [gi.const(i) for i in add.input if gi.is_const(i)]
    if len(bias) != 1 or bias[0].ndim != 1:
        return None
    return FusedOp(MATMUL_BIAS, [matmul, add], add.output[0])


def find_fused_ops(gi: GraphIndex) -> list:
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


def schedule(gi: GraphIndex, fused: list) -> Iterator:
    """(node, FusedOp or None) in graph order: a fused operator once, at its last node; every other
    arithmetic node as a one-node FusedOp; moves and Constants with None."""
    owner = {node_key(n): op for op in fused for n in op.nodes}
    for node in gi.graph.node:
        op = owner.get(node_key(node))
        if op is None:
            plain = node.op_type in MOVES or node.op_type == "Constant"
            yield node, None if plain else FusedOp(node.op_type, [node], node.output[0])
        elif node is op.last:
            yield node, op


# ---------------------------------------------------------------- the fp16 graph

def float_tensors(model: onnx.ModelProto) -> set:
    """Names of every fp32 tensor of the graph (inputs, outputs, intermediates, constants)."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model)).graph
    names = {vi.name for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output)
             if vi.type.tensor_type.elem_type == FP32}
    names |= {t.name for t in model.graph.initializer if t.data_type == FP32}
    for node in model.graph.node:
        if node.op_type == "Constant" and any(a.name == "value" and a.t.data_type == FP32 for a in node.attribute):
            names.add(node.output[0])
    return names


def fp16_saturated(value: np.ndarray) -> np.ndarray:
    """An fp32 array stored as fp16 the 310P's way: clamped to +-65504, NaN as 0."""
    return np.clip(np.nan_to_num(value, nan=0.0), -FP16_MAX, FP16_MAX).astype(np.float16)


class Fp16Graph:
    """Builds the emulated node list: every float tensor fp16, or fp32 where a kept operator made it.

    Every rounding of an fp32 result to fp16 saturates as the 310P does (``round``) and is
    recorded as a Rounding, so that probes can count what it clamps.
    """

    def __init__(self, gi: GraphIndex, floats: set, keep: KeepList):
        self.gi, self.floats, self.keep = gi, floats, keep
        self.nodes, self.inits, self.roundings, self.pending = [], [], [], []
        self.fp32 = set()  # original tensor names that stay fp32 in the emulated graph (kept operators' results)
        self.views, self.view_rounding = {}, {}  # (tensor, what) -> name; (tensor) -> Rounding of its fp16 view
        self.bounds = None
        outputs = gi.output_names()
        self.rename = {o: gi.unique_name(o + "_fp16") for o in outputs}  # graph outputs stay fp32
        self.rename.update({i.name: gi.unique_name(i.name + "_fp16") for i in gi.graph.input
                            if i.name in floats and i.name not in gi.inits})

    def here(self, name: str) -> str:
        """The name of tensor ``name`` in the emulated graph (graph inputs and outputs are renamed inside)."""
        return self.rename.get(name, name)

    def _node(self, op_type: str, inputs: list, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=self.gi.unique_name(f"om_{output}"),
                                           **attrs))
        return output

    def _const32(self, base: str, value) -> str:
        name = self.gi.unique_name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), name))
        return name

    def round(self, src: str, dst: str, rounding: Rounding, nan: bool) -> None:
        """fp32 ``src`` -> fp16 ``dst`` as the 310P's saturation mode does: NaN -> 0 (where NaN can arise),
        clamped to +-65504, then the cast."""
        if self.bounds is None:
            self.bounds = (self._const32("om_fp16_min", -FP16_MAX), self._const32("om_fp16_max", FP16_MAX),
                           self._const32("om_zero", 0.0))
        lo, hi, zero = self.bounds
        rounding.nan, rounding.rank = nan, len(self.gi.shape(rounding.tensor) or [])
        rounding.bounded = rounding.operator is not None and rounding.operator.kind in BOUNDED and not nan
        value = src
        if nan:
            isnan = self._node("IsNaN", [src], self.gi.unique_name(src + "_isnan"))
            value = self._node("Where", [isnan, zero, src], self.gi.unique_name(src + "_nan0"))
        if not rounding.bounded:
            value = self._node("Clip", [value, lo, hi], self.gi.unique_name(src + "_sat"))
        self._node("Cast", [value], dst, to=FP16)
        self.roundings.append(rounding)

    def _cast32(self, src: str, base: str) -> str:
        return self._node("Cast", [src], self.gi.unique_name(base + "_fp32"), to=FP32)

    def read16(self, name: str, reader: Optional[FusedOp] = None) -> str:
        """The fp16 value of float ``name``; an fp32 tensor is rounded (once, shared by its fp16 readers)."""
        if name not in self.fp32:
            return self.here(name)
        if (name, "fp16") not in self.views:
            target = self.gi.unique_name(name + "_fp16")
            self.view_rounding[name] = Rounding(self.here(name), name)
            self.round(self.here(name), target, self.view_rounding[name], nan=True)
            self.views[name, "fp16"] = target
        if reader is not None and all(r is not reader for r in self.view_rounding[name].readers):
            self.view_rounding[name].readers.append(reader)
        return self.views[name, "fp16"]

    def read32(self, name: str, kept: bool, op: FusedOp) -> str:
        """The fp32 value an operator computes with: a kept one reads fp32 tensors as they are and constants
        exactly; any other reads fp16 values (an fp32 tensor rounded first), cast up.  A scalar constant of a
        fused operator (LayerNorm's epsilon) is exact: an attribute of the operator on the device."""
        if name in self.fp32:
            if kept:
                return self.here(name)
            key = (name, "fp32 of fp16")
            if key not in self.views:
                self.views[key] = self._cast32(self.read16(name, op), name + "_rounded")
            else:
                self.read16(name, op)  # this reader also needs the rounding removed
            return self.views[key]
        value = self.gi.const(name) if (kept or op.fused) and self.gi.is_const(name) else None
        exact = value is not None and value.dtype == np.float32 and (kept or value.size == 1)
        key = (name, "exact" if exact else "fp32")
        if key not in self.views:
            self.views[key] = (self._const32(name + "_fp32", value) if exact else
                               self._cast32(self.here(name), name))
        return self.views[key]

    def emit_move(self, node: NodeProto) -> None:
        """An operator that only moves values: on fp16 tensors, or on fp32 ones when every float tensor it
        reads is fp32 (the result of a kept operator)."""
        tensors = [i for i in node.input if i and i in self.floats and not self.gi.is_const(i)]
        in32 = bool(tensors) and all(i in self.fp32 for i in tensors)
        new = _copy_node(node)
        new.input[:] = [self._move_input(i, in32) for i in node.input]
        for out in node.output:
            if in32 and out in self.floats:
                self.fp32.add(out)
        new.output[:] = [self.here(o) for o in node.output]
        self.nodes.append(new)

    def _move_input(self, name: str, in32: bool) -> str:
        if not name or name not in self.floats:
            return name
        if not in32:
            return self.read16(name)
        if name in self.fp32:
            return self.here(name)
        if (name, "exact") not in self.views:  # a float constant moved with fp32 tensors
            self.views[name, "exact"] = self._const32(name + "_fp32", self.gi.const(name))
        return self.views[name, "exact"]

    def emit_constant(self, node: NodeProto) -> None:
        new = _copy_node(node)
        new.output[:] = [self.here(o) for o in node.output]
        for a in new.attribute:
            if a.name == "value" and a.t.data_type == FP32:
                a.t.CopyFrom(numpy_helper.from_array(fp16_saturated(numpy_helper.to_array(a.t)), a.t.name))
        self.nodes.append(new)

    def emit_operator(self, op: FusedOp, kept: bool) -> None:
        """An operator computed in fp32; the tensors inside a fused one stay fp32; its result is rounded to
        fp16 (saturating) unless the keep list keeps it, then it stays fp32."""
        inside = {o for n in op.nodes[:-1] for o in n.output}
        for node in op.nodes:
            new = _copy_node(node)
            new.input[:] = [i if (not i or i in inside or i not in self.floats) else self.read32(i, kept, op)
                            for i in node.input]
            new.output[:] = [o if (o in inside or o not in self.floats) else self._result(o, op, kept)
                             for o in node.output]
            self.nodes.append(new)
        nan = any(n.op_type in NAN_SOURCES for n in op.nodes) and op.kind != LAYERNORM  # its Div is by sqrt(var + eps)
        for fp32_name, name in self.pending:
            self.round(fp32_name, self.here(name), Rounding(fp32_name, name, operator=op), nan)
        self.pending = []

    def _result(self, name: str, op: FusedOp, kept: bool) -> str:
        """The name an operator writes tensor ``name`` under: itself (fp32) when kept, else an fp32 temporary
        rounded to the fp16 tensor after the operator."""
        if kept:
            self.fp32.add(name)
            return self.here(name)
        fp32_name = self.gi.unique_name(name + "_fp32out")
        self.pending.append((fp32_name, name))
        return fp32_name

    def emit_gelu(self, op: FusedOp, kept: bool) -> None:
        """Ascend's Gelu: x / (1 + exp(-sqrt(8/pi) * (x + 0.044715 x^3))), in fp32, rounded to fp16 once."""
        x = self.read32(op.nodes[0].input[0], kept, op)
        c = {k: self._const32(f"om_gelu_{k}", v)
             for k, v in (("cubic", GELU_CUBIC), ("scale", -GELU_SQRT_8_OVER_PI), ("one", 1.0))}
        steps = [("Mul", [x, x]), ("Mul", ["@0", x]), ("Mul", ["@1", c["cubic"]]), ("Add", [x, "@2"]),
                 ("Mul", ["@3", c["scale"]]), ("Exp", ["@4"]), ("Add", ["@5", c["one"]]), ("Div", [x, "@6"])]
        made = []
        for k, (op_type, inputs) in enumerate(steps):
            inputs = [made[int(i[1:])] if i.startswith("@") else i for i in inputs]
            last = k == len(steps) - 1
            out = self._result(op.output, op, kept) if last else self.gi.unique_name(f"{op.output}_gelu{k}")
            made.append(self._node(op_type, inputs, out))
        for fp32_name, name in self.pending:
            self.round(fp32_name, self.here(name), Rounding(fp32_name, name, operator=op), nan=False)
        self.pending = []

    def finish_outputs(self) -> None:
        for out, inner in self.rename.items():
            if out in self.gi.output_names():
                self._node("Cast", [inner], out, to=FP32)

    def start_inputs(self) -> None:
        for name, inner in self.rename.items():
            if name not in self.gi.output_names():
                self.round(name, inner, Rounding(name, name), nan=True)


def _copy_node(node: NodeProto) -> NodeProto:
    new = onnx.NodeProto()
    new.CopyFrom(node)
    return new


# ---------------------------------------------------------------- the emulation

def emulate(model: onnx.ModelProto, keep: Optional[KeepList] = None, probes: bool = False) -> Emulation:
    """The fp16 emulation of ``model`` (a new ModelProto; ``model`` is not changed), with counts.

    ``keep``: the operators an atc keep_dtype file keeps in fp32.  ``probes``: add graph outputs
    per rounding, per image: the largest and smallest value it rounds (read-only reductions, so
    that a run with them costs little more) and, where NaN can arise, the NaNs; fp16_overflow
    reads them and counts the clamped values with add_count_probes where they saturate.  Off
    for the model that is written and timed.
    """
    keep = keep or KeepList([])
    gi = GraphIndex(model)
    g = Fp16Graph(gi, float_tensors(model), keep)
    counts, operators, kept = Counter(), [], []
    g.start_inputs()
    for node, op in schedule(gi, find_fused_ops(gi)):
        if op is None:
            if node.op_type == "Constant":
                g.emit_constant(node)
            else:
                g.emit_move(node)
                counts["data movement on fp16 tensors"] += 1
            continue
        operators.append(op)
        is_kept = keep.keeps(op.kind, op.nodes)
        kept += [op] if is_kept else []
        if op.kind == GELU and op.nodes[0].op_type != "Gelu":
            g.emit_gelu(op, is_kept)
        else:
            g.emit_operator(op, is_kept)
        counts[operator_label(op, is_kept)] += 1
    g.finish_outputs()
    out = _assemble(model, g)
    counts["weights stored as fp16"] = sum(t.data_type == FP16 for t in out.graph.initializer)
    counts["fp16 roundings (saturating: +-65504, NaN -> 0)"] = sum(not r.bounded for r in g.roundings)
    counts["fp16 roundings of results in range by construction (Softmax, Gelu, ...)"] = sum(
        r.bounded for r in g.roundings)
    if probes:
        add_peak_probes(out, g.roundings)
    _warn_unmatched(keep, model)
    return Emulation(out, counts, g.roundings, kept, operators)


def operator_label(op: FusedOp, kept: bool) -> str:
    """The line an operator is counted under in beit_fidelity.py's log."""
    if kept:
        return f"{op.kind} kept in fp32 (keep_dtype)"
    if op.kind == GELU and op.nodes[0].op_type != "Gelu":
        return "Gelu -> Ascend's tanh-form Gelu (fp32 inside)"
    if op.fused:
        return f"{op.kind} as one fp16 operator (fp32 inside)"
    return "other operators (fp16 in and out, fp32 inside)"


def _warn_unmatched(keep: KeepList, model: onnx.ModelProto) -> None:
    names = {n.name for n in model.graph.node}
    for name in keep.names:
        if name not in names:
            log.warning(f"keep_dtype: '{name}' names no node of the model; it keeps nothing")


def _assemble(model: onnx.ModelProto, g: Fp16Graph) -> onnx.ModelProto:
    """The new ModelProto: the fp16 initializers, the node list, fp32 input and output as before."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:]
    out.graph.node.extend(g.nodes)
    for t in model.graph.initializer:
        value = numpy_helper.to_array(t)
        out.graph.initializer.append(numpy_helper.from_array(
            fp16_saturated(value) if value.dtype == np.float32 else value, t.name))
    out.graph.initializer.extend(g.inits)
    drop_unused_initializers(out)
    check_graph(out)
    return out


class _ProbeWriter:
    """Appends probe nodes and per-image outputs to a model (names unique in it)."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.opset = model, opset_version(model) or 11
        # GraphIndex's names: every node, tensor, initializer and input name; unique_name adds what it hands out.
        self.unique = GraphIndex(model, shapes=False).unique_name

    def node(self, op_type: str, inputs: list, base: str, **attrs) -> str:
        out = self.unique(base)
        self.model.graph.node.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def per_image(self, op_type: str, x: str, rank: int, base: str) -> str:
        """A graph output: ``op_type`` (ReduceMax/Min/Sum) of ``x`` over every axis but the first, (B,)."""
        axes = list(range(1, rank)) if rank >= 2 else None
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        inputs = [x] + ([self.const(base + "_axes", np.array(axes, np.int64))] if as_input and axes else [])
        attrs = {"keepdims": 0 if axes else 1, **({"axes": axes} if axes and not as_input else {})}
        out = self.node(op_type, inputs, base, **attrs)
        if not axes:  # rank 0/1 or unknown: one value for the whole batch
            out = self.node("Reshape", [out, self.const(base + "_flat", np.array([-1], np.int64))], base + "_flat")
        self.model.graph.output.append(helper.make_tensor_value_info(out, FP32, None))
        return out


def add_peak_probes(model: onnx.ModelProto, roundings: list) -> None:
    """Per rounding, per image: its largest and smallest fp32 value (a value past +-65520 is clamped) and,
    where NaN can arise, how many NaNs; the output names go into ``Rounding.probes``."""
    w = _ProbeWriter(model)
    for k, r in enumerate(roundings):
        if r.bounded:
            continue
        r.probes = {"max": w.per_image("ReduceMax", r.source, r.rank, f"om_probe_{k}_max"),
                    "min": w.per_image("ReduceMin", r.source, r.rank, f"om_probe_{k}_min")}
        if r.nan:
            isnan = w.node("Cast", [w.node("IsNaN", [r.source], f"om_probe_{k}_isnan")], f"om_probe_{k}_nanf", to=FP32)
            r.probes["nan"] = w.per_image("ReduceSum", isnan, r.rank, f"om_probe_{k}_nan")


def add_count_probes(model: onnx.ModelProto, roundings: list) -> list:
    """A graph output per rounding in ``roundings``: how many values of each image the 310P clamps (|x| >= 65520,
    or NaN); returns the output names, in order.  For the roundings the peak probes found saturating."""
    w = _ProbeWriter(model)
    limit = w.const("om_count_limit", np.array(FP16_OVERFLOW, np.float32))
    names = []
    for k, r in enumerate(roundings):
        inside = w.node("Not", [w.node("Less", [w.node("Abs", [r.source], f"om_count_{k}_abs"), limit],
                                       f"om_count_{k}_less")], f"om_count_{k}_out")
        values = w.node("Cast", [inside], f"om_count_{k}_outf", to=FP32)
        names.append(w.per_image("ReduceSum", values, r.rank, f"om_count_{k}"))
    return names


def fp16_matmul_weights(model: onnx.ModelProto) -> tuple:
    """(fp16, all) counts of the constant MatMul/Gemm weights of a model: how many are stored as fp16."""
    gi = GraphIndex(model, shapes=False)
    weights = []
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input[:2]:
                src = gi.producer.get(name)
                if src is not None and src.op_type == "Cast":  # the fp32 view of an fp16 weight
                    name = src.input[0]
                if name in gi.inits:
                    weights.append(gi.inits[name].data_type)
    return sum(t == FP16 for t in weights), len(weights)
