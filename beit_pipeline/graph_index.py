"""One ONNX graph, indexed for pattern matching: producers, consumers, constants, inferred shapes.

graph_patterns.py finds BEiT's patterns through this index and graph_padding.py
rewrites the graph through it.  Nodes are identified by their first output
tensor (unique in an SSA graph), never by node names, which are optional in ONNX.
"""

from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from beit_pipeline.errors import PipelineError


class PatternError(PipelineError):
    """The graph lacks a pattern the rewrite relies on, or it is not as expected (exit 1)."""

    def __init__(self, pattern, detail):
        super().__init__(f"pattern '{pattern}' not found: {detail}")
        self.pattern = pattern


def node_key(node):
    """A node's identity: its first output tensor, unique in the graph."""
    return node.output[0]


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
        self.shapes = inferred_shapes(self.model)
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
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_int", "value_ints", "value_float", "value_floats"):
                    return np.asarray(helper.get_attribute_value(a))
        return None

    def is_const(self, name):
        return self.const(name) is not None

    def output_names(self):
        return {o.name for o in self.graph.output}

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
        """Every node reachable from tensor ``start``, in the order found."""
        seen, todo, order = set(), [start], []
        while todo:
            for node in self.consumers.get(todo.pop(), []):
                if node_key(node) not in seen:
                    seen.add(node_key(node))
                    order.append(node)
                    todo.extend(node.output)
        return order

    def replace_input(self, node, old, new):
        """Point every input of ``node`` that reads ``old`` at ``new``."""
        for k, inp in enumerate(node.input):
            if inp == old:
                node.input[k] = new

    def insert_before(self, anchor, new_node):
        """Insert ``new_node`` right before ``anchor`` so the node list stays topologically sorted."""
        self.graph.node.insert(self.position(anchor), new_node)

    def insert_after(self, anchor, new_node):
        self.graph.node.insert(self.position(anchor) + 1, new_node)

    def position(self, node):
        return next(i for i, n in enumerate(self.graph.node) if n is node)


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


def check_graph(model):
    """onnx.checker on ``model``; past protobuf's 2 GiB (large-512), which the checker cannot serialise,
    on the graph with its weights as typed inputs."""
    from beit_pipeline import onnx_files
    onnx.checker.check_model(model if onnx_files.fits_one_file(model) else weightless_copy(model))


def infer_shapes(model, strict=False):
    return onnx.shape_inference.infer_shapes(weightless_copy(model), check_type=strict, strict_mode=strict)


def inferred_shapes(model):
    """{tensor name: [dim or None]} from ONNX shape inference."""
    inferred = infer_shapes(model).graph
    shapes = {}
    for vi in list(inferred.value_info) + list(inferred.input) + list(inferred.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return shapes


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


def drop_unused_initializers(model):
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
