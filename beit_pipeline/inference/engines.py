"""CPU inference engines and precisions: which engine runs an ONNX model, at which precision, and why.

beit_infer.py runs the ONNX file with ONNX Runtime (``--providers cpu,cuda,...``) or with
OpenVINO's runtime (``--providers openvino``).  Both are wrapped in the same session
interface (``get_inputs``/``get_outputs``/``get_providers``/``run``), so runner.py
does not care which one runs.

Precisions (``--precision``):
  fp32  exact.  OpenVINO's precision hint is set to f32 explicitly: it picks bf16 by
        itself on CPUs with AMX.
  bf16  OpenVINO with the bf16 hint; needs the CPU's bf16 instructions (``avx512_bf16``
        or ``amx_bf16`` in /proc/cpuinfo), refused (naming them) where they are absent,
        because OpenVINO would otherwise emulate it slower than fp32, or silently run f32.
  fp16  OpenVINO with the f16 hint; needs ``avx512_fp16`` or ``amx_fp16``.
  int8  not built: the issue asks for it only where it beats bf16 on a CPU without bf16,
        and this project's machine has bf16 (see README, "CPU engines and precisions").

The default (no ``--providers``) is the fastest exact engine, chosen by measurement
(README): OpenVINO f32 where it is installed, else ONNX Runtime's CPU provider.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Container, Mapping, Sequence
from typing import TYPE_CHECKING

from beit_pipeline.errors import UsageError

if TYPE_CHECKING:
    import numpy as np

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# Which instruction sets give each reduced precision natively (any one of them will do).
NATIVE_FLAGS = {"bf16": ("amx_bf16", "avx512_bf16"), "fp16": ("amx_fp16", "avx512_fp16")}
OV_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
# Where the CPU report is read; a test points this at a file of its own to simulate another CPU.
CPUINFO_ENV = "BEIT_CPUINFO"


def cpu_flags(path: str | None = None) -> frozenset[str]:
    """The CPU's instruction-set flags from /proc/cpuinfo (or ``$BEIT_CPUINFO``, or ``path``); empty if unreadable."""
    path = path or os.environ.get(CPUINFO_ENV) or "/proc/cpuinfo"
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_support(precision: str, flags: Container[str]) -> list[str]:
    """The instruction sets of ``flags`` that run ``precision`` natively, best first (empty: none)."""
    return [f for f in NATIVE_FLAGS.get(precision, ()) if f in flags]


def require_native(precision: str, flags: Container[str]) -> list[str]:
    """Refuse a reduced precision the CPU has no instructions for; returns the instruction sets used."""
    if precision == "int8":
        raise UsageError("--precision int8 is not built: on this project's CPUs bf16 is faster (README, "
                         "'CPU engines and precisions'); use --precision bf16, or fp32 to be exact")
    if precision == "fp32":
        return []
    found = native_support(precision, flags)
    if not found:
        wanted = " or ".join(NATIVE_FLAGS[precision])
        raise UsageError(f"--precision {precision}: this CPU has no {precision} instructions ({wanted} is not "
                         f"in its flags in /proc/cpuinfo); emulating them would be slower than fp32. "
                         f"Use --precision fp32")
    return found


@dataclasses.dataclass
class EngineChoice:
    """What opens the model: ``engine`` "onnxruntime" or "openvino", its providers spec, and the precision."""

    engine: str
    providers: str
    precision: str
    instructions: list  # the CPU instruction sets a reduced precision uses
    reason: str  # why this engine, for the log


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(providers: str | None, precision: str = "fp32", flags: Container[str] | None = None) -> EngineChoice:
    """The engine for ``--providers`` (None: the default) and ``--precision``; UsageError where none has it."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose from {', '.join(PRECISIONS)}")
    flags = cpu_flags() if flags is None else flags
    instructions = require_native(precision, flags)
    names = [p.strip().lower() for p in (providers or "").split(",") if p.strip()]
    if names and names[0] == "openvino":
        return EngineChoice("openvino", "openvino", precision, instructions, "--providers openvino")
    if names:
        if precision != "fp32":
            raise UsageError(f"--precision {precision}: ONNX Runtime ({providers}) runs this model in fp32 only; "
                             "use --providers openvino, or leave --providers out")
        return EngineChoice("onnxruntime", providers, precision, [], f"--providers {providers}")
    if openvino_available():
        why = ("default: the fastest exact CPU engine measured (README)" if precision == "fp32"
               else f"--precision {precision} runs on OpenVINO")
        return EngineChoice("openvino", "openvino", precision, instructions, why)
    if precision != "fp32":
        raise UsageError(f"--precision {precision} needs OpenVINO's runtime: .venv/bin/pip install openvino "
                         "(see requirements.txt)")
    return EngineChoice("onnxruntime", "cpu", precision, [], "default: OpenVINO is not installed")


# ---------------------------------------------------------------- OpenVINO behind ONNX Runtime's session interface

_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)"}


@dataclasses.dataclass
class PortInfo:
    """ONNX Runtime's NodeArg, as far as runner.py reads it."""

    name: str
    shape: list  # ints, or None for a dynamic axis
    type: str


def _port(port):
    shape = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
    return PortInfo(port.get_any_name(), shape, _OV_TYPES.get(port.get_element_type().get_type_name(), "tensor(float)"))


class OpenVinoSession:
    """An ONNX file compiled by OpenVINO for the CPU, answering like an onnxruntime.InferenceSession."""

    def __init__(self, path: str, precision: str = "fp32", threads: int = 0):
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": OV_HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an openvino Type: "f32", "bf16"
        self.precision_ran = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
        self._inputs = [_port(p) for p in self.compiled.inputs]
        self._outputs = [_port(p) for p in self.compiled.outputs]

    def get_inputs(self) -> list[PortInfo]:
        return self._inputs

    def get_outputs(self) -> list[PortInfo]:
        return self._outputs

    def get_providers(self) -> list[str]:
        return ["OpenVINO CPU"]

    def run(self, output_names: Sequence[str] | None, feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs named (None: all), in order, as numpy arrays (copies: the request reuses its buffers)."""
        result = self.request.infer({name: value for name, value in feed.items()})
        by_name = {o.get_any_name(): result[o] for o in self.compiled.outputs}
        names = output_names or [o.name for o in self._outputs]
        return [by_name[n].copy() for n in names]


def engine_version(engine: str) -> str:
    if engine == "openvino":
        import openvino
        return "openvino " + openvino.__version__.split("-")[0]
    import onnxruntime
    return "onnxruntime " + onnxruntime.__version__
