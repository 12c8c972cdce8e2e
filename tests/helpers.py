"""Plain helpers shared by the tests (constants, running a script); fixtures live in conftest.py."""

import os
import subprocess
import sys

from beit_pipeline.model import build as beit_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = "beit_tiny_test_patch16_224"
BASE = "beit_base_patch16_224"


def pretraining_state_dict(seed=5):
    """A tiny state dict in the layout of unilm's beit_base_patch16_224_pt22k.pth: masked-image-modelling head
    (lm_head), one shared relative position bias, mask_token, no classification head."""
    import torch
    state = beit_model.random_checkpoint(TINY, seed=seed)["model"]
    state = {k: v for k, v in state.items()
             if not k.startswith(("head.", "fc_norm.")) and "relative_position" not in k}
    state.update({"rel_pos_bias.relative_position_bias_table": torch.zeros(732, 2),
                  "mask_token": torch.zeros(1, 1, 64), "norm.weight": torch.ones(64),
                  "norm.bias": torch.zeros(64), "lm_head.weight": torch.zeros(8192, 64),
                  "lm_head.bias": torch.zeros(8192)})
    return state


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class RunsCode:
    """A pickled object whose loading runs exec(): it writes 'ran' into the marker file (a malicious checkpoint)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def make_bad_checkpoint(kind, path, marker=None, tiny_checkpoint=None):
    """Write a checkpoint that beit_pth2onnx.py must refuse at ``path``; a code-running one writes ``marker`` when
    unpickled.  ``missing`` writes nothing."""
    import pickle

    import torch
    code = RunsCode(marker)
    if kind == "torch_save_code":  # torch's own format, one Python object beside the tensors
        torch.save({"model": {"w": torch.zeros(2)}, "args": code}, path)
    elif kind == "code_in_torch_save":  # the same around a real (tiny) BEiT
        torch.save({"model": beit_model.random_checkpoint(TINY, seed=4)["model"], "args": code}, path)
    elif kind == "plain_pickle_code":
        with open(path, "wb") as f:
            pickle.dump({"model": code}, f, protocol=2)  # torch's own protocol: no warning
    elif kind == "code_pickle":
        with open(path, "wb") as f:
            pickle.dump({"model": {"w": torch.zeros(2)}, "args": code}, f, protocol=2)
    elif kind in ("resnet18", "other_architecture"):  # a bare state dict / one under 'model'
        import torchvision
        state = torchvision.models.resnet18().state_dict()
        torch.save(state if kind == "resnet18" else {"model": state}, path)
    elif kind == "pretraining":
        torch.save({"model": pretraining_state_dict()}, path)
    elif kind == "truncated":
        data = read_bytes(tiny_checkpoint)
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "not_tensors":
        torch.save({"model": {"epoch": 3}}, path)
    elif kind != "missing":
        raise ValueError(kind)


class FileProxy:
    """A file object standing in for ``f`` in a test that fails its writes; a context manager that closes ``f``."""

    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``proc``, asserted to have exited 0 (the message holds its output)."""
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def run_script(args, cwd=None, env=None, timeout=600, check=False):
    """Run a repo script (``['beit_preprocess.py', '--flag', ...]``) with this Python.

    ``env`` is merged into os.environ; this Python's folder is then put first on PATH (also
    on an ``env`` PATH), so that the scripts' ``python3`` is this one.  Returns the
    CompletedProcess with text stdout/stderr.
    """
    cmd = list(args)
    if cmd[0].endswith(".py"):
        cmd = [sys.executable, os.path.join(REPO, cmd[0])] + cmd[1:]
    elif cmd[0].endswith(".sh"):
        cmd = ["bash", os.path.join(REPO, cmd[0])] + cmd[1:]
    full_env = dict(os.environ)
    full_env["PYTHONUNBUFFERED"] = "1"
    if env:
        full_env.update(env)
    full_env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full_env.get("PATH", "")
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def seeded_tensor(name, shape, index, seed=0):
    """A deterministic random tensor for a weight named ``name`` (any naming scheme), scaled as a trained
    BEiT's: tables ~N(0,1), layer scales ~0.1, layernorm weights ~1, biases small, matrices 1/sqrt(fan-in)."""
    import torch
    gen = torch.Generator().manual_seed(seed * 100003 + index)
    noise = torch.randn(tuple(shape), generator=gen)
    if name.endswith("relative_position_bias_table"):
        return noise
    if "lambda" in name or "gamma" in name:
        return 0.1 + 0.05 * noise
    if ("norm" in name) and name.endswith("weight"):
        return 1.0 + 0.1 * noise
    if len(shape) == 1 or "cls_token" in name:
        return 0.05 * noise
    fan_in = 1
    for size in shape[1:]:
        fan_in *= size
    return noise / fan_in ** 0.5


def seeded_state_dict(keys_and_shapes, seed=0):
    """{name: seeded_tensor} for [(name, shape)] in the given order (tests/data/hf_beit_tiny.json's key lists)."""
    return {name: seeded_tensor(name, shape, i, seed) for i, (name, shape) in enumerate(keys_and_shapes)}


def copy_work_folder(src, dst):
    """``shutil.copytree`` of a work folder that keeps beit_infer.py's records valid in the copy.

    A record beside an output folder names that folder's device and inode (a replaced folder must not pass
    for the one the record describes), and a copy has inodes of its own: re-point each record at its copy.
    """
    import json
    import shutil

    from beit_pipeline.inference import record as inference_record
    shutil.copytree(src, dst, symlinks=True)
    for root, dirs, _ in os.walk(dst):
        for name in dirs:
            folder = os.path.join(root, name)
            path = inference_record.record_path(folder)
            if os.path.isfile(path):
                with open(path) as f:
                    record = json.load(f)
                record["folder_id"] = list(inference_record.folder_identity(folder))
                with open(path, "w") as f:
                    json.dump(record, f)
    return dst


def stored_logits(folder):
    """{image name: row} of every chunk of a fidelity LogitStore folder (fidelity_logits_bs{N}/<stage>/), whatever
    its record says: what the report kept, read as logit_store writes it."""
    import glob
    import json

    import numpy as np

    found = {}
    for path in sorted(glob.glob(os.path.join(folder, "chunk_*.npz"))):
        with np.load(path) as data:
            found.update(zip(json.loads(data["names"].tobytes().decode("ascii")), data["logits"]))
    return found


# A script made to hang at its first fsync (files.write_bytes_atomic: the temporary is written, nothing is
# published), so that a signal lands at one known moment.  HANG_RESTORE_SIGINT gives the script Python's own
# Ctrl-C handler back where the test's launcher left SIGINT ignored (a background job of a non-interactive shell).
HANG_SITECUSTOMIZE = r'''
import os, signal, sys, time
if os.environ.get("HANG_RESTORE_SIGINT"):
    signal.signal(signal.SIGINT, signal.default_int_handler)
if sys.argv and sys.argv[0].endswith(os.environ.get("HANG_IN_SCRIPT", "-")):
    _real_fsync = os.fsync
    def _fsync(fd):
        _real_fsync(fd)
        open(os.environ["HANG_FLAG"], "w").close()
        time.sleep(120)
    os.fsync = _fsync
'''


def hang_env(tmp_path, script, restore_sigint=False) -> dict:
    """Environment entries that make ``script`` hang at its first fsync; tmp_path/"hanging" appears then."""
    site = tmp_path / "hang_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HANG_SITECUSTOMIZE)
    env = {"PYTHONPATH": str(site), "HANG_IN_SCRIPT": script, "HANG_FLAG": str(tmp_path / "hanging")}
    if restore_sigint:
        env["HANG_RESTORE_SIGINT"] = "1"
    return env
