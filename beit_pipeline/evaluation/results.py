"""The result files of an evaluation: the guide's accuracy JSON, our details beside it, and comparisons.

Every result file's name starts with ``acc_bs{N}``:

- ``acc_bs{N}.json`` is byte for byte what the guide's own beit_eval_acc.py writes
  (Ascend/ModelZoo-PyTorch ACL_PyTorch/contrib/cv/classfication/Beit/beit_eval_acc.py,
  create_visualization_statistical_result with topn=1): ``json.dump`` of a title and three
  entries on one compact line, no newline, the Top-1 as ``str(round(acc * 100, 2)) + '%'``
  computed in numpy float64 as it computes it;
- ``acc_bs{N}_details.json`` holds our figures: counts and 95% intervals, the labelled
  images not evaluated, and what the number was made from (checkpoint, image set, label
  file, model, engine, precision), so that no number is ever read without them.

A result made with a non-default engine or precision is named with a tag
(``acc_bs8_bf16.json``), and ``cost_lines`` compares it with the fp32 one image by image.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from beit_pipeline import files, fingerprint
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation import stats
from beit_pipeline.graph import onnx_files
from beit_pipeline.pipeline.chain import details_name  # noqa: F401 (the rule lives with the chain's names)

if TYPE_CHECKING:
    import numpy as np

    from beit_pipeline.evaluation.accuracy import Evaluation

# numpy is imported where it is used: run_all.sh asks workstate (which imports this module) a dozen questions
# per run, and numpy's import alone doubles the time of each.

DETAILS_FORMAT = 1


# ---------------------------------------------------------------- names

def result_tag(precision: str = "fp32", providers: str = "") -> str:
    """The tag of a result made with a non-default engine or precision: ``""``, ``_bf16``, ``_cpu``,
    ``_openvino_bf16``; a tagged run writes its own outputs and result files beside the default ones."""
    parts = [p.strip().lower() for p in (providers or "").split(",") if p.strip()]
    tag = "+".join(parts)
    if precision and precision != "fp32":
        tag = f"{tag}_{precision}" if tag else precision
    return f"_{tag}" if tag else ""


# ---------------------------------------------------------------- the guide's JSON

def guide_percent(hits: int, count: int) -> str:
    """The guide's Top-k text: np.cumsum(count_hit) / count, then str(round(accuracy[i] * 100, 2)) + '%'."""
    import numpy as np
    accuracy = np.cumsum(np.array([hits], dtype=np.float64)) / count
    return str(round(accuracy[0] * 100, 2)) + "%"


def guide_json_text(num_images: int, num_classes: int, top1_hits: int) -> str:
    """The guide's accuracy JSON, exactly: title, three entries (images, classes, Top1), one line, no newline."""
    table = {"title": "Overall statistical evaluation",
             "value": [{"key": "Number of images", "value": str(num_images)},
                       {"key": "Number of classes", "value": str(num_classes)},
                       {"key": "Top1 accuracy", "value": guide_percent(top1_hits, num_images)}]}
    return json.dumps(table)


# ---------------------------------------------------------------- statistics

def wilson_interval(hits: int, count: int, z: float = stats.Z95) -> list[float]:
    """The Wilson score interval of a rate, in percent to 4 places: [low, high] (stats.wilson's)."""
    return [round(100.0 * bound, 4) for bound in stats.wilson(hits, count, z)]


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value of ``gained`` vs ``lost`` discordant images (binomial, p = 1/2)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def pack_hits(hits: Sequence[bool] | np.ndarray) -> str:
    """Per-image Top-1 hits (in the evaluation's image order) as hex of packed bits."""
    import numpy as np
    return np.packbits(np.asarray(hits, dtype=bool)).tobytes().hex()


def unpack_hits(text: str, count: int) -> np.ndarray:
    """The per-image Top-1 hits of pack_hits, as a bool array."""
    import numpy as np
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:count].astype(bool)


# ---------------------------------------------------------------- what a result was made from

@dataclasses.dataclass
class Provenance:
    """What an evaluation's numbers were made from; None where it cannot be known."""

    images: dict  # {"fingerprint", "manifest", "source", "order"}: the image set and its row order
    labels: dict  # {"path", "sha256"}
    outputs: dict  # {"path", "engine", "precision", "backend", "runner"}
    model: dict = None  # {"path", "sha256"}
    checkpoint: dict = None  # {"path", "sha256"}


CACHE_FROM = 64 << 20  # bytes: smaller files are hashed afresh (under 0.1 s), larger ones through the digest cache


def file_record(path: str | None) -> dict[str, str] | None:
    """{"path", "sha256"} of a file (a model's .data file too), or None for no path."""
    if not path:
        return None
    path = os.path.abspath(path)
    if os.path.isdir(path):  # class folders (label_formats): the labels are the names below it
        names = sorted(os.path.relpath(os.path.join(root, n), path) for root, _, found in os.walk(path) for n in found)
        return {"path": path, "sha256": "names:" + fingerprint.digest_json(names)}
    digest = "+".join(fingerprint.file_digest(p, None if os.path.getsize(p) >= CACHE_FROM else "")
                      for p in onnx_files.model_files(path))
    return {"path": path, "sha256": digest}


# Where beit_infer.py leaves its engine, precision, runner and model beside an output folder: its own figures
# (issue 18 moves them out of ais_bench's summary) or, before that, ais_bench's summary with keys of ours.
RUN_FIGURES_SUFFIXES = ("_beit_summary.json", "_summary.json")


def inference_facts(folder: str) -> dict:
    """Which engine and precision made the outputs in ``folder``, and the model it names, from what the run
    left beside the folder (RUN_FIGURES_SUFFIXES); outputs with no such record came from ais_bench (an OM on
    the NPU, at the precision atc compiled it to)."""
    for suffix in RUN_FIGURES_SUFFIXES:
        figures = files.read_json(os.path.normpath(folder) + suffix) or {}
        if isinstance(figures.get("engine"), str):
            return {"engine": figures["engine"], "precision": figures.get("precision"), "backend": "cpu",
                    "runner": figures.get("runner"), "model": figures.get("model")}
    return dict(ASCEND_FACTS)


ASCEND_FACTS = {"engine": "ais_bench", "precision": "atc's (the OM's)", "backend": "ascend", "runner": None,
                "model": None}


def provenance(evaluation: Evaluation, folder: str, label_path: str, prep_image: str | None = None,
               checkpoint: str | None = None, model_file: str | None = None) -> Provenance:
    """The Provenance of an Evaluation of the outputs in ``folder``; an .om ``model_file`` runs only on the NPU,
    whatever a summary beside the folder says."""
    facts = ASCEND_FACTS if str(model_file or "").endswith(".om") else inference_facts(folder)
    facts = dict(facts)
    manifest = evaluation.manifest or {}
    names = [n for b in manifest.get("batches", []) for n in b.get("images", [])]
    images = {"fingerprint": manifest.get("fingerprint"), "source": manifest.get("source"),
              "manifest": os.path.abspath(prep_image) if prep_image else None,
              "order": fingerprint.digest_json(names) if names else None, "rows_from": evaluation.rows_from}
    model = model_file or facts.pop("model", None)
    facts.pop("model", None)
    return Provenance(images=images, labels=file_record(label_path),
                      outputs=dict(facts, path=os.path.abspath(folder)),
                      model=file_record(model) if model and os.path.isfile(model) else None,
                      checkpoint=file_record(checkpoint))


def details(evaluation: Evaluation, source: Provenance, result_name: str) -> dict:
    """Our figures beside the guide's JSON: counts, intervals, the subset, what the numbers were made from."""
    acc = evaluation.accuracy
    topk = {f"top{k}": 100.0 * hits / acc.num_images for k, hits in enumerate(acc.correct, 1)}
    return {
        "format": DETAILS_FORMAT,
        "result": result_name,
        "num_images": acc.num_images,
        "num_classes": acc.num_classes,
        **topk,
        "top1_correct": acc.correct[0],
        "top5_correct": acc.correct[-1],
        "correct": list(acc.correct),
        "top1_interval_95": wilson_interval(acc.correct[0], acc.num_images),
        "top5_interval_95": wilson_interval(acc.correct[-1], acc.num_images),
        "labelled_images": evaluation.labelled,
        "labelled_not_evaluated": evaluation.not_evaluated,
        "subset": evaluation.subset_statement(),
        "rows_from": evaluation.rows_from,
        "skipped": list(evaluation.skipped),
        **dataclasses.asdict(source),
        "top1_hits": pack_hits(acc.top1_hits),
    }


# ---------------------------------------------------------------- reading and comparing

def read_details(path: str) -> dict:
    """A details JSON with numeric top1, top5 and num_images; PipelineFileError naming the file otherwise."""
    data = files.read_json(path)
    if data is None or not all(isinstance(data.get(k), (int, float)) for k in ("top1", "top5", "num_images")):
        raise PipelineFileError(f"{path}: not a result details JSON (numeric top1, top5 and num_images)")
    return data


def same_inputs(a: dict, b: dict) -> bool:
    """Whether two results scored the same images in the same order against the same labels and checkpoint."""
    def key(d):
        return ((d.get("images") or {}).get("order"), (d.get("images") or {}).get("fingerprint"),
                (d.get("labels") or {}).get("sha256"), (d.get("checkpoint") or {}).get("sha256"),
                d.get("num_images"))
    return key(a) == key(b) and None not in key(a)


def describe_run(d: dict) -> str:
    """``openvino bf16`` / ``ais_bench atc's (the OM's)``: the engine and precision of a result."""
    outputs = d.get("outputs") or {}
    return f"{outputs.get('engine', '?')} {outputs.get('precision', '?')}"


def cost_line(reference: dict, other: dict, reference_name: str, other_name: str) -> str:
    """One line: the Top-1 of ``other`` against ``reference`` on the same images, with the paired counts."""
    import numpy as np
    n = int(reference["num_images"])
    ref_hits = unpack_hits(reference["top1_hits"], n)
    hits = unpack_hits(other["top1_hits"], n)
    gained, lost = int(np.count_nonzero(hits & ~ref_hits)), int(np.count_nonzero(ref_hits & ~hits))
    delta = float(other["top1"]) - float(reference["top1"])
    return (f"Top-1 cost: {describe_run(other)} ({other_name}) against {describe_run(reference)} ({reference_name}) on the "
            f"same {n} images: Top-1 {other['top1']:.2f}% vs {reference['top1']:.2f}% ({delta:+.2f} points; "
            f"{lost} images lost, {gained} gained; exact McNemar p = {mcnemar_p(gained, lost):.3g})")
