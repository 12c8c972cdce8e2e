"""atc's --keep_dtype file: reading it, matching it to the operators of a model, writing a suggestion.

The format (CANN's ATC documentation, "--keep_dtype", e.g.
https://www.hiascend.com/document/detail/zh/CANNCommunityEdition/900beta1/devaids/atctool/atlasatcparam_16_0074.html):
one operator per line, either the name of a node of the ORIGINAL model given to atc
(here beit_mg_bs{N}.onnx) or ``OpType::TypeName`` with an Ascend IR operator type;
used together with ``--precision_mode=force_fp16`` the listed operators keep the
model's precision (fp32) and every other one is built in fp16.  The documentation's
own sample file holds lines starting with ``#`` ("#算子名称配置样例:"), which we read
as comments and write one of: what made the file.

Names can be lost: atc fuses patterns (MatMul + bias Add, the LayerNorm chain,
Gelu) and its documentation warns, for the sister option --customize_dtypes, that
fusion and splitting can change operator names so that a configured name no longer
applies.  A suggestion therefore lists every node of a fused operator and offers
``OpType::`` lines (commented out: they keep EVERY operator of the type) for the
operators whose names could be lost.
"""

import dataclasses
import hashlib
import logging
import os
import shlex
from typing import Iterable, Optional

from beit_pipeline import files
from beit_pipeline.errors import PipelineFileError, UsageError

log = logging.getLogger(__name__)

OPTYPE_PREFIX = "OpType::"
# The Ascend IR operator types atc builds the emulation's operators as (atc's ONNX parser maps ONNX MatMul on
# batched operands to BatchMatMulV2 and Softmax to SoftmaxV2; the fused kinds by their Ascend IR names).  Not
# checked on a device: offered as commented-out alternatives only, and matched in both spellings.
ASCEND_TYPES = {"MatMul": "BatchMatMulV2", "MatMul+bias": "BatchMatMulV2", "Softmax": "SoftmaxV2",
                "LayerNorm": "LayerNorm", "Gelu": "Gelu"}
# Kinds atc is known to fuse: a node name inside them may not survive the build.
FUSED_KINDS = ("MatMul+bias", "LayerNorm", "Gelu")


@dataclasses.dataclass
class KeepList:
    """The lines of a keep_dtype file: node names and Ascend IR operator types (without ``OpType::``)."""
    names: list
    op_types: list = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.names or self.op_types)

    def lines(self) -> list:
        return list(self.names) + [OPTYPE_PREFIX + t for t in self.op_types]

    def keeps(self, kind: str, nodes: Iterable) -> bool:
        """Whether an emulated operator (its kind and its ONNX nodes) is kept in fp32 by this list."""
        nodes = list(nodes)
        if any(n.name and n.name in self.names for n in nodes):
            return True
        types = {kind, ASCEND_TYPES.get(kind, kind)} | {n.op_type for n in nodes if len(nodes) == 1}
        return bool(types & set(self.op_types))


def parse(text: str, source: str = "keep_dtype file") -> KeepList:
    """A KeepList from the file's text; blank lines and ``#`` comments skipped; PipelineFileError when malformed."""
    names, types = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip().lstrip("\ufeff")
        if not line or line.startswith("#"):
            continue
        if line.startswith(OPTYPE_PREFIX):
            op_type = line[len(OPTYPE_PREFIX):].strip()
            if not op_type or any(c.isspace() for c in op_type):
                raise PipelineFileError(f"{source}:{number}: '{line}' is not OpType::TypeName")
            types.append(op_type)
        else:
            names.append(line)
    return KeepList(_unique(names), _unique(types))


def _unique(items: list) -> list:
    return list(dict.fromkeys(items))


def read(path: Optional[str]) -> KeepList:
    """The KeepList of a file (an empty list for None); UsageError when it does not exist."""
    if not path:
        return KeepList([])
    if not os.path.isfile(path):
        raise UsageError(f"--keep_dtype {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return parse(f.read(), path)
    except UnicodeDecodeError as exc:
        raise PipelineFileError(f"{path}: not a UTF-8 text file ({exc.reason})") from exc


def check_names(keep: KeepList, model_names: set, model_path: str) -> list:
    """The names of ``keep`` that name no node of the model given to atc (atc would ignore them)."""
    missing = [n for n in keep.names if n not in model_names]
    for name in missing:
        log.warning(f"keep_dtype: '{name}' names no node of {model_path}; atc would not find it")
    return missing


def cfg_text(keep: KeepList, made_by: str, alternatives: list) -> str:
    """The keep_dtype file: a comment saying what made it, one name per line, OpType:: alternatives commented."""
    lines = [f"# {made_by}"]
    lines += keep.lines()
    if alternatives:
        lines.append("# If atc's log shows a name above lost in fusion, OpType lines keep EVERY operator of the type:")
        lines += [f"# {OPTYPE_PREFIX}{t}" for t in alternatives]
    return "\n".join(lines) + "\n"


def write_files(cfg_path: str, json_path: str, keep: KeepList, made_by: str, record: dict,
                alternatives: list) -> None:
    """keep_dtype_bs{N}.cfg and .json, atomically."""
    files.write_text_atomic(cfg_path, cfg_text(keep, made_by, alternatives))
    files.write_json_atomic(json_path, record)


def atc_command(model: str, output: str, batch_size: int, image_size: int, cfg: str,
                soc_version: str = "Ascend310P3") -> str:
    """The guide's atc command line with the keep list (and the precision mode it needs)."""
    args = ["atc", "--framework=5", f"--model={model}", f"--output={output}", "--input_format=NCHW",
            f"--input_shape=image:{batch_size},3,{image_size},{image_size}", "--log=error",
            f"--soc_version={soc_version}", "--optypelist_for_implmode=Gelu", "--op_select_implmode=high_performance",
            "--precision_mode=force_fp16", f"--keep_dtype={cfg}"]
    return " ".join(shlex.quote(a) for a in args)


def for_stage(path: Optional[str], stage: str) -> tuple:
    """(KeepList, digest of the file's content) for an emulated stage: the keep list builds our OM's
    emulation (om_emulation) only; the guide's graph has its own nodes.  ("", empty) without a file."""
    if not path or stage != "om_emulation":
        return KeepList([]), ""
    keep = read(path)
    with open(path, "rb") as f:
        return keep, hashlib.sha256(f.read()).hexdigest()
