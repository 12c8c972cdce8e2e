"""run_all.sh's memory: which step is complete for which inputs, what it owns, and the summary.

run_all.sh keeps no state of its own.  For every step it asks this module::

    python3 -m beit_pipeline.pipeline.workstate --workdir W start STEP   # 0: run it now; 10: skip, complete
    ... the step's command ...
    python3 -m beit_pipeline.pipeline.workstate --workdir W finish STEP  # check its outputs, record them

A step is redone exactly when something it depends on changed: the content of
its input files (SHA-256, cached by size, mtime and ctime), the names, sizes and
mtimes of its input folders, its parameters (batch size, model, backend, ...),
the versions of the packages that shape its output, and the pipeline's own code.
Paths are never part of a key, so a trailing slash or a relative path changes
nothing.  ``W/run_all_state.json`` records, per output, the key it was made with
and which files the step owns: ``--force`` and a redo delete only those, and a
file at an output path that no recorded step made is never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import logging
import os
import shutil
import sys
from typing import Any

from beit_pipeline import cli, files, fingerprint
from beit_pipeline.environment import REPO  # the repository: scripts, run_all.sh, Makefile
from beit_pipeline.errors import EXIT_SKIP, PipelineError, PipelineFileError, UsageError
from beit_pipeline.evaluation import results
from beit_pipeline.graph import onnx_files
from beit_pipeline.model.variants import KNOWN_VARIANTS, token_count
from beit_pipeline.model.variants import image_size as variant_image_size
from beit_pipeline.pipeline import chain

log = logging.getLogger(__name__)

STATE_NAME = chain.STATE
RUN_NAME = chain.RUN  # the parameters of the run in progress, written by `begin`
HASH_CACHE_NAME = chain.HASH_CACHE
LEGACY_RECORD = "run_all_inputs.txt"  # run_all.sh before content-aware reruns
STATE_FORMAT = 1
DEFAULT_MODEL = "beit_base_patch16_224"
DEFAULT_SIZE = 224

_VERSIONS = {
    "demo": ("torch", "timm", "numpy", "pillow"),
    "preprocess": ("pillow", "numpy"),
    "pth2onnx": ("torch", "timm", "onnx", "onnxruntime"),
    "onnxsim": ("onnxsim", "onnx", "onnxruntime"),
    "graph_modify": ("onnx", "onnxruntime"),
    "atc": (),
    "beit_infer": ("onnxruntime", "openvino", "numpy"),
    "ais_bench": ("ais_bench", "aclruntime"),
    "eval": ("numpy",),
    "fidelity": ("torch", "timm", "onnx", "onnxruntime", "numpy"),
}


@dataclasses.dataclass
class RunParams:
    """What run_all.sh was asked for, with every path absolute and normalised."""

    workdir: str
    batch_size: int
    backend: str
    model: str
    image_path: str
    label_file: str
    checkpoint: str
    demo: bool = False
    skip_bad: bool = False
    soc_version: str = ""
    force: bool = False
    precision: str = "fp32"  # beit_infer.py's --precision (the ort backend)
    fidelity: bool = True  # run beit_fidelity.py as the last step
    image_size: int = DEFAULT_SIZE  # the model's input size: preprocessing, onnxsim and atc take it
    providers: str = ""  # beit_infer.py's --providers (the ort backend; "": its default engine)
    keep_dtype: str = ""  # issue 20: atc's keep_dtype file (run_all.sh --keep_dtype), read by atc and fidelity

    def path(self, relative: str) -> str:
        return os.path.join(self.workdir, relative)

    @property
    def tag(self) -> str:
        """``_bf16``, ``_cpu``, ...: a non-default engine or precision writes its own outputs and results."""
        return results.result_tag(self.precision, self.providers) if self.backend == "ort" else ""

    @property
    def files(self) -> chain.ChainFiles:
        """The chain's files of this run (relative to the work folder)."""
        return chain.ChainFiles(self.batch_size, self.model, self.tag)

    @property
    def outputs_dir(self) -> str:
        return self.files.outputs

    @property
    def result_name(self) -> str:
        """The guide's accuracy JSON of this run; its details are chain.details_name(result_name)."""
        return self.files.accuracy


@dataclasses.dataclass
class StepSpec:
    """One step of this run: what it reads, what shapes its output, what it writes (relative to W)."""

    name: str
    outputs: list
    inputs: dict = dataclasses.field(default_factory=dict)  # role ("the label file") -> absolute path
    params: dict = dataclasses.field(default_factory=dict)
    promote: list = dataclasses.field(default_factory=list)  # (partial, final): renamed by `finish`
    aliases: dict = dataclasses.field(default_factory=dict)  # partial -> other names a tool may give it
    keep_on_redo: list = dataclasses.field(default_factory=list)  # owned, but the step itself decides
    shared: list = dataclasses.field(default_factory=list)  # owned, one file for every batch size: not digested

    @property
    def product(self) -> str:
        return self.outputs[0]


# ---------------------------------------------------------------- the steps of a run

def step_specs(run: RunParams) -> dict[str, StepSpec]:
    """{step name: StepSpec} for this run, in pipeline order."""
    n, names = run.batch_size, run.files
    prep, onnx, sim, mg, om = names.prep, names.onnx, names.onnxsim, names.graph_modify, names.om
    out = run.outputs_dir
    partial = names.outputs_partial
    acc = run.result_name
    infer_name = "ais_bench" if run.backend == "ascend" else "beit_infer"
    steps = [
        StepSpec("preprocess", [prep], {"the images": run.image_path},
                 {"batch_size": n, "skip_bad": run.skip_bad, "image_size": run.image_size}),
        StepSpec("pth2onnx", with_data([onnx]), {"the checkpoint": run.checkpoint}, {"model": run.model}),
        StepSpec("onnxsim", with_data([sim, names.onnxsim_partial]), {"the exported model": run.path(onnx)},
                 {"batch_size": n, "simplifier": simplifier(run.model)}, promote=[(names.onnxsim_partial, sim)]),
        StepSpec("graph_modify", with_data([mg]), {"the simplified model": run.path(sim)}, {"batch_size": n}),
        StepSpec(infer_name, [out, partial] + beside(out) + beside(partial),
                 {"the batches": run.path(prep), "the model": run.path(om if run.backend == "ascend" else mg)},
                  {"batch_size": n, "backend": run.backend, "precision": run.precision, "providers": run.providers},
                  promote=[(partial, out)] + list(zip(beside(partial), beside(out))),
                  keep_on_redo=[partial] + beside(partial)[1:] if run.backend == "ort" else []),
        StepSpec("eval", [acc, chain.details_name(acc)], {"the outputs": run.path(out),
                                                            "the label file": run.label_file,
                                                            **synset_mapping_inputs(run),
                                                            "the batches": run.path(prep)}, {"batch_size": n}),
    ]
    if run.backend == "ascend":
        steps.insert(4, atc_spec(run, mg, om))
    if run.demo:
        steps.insert(0, StepSpec("demo", [chain.DEMO], {}, {"model": run.model}))
    if run.fidelity:
        steps.append(fidelity_spec(run, {"the batches": prep, "the exported model": onnx,
                                         "the simplified model": sim, "the padded model": mg}))
    for step in steps:
        step.params["versions"] = fingerprint.package_versions(_VERSIONS[step.name])
    return {step.name: step for step in steps}


def beside(folder: str) -> list[str]:
    """The files beside an inference output folder that move with it: ais_bench's summary, beit_infer.py's record
    (inference_record.record_path) and its figures (inference_record.beside)."""
    from beit_pipeline.inference import record as inference_record
    return inference_record.beside(folder)


def with_data(names: list[str]) -> list[str]:
    """ONNX files and the ``.data`` files that hold their weights past protobuf's 2 GiB (onnx_files)."""
    return names + [n + ".data" for n in names if n.endswith(".onnx")]


def fidelity_spec(run: RunParams, made: dict[str, str]) -> StepSpec:
    """beit_fidelity.py: every stage scored on the same images; it makes the guide's and the emulated OM's graphs."""
    n, names = run.batch_size, run.files
    inputs = {role: run.path(name) for role, name in made.items()}
    inputs.update({"the checkpoint": run.checkpoint, "the label file": run.label_file, **synset_mapping_inputs(run)})
    inputs.update(keep_dtype_input(run))  # issue 20
    if run.backend == "ascend":
        inputs["the OM's outputs"] = run.path(names.fp32_outputs)
    outputs = with_data([names.fidelity_json, names.fidelity_md, names.guide_padding, names.om_emulation,
                         names.guide_om_emulation, chain.FIDELITY_DERIVED])
    return StepSpec("fidelity", outputs, inputs, {"batch_size": n, "model": run.model},
                    shared=[chain.FIDELITY_DERIVED])


def atc_spec(run: RunParams, mg: str, om: str) -> StepSpec:
    """atc writes beit_mg_bs{N}_partial.om, or (CANN >= 7.0) ..._partial_linux_<arch>.om: either is promoted."""
    from beit_pipeline.inference.ascend import om_candidates
    partial, *suffixed = om_candidates(run.files.om_partial_prefix)
    return StepSpec("atc", [om, partial, chain.FUSION_RESULT] + suffixed,
                    {"the padded model": run.path(mg), **keep_dtype_input(run)},
                    {"batch_size": run.batch_size, "soc_version": run.soc_version}, promote=[(partial, om)],
                    aliases={partial: suffixed}, shared=[chain.FUSION_RESULT])


def synset_mapping_inputs(run: RunParams) -> dict[str, str]:
    """A synset mapping beside the label file (Kaggle's CSV, the devkit's ground truth read their classes from
    it): part of the eval's and the fidelity report's keys, so a changed mapping redoes them."""
    from beit_pipeline.evaluation import label_formats
    found = label_formats.mappings_beside(run.label_file) if run.label_file else []
    return {f"the synset mapping {os.path.basename(path)}": path for path in found}


def keep_dtype_input(run: RunParams) -> dict[str, str]:
    """Issue 20: the keep_dtype file as an input (its content is part of the key of atc and fidelity)."""
    return {"the keep_dtype file": run.keep_dtype} if run.keep_dtype else {}


def code_digest() -> str:
    """The pipeline's own code is a tool version too: every .py file of the scripts and the package."""
    paths = glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "beit_pipeline", "**", "*.py"), recursive=True)
    return fingerprint.source_digest(paths)


# ---------------------------------------------------------------- digests

def input_digest(path: str, cache: str) -> str | None:
    """A file's content digest (cached), a folder's digest of names, sizes and mtimes; None when missing."""
    if os.path.isdir(path):
        return "tree:" + tree_digest(path)
    if os.path.isfile(path):
        # A model's weights past 2 GiB are in <model>.onnx.data: equal graphs with other weights differ.
        return "+".join("sha256:" + fingerprint.file_digest(p, cache) for p in onnx_files.model_files(path))
    return None


def tree_digest(folder: str) -> str:
    """Digest of every file below ``folder`` (relative name, size, mtime); symlinks to files are followed."""
    names = []
    for root, dirs, names_here in os.walk(folder):
        dirs.sort()
        names.extend(os.path.relpath(os.path.join(root, n), folder) for n in names_here)
    return fingerprint.image_set_digest(folder, sorted(names))


def output_digest(path: str) -> str | None:
    """What a recorded output looked like: stat of a file, or tree_digest of a folder; None when missing."""
    if os.path.isdir(path):
        return "tree:" + tree_digest(path)
    if os.path.isfile(path):
        stats = [os.stat(p) for p in onnx_files.model_files(path)]
        return "+".join(f"stat:{st.st_size}:{st.st_mtime_ns}" for st in stats)
    return None


def made_from(spec: StepSpec, run: RunParams, code: str) -> dict[str, Any]:
    """Everything the step's output depends on, readable in the record (paths shown, but not keyed)."""
    cache = run.path(HASH_CACHE_NAME)
    inputs = {role: {"path": path, "digest": input_digest(path, cache)} for role, path in spec.inputs.items()}
    return {"inputs": inputs, "params": dict(spec.params, code=code)}


def step_key(parts: dict[str, Any]) -> str:
    """The key: digests and parameters only, never the paths, so that equal content is equal."""
    digests = {role: value["digest"] for role, value in parts["inputs"].items()}
    return fingerprint.digest_json([digests, parts["params"]])


# ---------------------------------------------------------------- the record

def load_state(workdir: str) -> dict[str, Any] | None:
    state = files.read_json(os.path.join(workdir, STATE_NAME))
    if state is None or state.get("format") != STATE_FORMAT or not isinstance(state.get("outputs"), dict):
        return None
    return state


def save_state(workdir: str, state: dict[str, Any]) -> None:
    files.write_json_atomic(os.path.join(workdir, STATE_NAME), state)


def owned_paths(state: dict[str, Any] | None) -> set[str]:
    """Every output path (relative) that a recorded step lists as its own."""
    owned = set()
    for entry in (state or {}).get("outputs", {}).values():
        owned.update(entry.get("owns", []))
    return owned


def load_run(workdir: str) -> RunParams:
    data = files.read_json(os.path.join(workdir, RUN_NAME))
    if data is None:
        raise PipelineError(f"{workdir}: no run in progress ({RUN_NAME} missing); run_all.sh calls 'begin' first")
    return RunParams(**data)


def describe_change(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why a recorded output is out of date, in words: the first parameter or input that differs."""
    if not old:
        return "no record of how it was made"
    for name, value in new["params"].items():
        if old.get("params", {}).get(name) != value:
            return {"code": "the pipeline's code changed", "versions": "a package version changed"}.get(
                name, f"{name} changed ({old.get('params', {}).get(name)!r} -> {value!r})")
    for role, value in new["inputs"].items():
        before = old.get("inputs", {}).get(role)
        if not isinstance(before, dict) or before.get("digest") != value["digest"]:
            return f"{role} changed ({value['path']})"
    return "its inputs changed"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- begin: check the work folder

ONNXSIM_UP_TO = 2 ** 30  # bytes of simplified ONNX; beyond, beit_pipeline.graph.simplify (the large variants)


def onnx_bytes(name: str) -> int:
    """About what the simplified and padded ONNX of a variant holds: its fp32 weights (12 D^2 per block)
    and the relative-position bias that the export folds into one (H, P, P) constant per block."""
    dim, depth, heads, size = KNOWN_VARIANTS[name]
    padded = -(-token_count(size) // 16) * 16
    return 4 * depth * (12 * dim * dim + heads * padded * padded)


def simplifier(name: str) -> str:
    """The module run_all.sh simplifies with: onnxsim itself, as the guide does, for the base variants;
    beit_pipeline.graph.simplify (the same graph, the weights held out) for the large ones, where onnxsim needs
    about ten times the model in memory (killed at 24 GB on large-512) and cannot write past 2 GiB."""
    return "onnxsim" if name not in KNOWN_VARIANTS or onnx_bytes(name) <= ONNXSIM_UP_TO else "beit_pipeline.graph.simplify"


def check_model(name: str) -> None:
    """UsageError unless ``name`` is a known variant."""
    if name not in KNOWN_VARIANTS:
        raise UsageError(f"--model {name}: unknown BEiT variant; known: {', '.join(sorted(KNOWN_VARIANTS))}")


def checkpoint_shape(path: str) -> tuple[str | None, int | None]:
    """(variant name or None, input size or None) read off a checkpoint's tensor shapes.

    The size from the relative-position tables ((2W-1)^2 + 3 rows, W = size / 16); torch's mmap
    reads a 1.2 GB large-512 checkpoint as fast as a tiny one.  (None, None) when the file cannot
    tell: pth2onnx then says what is wrong with it.
    """
    try:  # issue 21: every checkpoint form (DDP, EMA, Hugging Face, safetensors) through checkpoints.py
        from beit_pipeline.model import checkpoints
        state = checkpoints.read_checkpoint(path).state_dict
    except Exception:  # torch missing, or an unreadable file: pth2onnx reports it with its own message
        return None, None
    try:
        table, proj = state["blocks.0.attn.relative_position_bias_table"], state["patch_embed.proj.weight"]
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    except (KeyError, TypeError, ValueError, AttributeError):
        return None, None
    size = int(round(((table.shape[0] - 3) ** 0.5 + 1) / 2)) * int(proj.shape[-1])
    shape = (int(proj.shape[0]), depth, int(table.shape[1]), size)
    return next((name for name, known in KNOWN_VARIANTS.items() if known == shape), None), size


def run_model(model: str, checkpoint: str, demo: bool) -> tuple[str, int]:
    """(model name, input size): --model's; else the checkpoint's variant (the file name beit_base_patch16_224
    when it is none we know) and size; the demo's default model at 224."""
    if model:
        return model, variant_image_size(model)
    if demo:
        return DEFAULT_MODEL, DEFAULT_SIZE
    name, size = checkpoint_shape(checkpoint)
    return name or DEFAULT_MODEL, size or DEFAULT_SIZE


def run_params(args: argparse.Namespace) -> RunParams:
    """RunParams from `begin`'s arguments; the demo's inputs live in the work folder."""
    workdir = os.path.abspath(args.workdir)
    demo = not (args.image_path or args.label_file or args.checkpoint)
    if demo:
        image_path, label_file, checkpoint = (os.path.join(workdir, chain.DEMO, name) for name in
                                              (chain.DEMO_IMAGES, chain.DEMO_LABELS, chain.DEMO_CHECKPOINT))
    else:
        image_path, label_file, checkpoint = (os.path.abspath(p) for p in
                                              (args.image_path, args.label_file, args.checkpoint))
    model, size = run_model(args.model, checkpoint, demo)
    return RunParams(workdir=workdir, batch_size=args.batch_size, backend=args.backend, model=model,
                     image_path=image_path, label_file=label_file, checkpoint=checkpoint, demo=demo,
                     skip_bad=args.skip_bad, soc_version=args.soc_version, force=args.force, precision=args.precision,
                     fidelity=not args.no_fidelity, image_size=size, providers=args.providers,
                     keep_dtype=os.path.abspath(args.keep_dtype) if args.keep_dtype else "")


def unowned_outputs(run: RunParams, state: dict[str, Any] | None) -> list[str]:
    """Output paths of this run that exist but that no recorded step made (never deleted, never overwritten)."""
    owned = owned_paths(state)
    found = []
    for spec in step_specs(run).values():
        found += [p for p in spec.outputs if p not in owned and os.path.lexists(run.path(p))]
    return found


def begin(args: argparse.Namespace) -> None:
    """Check the work folder for this run and remember the run's parameters for the later calls."""
    if args.model:
        check_model(args.model)
    run = run_params(args)
    if run.model in KNOWN_VARIANTS:
        check_model(run.model)  # the variant read from the checkpoint, before any step
    state = load_state(run.workdir)
    foreign = unowned_outputs(run, state)
    if foreign:
        why = (f"{LEGACY_RECORD} shows an older run_all.sh made them, which recorded no content"
               if os.path.exists(run.path(LEGACY_RECORD)) and state is None else
               f"no recorded run lists them in {STATE_NAME}")
        raise UsageError(
            f"{run.workdir} holds {', '.join(foreign[:4])}{' ...' if len(foreign) > 4 else ''}, but {why}; "
            "run_all.sh deletes and overwrites only files it made itself (also with --force): move them away "
            "or choose another --workdir")
    if state is None:
        save_state(run.workdir, {"format": STATE_FORMAT, "outputs": {}})
    files.write_json_atomic(run.path(RUN_NAME), dataclasses.asdict(run))


# ---------------------------------------------------------------- start / finish: one step

def start(args: argparse.Namespace) -> int:
    """0 when the step must run now (its old outputs are gone), EXIT_SKIP when it is complete for these inputs."""
    run = load_run(args.workdir)
    spec = step_specs(run)[args.step]
    state = load_state(run.workdir) or {"format": STATE_FORMAT, "outputs": {}}
    parts = made_from(spec, run, code_digest())
    missing = [v["path"] for v in parts["inputs"].values() if v["digest"] is None]
    if missing:
        raise PipelineFileError(f"step {spec.name}: input {missing[0]} is missing")
    key = step_key(parts)
    entry = state["outputs"].get(spec.product)
    reason = redo_reason(run, spec, entry, key, parts)
    if reason is None:
        log.info(f"skip {spec.name}: {spec.product} is complete for these inputs (use --force to redo)")
        return EXIT_SKIP
    if entry is not None:
        log.info(f"redo {spec.name}: {spec.product}: {reason}")
    owns = sorted(set(spec.outputs) | set(entry.get("owns", []) if entry else []))
    state["outputs"][spec.product] = {"step": spec.name, "status": "running", "key": key, "made_from": parts,
                                      "owns": owns, "started": now()}
    save_state(run.workdir, state)  # owned before anything is deleted: a kill here leaves nothing orphaned
    for relative in owns:
        if relative not in spec.keep_on_redo or run.force:  # --force redoes it all, resumes nothing
            remove(run.path(relative))
    return 0


def redo_reason(run: RunParams, spec: StepSpec, entry: dict[str, Any] | None, key: str,
                parts: dict[str, Any]) -> str | None:
    """Why the step must run, or None when its recorded outputs are complete for these inputs."""
    if entry is None:
        return "not made yet"
    if run.force:
        return "--force"
    if entry.get("status") == "stale":
        return entry.get("stale_reason") or "what it was made from was being remade when a step failed"
    if entry.get("status") != "complete":
        return "an earlier run stopped before it finished"
    if entry.get("key") != key:
        return describe_change(entry.get("made_from"), parts)
    recorded = entry.get("outputs", {})
    for relative, value in recorded.items():
        if output_digest(run.path(relative)) != value:
            return f"{relative} was changed or removed after it was made"
    return None if recorded else "no record of its outputs"


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def finish(args: argparse.Namespace) -> None:
    """Promote the step's partial outputs, check them against their file contracts, record them complete."""
    run = load_run(args.workdir)
    spec = step_specs(run)[args.step]
    state = load_state(run.workdir)
    entry = (state or {}).get("outputs", {}).get(spec.product)
    if entry is None or entry.get("status") != "running":
        raise PipelineError(f"step {spec.name}: 'finish' without 'start' in {run.workdir}")
    for partial, final in spec.promote:
        take_alias(run, partial, spec.aliases.get(partial, []))
        if os.path.lexists(run.path(partial)):
            remove(run.path(final))
            onnx_files.move_model(run.path(partial), run.path(final))  # a plain rename unless it has .data
    VERIFY.get(spec.name, verify_product)(run, spec)
    if step_key(made_from(spec, run, code_digest())) != entry["key"]:
        raise PipelineError(f"step {spec.name}: its inputs changed while it ran; run run_all.sh again")
    entry.update(status="complete", finished=now(),
                 outputs={p: output_digest(run.path(p)) for p in spec.outputs
                          if p not in spec.shared and os.path.lexists(run.path(p))})
    save_state(run.workdir, state)


def take_alias(run: RunParams, partial: str, aliases: list[str]) -> None:
    """Rename the one alias a tool wrote (atc's _linux_<arch>.om) to ``partial``; refuse several."""
    found = [a for a in aliases if os.path.lexists(run.path(a))]
    if len(found) > 1:
        raise PipelineFileError(f"{run.workdir} holds {' and '.join(found)}: which one the tool just wrote is "
                                "unknown; delete both and rerun")
    if found and not os.path.lexists(run.path(partial)):
        log.info(f"{found[0]} is {partial} (atc's name for it since CANN 7.0)")
        os.replace(run.path(found[0]), run.path(partial))


# ---------------------------------------------------------------- fail: a step did not finish

RESULT_STEPS = ("eval", "fidelity")  # the steps whose outputs are numbers a person reads
FULL_BELOW = 1 << 20  # bytes free under which a failed step's file system is called full


def fail(args: argparse.Namespace) -> None:
    """A step failed or was stopped: remove what it left half-made and the results that depended on it.

    Prints one ``error:`` line naming the step, what of it was removed and, when its file system
    is full, that; then which results were removed as out of date (they must never be taken for
    this run's).  With ``--interrupted`` (run_all.sh prints its own line) only the latter.
    """
    run = load_run(args.workdir)
    specs = step_specs(run)
    spec = specs[args.step]
    state = load_state(run.workdir) or {"format": STATE_FORMAT, "outputs": {}}
    free = free_bytes(run.workdir)
    left = [rel for rel in spec.outputs if rel not in spec.keep_on_redo and rel not in spec.shared
            and os.path.lexists(run.path(rel))]
    for relative in left:
        remove(run.path(relative))
    entry = state["outputs"].get(spec.product)
    if entry is not None:
        entry.update(status="failed", failed=now())
    stale = remove_dependent_results(run, specs, spec, state)
    save_state(run.workdir, state)
    if not args.interrupted:
        tool = f"step '{args.tool or spec.name}' failed (exit {args.exit_code}); see its message above"
        removed = f"; removed what it left: {', '.join(left)}" if left else ""
        full = (f"; the file system of {run.workdir} is full ({free // 1024} KiB free): free space and run "
                "again" if free is not None and free < FULL_BELOW else "")
        log.error(f"{tool}{removed}{full}")
    if stale:
        log.warning(f"removed the results that depended on step {spec.name}, now out of date: {', '.join(stale)}")


def free_bytes(folder: str) -> int | None:
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def remove_dependent_results(run: RunParams, specs: dict[str, StepSpec], failed: StepSpec,
                             state: dict[str, Any]) -> list[str]:
    """Delete the recorded results (eval, fidelity) made from what ``failed`` was remaking; mark them stale."""
    produced = {run.path(p) for p in failed.outputs}
    order = list(specs)
    stale = []
    for name in order[order.index(failed.name) + 1:]:
        spec = specs[name]
        if not any(path in produced for path in spec.inputs.values()):
            continue
        produced |= {run.path(p) for p in spec.outputs}
        entry = state["outputs"].get(spec.product)
        if name not in RESULT_STEPS or entry is None:
            continue
        for relative in entry.get("owns", []):
            if relative not in spec.shared and os.path.lexists(run.path(relative)):
                remove(run.path(relative))
                stale.append(relative)
        entry.update(status="stale", stale_reason=f"step {failed.name}, which it depends on, failed in an "
                                                  f"earlier run; its results were removed")
    return stale


# ---------------------------------------------------------------- questions before the first step

def check_engine(args: argparse.Namespace) -> None:
    """Refuse (exit 2) a --precision or --providers that this CPU and these packages cannot run, before any
    step: the engine choice is engines.choose_engine's, the providers must be in this onnxruntime."""
    from beit_pipeline.inference import engines
    choice = engines.choose_engine(args.providers or None, args.precision)
    if choice.engine == "onnxruntime" and args.providers:
        import onnxruntime

        from beit_pipeline.inference.sessions import PROVIDERS
        available = onnxruntime.get_available_providers()
        for item in [p.strip() for p in args.providers.split(",") if p.strip()]:
            name = PROVIDERS.get(item.lower(), item)
            if name not in available:
                raise UsageError(f"--providers {args.providers}: {item} ({name}) is not in this onnxruntime "
                                 f"(available: {', '.join(available)}); it would run on the CPU instead")
    print(f"{choice.engine} {choice.precision} ({choice.reason})")


def check_workdir(args: argparse.Namespace) -> None:
    """Refuse (exit 2) a work folder that cannot be made or written, naming why, before any step."""
    folder = os.path.abspath(args.workdir)
    try:
        os.makedirs(folder, exist_ok=True)
        with files.temporary_beside(os.path.join(folder, ".run_all_probe")):
            pass
    except OSError as exc:
        raise UsageError(f"--workdir {folder}: cannot write there ({exc.strerror or exc}); choose another "
                         "--workdir") from exc


def num_classes(run: RunParams) -> int:
    """The width of the model's output (classes), read from the padded ONNX graph (its weights left unread)."""
    import onnx
    from google.protobuf.message import DecodeError
    path = run.path(run.files.graph_modify)
    try:
        dims = onnx.load(path, load_external_data=False).graph.output[0].type.tensor_type.shape.dim
        classes = int(dims[-1].dim_value)
    except (OSError, IndexError, ValueError, DecodeError) as exc:
        raise PipelineFileError(f"{path}: cannot read the number of classes from its output ({exc})") from exc
    if classes < 1:
        raise PipelineFileError(f"{path}: its output's last axis has no fixed size (the number of classes)")
    return classes


# ---------------------------------------------------------------- the steps' output contracts

def verify_product(run: RunParams, spec: StepSpec) -> None:
    path = run.path(spec.product)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise PipelineFileError(f"step {spec.name} wrote no {path}")


def verify_demo(run: RunParams, spec: StepSpec) -> None:
    if files.read_json(run.path(os.path.join(chain.DEMO, chain.DEMO_RECORD))) is None:
        raise PipelineFileError(f"step demo left {run.path(chain.DEMO)} without {chain.DEMO_RECORD}")


def verify_preprocess(run: RunParams, spec: StepSpec) -> None:
    from beit_pipeline.preprocess import batches
    manifest = batches.require_complete_manifest(run.path(spec.product))
    if manifest["batch_size"] != run.batch_size:
        raise PipelineFileError(f"{run.path(spec.product)}: batch size {manifest['batch_size']}, "
                                f"not {run.batch_size}")


def verify_inference(run: RunParams, spec: StepSpec) -> None:
    """Every batch of the manifest has an output in the promoted folder."""
    from beit_pipeline.inference import outputs
    from beit_pipeline.preprocess import batches
    manifest = batches.require_complete_manifest(run.path(run.files.prep))
    folder = run.path(spec.product)
    found = outputs.find_outputs(folder) if os.path.isdir(folder) else {}
    missing = [stem for stem, _ in batches.rows_from_manifest(manifest) if stem not in found]
    if missing:
        raise PipelineFileError(f"step {spec.name} left {len(missing)} outputs missing in {folder} "
                                f"({missing[0]}_0.*, ...)")


def verify_eval(run: RunParams, spec: StepSpec) -> None:
    """The guide's JSON (a title and three entries) and the details beside it, with numbers."""
    guide = files.read_json(run.path(spec.product)) or {}
    if guide.get("title") != "Overall statistical evaluation" or len(guide.get("value") or []) != 3:
        raise PipelineFileError(f"{run.path(spec.product)}: not the guide's accuracy JSON (a title, three entries)")
    results.read_details(run.path(spec.outputs[1]))


def verify_fidelity(run: RunParams, spec: StepSpec) -> None:
    report = files.read_json(run.path(spec.product)) or {}
    if not isinstance(report.get("stages"), list) or not report["stages"]:
        raise PipelineFileError(f"{run.path(spec.product)}: the fidelity report lists no stages")


VERIFY = {"demo": verify_demo, "preprocess": verify_preprocess, "beit_infer": verify_inference,
          "ais_bench": verify_inference, "eval": verify_eval, "fidelity": verify_fidelity}


# ---------------------------------------------------------------- summary

def summary(args: argparse.Namespace) -> None:
    """The closing table (backend, batch, images, Top-1, Top-5, throughput), then what the numbers are:
    counts and intervals, the subset, what they were made from, their cost against the fp32 result."""
    run = load_run(args.workdir)
    acc_path = run.path(run.result_name)
    acc = results.read_details(run.path(chain.details_name(run.result_name)))
    from beit_pipeline.inference.summary import run_figures
    figures = run_figures(run.path(run.outputs_dir), run.path(run.files.prep))
    tput = figures.table_value()  # img/s over the real images; ais_bench's formula in figures.describe()
    backend = run.backend
    if run.backend == "ort":  # the engine and precision beit_infer.py really ran, as the details record them
        backend = f"cpu: {results.describe_run(acc)}"
    row = "| {:<22} | {:>5} | {:>6} | {:>9} | {:>9} | {:>18} |"
    print()
    print(row.format("backend", "batch", "images", "Top-1 (%)", "Top-5 (%)", "throughput (img/s)"))
    print("|" + "|".join("-" * w for w in (24, 7, 8, 11, 11, 20)) + "|")
    print(row.format(backend, run.batch_size, int(acc["num_images"]), f"{acc['top1']:.2f}", f"{acc['top5']:.2f}",
                     tput))
    print(figures.describe())
    print_prediction(run, acc)
    print_what_it_is(run, acc)
    print_costs(run, acc)
    print_notes(run, acc, run.path(chain.details_name(run.result_name)))
    log.info(f"results: {acc_path} (the guide's JSON) and {chain.details_name(run.result_name)} beside it")


def print_what_it_is(run: RunParams, acc: dict[str, Any]) -> None:
    """Counts and 95% intervals, the subset statement, and what the numbers were made from."""
    n = int(acc["num_images"])
    images, labels = acc.get("images") or {}, acc.get("labels") or {}
    made = [f"{name} {os.path.basename(rec['path'])} (sha256 {rec['sha256']})"
            for name, rec in (("checkpoint", acc.get("checkpoint")), ("model", acc.get("model"))) if rec]
    print(f"\nTop-1: {acc['top1_correct']}/{n} images (95% interval {interval(acc, 'top1')}); "
          f"Top-5: {acc['top5_correct']}/{n} ({interval(acc, 'top5')})")
    print(f"images: {acc.get('subset') or f'all {n} labelled images evaluated'}; image set "
          f"{images.get('fingerprint')} ({images.get('source')})")
    print(f"labels: {labels.get('path')} (sha256 {labels.get('sha256')})")
    print("made by: " + ", ".join(made + [f"engine {results.describe_run(acc)}"]))


def interval(acc: dict[str, Any], key: str) -> str:
    low, high = acc.get(f"{key}_interval_95") or (float("nan"), float("nan"))
    return f"{low:.2f}-{high:.2f}%"


def recorded_results(run: RunParams, state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{result name: details} of this batch size's complete, unchanged results in the record."""
    found = {}
    for product, entry in ((state or {}).get("outputs") or {}).items():
        if entry.get("step") != "eval" or entry.get("status") != "complete":
            continue
        if not run.files.is_accuracy(product):
            continue
        recorded = entry.get("outputs") or {}
        if any(output_digest(run.path(rel)) != digest for rel, digest in recorded.items()):
            continue  # changed by hand since: not ours to compare
        data = files.read_json(run.path(chain.details_name(product)))
        if data is not None and isinstance(data.get("top1_hits"), str):
            found[product] = data
    return found


def print_costs(run: RunParams, acc: dict[str, Any]) -> None:
    """The Top-1 of every other engine or precision against the fp32 result, on the same images, labels and
    checkpoint (what bf16 costs); nothing when there is no such pair."""
    default = chain.ChainFiles(run.batch_size).accuracy
    known = recorded_results(run, load_state(run.workdir))
    known[run.result_name] = acc
    reference = known.get(default)
    if reference is None or not isinstance(reference.get("top1_hits"), str):
        return
    others = [(name, d) for name, d in sorted(known.items()) if name != default and results.same_inputs(reference, d)]
    for name, other in others:
        print("\n" + results.cost_line(reference, other, default, name))


def print_prediction(run: RunParams, acc: dict[str, Any]) -> None:
    """The OM's Top-1 as the fidelity report predicts it (fp16 emulated on the CPU), beside the measured one:
    each with its images and 95% interval, the measured one named by the engine and precision that ran it."""
    report_path = run.path(run.files.fidelity_json)
    if not run.fidelity or not os.path.isfile(report_path):
        return
    from beit_pipeline.evaluation import stats
    from beit_pipeline.fidelity import report as fidelity_report
    predicted = fidelity_report.read_prediction(report_path)
    if predicted is None:
        return
    engine = "the OM on the NPU" if run.backend == "ascend" else f"cpu: {results.describe_run(acc)}"
    count = int(acc["num_images"])
    low, high = stats.percent_interval(stats.wilson(round(acc["top1"] * count / 100.0), count))
    same = " (the same images)" if predicted.every_image and predicted.num_images == count else ""
    print(f"\npredicted OM Top-1 {fidelity_report.prediction_line(predicted, predicted.images)}{same}; "
          f"fp16 emulated on the CPU by beit_fidelity.py, see {report_path[:-5]}.md")
    print(f"measured here ({engine}): Top-1 {acc['top1']:.2f}% (95% CI {low:.2f}-{high:.2f}) on {count} images")


def print_notes(run: RunParams, acc: dict[str, Any], details_path: str) -> None:
    skipped = acc.get("skipped") or []
    if skipped:
        print(f"\nnote: {len(skipped)} images could not be read and were skipped (--skip_bad), so they are not "
              f"counted; they are listed under 'skipped' in {details_path}")
    if run.demo:
        print("\nnote: this was the built-in demo: real photographs, but a randomly initialised model with no "
              "ImageNet\naccuracy, so its labels are the PyTorch model's own predictions and Top-1/Top-5\n"
              "measure fidelity to PyTorch (100% expected), not ImageNet accuracy.  fp16 on an NPU "
              "may flip an image\nwhose two highest PyTorch logits are nearly tied (see min_top1_margin in "
              "demo/demo.json).")


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.pipeline.workstate",
                                     description="run_all.sh's record of which step is complete for which inputs.")
    parser.add_argument("--workdir", default=None, help="the work folder of run_all.sh")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-model", help="refuse a --model the pipeline cannot run (exit 2)")
    check.add_argument("model", help="BEiT variant name")
    sub.add_parser("model-info", help="print the model (the ONNX file's name), input size, simplifier module and "
                                      "result tag (_bf16, or nothing) of the run in progress (after begin)")
    begin_p = sub.add_parser("begin", help="check the work folder and remember this run's parameters")
    begin_p.add_argument("--batch_size", type=int, required=True, help="the run's batch size")
    begin_p.add_argument("--backend", choices=("ascend", "ort"), required=True, help="the backend chosen")
    begin_p.add_argument("--model", default="", help="BEiT variant (default: beit_base_patch16_224's file name)")
    for flag in ("--image_path", "--label_file", "--checkpoint"):
        begin_p.add_argument(flag, default="", help=f"run_all.sh's {flag} (none of the three: the demo)")
    begin_p.add_argument("--soc_version", default="", help="atc's --soc_version (Ascend backend)")
    begin_p.add_argument("--skip_bad", action="store_true", help="preprocessing skips unreadable images")
    begin_p.add_argument("--force", action="store_true", help="redo every step (deleting only recorded outputs)")
    begin_p.add_argument("--no_fidelity", action="store_true", help="the run has no fidelity step")
    begin_p.add_argument("--keep_dtype", default="", help="atc's keep_dtype file (part of atc's and fidelity's key)")
    begin_p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "int8"),
                         help="beit_infer.py's --precision (ort backend; part of the inference step's key)")
    begin_p.add_argument("--providers", default="",
                         help="beit_infer.py's --providers (ort backend; \"\": its default engine)")
    fail_p = sub.add_parser("fail", help="a step failed or was stopped: remove what it left half-made and the "
                                         "results that depended on it, and say so")
    fail_p.add_argument("step", help="step name as run_all.sh logs it")
    fail_p.add_argument("--exit_code", type=int, default=1, help="the exit code of the command that failed")
    fail_p.add_argument("--tool", default="", help="the command that failed (onnx_check in step onnxsim)")
    fail_p.add_argument("--interrupted", action="store_true",
                        help="stopped by a signal: run_all.sh prints the error line itself")
    holder = sub.add_parser("lock-holder", help="print who holds a lock file (after kill -9 of run_all.sh: its "
                                                "step, still running)")
    holder.add_argument("lock", help="the lock file")
    engine = sub.add_parser("check-engine", help="exit 2 unless this CPU and these packages run --precision with "
                                                 "--providers; print the engine that will run")
    engine.add_argument("--precision", default="fp32", help="beit_infer.py's --precision")
    engine.add_argument("--providers", default="", help="beit_infer.py's --providers (\"\": the default)")
    sub.add_parser("check-workdir", help="exit 2 unless --workdir can be made and written")
    sub.add_parser("num-classes", help="print the number of classes of the run's padded ONNX model (after begin)")
    for name, text in (("start", "0: run STEP now (old outputs removed); 10: skip, it is complete"),
                       ("finish", "check STEP's outputs and record them as complete")):
        sub.add_parser(name, help=text).add_argument("step", help="step name as run_all.sh logs it")
    sub.add_parser("summary", help="print the result table of the run")
    return parser


COMMANDS = {"begin": begin, "start": start, "finish": finish, "summary": summary, "fail": fail,
            "check-model": lambda args: check_model(args.model),
            "model-info": lambda args: model_info(load_run(args.workdir)),
            "lock-holder": lambda args: print(files.describe_lock_holder(args.lock)),
            "check-engine": check_engine, "check-workdir": check_workdir,
            "num-classes": lambda args: print(num_classes(load_run(args.workdir)))}
NO_WORKDIR = ("check-model", "lock-holder", "check-engine")


def model_info(run: RunParams) -> None:
    """run_all.sh's line: the ONNX file's name, the input size, the simplifier module and the result tag
    (``_bf16``: the outputs and results of a non-default engine or precision get their own names)."""
    print(run.model, run.image_size, simplifier(run.model), run.tag)


def run(args: argparse.Namespace) -> int | None:
    if args.command not in NO_WORKDIR and not args.workdir:
        raise UsageError("--workdir is required")
    return COMMANDS[args.command](args)


def main(argv: list[str] | None = None) -> int:
    return cli.run_main(build_parser(), run, argv, info_prefix="[run_all] ")


if __name__ == "__main__":
    sys.exit(main())
