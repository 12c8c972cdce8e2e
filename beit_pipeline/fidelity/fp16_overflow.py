"""fp16 overflow as the 310P does it: where the emulated OM saturates, and which operators to keep in fp32.

The 310P ("Atlas inference products" in CANN's documentation) runs only in saturation
mode (aclrtFloatOverflowMode, CANN runtime API: "对于Atlas 200I/500 A2 推理产品、Atlas
推理系列产品、Atlas 训练系列产品,仅支持设置饱和模式"; in that mode an inf result becomes
the largest finite value and a NaN becomes 0).  om_emulation rounds that way; here the
emulation runs with probes (one output per rounding counting, per image, the values it
clamps), so a report can name where it happens (``saturated_nodes``), and a search
finds a small keep_dtype list that brings the emulated OM back to fp32 (``suggest``):

1. keep the operators of the first saturating rounding, until nothing saturates (a
   kept operator's fp32 result is rounded again where an fp16 operator reads it: the
   readers follow until the values are back in range, e.g. scores MatMul -> bias Add ->
   Softmax);
2. while the emulation is still not within its ordinary error of fp32, add operators
   in the order of the error they add (each operator's output error over its inputs',
   the largest jumps first, measured tensor by tensor as --locate does);
3. drop, last added first, every operator the list works without.

A list is good when, on the images searched, no rounding saturates, max|a-b|/max|b|
against the fp32 model is at most ORDINARY_REL_ERR (locate.REL_LIMIT: about 20
fp16 roundings in a row), and every image whose Top-1 differs from fp32's is a near tie
(its fp32 margin within 2 x ORDINARY_REL_ERR of the largest logit), which the
emulation's own rounding flips either way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
import onnx

from beit_pipeline.fidelity.keep_dtype import ASCEND_TYPES, FUSED_KINDS, KeepList
from beit_pipeline.fidelity.om_emulation import (
    FP16_OVERFLOW,
    GELU,
    LAYERNORM,
    MATMUL_BIAS,
    SOFTMAX,
    Emulation,
    FusedOp,
    add_count_probes,
    emulate,
)
from beit_pipeline.graph import onnx_files
from beit_pipeline.graph.index import GraphIndex, node_key
from beit_pipeline.inference import sessions as onnx_models

if TYPE_CHECKING:
    from beit_pipeline.fidelity.runners import ImageRows

log = logging.getLogger(__name__)

ORDINARY_REL_ERR = 1e-2  # = fidelity_locate.REL_LIMIT (not imported: that module imports the report's)
MAX_KEEP = 12  # operators a suggestion may hold: more than that is no longer a targeted fix
SEARCH_IMAGES = 16  # images each trial of the search runs on (the full report's images score the result)
EMULATED_STAGES = ("om_emulation", "guide_om_emulation")  # the fidelity report's stages that emulate the OM
LISTED_IMAGES = 100  # image names a saturated node lists (50,000 images x dozens of nodes would bloat the JSON)


@dataclasses.dataclass
class EmulatedRun:
    """One run of an emulated OM on N images: its logits and, per rounding, the values clamped per image
    (counted; or 1 for "at least one" when the run was not asked to count)."""
    emulation: Emulation
    logits: np.ndarray  # (N, classes)
    clamped: np.ndarray  # (roundings, N)

    @property
    def saturating(self) -> list:
        """The indices of the roundings that clamp on some image, in graph order."""
        return [int(k) for k in np.flatnonzero(self.clamped.sum(axis=1) > 0)]


@dataclasses.dataclass
class SaturatedNode:
    """A rounding to fp16 that clamps, named by the node of the model given to atc."""
    node: str
    op_type: str
    position: str
    images: list  # names of the images where it clamps
    values_clamped: int
    nodes: list  # every node of the operator (a fused one has several), the names a keep_dtype file takes
    where: str = "output"  # "output", or "input" (an fp32 result of a kept operator rounded for this one)
    num_images: int = 0  # images where it clamps (``images`` names the first LISTED_IMAGES of them)


# ---------------------------------------------------------------- running the emulation

def run_emulated(model: onnx.ModelProto, keep: KeepList, images: np.ndarray | ImageRows, batch_size: int, folder: str,
                 count: bool = False) -> EmulatedRun:
    """Emulate ``model`` with ``keep`` and run it on ``images`` (N, 3, S, S: an array, or rows read on demand such
    as runners.ImageRows) in batches, with probes: each rounding's per-image extremes (and NaNs) show
    where it saturates; ``count``: a second pass over the saturating roundings and images counts the values
    clamped."""
    emulation = emulate(model, keep, probes=True)
    outputs = _run_batches(emulation.model, [], images, batch_size, os.path.join(folder, "probed_emulation.onnx"))
    logits, extra = outputs[0], dict(zip(outputs[1], outputs[2]))
    clamped = clamp_flags(emulation, extra, len(images))
    if count and clamped.any():
        _count(emulation, clamped, images, batch_size, folder)
    return EmulatedRun(emulation, logits, clamped)


def clamp_flags(emulation: Emulation, probes: dict, rows: int) -> np.ndarray:
    """(roundings, rows) int64: 1 where a rounding clamps on an image, from the peak probes' outputs (``probes``:
    {output name: per-image values}, as per_image gives them), 0 elsewhere and for roundings without probes."""
    clamped = np.zeros((len(emulation.roundings), rows), np.int64)
    for k, r in enumerate(emulation.roundings):
        if not r.probes:  # a result in fp16's range by construction
            continue
        peak = np.maximum(probes[r.probes["max"]], -probes[r.probes["min"]])
        clamped[k] = (peak >= FP16_OVERFLOW) | (probes[r.probes["nan"]] > 0 if "nan" in r.probes else False)
    return clamped


class ClampCounter:
    """The exact number of values each of the roundings ``rows`` clamps, per image: the emulation with count
    probes for those roundings only (a second pass, run on the images where the peak probes saw a clamp)."""

    def __init__(self, emulation: Emulation, rows: list, path: str):
        counted = onnx.ModelProto()
        counted.CopyFrom(emulation.model)
        self.rows = list(rows)
        self.names = add_count_probes(counted, [emulation.roundings[k] for k in self.rows])
        onnx_files.save_model(counted, path)
        self.session = onnx_models.open_session(path)
        self.input = self.session.get_inputs()[0].name

    def count(self, batch: np.ndarray, real: int) -> np.ndarray:
        """(len(rows), real): the values clamped on the ``real`` first images of a model batch."""
        out = self.session.run(self.names, {self.input: batch})
        return np.stack([per_image(v, real) for v in out]).astype(np.int64)


def _count(emulation: Emulation, clamped: np.ndarray, images, batch_size: int, folder: str) -> None:
    """Replace the saturating rows of ``clamped`` by the values clamped, from a run over the images that saturate."""
    rows = [int(k) for k in np.flatnonzero(clamped.sum(axis=1) > 0)]
    hit = np.flatnonzero(clamped.sum(axis=0) > 0)
    counter = ClampCounter(emulation, rows, os.path.join(folder, "counted_emulation.onnx"))
    hits = images[hit]
    for start in range(0, len(hit), batch_size):
        real = np.asarray(hits[start:start + batch_size])
        batch = np.zeros((batch_size,) + real.shape[1:], np.float32)
        batch[:len(real)] = real
        clamped[np.ix_(rows, hit[start:start + len(real)])] = counter.count(batch, len(real))


def _run_batches(model: onnx.ModelProto, wanted: list, images, batch_size: int, path: str) -> tuple:
    """(logits, output names, [per-image values]) of ``model`` on ``images`` in zero-padded batches; the outputs
    after the first (``wanted``, or all of them), each as one value per real image."""
    onnx_files.save_model(model, path)
    session = onnx_models.open_session(path)
    name = session.get_inputs()[0].name
    names = wanted or [o.name for o in session.get_outputs()[1:]]
    logits, values = [], {n: [] for n in names}
    for start in range(0, len(images), batch_size):
        rows = images[start:start + batch_size]
        batch = np.zeros((batch_size,) + images.shape[1:], np.float32)
        batch[:len(rows)] = rows
        out = session.run([session.get_outputs()[0].name] + names, {name: batch})
        logits.append(out[0][:len(rows)])
        for n, v in zip(names, out[1:]):
            values[n].append(per_image(v, len(rows)))
    del session  # the file is rewritten by the next run in its folder, removed with it
    stacked = [np.concatenate(values[n]) if values[n] else np.zeros(0) for n in names]
    return np.concatenate(logits) if logits else np.zeros((0, 0)), names, stacked


def per_image(values: np.ndarray, rows: int) -> np.ndarray:
    """A probe's values for the real rows of a batch; a tensor without a batch axis gives one value for all."""
    values = np.asarray(values).reshape(-1)
    return values[:rows] if values.size >= rows else np.full(rows, values.max(initial=0))


def readable_positions(model: onnx.ModelProto) -> dict:
    """{tensor: "block 0, attention scores q @ k^T"} from --locate's reading of a BEiT graph ({} for others)."""
    from beit_pipeline.fidelity import locate as fidelity_locate

    gi = GraphIndex(model)
    try:
        found = fidelity_locate.positions(gi, fidelity_locate.layout(gi))
    except (IndexError, StopIteration, KeyError):  # not a BEiT: no blocks to name
        return {}
    return {tensor: where.rsplit(" (", 1)[0] for tensor, where in found.items()}


def saturated_nodes(run: EmulatedRun, names: list, positions: dict) -> list:
    """[SaturatedNode] of every rounding of ``run`` that clamps, in graph order (each naming at most LISTED_IMAGES
    of its images, in ``names``' order; ``num_images`` counts them all)."""
    found = []
    for k in run.saturating:
        rounding = run.emulation.roundings[k]
        hit = run.clamped[k]
        where_hit = np.flatnonzero(hit)
        images = [names[i] for i in where_hit[:LISTED_IMAGES]]
        ops = rounding.fixers
        if not ops:  # the graph input: outside every operator
            found.append(SaturatedNode("(graph input)", "input", "model input", images, int(hit.sum()), [],
                                       num_images=len(where_hit)))
            continue
        op = ops[0]
        where = "output" if rounding.operator is not None else "input"
        position = positions.get(op.output, "?") + ("" if where == "output" else ", reading a kept operator's "
                                                                                  "fp32 result")
        found.append(SaturatedNode(op.last.name, op.kind, position, images, int(hit.sum()),
                                   [n.name for o in ops for n in o.nodes], where, len(where_hit)))
    return found


def describe(node: SaturatedNode) -> str:
    """One line: the node, where it is, how many images and values."""
    return (f"{node.op_type} node '{node.node}' at {node.position} ({node.where}): {node.values_clamped} values "
            f"clamped to +-65504 on {node.num_images or len(node.images)} image(s)")


def log_saturation(stage: str, nodes: list) -> None:
    """The first three saturating nodes of a stage (``nodes`` as dicts) in the log."""
    for node in nodes[:3]:
        log.info(f"  {stage}: fp16 saturates: {describe(SaturatedNode(**node))}")
    if len(nodes) > 3:
        log.info(f"  {stage}: ... and {len(nodes) - 3} more saturating node(s)")


def markdown_line(stage: str, nodes: list, images_run: int) -> str:
    """The report's line about an emulated stage's saturation (``nodes`` as dicts) on the images it ran."""
    on = f"on the {images_run} images this stage ran"
    if not nodes:
        return f"- {stage}: no fp16 rounding saturates (the 310P clamps overflow to +-65504) {on}."
    first = SaturatedNode(**nodes[0])
    more = f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""
    return (f"- {stage}: fp16 saturates at {len(nodes)} node(s) {on}: first {describe(first)}{more} "
            "(`beit_fidelity.py --suggest_keep_dtype` finds operators to keep in fp32).")


def first_saturation(model_path: str, keep: KeepList, batch: np.ndarray, names: list) -> Optional[SaturatedNode]:
    """The first rounding that clamps on one batch (``names`` its real rows), or None."""
    model = onnx.load(model_path)
    with tempfile.TemporaryDirectory(prefix=".fp16_overflow_", dir=os.path.dirname(os.path.abspath(model_path))) \
            as folder:
        run = run_emulated(model, keep, batch[:len(names)], batch.shape[0], folder, count=True)
    if not run.saturating:
        return None
    return saturated_nodes(run, names, readable_positions(model))[0]


# ---------------------------------------------------------------- judging a keep list

@dataclasses.dataclass
class Verdict:
    """How an emulated run compares with the fp32 model on the same images."""
    good: bool
    why: str
    max_rel_err: float
    agree_top1: float  # percent of images with fp32's Top-1
    saturating: int  # roundings that clamp
    unexplained_flips: int  # images that flip although fp32's margin is beyond the ordinary error


def judge(run: EmulatedRun, reference: np.ndarray) -> Verdict:
    """Whether ``run`` is within the emulation's ordinary error of ``reference`` (the fp32 model's logits)."""
    errors = onnx_models.output_errors(run.logits, reference)
    err = errors["max_rel"]
    same = run.logits.argmax(axis=1) == reference.argmax(axis=1)
    margins = relative_margins(reference)
    unexplained = int(np.count_nonzero(~same & (margins > 2 * ORDINARY_REL_ERR)))
    agree = 100.0 * float(same.mean())
    saturating = len(run.saturating)
    problems = ([f"{saturating} fp16 rounding(s) saturate"] if saturating else []) + \
        ([f"max rel err {err:.3e} > {ORDINARY_REL_ERR:g}"] if not err <= ORDINARY_REL_ERR else []) + \
        ([f"{unexplained} Top-1 flip(s) beyond a near tie"] if unexplained else [])
    why = "; ".join(problems) or (f"no rounding saturates, max rel err {err:.3e} <= {ORDINARY_REL_ERR:g}, "
                                  f"Top-1 agrees with fp32 on {agree:.2f}%"
                                  + (" (the rest near ties)" if agree < 100 else ""))
    return Verdict(not problems, why, err, agree, saturating, unexplained)


def relative_margins(logits: np.ndarray) -> np.ndarray:
    """Each image's Top-1 margin (best minus second best logit) over the largest |logit| of all images."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    scale = float(np.abs(logits).max()) or 1.0
    return (top2[:, 1] - top2[:, 0]) / scale


def trial_images(reference: np.ndarray, run: EmulatedRun, limit: int = SEARCH_IMAGES) -> list:
    """Which of the search's images each trial runs on (a trial of BEiT-base on every image would be a pass):
    those where the emulation flips or saturates, then the smallest fp32 margins (where a change shows first),
    then an evenly spread sample of the rest.  The search's images themselves are the ones where the emulated
    OM can matter, chosen by the fidelity report's screen (keep_suggestion.images_that_can_matter).
    """
    flipped = np.flatnonzero(run.logits.argmax(axis=1) != reference.argmax(axis=1))
    saturated = np.flatnonzero(run.clamped.sum(axis=0) > 0)
    by_margin = np.argsort(relative_margins(reference), kind="stable")
    chosen = list(dict.fromkeys([*flipped, *saturated]))[:limit // 2]
    for i in by_margin:
        if len(chosen) >= limit - limit // 4:
            break
        chosen += [] if i in chosen else [i]
    rest = [i for i in range(len(reference)) if i not in chosen]
    step = max(1, len(rest) // max(1, limit - len(chosen)))
    chosen += rest[::step][:limit - len(chosen)]
    return sorted(int(i) for i in chosen)


# ---------------------------------------------------------------- FLOPs

def operator_flops(gi: GraphIndex, op: FusedOp) -> float:
    """Floating-point operations of one emulated operator, from the inferred shapes (an estimate for the
    element-wise ones: a few per value)."""
    out = gi.shape(op.output) or []
    values = float(np.prod([d or 1 for d in out])) if out else 1.0
    first = op.nodes[0]
    if first.op_type in ("MatMul", "Gemm"):
        inner = (gi.shape(first.input[0]) or [1])[-1] or 1
        return 2.0 * values * inner + (values if op.kind == MATMUL_BIAS else 0.0)
    if first.op_type == "Conv":
        weight = gi.shape(first.input[1]) or [1, 1, 1, 1]
        return 2.0 * values * float(np.prod(weight[1:]))
    per_value = {LAYERNORM: 8.0, SOFTMAX: 5.0, GELU: 10.0}.get(op.kind, 1.0)
    return per_value * values


def flops_share(gi: GraphIndex, operators: list, kept_keys: set) -> float:
    """The share of the model's FLOPs in the operators whose key (node_key of the last node) is kept."""
    total = sum(operator_flops(gi, op) for op in operators)
    kept = sum(operator_flops(gi, op) for op in operators if node_key(op.last) in kept_keys)
    return kept / total if total else 0.0


# ---------------------------------------------------------------- the search

def keep_list_of(operators: list) -> KeepList:
    """The keep_dtype names of ``operators``: every node of each (a fused operator's name may not survive)."""
    return KeepList([n.name for op in operators for n in op.nodes if n.name])


@dataclasses.dataclass
class Suggestion:
    """What suggest() found: the operators to keep, how the emulation does with them, and the trials run."""
    operators: list  # [FusedOp] of the fp32 model, in graph order
    verdict: Verdict
    baseline: Verdict
    trials: int
    images: list  # indices of the images searched

    @property
    def keep(self) -> KeepList:
        return keep_list_of(self.operators)


def suggest(model: onnx.ModelProto, images: np.ndarray, reference: np.ndarray, batch_size: int, folder: str,
            baseline: Optional[EmulatedRun] = None) -> Suggestion:
    """A small set of operators of ``model`` to keep in fp32 (see the module's docstring for the search)."""
    baseline = baseline or run_emulated(model, KeepList([]), images, batch_size, folder)
    base_verdict = judge(baseline, reference)
    subset = trial_images(reference, baseline)
    trials = [0]

    def measure(ops: list) -> tuple:
        trials[0] += 1
        run = run_emulated(model, keep_list_of(ops), images[subset], batch_size, folder)
        return judge(run, reference[subset]), run

    if base_verdict.good:
        return Suggestion([], base_verdict, base_verdict, 0, subset)
    chosen, (verdict, run) = [], (base_verdict, baseline)
    if baseline.saturating:
        chosen, verdict, run = keep_saturating(baseline, base_verdict, measure)
    if not verdict.good and len(chosen) < MAX_KEEP:
        ranked = rank_by_error(model, run.emulation, images[subset][:batch_size], batch_size, folder)
        chosen, verdict = add_until_good(chosen, ranked, measure)
    if verdict.good:
        chosen, verdict = drop_unneeded(chosen, verdict, measure)
    order = {node_key(op.last): k for k, op in enumerate(baseline.emulation.operators)}
    chosen.sort(key=lambda op: order[node_key(op.last)])
    return Suggestion(chosen, verdict, base_verdict, trials[0], subset)


def keep_saturating(run: EmulatedRun, verdict: Verdict, measure: Callable) -> tuple:
    """Keep the operators of the first saturating rounding until none saturates: (ops, verdict, run)."""
    chosen = []
    while run.saturating and len(chosen) < MAX_KEEP:
        fixers = run.emulation.roundings[run.saturating[0]].fixers
        keys = {node_key(op.last) for op in chosen}
        new = [op for op in fixers if node_key(op.last) not in keys]
        if not new:  # the graph input itself: nothing to keep
            log.warning("the model's input saturates in fp16: no operator can be kept against that")
            break
        chosen += new
        verdict, run = measure(chosen)
        log.info(f"  keep {', '.join(op.last.name for op in new)}: {verdict.why}")
    return chosen, verdict, run


def add_until_good(chosen: list, ranked: list, measure: Callable) -> tuple:
    """Add ``ranked`` operators one at a time until the verdict is good or MAX_KEEP is reached."""
    keys = {node_key(op.last) for op in chosen}
    verdict = None
    for op in ranked:
        if node_key(op.last) in keys:
            continue
        chosen = chosen + [op]
        keys.add(node_key(op.last))
        verdict, _ = measure(chosen)
        log.info(f"  keep {op.last.name}: {verdict.why}")
        if verdict.good or len(chosen) >= MAX_KEEP:
            break
    return chosen, verdict or measure(chosen)[0]


def drop_unneeded(chosen: list, verdict: Verdict, measure: Callable) -> tuple:
    """Drop, last added first, every operator the list stays good without."""
    for op in list(reversed(chosen)):
        trial = [o for o in chosen if o is not op]
        trial_verdict, _ = measure(trial)
        if trial_verdict.good:
            log.info(f"  drop {op.last.name}: not needed")
            chosen, verdict = trial, trial_verdict
    return chosen, verdict


def rank_by_error(model: onnx.ModelProto, emulation: Emulation, rows: np.ndarray, batch_size: int,
                  folder: str) -> list:
    """The emulation's operators (not kept yet), the largest error jump first: each operator's output error
    against the fp32 model over the largest error of its inputs, tensor by tensor as --locate compares."""
    from beit_pipeline.fidelity import locate as fidelity_locate

    kept = {node_key(op.last) for op in emulation.kept}
    operators = [op for op in emulation.operators if node_key(op.last) not in kept]
    names = [op.output for op in operators]
    batch = np.zeros((batch_size,) + rows.shape[1:], np.float32)
    batch[:len(rows)] = rows
    with tempfile.TemporaryDirectory(prefix="rank_", dir=folder) as sub:
        paired = fidelity_locate.PairedRun(model, emulation.model, names, sub)
        errors = dict(paired.errors(paired.names, batch, lambda name, rel, cos: (name, rel)))

    def jump(op: FusedOp) -> float:
        inputs = [errors.get(i, 0.0) for n in op.nodes for i in n.input if i in errors]
        return errors.get(op.output, 0.0) / max(max(inputs, default=0.0), 1e-4)

    return sorted((op for op in operators if op.output in errors), key=jump, reverse=True)


def optype_alternatives(operators: list) -> list:
    """The ``OpType::`` types to offer for chosen operators whose names atc may lose in fusion."""
    return list(dict.fromkeys(ASCEND_TYPES[op.kind] for op in operators
                              if op.kind in FUSED_KINDS or op.kind in ASCEND_TYPES))
