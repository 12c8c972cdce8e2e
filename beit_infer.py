"""Step 5 without CANN: run the ONNX model over the batch files the way ais_bench runs the .om.

Pipeline: beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py ->
(atc + ais_bench on an Ascend 310P) | beit_infer.py (ONNX Runtime anywhere else) -> beit_eval_acc.py

It reads the folder of batch files (``input_00000.bin`` ... from beit_preprocess.py)
and writes what ais_bench writes, so that beit_eval_acc.py and run_all.sh cannot
tell the two apart:

    <output>/<%Y_%m_%d-%H_%M_%S or --output_dirname>/<input_stem>_0.<bin|txt|npy>
    <output>/<same name>_summary.json

The summary keeps ais_bench's keys (``NPU_compute_time`` with min/max/mean/median/
``percentile(99%)``/count, ``throughput``, ``npu_compute_time_list``, ``filesinfo``,
``args``, ``pid``); here the "NPU compute time" is the wall time of one ONNX Runtime
``session.run`` in ms, and ``provider`` says which execution provider really ran.
Throughput is ais_bench's ``1000 * batchsize.mean / compute_time.mean``, which is
images / summed compute seconds.  The last lines printed are ais_bench's, e.g.

    [INFO] throughput 1000*batchsize.mean(8)/NPU_compute_time.mean(712.5): 11.228

Without ``--input`` it times random input of the model's shape (``ais_bench --loop 100``).
``--loop N`` with ``--input`` runs the whole input set N times for timing and writes
each output once.

Differences from ais_bench, on purpose:
- A batch file must hold exactly one model batch; ais_bench would silently glue
  several smaller files into one batch, which breaks the row -> image mapping of the
  manifest.  A mismatch is an error naming the file and both sizes, before anything
  is written.
- Resume: with ``--output_dirname``, outputs already in that folder (complete, since
  every file is written atomically) are kept and only the missing batches are run;
  the timing summary then covers what ran.  ``--overwrite`` recomputes everything.
  Without ``--output_dirname`` every run gets a fresh timestamped folder.
"""

import argparse
import os
import re
import sys
import time

import numpy as np

import beit_io
from beit_io import PipelineFileError

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "cann": "CANNExecutionProvider",
}
# Providers that take a device id (ais_bench's --device is the NPU id).
_DEVICE_PROVIDERS = {"CUDAExecutionProvider", "TensorrtExecutionProvider", "CANNExecutionProvider"}
PERCENTILE = 99
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class InferError(Exception):
    """A user error: bad model, bad arguments, or input that does not fit the model."""


def log(msg):
    """ais_bench's log line format (its logger writes ``[LEVEL] message`` to stdout)."""
    print(f"[INFO] {msg}", flush=True)


def warn(msg):
    print(f"[WARNING] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- small pure functions

def timing_stats(times_ms):
    """min/max/mean/median/percentile(99%)/count of compute times in ms, as ais_bench reports them.

    An empty list gives zeros (ais_bench does the same), so that a resumed run with
    nothing left to do still has a well-formed summary.
    """
    key = f"percentile({PERCENTILE}%)"
    if len(times_ms) == 0:
        return {"min": 0.0, "max": 0.0, "mean": 0.0, "median": 0.0, key: 0.0, "count": 0}
    arr = np.asarray(times_ms, dtype=np.float64)
    return {"min": float(arr.min()), "max": float(arr.max()), "mean": float(arr.mean()),
            "median": float(np.median(arr)), key: float(np.percentile(arr, PERCENTILE)),
            "count": int(arr.size)}


def throughput(batch_sizes, times_ms):
    """ais_bench's 1000 * batchsize.mean / compute_time.mean (images per second); 0 when nothing ran."""
    if len(times_ms) == 0 or float(np.sum(times_ms)) == 0.0:
        return 0.0
    return 1000.0 * float(np.mean(batch_sizes)) / float(np.mean(times_ms))


def resolve_providers(requested, available):
    """Map ``cpu,cuda,...`` to ONNX Runtime provider names, keeping only the available ones.

    Returns (providers to pass, warnings).  A requested provider that this
    onnxruntime lacks is skipped with a warning; the next requested one is
    tried, and CPU always ends the list so that there is one that runs.
    Which provider really ran is logged once the session exists.
    """
    wanted, warnings = [], []
    for item in [p.strip() for p in requested.split(",") if p.strip()]:
        name = PROVIDERS.get(item.lower(), item)
        if name not in PROVIDERS.values() and name not in available:
            raise InferError(f"--providers: unknown provider {item!r}; use cpu, cuda, tensorrt, cann "
                             f"or an ONNX Runtime provider name ({', '.join(available)})")
        if name not in available:
            warnings.append(f"provider {item} ({name}) is not available in this onnxruntime "
                            f"(available: {', '.join(available)}); skipped")
            continue
        if name not in wanted:
            wanted.append(name)
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return wanted, warnings


def output_stem(path):
    """ais_bench's rule: the basename up to its first dot (``input_00000.bin`` -> ``input_00000``)."""
    return os.path.basename(path).split(".")[0]


def output_name(stem, index, fmt):
    if index == 0:
        return beit_io.output_file_name(stem, fmt)
    return f"{stem}_{index}.{fmt.lower()}"


def _natural_key(path):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", os.path.basename(path))]


def list_inputs(spec):
    """The batch files named by --input: a folder, or comma-separated files as ais_bench takes them."""
    parts = [p for p in spec.split(",") if p]
    if not parts:
        raise InferError("--input is empty")
    if len(parts) == 1 and os.path.isdir(parts[0]):
        folder = parts[0]
        files = beit_io.list_batch_files(folder)
        if not files:
            # ais_bench takes any .bin/.npy of the folder in natural order; so do we when
            # the folder was not written by beit_preprocess.py.
            files = sorted((os.path.join(folder, n) for n in os.listdir(folder)
                            if n.lower().endswith((".bin", ".npy"))
                            and os.path.isfile(os.path.join(folder, n))), key=_natural_key)
        if not files:
            raise InferError(f"{folder}: no batch files (.bin or .npy) in the input folder "
                             "(was beit_preprocess.py run?)")
        return files
    for p in parts:
        if os.path.isdir(p):
            raise InferError(f"--input {p}: this model has one input, so give one folder "
                             "or a comma-separated list of files")
        if not os.path.isfile(p):
            raise InferError(f"--input {p}: no such file")
        if not p.lower().endswith((".bin", ".npy")):
            raise InferError(f"--input {p}: not a .bin or .npy batch file")
    stems = [output_stem(p) for p in parts]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise InferError(f"--input: several files would write the same output ({', '.join(dup)})")
    return parts


def check_preprocessing_finished(spec):
    """Refuse an input folder whose manifest is corrupt or says beit_preprocess.py did not finish there.

    A folder without a manifest (plain ais_bench input, not ours) is not checked;
    neither is a list of files.
    """
    if os.path.isdir(spec) and os.path.lexists(os.path.join(spec, beit_io.MANIFEST_NAME)):
        beit_io.require_complete_manifest(spec)


# ---------------------------------------------------------------- the model

def open_session(model, providers="cpu", device=0, threads=0):
    """An ONNX Runtime session on the first available requested provider (CPU as the fallback)."""
    import onnxruntime as ort

    if not os.path.isfile(model):
        raise InferError(f"{model}: model not found")
    if model.lower().endswith(".om"):
        raise InferError(f"{model}: an Ascend .om model runs with ais_bench on the NPU; "
                         "beit_infer.py takes the .onnx model")
    available = ort.get_available_providers()
    wanted, warnings = resolve_providers(providers, available)
    for w in warnings:
        warn(w)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    prov_args = [(p, {"device_id": str(device)}) if p in _DEVICE_PROVIDERS else p for p in wanted]
    try:
        session = ort.InferenceSession(model, sess_options=opts, providers=prov_args)
    except Exception as exc:  # ORT raises InvalidProtobuf, Fail, NotImplemented, ... for a bad file
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InferError(f"{model}: not a loadable ONNX model ({text})") from exc
    actual = session.get_providers()[0]
    if actual != wanted[0]:
        # The provider was built in but failed to start (e.g. no CUDA libraries).
        warn(f"{wanted[0]} did not start; running on {actual}")
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InferError(f"{model}: the model has {len(inputs)} inputs; beit_infer.py runs "
                         "image models with one (N, 3, H, W) input")
    shape = list(inputs[0].shape)
    if len(shape) != 4 or shape[1] != 3:
        raise InferError(f"{model}: input '{inputs[0].name}' has shape {shape}, expected (N, 3, H, W)")
    if isinstance(shape[2], int) and isinstance(shape[3], int) and shape[2] != shape[3]:
        raise InferError(f"{model}: input '{inputs[0].name}' is {shape[2]}x{shape[3]}; "
                         "the batch files hold square images")
    return session


def model_batch(session):
    """The model's static batch size, or None for a dynamic batch axis."""
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else None


def model_image_size(session):
    dim = session.get_inputs()[0].shape[2]
    return dim if isinstance(dim, int) and dim > 0 else beit_io.IMAGE_SIZE


def model_num_classes(session):
    shape = session.get_outputs()[0].shape
    return shape[-1] if shape and isinstance(shape[-1], int) and shape[-1] > 0 else None


# ---------------------------------------------------------------- resume

def existing_output_ok(path, rows, num_classes):
    """Whether an output left by an earlier run is complete and has the right number of rows."""
    if not os.path.isfile(path):
        return False
    if path.endswith(".txt"):
        # Parsing 50000 images' worth of %f text to resume would take longer than it saves;
        # atomic writes already rule out a cut-off file, so count its lines.
        with open(path, "rb") as f:
            data = f.read()
        return data.endswith(b"\n") and sum(1 for ln in data.splitlines() if ln.strip()) == rows
    try:
        arr = beit_io.read_output(path, num_classes) if num_classes else None
    except PipelineFileError:
        return False
    return arr is None or arr.shape[0] == rows


def check_other_formats(folder, stems, fmt):
    """Refuse to add a second format next to an earlier run's outputs (the eval step could not choose)."""
    for stem in stems:
        for other in beit_io.OUTPUT_FORMATS:
            if other != fmt and os.path.exists(os.path.join(folder, output_name(stem, 0, other))):
                raise InferError(f"{folder}: already holds {output_name(stem, 0, other)} from an earlier run; "
                                 f"rerun with --outfmt {other.upper()} or choose another --output_dirname")


# ---------------------------------------------------------------- the run

def run_inference(args):
    """Run the model over the batch files (or random input) and write ais_bench's outputs.

    ``args`` is the namespace get_parser() parses (``get_parser().parse_args([...])``
    from a program).  Returns the summary dict (also written to
    ``<output>/<dirname>_summary.json`` when ``--output`` is given).  Raises
    InferError or PipelineFileError naming the file for user errors, before
    any output is written.
    """
    from tqdm import tqdm

    model, input, output, output_dirname = args.model, args.input, args.output, args.output_dirname
    outfmt, batchsize, loop, warmup_count = args.outfmt, args.batchsize, args.loop, args.warmup_count
    providers = args.providers
    fmt = outfmt.lower()
    if fmt not in beit_io.OUTPUT_FORMATS:
        raise InferError(f"--outfmt {outfmt}: use TXT, BIN or NPY")
    if loop < 1 or warmup_count < 0 or (batchsize is not None and batchsize < 1):
        raise InferError("--loop and --batchsize must be positive, --warmup_count not negative")
    if output is None and output_dirname is not None:
        raise InferError("--output_dirname needs --output (as in ais_bench)")

    session = open_session(model, providers, args.device, args.threads)
    provider = session.get_providers()[0]
    in_meta = session.get_inputs()[0]
    in_dtype = _ORT_TYPES.get(in_meta.type, np.float32)
    out_names = [o.name for o in session.get_outputs()]
    static_batch = model_batch(session)
    size = model_image_size(session)
    num_classes = model_num_classes(session)
    if static_batch is not None and batchsize is not None and batchsize != static_batch:
        raise InferError(f"--batchsize {batchsize} does not match the model {model}, whose batch is "
                         f"{static_batch} (input '{in_meta.name}' shape {in_meta.shape})")
    expected = static_batch or batchsize

    # Check every batch file before writing anything: a mismatch half way through
    # would leave a folder of outputs that looks complete to a later step.
    if input is not None:
        check_preprocessing_finished(input)
    files = list_inputs(input) if input is not None else []
    rows = []
    for path in files:
        n = beit_io.batch_rows(path, size)
        if expected is not None and n != expected:
            raise InferError(f"{path}: holds a batch of {n} images but the model {os.path.basename(model)} "
                             f"takes batches of {expected} (input '{in_meta.name}' shape {in_meta.shape}); "
                             f"preprocess with --batch_size {expected} or export the model for batch {n}")
        rows.append(n)

    out_dir = None
    if output is not None:
        dirname = output_dirname or time.strftime("%Y_%m_%d-%H_%M_%S")
        out_dir = os.path.join(output, dirname)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise InferError(f"{out_dir}: exists and is not a folder")
    resume = bool(files) and out_dir is not None and output_dirname is not None and not args.overwrite \
        and os.path.isdir(out_dir)
    stems = [output_stem(p) for p in files]
    if resume:
        check_other_formats(out_dir, stems, fmt)

    todo, kept = [], []
    for i, path in enumerate(files):
        if resume and all(existing_output_ok(os.path.join(out_dir, output_name(stems[i], k, fmt)),
                                             rows[i], num_classes if k == 0 else None)
                          for k in range(len(out_names))):
            kept.append(i)
        else:
            todo.append(i)

    if out_dir is not None and files:
        os.makedirs(out_dir, exist_ok=True)
        beit_io.remove_stale_temporaries(out_dir)
        log(f"output path:{out_dir}")
    elif output is not None:
        # Pure performance mode writes the summary only, not an empty output folder.
        os.makedirs(output, exist_ok=True)
    log(f"provider:{provider}")
    if kept:
        log(f"resume: {len(kept)} of {len(files)} outputs already in {out_dir}; running the other {len(todo)}")

    def feed(arr):
        return {in_meta.name: arr.astype(in_dtype, copy=False)}

    if not files:
        bs = expected or 1
        first = np.random.default_rng(0).standard_normal((bs, 3, size, size)).astype(np.float32)
    elif todo:
        first = beit_io.read_batch(files[todo[0]], image_size=size)
    else:
        first = None  # every output is already there: nothing to run, nothing to read
    times_ms, batch_sizes = [], []
    if todo or not files:
        for _ in range(warmup_count):
            session.run(out_names, feed(first))
        log(f"warm up {warmup_count} done")

    written = []
    first_index = todo[0] if todo else None
    if not files:
        for _ in tqdm(range(loop), desc="Inference pure", file=sys.stderr, disable=args.no_progress):
            t0 = time.perf_counter()
            session.run(out_names, feed(first))
            times_ms.append((time.perf_counter() - t0) * 1000.0)
            batch_sizes.append(first.shape[0])
    else:
        bar = tqdm(total=len(todo) * loop, desc="Inference", unit="batch", file=sys.stderr,
                   disable=args.no_progress)
        try:
            for rnd in range(loop):
                for i in todo:
                    arr = first if i == first_index else beit_io.read_batch(files[i], image_size=size)
                    t0 = time.perf_counter()
                    outs = session.run(out_names, feed(arr))
                    times_ms.append((time.perf_counter() - t0) * 1000.0)
                    batch_sizes.append(arr.shape[0])
                    if rnd == 0 and out_dir is not None:
                        for k, out in enumerate(outs):
                            beit_io.write_output(os.path.join(out_dir, output_name(stems[i], k, fmt)), out, fmt)
                        written.append(i)
                    bar.update(1)
        finally:
            bar.close()

    tput = throughput(batch_sizes, times_ms)
    mean_bs = float(np.mean(batch_sizes)) if batch_sizes else float(expected or (rows[0] if rows else 1))
    summary = {
        "filesinfo": {str(i): {"infiles": [files[i]],
                               "outfiles": [os.path.join(out_dir, output_name(stems[i], k, fmt))
                                            for k in range(len(out_names))] if out_dir else []}
                      for i in range(len(files))},
        "args": vars(args),
        "NPU_compute_time": timing_stats(times_ms),
        "throughput": tput,
        "batchsize": mean_bs,
        "npu_compute_time_list": [float(t) for t in times_ms],
        "pid": os.getpid(),
        "runner": "onnxruntime " + __import__("onnxruntime").__version__,
        "provider": provider,
        "providers_requested": providers,
        "model": os.path.abspath(model),
        "mode": "files" if files else "pure",
        "outputs_written": len(written),
        "outputs_kept": len(kept),
        "output_dir": out_dir if files else None,
    }
    if out_dir is not None:
        summary["summary_path"] = out_dir + "_summary.json"
        beit_io.write_json_atomic(summary["summary_path"], summary)
    return summary


def report(summary):
    """The closing lines, worded as ais_bench's summary.report prints them."""
    t = summary["NPU_compute_time"]
    p = t[f"percentile({PERCENTILE}%)"]
    bs = summary["batchsize"]
    bs_text = int(bs) if float(bs).is_integer() else bs
    log("-----------------Performance Summary------------------")
    log(f"NPU_compute_time (ms): min = {t['min']}, max = {t['max']}, mean = {t['mean']}, "
        f"median = {t['median']}, percentile({PERCENTILE}%) = {p}")
    log(f"throughput 1000*batchsize.mean({bs_text})/NPU_compute_time.mean({t['mean']}): {summary['throughput']}")
    log("------------------------------------------------------")


def get_parser():
    parser = argparse.ArgumentParser(
        description="Run an ONNX image model over batch files with ONNX Runtime and write ais_bench's outputs.")
    parser.add_argument("--model", "-m", required=True, help="the .onnx model (after onnxsim / graph_modify.py)")
    parser.add_argument("--input", "-i", default=None,
                        help="folder of batch files (input_00000.bin ...) or comma-separated .bin/.npy files; "
                             "leave out for pure performance mode on random input")
    parser.add_argument("--output", "-o", default=None,
                        help="where to write; outputs go to a subfolder named by the date or --output_dirname, "
                             "the summary next to it as <subfolder>_summary.json")
    parser.add_argument("--output_dirname", default=None,
                        help="name of the output subfolder instead of the date; an existing one is resumed "
                             "(batches with complete outputs are skipped)")
    parser.add_argument("--outfmt", default="BIN", type=str.upper, choices=["TXT", "BIN", "NPY"],
                        help="output file format (default BIN, as ais_bench)")
    parser.add_argument("--batchsize", "--batch_size", dest="batchsize", type=int, default=None,
                        help="batch size; must match a static model, sets the random batch of a dynamic one "
                             "(default: the model's, or each file's for a dynamic model)")
    parser.add_argument("--loop", "-l", type=int, default=1,
                        help="run the whole input set (or the random batch) this many times for timing; "
                             "outputs are written once")
    parser.add_argument("--warmup_count", type=int, default=1,
                        help="untimed runs of the first batch before timing (default 1, as ais_bench)")
    parser.add_argument("--device", "-d", type=int, default=0,
                        help="device id for the cuda/tensorrt/cann providers")
    parser.add_argument("--providers", default="cpu",
                        help="comma-separated execution providers in order of preference: cpu, cuda, tensorrt, "
                             "cann (unavailable ones are skipped with a warning; CPU is the fallback)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime intra-op threads (0: its default, all cores)")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --output_dirname, recompute outputs that an earlier run already wrote")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        summary = run_inference(args)
    except (InferError, PipelineFileError) as exc:
        print(f"error: beit_infer: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: beit_infer: interrupted; the outputs written so far are complete. Rerun with the same "
              "--output, and --output_dirname set to that output folder's name, to run only the missing batches",
              file=sys.stderr)
        return 130
    if summary.get("summary_path"):
        log(f"summary:{summary['summary_path']}")
    report(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
