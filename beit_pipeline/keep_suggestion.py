"""beit_fidelity.py --suggest_keep_dtype: the keep_dtype file for atc, found on the CPU.

On the fidelity report's images it emulates the OM of beit_mg_bs{N}.onnx (the model
given to atc, whose node names the file holds), finds a small set of operators to
keep in fp32 (fp16_overflow.suggest) and writes

* ``keep_dtype_bs{N}.cfg``: atc's format, a ``#`` line saying what made it, one node
  name per line, and ``OpType::`` alternatives commented out;
* ``keep_dtype_bs{N}.json``: the list, the emulated stage with it and without it
  (``top1``, ``agree_top1``, ``max_rel_err``, ``min_cosine``, ``num_images``), the
  share of the model's FLOPs the list keeps in fp32, and why;

then prints the atc command line with ``--keep_dtype``.  An empty list is an answer:
the files are written and the reason is printed.
"""

import dataclasses
import logging
import os
import tempfile
from typing import Optional

import numpy as np
import onnx

from beit_pipeline import batches, fidelity, fp16_overflow, keep_dtype, labels, onnx_models
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation import label_ranks, percent
from beit_pipeline.graph_index import GraphIndex, node_key

log = logging.getLogger("beit." + __name__)

DEFAULT_IMAGES = 64  # without --max_images: the report's default sample size, about 40 MB of pixels


def paths(wf: fidelity.WorkFolder) -> tuple:
    """(keep_dtype_bs{N}.cfg, keep_dtype_bs{N}.json) in the work folder."""
    return wf.path(f"keep_dtype_bs{wf.batch_size}.cfg"), wf.path(f"keep_dtype_bs{wf.batch_size}.json")


@dataclasses.dataclass
class Images:
    """The images a suggestion is measured on: names, labels and pixels, in manifest order."""
    names: list
    labels: np.ndarray
    pixels: np.ndarray  # (N, 3, S, S)


def read_images(wf: fidelity.WorkFolder, max_images: Optional[int]) -> Images:
    """The first ``max_images`` images of prep_image_bs{N} (DEFAULT_IMAGES for None: they are held in memory,
    600 KB each at 224 px), with their labels."""
    max_images = max_images or DEFAULT_IMAGES
    prep = wf.file("prep")
    if not os.path.isdir(prep):
        raise PipelineFileError(f"{prep}: no preprocessed batches (run_all.sh's preprocess step); nothing written")
    manifest = batches.require_complete_manifest(prep)
    if manifest["batch_size"] != wf.batch_size:
        raise PipelineFileError(f"{prep}: holds batches of {manifest['batch_size']}, not {wf.batch_size}")
    size, names, pixels = manifest.get("image_size", batches.IMAGE_SIZE), [], []
    for entry in manifest["batches"]:
        take = entry["images"][:max_images - len(names)]
        if not take:
            break
        pixels.append(batches.read_batch(os.path.join(prep, entry["file"]), image_size=size)[:len(take)])
        names += take
    found = labels.read_labels(wf.label_file).match(names)
    return Images(names, np.array([found[n] for n in names], np.int64), np.concatenate(pixels))


def run(wf: fidelity.WorkFolder, max_images: Optional[int]) -> dict:
    """Search, write the two files, print the atc command line; returns the JSON record."""
    fidelity.require_stage(wf, "graph_modify")
    images = read_images(wf, max_images)
    mg_path = fidelity.ensure_model(wf, "graph_modify", fidelity.read_derived_record(wf))
    model = onnx.load(mg_path)
    log.info(f"suggest keep_dtype: {len(images.names)} images of {wf.files()['prep']}, {os.path.basename(mg_path)}")
    reference = pytorch_logits(wf.checkpoint, images.pixels)
    session = onnx_models.open_session(mg_path)
    fp32 = np.concatenate([onnx_models.run_session(session, batch, mg_path)[:rows]
                           for batch, rows in padded_batches(images.pixels, wf.batch_size)])
    with tempfile.TemporaryDirectory(prefix=".keep_dtype_", dir=wf.workdir) as folder:
        baseline = fp16_overflow.run_emulated(model, keep_dtype.KeepList([]), images.pixels, wf.batch_size, folder,
                                              count=True)
        found = fp16_overflow.suggest(model, images.pixels, fp32, wf.batch_size, folder, baseline)
        final = baseline if not found.operators else fp16_overflow.run_emulated(
            model, found.keep, images.pixels, wf.batch_size, folder)
    result = build_record(wf, model, mg_path, found, images, reference, fp32, baseline, final)
    write(wf, result, found)
    announce(wf, result, mg_path, images)
    return result


def padded_batches(pixels: np.ndarray, batch_size: int):
    """(zero-padded batch, real rows) of ``pixels`` in the model's static batch size."""
    for start in range(0, len(pixels), batch_size):
        rows = pixels[start:start + batch_size]
        batch = np.zeros((batch_size,) + pixels.shape[1:], np.float32)
        batch[:len(rows)] = rows
        yield batch, len(rows)


def pytorch_logits(checkpoint: str, pixels: np.ndarray) -> np.ndarray:
    """The checkpoint's logits in PyTorch, fp32: the reference the stage numbers are scored against."""
    import torch

    from beit_pipeline import model as beit_model

    model = beit_model.build_model(beit_model.load_state_dict(checkpoint))[0]
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(pixels[k:k + 8]))).numpy()
                               for k in range(0, len(pixels), 8)])


def stage_numbers(name: str, logits: np.ndarray, reference: np.ndarray, images: Images) -> dict:
    """top1, agree_top1, max_rel_err, min_cosine, num_images of ``logits`` (labels; the pytorch ``reference``)."""
    count = len(images.names)
    ranks = label_ranks(logits, images.labels)
    a, b = np.asarray(logits, np.float64), np.asarray(reference, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1), 1.0)
    return {"name": name, "top1": percent(np.count_nonzero(ranks == 0), count),
            "agree_top1": percent(np.count_nonzero(logits.argmax(1) == reference.argmax(1)), count),
            "max_rel_err": onnx_models.output_errors(logits, reference)["max_rel"],
            "min_cosine": float(cosine.min()), "num_images": count}


def build_record(wf: fidelity.WorkFolder, model: onnx.ModelProto, mg_path: str, found: fp16_overflow.Suggestion,
                 images: Images, reference: np.ndarray, fp32: np.ndarray,
                 baseline: fp16_overflow.EmulatedRun, final: fp16_overflow.EmulatedRun) -> dict:
    """The JSON record of a suggestion (see the module's docstring)."""
    gi = GraphIndex(model)
    operators = baseline.emulation.operators
    kept_keys = {node_key(op.last) for op in found.operators}
    positions = fp16_overflow.readable_positions(model)
    verdict = fp16_overflow.judge(final, fp32)
    names = {n.name for n in model.graph.node}
    missing = keep_dtype.check_names(found.keep, names, mg_path)
    if missing:
        raise PipelineFileError(f"{mg_path}: the suggested names {missing} are not in the model atc is given")
    alternatives = fp16_overflow.optype_alternatives(found.operators)
    return {
        "model": os.path.basename(mg_path), "batch_size": wf.batch_size,
        "keep": found.keep.lines(),
        "operators": [{"kind": op.kind, "nodes": [n.name for n in op.nodes], "position": positions.get(op.output, "?"),
                       "fp32_flops_share": fp16_overflow.flops_share(gi, operators, {node_key(op.last)})}
                      for op in found.operators],
        "fp32_flops_share": fp16_overflow.flops_share(gi, operators, kept_keys),
        "why": ("nothing needs keeping: " if not found.operators else "") + verdict.why,
        "good": verdict.good,
        "stage": stage_numbers("om_emulation", final.logits, reference, images),
        "without_keep_dtype": stage_numbers("om_emulation", baseline.logits, reference, images),
        "fp32": stage_numbers("graph_modify", fp32, reference, images),
        "saturated_without_keep_dtype": [dataclasses.asdict(s) for s in fp16_overflow.saturated_nodes(
            baseline, images.names, positions)],
        "search": {"images": [images.names[i] for i in found.images], "trials": found.trials,
                   "ordinary_rel_err": fp16_overflow.ORDINARY_REL_ERR},
        "optype_alternatives": [{"line": keep_dtype.OPTYPE_PREFIX + t, "keeps_operators": sum(
            keep_dtype.ASCEND_TYPES.get(op.kind) == t for op in operators)} for t in alternatives],
        "names_checked_against": os.path.basename(mg_path),
    }


def write(wf: fidelity.WorkFolder, result: dict, found: fp16_overflow.Suggestion) -> None:
    cfg, js = paths(wf)
    made_by = (f"made by beit_fidelity.py --suggest_keep_dtype for {result['model']} on "
               f"{result['stage']['num_images']} images: {result['why']}")
    keep_dtype.write_files(cfg, js, found.keep, made_by, result,
                           [a["line"][len(keep_dtype.OPTYPE_PREFIX):] for a in result["optype_alternatives"]])


def announce(wf: fidelity.WorkFolder, result: dict, mg_path: str, images: Images) -> None:
    """Print what was found and the atc command line."""
    cfg, js = paths(wf)
    before, after = result["without_keep_dtype"], result["stage"]
    if result["keep"]:
        log.info(f"keep in fp32: {len(result['operators'])} operator(s), {len(result['keep'])} node name(s), "
                 f"{100 * result['fp32_flops_share']:.3f}% of the model's FLOPs")
        for op in result["operators"]:
            log.info(f"  {op['kind']} at {op['position']}: {', '.join(op['nodes'])}")
    else:
        log.info(result["why"])
    log.info(f"emulated OM without the list: Top-1 agrees with pytorch on {before['agree_top1']:.2f}%, max rel err "
             f"{before['max_rel_err']:.3e}; with it: {after['agree_top1']:.2f}%, {after['max_rel_err']:.3e} "
             f"(fp32: {result['fp32']['agree_top1']:.2f}%; {after['num_images']} images)")
    log.info(f"wrote {cfg} and {js}")
    size = images.pixels.shape[-1]
    command = keep_dtype.atc_command(os.path.basename(mg_path), os.path.basename(mg_path)[:-len(".onnx")],
                                     wf.batch_size, size, os.path.basename(cfg))
    log.info(f"atc with it (in {wf.workdir}; --soc_version as npu-smi reports):\n  {command}")
