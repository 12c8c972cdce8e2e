"""The graph toolkit: one ONNX graph indexed for matching and rewriting, and the helpers every graph pass uses.

``GraphIndex`` holds producers, consumers, constants and inferred shapes, and stays
correct while a rewrite inserts, removes and rewires nodes through it.  Patterns are
matched from an anchor op, declaratively, as ONNX Runtime's fusion passes do
(``match_parent_path(node, op_types, input_indices)``, ``match_child_path``), never
by node names.  patterns.py / padding.py (graph_modify), fidelity/om_emulation.py,
fidelity/fp16_overflow.py and fidelity/locate.py work through it.  Nodes are identified by their first output
tensor (unique in an SSA graph); node names are optional in ONNX and only read
where a tool outside (atc's keep_dtype file) names nodes.
"""

from collections import defaultdict
from typing import Any, Optional, Sequence

import numpy as np
import onnx
from onnx import NodeProto, helper, numpy_helper

from beit_pipeline.errors import PatternError


def node_key(node: NodeProto) -> str:
    """A node's identity: its first output tensor, unique in the graph."""
    return node.output[0]


class GraphIndex:
    """Producers, consumers, constants and inferred shapes of one graph, kept correct through rewrites.

    Rewrites change the graph through the index (``insert_before``, ``insert_after``,
    ``remove``, ``set_input``, ``replace_input``, ``add_input``, ``add_const``), so the
    producer and consumer maps always describe the graph as it is now; nodes a rewrite
    inserts are listed in ``inserted``.  Inferred shapes describe the graph as it was
    indexed (a rewrite that changes shapes checks the result with a fresh index).
    """

    def __init__(self, model: onnx.ModelProto, shapes: bool = True):
        self.model = model
        self.graph = model.graph
        self.inserted: list[NodeProto] = []
        self.refresh(shapes)

    def refresh(self, shapes: bool = True) -> None:
        g = self.graph
        self.inits = {t.name: t for t in g.initializer}
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for node in g.node:
            self._index(node)
        self.shapes = inferred_shapes(self.model) if shapes else {}
        for t in g.initializer:
            self.shapes[t.name] = list(t.dims)
        self.names = set(self.inits) | set(self.producer) | {i.name for i in g.input}
        self.names |= {n.name for n in g.node}

    def _index(self, node: NodeProto) -> None:
        for out in node.output:
            self.producer[out] = node
        for inp in node.input:
            if inp:
                self.consumers[inp].append(node)

    def _unindex(self, node: NodeProto) -> None:
        for out in node.output:
            if self.producer.get(out) is node:
                del self.producer[out]
        for inp in set(node.input):
            if inp:
                self.consumers[inp] = [u for u in self.consumers.get(inp, []) if u is not node]

    # ---------------------------------------------------------------- reading

    def shape(self, name: str) -> Optional[list]:
        return self.shapes.get(name)

    def const(self, name: str) -> Optional[np.ndarray]:
        """The value of an initializer or Constant-node output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    return np.asarray(helper.get_attribute_value(a))
        return None

    def is_const(self, name: str) -> bool:
        """Whether ``name`` is an initializer or a Constant node's output (without reading its value)."""
        if name in self.inits:
            return True
        node = self.producer.get(name)
        return node is not None and node.op_type == "Constant" and any(
            a.name in ("value", "value_int", "value_ints", "value_float", "value_floats") for a in node.attribute)

    def const_scalar(self, node: NodeProto) -> Optional[float]:
        """The value of ``node``'s one size-1 constant input, else None (a Mul by 0.5, a Pow by 2)."""
        values = [self.const(i) for i in node.input if i and self.is_const(i)]
        return float(values[0].reshape(-1)[0]) if len(values) == 1 and values[0].size == 1 else None

    def output_names(self) -> set:
        return {o.name for o in self.graph.output}

    def readers(self, node: NodeProto) -> list:
        """Every node that reads one of ``node``'s outputs (a node reading two of them, once)."""
        found, seen = [], set()
        for out in node.output:
            for user in self.consumers.get(out, []):
                if id(user) not in seen:
                    seen.add(id(user))
                    found.append(user)
        return found

    def sole_child(self, node: NodeProto, op_type: str) -> Optional[NodeProto]:
        """The one reader of ``node``'s first output when it is an ``op_type``, else None."""
        users = self.consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and users[0].op_type == op_type else None

    def sole_consumer(self, name: str, op_types: Sequence[str], pattern: str) -> NodeProto:
        """The one reader of tensor ``name``, of one of ``op_types``; PatternError naming ``pattern`` otherwise."""
        users = self.consumers.get(name, [])
        if len(users) != 1 or users[0].op_type not in op_types:
            found = ", ".join(f"{u.op_type}" for u in users) or "nothing"
            raise PatternError(pattern, f"'{name}' should feed exactly one {'/'.join(op_types)}, "
                                        f"but feeds {found}")
        return users[0]

    def only_read_inside(self, nodes: list) -> bool:
        """True when every output of every node but the last is read only by ``nodes`` (a fusable chain)."""
        keys = {node_key(n) for n in nodes}
        return all(node_key(r) in keys for n in nodes[:-1] for r in self.readers(n))

    def match_parent_path(self, node: NodeProto, op_types: Sequence[str],
                          input_indices: Optional[Sequence[Optional[int]]] = None) -> Optional[list]:
        """The parents of ``node`` along a path of ``op_types`` (nearest first), else None.

        As ONNX Runtime's fusion helper of the same name: step k follows input
        ``input_indices[k]`` of the node before it (None: the first input whose
        producer has the wanted type).  Returns the matched nodes, nearest first.
        """
        path, current = [], node
        for k, op_type in enumerate(op_types):
            index = None if input_indices is None else input_indices[k]
            candidates = range(len(current.input)) if index is None else [index]
            parent = None
            for i in candidates:
                if i < len(current.input) and current.input[i]:
                    found = self.producer.get(current.input[i])
                    if found is not None and found.op_type == op_type:
                        parent = found
                        break
            if parent is None:
                return None
            path.append(parent)
            current = parent
        return path

    def match_child_path(self, node: NodeProto, op_types: Sequence[str]) -> Optional[list]:
        """The chain of sole readers after ``node`` with types ``op_types`` (nearest first), else None."""
        path, current = [], node
        for op_type in op_types:
            current = self.sole_child(current, op_type)
            if current is None:
                return None
            path.append(current)
        return path

    def downstream(self, start: str) -> list:
        """Every node reachable from tensor ``start``, in the order found."""
        seen, todo, order = set(), [start], []
        while todo:
            for node in self.consumers.get(todo.pop(), []):
                if node_key(node) not in seen:
                    seen.add(node_key(node))
                    order.append(node)
                    todo.extend(node.output)
        return order

    def position(self, node: NodeProto) -> int:
        return next(i for i, n in enumerate(self.graph.node) if n is node)

    # ---------------------------------------------------------------- changing the graph

    def unique_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def add_const(self, base: str, array: Any) -> str:
        name = self.unique_name(base)
        tensor = numpy_helper.from_array(np.asarray(array), name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        self.shapes[name] = list(tensor.dims)
        return name

    def set_input(self, node: NodeProto, index: int, new: str) -> None:
        """Make input ``index`` of ``node`` read tensor ``new``."""
        self._unindex(node)
        node.input[index] = new
        self._index(node)

    def add_input(self, node: NodeProto, new: str) -> None:
        """Append an input (a third operand of a Concat)."""
        self._unindex(node)
        node.input.append(new)
        self._index(node)

    def replace_input(self, node: NodeProto, old: str, new: str) -> None:
        """Point every input of ``node`` that reads ``old`` at ``new``."""
        for k, inp in enumerate(node.input):
            if inp == old:
                self.set_input(node, k, new)

    def insert_before(self, anchor: NodeProto, new_node: NodeProto) -> NodeProto:
        """Insert ``new_node`` right before ``anchor`` so the node list stays topologically sorted."""
        return self._insert(self.position(anchor), new_node)

    def insert_after(self, anchor: NodeProto, new_node: NodeProto) -> NodeProto:
        return self._insert(self.position(anchor) + 1, new_node)

    def _insert(self, position: int, new_node: NodeProto) -> NodeProto:
        self.graph.node.insert(position, new_node)
        node = self.graph.node[position]  # the graph holds a copy: index that one
        self._index(node)
        self.names.update(n for n in (*node.output, node.name) if n)
        self.inserted.append(node)
        return node

    def remove(self, node: NodeProto) -> None:
        """Take ``node`` out of the graph (its readers must read something else by now)."""
        self._unindex(node)
        del self.graph.node[self.position(node)]
        self.inserted = [n for n in self.inserted if n is not node]

    def drop_unused_initializers(self) -> int:
        """Remove the initializers no node or graph output reads; how many were removed."""
        removed = drop_unused_initializers(self.model)
        self.inits = {t.name: t for t in self.graph.initializer}
        return removed


def weightless_copy(model: onnx.ModelProto) -> onnx.ModelProto:
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


def check_graph(model: onnx.ModelProto) -> None:
    """onnx.checker on ``model``; past protobuf's 2 GiB (large-512), which the checker cannot serialise,
    on the graph with its weights as typed inputs."""
    from beit_pipeline.graph import onnx_files
    data = None
    if not onnx_files.has_external_data(model):
        try:  # serialised once, and checked from the bytes: ByteSize() alone costs as much (2.4 s on BEiT-base)
            data = model.SerializeToString()
        except Exception:  # past 2 GiB: google.protobuf's EncodeError / ValueError
            data = None
    if data is not None and len(data) <= onnx_files.external_above():
        onnx.checker.check_model(data)
    else:
        onnx.checker.check_model(weightless_copy(model))


def infer_shapes(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(weightless_copy(model), check_type=strict, strict_mode=strict)


def inferred_shapes(model: onnx.ModelProto) -> dict:
    """{tensor name: [dim or None]} from ONNX shape inference."""
    inferred = infer_shapes(model).graph
    shapes = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


def attr(node: NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def opset_version(model: onnx.ModelProto) -> Optional[int]:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return None


def reduce_axes(gi: "GraphIndex", node: NodeProto) -> Optional[list]:
    """ReduceMean axes, from the attribute (opset < 18) or the second input."""
    axes = attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = gi.const(node.input[1])
        axes = None if value is None else value.tolist()
    return axes


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    """Remove the initializers no node or graph output reads; how many were removed."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    removed = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return removed
