"""The fidelity report: run the stages where they can matter, score them, write fidelity_bs{N}.json and .md.

run_report() chooses the images (fidelity.select_images), finds the base (fidelity_runners),
runs the stages through the screen (fidelity_screen) or everywhere (``screen=False``), and
scores each stage on its images: Top-1 / Top-5 with Wilson intervals, agreement with pytorch,
the images gained and lost against pytorch with a paired interval on the difference (stats.py),
the flipped images with both top-5 lists, and the errors on the images both ran.  An image a
stage did not run takes the base's class and label rank: the screen's rule guarantees the stage
would have given the same (fidelity_screen's comment; ``--no_screen`` checks it by brute force).

The JSON keeps the keys of the first report (``batch_size``, ``max_images``, ``num_images``,
``checkpoint``, ``label_file``, ``stages`` with ``name``, ``top1``, ``top5``, ``agree_top1``,
``max_rel_err``, ``min_cosine``, ``num_images``, ``flipped``, ``source``, ``seconds``) and adds
the sample, the audit, the base and, per stage, how it ran, its intervals and, for the emulated
stages, ``saturated_nodes`` on the images they ran (README).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import numpy as np

from beit_pipeline import files
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation import stats
from beit_pipeline.fidelity import fp16_overflow
from beit_pipeline.fidelity import runners as fidelity_runners
from beit_pipeline.fidelity import screen as fidelity_screen
from beit_pipeline.fidelity import stages as fidelity

log = logging.getLogger(__name__)

MODES = {"screened": "ran where it can change Top-1/Top-5, the base's answer elsewhere",
         "sampled": "ran on a seeded random sample only (the screen would have run most images)",
         "all": "ran on every image", "read": "read from the device's output files for every image"}
INTERVALS_NOTE = ("95% intervals: Wilson score intervals for the rates; for the Top-1 difference from pytorch, "
                  "Newcombe's paired hybrid score interval from the images gained and lost. They treat the scored "
                  "images as a random sample of the images they stand for (for ImageNet val: images like them).")


# ---------------------------------------------------------------- the numbers

def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (1 for two zero rows)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.where(norms > 0, dots / np.where(norms > 0, norms, 1), np.where(dots == 0, 1.0, 0.0))


def errors(runner: fidelity_runners.StageRunner, reference: fidelity_runners.StageRunner) -> tuple[float, float]:
    """(max|a-b|/max|b| over all logits, the lowest per-image cosine) on the images both ran, in chunks."""
    both = np.array(sorted(runner.logits.keys() & reference.logits.keys()), dtype=np.int64)
    diff = scale = 0.0
    lowest = 1.0
    for part in fidelity_screen.chunks(len(both)):
        a, b = runner.array(both[part]), reference.array(both[part])
        diff = max(diff, float(np.nan_to_num(np.abs(np.asarray(a, np.float64) - b), nan=np.inf).max(initial=0.0)))
        scale = max(scale, float(np.abs(b).max(initial=0.0)))
        lowest = min(lowest, float(np.nan_to_num(cosines(a, b), nan=-1.0).min(initial=1.0)))  # inf: -1
    return (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))), lowest


@dataclasses.dataclass
class Answers:
    """A stage's Top-1 class and the label's rank, per scored image: its own where it ran, else the base's."""
    argmax: np.ndarray
    rank: np.ndarray


def answers(plan: fidelity_screen.Plan, runner: fidelity_runners.StageRunner, scored: np.ndarray) -> Answers:
    if plan.base is not None:
        argmax, rank = plan.base_argmax[scored].copy(), plan.base_rank[scored].copy()
    else:
        argmax, rank = np.full(len(scored), -1), np.full(len(scored), -1)
    ran = np.array([k for k, i in enumerate(scored) if int(i) in runner.logits], dtype=np.int64)
    for part in fidelity_screen.chunks(len(ran)):
        own = runner.array(scored[ran[part]])
        argmax[ran[part]] = own.argmax(axis=1)
        rank[ran[part]] = fidelity_screen.label_ranks(own, plan.images.labels[scored[ran[part]]])
    if np.any(rank < 0):
        raise PipelineFileError(f"stage {runner.stage}: {np.count_nonzero(rank < 0)} images neither ran nor screened")
    return Answers(argmax, rank)


def top5(row: np.ndarray) -> list:
    """[[class, logit]] of the five highest logits of one image, highest first."""
    order = np.argsort(-row, kind="stable")[:5]
    return [[int(c), round(float(row[c]), 6)] for c in order]


def flipped_detail(plan: fidelity_screen.Plan, runner: fidelity_runners.StageRunner,
                   reference: fidelity_runners.StageRunner, flipped: np.ndarray) -> list[dict[str, Any]]:
    """Per flipped image: its name, label, and both top-5 lists (the screen runs both stages on every flip)."""
    detail = []
    for i in flipped:
        i = int(i)
        entry = {"image": plan.images.names[i], "label": int(plan.images.labels[i])}
        for key, source in (("pytorch", reference), ("stage", runner)):
            entry[key] = top5(source.logits[i]) if i in source.logits else None
        detail.append(entry)
    return detail


def _pct(hits, count):
    return 100.0 * float(hits) / count if count else 0.0


def paired_counts(own: Answers, ref: Answers) -> stats.PairedCounts:
    """Top-1 right in both, only in the stage (gained), only in pytorch (lost), in neither."""
    right, ref_right = own.rank == 0, ref.rank == 0
    return stats.PairedCounts(int(np.sum(right & ref_right)), int(np.sum(right & ~ref_right)),
                              int(np.sum(~right & ref_right)), int(np.sum(~right & ~ref_right)))


def score_stage(plan: fidelity_screen.Plan, stage: str, runners: dict) -> fidelity.StageResult:
    """The StageResult of ``stage`` on its scored images (all, or its sample), against the labels and pytorch."""
    runner, reference = runners[stage], runners["pytorch"]
    scored = plan.sample if plan.modes[stage] == "sampled" else plan.everything
    own, ref = answers(plan, runner, scored), answers(plan, reference, scored)
    top1, top5_hits, agree = int(np.sum(own.rank == 0)), int(np.sum(own.rank < 5)), own.argmax == ref.argmax
    paired, count = paired_counts(own, ref), len(scored)
    max_rel, min_cosine = errors(runner, reference)
    bound = plan.bounds.get(stage)
    flipped = scored[~agree]
    return fidelity.StageResult(
        name=stage, top1=_pct(top1, count), top5=_pct(top5_hits, count), agree_top1=_pct(agree.sum(), count),
        max_rel_err=max_rel, min_cosine=min_cosine,
        num_images=count, flipped=[plan.images.names[i] for i in flipped],
        source=os.path.relpath(runner.source, runner.wf.workdir) if runner.source else "",
        seconds=round(runner.load_seconds + runner.run_seconds, 2), seconds_load=round(runner.load_seconds, 2),
        mode=plan.modes[stage],
        images_run=len(runner.logits), images_reused=runner.reused,
        top1_ci95=stats.percent_interval(stats.wilson(top1, count)),
        top5_ci95=stats.percent_interval(stats.wilson(top5_hits, count)),
        agree_top1_ci95=stats.percent_interval(stats.wilson(int(agree.sum()), count)),
        gained=paired.only_first, lost=paired.only_second,
        delta_top1=_pct(paired.only_first - paired.only_second, count),
        delta_top1_ci95=stats.percent_interval(stats.newcombe_paired(paired)),
        bound=bound.abs if bound else None, bound_rel=bound.rel if bound else None,
        bound_images=bound.images if bound else 0,
        sample={"size": count, "seed": plan.seed} if plan.modes[stage] == "sampled" else None,
        flipped_detail=flipped_detail(plan, runner, reference, flipped),
        saturated_nodes=runner.saturated_nodes())


@dataclasses.dataclass
class Report:
    """Everything the files say: the images, how they were chosen and screened, and each stage's row."""
    wf: fidelity.WorkFolder
    options: fidelity.Options
    plan: fidelity_screen.Plan
    results: list
    seconds: float = 0.0
    phases: dict = None  # seconds of: choosing the images, finding the base, running the stages, scoring
    runners: dict = None  # {stage: its StageRunner (closed), with the logits it holds}: for --suggest_keep_dtype


def run_report(wf: fidelity.WorkFolder, stages: list, options: fidelity.Options | None = None) -> Report:
    """Score ``stages`` (pytorch first) on the chosen images, each run only where it can matter (or everywhere)."""
    options, clock = options or fidelity.Options(), Clock()
    images = fidelity.select_images(wf, options.max_images, options.seed)
    record = fidelity.read_derived_record(wf)
    chosen = "all" if images.sample == "all" else f"a seeded random sample (seed {options.seed}) of"
    log.info(f"fidelity: {chosen} {len(images.names)} of the {images.total} images of {wf.file('prep')}, "
             f"batch size {wf.batch_size}, stages {', '.join(stages)}"
             + ("" if options.screen else "; --no_screen: every stage on every image"))
    runners = {stage: fidelity_runners.make_runner(wf, stage, images, record, options) for stage in stages}
    clock.lap("select")
    with files.FolderLock(wf.file("logits"), what=f"the fidelity report's logits ({wf.files()['logits']})"):
        base = fidelity_runners.find_base(wf, images, runners) if options.screen else None
        clock.lap("base")
        plan = fidelity_screen.make_plan(images, base, options.audit, options.sample, options.seed)
        if options.screen:
            fidelity_screen.screen(plan, runners)
        else:
            fidelity_screen.run_everything(plan, runners)
        clock.lap("stages")
    results = [score_stage(plan, stage, runners) for stage in stages]
    clock.lap("score")
    for r in results:
        log.info(f"  {r.name}: Top-1 {r.top1:.2f}% on {r.num_images} images ({r.mode}, {r.images_run} run), "
                 f"agrees with pytorch on {r.agree_top1:.2f}%, max rel err {r.max_rel_err:.3e} ({r.seconds:.1f} s)")
        fp16_overflow.log_saturation(r.name, r.saturated_nodes or [])
    return Report(wf, options, plan, results, clock.total(), clock.laps, runners)


class Clock:
    """Seconds of each phase of the report, for its JSON (and the benchmark's projection)."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


# ---------------------------------------------------------------- the files

def _ci(interval):
    return f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "-"


def _signed_ci(interval):
    return f"{interval[0]:+.2f} to {interval[1]:+.2f}" if interval else "-"


def table(results: list) -> str:
    """The report as a Markdown table."""
    head = ("| stage | mode | images | run | Top-1 % | 95% CI | Top-5 % | agree Top-1 % | 95% CI | "
            "Top-1 vs pytorch (points) | 95% CI | gained | lost | max rel err | min cosine | bound |")
    lines = [head, "|" + "---|" * 16]
    for r in results:
        lines.append(f"| {r.name} | {r.mode} | {r.num_images} | {r.images_run} | {r.top1:.2f} | {_ci(r.top1_ci95)} | "
                     f"{r.top5:.2f} | {r.agree_top1:.2f} | {_ci(r.agree_top1_ci95)} | {r.delta_top1:+.2f} | "
                     f"{_signed_ci(r.delta_top1_ci95)} | {r.gained} | {r.lost} | {r.max_rel_err:.3e} | "
                     f"{r.min_cosine:.6f} | {'-' if r.bound is None else f'{r.bound:.3g}'} |")
    return "\n".join(lines)


def describe_images(report: Report) -> str:
    """Which images were scored, in words."""
    images, wf = report.plan.images, report.wf
    if images.sample == "all":
        return f"all {len(images.names)} images of `{wf.files()['prep']}`"
    return (f"a seeded random sample of {len(images.names)} of the {images.total} images of `{wf.files()['prep']}` "
            f"(--max_images {report.options.max_images} --seed {report.options.seed})")


def describe_screen(report: Report) -> list:
    """What ran where, in words: the screen's lines of the .md."""
    plan, results = report.plan, report.results
    if not report.options.screen:
        return ["Brute force (--no_screen): every stage ran on every image."]
    every = "Every image is scored" if plan.images.sample == "all" else "Every image of the sample is scored"
    lines = [f"{every}. Each stage ran only on the images where it can change Top-1 or Top-5 "
             f"(column run): an audit of {len(plan.audit)} seeded random images (seed {plan.seed}) went through "
             f"every stage; a stage's bound is {fidelity_screen.SAFETY_FACTOR:g} x the largest logit difference "
             f"from the base seen on the images it ran; an image whose top-1 and top-5 margins exceed what the stage "
             f"and pytorch can move them together takes the base's answer. Base: {plan.base.source}."]
    sampled = [r.name for r in results if r.mode == "sampled"]
    if sampled:
        lines.append(f"Sampled: {', '.join(sampled)} ran on a seeded random sample of {len(plan.sample)} images "
                     "(the screen would have run most images); their rows and intervals are for that sample only.")
    return lines


def prediction_line(result: fidelity.StageResult, report_images: str) -> str:
    return (f"{result.top1:.2f}% (95% CI {_ci(result.top1_ci95)}), {result.delta_top1:+.2f} points vs PyTorch "
            f"({_signed_ci(result.delta_top1_ci95)}), on {report_images}")


def markdown(report: Report) -> str:
    wf, results = report.wf, report.results
    lines = [f"# Fidelity report, batch size {wf.batch_size}", "",
             f"Images: {describe_images(report)}; labels: `{wf.label_file}`; reference: `pytorch` "
             f"(`{wf.checkpoint}`, fp32).", ""]
    lines += [line + "\n" for line in describe_screen(report)]
    lines += [INTERVALS_NOTE, "", "Relative error is max|a-b|/max|b| over all logits and cosine is per image (the "
              "lowest shown), both on the images that the stage and pytorch both ran; bound is in logits.", "",
              table(results), ""]
    predicted = next((r for r in results if r.name == "om_emulation"), None)
    if predicted is not None:
        where = f"its sample of {predicted.num_images} images" if predicted.mode == "sampled" else \
            describe_images(report)
        lines.append(f"Predicted OM Top-1 (om_emulation): {prediction_line(predicted, where)}.")
    lines += [fp16_overflow.markdown_line(r.name, r.saturated_nodes, r.images_run) for r in results
              if r.saturated_nodes is not None]
    for r in results:
        if r.flipped:
            shown = ", ".join(r.flipped[:10]) + (f" and {len(r.flipped) - 10} more" if len(r.flipped) > 10 else "")
            lines.append(f"- {r.name}: Top-1 differs from pytorch on {shown} (top-5 lists: `flipped_detail` in "
                         "the JSON)")
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict:
    plan, wf, options = report.plan, report.wf, report.options
    return {"batch_size": wf.batch_size, "max_images": options.max_images, "num_images": len(plan.images.names),
            "images_total": plan.images.total, "sample": plan.images.sample, "seed": options.seed,
            "screen": options.screen, "audit_images": len(plan.audit) if options.screen else 0,
            "safety_factor": fidelity_screen.SAFETY_FACTOR if options.screen else None,
            "stage_sample_size": len(plan.sample), "base": plan.base.source if plan.base is not None else None,
            "intervals": INTERVALS_NOTE, "checkpoint": wf.checkpoint, "label_file": wf.label_file,
            "seconds": round(report.seconds, 2), "phases": report.phases,
            "stages": [dataclasses.asdict(r) for r in report.results]}


def write_report(report: Report) -> None:
    files.write_json_atomic(report.wf.file("json"), report_json(report))
    files.write_text_atomic(report.wf.file("md"), markdown(report))


# ---------------------------------------------------------------- reading a report back

@dataclasses.dataclass
class Prediction:
    """The om_emulation row of a fidelity_bs{N}.json, for run_all.sh's summary."""
    top1: float
    top1_ci95: list
    delta_top1: float
    delta_top1_ci95: list
    num_images: int
    images: str  # which images, in words
    every_image: bool  # True: scored on every image of the run


def read_prediction(path: str) -> Prediction | None:
    """The Prediction of a fidelity report, or None when it has no om_emulation row (or is of another format)."""
    data = files.read_json(path) or {}
    row = next((s for s in data.get("stages") or [] if isinstance(s, dict) and s.get("name") == "om_emulation"), None)
    if row is None or not isinstance(row.get("top1"), (int, float)) or row.get("top1_ci95") is None:
        return None
    every = data.get("sample") == "all" and row.get("mode") != "sampled"
    if every:
        images = f"all {row['num_images']} images"
    elif row.get("mode") == "sampled":
        images = f"a seeded random sample of {row['num_images']} images"
    else:
        sample = data.get("sample") or {}
        images = f"a seeded random sample of {row['num_images']} of {sample.get('of', '?')} images"
    return Prediction(row["top1"], row["top1_ci95"], row.get("delta_top1", 0.0), row.get("delta_top1_ci95"),
                      row["num_images"], images, every)
