"""Progress in logs (beit_pipeline/progress.py): one plain line per interval, and a heartbeat for onnxsim."""

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO

from beit_pipeline import progress


def test_log_mode_writes_one_line_per_interval(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.2")
    start = time.monotonic()
    for _ in progress.bar(range(12), desc="preprocess", unit="img"):
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n") and "\x1b[" not in err
    assert all(line.startswith("preprocess: ") and " img [" in line for line in lines), lines
    assert lines[0].startswith("preprocess:   0% 0/12 img") and lines[-1].startswith("preprocess: 100% 12/12 img")
    # the first line, one per 0.2 s interval, the last: never one per item
    assert 3 <= len(lines) <= elapsed / 0.2 + 2, (elapsed, lines)


def test_log_mode_interval_defaults_to_ten_seconds(monkeypatch, capsys):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    for _ in progress.bar(range(50), desc="eval", unit="batch"):
        time.sleep(0.005)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" [")[0] for line in lines] == ["eval:   0% 0/50 batch", "eval: 100% 50/50 batch"]


def test_terminal_mode_is_tqdm_as_usual(monkeypatch, capsys):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    for _ in progress.bar(range(3), desc="eval", mininterval=0):
        pass
    err = capsys.readouterr().err
    assert "\r" in err and "eval: 100%" in err


def heartbeat(command, interval="0.1", **kwargs):
    env = dict(os.environ, **{progress.INTERVAL_ENV: interval, "PYTHONPATH": REPO})
    return subprocess.Popen([sys.executable, "-m", "beit_pipeline.progress", "--label", "onnxsim", "--", *command],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_heartbeat_passes_output_and_exit_status_through():
    child = "import sys, time; print('Simplifying...', flush=True); time.sleep(0.6); print('Finish!'); sys.exit(3)"
    proc = heartbeat([sys.executable, "-c", child])
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 3
    assert out.splitlines() == ["Simplifying...", "Finish!"]
    beats = [line for line in err.splitlines() if line.startswith("onnxsim: running for ")]
    assert len(beats) >= 3 and all(line.endswith("its last output: Simplifying...") for line in beats), err
    assert err.splitlines()[-1].startswith("onnxsim: finished in ") and "(exit status 3)" in err


def foldable_model(path):
    """x + (a + b), a and b constants, batch axis dynamic: onnxsim folds a + b (the real tool, in a second)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    a, b = (numpy_helper.from_array(np.full((4,), v, np.float32), name) for v, name in ((1.0, "a"), (2.0, "b")))
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [a, b])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6), str(path))


def test_heartbeat_on_onnxsim_keeps_its_output_file(tmp_path):
    """The wrapped onnxsim writes the same bytes as onnxsim run bare."""
    import onnx
    source = tmp_path / "model.onnx"
    foldable_model(source)
    bare, wrapped = tmp_path / "bare.onnx", tmp_path / "wrapped.onnx"
    args = ["--overwrite-input-shape", "2,4"]
    subprocess.run([sys.executable, "-m", "onnxsim", str(source), str(bare), *args], check=True, capture_output=True)
    proc = heartbeat([sys.executable, "-m", "onnxsim", str(source), str(wrapped), *args], interval="0.05")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Simplifying..." in out and "Finish!" in out
    assert "onnxsim: running for " in err and "onnxsim: finished in " in err
    assert bare.read_bytes() == wrapped.read_bytes()
    assert [n.op_type for n in onnx.load(str(wrapped)).graph.node] == ["Add"]  # onnxsim did fold a + b


def test_terminating_the_heartbeat_stops_the_command(tmp_path):
    marker = tmp_path / "pid"
    child = f"import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    proc = heartbeat([sys.executable, "-c", child])
    deadline = time.monotonic() + 20
    while not marker.exists() or not marker.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143 and "error: terminated (SIGTERM); the command was stopped too" in err
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # the child is gone (reaped by the heartbeat) within a moment
            os.kill(int(marker.read_text()), 0)
            time.sleep(0.05)
