"""What the HTML report shows, read from a work folder's files, tolerating any that is missing or older.

Every reader returns plain records (or None / an empty list) and never raises for a missing file or key:
the report says what it could not find instead.  The files, and who writes them:

- ``acc_bs{N}.json`` (beit_eval_acc.py; the guide's shape, plain numbers where present) and
  ``acc_bs{N}_details.json`` (our figures, where written);
- ``fidelity_bs{N}.json`` (beit_fidelity.py): ``stages`` with name, top1, top5, agree_top1, max_rel_err,
  min_cosine, num_images, flipped, and where present the 95% intervals (``top1_ci95``, ``agree_top1_ci95``,
  ``delta_top1_ci95``), ``flipped_detail`` (image, label, both top-5 ``[class, logit]`` lists) and
  ``saturated_nodes``; intervals missing there are computed here (Wilson) from the counts;
- ``locate_{stage}_bs{N}.json`` (beit_fidelity.py --locate): the error after each block and, for an emulated
  stage, the first node whose fp16 rounding saturates (``first_saturating``);
- ``ais_out/*_summary.json`` and ``ais_out/*_beit_summary.json`` (beit_infer.py, ais_bench): engine,
  precision and throughput per output folder;
- ``keep_dtype_bs{N}.json`` / ``.cfg`` (beit_fidelity.py --suggest_keep_dtype);
- ``.run_all_run.json`` (run_all.sh's parameters) and the preprocessing manifest: the checkpoint, labels and
  image folder.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

from beit_pipeline.evaluation import stats
from beit_pipeline.pipeline.chain import OUTPUTS_ROOT, PARTIAL, RUN, ChainFiles


def read_json(path: str) -> Any:
    """The JSON value in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def number(value: object) -> float | None:
    """A float from a number or a string such as '84.68%'; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            return float(value.strip().rstrip("%"))
        except ValueError:
            return None
    return None


def wilson(hits: int, count: int) -> tuple | None:
    """The 95% Wilson score interval of hits/count (stats.wilson's), in percent; None without a count."""
    if not count:
        return None
    low, high = stats.wilson(hits, count)
    return 100 * low, 100 * high


def interval(value: object) -> tuple | None:
    """A [low, high] pair from a file, or None."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(number(v) is not None for v in value):
        return number(value[0]), number(value[1])
    return None


# ---------------------------------------------------------------- the records

@dataclasses.dataclass
class Accuracy:
    path: str
    num_images: int | None
    top1: float | None
    top5: float | None
    top1_ci: tuple | None


@dataclasses.dataclass
class Flip:
    image: str
    label: int | None
    pytorch_top5: list  # [(class, logit)]
    stage_top5: list


@dataclasses.dataclass
class Stage:
    name: str
    top1: float | None
    top1_ci: tuple | None
    agree: float | None
    agree_ci: tuple | None
    delta: float | None
    delta_ci: tuple | None
    max_rel_err: float | None
    min_cosine: float | None
    num_images: int | None
    flipped: list  # image names
    flips: list  # [Flip] where the file has the top-5 lists
    saturated: list | None  # saturated_nodes entries (dicts); None where the stage records none (not emulated, older)
    images_run: int | None = None  # the images the stage ran (saturated_nodes is about those)


@dataclasses.dataclass
class BlockErrors:
    stage: str
    reference: str
    first: str | None  # "Softmax at block 0, attention softmax"
    blocks: list  # [(rel_err, cosine)], block 0 first
    saturating: dict | None = None  # the first node whose fp16 rounding saturates (emulated stages; {} for none)


@dataclasses.dataclass
class Throughput:
    folder: str
    engine: str | None
    precision: str | None
    provider: str | None
    img_per_s: float | None
    real_images: int | None
    measured_at: str | None


@dataclasses.dataclass
class KeepSuggestion:
    keep: list
    operators: list
    why: str
    cfg_path: str | None
    cfg_text: str


@dataclasses.dataclass
class ReportData:
    workdir: str
    batch_size: int
    inputs: dict  # checkpoint, label_file, image_folder, model: what the run read
    accuracy: Accuracy | None
    stages: list
    fidelity_images: int | None
    blocks: list
    throughput: list
    keep: KeepSuggestion | None
    missing: list  # what the report could not find, as sentences


# ---------------------------------------------------------------- the readers

def load_accuracy(workdir: str, batch_size: int) -> Accuracy | None:
    path = os.path.join(workdir, ChainFiles(batch_size).accuracy)
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    details = read_json(os.path.join(workdir, ChainFiles(batch_size).accuracy_details))
    merged = dict(data, **details) if isinstance(details, dict) else data
    entries = {e.get("key"): e.get("value") for e in data.get("value", []) if isinstance(e, dict)}
    count = number(merged.get("num_images")) or number(entries.get("Number of images"))
    top1 = number(merged.get("top1")) if "top1" in merged else number(entries.get("Top1 accuracy"))
    top5 = number(merged.get("top5"))
    hits = number(merged.get("top1_correct"))
    if hits is None and top1 is not None and count:
        hits = round(top1 * count / 100)
    ci = wilson(int(hits), int(count)) if hits is not None and count else None
    return Accuracy(path, int(count) if count else None, top1, top5, ci)


def top5_list(value: object) -> list:
    """[(class, logit)] from [[c, l], ...] or [{"class": c, "logit": l}, ...]; [] otherwise."""
    pairs = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            pairs.append((int(item[0]), number(item[1])))
        elif isinstance(item, dict) and "class" in item:
            pairs.append((int(item["class"]), number(item.get("logit"))))
    return pairs


def load_flips(stage: dict) -> list:
    flips = []
    for entry in stage.get("flipped_detail") or []:
        if isinstance(entry, dict) and (entry.get("image") or entry.get("name")):
            label = entry.get("label")
            flips.append(Flip(str(entry.get("image") or entry.get("name")), label if isinstance(label, int) else None,
                              top5_list(entry.get("pytorch")), top5_list(entry.get("stage"))))
    return flips


def _int(value) -> int | None:
    found = number(value)
    return int(found) if found is not None else None


def load_stage(stage: dict) -> Stage:
    count = number(stage.get("num_images"))
    count = int(count) if count else None
    top1, agree = number(stage.get("top1")), number(stage.get("agree_top1"))
    flipped = [str(n) for n in stage.get("flipped") or [] if isinstance(n, str)]
    top1_ci = interval(stage.get("top1_ci95")) or (wilson(round(top1 * count / 100), count)
                                                    if top1 is not None and count else None)
    agree_ci = interval(stage.get("agree_top1_ci95")) or (wilson(round(agree * count / 100), count)
                                                          if agree is not None and count else None)
    return Stage(str(stage.get("name", "?")), top1, top1_ci, agree, agree_ci, number(stage.get("delta_top1")),
                 interval(stage.get("delta_top1_ci95")), number(stage.get("max_rel_err")),
                 number(stage.get("min_cosine")), count, flipped, load_flips(stage),
                 [s for s in stage["saturated_nodes"] if isinstance(s, dict)]
                 if isinstance(stage.get("saturated_nodes"), list) else None, _int(stage.get("images_run")))


def load_stages(workdir: str, batch_size: int) -> tuple[list, int | None]:
    data = read_json(os.path.join(workdir, ChainFiles(batch_size).fidelity_json))
    if not isinstance(data, dict):
        return [], None
    stages = [load_stage(s) for s in data.get("stages") or [] if isinstance(s, dict)]
    count = number(data.get("num_images"))
    return stages, int(count) if count else None


def load_blocks(workdir: str, batch_size: int) -> list:
    found = []
    for path in sorted(glob.glob(os.path.join(workdir, ChainFiles(batch_size).locate("*")))):
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("blocks"), list):
            continue
        blocks = [(number(b.get("rel_err")), number(b.get("cosine"))) for b in data["blocks"] if isinstance(b, dict)]
        first = data.get("first") if isinstance(data.get("first"), dict) else None
        where = f"{first.get('op_type', '?')} at {first.get('position', '?')}" if first else None
        saturating = data.get("first_saturating", False)  # absent: not looked for; None: none on the batch
        saturating = saturating if isinstance(saturating, dict) else {} if saturating is None else None
        found.append(BlockErrors(str(data.get("stage", "?")), str(data.get("reference", "?")), where, blocks,
                                 saturating))
    return found


def load_throughput(workdir: str, batch_size: int) -> list:
    """One row per output folder of this batch size in ais_out (bs{N}, and bs{N}_<tag> for another engine or
    precision): our figures where beit_infer.py wrote them, else ais_bench's.  Other batch sizes have their own
    report, so that a run at one batch size never changes another's page."""
    rows = {}
    for path in sorted(glob.glob(os.path.join(workdir, OUTPUTS_ROOT, "*_summary.json"))):
        name = os.path.basename(path)
        ours = name.endswith("_beit_summary.json")
        folder = name[: -len("_beit_summary.json") if ours else -len("_summary.json")]
        own = ChainFiles(batch_size).outputs_dirname  # bs{N}, and bs{N}_<tag> beside it
        if folder != own and not folder.startswith(own + "_") or folder.endswith(PARTIAL):
            continue
        data = read_json(path)
        if not isinstance(data, dict) or (folder in rows and not ours):
            continue
        last = data.get("last_full_measurement") if isinstance(data.get("last_full_measurement"), dict) else {}
        rate = number(last.get("throughput_real_images")) or number(data.get("throughput"))
        real = number(last.get("real_images"))
        rows[folder] = Throughput(folder, data.get("engine"), data.get("precision"), data.get("provider"), rate,
                                  int(real) if real else None, last.get("measured_at") or data.get("measured_at"))
    return [r for r in rows.values() if r.img_per_s is not None]


def load_keep(workdir: str, batch_size: int) -> KeepSuggestion | None:
    data = read_json(os.path.join(workdir, ChainFiles(batch_size).keep_dtype_json))
    if not isinstance(data, dict):
        return None
    cfg = os.path.join(workdir, ChainFiles(batch_size).keep_dtype_cfg)
    try:
        with open(cfg, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        cfg, text = None, ""
    keep = [str(k) for k in data.get("keep") or []]
    operators = [o for o in data.get("operators") or [] if isinstance(o, dict)]
    return KeepSuggestion(keep, operators, str(data.get("why", "")), cfg, text)


def load_inputs(workdir: str, batch_size: int) -> dict:
    """What the run read: from run_all.sh's parameters, the fidelity report and the manifest."""
    inputs = {}
    run = read_json(os.path.join(workdir, RUN))  # workstate's RunParams of the last run
    run = run if isinstance(run, dict) and run.get("batch_size") == batch_size else {}
    for key in ("checkpoint", "label_file", "model", "backend", "precision"):
        if run.get(key):
            inputs[key] = str(run[key])
    fidelity = read_json(os.path.join(workdir, ChainFiles(batch_size).fidelity_json))
    for key in ("checkpoint", "label_file"):
        if key not in inputs and isinstance(fidelity, dict) and fidelity.get(key):
            inputs[key] = str(fidelity[key])
    manifest = read_json(os.path.join(workdir, ChainFiles(batch_size).prep, "manifest.json"))
    if isinstance(manifest, dict) and manifest.get("source"):
        inputs["image_folder"] = str(manifest["source"])
        if isinstance(manifest.get("num_images"), int):
            inputs["images_preprocessed"] = manifest["num_images"]
    if run.get("demo"):
        inputs["demo"] = True
    return inputs


def load(workdir: str, batch_size: int) -> ReportData:
    """Everything the report shows; what is missing is said in ``missing``."""
    workdir = os.path.abspath(workdir)
    stages, fidelity_images = load_stages(workdir, batch_size)
    data = ReportData(workdir, batch_size, load_inputs(workdir, batch_size), load_accuracy(workdir, batch_size),
                      stages, fidelity_images, load_blocks(workdir, batch_size), load_throughput(workdir, batch_size),
                      load_keep(workdir, batch_size), [])
    names = ChainFiles(batch_size)
    for found, sentence in ((data.accuracy, f"no accuracy result ({names.accuracy})"),
                            (data.stages, f"no fidelity report ({names.fidelity_json}: beit_fidelity.py)"),
                            (data.throughput, f"no throughput figures ({OUTPUTS_ROOT}/*_summary.json)")):
        if not found:
            data.missing.append(sentence)
    return data
