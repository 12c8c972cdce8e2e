"""The fidelity report's benchmark (issue 19): its cost against one inference pass, and at 50,000 images.

On a randomly initialised BEiT (BEiT-base by default) and N real-photograph variants
(photo_variants.py: crops, scales and flips of scikit-image's ~20 photographs) at batch size 8:

1. the images, a random checkpoint in the unilm format and nominal labels; ``run_all.sh
   --no_fidelity`` builds the work folder (preprocess, export, onnxsim, graph_modify, beit_infer
   at fp32, eval), as a user's run does;
2. one inference pass: ``beit_infer.py`` on the graph_modify model over the same images, timed
   as a command (run_all.sh's own step, again, into another output folder);
3. labels: the model's own Top-1 (a random model has no ImageNet accuracy), with every 7th image
   given its 2nd choice and every 11th its 5th or 6th, so that Top-1, Top-5 and the screen's
   Top-5 rule have work to do;
4. the default report (``--fresh``: no logits kept from before; it makes the guide's and the
   emulated models as run_all.sh's fidelity step does), timed as a command; then the brute
   force (``--no_screen --fresh``; the made models exist by then), timed; then a check that both
   give the same Top-1, Top-5, agreement and flipped images on every screened stage;
5. the projection to 50,000 images, from the measured per-stage costs (project()).

Writes ``results.json`` and ``results.md`` in --out and prints the Markdown.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from beit_pipeline import files
from beit_pipeline.data import photo_variants, photos
from beit_pipeline.environment import REPO  # the repository: scripts, run_all.sh, Makefile
from beit_pipeline.fidelity import screen as fidelity_screen
from beit_pipeline.inference import outputs
from beit_pipeline.pipeline.chain import ChainFiles

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

ANSWER_KEYS = ("top1", "top5", "agree_top1", "flipped", "gained", "lost", "num_images")


def command(args: list, cwd: str = REPO) -> tuple:
    """Run a repo script with this Python (``args[0]`` a .py or .sh); (wall seconds, stdout); raises on failure."""
    cmd = ([sys.executable] if args[0].endswith(".py") else ["bash"]) + [os.path.join(REPO, args[0])] + args[1:]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{' '.join(args[:2])} ... exited {proc.returncode}:\n{tail}")
    return seconds, proc.stdout + proc.stderr


def make_inputs(out: str, count: int, model: str, seed: int) -> str:
    """The images, a random checkpoint and nominal labels (each photograph's nominal class)."""
    from beit_pipeline.model import build as beit_model

    names = photo_variants.write_variants(os.path.join(out, "images"), count, seed)
    nominal = [photos.PHOTOS[i % len(photos.PHOTOS)].label for i in range(count)]
    files.write_text_atomic(os.path.join(out, "nominal_labels.txt"),
                            "".join(f"{n} {c}\n" for n, c in zip(names, nominal)))
    checkpoint = os.path.join(out, f"{model}_random.pth")
    if not os.path.isfile(checkpoint):
        beit_model.save_random_checkpoint(checkpoint, model, seed=seed)
    return checkpoint


def own_labels(work: str, batch_size: int, path: str) -> None:
    """The model's own Top-1 from ais_out/bs{N}; every 7th image its 2nd choice, every 11th its 5th or 6th."""
    names = ChainFiles(batch_size)
    manifest = json.load(open(os.path.join(work, names.prep, "manifest.json")))
    found = outputs.find_outputs(os.path.join(work, names.outputs))
    lines, index = [], 0
    for entry in manifest["batches"]:
        logits = outputs.read_output(found[os.path.splitext(entry["file"])[0]])
        for row, name in enumerate(entry["images"]):
            rank = 1 if index % 7 == 3 else (4 + index % 2) if index % 11 == 5 else 0
            lines.append(f"{name} {int(np.argsort(-logits[row], kind='stable')[rank])}\n")
            index += 1
    files.write_text_atomic(path, "".join(lines))


@dataclasses.dataclass
class StageCost:
    """One stage's measured cost and its projection: fixed + per image x images run at the target size."""
    name: str
    mode: str
    fixed: float
    per_image: float
    runs: float
    how: str

    @property
    def seconds(self) -> float:
        return self.fixed + self.per_image * self.runs


def stage_cost(row: dict, num_images: int, audit: int, target: int) -> StageCost:
    """The StageCost of a report's stage row measured on ``num_images``, projected to ``target`` images."""
    computed = max(1, row["images_run"] - row.get("images_reused", 0))
    per_image = max(0.0, row["seconds"] - row["seconds_load"]) / computed
    if row["mode"] == "sampled":
        runs = fidelity_screen.sample_size(target, audit)
        how = f"the stage sample: max(audit, {fidelity_screen.SAMPLE_FRACTION:.0%} of {target})"
    elif row["mode"] in ("all", "read"):
        runs, how = target, "every image"
    else:
        fraction = (row["images_run"] - audit) / (num_images - audit) if num_images > audit else 0.0
        runs = audit + fraction * (target - audit)
        how = f"audit {audit} + {fraction:.2%} of the other {target - audit} (as measured)"
    return StageCost(row["name"], row["mode"], row["seconds_load"], per_image, runs, how)


def project(report: dict, report_wall: float, pass_wall: float, target: int) -> dict:
    """The default report's cost at ``target`` images against one pass there, with every line of the arithmetic.

    The pass scales linearly from its measured wall time (its fixed start-up, a few seconds, is counted per
    image: this overstates the pass slightly, by that start-up over its wall time).  Each stage costs its
    measured load time (loading, or making, its model) once plus its measured time per image computed
    times the images it would run.  The report's other phases (choosing the images, reading the base,
    the screen's bookkeeping, scoring and writing) are taken to scale per image, which overstates them;
    the command's start-up (its wall time minus the report's own) is fixed.
    """
    n, audit = report["num_images"], report["audit_images"]
    costs = [stage_cost(row, n, audit, target) for row in report["stages"]]
    phases = report["phases"]
    computed_base = (report.get("base") or "").startswith("beit_mg")  # then it is graph_modify's row
    rest = max(0.0, report["seconds"] - sum(r["seconds"] for r in report["stages"])
               - (phases["base"] if computed_base else 0.0))
    startup = max(0.0, report_wall - report["seconds"])
    lines = [f"one inference pass: {pass_wall:.1f} s / {n} images x {target} = {pass_wall / n * target:.0f} s"]
    for c in costs:
        lines.append(f"{c.name} ({c.mode}): {c.fixed:.1f} s + {c.per_image:.3f} s/image x {c.runs:.0f} images "
                     f"({c.how}) = {c.seconds:.0f} s")
    lines.append(f"the report's other phases ({', '.join(f'{k} {v:.2f} s' for k, v in phases.items())}, less the "
                 f"stages' own time): {rest:.2f} s / {n} x {target} = {rest / n * target:.0f} s; start-up "
                 f"{startup:.1f} s")
    total = sum(c.seconds for c in costs) + rest / n * target + startup
    passes = total / (pass_wall / n * target)
    lines.append(f"default report at {target} images: {total:.0f} s = {passes:.2f} inference passes")
    return {"images": target, "report_seconds": total, "pass_seconds": pass_wall / n * target, "passes": passes,
            "arithmetic": lines}


def compare(screened: dict, brute: dict) -> list:
    """The screened stages whose answers differ from the brute force's (empty: the screen held)."""
    by_name = {s["name"]: s for s in brute["stages"]}
    return [s["name"] for s in screened["stages"] if s["mode"] == "screened"
            and any(s[k] != by_name[s["name"]][k] for k in ANSWER_KEYS)]


def machine() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        load = os.getloadavg()[0]
        flags = f"{model}, {os.cpu_count()} cores, load {load:.1f} at the start"
    except OSError:
        flags = platform.processor()
    return flags


def build_work(args: argparse.Namespace, checkpoint: str) -> tuple[str, dict[str, float]]:
    """run_all.sh --no_fidelity into OUT/work; returns the work folder and its step times."""
    work = os.path.join(args.out, "work")
    seconds, text = command(["run_all.sh", "--batch_size", str(args.batch_size), "--workdir", work, "--image_path",
                             os.path.join(args.out, "images"), "--label_file",
                             os.path.join(args.out, "nominal_labels.txt"), "--checkpoint", checkpoint,
                             "--no_fidelity", "--model", args.model])
    steps = {m.split()[2]: float(m.split()[-2]) for m in text.splitlines()
             if m.startswith("[run_all] step ") and m.endswith(" s") and " done in " in m}
    log.info(f"run_all.sh --no_fidelity: {seconds:.0f} s ({steps})")
    return work, steps


def timed_pass(work: str, batch_size: int) -> float:
    """One inference pass over the same images, exactly as run_all.sh's beit_infer step runs it."""
    names = ChainFiles(batch_size).in_workdir(work)
    seconds, _ = command(["beit_infer.py", "--model", names["mg"], "--precision", "fp32", "--input", names["prep"],
                          "--output", names["outputs_root"], "--output_dirname", names["outputs_dirname"] + "_pass",
                          "--outfmt", "TXT", "--batchsize", str(batch_size), "--overwrite", "--no_progress"])
    log.info(f"one inference pass: {seconds:.1f} s")
    return seconds


def timed_report(work: str, args: argparse.Namespace, *extra: str) -> tuple[float, dict[str, Any]]:
    """beit_fidelity.py as a command, with --fresh: (wall seconds, its JSON)."""
    seconds, _ = command(["beit_fidelity.py", "--workdir", work, "--batch_size", str(args.batch_size),
                          "--label_file", os.path.join(args.out, "labels.txt"), "--seed", str(args.seed),
                          "--fresh", *extra])
    data = json.load(open(os.path.join(work, ChainFiles(args.batch_size).fidelity_json)))
    files.write_json_atomic(os.path.join(args.out, f"fidelity_{'brute' if extra else 'default'}.json"), data)
    log.info(f"beit_fidelity.py {' '.join(extra) or '(default)'}: {seconds:.1f} s")
    return seconds, data


def run(args: argparse.Namespace) -> dict:
    """The whole benchmark; returns the results dict (also written to OUT/results.json and .md)."""
    os.makedirs(args.out, exist_ok=True)
    started, host = time.strftime("%Y-%m-%d %H:%M"), machine()
    checkpoint = make_inputs(args.out, args.images, args.model, args.seed)
    work, steps = build_work(args, checkpoint)
    own_labels(work, args.batch_size, os.path.join(args.out, "labels.txt"))
    pass_wall = timed_pass(work, args.batch_size)
    report_wall, screened = timed_report(work, args)
    results = {"date": started, "machine": host, "model": args.model, "images": args.images,
               "batch_size": args.batch_size, "seed": args.seed, "run_all_steps": steps, "pass_seconds": pass_wall,
               "report_seconds": report_wall, "report_passes": report_wall / pass_wall,
               "stages": [{k: s[k] for k in ("name", "mode", "images_run", "num_images", "seconds", "seconds_load",
                                             "top1", "agree_top1", "delta_top1_ci95")} for s in screened["stages"]],
               "projection": project(screened, report_wall, pass_wall, args.project)}
    if not args.skip_brute:
        brute_wall, brute = timed_report(work, args, "--no_screen")
        results.update(brute_seconds=brute_wall, brute_passes=brute_wall / pass_wall,
                       screen_differs=compare(screened, brute),
                       brute_stage_seconds={s["name"]: s["seconds"] for s in brute["stages"]})
    files.write_json_atomic(os.path.join(args.out, "results.json"), results)
    files.write_text_atomic(os.path.join(args.out, "results.md"), markdown(results))
    return results


def markdown(results: dict) -> str:
    p = results["projection"]
    lines = [f"# The fidelity report's cost ({results['date']})", "",
             f"{results['model']} (random weights), {results['images']} real-photograph variants, batch size "
             f"{results['batch_size']}; machine: {results['machine']}.", "",
             f"One inference pass (beit_infer.py, fp32): {results['pass_seconds']:.1f} s. Default report: "
             f"{results['report_seconds']:.1f} s = **{results['report_passes']:.2f} passes**."]
    if "brute_seconds" in results:
        held = "identical on every screened stage" if not results["screen_differs"] else \
            f"DIFFERENT on {', '.join(results['screen_differs'])}"
        lines.append(f"Brute force (--no_screen): {results['brute_seconds']:.1f} s = {results['brute_passes']:.2f} "
                     f"passes; screened and brute-force answers {held}.")
    lines += ["", "| stage | mode | images run | of | seconds (load) |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['mode']} | {s['images_run']} | {s['num_images']} | {s['seconds']:.1f} "
              f"({s['seconds_load']:.1f}) |" for s in results["stages"]]
    lines += ["", f"Projection to {p['images']} images:", ""] + [f"- {line}" for line in p["arithmetic"]]
    return "\n".join(lines) + "\n"
