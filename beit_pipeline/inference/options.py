"""beit_infer.py's command line measured against ais_bench's: spellings, values, and what each flag means on a CPU.

The flags are the newer ais_bench's (mjlovesz/sync-ait ait/components/benchmark/ais_bench/infer/
__main__.py ``get_args``, the tool run as ``python3 -m ais_bench``; its rules in benchmark_process.py
``args_rules`` and args_check.py).  Every one of them is accepted.  What this module decides:

- **Spellings.**  ``python3 -m ais_bench`` takes ``--output_dirname`` style names, camelCase for the
  dynamic-shape flags, and the dashed ``--dym-shape`` and ``--warmup-count``; ``ait benchmark`` (main_cli.py)
  takes dashed names (``--output-dirname``).  Both are accepted here; a spelling ``python3 -m ais_bench``
  rejects (the dashed ones it lacks, the guide README's ``--batch_size``) gets one warning line, because a
  script that depends on it fails on the device.
- **Values** ais_bench rejects but we take (``--outfmt txt``, a boolean flag without its value, a path with
  characters outside ``[_A-Za-z0-9/.-]``) get one warning line each.  Where ais_bench refuses outright
  (``--output_dirname /abs``, ``--profiler True --dump True``, ``--threads 0``, ``--device 256``) we refuse too.
- **Flags without meaning on the CPU** (NPU profiling, dump, power, AIPP, pipeline mode, run mode) are
  ignored with one line saying why (``IGNORED``); flags that choose a dynamic batch or shape are honoured
  on a model with a dynamic batch axis, else refused with the reason (``dynamic_batch``).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Optional

from beit_pipeline.cli import check
from beit_pipeline.errors import UsageError

if TYPE_CHECKING:
    from beit_pipeline.inference.runner import ModelInfo

log = logging.getLogger(__name__)

AIS_PATH_CHARS = re.compile(r"[^_A-Za-z0-9/.-]")  # path_security_check.py PATH_WHITE_LIST_REGEX
_BARE = object()  # a boolean flag given without a value


def str2bool(text: str) -> bool:
    """ais_bench's str2bool (args_check.py): yes/true/t/y/1 and no/false/f/n/0, any case."""
    value = str(text).lower()
    if value in ("yes", "true", "t", "y", "1"):
        return True
    if value in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"Boolean value expected true, 1, false, 0 with case insensitive, got {text!r}")


def positive_int(text: str) -> int:
    """ais_bench's check_positive_integer."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is an invalid positive int value")
    return value


def nonnegative_int(text: str) -> int:
    """ais_bench's check_nonnegative_integer."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is an invalid nonnegative int value")
    return value


class AisFlag(argparse.Action):
    """Store a flag's value, noting for ``review`` where ``python3 -m ais_bench`` would have rejected it.

    ``ais``: the spellings ais_bench's get_args takes; any other spelling of the flag is a note.
    ``boolean``: one of ais_bench's str2bool flags, which need a value; given bare it means True (a note).
    ``upper``: choices ais_bench takes in capitals only (--outfmt); another case is a note.
    """

    def __init__(self, option_strings: Sequence[str], dest: str, ais: Iterable[str] = (), boolean: bool = False,
                 upper: Sequence[str] | None = None, **kwargs: Any):
        if boolean:
            kwargs.update(nargs="?", const=_BARE, type=str2bool)
        super().__init__(option_strings, dest, **kwargs)
        self.ais, self.upper = set(ais), upper

    def __call__(self, parser, namespace, values, option_string=None):
        notes = list(getattr(namespace, "lenient", None) or [])
        if values is _BARE:
            values = True
            notes.append(f"{option_string} without a value: ais_bench needs one ({option_string} True)")
        if self.upper is not None:
            if str(values).upper() not in self.upper:
                parser.error(f"argument {option_string}: invalid choice: {values!r} "
                             f"(choose from {', '.join(map(repr, self.upper))})")
            if values != values.upper():
                notes.append(f"{option_string} {values}: ais_bench takes only {'/'.join(self.upper)}, in capitals")
            values = values.upper()
        if option_string not in self.ais:
            notes.append(spelling_note(option_string, sorted(self.ais, key=len)[-1]))
        setattr(namespace, self.dest, values)
        namespace.given = {**(getattr(namespace, "given", None) or {}), self.dest: option_string}
        namespace.lenient = notes


def spelling_note(used: str, ais: str) -> str:
    if used == "--batch_size":
        return ("--batch_size: ais_bench takes only --batchsize (--batch_size is kept because the guide's README "
                "passes it); a script that passes it fails on the device")
    return f"{used}: ait benchmark's spelling; python3 -m ais_bench takes only {ais}"


# dest -> why ais_bench's flag means nothing on the CPU (a line when it is given; booleans only when True)
IGNORED = {
    "acl_json_path": "acl.json configures CANN's profiling and dump on the NPU; nothing here reads it",
    "profiler": "it profiles the NPU with msprof; there is no NPU here",
    "profiler_rename": "it renames msprof's output; there is no NPU profiling here",
    "dump": "it dumps the NPU's operator data; there is no NPU here",
    "dump_npy": "it converts the NPU's dump to .npy; there is no dump here",
    "energy_consumption": "it reads the NPU's power through npu-smi; there is no NPU here",
    "npu_id": "it names the chip whose power --energy_consumption reads; there is no NPU here",
    "run_mode": ("it chooses how ais_bench hands inputs to the NPU (array/files/tensor/full); the outputs are the "
                 "same, and the CPU engine reads host arrays"),
    "pipeline": "it overlaps host-device copies with NPU compute; the CPU engine has no copies to overlap",
    "aipp_config": ("it sets the dynamic AIPP input of an OM; an ONNX model has none, and ais_bench ignores it "
                    "for a model without one too"),
    "backend": "ais_bench uses --backend trtexec only with --perf True",
    "output_size": ("it sizes the output buffers of a dynamic-shape OM; ONNX Runtime and OpenVINO size their "
                    "outputs themselves"),
}

# dest -> why ais_bench's flag is refused here (it would change what is run, and cannot be honoured)
REFUSED = {
    "dym_shape_range": ("it runs the model at every shape of a range to find the fastest (ais_bench's "
                        "dymshape_range_run) instead of running the input; BEiT's batch files have one shape: time "
                        "a model with a dynamic batch with --batchsize N instead"),
    "perf": ("it runs TensorRT's trtexec on the model (ais_bench's backend_run) instead of the model's run and "
             "writes no outputs; use --providers tensorrt for TensorRT"),
    "dym_hw": ("it picks the image size of an OM converted with --dynamic_image_size; BEiT's batch files hold "
               "images of one size, the model's"),
}


def given_flags(args: argparse.Namespace) -> dict:
    """{dest: the spelling used} of the ais_bench flags given on the command line."""
    return getattr(args, "given", None) or {}


def _is_set(args, dest) -> bool:
    value = getattr(args, dest, None)
    return dest in given_flags(args) and value not in (None, False)


def review(args: argparse.Namespace) -> None:
    """After parsing: ais_bench's refusals, then one line per leniency and per ignored flag.

    Raises UsageError (exit 2) where ais_bench refuses, or where a flag would change what is
    computed in a way this runner cannot honour.
    """
    ais_bench_refusals(args)
    for dest, why in REFUSED.items():
        if _is_set(args, dest):
            raise UsageError(f"{given_flags(args)[dest]} {getattr(args, dest)}: refused: {why}")
    for note in getattr(args, "lenient", None) or []:
        log.warning(note)
    for flag, value in path_arguments(args):
        bad = sorted(set(AIS_PATH_CHARS.findall(value)))
        if bad:
            log.warning(f"{flag} {value}: ais_bench takes only [_A-Za-z0-9/.-] in paths and would refuse this one "
                        f"(it holds {' '.join(map(repr, bad))})")
    for dest, why in IGNORED.items():
        if _is_set(args, dest):
            log.warning(f"{given_flags(args)[dest]} {getattr(args, dest)}: ignored on the CPU: {why}")
    review_threads(args)
    if getattr(args, "divide_input", False) and "," not in str(args.device):
        log.info("--divide_input True: ignored with one --device (ais_bench divides the input only among several)")


def ais_bench_refusals(args: argparse.Namespace) -> None:
    """What ais_bench's args_rules (benchmark_process.py) and its argument types refuse."""
    check(not (args.output_dirname and os.path.isabs(args.output_dirname)),
          f"--output_dirname {args.output_dirname}: ais_bench refuses an absolute path (\"--output_dirname do not "
          "support abs path!\", benchmark_process.py args_rules); give a folder name: it is made under --output")
    check(not (args.profiler and args.dump), "parameter --profiler cannot be true at the same time as parameter "
                                             "--dump (as ais_bench)")
    check(not ((args.profiler or args.dump) and args.output is None),
          "--profiler / --dump need --output (as ais_bench: 'when dump or profiler, miss output path')")
    for dest, kind in (("acl_json_path", ".json"), ("aipp_config", ".config")):
        path = getattr(args, dest, None)
        check(path is None or (os.path.isfile(path) and path.endswith(kind)),
              f"{given_flags(args).get(dest, '--' + dest)} {path}: ais_bench takes "
              f"only an existing {kind} file here")


def path_arguments(args: argparse.Namespace) -> list:
    """(flag, path) of every path argument, as ais_bench's path checks see them."""
    found = [("--model", args.model), ("--output", args.output), ("--output_dirname", args.output_dirname)]
    found += [("--input", p) for p in (args.input or "").split(",") if p]
    return [(flag, str(value)) for flag, value in found if value]


def review_threads(args: argparse.Namespace) -> None:
    """ais_bench's --threads is the number of computing sessions of --pipeline mode (args_rules)."""
    if args.threads > 1 and not args.pipeline:
        log.info("need to set --pipeline when setting threads number to be more than one.")  # ais_bench's line
        log.warning(f"--threads {args.threads}: ais_bench's pipeline sessions, so 1 is used (as ais_bench does); "
                    "the CPU engine's own threads are --engine_threads")
        args.threads = 1
    elif args.threads > 1:
        log.warning(f"--threads {args.threads}: ignored on the CPU: ais_bench's pipeline runs that many NPU "
                    "sessions to overlap copies and compute; the CPU engine's own threads are --engine_threads")


# ---------------------------------------------------------------- dynamic batch and shape choices

def parse_shape_spec(text: str, flag: str) -> dict:
    """``name:d0,d1,...;name2:...`` (ais_bench's --dymDims / --dymShape) -> {name: [ints]}."""
    shapes = {}
    for part in filter(None, text.split(";")):
        name, sep, dims = part.rpartition(":")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            shapes[name] = None
        check(sep and shapes[name], f"{flag} {text!r}: give name:d0,d1,... as ais_bench does (image:8,3,224,224)")
    return shapes


def dynamic_batch(args: argparse.Namespace, model: ModelInfo) -> Optional[int]:
    """The batch that --dymBatch, --dymDims or --dymShape choose (None: none given); refused where it cannot hold.

    ais_bench sets them on an OM converted with a dynamic batch or shape (set_session_options);
    here they are honoured on a model with a dynamic batch axis when they name its input at
    the batch files' image size, and refused otherwise.
    """
    given = [d for d in ("dym_batch", "dym_dims", "dym_shape") if _is_set(args, d) and getattr(args, d)]
    if not given:
        return None
    flags = [given_flags(args)[d] for d in given]
    check(len(given) == 1, f"{' and '.join(flags)}: give one (ais_bench would take only the first)")
    flag, value = flags[0], getattr(args, given[0])
    check(model.static_batch is None, f"{flag} {value}: the model {os.path.basename(model.path)} has a static batch "
                                      f"(input '{model.input_name}' shape {model.input_shape}); {flag} chooses the "
                                      "batch of a model with a dynamic one: leave it out")
    if given[0] == "dym_batch":
        return int(value)
    shapes = parse_shape_spec(value, flag)
    want = [3, model.image_size, model.image_size]
    check(list(shapes) == [model.input_name], f"{flag} {value}: the model has one input, '{model.input_name}'")
    shape = shapes[model.input_name]
    check(len(shape) == 4 and shape[1:] == want and shape[0] >= 1,
          f"{flag} {value}: the batch files hold (N, {', '.join(map(str, want))}) images; only the batch N can be "
          "chosen")
    return shape[0]


def auto_shape_mode(args: argparse.Namespace, model: ModelInfo) -> bool:
    """--auto_set_dymshape_mode / --auto_set_dymdims_mode True: each file runs as its own batch (no joining)."""
    flags = [given_flags(args)[d] for d in ("auto_set_dymshape_mode", "auto_set_dymdims_mode") if _is_set(args, d)]
    if not flags:
        return False
    check(model.static_batch is None, f"{flags[0]} True: the model {os.path.basename(model.path)} has a static "
                                      f"shape (input '{model.input_name}' {model.input_shape}); it sets the shape "
                                      "of a dynamic-shape model from each file: leave it out")
    return True
