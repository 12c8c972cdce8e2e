"""beit_bench.py's measurements: throughput per engine and precision, the GEMM ceiling, preprocessing, run_all.sh.

As timm's benchmark.py: a runner per kind of engine, set up once (the model built, the session opened)
and called on a batch (``Runner.bind(batch)`` prepares the input outside the timing), and one timing
helper, time_calls(), the only place that reads the clock around a call; interleaved_times() (one call
of each engine in turn per round, so that a shared machine's load bursts hit every column) and
best_times() (the best of interleaved rounds) are built on it.

measure() takes every measurement of one run into a results dict; report() writes results.json,
results.md (tables in the guide's shape) and throughput.png and prints the Markdown.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from beit_pipeline import files
from beit_pipeline.environment import REPO  # the repository: its scripts and run_all.sh
from beit_pipeline.errors import PipelineError
from beit_pipeline.graph import simplify
from beit_pipeline.inference import sessions as onnx_models
from beit_pipeline.pipeline.chain import ChainFiles

if TYPE_CHECKING:
    import argparse
    from collections.abc import Container, Iterable, Sequence

log = logging.getLogger(__name__)

GMACS_PER_IMAGE = {"beit_base_patch16_224": 17.6}
RUNTIMES = ("pytorch", "onnx", "onnxsim", "graph_modify", "openvino", "pytorch_bf16", "openvino_bf16")
# The precision each column runs in; the others are fp32.
RUNTIME_PRECISION = {"pytorch_bf16": "bf16", "openvino_bf16": "bf16"}
# The GEMM engines measured for each precision's ceiling (the ceiling is the best of them).
CEILING_ENGINES = {"fp32": ("onnxruntime", "openvino", "pytorch"), "bf16": ("openvino", "pytorch")}
# run_all.sh's line after each step: "[run_all] step NAME done in SECONDS s".
STEP_TIME_RE = re.compile(r"^\[run_all\] step (?P<name>\S+) done in (?P<secs>\d+(?:\.\d+)?) s$", re.M)

Call = tuple[str, Callable[[], object]]  # (name, a call without arguments)


# ---------------------------------------------------------------- helpers

def note(msg: str) -> None:
    """Log one progress line of the benchmark, ``[bench HH:MM:SS] msg``."""
    log.info(f"[bench {datetime.datetime.now():%H:%M:%S}] {msg}")


def run_command(cmd: Sequence[object], **kwargs: Any) -> subprocess.CompletedProcess:
    """Run a pipeline command, echoing it; PipelineError with its output on failure."""
    note("$ " + " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise PipelineError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls: the one clock."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def interleaved_times(calls: Sequence[Call], warmup: int, repeats: int) -> dict[str, list[float]]:
    """{name: [seconds of each round]} over ``repeats`` rounds of one call of each, after ``warmup`` of each."""
    for _ in range(warmup):
        for _, fn in calls:
            time_calls(fn, 1, 0)
    times = {name: [] for name, _ in calls}
    for _ in range(repeats):
        for name, fn in calls:
            times[name] += time_calls(fn, 0, 1)
    return times


def best_times(variants: Sequence[Call], rounds: int) -> dict[str, float]:
    """{name: best seconds} over interleaved rounds: a shared machine's load bursts hit one round, not a
    whole variant."""
    return {name: min(times, default=float("inf")) for name, times in interleaved_times(variants, 0, rounds).items()}


def throughput_entry(batch_size: int, times: Sequence[float]) -> dict[str, Any]:
    median = statistics.median(times)
    return {"batch_size": batch_size, "img_per_s": batch_size / median, "median_ms": median * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "runs": len(times)}


def machine_info() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    import onnxruntime
    import torch
    info["torch"] = torch.__version__
    info["onnxruntime"] = onnxruntime.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# ---------------------------------------------------------------- runners

class Runner:
    """One engine, set up once; ``runner(prepared)`` runs it on an input made by ``prepare(batch)``."""

    def prepare(self, batch: np.ndarray) -> Any:
        """The engine's input for ``batch`` (converted, moved to the device), made before any timing."""
        return batch

    def __call__(self, prepared: Any) -> object:
        raise NotImplementedError

    def bind(self, batch: np.ndarray) -> Callable[[], object]:
        """A call without arguments that runs the engine on ``batch``, its input prepared here, untimed."""
        prepared = self.prepare(batch)
        return lambda: self(prepared)


class TorchRunner(Runner):
    """PyTorch eager on ``device`` (synchronised on CUDA); ``bf16``: under bf16 autocast."""

    def __init__(self, model: Any, device: str, bf16: bool = False) -> None:
        self.model, self.device, self.bf16 = model, device, bf16

    def prepare(self, batch: np.ndarray) -> Any:
        import torch
        return torch.from_numpy(batch).to(self.device)

    def __call__(self, prepared: Any) -> None:
        import torch
        autocast = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16, enabled=self.bf16)
        with torch.inference_mode(), autocast:
            self.model(prepared)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


class SessionRunner(Runner):
    """An ONNX Runtime session, or OpenVINO's runtime behind the same interface (engines.OpenVinoSession)."""

    def __init__(self, session: Any) -> None:
        self.session = session

    @classmethod
    def open(cls, path: str, providers: str, threads: int, precision: str = "fp32") -> SessionRunner:
        """The pipeline's one session factory on ``path``: ``providers`` as for beit_infer.py, or ``openvino``."""
        return cls(onnx_models.open_session(path, providers, threads=threads, precision=precision))

    def prepare(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {self.session.get_inputs()[0].name: batch}

    def __call__(self, prepared: dict[str, np.ndarray]) -> object:
        return self.session.run(None, prepared)


class TorchMatMulRunner(Runner):
    """PyTorch's (m, k) @ (k, n) at ``precision`` against a fixed weight ``w`` (the GEMM ceiling)."""

    def __init__(self, w: np.ndarray, precision: str) -> None:
        import torch
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.weight = torch.from_numpy(w).to(self.dtype)

    def prepare(self, batch: np.ndarray) -> Any:
        import torch
        return torch.from_numpy(batch).to(self.dtype)

    def __call__(self, prepared: Any) -> object:
        import torch
        return torch.matmul(prepared, self.weight)


def gemm_runner(engine: str, precision: str, path: str, w: np.ndarray, threads: int) -> Runner:
    """``engine``'s MatMul runner at ``precision``; ``path`` holds the MatMul by ``w`` as ONNX."""
    if engine == "pytorch":
        return TorchMatMulRunner(w, precision)
    return SessionRunner.open(path, "openvino" if engine == "openvino" else "cpu", threads, precision)


class ThroughputBenchmark:
    """The throughput columns on one set of models (prepare_models()), as timm's InferenceBenchmarkRunner.

    The PyTorch model is built once for every column and batch size, and the exported model's session
    (dynamic batch) serves every batch size; the others are opened per batch size.
    """

    def __init__(self, models: dict[str, Any], args: argparse.Namespace) -> None:
        self.models, self.args = models, args
        self.onnx = None  # the exported model's runner: opened by run() before any other
        self.torch_model = None

    def runner(self, name: str, batch_size: int) -> Runner:
        """The runner of column ``name`` at ``batch_size``."""
        precision = RUNTIME_PRECISION.get(name, "fp32")
        if name.startswith("pytorch"):
            if self.torch_model is None:
                from beit_pipeline.model import build as beit_model
                model, _, _ = beit_model.build_model(beit_model.load_state_dict(self.models["checkpoint"]))
                self.torch_model = model.to(self.args.torch_device)
            return TorchRunner(self.torch_model, self.args.torch_device, bf16=precision == "bf16")
        if name.startswith("openvino"):
            return SessionRunner.open(self.models["onnxsim"][batch_size], "openvino", self.args.threads, precision)
        if name == "onnx":
            return self.onnx
        return SessionRunner.open(self.models[name][batch_size], self.args.providers, self.args.threads)

    def run(self, runtimes: Sequence[str], batch_sizes: Sequence[int]) -> dict[str, list[dict[str, Any]]]:
        """{runtime: [throughput entries per batch size]}; every runtime sees the same inputs.

        At each batch size the columns are timed in interleaved rounds (one call of each in
        turn, ``--repeats`` rounds), so that the ratios between them hold on a loaded machine.
        """
        import torch
        args = self.args
        torch.set_num_threads(args.threads)
        rng = np.random.default_rng(args.seed)
        inputs = {bs: rng.standard_normal((bs, 3, 224, 224), dtype=np.float32) for bs in batch_sizes}
        results = {name: [] for name in runtimes}
        if "onnx" in runtimes:
            self.onnx = SessionRunner.open(self.models["onnx"], args.providers, args.threads)
        for bs in batch_sizes:
            calls = [(name, self.runner(name, bs).bind(inputs[bs])) for name in runtimes]
            times = interleaved_times(calls, args.warmup, args.repeats)
            for name in runtimes:
                entry = throughput_entry(bs, times[name])
                entry["precision"] = RUNTIME_PRECISION.get(name, "fp32")
                results[name].append(entry)
                note(f"{name:>13} bs{bs:<3} {entry['img_per_s']:8.2f} img/s (median {entry['median_ms']:.0f} ms)")
        return results


# ---------------------------------------------------------------- models

def prepare_models(work: str, model_name: str, batch_sizes: Iterable[int], seed: int) -> dict[str, Any]:
    """Random checkpoint -> ONNX (dynamic batch) -> onnxsim and graph_modify per batch size, reusing files."""
    from beit_pipeline.model import build as beit_model
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(work, f"{model_name}_random.pth")
    if not os.path.exists(ckpt):
        note(f"writing a random {model_name} checkpoint")
        beit_model.save_random_checkpoint(ckpt, model_name, seed=seed)
    models = {"checkpoint": ckpt, "onnx": os.path.join(work, ChainFiles(1, model_name).onnx), "onnxsim": {},
              "graph_modify": {}}
    py = sys.executable
    if not os.path.exists(models["onnx"]):
        run_command([py, os.path.join(REPO, "beit_pth2onnx.py"), "--source", ckpt, "--target", models["onnx"],
                     "--batch_size", "1"])
    for bs in batch_sizes:
        sim = os.path.join(work, ChainFiles(bs).onnxsim)
        mg = os.path.join(work, ChainFiles(bs).graph_modify)
        if not os.path.exists(sim):
            note(f"onnxsim {models['onnx']} -> {sim} (batch {bs}, checked by simplify_checked)")
            simplify.simplify_checked(models["onnx"], sim, bs)
        if not os.path.exists(mg):
            run_command([py, os.path.join(REPO, "graph_modify.py"), sim, mg, str(bs)])
        models["onnxsim"][bs], models["graph_modify"][bs] = sim, mg
    return models


def default_runtimes(flags: Container[str] | None = None) -> list[str]:
    """Every column this machine can run: bf16 needs the CPU's bf16 instructions, openvino its package."""
    from beit_pipeline.inference import engines
    flags = engines.cpu_flags() if flags is None else flags
    keep = []
    for name in RUNTIMES:
        if RUNTIME_PRECISION.get(name) == "bf16" and not engines.native_support("bf16", flags):
            continue
        if name.startswith("openvino") and not engines.openvino_available():
            continue
        keep.append(name)
    return keep


# ---------------------------------------------------------------- ceiling

def beit_gemm_shapes(tokens: int = 197, dim: int = 768, batch: int = 8) -> list[tuple[int, int, int]]:
    """(M, K, N) of BEiT-base's linear layers at one batch: qkv, proj, fc1, fc2."""
    m = tokens * batch
    return [(m, dim, 3 * dim), (m, dim, dim), (m, dim, 4 * dim), (m, 4 * dim, dim)]


def write_matmul_model(path: str, m: int, k: int, n: int, rng: np.random.Generator) -> None:
    """A one-MatMul ONNX model (m, k) @ (k, n) with a random weight."""
    from onnx import TensorProto, helper, numpy_helper
    weight = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32) / k ** 0.5, "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    files.write_bytes_atomic(path, model.SerializeToString())


def ceiling_engines(precision: str) -> list[str]:
    from beit_pipeline.inference import engines
    return [e for e in CEILING_ENGINES[precision] if e != "openvino" or engines.openvino_available()]


def measure_matmul_ceiling(args: argparse.Namespace, repeats: int = 10,
                           precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:
    """MatMul GFLOP/s on BEiT-shaped GEMMs per precision and engine; each precision's ceiling is the best.

    Returns fp32's ``per_shape`` (best engine per shape) and ``peak_gflop_per_s`` at the top, as before,
    and ``by_precision``: {precision: {"peak_gflop_per_s", "engines": {engine: peak}}}.
    """
    import torch
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    found = {p: {e: [] for e in ceiling_engines(p)} for p in precisions}
    with tempfile.TemporaryDirectory() as folder:
        for m, k, n in beit_gemm_shapes():
            path = os.path.join(folder, f"matmul_{m}_{k}_{n}.onnx")
            write_matmul_model(path, m, k, n, rng)
            a = rng.standard_normal((m, k), dtype=np.float32)
            w = rng.standard_normal((k, n), dtype=np.float32)
            for precision, per_engine in found.items():
                calls = [(e, gemm_runner(e, precision, path, w, args.threads).bind(a)) for e in per_engine]
                for e, times in interleaved_times(calls, min(3, repeats), repeats).items():
                    per_engine[e].append(2 * m * k * n / statistics.median(times) / 1e9)
                note(f"MatMul {m}x{k}x{n} {precision}: " + ", ".join(f"{e} {v[-1]:.0f}" for e, v in per_engine.items())
                     + " GFLOP/s")
    by_precision = {p: {"engines": {e: max(v) for e, v in per_engine.items()},
                        "peak_gflop_per_s": max(max(v) for v in per_engine.values())}
                    for p, per_engine in found.items()}
    shapes = beit_gemm_shapes()
    per_shape = [{"m": m, "k": k, "n": n, "gflop_per_s": max(v[i] for v in found["fp32"].values())}
                 for i, (m, k, n) in enumerate(shapes)]
    return {"per_shape": per_shape, "peak_gflop_per_s": by_precision["fp32"]["peak_gflop_per_s"],
            "by_precision": by_precision}


# ---------------------------------------------------------------- preprocessing

def jpeg_folder(work: str, count: int) -> str:
    """The benchmark's ``count`` realistic JPEGs, written once and reused."""
    from beit_pipeline.data import synthetic
    folder = os.path.join(work, f"jpegs_{count}")
    if not os.path.isdir(folder) or len(os.listdir(folder)) != count:
        note(f"writing {count} realistic JPEGs (500x375, quality 90)")
        synthetic.write_realistic_jpegs(folder, count)
    return folder


class ReferencePreprocessing:
    """The guide's torchvision transforms over ``folder``, one image at a time, as a call; warmed up."""

    def __init__(self, folder: str) -> None:
        # Imported here: the preprocessing module is only needed for this benchmark.
        from beit_pipeline.preprocess.transform import reference_transform
        self.folder = folder
        self.names = sorted(os.listdir(folder))
        self.transform = reference_transform()
        # Warm the reference up (torch's first calls pay one-off initialisation) so that only
        # steady-state work is compared; beit_preprocess.py is timed with its start-up included.
        self(self.names[:8])

    def __call__(self, subset: Sequence[str] | None = None) -> None:
        import torch
        from PIL import Image
        # One torch thread: the transforms' small tensor ops gain nothing from more, and on a shared machine
        # torch's spinning OpenMP threads made the reference 13x slower (80 vs 6.2 ms an image, 2 threads vs 1,
        # load average 4): the fastest reference, so that the speed-ups are not flattered.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for name in self.names if subset is None else subset:
                with Image.open(os.path.join(self.folder, name)) as img:
                    self.transform(img.convert("RGB")).numpy()
        finally:
            torch.set_num_threads(threads)


class PreprocessScript:
    """beit_preprocess.py over ``folder`` with ``workers`` workers into a fresh WORK/prep_bench_LABEL, as a call."""

    def __init__(self, work: str, folder: str, label: str, workers: int) -> None:
        self.out = os.path.join(work, f"prep_bench_{label}")
        self.folder, self.workers = folder, workers

    def __call__(self) -> None:
        subprocess.run(["rm", "-rf", self.out], check=True)
        run_command([sys.executable, os.path.join(REPO, "beit_preprocess.py"), "--image_path", self.folder,
                     "--prep_image", self.out, "--batch_size", "8", "--workers", str(self.workers)])


def bench_preprocess(work: str, count: int, threads: int, rounds: int = 2) -> dict[str, Any]:
    """Reference torchvision pipeline vs beit_preprocess.py (1 worker and all cores), img/s."""
    folder = jpeg_folder(work, count)
    best = best_times([("reference", ReferencePreprocessing(folder)),
                       ("workers_1", PreprocessScript(work, folder, "workers_1", 1)),
                       ("workers_all", PreprocessScript(work, folder, "workers_all", threads))], rounds)
    results = {"images": count, "rounds": rounds, "reference_img_per_s": count / best["reference"]}
    note(f"preprocess reference: {results['reference_img_per_s']:.1f} img/s")
    for label in ("workers_1", "workers_all"):
        results[f"{label}_img_per_s"] = count / best[label]
        results[f"{label}_speedup"] = results[f"{label}_img_per_s"] / results["reference_img_per_s"]
        note(f"preprocess {label}: {results[f'{label}_img_per_s']:.1f} img/s "
             f"({results[f'{label}_speedup']:.2f}x the reference, process start-up included)")
    results["workers_all"] = threads
    return results


# ---------------------------------------------------------------- end to end

def bench_e2e(work: str, batch_size: int) -> dict[str, Any]:
    """Wall time of run_all.sh on the demo set (fresh work folder), and each step's time from its log."""
    wd = os.path.join(work, "e2e")
    subprocess.run(["rm", "-rf", wd], check=True)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = []
    cmd = ["bash", os.path.join(REPO, "run_all.sh"), "--batch_size", str(batch_size), "--workdir", wd,
           "--backend", "ort"]
    [total] = time_calls(lambda: done.append(run_command(cmd, env=env)), 0, 1)
    proc = done[0]
    steps = [{"step": m.group("name"), "seconds": float(m.group("secs"))} for m in STEP_TIME_RE.finditer(proc.stdout)]
    acc = {}
    acc_path = os.path.join(wd, ChainFiles(batch_size).accuracy_details)  # our figures beside the guide's JSON
    if os.path.exists(acc_path):
        with open(acc_path) as f:
            data = json.load(f)
        acc = {k: data.get(k) for k in ("num_images", "top1", "top5")}
    note(f"run_all.sh bs{batch_size}: {total:.1f} s")
    return {"batch_size": batch_size, "total_s": total, "steps": steps, "accuracy": acc,
            "log_tail": proc.stdout[-2500:]}


# ---------------------------------------------------------------- report

def summarize(results: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Ratios that the targets are stated in."""
    gmacs = GMACS_PER_IMAGE.get(model_name)
    ceilings = ceiling_by_precision(results.get("ceiling", {}))
    out = {}
    tp = results.get("throughput", {})
    if ceilings and gmacs:
        out["ceiling_img_per_s"] = ceilings["fp32"] / (2 * gmacs)
        for precision, gflops in ceilings.items():
            out[f"ceiling_{precision}_img_per_s"] = gflops / (2 * gmacs)
        torch_on_cpu = results["args"].get("torch_device", "cpu") == "cpu"
        for name, entries in tp.items():
            # The ceiling is the CPU's; PyTorch on another device has none here.
            if name.startswith("pytorch") and not torch_on_cpu:
                continue
            precision = RUNTIME_PRECISION.get(name, "fp32")
            if f"ceiling_{precision}_img_per_s" in out:
                for e in entries:
                    e["fraction_of_ceiling"] = e["img_per_s"] / out[f"ceiling_{precision}_img_per_s"]

    def at(name: str, bs: int) -> float | None:
        for e in tp.get(name, []):
            if e["batch_size"] == bs:
                return e["img_per_s"]
        return None

    if results["args"].get("torch_device", "cpu") != "cpu":
        pass  # PyTorch on a GPU against ONNX Runtime on the CPU: no ratio worth stating
    elif at("onnxsim", 8) and at("pytorch", 8):
        out["bs8_onnxsim_over_pytorch"] = at("onnxsim", 8) / at("pytorch", 8)
    if at("onnx", 8) and at("pytorch", 8) and results["args"].get("torch_device", "cpu") == "cpu":
        out["bs8_onnx_over_pytorch"] = at("onnx", 8) / at("pytorch", 8)
    if results["args"].get("torch_device", "cpu") == "cpu" and at("pytorch", 8):
        for name in tp:
            if name != "pytorch" and at(name, 8):
                out[f"bs8_{name}_over_pytorch"] = at(name, 8) / at("pytorch", 8)
        default = default_column(tp)
        if at(default, 8):
            out["default_exact_column"] = default
            out["bs8_default_exact_over_pytorch"] = at(default, 8) / at("pytorch", 8)
            if "ceiling_img_per_s" in out:
                out["bs8_default_exact_fraction_of_fp32_ceiling"] = at(default, 8) / out["ceiling_img_per_s"]
    if at("graph_modify", 8) and at("onnxsim", 8):
        out["bs8_graph_modify_over_onnxsim"] = at("graph_modify", 8) / at("onnxsim", 8)
        out["token_ratio_197_over_208"] = 197 / 208
    return out


def ceiling_by_precision(ceiling: dict[str, Any]) -> dict[str, float]:
    """{precision: peak GFLOP/s}; a result of the fp32-only format counts as fp32."""
    if "by_precision" in ceiling:
        return {p: c["peak_gflop_per_s"] for p, c in ceiling["by_precision"].items()}
    return {"fp32": ceiling["peak_gflop_per_s"]} if ceiling.get("peak_gflop_per_s") else {}


def default_column(tp: dict[str, Any]) -> str:
    """The column of beit_infer.py's default engine: OpenVINO fp32 where it ran, else ONNX Runtime (onnxsim)."""
    return "openvino" if "openvino" in tp else "onnxsim"


def markdown(results: dict[str, Any]) -> str:
    info, summary = results["machine"], results["summary"]
    lines = [f"Machine: {info.get('cpu')}, {info.get('cores')} cores"
             + (f", GPU {info['gpu']}" if info.get("gpu") else "")
             + f"; torch {info.get('torch')}, onnxruntime {info.get('onnxruntime')}; provider "
             f"{results['args']['providers']}; {results['date']}.", ""]
    tp = results.get("throughput", {})
    if tp:
        names = list(tp)
        device = results["args"].get("torch_device", "cpu")
        labels = [f"pytorch ({device})" if n == "pytorch" and device != "cpu" else n for n in names]
        lines += ["Throughput (img/s, median of interleaved timed runs; in brackets the fraction of the ceiling "
                  "of the column's precision):", "",
                  "| Batch Size | " + " | ".join(labels) + " |", "|---" * (len(names) + 1) + "|"]
        for i, e0 in enumerate(tp[names[0]]):
            cells = []
            for n in names:
                e = tp[n][i]
                frac = f" ({e['fraction_of_ceiling']:.0%})" if "fraction_of_ceiling" in e else ""
                cells.append(f"{e['img_per_s']:.2f}{frac}")
            lines.append(f"| {e0['batch_size']} | " + " | ".join(cells) + " |")
        lines.append("")
    for precision, c in results.get("ceiling", {}).get("by_precision", {}).items():
        engines_text = ", ".join(f"{e} {v:.0f}" for e, v in c["engines"].items())
        lines.append(f"{precision} ceiling: best MatMul {c['peak_gflop_per_s']:.0f} GFLOP/s on BEiT-shaped GEMMs "
                     f"({engines_text}) -> {summary.get(f'ceiling_{precision}_img_per_s', float('nan')):.2f} img/s "
                     f"at 17.6 GMACs/image.")
    for key, text in (("bs8_onnxsim_over_pytorch", "ONNX Runtime (onnxsim model) / PyTorch eager at bs8"),
                      ("bs8_openvino_over_pytorch", "OpenVINO fp32 / PyTorch eager fp32 at bs8"),
                      ("bs8_openvino_bf16_over_pytorch", "OpenVINO bf16 / PyTorch eager fp32 at bs8"),
                      ("bs8_pytorch_bf16_over_pytorch", "PyTorch bf16 autocast / PyTorch eager fp32 at bs8"),
                      ("bs8_default_exact_fraction_of_fp32_ceiling",
                       "beit_infer.py's default exact engine: fraction of the fp32 ceiling at bs8"),
                      ("bs8_graph_modify_over_onnxsim", "graph_modify / onnxsim model at bs8 (197/208 = 0.947)")):
        if key in summary:
            lines.append(f"- {text}: {summary[key]:.2f}x")
    if "preprocess" in results:
        p = results["preprocess"]
        lines += ["", f"Preprocessing, {p['images']} JPEGs 500x375 q90 (img/s): reference (torchvision, 1 process) "
                  f"{p['reference_img_per_s']:.1f}; beit_preprocess.py 1 worker {p['workers_1_img_per_s']:.1f} "
                  f"({p['workers_1_speedup']:.2f}x); {p['workers_all']} workers {p['workers_all_img_per_s']:.1f} "
                  f"({p['workers_all_speedup']:.2f}x)."]
    if "e2e" in results:
        e = results["e2e"]
        steps = ", ".join(f"{s['step']} {s['seconds']:.1f} s" for s in e["steps"])
        lines += ["", f"run_all.sh on the demo set, bs{e['batch_size']}: {e['total_s']:.1f} s in all"
                  + (f" ({steps})" if steps else "") + (f"; accuracy {e['accuracy']}" if e["accuracy"] else "") + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    device = results["args"].get("torch_device", "cpu")
    for name, entries in results.get("throughput", {}).items():
        label = f"pytorch ({device})" if name == "pytorch" and device != "cpu" else name
        ax.plot([e["batch_size"] for e in entries], [e["img_per_s"] for e in entries], marker="o", label=label)
    if device != "cpu":
        ax.set_yscale("log")  # a GPU next to CPU runtimes: orders of magnitude apart
    for precision, style in (("fp32", "--"), ("bf16", ":")):
        ceiling = results["summary"].get(f"ceiling_{precision}_img_per_s")
        if ceiling:
            ax.axhline(ceiling, color="grey", linestyle=style, label=f"{precision} MatMul ceiling ({ceiling:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("img/s")
    info = results["machine"]
    ax.set_title(f"BEiT-base throughput, {info.get('cores')} cores: {info.get('cpu', '')[:48]}", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the run

def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of beit_bench.py's flags (``args.runtimes`` already resolved), with the summary."""
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    runtimes = [r for r in args.runtimes.split(",") if r]
    os.makedirs(args.out, exist_ok=True)
    work = os.path.join(args.out, "work")
    results = {"date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "args": vars(args), "machine": machine_info()}
    note(f"machine: {results['machine']}")
    precisions = ["fp32"] + (["bf16"] if any(RUNTIME_PRECISION.get(r) == "bf16" for r in runtimes) else [])
    results["ceiling"] = measure_matmul_ceiling(args, args.ceiling_repeats, precisions=precisions)
    if runtimes:
        models = prepare_models(work, args.model, batch_sizes, args.seed)
        results["throughput"] = ThroughputBenchmark(models, args).run(runtimes, batch_sizes)
    if args.prep_images:
        results["preprocess"] = bench_preprocess(work, args.prep_images, args.threads)
    if not args.skip_e2e:
        results["e2e"] = bench_e2e(work, args.e2e_batch_size)
    results["summary"] = summarize(results, args.model)
    return results


def report(results: dict[str, Any], out: str) -> None:
    """Write results.json, results.md and (with throughput) throughput.png into ``out``; print the Markdown."""
    files.write_json_atomic(os.path.join(out, "results.json"), results)
    text = markdown(results)
    files.write_text_atomic(os.path.join(out, "results.md"), text)
    if results.get("throughput"):
        plot(results, os.path.join(out, "throughput.png"))
    log.info(text)
    note(f"results in {out}/results.json, results.md, throughput.png")
