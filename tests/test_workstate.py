"""run_all.sh's state module on files made by hand: what is redone when, what --force deletes. No model runs.

Each test lays out a work folder as the steps would leave it (tiny stand-in files with the real
names and contracts: a complete manifest, one output per batch, a result JSON) and asks
beit_pipeline.pipeline.workstate what run_all.sh would ask it, in-process, in milliseconds.
"""

import json
import os
import time

import pytest

from beit_pipeline.preprocess import batches
from beit_pipeline.evaluation import results
from beit_pipeline.pipeline import workstate

BS = 2
ORT_STEPS = ["preprocess", "pth2onnx", "onnxsim", "graph_modify", "beit_infer", "eval"]
IMAGES = ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000003.JPEG"]


class Work:
    """A work folder plus its inputs, and the calls run_all.sh makes."""

    def __init__(self, root, capsys):
        self.root, self.capsys = root, capsys
        self.workdir = root / "work"
        self.images = root / "images"
        self.images.mkdir()
        for i, name in enumerate(IMAGES):
            (self.images / name).write_bytes(b"jpeg %d" % i)
        self.labels = root / "val_label.txt"
        self.labels.write_text("".join(f"{n} {i}\n" for i, n in enumerate(IMAGES)))
        self.checkpoint = root / "model.pth"
        self.checkpoint.write_bytes(b"checkpoint one")
        self.made = []
        self.tag = ""  # results.result_tag of the run begun last
        self.hits = None  # the per-image Top-1 hits make_acc records (None: all hits)

    def call(self, *args):
        code = workstate.main(["--workdir", str(self.workdir)] + [str(a) for a in args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def begin(self, *extra, image_path=None, workdir=None):
        self.workdir.mkdir(exist_ok=True)
        args = ["--workdir", str(workdir or self.workdir), "begin", "--batch_size", BS, "--backend", "ort",
                "--model", "beit_tiny_test_patch16_224", "--image_path", image_path or self.images,
                "--label_file", self.labels, "--checkpoint", self.checkpoint] + list(extra)
        code = workstate.main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        flags = dict(zip(extra[::2], extra[1::2]))
        self.tag = results.result_tag(flags.get("--precision", "fp32"), flags.get("--providers", ""))
        return code, out, err

    def run(self, *extra, **kwargs):
        """One run_all.sh pass: begin, then start/[make]/finish per step. Returns the steps that ran."""
        code, _, err = self.begin(*extra, **kwargs)
        assert code == 0, err
        ran = []
        for step in ORT_STEPS:
            code, out, err = self.call("start", step)
            assert code in (0, workstate.EXIT_SKIP), err
            if code == 0:
                MAKERS[step](self)
                code, _, err = self.call("finish", step)
                assert code == 0, err
                ran.append(step)
        return ran

    def path(self, name):
        return self.workdir / name


def make_prep(work):
    prep = work.path(f"prep_image_bs{BS}")
    prep.mkdir()
    names = sorted(os.listdir(work.images))
    entries = []
    for k in range(0, len(names), BS):
        (prep / batches.batch_file_name(k // BS)).write_bytes(b"\0" * 16)
        entries.append({"file": batches.batch_file_name(k // BS), "images": names[k:k + BS],
                        "real": len(names[k:k + BS])})
    batches.save_manifest(str(prep), {"format": batches.MANIFEST_FORMAT, "complete": True, "batch_size": BS,
                                      "batches": entries, "skipped": []})


def make_file(name, content_from=None):
    def make(work):
        source = work.checkpoint if content_from is None else work.path(content_from)
        work.path(name).write_bytes(b"made from " + source.read_bytes())
    return make


def make_outputs(work):
    out = work.path(f"ais_out/bs{BS}{work.tag}_partial")
    out.mkdir(parents=True)
    manifest = batches.load_manifest(str(work.path(f"prep_image_bs{BS}")))
    for stem, _ in batches.rows_from_manifest(manifest):
        (out / f"{stem}_0.txt").write_text("0.0 \n" * BS)
    work.path(f"ais_out/bs{BS}{work.tag}_partial_summary.json").write_text(json.dumps({"throughput": 16.0}))
    # beit_infer.py's own figures beside it (inference.summary.run_figures reads them): 12.5 img/s over real images
    work.path(f"ais_out/bs{BS}{work.tag}_partial_beit_summary.json").write_text(json.dumps(
        {"format": 1, "engine": "openvino", "precision": work.tag[1:] or "fp32", "resumed": False,
         "last_full_measurement": {"throughput_real_images": 12.5, "throughput_ais_bench": 16.0, "real_images": 3,
                                   "measured_at": "2026-11-27T10:00:00+00:00"}}))


def make_acc(work):
    """The guide's JSON and our details, as beit_eval_acc.py writes them for the run's images."""
    n = len(os.listdir(work.images))
    hits = [True] * n if work.hits is None else work.hits
    name = f"acc_bs{BS}{work.tag}.json"
    work.path(name).write_text(results.guide_json_text(n, 1000, sum(hits)))
    details = {"num_images": n, "num_classes": 1000, "top1": 100.0 * sum(hits) / n, "top5": 100.0,
               "top1_correct": sum(hits), "top5_correct": n, "top1_interval_95": results.wilson_interval(sum(hits), n),
               "top5_interval_95": results.wilson_interval(n, n), "labelled_images": n, "subset": None, "skipped": [],
               "images": {"fingerprint": "f1", "order": "o1", "source": str(work.images)},
               "labels": {"path": str(work.labels), "sha256": "l1"},
               "checkpoint": {"path": str(work.checkpoint), "sha256": "c1"},
               "outputs": {"engine": "openvino", "precision": work.tag[1:] or "fp32"},
               "top1_hits": results.pack_hits(hits)}
    work.path(results.details_name(name)).write_text(json.dumps(details))


MAKERS = {"preprocess": make_prep, "pth2onnx": make_file("beit_tiny_test_patch16_224.onnx"),
          "onnxsim": make_file(f"beit_onnxsim_bs{BS}.partial.onnx", "beit_tiny_test_patch16_224.onnx"),
          "graph_modify": make_file(f"beit_mg_bs{BS}.onnx", f"beit_onnxsim_bs{BS}.onnx"),
          "beit_infer": make_outputs, "eval": make_acc}


@pytest.fixture
def work(tmp_path, capsys):
    return Work(tmp_path, capsys)


def mtimes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, names in os.walk(folder) for f in names}


# ---------------------------------------------------------------- what is redone when

def test_first_run_runs_every_step_and_a_rerun_none_in_milliseconds(work):
    assert work.run() == ORT_STEPS
    assert os.path.isdir(work.path(f"ais_out/bs{BS}")) and not os.path.exists(work.path(f"ais_out/bs{BS}_partial"))
    assert work.path(f"beit_onnxsim_bs{BS}.onnx").is_file()  # the partial name was promoted by `finish`
    before = mtimes(work.workdir)
    start = time.perf_counter()
    assert work.run() == []
    assert time.perf_counter() - start < 2.0  # 8 calls in-process: a plan for files on disk, no model
    changed = {k for k, v in mtimes(work.workdir).items() if before.get(k) != v}
    assert changed <= {workstate.RUN_NAME}


def test_label_file_fixed_in_place_redoes_only_the_eval(work):
    """The reported bug: val_label.txt fixed in place, the rerun skipped the eval and printed the old 0.00%."""
    work.run()
    stat = work.labels.stat()
    text = work.labels.read_text()
    work.labels.write_text(text.replace(" 1\n", " 7\n"))  # same size
    os.utime(work.labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime
    assert work.run() == ["eval"]


def test_a_synset_mapping_beside_the_label_file_is_part_of_the_eval_key(work):
    """Kaggle's CSV and the devkit's ground truth read their classes from LOC_synset_mapping.txt / meta.mat beside
    them: a mapping fixed in place must redo the eval, never print the Top-1 of the old mapping."""
    mapping = work.labels.parent / "LOC_synset_mapping.txt"
    mapping.write_text("n01440764 tench\nn01443537 goldfish\n")
    work.run()
    assert work.run() == []
    stat = mapping.stat()
    mapping.write_text("n01443537 goldfish\nn01440764 tench\n")  # two classes swapped, same size and mtime
    os.utime(mapping, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, _, _ = work.begin()
    code, out, _ = work.call("start", "eval")
    assert code == 0 and f"redo eval: acc_bs{BS}.json: the synset mapping LOC_synset_mapping.txt changed ({mapping})" in out
    MAKERS["eval"](work)
    assert work.call("finish", "eval")[0] == 0
    assert work.run() == []


def test_checkpoint_replaced_at_the_same_path_redoes_the_export_and_what_follows(work):
    work.run()
    stat = work.checkpoint.stat()
    work.checkpoint.write_bytes(b"checkpoint two")  # same size, same path
    os.utime(work.checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    code, _, _ = work.begin()
    code, out, _ = work.call("start", "pth2onnx")
    assert code == 0 and f"redo pth2onnx: beit_tiny_test_patch16_224.onnx: the checkpoint changed ({work.checkpoint})" in out
    MAKERS["pth2onnx"](work)
    assert work.call("finish", "pth2onnx")[0] == 0
    ran = work.run()
    assert ran == ["onnxsim", "graph_modify", "beit_infer", "eval"]  # preprocessing was not redone


def test_an_export_redone_to_the_same_bytes_redoes_nothing_after_it(work):
    """Content, not time: an ONNX file deleted and remade identically leaves onnxsim and the rest complete."""
    work.run()
    work.path("beit_tiny_test_patch16_224.onnx").unlink()
    assert work.run() == ["pth2onnx"]


def test_images_added_redo_preprocessing_inference_and_eval(work):
    """The reported bug: 8 images added, the rerun reported the old image count."""
    work.run()
    (work.images / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"new")
    assert work.run() == ["preprocess", "beit_infer", "eval"]
    assert json.loads(work.path(f"acc_bs{BS}_details.json").read_text())["num_images"] == 4


def test_an_image_rewritten_in_place_redoes_preprocessing(work):
    work.run()
    path = work.images / IMAGES[1]
    path.write_bytes(b"jpeg X")
    os.utime(path, ns=(1, path.stat().st_mtime_ns + 1000))
    assert work.run()[0] == "preprocess"


def test_the_same_inputs_by_other_paths_are_the_same_inputs(work, monkeypatch):
    work.run()
    monkeypatch.chdir(work.root)
    assert work.run(image_path="images/") == []
    assert work.run(image_path=str(work.images) + "//") == []
    link = work.root / "link_to_images"
    link.symlink_to(work.images)
    assert work.run(image_path=link) == []


def test_a_step_killed_half_way_is_redone(work):
    work.run()
    work.begin("--force")
    code, _, _ = work.call("start", "graph_modify")  # ... and the process dies before `finish`
    assert code == 0 and not work.path(f"beit_mg_bs{BS}.onnx").exists()  # the old output went first
    code, _, _ = work.begin()
    code, out, _ = work.call("start", "graph_modify")
    assert code == 0 and "an earlier run stopped before it finished" in out


def test_an_output_changed_by_hand_is_redone(work):
    work.run()
    acc = work.path(f"acc_bs{BS}.json")
    acc.write_text(acc.read_text().replace("100.0", "99.0", 1))
    code, _, _ = work.begin()
    assert work.call("start", "eval")[0] == 0


def test_done_refuses_an_incomplete_step_and_keeps_it_running(work):
    work.begin()
    for step in ORT_STEPS[:1]:
        work.call("start", step)
    prep = work.path(f"prep_image_bs{BS}")
    prep.mkdir()
    batches.save_manifest(str(prep), {"format": 1, "complete": False, "batch_size": BS, "batches": [],
                                      "skipped": []})
    code, _, err = work.call("finish", "preprocess")
    assert code == 1 and "did not finish here (complete: false" in err
    state = json.loads(work.path(workstate.STATE_NAME).read_text())
    assert state["outputs"][f"prep_image_bs{BS}"]["status"] == "running"


def test_inputs_changed_while_a_step_ran_are_not_recorded_as_its_inputs(work):
    work.begin()
    work.call("start", "preprocess")
    make_prep(work)
    (work.images / "ILSVRC2012_val_00000009.JPEG").write_bytes(b"arrived during the run")
    code, _, err = work.call("finish", "preprocess")
    assert code == 1 and "its inputs changed while it ran" in err


# ---------------------------------------------------------------- what --force deletes

def test_force_redoes_every_step_deleting_only_recorded_outputs(work):
    work.run()
    keep = {"beit_my_finetuned_v2.onnx": b"user model", "acc_bs64_paper_numbers.json": b"{}",
            "prep_image_bs64_archive/input_00000.bin": b"user batch"}
    for name, data in keep.items():
        work.path(name).parent.mkdir(exist_ok=True)
        work.path(name).write_bytes(data)
    assert work.run("--force") == ORT_STEPS
    for name, data in keep.items():
        assert work.path(name).read_bytes() == data, name


def test_force_in_a_folder_without_a_record_refuses_and_deletes_nothing(work):
    """The reported bug: --force deleted a user's files as 'outputs made from the previous ones'."""
    work.workdir.mkdir()
    mine = work.path(f"beit_mg_bs{BS}.onnx")
    mine.write_bytes(b"a user's own graph")
    (work.path(f"prep_image_bs{BS}")).mkdir()
    before = mtimes(work.workdir)
    code, _, err = work.begin("--force")
    assert code == 2
    assert f"holds prep_image_bs{BS}, beit_mg_bs{BS}.onnx, but no recorded run lists them" in err
    assert "deletes and overwrites only files it made itself (also with --force)" in err
    assert mtimes(work.workdir) == before and mine.read_bytes() == b"a user's own graph"


def test_a_legacy_work_folder_is_refused_with_the_reason(work):
    work.workdir.mkdir()
    work.path(workstate.LEGACY_RECORD).write_text("image_path=/x\n")
    work.path(f"acc_bs{BS}.json").write_text("{}")
    code, _, err = work.begin()
    assert code == 2 and "an older run_all.sh made them, which recorded no content" in err


def test_an_output_path_taken_by_a_user_file_after_a_run_is_refused(work):
    work.run()
    os.unlink(work.path(workstate.STATE_NAME))
    code, _, err = work.begin()
    assert code == 2 and "no recorded run lists them" in err


# ---------------------------------------------------------------- summary and model check

def test_summary_table_and_notes(work):
    work.hits = [True, False, True]
    work.run()
    details = work.path(f"acc_bs{BS}_details.json")
    details.write_text(details.read_text().replace('"skipped": []', '"skipped": [{"name": "bad.jpg", "error": "x"}]'))
    code, out, _ = work.call("summary")
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert [c.strip() for c in rows[1].strip("|").split("|")] == ["cpu: openvino fp32", "2", "3", "66.67",
                                                                  "100.00", "12.50"]
    assert "note: 1 images could not be read and were skipped (--skip_bad)" in out
    assert "built-in demo" not in out
    # Issue 17 item 1: what the number is (counts, interval) and what it was made from.
    assert "Top-1: 2/3 images (95% interval 20.77-93.85%); Top-5: 3/3 (43.85-100.00%)" in out
    assert "images: all 3 labelled images evaluated; image set f1 (" in out
    assert f"labels: {work.labels} (sha256 l1)" in out
    assert "made by: checkpoint model.pth (sha256 c1), engine openvino fp32" in out


def test_a_bf16_run_has_its_own_results_and_prints_its_cost_against_fp32(work):
    """Issue 17 items 1 and 3: --precision bf16 wrote over the fp32 acc_bs8.json (62.00 where fp32 gave 64.00)
    and printed its cost nowhere.  Its outputs and results now have their own names, and the summary compares
    it with the fp32 result image by image."""
    work.run()
    fp32 = {name: work.path(name).read_bytes() for name in (f"acc_bs{BS}.json", f"acc_bs{BS}_details.json")}
    work.hits = [True, False, False]
    assert work.run("--precision", "bf16") == ["beit_infer", "eval"]
    assert work.path(f"ais_out/bs{BS}_bf16").is_dir() and work.path(f"ais_out/bs{BS}").is_dir()
    assert {name: work.path(name).read_bytes() for name in fp32} == fp32
    code, out, _ = work.call("summary")
    assert code == 0
    assert ("Top-1 cost: openvino bf16 (acc_bs2_bf16.json) against openvino fp32 (acc_bs2.json) on the same 3 "
            "images: Top-1 33.33% vs 100.00% (-66.67 points; 2 images lost, 0 gained; exact McNemar p = 0.5)") in out
    # Made from another checkpoint: not the same inputs, so no comparison.
    details = work.path(f"acc_bs{BS}_bf16_details.json")
    details.write_text(details.read_text().replace('"sha256": "c1"', '"sha256": "c2"'))
    assert "Top-1 cost" not in work.call("summary")[1]


def test_check_model_refuses_an_unknown_variant(capsys):
    assert workstate.main(["check-model", "beit_huge"]) == 2
    assert "error: --model beit_huge: unknown BEiT variant; known: beit_base_patch16_224, " in capsys.readouterr().err


@pytest.mark.parametrize("name", ["beit_base_patch16_384", "beit_large_patch16_384", "beit_large_patch16_224",
                                  "beit_large_patch16_512"])
def test_every_published_variant_is_accepted(name):
    """Issue 11: the steps take the model's input size, so the unilm classifiers run (was: 224 only; large-512
    was refused until its models were written with external data, onnx_files)."""
    assert workstate.main(["check-model", name]) == 0


def test_only_large_512_needs_external_data():
    """The estimate behind the simplifier choice: the padded ONNX of large-512 alone is past protobuf's 2 GiB."""
    from beit_pipeline.graph.onnx_files import PROTOBUF_LIMIT
    assert workstate.onnx_bytes("beit_large_patch16_512") > PROTOBUF_LIMIT
    assert max(workstate.onnx_bytes(n) for n in workstate.KNOWN_VARIANTS if n != "beit_large_patch16_512") \
        < 0.85 * PROTOBUF_LIMIT


@pytest.mark.parametrize("variant, size", [("beit_tiny_test_patch16_224", 224), ("beit_tiny_test_patch16_384", 384)])
def test_the_model_and_its_size_are_read_from_the_checkpoint(tmp_path, variant, size):
    """Without --model the checkpoint's tensor shapes say the variant and size; --model wins; junk -> default."""
    from beit_pipeline.model import build as beit_model
    path = tmp_path / "ckpt.pth"
    beit_model.save_random_checkpoint(path, variant)
    assert workstate.checkpoint_shape(str(path)) == (variant, size)
    assert workstate.run_model("", str(path), False) == (variant, size)
    assert workstate.run_model("beit_large_patch16_384", str(path), False) == ("beit_large_patch16_384", 384)
    assert workstate.run_model("", str(path), True) == ("beit_base_patch16_224", 224)  # the demo's default
    (tmp_path / "junk.pth").write_bytes(b"junk")
    assert workstate.run_model("", str(tmp_path / "junk.pth"), False) == ("beit_base_patch16_224", 224)


def test_atc_output_is_taken_under_either_name_but_never_guessed(tmp_path):
    """atc (CANN >= 7.0) may write <output>_linux_<arch>.om: that one file becomes the partial .om; two such
    files (which one this run wrote?) are refused, nothing renamed."""
    run = workstate.RunParams(workdir=str(tmp_path), batch_size=8, backend="ascend", model="m", image_path="",
                              label_file="", checkpoint="", soc_version="Ascend310P3")
    spec = workstate.atc_spec(run, "beit_mg_bs8.onnx", "beit_mg_bs8.om")
    partial, suffixed = spec.promote[0][0], spec.aliases["beit_mg_bs8_partial.om"]
    assert (partial, suffixed) == ("beit_mg_bs8_partial.om", ["beit_mg_bs8_partial_linux_x86_64.om",
                                                              "beit_mg_bs8_partial_linux_aarch64.om"])
    assert set(suffixed) <= set(spec.outputs)  # owned: a redo or --force removes a stale one
    (tmp_path / suffixed[1]).write_bytes(b"om")
    workstate.take_alias(run, partial, suffixed)
    assert (tmp_path / partial).read_bytes() == b"om" and not (tmp_path / suffixed[1]).exists()
    (tmp_path / partial).unlink()
    for name in suffixed:
        (tmp_path / name).write_bytes(b"om")
    with pytest.raises(workstate.PipelineFileError, match="_linux_x86_64.om and .*_linux_aarch64.om"):
        workstate.take_alias(run, partial, suffixed)
    assert sorted(os.listdir(tmp_path)) == sorted(suffixed)


def test_make_demo_takes_a_variant():
    """`make demo MODEL=NAME` passes --model NAME to run_all.sh; without MODEL, none."""
    import subprocess
    made = subprocess.run(["make", "-n", "demo", "MODEL=beit_large_patch16_384"], cwd=workstate.REPO,
                          capture_output=True, text=True, check=True).stdout
    assert "run_all.sh --batch_size 8 --workdir work" in made and "--model beit_large_patch16_384" in made
    plain = subprocess.run(["make", "-n", "demo"], cwd=workstate.REPO, capture_output=True, text=True,
                           check=True).stdout
    assert "run_all.sh --batch_size 8" in plain and "--model" not in plain


def make_fidelity(work):
    work.path(f"fidelity_bs{BS}.json").write_text(json.dumps({"stages": [{"name": "pytorch", "top1": 100.0}]}))
    work.path(".fidelity_derived.json").write_text("{}")


def test_a_file_every_batch_size_shares_does_not_make_a_step_redo(work):
    """.fidelity_derived.json (and atc's fusion_result.json) have one name for every batch size: another batch
    size's run rewriting them must not make this batch size's step look changed."""
    work.run()
    code, _, _ = work.begin()
    assert work.call("start", "fidelity")[0] == 0
    make_fidelity(work)
    assert work.call("finish", "fidelity")[0] == 0
    work.path(".fidelity_derived.json").write_text('{"written by": "the bs16 run"}')
    work.begin()
    code, out, _ = work.call("start", "fidelity")
    assert code == workstate.EXIT_SKIP, out


def test_a_dangling_symlink_among_the_images_is_left_to_preprocessing(work):
    """The image set's digest must not stop the run: preprocessing reports the link (or --skip_bad skips it)."""
    (work.images / "ILSVRC2012_val_00000004.JPEG").symlink_to(work.root / "nowhere.JPEG")
    work.begin()
    code, _, err = work.call("start", "preprocess")
    assert code == 0, err


# ---------------------------------------------------------------- issue 17: a failed step, refusals before the first

def test_a_failed_step_removes_what_it_left_and_the_results_made_from_it(work, monkeypatch):
    """Issue 17 items 3 and 8: after a failed run the old acc_bs8.json stayed, looking like its answer; a full
    disk left beit_onnxsim_bs8.partial.onnx and said only 'No space left on device'."""
    work.run()
    work.checkpoint.write_bytes(b"checkpoint two")
    work.begin()
    for step in ("preprocess", "pth2onnx"):
        if work.call("start", step)[0] == 0:
            MAKERS[step](work)
            assert work.call("finish", step)[0] == 0
    assert work.call("start", "onnxsim")[0] == 0
    work.path(f"beit_onnxsim_bs{BS}.partial.onnx").write_bytes(b"half a model")  # what onnxsim left
    monkeypatch.setattr(workstate, "free_bytes", lambda folder: 12 * 1024)
    code, out, err = work.call("fail", "onnxsim", "--exit_code", "1")
    assert code == 0
    assert (f"error: step 'onnxsim' failed (exit 1); see its message above; removed what it left: "
            f"beit_onnxsim_bs{BS}.partial.onnx; the file system of {work.workdir} is full (12 KiB free)") in err
    assert (f"warning: removed the results that depended on step onnxsim, now out of date: acc_bs{BS}.json, "
            f"acc_bs{BS}_details.json") in err
    assert not work.path(f"acc_bs{BS}.json").exists() and not work.path(f"beit_onnxsim_bs{BS}.partial.onnx").exists()
    assert work.path(f"beit_mg_bs{BS}.onnx").exists()  # not a number: kept, checked by its key on the next run
    work.begin()
    code, out, _ = work.call("start", "eval")
    assert code == 0 and "redo eval: acc_bs2.json: step onnxsim, which it depends on, failed" in out


def test_an_interrupted_step_removes_the_results_without_a_second_error_line(work):
    work.run()
    work.path(f"ais_out/bs{BS}").rename(work.path(f"ais_out/bs{BS}_gone"))
    work.begin()
    assert work.call("start", "beit_infer")[0] == 0
    code, _, err = work.call("fail", "beit_infer", "--interrupted")
    assert code == 0 and "error:" not in err
    assert "removed the results that depended on step beit_infer, now out of date: acc_bs2.json" in err


def tiny_classifier(path, classes):
    """An ONNX graph whose output 'class' is (N, classes), as beit_mg_bs{N}.onnx's is."""
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["class"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BS, classes])],
                              [helper.make_tensor_value_info("class", TensorProto.FLOAT, [BS, classes])])
    onnx.save(helper.make_model(graph), str(path))


def test_the_number_of_classes_is_read_from_the_model(work):
    """Issue 17 item 8 (Why): a 10-class checkpoint stopped at eval, which assumed 1000 and had no flag."""
    work.begin()
    tiny_classifier(work.path(f"beit_mg_bs{BS}.onnx"), 10)
    assert work.call("num-classes")[:2] == (0, "10\n")
    work.path(f"beit_mg_bs{BS}.onnx").write_bytes(b"not a model")
    code, _, err = work.call("num-classes")
    assert code == 1 and "cannot read the number of classes" in err


@pytest.mark.parametrize("flags, message", [
    (["--precision", "bf16"], "--precision bf16: this CPU has no bf16 instructions"),
    (["--precision", "int8"], "--precision int8 is not built"),
    (["--providers", "cuda"], "--providers cuda: cuda (CUDAExecutionProvider) is not in this onnxruntime"),
    (["--providers", "cpu", "--precision", "bf16"], "--precision bf16: this CPU has no bf16 instructions"),
])
def test_engine_and_precision_are_refused_before_the_first_step(tmp_path, capsys, monkeypatch, flags, message):
    """Issue 17 item 7: --precision fp16/int8 were offered and refused after four steps had run."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2\n")
    monkeypatch.setenv("BEIT_CPUINFO", str(cpuinfo))
    assert workstate.main(["check-engine"] + flags) == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert workstate.main(["check-engine", "--providers", "cpu"]) == 0
    assert capsys.readouterr().out == "onnxruntime fp32 (--providers cpu)\n"


def test_a_work_folder_that_cannot_be_written_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    assert workstate.main(["--workdir", str(blocker / "work"), "check-workdir"]) == 2
    err = capsys.readouterr().err
    assert f"error: --workdir {blocker / 'work'}: cannot write there (Not a directory); choose another" in err
    assert workstate.main(["--workdir", str(tmp_path / "new" / "work"), "check-workdir"]) == 0
    assert os.listdir(tmp_path / "new" / "work") == []  # the probe left nothing


def test_the_lock_message_names_the_step_still_running_after_kill_9(tmp_path):
    """Issue 17 item 8: after kill -9 of run_all.sh the message named the dead shell, not the step holding the
    lock it inherited."""
    import signal
    import subprocess
    lock = tmp_path / ".run_all.lock"
    shell = subprocess.Popen(["bash", "-c", f'exec 9<>"{lock}"; flock 9; echo $$ >"{lock}"; sleep 60 & echo $!; wait'],
                             stdout=subprocess.PIPE, text=True)
    step = int(shell.stdout.readline())
    try:
        os.kill(shell.pid, signal.SIGKILL)
        shell.wait()
        shown = workstate.files.describe_lock_holder(str(lock))
        assert shown.startswith(f"PID {step} (sleep 60), left running by PID {shell.pid}, which is no longer running")
    finally:
        os.kill(step, signal.SIGKILL)


def test_a_python_without_the_packages_is_one_line_naming_the_fix(capsys, monkeypatch):
    """Issue 17 item 7: with no .venv on PATH the first step died with ModuleNotFoundError: No module named 'PIL'."""
    from beit_pipeline import environment
    real = environment.importlib.util.find_spec
    monkeypatch.setattr(environment.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("PIL", "onnx") else real(name, *a))
    assert environment.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: python3 ({os.sys.executable}) lacks pillow, onnx, ")
    assert ".venv" in err
