"""beit_fidelity.py --locate STAGE: the first node where STAGE's model departs from the stage before it.

Both models run on the first batch of the work folder with every intermediate
tensor of the earlier model exposed as a graph output (and the tensor of the same
name in the later one).  Tensors are matched by name: the padding rewrites and the
fp16 emulation keep the names of the tensors they do not add.  Across 197 -> 208
tokens only the real tokens are compared (a padded axis is cut back to the
reference's length: the padded tokens come last); across fp32 -> fp16 the fp16
values are compared as they are.  Tensors the later model does not have (the
inside of a replaced Gelu) are skipped.

A tensor departs when its cosine similarity with the reference falls below
COSINE_LIMIT or its relative error max|a-b|/max|b| rises above REL_LIMIT.
REL_LIMIT is 1e-2: about 20 times fp16's unit roundoff (2^-11 = 4.9e-4), the
error of a handful of fp16 roundings in a row, so a clean fp16 run stays below it
while a changed computation (unmasked padded keys take softmax weight) does not.
The first departing node is named by its op type and its position in the network
("block 0, attention softmax"; blocks count from 0, as timm's ``blocks.0``), found
from the structure (LayerNorms, Softmaxes, residual Adds), never from node names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper

from beit_pipeline.errors import UsageError
from beit_pipeline.fidelity.om_emulation import GELU, LAYERNORM, MATMUL_BIAS, MOVES, SOFTMAX, find_fused_ops
from beit_pipeline.graph.index import GraphIndex, node_key, weightless_copy
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.preprocess import batches

if TYPE_CHECKING:
    from typing import TypeVar

    _T = TypeVar("_T")

log = logging.getLogger(__name__)

COSINE_LIMIT = 0.99
REL_LIMIT = 1e-2
PREVIOUS = {"onnxsim": "onnx", "graph_modify": "onnxsim", "guide_padding": "onnxsim",
            "om_emulation": "graph_modify", "guide_om_emulation": "guide_padding"}
FP16_STAGES = ("om_emulation", "guide_om_emulation")
CHUNK_BYTES = 768 << 20  # exposed tensors fetched per run: bounds the memory of a BEiT-base run at bs8
_ELEM_BYTES = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}


@dataclasses.dataclass
class TensorError:
    """How one intermediate tensor of the later model differs from the earlier one's."""
    tensor: str
    op_type: str
    node: str
    position: str
    rel_err: float
    cosine: float

    @property
    def departs(self) -> bool:
        return not (self.cosine >= COSINE_LIMIT and self.rel_err <= REL_LIMIT)


@dataclasses.dataclass
class Located:
    """--locate's answer: the first departing tensor (None if none), the worst one, the error per block."""
    stage: str
    reference: str
    first: object
    worst: TensorError
    blocks: list  # [TensorError] of each block's output, block 0 first
    compared: int


# ---------------------------------------------------------------- positions in the network

@dataclasses.dataclass
class Layout:
    """Where each block starts and ends (node indices) and where its MLP starts."""
    starts: list
    mlp_starts: list
    ends: list
    owner: dict  # node key -> FusedOp


def layout(gi: GraphIndex) -> Layout:
    """The block structure of a BEiT graph: two LayerNorms per block, the MLP's residual Add ends it."""
    fused = find_fused_ops(gi)
    order = {node_key(n): i for i, n in enumerate(gi.graph.node)}
    norms = [order[node_key(op.nodes[0])] for op in fused if op.kind == LAYERNORM]
    depth = sum(n.op_type == "Softmax" for n in gi.graph.node)
    starts, mlp_starts = norms[0:2 * depth:2], norms[1:2 * depth:2]
    ends = []
    for mlp in mlp_starts:
        ends.append(next(i for i, n in enumerate(gi.graph.node) if i > mlp and n.op_type == "Add"
                         and not any(gi.is_const(x) for x in n.input)))
    return Layout(starts, mlp_starts, ends, {node_key(n): op for op in fused for n in op.nodes})


def _role(gi, node, op, attention, before_softmax, nth_linear):
    """What ``node`` does inside its block, in words."""
    consts = any(gi.is_const(x) for x in node.input)
    phase = "attention" if attention else "MLP"
    if op is not None:
        linear = (("qkv", "output projection") if attention else ("fc1", "fc2"))[min(nth_linear, 1)]
        return {LAYERNORM: f"{phase} LayerNorm ({'norm1' if attention else 'norm2'})", GELU: "MLP Gelu",
                SOFTMAX: "attention softmax", MATMUL_BIAS: f"{phase} {linear} MatMul + bias"}[op.kind]
    if node.op_type == "MatMul" and not consts:
        return "attention scores q @ k^T" if before_softmax else "attention weights @ v"
    if node.op_type == "Add":
        return (f"{phase} residual Add" if not consts else
                "attention relative position bias Add" if attention and before_softmax else f"{phase} Add")
    if node.op_type == "Mul" and consts:
        return "attention q scaling" if attention and before_softmax else f"{phase} layer scale (gamma)"
    if node.op_type in MOVES:
        return f"attention {'q/k/v split' if before_softmax else 'output reshape'}" if attention else phase
    return f"{phase} {node.op_type}"


def positions(gi: GraphIndex, lay: Layout) -> dict[str, str]:
    """{tensor name: readable position of the node that makes it} for a BEiT graph and its layout()."""
    found, block, linear = {}, None, 0
    softmax_seen = False
    for i, node in enumerate(gi.graph.node):
        if lay.starts and i < lay.starts[0]:
            where = "patch embedding"
        elif block is not None and i > lay.ends[block] and block + 1 == len(lay.starts):
            where = "head (pooling, norm, classifier)"
        else:
            if block is None or (block + 1 < len(lay.starts) and i >= lay.starts[block + 1]):
                block = 0 if block is None else block + 1
                softmax_seen, linear = False, 0
            attention = i < lay.mlp_starts[block]
            if i == lay.mlp_starts[block]:
                linear = 0
            op = lay.owner.get(node_key(node))
            where = f"block {block}, " + _role(gi, node, op, attention, not softmax_seen, linear)
            if op is not None and op.kind == MATMUL_BIAS and node is op.nodes[-1]:
                linear += 1
            softmax_seen = softmax_seen or node.op_type == "Softmax"
        for out in node.output:
            found[out] = f"{where} ({node.op_type})"
    return found


# ---------------------------------------------------------------- comparing tensors

def compare(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float] | None:
    """(rel err, cosine) of two tensors, the candidate cut to the reference's length on padded axes."""
    if reference.ndim != candidate.ndim:
        return None
    cut = []
    for r, c in zip(reference.shape, candidate.shape):
        if c < r:
            return None
        cut.append(slice(0, r))
    a = np.asarray(candidate[tuple(cut)], np.float64).ravel()
    b = np.asarray(reference, np.float64).ravel()
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf"), -1.0
    diff, scale = float(np.abs(a - b).max(initial=0.0)), float(np.abs(b).max(initial=0.0))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b) / norms if norms > 0 else (1.0 if diff == 0 else 0.0)
    return rel, cosine


def float_tensors(model: onnx.ModelProto) -> dict[str, tuple[int, list[int]]]:
    """{tensor name: (elem type, shape)} of every fp32/fp16 tensor a node makes."""
    inferred = onnx.shape_inference.infer_shapes(weightless_copy(model)).graph
    found = {}
    for vi in list(inferred.value_info) + list(inferred.output):
        t = vi.type.tensor_type
        if t.elem_type in _ELEM_BYTES:
            found[vi.name] = (t.elem_type, [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim])
    return found


def truncated(model: onnx.ModelProto, names: list[str], types: dict[str, tuple[int, list[int]]]) -> onnx.ModelProto:
    """``model`` cut down to the nodes ``names`` depend on, with ``names`` as its outputs.

    Every exposed tensor stays allocated until the end of a run, so exposing them all
    at once would hold all of them (4.5 GiB for BEiT-base at batch 8); a chunk at a
    time, each in a model that stops at its last tensor, holds one chunk.
    """
    producer = GraphIndex(model, shapes=False).producer
    keep, todo = set(), list(names)
    while todo:
        node = producer.get(todo.pop())
        if node is not None and node_key(node) not in keep:
            keep.add(node_key(node))
            todo.extend(i for i in node.input if i)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [n for n in model.graph.node if node_key(n) in keep]
    used = {i for n in nodes for i in n.input}
    del out.graph.node[:], out.graph.output[:], out.graph.initializer[:], out.graph.value_info[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(t for t in model.graph.initializer if t.name in used)
    out.graph.output.extend(helper.make_tensor_value_info(n, types[n][0], None) for n in names)
    return out


def chunks(names: Iterable[str], types: dict[str, tuple[int, list[int]]]) -> Iterator[list[str]]:
    """``names`` in runs of at most CHUNK_BYTES of tensor data."""
    run, size = [], 0
    for name in names:
        elem, shape = types[name]
        nbytes = int(np.prod([max(d, 1) for d in shape])) * _ELEM_BYTES[elem]
        if run and size + nbytes > CHUNK_BYTES:
            yield run
            run, size = [], 0
        run.append(name)
        size += nbytes
    if run:
        yield run


# ---------------------------------------------------------------- the search

class PairedRun:
    """Both models run on one batch, a chunk of shared tensors at a time, each chunk in truncated models.

    The weights are written once, as external data in ``folder``; a chunk's models are
    then small files that refer to them.
    """

    def __init__(self, ref_model: onnx.ModelProto, cand_model: onnx.ModelProto, names: Iterable[str], folder: str):
        self.types = [float_tensors(ref_model), float_tensors(cand_model)]
        self.names = [n for n in names if n in self.types[0] and n in self.types[1]]
        self.folder, self.models = folder, []
        for label, model in (("reference", ref_model), ("candidate", cand_model)):
            path = os.path.join(folder, f"{label}.onnx")
            onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{label}.weights", size_threshold=1024)
            self.models.append(onnx.load(path, load_external_data=False))

    def outputs(self, run: list[str], batch: np.ndarray) -> list[dict[str, np.ndarray]]:
        """[{name: array} of the reference, of the candidate] for the tensors ``run``."""
        found = []
        for k, model in enumerate(self.models):
            path = os.path.join(self.folder, f"chunk{k}.onnx")
            onnx.save(truncated(model, run, self.types[k]), path)
            session = onnx_models.open_session(path)
            found.append(dict(zip(run, session.run(run, {session.get_inputs()[0].name: batch}))))
            del session
        return found

    def errors(self, names: Iterable[str], batch: np.ndarray, describe: Callable[[str, float, float], _T]) -> list[_T]:
        """[TensorError] of ``names`` (a subset of self.names), in their order."""
        found = []
        for run in chunks(names, self.types[0]):
            ref, cand = self.outputs(run, batch)
            for name in run:
                pair = compare(ref[name], cand[name])
                if pair is not None:
                    found.append(describe(name, *pair))
        return found


def scan(paired: PairedRun, batch: np.ndarray, describe: Callable[[str, float, float], TensorError],
         to_the_end: bool) -> tuple[TensorError | None, TensorError | None, dict[str, TensorError]]:
    """(first departing TensorError or None, worst, {tensor: TensorError}) over the shared tensors in order."""
    first, worst, seen = None, None, {}
    for run in chunks(paired.names, paired.types[0]):
        for err in paired.errors(run, batch, describe):
            seen[err.tensor] = err
            worst = err if worst is None or _worse(err, worst) else worst
            first = first or (err if err.departs else None)
        if first is not None and not to_the_end:
            break
    return first, worst, seen


def locate(ref_path: str, cand_path: str, stage: str, reference: str, batch_path: str,
           image_size: int = batches.IMAGE_SIZE) -> Located:
    """The Located answer for two ONNX files on the batch file ``batch_path``."""
    ref_model, cand_model = onnx.load(ref_path), onnx.load(cand_path)
    gi = GraphIndex(ref_model)
    lay = layout(gi)
    where = positions(gi, lay)
    producer = gi.producer
    order = [o for n in ref_model.graph.node if n.op_type != "Constant" for o in n.output]
    block_outputs = [ref_model.graph.node[i].output[0] for i in lay.ends]

    def describe(name, rel, cos):
        node = producer[name]
        return TensorError(name, node.op_type, node.name, where.get(name, "?"), rel, cos)

    batch = batches.read_batch(batch_path, image_size=image_size)
    with tempfile.TemporaryDirectory(prefix=".fidelity_locate_", dir=os.path.dirname(os.path.abspath(cand_path))) \
            as folder:
        paired = PairedRun(ref_model, cand_model, order, folder)
        del gi, ref_model, cand_model
        # The fp16 stages depart little everywhere: scan on for the worst tensor; the others stop at the first.
        first, worst, seen = scan(paired, batch, describe, to_the_end=stage in FP16_STAGES)
        rest = [n for n in block_outputs if n in paired.names and n not in seen]
        seen.update((e.tensor, e) for e in paired.errors(rest, batch, describe))
    if worst is None:
        raise UsageError(f"{cand_path}: no intermediate tensor matches {ref_path} by name; cannot locate")
    blocks = [seen[n] for n in block_outputs if n in seen]
    return Located(stage, reference, first, worst, blocks, len(seen))


def _worse(a, b):
    return (a.rel_err, -a.cosine) > (b.rel_err, -b.cosine)


def report(found: Located) -> None:
    """Print the answer: the first departing node, the worst tensor, the error after each block."""
    log.info(f"locate {found.stage} against {found.reference}: {found.compared} intermediate tensors compared "
             f"(departs: cosine < {COSINE_LIMIT} or max|a-b|/max|b| > {REL_LIMIT:g})")
    if found.first is not None:
        e = found.first
        log.info(f"first departure: {e.op_type} node '{e.node}' at {e.position}: tensor {e.tensor}, "
                 f"rel err {e.rel_err:.3e}, cosine {e.cosine:.6f}")
    else:
        log.info("no tensor departs from the reference beyond the limits")
    w = found.worst
    log.info(f"largest error (of the {found.compared} tensors compared): {w.op_type} node '{w.node}' at "
             f"{w.position}: tensor {w.tensor}, rel err {w.rel_err:.3e}, cosine {w.cosine:.6f}")
    log.info("error of each block's output (the residual stream after its MLP):")
    log.info("| block | rel err | cosine | growth |")
    previous = None
    for k, e in enumerate(found.blocks):
        growth = f"x{e.rel_err / previous:.2f}" if previous else "-"
        log.info(f"| {k} | {e.rel_err:.3e} | {e.cosine:.6f} | {growth} |")
        previous = e.rel_err


# Issue 21: --locate's figures kept for the HTML report (report/data.py's load_blocks reads them).
def save(found: Located, path: str, extra: dict[str, Any] | None = None) -> None:
    """Write ``found`` (a Located) as JSON: the first departing tensor, the worst, the error after each block,
    and the keys of ``extra`` (for an emulated stage, ``first_saturating``: the first node whose fp16 rounding
    saturates, fp16_overflow.SaturatedNode as a dict, None when none does on the batch)."""
    from beit_pipeline import files

    def entry(err):
        return None if err is None else dataclasses.asdict(err)

    files.write_json_atomic(path, {"stage": found.stage, "reference": found.reference, "compared": found.compared,
                                   "first": entry(found.first), "worst": entry(found.worst),
                                   "blocks": [entry(e) for e in found.blocks], **(extra or {})})
