"""beit_infer.py's output folder: what a rerun keeps, what it may delete, and what it refuses.

ais_bench never deletes anything (benchmark_process.py ``main``: ``os.makedirs`` when the folder is
missing, then ``save_tensors_to_file`` writes each output over any file of the same name).  This
module keeps to that, with one addition, the resume:

- Files are deleted only when this folder's record (record.py, beside the folder) lists
  them as written by a run of beit_infer.py: the outputs of a run whose model, inputs, format,
  batch size, engine or precision differ, and the atomic-write temporaries of those names.
  Without a record nothing is deleted; outputs of the same names are overwritten, as ais_bench
  does, and every other file is left where it is (the log names the output-like ones).
- Outputs are kept (resumed) only under ``--output_dirname``, when the record matches this run,
  and only files written after the record was (older ones at those names are not ours).
- An output folder that is the input folder, or holds the input files, is refused before
  anything runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import time
from collections.abc import Container, Iterable
from typing import TYPE_CHECKING, NoReturn, Optional

from beit_pipeline import files
from beit_pipeline.cli import check
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.inference import outputs as output_files
from beit_pipeline.inference import record as records

if TYPE_CHECKING:
    import argparse

    from beit_pipeline.inference.runner import InputSet, ModelInfo

log = logging.getLogger(__name__)

_TEMPORARY_RE = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # files.temporary_beside's .<name>.XXXXXXXX.tmp
_OUTPUT_LIKE_RE = re.compile(r"^.+_\d+\.(txt|bin|npy)$", re.IGNORECASE)


def output_name(stem: str, index: int, fmt: str) -> str:
    """ais_bench's ``<input stem>_<output index>.<fmt>`` (io_oprations.py save_tensors_to_file)."""
    return f"{stem}_{index}.{fmt.lower()}"


@dataclasses.dataclass
class InferencePlan:
    inputs: object  # inference.InputSet
    out_dir: Optional[str]  # the output folder, or None without --output
    fmt: str
    num_outputs: int
    todo: list  # indices of the input files to run
    kept: list  # indices whose outputs an earlier run left and that are kept
    record: Optional[records.OutputRecord] = None  # what made this folder's outputs (this run's)

    @property
    def images(self) -> bool:
        """Whether the real images of each file are known (from the manifest), not only its rows."""
        return self.inputs.manifest_print is not None

    def groups(self) -> list:
        return self.inputs.groups()

    def output_path(self, i: int, k: int = 0) -> str:
        return os.path.join(self.out_dir, output_name(self.inputs.stems[i], k, self.fmt))

    def output_paths(self, i: int) -> list[str]:
        return [self.output_path(i, k) for k in range(self.num_outputs)]

    def output_names(self) -> list:
        return [output_name(stem, k, self.fmt) for stem in self.inputs.stems for k in range(self.num_outputs)]


def output_dir(args: argparse.Namespace) -> Optional[str]:
    """``<output>/<--output_dirname or the date>``, or None without --output."""
    if args.output is None:
        return None
    return os.path.join(args.output, args.output_dirname or time.strftime("%Y_%m_%d-%H_%M_%S"))


def refuse_folder_holding_inputs(out_dir: str | None, input_spec: str | None, paths: Iterable[str]) -> None:
    """An output folder that is the input folder or holds an input file: refused with one line (exit 2)."""
    if out_dir is None or input_spec is None:
        return
    out_real = os.path.realpath(out_dir)
    folders = [p for p in input_spec.split(",") if p and os.path.isdir(p)]
    for path in folders + list(paths):
        real = os.path.realpath(path)
        check(real != out_real and not real.startswith(out_real.rstrip(os.sep) + os.sep),
              f"{out_dir}: the output folder {'is' if real == out_real else 'holds'} the input {path}; outputs "
              "are never written among their inputs: choose another --output or --output_dirname")


# ---------------------------------------------------------------- what is there

def existing_output_ok(path: str, rows: int, num_classes: int | None, written_after_ns: int = 0) -> bool:
    """Whether an output left by an earlier run is complete, has the right rows and was written after its record."""
    if not os.path.isfile(path) or os.path.islink(path) or os.stat(path).st_mtime_ns < written_after_ns:
        return False
    if path.endswith(".txt"):
        # Parsing 50000 images' worth of %f text to resume would take longer than it saves;
        # atomic writes already rule out a cut-off file, so count its lines.
        with open(path, "rb") as f:
            data = f.read()
        return data.endswith(b"\n") and sum(1 for ln in data.splitlines() if ln.strip()) == rows
    try:
        arr = output_files.read_output(path, num_classes) if num_classes else None
    except PipelineFileError:
        return False
    return arr is None or arr.shape[0] == rows


def kept_outputs(plan: InferencePlan, num_classes: int | None, written_after_ns: int) -> list:
    """Indices of the inputs whose every output an earlier run (of a matching record) left complete."""
    return [i for i in range(len(plan.inputs.files))
            if all(existing_output_ok(plan.output_path(i, k), plan.inputs.rows[i], num_classes if k == 0 else None,
                                      written_after_ns)
                   for k in range(plan.num_outputs))]


def present(out_dir: str, names: Iterable[str]) -> list:
    return sorted(n for n in set(names) if os.path.isfile(os.path.join(out_dir, n)))


def remove_own_files(out_dir: str, record: Optional[records.OutputRecord], names: Iterable[str] = ()) -> int:
    """Delete the files ``record`` lists (only regular files, only in ``out_dir``) and the temporaries of
    ``names`` and of those; the record goes first, so a stop half way leaves nothing that looks trusted."""
    own = set(record.outputs) if record is not None else set()
    records.remove_record(out_dir)
    removed = 0
    for name in sorted(own):
        path = os.path.join(out_dir, name)
        if os.path.basename(name) == name and os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
            removed += 1
    remove_temporaries(out_dir, own | set(names))
    return removed


def remove_temporaries(out_dir: str, names: Iterable[str]) -> None:
    """The ``.<name>.XXXXXXXX.tmp`` leftovers of interrupted atomic writes of ``names`` (never other files)."""
    names = set(names)
    for entry in os.listdir(out_dir):
        m = _TEMPORARY_RE.match(entry)
        if m and m.group("name") in names:
            files.remove_temporary(os.path.join(out_dir, entry))


def report_foreign(out_dir: str, ours: Container[str]) -> None:
    """Name the output-like files this run leaves alone (ais_bench never deletes either)."""
    others = sorted(n for n in os.listdir(out_dir) if n not in ours and _OUTPUT_LIKE_RE.match(n)
                    and os.path.isfile(os.path.join(out_dir, n)))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        log.warning(f"{out_dir}: {len(others)} files there were not written by this run and are left as they are "
                    f"({shown}); beit_eval_acc.py --prep_image scores only the manifest's batches")


def filesystem_now(out_dir: str) -> int:
    """The time the folder's file system stamps on a file written now (its clock is coarser than time.time_ns:
    an output written just after time.time_ns() can carry an earlier mtime).  Measured beside the folder."""
    fd, path = tempfile.mkstemp(prefix=".beit_infer_clock.", suffix=".tmp",
                                dir=os.path.dirname(os.path.abspath(out_dir)))
    try:
        return os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
        os.unlink(path)


# ---------------------------------------------------------------- the decision

def refuse_resume(out_dir: str, changed: list[str], fmt_was: str | None) -> NoReturn:
    hint = f"rerun with --outfmt {fmt_was.upper()}, " if fmt_was else ""
    raise PipelineFileError(f"{out_dir}: --resume, but its outputs cannot be kept: {'; '.join(changed)}. Nothing "
                            f"was deleted; {hint}drop --resume to recompute them all, or choose another "
                            "--output_dirname")


def reuse_decision(args: argparse.Namespace, out_dir: str, new: records.OutputRecord,
                   old: records.OutputRecord | None) -> str:
    """keep (the record matches: resume), clear (recompute all) or fresh (nothing of ours or at our names).

    With --resume, outputs that cannot be kept are refused and nothing is deleted.
    """
    if not os.path.isdir(out_dir):
        return "fresh"
    there = present(out_dir, set(new.outputs) | set(old.outputs if old else ()))
    if args.overwrite:
        return "clear"
    if not there:
        return "fresh"
    changed = records.changes(old, new)
    if changed and args.resume:
        refuse_resume(out_dir, changed, old.outfmt if old and old.outfmt != new.outfmt else None)
    if changed:
        log.info(f"{out_dir}: recomputing all {len(there)} outputs there: {', '.join(changed)}")
        return "clear"
    # A dated folder is a new run's even when one of the same second exists: recompute as before.
    return "keep" if args.output_dirname is not None else "clear"


def prepare(args: argparse.Namespace, model: ModelInfo, inputs: InputSet, out_dir: str,
            new: records.OutputRecord) -> InferencePlan:
    """The plan for ``out_dir`` (held under its lock): what to keep, what to run; the record written first."""
    old = records.read_record(out_dir) if os.path.isdir(out_dir) else None
    decision = reuse_decision(args, out_dir, new, old)
    plan = InferencePlan(inputs, out_dir, args.outfmt.lower(), len(model.output_names),
                         todo=list(range(len(inputs.files))), kept=[], record=new)
    os.makedirs(out_dir, exist_ok=True)
    records.remove_legacy_record(out_dir)
    if decision == "keep":
        new.written_after_ns = old.written_after_ns
        remove_temporaries(out_dir, new.outputs)
        plan.kept = kept_outputs(plan, model.num_classes, new.written_after_ns)
        plan.todo = [i for i in plan.todo if i not in set(plan.kept)]
    else:
        removed = remove_own_files(out_dir, old, new.outputs)
        if removed:
            log.info(f"{out_dir}: deleted the {removed} outputs its record lists as written by an earlier run")
        new.written_after_ns = filesystem_now(out_dir)
    report_foreign(out_dir, set(new.outputs))
    with files.naming_errors(records.record_path(out_dir)):
        records.write_record(out_dir, new)
    return plan

