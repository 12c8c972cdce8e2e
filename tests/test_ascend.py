"""beit_pipeline/inference/ascend.py: the checks run_all.sh makes before the Ascend path, against the real tools' rules.

The rules are read from the real tools' source: ais_bench's path checks (Ascend/tools
ais-bench_workload/tool/ais_bench and its later copy in ait/msit, components/utils/file_open_check.py:
``PATH_WHITE_LIST_REGEX = re.compile(r"[^_A-Za-z0-9/.-]")``, ``os.path.islink`` refused,
``READ_FILE_NOT_PERMITTED_STAT = stat.S_IWGRP | stat.S_IWOTH``), its empty package ``__init__.py``
(so ``import ais_bench`` works without aclruntime), and atc's CANN >= 7.0 output name.
"""

import os
import shutil
import stat
import sys

import pytest

from beit_pipeline.inference import ascend
from helpers import REPO, run_script

FAKE_PYTHON = os.path.join(REPO, "tests", "fake_ascend", "python")


def check(*args, env=None):
    """python3 -m beit_pipeline.inference.ascend ARGS, with PYTHONPATH as ``env`` gives it (default: the repo only)."""
    env = dict(env or {})
    env.setdefault("PYTHONPATH", REPO)
    env.setdefault("AIS_INFER", "")
    return run_script([sys.executable, "-m", "beit_pipeline.inference.ascend", *args], env=env)


# ---------------------------------------------------------------- ais_bench's path rules

def test_paths_of_allowed_characters_pass(tmp_path):
    good = tmp_path / "work-1.2_ok"
    good.mkdir(mode=0o755)
    os.chmod(good, 0o755)
    assert ascend.path_problems(str(good)) == []
    assert ascend.path_problems(str(good / "not_made_yet" / "beit_mg_bs8.om")) == []


@pytest.mark.parametrize("name, shown", [("with space", "' '"), ("ünï", "'ï' 'ü'"), ("a$b;c", "'$' ';'"),
                                         ("x+y=z", "'+' '='")])
def test_characters_ais_bench_refuses_are_named(tmp_path, name, shown):
    (problem,) = ascend.path_problems(str(tmp_path / name))
    assert f"holds {shown}; ais_bench takes only [_A-Za-z0-9/.-] in paths" in problem


def test_symlink_and_group_writable_are_refused_with_the_fix(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.chmod(real, 0o775)
    (problem,) = ascend.path_problems(str(real))
    assert "is group- or other-writable (drwxrwxr-x)" in problem and f"chmod -R go-w {real}" in problem
    os.chmod(real, 0o755)
    link = tmp_path / "link"
    link.symlink_to(real)
    (problem,) = ascend.path_problems(str(link))
    assert "is a symlink, which ais_bench refuses" in problem and f"({real})" in problem


def test_umask_that_makes_writable_files_is_refused():
    old = os.umask(0o002)
    try:
        assert "the umask is 002" in ascend.umask_problem() and "umask 022" in ascend.umask_problem()
        os.umask(0o022)
        assert ascend.umask_problem() is None
        os.umask(0o027)
        assert ascend.umask_problem() is None
    finally:
        os.umask(old)


def test_check_paths_command_lists_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "my work"
    bad.mkdir()
    os.chmod(bad, 0o777)
    proc = check("check-paths", str(bad))
    assert proc.returncode == 2
    assert "error: the Ascend path's files would break ais_bench's path rules:" in proc.stderr
    assert "holds ' '" in proc.stderr and "chmod -R go-w" in proc.stderr
    os.chmod(bad, 0o755)
    good = tmp_path / "work"
    good.mkdir()
    os.chmod(good, 0o755)
    assert check("check-paths", str(good)).returncode == 0


# ---------------------------------------------------------------- aclruntime and --output_dirname

def test_ais_bench_without_aclruntime_is_refused(tmp_path):
    """`import ais_bench` succeeds without aclruntime (its __init__.py is empty): check aclruntime itself."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(FAKE_PYTHON, "ais_bench"), site / "ais_bench")
    proc = check("check-ais-bench", env={"PYTHONPATH": f"{REPO}:{site}"})
    assert proc.returncode == 2
    assert "'aclruntime' is not importable, which the ais_bench package runs on" in proc.stderr
    assert "pip3 install ./aclruntime-*.whl ./ais_bench-*.whl" in proc.stderr
    shutil.copytree(os.path.join(FAKE_PYTHON, "aclruntime"), site / "aclruntime")
    proc = check("check-ais-bench", env={"PYTHONPATH": f"{REPO}:{site}"})
    assert proc.returncode == 0, proc.stderr


def test_ais_infer_without_output_dirname_says_which_version_it_needs(tmp_path):
    """ais_infer.py of mid-2022 has no --output_dirname: run_all.sh names its output folder with it."""
    old = tmp_path / "ais_infer.py"
    old.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--output')\n")
    env = {"PYTHONPATH": f"{REPO}:{FAKE_PYTHON}", "AIS_INFER": str(old)}
    proc = check("check-ais-bench", env=env)
    assert proc.returncode == 2
    assert f"{old} has no --output_dirname" in proc.stderr and "--help lists --output_dirname" in proc.stderr
    env["AIS_INFER"] = os.path.join(FAKE_PYTHON, "ais_bench", "__main__.py")
    assert check("check-ais-bench", env=env).returncode == 0
    env["AIS_INFER"] = str(tmp_path / "missing.py")
    proc = check("check-ais-bench", env=env)
    assert proc.returncode == 2 and "no such file" in proc.stderr


def test_no_ais_bench_at_all(tmp_path):
    proc = check("check-ais-bench", env={"PYTHONPATH": REPO})
    assert proc.returncode == 2 and "ais_bench is not importable" in proc.stderr


# ---------------------------------------------------------------- atc's output names

def test_om_candidates_are_the_names_atc_may_write():
    assert ascend.om_candidates("/w/beit_mg_bs8_partial") == [
        "/w/beit_mg_bs8_partial.om", "/w/beit_mg_bs8_partial_linux_x86_64.om",
        "/w/beit_mg_bs8_partial_linux_aarch64.om"]


def test_stand_in_atc_is_executable_and_documents_the_suffix():
    atc = os.path.join(REPO, "tests", "fake_ascend", "bin", "atc")
    assert os.stat(atc).st_mode & stat.S_IXUSR
    with open(atc, encoding="utf-8") as f:
        assert "FAKE_ATC_ARCH" in f.read()
