"""beit_fidelity.py: every stage scored against PyTorch on every image, screened; the fp16 OM emulation; --locate.

Most tests run on tiny-BEiT work folders (96 real-photograph variants, conftest's tiny checkpoint and
its ONNX files, ais_out/bs8 written by beit_infer.py at fp32): the screen, the intervals and the
files do not depend on the model's size.  One test runs BEiT-base, where the claim is about it (the
fp16 emulation of its 12 blocks, --locate).  The screen's rule and schedule are also checked on
synthetic logits (no model), the intervals against published values, and the emulation's fused
operators on small hand-made graphs.
"""

import contextlib
import io
import json
import pathlib
import math
import os
import re
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import beit_fidelity
import beit_infer
import beit_preprocess
from beit_pipeline.fidelity import stages as fidelity
from beit_pipeline.fidelity import locate as fidelity_locate
from beit_pipeline.fidelity import report as fidelity_report
from beit_pipeline.fidelity import screen as fidelity_screen
from beit_pipeline.graph import padding as graph_padding
from beit_pipeline.inference import record as inference_record
from beit_pipeline.inference import summary as inference_summary
from beit_pipeline.fidelity import logit_store
from beit_pipeline.fidelity import om_emulation
from beit_pipeline.data import photo_variants
from beit_pipeline.evaluation import stats
from beit_pipeline.pipeline import workstate
from beit_pipeline.model import build as beit_model
from beit_pipeline.inference import sessions
from beit_pipeline.inference import outputs as output_files
from beit_pipeline.evaluation.accuracy import label_ranks
from beit_pipeline.data.synthetic import write_image_set
from helpers import TINY, copy_work_folder

BS = 8
IMAGES = 96  # 12 batches: enough for the screen to leave most images out of most stages
AUDIT = "8"  # --audit_images for the tiny folders (the default 32 would be a third of them)
BF16_HERE = fidelity.cpu_runs("bf16")  # the cpu_bf16 stage is scored only where the CPU has bf16 instructions
MODEL_STAGES = ["pytorch", "onnx", "onnxsim", "graph_modify"] + (["cpu_bf16"] if BF16_HERE else []) + \
    ["guide_padding", "om_emulation", "guide_om_emulation"]
ANSWERS = ("top1", "top5", "agree_top1", "flipped", "gained", "lost", "num_images")


# ---------------------------------------------------------------- tiny work folders

def write_labels(path, names, logits):
    """PyTorch's own Top-1 for most images; every 7th its 2nd choice, every 11th its 5th or 6th (Top-5's edge)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    rank = [1 if i % 7 == 3 else (4 + i % 2) if i % 11 == 5 else 0 for i in range(len(names))]
    path.write_text("".join(f"{n} {int(order[i, r])}\n" for i, (n, r) in enumerate(zip(names, rank))))


def torch_logits(model, prep):
    """PyTorch's logits of every real row of a prep folder, in manifest order, with the image names."""
    manifest = json.loads((prep / "manifest.json").read_text())
    names, out = [], []
    for entry in manifest["batches"]:
        batch = np.fromfile(prep / entry["file"], np.float32).reshape(-1, 3, 224, 224)[:entry["real"]]
        with torch.no_grad():
            out.append(model(torch.from_numpy(batch)).numpy())
        names += entry["images"]
    return names, np.concatenate(out)


def make_work(root, sim_path, torch_model, checkpoint, images):
    """A run_all.sh-shaped work folder: prep_image_bs8, the ONNX files, ais_out/bs8 (beit_infer.py, fp32)."""
    work = root / "work"
    assert beit_preprocess.main(["--image_path", str(images), "--prep_image", str(work / "prep_image_bs8"),
                                 "--batch_size", str(BS)]) == 0
    shutil.copy(sim_path, work / "beit_onnxsim_bs8.onnx")
    model = onnx.load(str(sim_path))
    graph_padding.modify(model, BS)
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    assert beit_infer.main(["--model", str(work / "beit_mg_bs8.onnx"), "--input", str(work / "prep_image_bs8"),
                            "--output", str(work / "ais_out"), "--output_dirname", "bs8", "--outfmt", "TXT",
                            "--batchsize", str(BS), "--no_progress"]) == 0
    names, logits = torch_logits(torch_model, work / "prep_image_bs8")
    write_labels(work / "val_label.txt", names, logits)
    shutil.copy(checkpoint, work / "model.pth")
    return work


@pytest.fixture(scope="module")
def photo_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos") / "images"
    photo_variants.write_variants(folder, IMAGES, seed=3)
    return folder


@pytest.fixture(scope="module")
def tiny_work(tmp_path_factory, onnx_exports, tiny_checkpoint, photo_images):
    """The tiny BEiT's work folder (also its dynamic export as <model>.onnx): the screen leaves most images out."""
    work = make_work(tmp_path_factory.mktemp("tiny"), onnx_exports.simplified("tiny", 11, BS),
                     onnx_exports.torch_model("tiny"), tiny_checkpoint, photo_images)
    shutil.copy(onnx_exports.dynamic("tiny", 11), work / "beit_base_patch16_224.onnx")
    return work


def paired_head_checkpoint(path, seed=4):
    """A tiny BEiT whose classes come in twins: class 2k+1's weights are class 2k's times (1 + 1e-4).

    Every image's two best classes are then a twin pair a few 1e-5 of the logit scale apart: far
    wider than fp32 moves them (~1e-7), far narrower than fp16 does (~1e-3).
    """
    state = beit_model.random_checkpoint(TINY, seed=seed)["model"]
    state["head.weight"][1::2] = state["head.weight"][0::2] * (1 + 1e-4)
    state["head.bias"][1::2] = state["head.bias"][0::2]
    torch.save({"model": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def twin_work(tmp_path_factory, onnx_exports, photo_images):
    """The twin-class tiny BEiT's work folder: the fp16 emulation can change every image."""
    root = tmp_path_factory.mktemp("twins")
    checkpoint = paired_head_checkpoint(root / "twins.pth")
    onnx_exports.register("tiny_twins", lambda: beit_model.build_model(beit_model.load_state_dict(checkpoint))[0])
    return make_work(root, onnx_exports.simplified("tiny_twins", 11, BS), onnx_exports.torch_model("tiny_twins"),
                     checkpoint, photo_images)


def copy_work(work, tmp_path):
    """A private copy of a module's work folder, for a test that writes reports or changes files."""
    return copy_work_folder(work, tmp_path / "work")


def fidelity_args(work, *extra):
    return ["--workdir", str(work), "--batch_size", str(BS), "--checkpoint", str(work / "model.pth"),
            "--label_file", str(work / "val_label.txt"), *extra]


def report(work, *extra):
    """beit_fidelity.py in-process: (exit code, stdout, the JSON or None)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = beit_fidelity.main(fidelity_args(work, *extra))
    path = work / "fidelity_bs8.json"
    return rc, out.getvalue(), json.loads(path.read_text()) if path.exists() and rc == 0 else None


def stages_of(data):
    return {s["name"]: s for s in data["stages"]}


# ---------------------------------------------------------------- acceptance: the screen is the brute force

@pytest.fixture(scope="module")
def tiny_reports(tiny_work, tmp_path_factory):
    """The default (screened) report and the brute-force one (--no_screen --fresh) of the same work folder."""
    work = copy_work(tiny_work, tmp_path_factory.mktemp("tiny_reports"))
    screened = report(work, "--audit_images", AUDIT)
    text = (work / "fidelity_bs8.md").read_text()
    brute = report(work, "--no_screen", "--fresh")
    return screened, brute, text


def same_answers(screened, brute, names):
    for name in names:
        a, b = stages_of(screened)[name], stages_of(brute)[name]
        assert {k: a[k] for k in ANSWERS} == {k: b[k] for k in ANSWERS}, name


def test_screened_report_equals_brute_force_where_the_screen_removes_most_images(tiny_reports):
    (rc, text, screened), (rc2, _, brute), _ = tiny_reports
    assert rc == 0 and rc2 == 0, text
    assert [s["name"] for s in screened["stages"]] == MODEL_STAGES  # no ais_bench outputs: no om stage
    modes = {s["name"]: s["mode"] for s in screened["stages"]}
    screened_stages = [s for s, m in modes.items() if m == "screened"]
    assert {"pytorch", "onnx", "onnxsim", "graph_modify", "om_emulation"} <= set(screened_stages), modes
    same_answers(screened, brute, screened_stages)
    runs = {s["name"]: s["images_run"] for s in screened["stages"]}
    for name in ("pytorch", "onnx", "onnxsim", "graph_modify"):  # fp32: the audit and hardly more
        assert runs[name] <= int(AUDIT) + 4, runs
    assert int(AUDIT) < runs["om_emulation"] < IMAGES / 2, runs  # fp16: the near-ties only
    assert all(s["images_run"] == IMAGES and s["mode"] == "all" for s in brute["stages"])
    assert screened["num_images"] == brute["num_images"] == IMAGES and screened["sample"] == "all"
    assert screened["audit_images"] == int(AUDIT) and screened["base"].startswith("ais_out/bs8 (")
    assert "fp32, beit_infer.py" in screened["base"] and brute["base"] is None
    pytorch = stages_of(screened)["pytorch"]
    # Labels (write_labels): every 7th image PyTorch's 2nd choice, every 11th its 5th or 6th.
    misses = sum(i % 7 == 3 or i % 11 == 5 for i in range(IMAGES))
    assert pytorch["top1"] == pytest.approx(100.0 * (IMAGES - misses) / IMAGES)
    sixth = sum(i % 11 == 5 and i % 2 == 1 and i % 7 != 3 for i in range(IMAGES))
    assert pytorch["top5"] == pytest.approx(100.0 * (IMAGES - sixth) / IMAGES)


def test_a_sampled_stage_says_so_and_is_the_brute_force_on_its_sample(tiny_reports):
    """The guide's padding moves logits ~1e-1: the screen would run most images, so it runs on a seeded sample."""
    (_, text, screened), (_, _, brute), md = tiny_reports
    guide = stages_of(screened)["guide_padding"]
    assert guide["mode"] == "sampled" and guide["num_images"] == guide["images_run"] == int(AUDIT)
    assert guide["sample"] == {"size": int(AUDIT), "seed": 0} and screened["stage_sample_size"] == int(AUDIT)
    assert set(guide["flipped"]) <= set(stages_of(brute)["guide_padding"]["flipped"])
    assert f"Sampled: guide_padding, guide_om_emulation ran on a seeded random sample of {AUDIT} images" in md
    assert "| guide_padding | sampled | 8 | 8 |" in md and "| om_emulation | screened | 96 |" in md
    assert "Every image is scored." in md


def test_report_rows_carry_intervals_counts_and_flips(tiny_reports):
    (_, text, screened), _, md = tiny_reports
    for s in screened["stages"]:  # every key of the first report, and issue 19's
        assert set(s) >= {"name", "top1", "top5", "agree_top1", "max_rel_err", "min_cosine", "num_images",
                          "flipped", "source", "seconds", "images_run", "top1_ci95", "agree_top1_ci95", "gained",
                          "lost", "delta_top1_ci95", "bound"}
        count = s["num_images"]
        hits = round(s["top1"] * count / 100)
        assert s["top1_ci95"] == stats.percent_interval(stats.wilson(hits, count))
        assert s["top1_ci95"][0] <= s["top1"] <= s["top1_ci95"][1]
        assert s["delta_top1"] == pytest.approx(100.0 * (s["gained"] - s["lost"]) / count)
        assert s["delta_top1_ci95"][0] <= s["delta_top1"] <= s["delta_top1_ci95"][1]
        assert len(s["flipped_detail"]) == len(s["flipped"])
        for flip in s["flipped_detail"]:  # issue 21's page needs both top-5 lists of every flipped image
            assert flip["pytorch"][0][0] != flip["stage"][0][0] and len(flip["stage"]) == 5
    emulation = stages_of(screened)["om_emulation"]
    assert 0 < emulation["bound"] and emulation["bound_images"] >= emulation["images_run"] - 1
    assert {"num_images", "sample", "audit_images", "seed", "max_images", "checkpoint", "label_file"} <= set(screened)
    assert "95% intervals: Wilson score intervals" in md and "Newcombe's paired hybrid score interval" in md
    assert "predicted OM Top-1 (om_emulation): " in text and ", on all 96 images of prep_image_bs8" in text


def test_screened_equals_brute_force_where_the_screen_removes_nothing(twin_work, tmp_path):
    """Every image's best two classes are twins 1e-5 apart: the fp16 emulation must run on every image,
    and flips most of them; the fp32 stages still run on the audit only.  (By default such a stage
    runs on a sample instead: --sample_size 96, all the images, keeps it screened.)"""
    work = copy_work(twin_work, tmp_path)
    rc, text, screened = report(work, "--audit_images", AUDIT, "--stages", "onnxsim,graph_modify,om_emulation",
                                "--sample_size", str(IMAGES))
    assert rc == 0, text
    rc, _, brute = report(work, "--no_screen", "--fresh", "--stages", "onnxsim,graph_modify,om_emulation")
    assert rc == 0
    same_answers(screened, brute, ["pytorch", "onnxsim", "graph_modify", "om_emulation"])
    emulation = stages_of(screened)["om_emulation"]
    assert emulation["mode"] == "screened" and emulation["images_run"] == IMAGES
    assert len(emulation["flipped"]) > IMAGES / 5  # fp16 rounds most twins to a tie: the lower class wins
    for flip in emulation["flipped_detail"]:  # issue 21's page: the label and both top-5 lists of every flip
        assert flip["pytorch"][0][0] != flip["stage"][0][0] and len(flip["pytorch"]) == len(flip["stage"]) == 5
        assert {flip["pytorch"][0][0], flip["stage"][0][0]} == {flip["pytorch"][0][0] // 2 * 2,
                                                                flip["pytorch"][0][0] // 2 * 2 + 1}  # twins
    assert stages_of(screened)["onnxsim"]["images_run"] <= int(AUDIT) + 4


def test_max_images_draws_a_seeded_sample_never_the_first(tiny_work, tmp_path):
    work = copy_work(tiny_work, tmp_path)
    rc, text, data = report(work, "--max_images", "20", "--seed", "5", "--stages", "graph_modify",
                            "--audit_images", AUDIT)
    assert rc == 0, text
    assert data["num_images"] == 20 and data["sample"] == {"size": 20, "seed": 5, "of": IMAGES}
    assert "a seeded random sample of 20 of the 96 images" in (work / "fidelity_bs8.md").read_text()
    args = beit_fidelity.build_parser().parse_args(fidelity_args(work))
    everything = fidelity.select_images(fidelity.work_folder(args))
    chosen = fidelity.select_images(fidelity.work_folder(args), 20, seed=5)
    expected = [everything.names[i] for i in fidelity_screen.seeded_sample(everything.names, 20, 5)]
    assert chosen.names == expected and chosen.names != everything.names[:20]
    assert fidelity.select_images(fidelity.work_folder(args), 20, seed=6).names != expected
    assert np.array_equal(chosen.labels, [everything.labels[everything.names.index(n)] for n in chosen.names])


def test_a_seeded_sample_is_the_same_on_every_run_and_machine():
    """SHA-256 ranks the names: these exact images, whatever numpy or the platform (pinned values)."""
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 1001)]
    assert fidelity_screen.seeded_sample(names, 5, 0) == [3, 30, 76, 262, 465]
    assert fidelity_screen.seeded_sample(names, 5, 7) == [152, 349, 463, 485, 977]
    assert fidelity_screen.seeded_order(names, 0)[:5] == [76, 3, 465, 262, 30]  # the audit is a prefix
    shuffled = names[::-1]  # the sample depends on the names, not on their order
    assert sorted(shuffled[i] for i in fidelity_screen.seeded_sample(shuffled, 5, 0)) == \
        sorted(names[i] for i in [3, 30, 76, 262, 465])


# ---------------------------------------------------------------- the base

def test_base_is_computed_once_and_kept_when_the_run_was_not_fp32(tiny_work, tmp_path):
    """After a bf16 (or device) run, ais_out/bs8 is no base: graph_modify runs here on every image, kept
    with its record in fidelity_logits_bs8/; a second report computes nothing."""
    work = copy_work(tiny_work, tmp_path)
    path = inference_record.record_path(str(work / "ais_out" / "bs8"))
    record = json.loads(open(path).read())
    record["precision"] = "bf16"
    with open(path, "w") as f:
        json.dump(record, f)
    rc, text, data = report(work, "--stages", "graph_modify,om_emulation", "--audit_images", AUDIT)
    assert rc == 0 and "base: not ais_out/bs8: its outputs are openvino bf16, not fp32" in text
    assert data["base"].startswith("beit_mg_bs8.onnx (onnxruntime fp32, run here")
    mg = stages_of(data)["graph_modify"]
    assert mg["mode"] == "all" and mg["images_run"] == IMAGES and mg["images_reused"] == 0
    kept = json.loads((work / "fidelity_logits_bs8" / "graph_modify" / "record.json").read_text())
    assert kept["model"] == fidelity.model_digest(str(work / "beit_mg_bs8.onnx")) and kept["precision"] == "fp32"
    rc, _, again = report(work, "--stages", "graph_modify,om_emulation", "--audit_images", AUDIT)
    assert rc == 0 and stages_of(again)["graph_modify"]["images_reused"] == IMAGES
    assert stages_of(again)["om_emulation"]["images_reused"] == stages_of(again)["om_emulation"]["images_run"]
    assert {k: stages_of(again)["om_emulation"][k] for k in ANSWERS} == \
        {k: stages_of(data)["om_emulation"][k] for k in ANSWERS}


def test_outputs_of_another_model_are_no_base(tiny_work, tmp_path, capsys):
    work = copy_work(tiny_work, tmp_path)
    model = onnx.load(str(work / "beit_mg_bs8.onnx"))
    model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))  # other weights
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    args = beit_fidelity.build_parser().parse_args(fidelity_args(work))
    wf = fidelity.work_folder(args)
    record = inference_record.read_record(str(work / "ais_out" / "bs8"))
    assert fidelity_runners_refusal(wf, record) == "they were not made by beit_mg_bs8.onnx"


def fidelity_runners_refusal(wf, record):
    from beit_pipeline.fidelity import runners as fidelity_runners
    return fidelity_runners.base_refusal(wf, record)


def test_an_interrupted_report_goes_on_where_it_stopped(tiny_work, tmp_path, monkeypatch, capsys):
    """Ctrl-C in the middle of a stage: exit 130, what it computed is kept; the rerun computes only the rest."""
    from beit_pipeline.fidelity import runners as fidelity_runners
    work, real, calls = copy_work(tiny_work, tmp_path), fidelity_runners._onnx_model, []

    def interrupted(path, providers="cpu", precision="fp32", every_output=False):
        run, static = real(path, providers, precision, every_output)  # om_emulation runs its probed emulation

        def counted(batch):
            calls.append(path)
            if len(calls) == 3 and "om_emulation" in path:
                raise KeyboardInterrupt
            return run(batch)
        return counted, static

    monkeypatch.setattr(fidelity_runners, "_onnx_model", interrupted)
    args = ["--stages", "om_emulation", "--no_screen"]
    assert beit_fidelity.main(fidelity_args(work, *args)) == 130
    assert "error: interrupted" in capsys.readouterr().err and not (work / "fidelity_bs8.json").exists()
    monkeypatch.setattr(fidelity_runners, "_onnx_model", real)
    rc, text, data = report(work, *args)
    assert rc == 0, text
    assert stages_of(data)["om_emulation"]["images_reused"] == 2 * BS  # the two batches before the Ctrl-C
    assert stages_of(data)["om_emulation"]["images_run"] == IMAGES
    # its clamp counts were kept with those logits: nothing saturates in the tiny BEiT, said for every image
    assert stages_of(data)["om_emulation"]["saturated_nodes"] == []
    assert stages_of(data)["pytorch"]["saturated_nodes"] is None  # no fp16 emulation there
    assert f"- om_emulation: no fp16 rounding saturates (the 310P clamps overflow to +-65504) on the {IMAGES} " \
           "images this stage ran." in (work / "fidelity_bs8.md").read_text()


def test_logit_store_keeps_whole_chunks_and_drops_a_store_of_other_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(logit_store, "CHUNK_IMAGES", 4)
    key = {"model": "abc", "inputs": "def"}
    store = logit_store.LogitStore(str(tmp_path / "s"), key)
    assert store.load() == {}
    rows = np.arange(30, dtype=np.float32).reshape(6, 5)
    store.add([f"img{i}" for i in range(4)], rows[:4])  # a whole chunk: written
    store.add(["img4", "img5"], rows[4:])  # pending: a kill loses these
    again = logit_store.LogitStore(str(tmp_path / "s"), key).load()
    assert sorted(again) == ["img0", "img1", "img2", "img3"] and np.array_equal(again["img2"], rows[2])
    store.flush()
    assert len(logit_store.LogitStore(str(tmp_path / "s"), key).load()) == 6
    assert logit_store.LogitStore(str(tmp_path / "s"), {**key, "model": "xyz"}).load() == {}
    assert [n for n in os.listdir(tmp_path / "s") if n.startswith("chunk")] == []


# ---------------------------------------------------------------- the screen's rule, on synthetic logits

def test_an_image_just_inside_the_bound_runs_and_one_just_outside_does_not():
    bound, reference = fidelity_screen.Bound(abs=0.01, rel=0.0), fidelity_screen.Bound(abs=0.002, rel=0.0)
    limit = 2 * (0.01 + 0.002)  # what the stage and the reference can move a margin together
    base = np.zeros((4, 10))
    base[:, :6] = [[5, 4, 3, 2, 1, 0]] * 4  # wide top-5 gaps: only the top-1 margin decides
    base[:, 0] = 4 + np.array([limit * (1 - 1e-6), limit * (1 + 1e-6), 0.5, 1.0])
    labels = np.zeros(4, dtype=np.int64)
    m = fidelity_screen.margins(base, labels)
    assert np.allclose(m.top1, [limit * (1 - 1e-6), limit * (1 + 1e-6), 0.5, 1.0], rtol=1e-9)
    assert fidelity_screen.can_change(m, bound, reference).tolist() == [True, False, False, False]
    at_risk = fidelity_screen.images_at_risk(base, labels, bound, np.array([3]), reference)
    assert at_risk.tolist() == [0, 3]  # and the audit image runs whatever its margin


def test_top5_margin_is_the_labels_gap_to_the_top5_edge():
    base = np.array([[9.0, 8, 7, 6, 5, 4.99, 1, 0], [9.0, 8, 7, 6, 5, 4.99, 1, 0], [9.0, 8, 7, 6, 5, 4, 1, 0]])
    m = fidelity_screen.margins(base, np.array([0, 5, 4]))
    assert m.top5.tolist() == pytest.approx([9 - 4.99, 0.01, 1.0])  # label 0 far inside; 5 just out; 4 in by 1
    assert m.top1.tolist() == pytest.approx([1.0, 1.0, 1.0]) and m.scale.tolist() == [9.0, 9.0, 9.0]
    tight = fidelity_screen.Bound(abs=0.006)  # moves a gap by up to 0.012
    assert fidelity_screen.can_change(m, tight).tolist() == [False, True, False]


def test_label_ranks_break_ties_as_the_eval_does():
    rng = np.random.default_rng(2)
    logits = rng.integers(0, 6, size=(500, 12)).astype(np.float32)  # many ties
    labels = rng.integers(0, 12, 500)
    assert np.array_equal(fidelity_screen.label_ranks(logits, labels), label_ranks(logits, labels))


def test_the_rule_is_sound_against_the_worst_perturbation_within_the_bound():
    """Every image the rule lets pass keeps its Top-1 class and Top-5 hit under ANY logit moves within the
    allowances, including the adversarial one: the stage lowers the top class and raises all others,
    the reference does the opposite."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4000, 50)) * rng.uniform(0.5, 5, size=(4000, 1))
    labels = rng.integers(0, 50, 4000)
    m = fidelity_screen.margins(base, labels)
    stage, reference = fidelity_screen.Bound(abs=0.02, rel=0.01), fidelity_screen.Bound(abs=0.01, rel=0.002)
    passed = ~fidelity_screen.can_change(m, stage, reference)
    assert 0.2 < passed.mean() < 0.95  # the test exercises both sides
    top = base.argmax(axis=1)
    for bound, sign in ((stage, 1), (reference, -1)):
        a = bound.allowance(m.scale)[:, None]
        moved = base + sign * a * np.where(np.arange(50) == top[:, None], -1, 1)
        assert np.array_equal(moved[passed].argmax(axis=1), top[passed])
        # and the label's side of the top-5 edge: push the label down and the others up, or the reverse
        for push in (1, -1):
            shifted = base + push * a * np.where(np.arange(50) == labels[:, None], -1, 1)
            in5 = label_ranks(shifted, labels) < 5
            assert np.array_equal(in5[passed], (label_ranks(base, labels) < 5)[passed])


class FakeRunner:
    """A stage on synthetic logits: base + a fixed per-image perturbation, counting what it ran."""

    reads_files = False

    def __init__(self, name, logits):
        self.stage, self.all, self.logits, self.reused = name, logits, {}, 0
        self.load_seconds = self.run_seconds = 0.0
        self.source, self.wf = "", None

    def ensure(self, indices):
        new = [int(i) for i in indices if int(i) not in self.logits]
        self.logits.update((i, self.all[i]) for i in new)
        return len(new)

    def array(self, indices):
        return np.stack([self.logits[int(i)] for i in indices]) if len(indices) else np.zeros((0, 0))

    def close(self):
        pass

    def saturated_nodes(self):
        return None


def synthetic_plan(seed=1, count=2000, classes=20):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(count, classes)).astype(np.float32) * 3
    names = [f"img{i:04d}" for i in range(count)]
    images = fidelity.ImageSet(names, rng.integers(0, classes, count), [], count)
    return fidelity_screen.make_plan(images, fidelity_runners_base(base), 32, None, 0), base, rng


def fidelity_runners_base(logits):
    from beit_pipeline.fidelity import runners as fidelity_runners
    return fidelity_runners.Base(logits, "synthetic")


def scored(plan, runners):
    return {s: fidelity_report.score_stage(plan, s, runners) for s in runners}


def test_the_schedule_equals_brute_force_and_widens_a_bound_that_grows():
    """Synthetic stages: pytorch (1e-6), a bounded fp16-like one (1e-2), a wild one (sampled), and one that
    the audit underrates: it moves a few near-ties by 2e-2 and flips images whose margins lie outside its
    audit bound's reach.  Only a bound that grows on the images it runs finds those flips."""
    plan, base, rng = synthetic_plan(count=2000)
    noise = {"pytorch": 1e-6, "fp16": 1e-2, "wild": 1.0}
    stages = {s: base + rng.uniform(-1, 1, base.shape).astype(np.float32) * a for s, a in noise.items()}
    heavy = rng.uniform(-1, 1, base.shape).astype(np.float32) * 1e-3  # what the audit sees: bound ~3e-3
    outside = np.setdiff1d(np.arange(len(base)), plan.audit)
    margin, top = plan.margins.top1, base.argmax(axis=1)
    closest = outside[np.argsort(margin[outside])][:3]  # inside the audit bound's reach: they run first
    heavy[closest] = rng.choice([-0.02, 0.02], size=heavy[closest].shape)
    hidden = outside[(margin[outside] > 0.01) & (margin[outside] < 0.03)]  # beyond its reach
    assert len(hidden) >= 2
    second = np.argsort(-base[hidden], axis=1)[:, 1]
    heavy[hidden, top[hidden]] -= 0.6 * margin[hidden]  # flipped: the runner-up wins
    heavy[hidden, second] += 0.6 * margin[hidden]
    stages["heavy"] = base + heavy
    runners = {s: FakeRunner(s, v) for s, v in stages.items()}
    fidelity_screen.screen(plan, runners)
    screened = scored(plan, runners)
    assert plan.modes == {"pytorch": "screened", "fp16": "screened", "wild": "sampled", "heavy": "screened"}
    assert set(hidden) <= set(runners["heavy"].logits) and plan.bounds["heavy"].abs >= 3 * 0.019
    assert len(runners["fp16"].logits) < len(base) / 2 and len(runners["wild"].logits) == len(plan.sample)
    risky = plan.at_risk("fp16")  # issue 20's selection: the audit and the images the stage could change
    assert set(plan.audit) <= set(risky) <= set(runners["fp16"].logits) and len(risky) > len(plan.audit)
    brute_plan, _, _ = synthetic_plan(count=2000)
    brute = {s: FakeRunner(s, v) for s, v in stages.items()}
    fidelity_screen.run_everything(brute_plan, brute)
    full = scored(brute_plan, brute)
    assert {plan.images.names[i] for i in hidden} <= set(full["heavy"].flipped)
    for s in ("pytorch", "fp16", "heavy"):
        for key in ANSWERS:
            assert getattr(screened[s], key) == getattr(full[s], key), (s, key)
    assert set(screened["wild"].flipped) <= set(full["wild"].flipped) and screened["wild"].num_images == 100
    for s, r in screened.items():  # every flip has both top-5 lists: the schedule ran both sides there
        assert all(d["pytorch"] and d["stage"] for d in r.flipped_detail), s


# ---------------------------------------------------------------- the intervals (stats.py) against published values

def test_wilson_interval_matches_published_values():
    # Newcombe (1998a), Table I, method 3; contingencytables' Wilson_score_CI_1x2(13, 16) test
    for hits, n, low, high in ((81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
                               (1, 29, 0.0061, 0.1718), (13, 16, 0.5699, 0.9341)):
        got = stats.wilson(hits, n)
        assert got == pytest.approx((low, high), abs=5e-5), (hits, n, got)
    assert stats.wilson(20, 20)[1] == 1.0 and stats.wilson(0, 20)[0] == 0.0
    assert stats.percent_interval(stats.wilson(13, 16)) == [56.99, 93.41]


def test_paired_interval_matches_published_values():
    # Fagerland, Lydersen & Laake (2014), Cavo et al. data [[59, 6], [16, 80]]: Newcombe's square-and-add
    # interval -0.0621 (-0.1186 to -0.0046), as in the contingencytables R package's chapter 8 tests.
    t = stats.PairedCounts(both=59, only_first=6, only_second=16, neither=80)
    assert (t.only_first - t.only_second) / t.n == pytest.approx(-0.0621, abs=5e-5)
    assert stats.newcombe_paired(t) == pytest.approx((-0.1186, -0.0046), abs=5e-5)
    # no discordant images: the interval is symmetric about 0 and shrinks with n
    narrow = stats.newcombe_paired(stats.PairedCounts(40000, 0, 0, 10000))
    assert narrow[0] == pytest.approx(-narrow[1]) and 0 < narrow[1] < 1e-3
    # the case: 50,000 images, ~1.5% discordant, -0.6 points: about +-0.1 points, far tighter than
    # two independent Wilson intervals (+-0.4)
    lost = stats.newcombe_paired(stats.PairedCounts(42_035, 225, 520, 7_220))
    assert -0.0072 < lost[0] < lost[1] < -0.0046


# ---------------------------------------------------------------- run_all.sh's closing lines (issue 17, item 4)

def summary_folder(tmp_path, fidelity_data, engine="openvino", precision="bf16"):
    """A work folder as run_all.sh leaves it for its summary: the run, the summary, the report, and the details
    beside acc_bs8.json, whose engine and precision beit_eval_acc.py read from beit_infer.py's figures."""
    run = workstate.RunParams(workdir=str(tmp_path), batch_size=BS, backend="ort", model=TINY, image_path="i",
                              label_file="l", checkpoint="c")
    (tmp_path / "ais_out").mkdir()
    _, figures = inference_summary.summary_paths(str(tmp_path / "ais_out" / "bs8"))
    with open(figures, "w") as f:  # beit_infer.py's own figures, beside ais_bench's summary
        json.dump({"format": inference_summary.OUR_FORMAT, "engine": engine, "precision": precision}, f)
    (tmp_path / "fidelity_bs8.json").write_text(json.dumps(fidelity_data))
    return run, {"top1": 64.0, "top5": 90.0, "num_images": 100, "outputs": {"engine": engine, "precision": precision}}


def emulation_row(**extra):
    return {"name": "om_emulation", "top1": 63.0, "top1_ci95": [53.22, 71.78], "delta_top1": -1.0,
            "delta_top1_ci95": [-4.52, 2.43], "num_images": 100, "mode": "screened", **extra}


def test_run_all_prints_prediction_and_measurement_with_their_images_intervals_and_engine(tmp_path, capsys):
    run, acc = summary_folder(tmp_path, {"sample": "all", "stages": [emulation_row()]})
    workstate.print_prediction(run, acc)
    out = capsys.readouterr().out
    assert ("predicted OM Top-1 63.00% (95% CI 53.22-71.78), -1.00 points vs PyTorch (-4.52 to +2.43), on all 100 "
            "images (the same images)") in out
    assert "measured here (cpu: openvino bf16): Top-1 64.00% (95% CI 54.24-72.73) on 100 images" in out
    assert "(ort)" not in out and "first" not in out


def test_run_all_says_when_the_prediction_is_on_a_sample(tmp_path, capsys):
    data = {"sample": {"size": 64, "seed": 0, "of": 100}, "stages": [emulation_row(num_images=64)]}
    run, acc = summary_folder(tmp_path, data, precision="fp32")
    workstate.print_prediction(run, acc)
    out = capsys.readouterr().out
    assert "on a seeded random sample of 64 of 100 images;" in out and "the same images" not in out
    assert "measured here (cpu: openvino fp32): Top-1 64.00% (95% CI 54.24-72.73) on 100 images" in out
    (tmp_path / "fidelity_bs8.json").write_text(json.dumps({"stages": [{"name": "om_emulation", "top1": 1.0}]}))
    workstate.print_prediction(run, acc)  # a report of the old format: no line rather than a wrong one
    assert "predicted" not in capsys.readouterr().out


# ---------------------------------------------------------------- the stages themselves (tiny)

def test_om_emulation_is_genuinely_fp16_and_close(tiny_reports, tiny_work, tmp_path):
    (_, _, screened), (_, _, brute), _ = tiny_reports
    for data in (screened, brute):
        emulation = stages_of(data)["om_emulation"]
        assert 1e-6 < emulation["max_rel_err"] <= 5e-2 and emulation["min_cosine"] > 0.999, emulation
    work = copy_work(tiny_work, tmp_path)
    path = fidelity.ensure_model(fidelity.work_folder(beit_fidelity.build_parser().parse_args(fidelity_args(work))),
                                 "om_emulation", {})
    model = onnx.load(path)
    fp16, total = om_emulation.fp16_matmul_weights(model)
    assert fp16 == total == 4 * 2 + 1  # qkv, proj, fc1, fc2 per block and the head
    assert not [n for n in model.graph.node if n.op_type == "Erf"]
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [TensorProto.FLOAT]


def test_guide_padding_error_dwarfs_graph_modify(tiny_reports):
    stages = stages_of(tiny_reports[1][2])
    guide, exact = stages["guide_padding"], stages["graph_modify"]
    assert guide["max_rel_err"] >= 100 * exact["max_rel_err"] and guide["max_rel_err"] > 1e-3, (guide, exact)
    assert stages["guide_om_emulation"]["max_rel_err"] > 1e-3  # its fp16 emulation carries the same error


@pytest.mark.skipif(not BF16_HERE, reason="this CPU has no bf16 instructions (or OpenVINO is missing)")
def test_cpu_bf16_stage_shows_what_bf16_costs(tiny_reports):
    """Issue 13: the reduced CPU precision gets its own row; it is genuinely reduced and still close."""
    stages = stages_of(tiny_reports[1][2])
    bf16, exact = stages["cpu_bf16"], stages["graph_modify"]
    assert 1e-4 < bf16["max_rel_err"] < 5e-2 and bf16["max_rel_err"] > 100 * exact["max_rel_err"], bf16
    assert bf16["source"].endswith("beit_mg_bs8.onnx")


def test_cpu_bf16_stage_is_refused_on_a_cpu_without_bf16(tiny_work, tmp_path, monkeypatch, capsys):
    work = copy_work(tiny_work, tmp_path)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    monkeypatch.setenv("BEIT_CPUINFO", str(cpuinfo))
    assert not fidelity.cpu_runs("bf16")
    rc = beit_fidelity.main(fidelity_args(work, "--stages", "cpu_bf16"))
    err = capsys.readouterr().err
    assert rc == 2 and "stage cpu_bf16: this CPU or this install cannot run bf16" in err
    assert not (work / "fidelity_bs8.json").exists()


def test_emulation_runs_with_beit_infer(tiny_work, tmp_path, capsys):
    work = copy_work(tiny_work, tmp_path)
    rc = beit_fidelity.main(["--workdir", str(work), "--batch_size", "8", "--locate", "om_emulation"])
    assert rc == 0, capsys.readouterr().err  # makes beit_om_emulation_bs8.onnx (--locate writes no report)
    assert not (work / "fidelity_bs8.json").exists()
    emu = str(work / "beit_om_emulation_bs8.onnx")
    rc = beit_infer.main(["--model", emu, "--input", str(work / "prep_image_bs8"), "--output", str(tmp_path / "o"),
                          "--output_dirname", "bs8", "--outfmt", "NPY", "--batchsize", "8", "--providers", "cpu",
                          "--no_progress"])
    assert rc == 0
    written = np.load(tmp_path / "o" / "bs8" / "input_00000_0.npy")
    batch = np.fromfile(work / "prep_image_bs8" / "input_00000.bin", np.float32).reshape(BS, 3, 224, 224)
    direct = sessions.run_session(sessions.open_session(emu), batch)
    assert written.shape == (BS, 1000)
    assert sessions.output_errors(written, direct)["max_rel"] <= 1e-6


def test_om_stage_reads_ais_bench_outputs_for_every_image(tiny_work, tmp_path, onnx_exports, capsys):
    """ais_out/bs8 written by ais_bench (no beit_infer.py record) is the om stage, read for every image; it
    cannot be the base (graph_modify then runs here); a second run reuses the models the first one made."""
    work = copy_work(tiny_work, tmp_path)
    folder = work / "ais_out" / "bs8"
    shutil.rmtree(folder)
    for path in inference_record.beside(str(folder)):  # ais_bench's step starts with no file of beit_infer.py's
        pathlib.Path(path).unlink(missing_ok=True)
    folder.mkdir()
    names, logits = torch_logits(onnx_exports.torch_model("tiny"), work / "prep_image_bs8")
    logits[3] = -logits[3]  # one image the "device" gets wrong
    for k in range(IMAGES // BS):
        output_files.write_output(str(folder / f"input_{k:05d}_0.bin"), logits[k * BS:(k + 1) * BS])
    rc, text, data = report(work, "--stages", "om,om_emulation", "--audit_images", AUDIT)
    assert rc == 0, text
    assert [s["name"] for s in data["stages"]] == ["pytorch", "om_emulation", "om"]
    om = stages_of(data)["om"]
    assert om["mode"] == "read" and om["images_run"] == IMAGES and om["num_images"] == IMAGES
    assert om["flipped"] == [names[3]] and om["min_cosine"] < -0.99 and om["flipped_detail"][0]["pytorch"]
    assert data["base"].startswith("beit_mg_bs8.onnx (onnxruntime fp32, run here")
    made = (work / "beit_om_emulation_bs8.onnx").stat().st_mtime_ns
    rc, text, _ = report(work, "--stages", "om_emulation", "--audit_images", AUDIT)
    assert rc == 0 and "made " not in text and (work / "beit_om_emulation_bs8.onnx").stat().st_mtime_ns == made
    for k in range(IMAGES // BS):  # an OM whose output atc left in fp16: raw fp16 BIN files of whole batches
        logits[k * BS:(k + 1) * BS].astype(np.float16).tofile(folder / f"input_{k:05d}_0.bin")
    rc, text, data = report(work, "--stages", "om", "--audit_images", AUDIT)
    assert rc == 0, text
    om = stages_of(data)["om"]
    assert names[3] in om["flipped"] and om["agree_top1"] >= 90 and 1e-5 < om["max_rel_err"], om
    record = json.loads(pathlib.Path(inference_record.record_path(str(tiny_work / "ais_out" / "bs8"))).read_text())
    record["folder_id"] = inference_record.folder_identity(str(folder))  # beit_infer.py's outputs are not the OM's
    pathlib.Path(inference_record.record_path(str(folder))).write_text(json.dumps(record))
    assert beit_fidelity.main(fidelity_args(work, "--stages", "om")) == 1
    assert "stage om needs" in capsys.readouterr().err
    # A record of another folder (a work folder copied with cp -r): who wrote the outputs is unknown, so they are
    # not the OM's (a CPU run would be shown as the device's), and the warning says how to have them read.
    record["folder_id"] = [0, 0]
    pathlib.Path(inference_record.record_path(str(folder))).write_text(json.dumps(record))
    assert beit_fidelity.main(fidelity_args(work, "--stages", "om")) == 1
    err = capsys.readouterr().err
    assert "stage om needs" in err and "describes another folder (copied or replaced since)" in err
    assert f"remove bs8{inference_record.RECORD_SUFFIX}" in err


# ---------------------------------------------------------------- --locate

def locate(work, stage, capsys):
    rc = beit_fidelity.main(["--workdir", str(work), "--batch_size", "8", "--locate", stage])
    text = capsys.readouterr().out
    assert rc == 0, text
    return text


def test_locate_guide_padding_points_into_the_first_block(tiny_work, tmp_path, capsys):
    text = locate(copy_work(tiny_work, tmp_path), "guide_padding", capsys)
    first = re.search(r"^first departure: (\S+) node '.*' at block (\d+), (.*?) \(", text, re.MULTILINE)
    assert first, text
    assert first.group(2) == "0" and first.group(3).startswith("attention"), first.group(0)
    assert first.group(1) == "Softmax"  # the padded keys take softmax weight from block 0 on
    assert len(re.findall(r"^\| \d+ \| ", text, re.MULTILINE)) == 2


def check_om_emulation_locate(text, depth):
    largest = r"^largest error \(of the \d+ tensors compared\): \S+ node '.+' at (block \d+|head|patch)"
    assert re.search(largest, text, re.MULTILINE), text
    rows = [(int(b), float(e), float(c)) for b, e, c in
            re.findall(r"^\| (\d+) \| (\S+) \| (\S+) \|", text, re.MULTILINE)]
    assert [r[0] for r in rows] == list(range(depth))
    errors = [r[1] for r in rows]
    assert all(1e-5 < e < 5e-2 for e in errors), errors
    assert errors[-1] > errors[0]  # fp16 rounding accumulates through the blocks
    assert all(c > 0.999 for _, _, c in rows)


def test_locate_om_emulation_names_a_node_and_the_growth(tiny_work, tmp_path, capsys):
    check_om_emulation_locate(locate(copy_work(tiny_work, tmp_path), "om_emulation", capsys), 2)


@pytest.mark.slow  # 58 s on 2 cores; test_locate_om_emulation_names_a_node_and_the_growth: the same on 2 blocks
def test_base_emulation_is_fp16_through_12_blocks(onnx_exports, tmp_path, capsys):
    """BEiT-base, once (about 30 s on 2 cores): the emulation of its 12 blocks stores all 49 MatMul weights in
    fp16 and --locate compares every tensor, the error growing block by block (README's figures)."""
    work = tmp_path / "work"
    write_image_set(work / "images", BS, seed=3)
    assert beit_preprocess.main(["--image_path", str(work / "images"), "--prep_image", str(work / "prep_image_bs8"),
                                 "--batch_size", str(BS)]) == 0
    model = onnx.load(onnx_exports.simplified("base", 11, BS))  # shared with test_graph_modify's base test
    graph_padding.modify(model, BS)
    onnx.save(model, str(work / "beit_mg_bs8.onnx"))
    del model
    check_om_emulation_locate(locate(work, "om_emulation", capsys), 12)
    emulation = onnx.load(str(work / "beit_om_emulation_bs8.onnx"))
    assert om_emulation.fp16_matmul_weights(emulation) == (4 * 12 + 1, 4 * 12 + 1)
    assert os.path.getsize(work / "beit_om_emulation_bs8.onnx") < 0.55 * os.path.getsize(work / "beit_mg_bs8.onnx")


# ---------------------------------------------------------------- refusals and defaults

def test_missing_stage_input_is_an_error_and_writes_nothing(tmp_path, tiny_checkpoint, capsys):
    (tmp_path / "val_label.txt").write_text("a.jpg 1\n")
    shutil.copy(tiny_checkpoint, tmp_path / "model.pth")
    before = sorted(os.listdir(tmp_path))
    rc = beit_fidelity.main(fidelity_args(tmp_path, "--stages", "om_emulation"))
    err = capsys.readouterr().err
    assert rc == 1 and "stage om_emulation needs" in err and "beit_mg_bs8.onnx" in err and "graph_modify" in err
    rc = beit_fidelity.main(["--workdir", str(tmp_path), "--batch_size", "8", "--locate", "guide_padding"])
    err = capsys.readouterr().err
    assert rc == 1 and "beit_onnxsim_bs8.onnx" in err
    rc = beit_fidelity.main(fidelity_args(tmp_path))  # every stage but pytorch absent
    err = capsys.readouterr().err
    assert rc == 1 and "prep_image_bs8" in err
    rc = beit_fidelity.main(fidelity_args(tmp_path, "--checkpoint", str(tmp_path / "absent.pth")))
    err = capsys.readouterr().err
    assert rc == 1 and "absent.pth" in err and "stage pytorch needs" in err
    assert sorted(os.listdir(tmp_path)) == before
    assert beit_fidelity.main(fidelity_args(tmp_path, "--stages", "fp8")) == 2
    for flag in ("--max_images", "--audit_images", "--sample_size"):
        assert beit_fidelity.main(fidelity_args(tmp_path, flag, "0")) == 2
        assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_checkpoint_and_labels_default_to_run_alls_record(tmp_path, capsys):
    state = {"format": 1, "outputs": {
        "beit_large_patch16_224.onnx": {"made_from": {"inputs": {"the checkpoint": {"path": "/ck/x.pth"}}}},
        "acc_bs8.json": {"made_from": {"inputs": {"the label file": {"path": "/lab/val.txt"}}}},
        "acc_bs16.json": {"made_from": {"inputs": {"the label file": {"path": "/lab/other.txt"}}}}}}
    (tmp_path / "run_all_state.json").write_text(json.dumps(state))
    args = beit_fidelity.build_parser().parse_args(["--workdir", str(tmp_path), "--batch_size", "8"])
    wf = fidelity.work_folder(args)
    assert (wf.checkpoint, wf.label_file, wf.model) == ("/ck/x.pth", "/lab/val.txt", "beit_large_patch16_224")
    assert wf.file("onnx") == str(tmp_path / "beit_large_patch16_224.onnx")
    rc = beit_fidelity.main(["--workdir", str(tmp_path), "--batch_size", "4"])
    assert rc == 2 and "give --label_file" in capsys.readouterr().err


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        beit_fidelity.main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--max_images", "--seed", "--no_screen", "--audit_images", "--sample_size", "--fresh",
                 "--stages", "--locate", "--keep_dtype", "--suggest_keep_dtype"):
        assert flag in out
    assert "seeded random sample" in out and "brute force" in out


# ---------------------------------------------------------------- the emulated operators

def run_graph(nodes, inits, x, folder, opset=11):
    """Run a one-input one-output fp32 graph and its fp16 emulation on ``x``: (fp32 out, emulated out, model)."""
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    emulated = om_emulation.emulate(model)
    outs = []
    for k, m in enumerate((model, emulated.model)):
        path = os.path.join(folder, f"m{k}.onnx")
        onnx.save(m, path)
        outs.append(sessions.run_session(sessions.open_session(path), x))
    return outs[0], outs[1], emulated


def layernorm_nodes():
    """opset 11's LayerNorm chain, as torch exports it."""
    n = helper.make_node
    return [n("ReduceMean", ["x"], ["m"], axes=[-1]), n("Sub", ["x", "m"], ["d"]), n("Pow", ["d", "two"], ["p"]),
            n("ReduceMean", ["p"], ["v"], axes=[-1]), n("Add", ["v", "eps"], ["ve"]), n("Sqrt", ["ve"], ["s"]),
            n("Div", ["d", "s"], ["z"]), n("Mul", ["z", "gamma"], ["zg"]), n("Add", ["zg", "beta"], ["y"])]


def test_fused_layernorm_does_not_overflow_where_fp16_pow_would(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 5, 64)) * 300).astype(np.float32)  # (x - mean)^2 up to ~1e6 > fp16's 65504
    gamma, beta = rng.standard_normal(64), rng.standard_normal(64)
    ref, emu, emulated = run_graph(layernorm_nodes(), {"two": 2.0, "eps": 1e-6, "gamma": gamma, "beta": beta}, x,
                                  tmp_path)
    assert np.max((x - x.mean(-1, keepdims=True)) ** 2) > np.finfo(np.float16).max  # fp16 Pow: inf
    assert emulated.counts["LayerNorm as one fp16 operator (fp32 inside)"] == 1
    assert np.all(np.isfinite(emu))
    err = sessions.output_errors(emu, ref)["max_rel"]
    assert 1e-6 < err < 2e-3, err  # fp16 input, weights and output: a few fp16 roundings


def test_gelu_becomes_ascends_tanh_form(tmp_path):
    n = helper.make_node
    nodes = [n("Div", ["x", "sqrt2"], ["a"]), n("Erf", ["a"], ["b"]), n("Add", ["b", "one"], ["c"]),
             n("Mul", ["x", "c"], ["d"]), n("Mul", ["d", "half"], ["y"])]
    x = np.linspace(-6, 6, 4801, dtype=np.float32).reshape(1, -1)
    ref, emu, emulated = run_graph(nodes, {"sqrt2": math.sqrt(2), "one": 1.0, "half": 0.5}, x, tmp_path)
    assert emulated.counts["Gelu -> Ascend's tanh-form Gelu (fp32 inside)"] == 1
    assert not [m for m in emulated.model.graph.node if m.op_type == "Erf"]
    x16 = x.astype(np.float16).astype(np.float64)
    tanh_form = x16 / (1 + np.exp(-math.sqrt(8 / math.pi) * (x16 + 0.044715 * x16 ** 3)))
    expected = tanh_form.astype(np.float16).astype(np.float32)
    ulp = np.spacing(np.abs(expected).astype(np.float16)).astype(np.float32)
    assert np.all(np.abs(emu - expected) <= ulp)  # the formula, rounded to fp16 once
    # and not the exact erf Gelu: the two differ by up to ~5e-4 around |x| = 2
    assert np.max(np.abs(emu - ref)) > 3e-4


def test_pow_outside_a_layernorm_is_refused(tmp_path):
    n = helper.make_node
    x = np.ones((1, 4), np.float32)
    with pytest.raises(om_emulation.PatternError, match="fusable LayerNorm chain"):
        run_graph([n("Pow", ["x", "two"], ["y"])], {"two": 2.0}, x, tmp_path)


def test_tiny_emulation_counts(onnx_exports, tmp_path):
    model = onnx.load(onnx_exports.simplified("tiny", 11, 2))
    graph_padding.modify(model, 2)
    emulated = om_emulation.emulate(model)
    counts = emulated.counts
    assert counts["LayerNorm as one fp16 operator (fp32 inside)"] == 2 * 2 + 1  # norm1, norm2 per block, fc_norm
    assert counts["Softmax as one fp16 operator (fp32 inside)"] == 2
    assert counts["MatMul+bias as one fp16 operator (fp32 inside)"] == 4 * 2
    assert counts["Gelu -> Ascend's tanh-form Gelu (fp32 inside)"] == 2
    # every tensor name of the fp32 graph outside a replaced Gelu is still there (--locate matches by name)
    names = {o for node in emulated.model.graph.node for o in node.output}
    kept = [o for node in model.graph.node for o in node.output if "/act/" not in o]
    assert set(kept) <= names
    assert fidelity_locate.REL_LIMIT == 1e-2 and fidelity_locate.COSINE_LIMIT == 0.99


# ---------------------------------------------------------------- the benchmark's parts (beit_fidelity_bench.py)

def test_photo_variants_are_distinct_real_photographs(tmp_path):
    from PIL import Image
    names = photo_variants.write_variants(tmp_path, 45, seed=0)
    assert names[0] == "ILSVRC2012_val_00000001.JPEG" and len(set(names)) == 45
    data = [(tmp_path / n).read_bytes() for n in names]
    assert len(set(data)) == 45  # no two the same image
    sizes = set()
    for n in names:
        with Image.open(tmp_path / n) as img:
            assert img.format == "JPEG" and 200 <= max(img.size) <= 500
            sizes.add(img.size)
    assert len(sizes) > 30  # crops and scales differ
    # image k and k + 20 are views of the same bundled photograph, not copies of it
    assert data[0] != data[20]


def test_benchmark_projection_shows_its_arithmetic():
    from beit_pipeline.bench import fidelity as fidelity_bench
    row = {"seconds": 0, "seconds_load": 0, "images_reused": 0}
    report = {"num_images": 100, "audit_images": 20, "seconds": 60.0, "base": "ais_out/bs8 (openvino fp32)",
              "phases": {"select": 0.1, "base": 1.0, "stages": 58.0, "score": 0.1},
              "stages": [dict(row, name="pytorch", mode="screened", images_run=20, seconds=12.0, seconds_load=2.0),
                         dict(row, name="om_emulation", mode="screened", images_run=28, seconds=30.0,
                              seconds_load=2.0),
                         dict(row, name="guide_padding", mode="sampled", images_run=20, seconds=16.0,
                              seconds_load=6.0)]}
    p = fidelity_bench.project(report, report_wall=65.0, pass_wall=50.0, target=50000)
    # pytorch: 2 + 0.5 x 20; om_emulation: 2 + 1.0 x (20 + 10% of 49980); guide: 6 + 0.5 x 2500;
    # the rest 2 s over 100 images, per image; start-up 5 s
    expected = (2 + 10) + (2 + 1.0 * (20 + 0.1 * 49980)) + (6 + 0.5 * 2500) + 2.0 / 100 * 50000 + 5
    assert p["report_seconds"] == pytest.approx(expected)
    assert p["pass_seconds"] == pytest.approx(50.0 / 100 * 50000)
    assert p["passes"] == pytest.approx(expected / 25000)
    assert "om_emulation (screened): 2.0 s + 1.000 s/image x 5018 images (audit 20 + 10.00% of the other 49980" \
        in "\n".join(p["arithmetic"])
