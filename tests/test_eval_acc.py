"""Tests for beit_eval_acc.py: exact Top-k counts on crafted outputs, row mapping, errors."""

import argparse
import errno
import json
import os
import types

import numpy as np
import pytest

import beit_eval_acc
from beit_pipeline.preprocess.runner import make_manifest
from beit_pipeline.preprocess import batches as beit_batches
from beit_pipeline.evaluation import accuracy as evaluation
from beit_pipeline.inference import outputs as beit_outputs
from beit_pipeline.errors import PipelineFileError
from helpers import run_script

N_IMAGES = 17
BATCH = 4
# Rank of the true label for each of the 17 images (0 = top prediction):
# 11 top-1 hits, then one each at ranks 1..4, and two misses (-1: the last place).
RANKS = [0] * 11 + [1, 2, 3, 4] + [5, -1]
EXPECTED = {"num_images": 17, "correct": [11, 12, 13, 14, 15]}


def crafted_logits(rng, label, rank, num_classes):
    """Distinct logits whose ``label`` sits exactly at ``rank``."""
    values = rng.permutation(num_classes).astype(np.float32) * 0.25 - 50.0
    order = np.argsort(-values, kind="stable")
    target = order[rank % num_classes]
    values[label], values[target] = values[target], values[label]
    return values


def make_case(tmp_path, fmt="txt", num_classes=1000, order=None, label_padding=True, extra_label_lines=()):
    """Outputs, manifest and label file for 17 images in batches of 4.

    ``order`` permutes which image sits in which row (the manifest knows, the
    guide's rule does not).  The 3 padded rows of the last batch hold the
    labels of images 18..20 at rank 0, and with ``label_padding`` those images
    are in the label file, so counting a padded row would change every number.
    """
    rng = np.random.default_rng(0)
    names = [f"ILSVRC2012_val_{i + 1:08d}" for i in range(N_IMAGES + 3)]
    labels = rng.integers(0, num_classes, size=len(names))
    order = list(range(N_IMAGES)) if order is None else list(order)
    out_dir = tmp_path / "ais_out"
    prep_dir = tmp_path / "prep"
    out_dir.mkdir()
    prep_dir.mkdir()
    batches = []
    n_batches = (N_IMAGES + BATCH - 1) // BATCH
    for b in range(n_batches):
        rows, images = [], []
        for r in range(BATCH):
            slot = b * BATCH + r
            if slot < N_IMAGES:
                img = order[slot]
                rows.append(crafted_logits(rng, labels[img], RANKS[img], num_classes))
                images.append(names[img] + ".JPEG")
            else:
                # Padding: under the guide's rule this row is image slot+1, here made a sure top-1 hit.
                rows.append(crafted_logits(rng, labels[slot], 0, num_classes) * 1000.0)
        stem = f"input_{b:05d}"
        beit_outputs.write_output(out_dir / beit_outputs.output_file_name(stem, fmt), np.stack(rows))
        batches.append({"file": stem + ".bin", "images": images, "real": len(images)})
    # The manifest as beit_preprocess.py writes it: its own function, its keys, a finished run.
    image_dir = tmp_path / "images"
    skipped = [{"name": "broken.JPEG",
                "error": f"{image_dir / 'broken.JPEG'}: not a readable image (unknown format or corrupt header)"}]
    all_names = sorted([n + ".JPEG" for n in names[:N_IMAGES]] + ["broken.JPEG"])
    manifest = make_manifest(
        types.SimpleNamespace(batch_size=BATCH, image_path=str(image_dir)), all_names,
        beit_batches.image_set_fingerprint(all_names), batches, skipped, True)
    beit_batches.save_manifest(prep_dir, manifest)
    # ais_bench leaves these next to the outputs; they must be ignored.
    (out_dir / "sumary.json").write_text('{"NPU_compute_time": {}}')
    (out_dir / "input_00000_summary.json").write_text("{}")
    (out_dir / "ais_bench.log").write_text("log\n")
    n_labelled = len(names) if label_padding else N_IMAGES
    lines = [f"{names[i]}.JPEG {labels[i]}" for i in range(n_labelled)] + list(extra_label_lines)
    label_file = tmp_path / "val_label.txt"
    label_file.write_text("\n".join(lines) + "\n")
    return {"out": str(out_dir), "prep": str(prep_dir), "labels": str(label_file), "res": str(tmp_path / "res"),
            "manifest": manifest}


def argv(case, *extra, manifest=True, batch=True):
    args = ["--folder_davinci_target", case["out"], "--annotation_file_path", case["labels"],
            "--result_json_path", case["res"], "--json_file_name", "acc.json"]
    if batch:
        args += ["--batch_size", str(BATCH)]
    if manifest:
        args += ["--prep_image", case["prep"]]
    return args + list(extra)


def read_result(case):
    """Our details, with the guide's JSON merged in (its title and three entries) and its exact text."""
    with open(os.path.join(case["res"], "acc_details.json"), encoding="utf-8") as f:
        res = json.load(f)
    with open(os.path.join(case["res"], "acc.json"), encoding="utf-8") as f:
        res["guide_text"] = f.read()
    res.update(json.loads(res["guide_text"]))
    return res


def check_expected(res, expected=EXPECTED):
    n = expected["num_images"]
    assert res["num_images"] == n
    assert res["top1_correct"] == expected["correct"][0]
    assert res["top5_correct"] == expected["correct"][4]
    assert res["top1"] == pytest.approx(100.0 * expected["correct"][0] / n)
    assert res["top5"] == pytest.approx(100.0 * expected["correct"][4] / n)
    assert res["correct"] == expected["correct"]
    table = {item["key"]: item["value"] for item in res["value"]}
    assert table["Number of images"] == str(n)
    assert table["Top1 accuracy"] == str(round(100.0 * expected["correct"][0] / n, 2)) + "%"
    for k in range(1, 6):
        assert res[f"top{k}"] == pytest.approx(100.0 * expected["correct"][k - 1] / n)


# ---------------------------------------------------------------- pure functions

def test_label_ranks_break_ties_by_class_index():
    logits = np.array([[0.0, 0.0, 0.0, 0.0],    # all tied: stable order 0,1,2,3
                       [1.0, 3.0, 3.0, 2.0],    # order 1,2,3,0
                       [5.0, 4.0, 3.0, 2.0]], dtype=np.float32)
    labels = [2, 2, 3]
    assert evaluation.label_ranks(logits, labels).tolist() == [2, 1, 3]
    assert evaluation.label_ranks(logits[:0], []).tolist() == []


def test_batch_index_names_the_guide_rule_batches():
    assert [beit_batches.batch_index(s) for s in ("input_00000", "input_00042", "input_7")] == [0, 42, 7]
    for stem in ("extra", "input_", "input_0001a", "input_00001_0", "Input_00001", "xinput_00001"):
        assert beit_batches.batch_index(stem) is None, stem
    assert beit_batches.batch_index(os.path.splitext(beit_batches.batch_file_name(12))[0]) == 12


def test_error_guide_rule_output_of_another_name(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    beit_outputs.write_output(os.path.join(case["out"], "extra_0.bin"), np.zeros((4, 10)))
    expect_error(case, capsys, argv(case, "--num_classes", "10", manifest=False), "extra_0.bin",
                 "only outputs of input_NNNNN batches")


def test_crafted_logits_put_label_at_rank():
    rng = np.random.default_rng(5)
    for rank in (0, 1, 4, 5, 999, -1):
        row = crafted_logits(rng, 123, rank, 1000)
        assert evaluation.label_ranks(row[None], [123])[0] == rank % 1000


def test_evaluate_counts_only_given_rows_and_names_missing_label():
    logits = np.eye(3, dtype=np.float32)
    rows = [evaluation.BatchRows("a_0.bin", logits, ["x.JPEG", "y", "z"])]
    res = evaluation.evaluate(rows, {"x.JPEG": 0, "y": 2, "z": 2}, 3)
    assert res.num_images == 3 and res.correct == [2, 2, 3]
    assert res.top1 == pytest.approx(200 / 3) and res.top5 == 100.0
    with pytest.raises(PipelineFileError, match=r"labels\.txt: no label for image w \(row of a_0\.bin\)"):
        evaluation.evaluate([evaluation.BatchRows("a_0.bin", logits, ["x", "y", "w"])], {"x": 0, "y": 2}, 3,
                            "labels.txt")


# ---------------------------------------------------------------- end to end, all formats

@pytest.mark.parametrize("fmt", ["txt", "bin", "npy"])
def test_exact_topk_with_manifest_all_formats(tmp_path, capsys, fmt):
    order = np.random.default_rng(3).permutation(N_IMAGES)  # rows not in name order: only the manifest knows
    case = make_case(tmp_path, fmt, order=order)
    assert beit_eval_acc.main(argv(case)) == 0
    res = read_result(case)
    check_expected(res)
    assert res["title"] == "Overall statistical evaluation"
    # The guide's entries in the guide's order, Top-1 last (its beit_eval_acc.py: topn=1); Top-2..5 apart.
    assert [v["key"] for v in res["value"]] == ["Number of images", "Number of classes", "Top1 accuracy"]
    assert res["value"][1]["value"] == "1000" and res["num_classes"] == 1000
    assert res["value"][-1]["value"] == "64.71%" and res["top5"] == pytest.approx(100 * 15 / 17)
    assert res["skipped"] == case["manifest"]["skipped"]
    # Issue 18 item 8: the guide's JSON exactly as its own script writes it (json.dump, one line, no newline).
    assert res["guide_text"] == ('{"title": "Overall statistical evaluation", "value": [{"key": "Number of images", '
                                 '"value": "17"}, {"key": "Number of classes", "value": "1000"}, {"key": "Top1 '
                                 'accuracy", "value": "64.71%"}]}')
    out = capsys.readouterr()
    assert "Top-1 accuracy: 64.71%  Top-5 accuracy: 88.24%  images: 17" in out.out
    assert "(95% interval 41.30-82.69%): the outputs of a model not given (--model_file) on " in out.out
    assert "1 images were skipped" in out.err


def test_guide_rule_fallback_counts_labelled_rows_only(tmp_path, capsys):
    # Label file without images 18..20: the padded rows are recognised by having no label.
    case = make_case(tmp_path, "txt", label_padding=False)
    assert beit_eval_acc.main(argv(case, manifest=False)) == 0
    res = read_result(case)
    check_expected(res)
    assert res["rows_from"] == "guide rule" and res["skipped"] == []
    err = capsys.readouterr().err
    assert "3 rows" in err and "not counted" in err


def test_guide_rule_counts_padding_the_manifest_excludes(tmp_path):
    # With labels for 18..20 the guide's rule cannot tell padding apart: it counts
    # 3 more rows, all top-1 hits.  The manifest gives the exact numbers.
    case = make_case(tmp_path, "bin")
    assert beit_eval_acc.main(argv(case, manifest=False)) == 0
    check_expected(read_result(case), {"num_images": 20, "correct": [14, 15, 16, 17, 18]})
    assert beit_eval_acc.main(argv(case)) == 0
    check_expected(read_result(case))


def test_manifest_path_alias_and_batchsize_alias(tmp_path):
    case = make_case(tmp_path, "npy", num_classes=10)
    args = ["--folder_davinci_target", case["out"], "--annotation_file_path", case["labels"],
            "--result_json_path", case["res"], "--json_file_name", "acc.json", "--batchsize", "4",
            "--manifest", os.path.join(case["prep"], "manifest.json"), "--num_classes", "10"]
    assert beit_eval_acc.main(args) == 0
    res = read_result(case)
    check_expected(res)
    assert res["value"][1] == {"key": "Number of classes", "value": "10"}


def test_batch_size_optional_with_manifest(tmp_path):
    case = make_case(tmp_path, "bin", num_classes=10)
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 0
    check_expected(read_result(case))


def test_crlf_label_file_with_trailing_blanks(tmp_path):
    case = make_case(tmp_path, "txt", num_classes=10)
    text = open(case["labels"], encoding="utf-8").read().splitlines()
    with open(case["labels"], "wb") as f:
        f.write(("\r\n".join(line + "  \t" for line in text) + "\r\n\r\n   \r\n").encode("utf-8"))
    assert beit_eval_acc.main(argv(case, "--num_classes", "10")) == 0
    check_expected(read_result(case))


def test_script_cli_and_help(tmp_path):
    case = make_case(tmp_path, "txt")
    proc = run_script(["beit_eval_acc.py"] + argv(case))
    assert proc.returncode == 0, proc.stderr
    assert "Top-1 accuracy: 64.71%  Top-5 accuracy: 88.24%  images: 17" in proc.stdout
    check_expected(read_result(case))
    proc = run_script(["beit_eval_acc.py", "--help"])
    assert proc.returncode == 0
    for flag in ("--folder_davinci_target", "--annotation_file_path", "--result_json_path", "--json_file_name",
                 "--batch_size", "--batchsize", "--prep_image", "--manifest", "--num_classes"):
        assert flag in proc.stdout


def test_help_explains_every_flag():
    parser = beit_eval_acc.build_parser()
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert {o for a in options for o in a.option_strings} == {
        "--folder_davinci_target", "--annotation_file_path", "--result_json_path", "--json_file_name",
        "--batch_size", "--batchsize", "--prep_image", "--manifest", "--num_classes", "--checkpoint", "--model_file",
        "--synset_mapping"}
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS and len(action.help.split()) >= 4, \
            action.option_strings


def test_script_error_has_no_traceback(tmp_path):
    case = make_case(tmp_path, "bin", num_classes=10)
    os.remove(os.path.join(case["out"], "input_00002_0.bin"))
    proc = run_script(["beit_eval_acc.py"] + argv(case, "--num_classes", "10"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "input_00002_0.*" in proc.stderr
    assert not os.path.exists(case["res"])


# ---------------------------------------------------------------- errors

def expect_error(case, capsys, args, *needles, code=1):
    assert beit_eval_acc.main(args) == code
    err = capsys.readouterr().err
    assert "error:" in err
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(os.path.join(case["res"], "acc.json"))
    return err


def write_bin(case, name, data):
    with open(os.path.join(case["out"], name), "wb") as f:
        f.write(np.asarray(data, dtype=np.float32).tobytes())


def test_error_image_without_label(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    lines = open(case["labels"]).read().splitlines()
    missing = case["manifest"]["batches"][1]["images"][2]
    open(case["labels"], "w").write("\n".join(l for l in lines if not l.startswith(missing)) + "\n")
    expect_error(case, capsys, argv(case, "--num_classes", "10"), missing, case["labels"])


def test_error_outputs_do_not_cover_manifest(tmp_path, capsys):
    case = make_case(tmp_path, "txt", num_classes=10)
    os.remove(os.path.join(case["out"], "input_00001_0.txt"))
    os.remove(os.path.join(case["out"], "input_00004_0.txt"))
    expect_error(case, capsys, argv(case, "--num_classes", "10"), "input_00001_0.*", "input_00004_0.*",
                 "2 of 5 batches")


def test_error_gap_in_guide_rule_batches(tmp_path, capsys):
    case = make_case(tmp_path, "txt", num_classes=10)
    os.remove(os.path.join(case["out"], "input_00002_0.txt"))
    expect_error(case, capsys, argv(case, "--num_classes", "10", manifest=False), "input_00002_0.*")


@pytest.mark.parametrize("kind", ["not_numbers", "byte_count", "nan", "width_txt", "width_npy", "width_bin"])
def test_error_malformed_output(tmp_path, capsys, kind):
    case = make_case(tmp_path, "npy" if kind == "width_npy" else ("txt" if "txt" in kind or kind == "not_numbers"
                                                                     else "bin"), num_classes=10)
    out = case["out"]
    if kind == "not_numbers":
        name = "input_00001_0.txt"
        open(os.path.join(out, name), "w").write("1.0 2.0 abc" + " 0.0" * 7 + "\n")
    elif kind == "byte_count":
        name = "input_00001_0.bin"
        write_bin(case, name, np.zeros(4 * 10 + 1))
    elif kind == "nan":
        name = "input_00003_0.bin"
        data = np.zeros((4, 10))
        data[2, 5] = np.nan
        write_bin(case, name, data)
    elif kind == "width_txt":
        name = "input_00001_0.txt"
        beit_outputs.write_output(os.path.join(out, name), np.zeros((4, 9)))
    elif kind == "width_npy":
        name = "input_00001_0.npy"
        beit_outputs.write_output(os.path.join(out, name), np.zeros((4, 11)))
    else:
        # 4 x 10 floats read as rows of 1000 classes: not a whole row.
        name = "input_00000_0.bin"
        expect_error(case, capsys, argv(case), name)
        return
    expect_error(case, capsys, argv(case, "--num_classes", "10"), name)


def test_error_fewer_rows_than_real_images(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    write_bin(case, "input_00002_0.bin", np.zeros((3, 10)))
    expect_error(case, capsys, argv(case, "--num_classes", "10"), "input_00002_0.bin", "3 rows", "4 images")


def test_last_batch_without_padding_rows_is_fine(tmp_path):
    # An output holding only the real rows of the last batch (a runner that trims padding).
    case = make_case(tmp_path, "bin", num_classes=10)
    path = os.path.join(case["out"], "input_00004_0.bin")
    beit_outputs.write_output(path, beit_outputs.read_output(path, 10)[:1])
    assert beit_eval_acc.main(argv(case, "--num_classes", "10")) == 0
    check_expected(read_result(case))


@pytest.mark.parametrize("manifest", [True, False])
def test_error_more_rows_than_batch_size(tmp_path, capsys, manifest):
    case = make_case(tmp_path, "bin", num_classes=10)
    write_bin(case, "input_00001_0.bin", np.zeros((5, 10)))
    expect_error(case, capsys, argv(case, "--num_classes", "10", manifest=manifest), "input_00001_0.bin",
                 "more than the batch size 4")


@pytest.mark.parametrize("complete", [False, None, "missing"])
def test_error_manifest_of_unfinished_preprocessing(tmp_path, capsys, complete):
    case = make_case(tmp_path, "bin", num_classes=10)
    manifest = dict(case["manifest"])
    if complete == "missing":
        del manifest["complete"]
    else:
        manifest["complete"] = complete
    beit_batches.save_manifest(case["prep"], manifest)
    expect_error(case, capsys, argv(case, "--num_classes", "10"), os.path.join(case["prep"], "manifest.json"),
                 "did not finish")


def test_error_corrupt_manifest(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    path = os.path.join(case["prep"], "manifest.json")
    with open(path, "w") as f:
        f.write('{"format": 1, "batch_')
    expect_error(case, capsys, argv(case, "--num_classes", "10"), path, "not valid JSON")


def test_error_batch_size_disagrees_with_manifest(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    args = argv(case, "--num_classes", "10", batch=False) + ["--batch_size", "8"]
    expect_error(case, capsys, args, "manifest.json", "batch size is 4")


def test_guide_rule_takes_the_guides_default_batch_size_and_says_when_it_does_not_fit(tmp_path, capsys):
    """Issue 18 item 8: the guide's defaults (its beit_eval_acc.py: --batch_size 8); outputs of 4 rows are
    refused naming the flag, never read as batches of 8."""
    case = make_case(tmp_path, "bin", num_classes=10)
    expect_error(case, capsys, argv(case, "--num_classes", "10", manifest=False, batch=False),
                 "4 rows, but --batch_size is 8", "pass that --batch_size")
    assert beit_eval_acc.build_parser().parse_args([]).json_file_name == "acc_bs8.json"


@pytest.mark.parametrize("bad_line, needle", [
    ("ILSVRC2012_val_00000001.JPEG 3", "listed twice"),
    ("ILSVRC2012_val_00099999.JPEG 10", "outside [0, 10)"),
    ("ILSVRC2012_val_00099999.JPEG", "expected 'IMAGE_NAME LABEL'"),
    ("ILSVRC2012_val_00099999.JPEG cat", "not an integer"),
])
def test_error_bad_label_file(tmp_path, capsys, bad_line, needle):
    case = make_case(tmp_path, "bin", num_classes=10, extra_label_lines=[bad_line])
    expect_error(case, capsys, argv(case, "--num_classes", "10"), case["labels"], needle)


def test_error_missing_label_file(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    os.remove(case["labels"])
    # A path argument that does not exist is a usage error (exit 2) in the unified scheme (was 1).
    expect_error(case, capsys, argv(case, "--num_classes", "10"), case["labels"], "not found", code=2)


def test_error_missing_or_empty_output_folder(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    args = argv(case, "--num_classes", "10")
    missing = str(tmp_path / "nowhere")
    args[args.index(case["out"])] = missing
    expect_error(case, capsys, args, missing, "not found", code=2)  # a missing path argument: usage (was 1)
    # ais_bench's dated subfolder holds the outputs; the parent has only that folder and a summary.
    empty = tmp_path / "ais_parent"
    (empty / "2024_01_01-00_00_00").mkdir(parents=True)
    (empty / "sumary.json").write_text("{}")
    args[args.index(missing)] = str(empty)
    expect_error(case, capsys, args, str(empty), "no inference outputs", "2024_01_01-00_00_00")


def test_error_two_formats_for_one_stem(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    beit_outputs.write_output(os.path.join(case["out"], "input_00003_0.txt"), np.zeros((4, 10)))
    expect_error(case, capsys, argv(case, "--num_classes", "10"), "input_00003_0.bin", "input_00003_0.txt")


def test_error_leaves_existing_json_untouched(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    assert beit_eval_acc.main(argv(case, "--num_classes", "10")) == 0
    path = os.path.join(case["res"], "acc.json")
    before = open(path, "rb").read()
    write_bin(case, "input_00000_0.bin", np.full((4, 10), np.nan))
    assert beit_eval_acc.main(argv(case, "--num_classes", "10")) == 1
    assert "input_00000_0.bin" in capsys.readouterr().err
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(case["res"])) == ["acc.json", "acc_details.json"]


# ---------------------------------------------------------------- issue 10: label matching and the guide's rule

def sub_folder_case(tmp_path, label_lines, names=("dogs/1.jpg", "cats/1.jpg", "dogs/2.jpg", "cats/2.jpg",
                                                  "my dog 3.jpg")):
    """Five images of one batch of 8 (3 padded rows), each a top-1 hit for its own class 2*i+1.

    Image i's logits peak at class 2*i+1; its label in ``label_lines`` decides whether that is a hit.
    """
    out, prep = tmp_path / "out", tmp_path / "prep"
    out.mkdir()
    prep.mkdir()
    logits = np.zeros((8, 10), dtype=np.float32)
    for i in range(len(names)):
        logits[i, 2 * i + 1] = 5.0
    beit_outputs.write_output(out / "input_00000_0.bin", logits)
    manifest = {"format": beit_batches.MANIFEST_FORMAT, "complete": True, "batch_size": 8,
                "batches": [{"file": "input_00000.bin", "images": list(names), "real": len(names)}], "skipped": []}
    beit_batches.save_manifest(prep, manifest)
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(line + "\n" for line in label_lines))
    return {"out": str(out), "prep": str(prep), "labels": str(labels), "res": str(tmp_path / "res")}


def test_class_sub_folders_named_by_relative_path_score_exactly(tmp_path, capsys):
    # dogs/1.jpg and cats/1.jpg share a file name; the old stem-keyed labels mixed them up (60%, truth 100%).
    case = sub_folder_case(tmp_path, ["cats/1.jpg 3", "dogs/1.jpg 1", "dogs/2.jpg 5", "cats/2.jpg 7",
                                      "my dog 3.jpg 9"])
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 0
    res = read_result(case)
    assert (res["num_images"], res["top1_correct"], res["top5_correct"]) == (5, 5, 5) and res["top1"] == 100.0
    # One label moved to another image of the same file name: exactly that image misses top-1.
    case_path = tmp_path / "labels.txt"
    case_path.write_text("cats/1.jpg 1\ndogs/1.jpg 1\ndogs/2.jpg 5\ncats/2.jpg 7\nmy dog 3.jpg 9\n")
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 0
    assert read_result(case)["top1_correct"] == 4


def test_label_file_naming_only_the_shared_file_name_is_an_error_naming_both(tmp_path, capsys):
    case = sub_folder_case(tmp_path, ["1.jpg 1", "2.jpg 5", "my dog 3.jpg 9"], names=("dogs/1.jpg", "cats/1.jpg"))
    err = expect_error(case, capsys, argv(case, "--num_classes", "10", batch=False), case["labels"],
                       "'1.jpg' (line 1)", "cats/1.jpg, dogs/1.jpg")
    assert err.count("error:") == 1 and "Traceback" not in err


def test_image_names_with_spaces_are_labelled(tmp_path, capsys):
    names = ("my dog 1.jpg", "a  b/c d.jpg")
    case = sub_folder_case(tmp_path, ["my dog 1.jpg   1", "a  b/c d.jpg\t4"], names=names)
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 0
    res = read_result(case)
    assert (res["num_images"], res["top1_correct"]) == (2, 1)  # image 2 peaks at class 3, labelled 4


def test_guide_rule_refuses_labels_that_are_not_consecutive_from_one(tmp_path, capsys):
    # A subset numbered 2, 5, 8 ...: the rule would put image 1's row against label 2 (old result: 0%, no warning).
    case = make_case(tmp_path, "bin", num_classes=10)
    lines = open(case["labels"]).read().splitlines()
    open(case["labels"], "w").write("\n".join(lines[1::3]) + "\n")
    expect_error(case, capsys, argv(case, "--num_classes", "10", manifest=False), case["labels"],
                 "not ILSVRC2012_val_00000001", "--prep_image")
    # With the manifest the rows are known, and the images without a label are named instead.
    expect_error(case, capsys, argv(case, "--num_classes", "10"), "no label for image ILSVRC2012_val_00000001.JPEG")
    open(case["labels"], "w").write("\n".join(lines + ["cat.jpg 1"]) + "\n")
    expect_error(case, capsys, argv(case, "--num_classes", "10", manifest=False), "'cat.jpg' (line 21)",
                 "not an ILSVRC2012_val_NNNNNNNN name")


def test_guide_rule_refuses_a_batch_size_that_does_not_fit_the_outputs(tmp_path, capsys):
    # Outputs of 4 rows read as batches of 8: the old code named rows 8 apart and halved the score.
    case = make_case(tmp_path, "bin", num_classes=10, label_padding=False)
    args = argv(case, "--num_classes", "10", manifest=False, batch=False) + ["--batch_size", "8"]
    expect_error(case, capsys, args, "input_00000_0.bin: 4 rows, but --batch_size is 8")
    # A last output trimmed to its real row is fine, and scores the same as with the manifest.
    path = os.path.join(case["out"], "input_00004_0.bin")
    beit_outputs.write_output(path, beit_outputs.read_output(path, 10)[:1])
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", manifest=False)) == 0
    check_expected(read_result(case))


def test_write_error_names_the_result_file(tmp_path, capsys, monkeypatch):
    case = make_case(tmp_path, "bin", num_classes=10)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as the kernel reports it: no file name

    monkeypatch.setattr(os, "fsync", full_disk)
    err = expect_error(case, capsys, argv(case, "--num_classes", "10"))
    # The details are written first: a guide JSON never stands without the file that says what it measured.
    assert err.splitlines()[-1] == f"error: {os.path.join(case['res'], 'acc_details.json')}: No space left on device"
    assert os.listdir(case["res"]) == []  # the temporary is gone too


def test_path_arguments_of_the_wrong_kind_are_usage_errors(tmp_path, capsys):
    case = make_case(tmp_path, "bin", num_classes=10)
    open(case["res"], "w").write("a file")
    err = expect_error(case, capsys, argv(case, "--num_classes", "10"), "--result_json_path", code=2)
    assert "exists and is not a folder" in err
    os.remove(case["res"])
    args = argv(case, "--num_classes", "10")
    args[args.index(case["labels"])] = case["out"]
    expect_error(case, capsys, args, f"--annotation_file_path {case['out']}: is not a file", code=2)


# ---------------------------------------------------------------- the outputs' dtype (issue 11)

def rewrite_bins_as(case, dtype):
    """The case's float32 BIN outputs rewritten in ``dtype``, as an OM with fp16 outputs writes them."""
    for name in sorted(os.listdir(case["out"])):
        if name.endswith("_0.bin"):
            path = os.path.join(case["out"], name)
            np.fromfile(path, np.float32).astype(dtype).tofile(path)


def test_fp16_bin_outputs_of_an_om_are_read_by_their_size(tmp_path, capsys):
    """An OM whose output atc left in fp16 writes BIN files of B x 1000 x 2 bytes (ais_bench writes the
    output tensor's bytes as they are: Ascend/tools ais-bench_workload/tool/ais_bench, infer/io_oprations.py
    save_tensors_to_file -> ndata.tofile).  Read as float32 they would be half as many rows of noise."""
    case = make_case(tmp_path, "bin", num_classes=10)
    rewrite_bins_as(case, np.float16)
    assert os.path.getsize(os.path.join(case["out"], "input_00000_0.bin")) == BATCH * 10 * 2
    assert beit_eval_acc.main(argv(case, "--num_classes", "10")) == 0
    check_expected(read_result(case))


def test_the_summary_names_the_dtype_where_the_size_cannot(tmp_path, capsys):
    """A trimmed last output of 1 float32 row is 2 fp16 rows by size: the summary's output_dtype decides."""
    case = make_case(tmp_path, "bin", num_classes=10)
    path = os.path.join(case["out"], "input_00004_0.bin")
    beit_outputs.write_output(path, beit_outputs.read_output(path, 10)[:1])
    with open(case["out"] + "_summary.json", "w", encoding="utf-8") as f:
        json.dump({"output_dtype": "float32"}, f)
    assert beit_eval_acc.main(argv(case, "--num_classes", "10")) == 0
    check_expected(read_result(case))
    assert evaluation.summary_output_dtype(case["out"]) == "float32"
    assert beit_outputs.bin_dtype("x", 40, 10, batch_size=4, dtype="float16") is np.float16
    assert beit_outputs.bin_dtype("x", 40, 10, batch_size=4) is np.float32  # no summary: float32, as before


@pytest.mark.parametrize("size, message", [
    (30, "30 bytes is not a whole number of float32 or float16 rows of 10 classes"),
    (4 * 10 * 2 + 30, "110 bytes is not a whole number of float32 or float16 rows"),
    (5 * 10 * 2, "5 rows or more (100 bytes), more than the batch size 4"),
])
def test_a_bin_size_that_fits_no_dtype_is_refused(tmp_path, capsys, size, message):
    case = make_case(tmp_path, "bin", num_classes=10)
    with open(os.path.join(case["out"], "input_00001_0.bin"), "wb") as f:
        f.write(b"\0" * size)
    expect_error(case, capsys, argv(case, "--num_classes", "10"), "input_00001_0.bin", message)


# ---------------------------------------------------------------- issue 17: every number says what it is

def test_a_subset_of_the_labelled_images_is_stated(tmp_path, capsys):
    """Issue 17 item 6: a label file of 24 images with 12 of them present printed 100.00% on 12 images, with no
    word that 12 labelled images were not evaluated (fine for a subset, as CI does, but say so)."""
    names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 25)]
    case = sub_folder_case(tmp_path, [f"{n} {2 * (i % 5) + 1}" for i, n in enumerate(names)], names=names[:5])
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 0
    err = capsys.readouterr().err
    assert "warning: 5 of 24 labelled images evaluated: the other 19 are not in these outputs (label file " in err
    res = read_result(case)
    assert (res["num_images"], res["labelled_images"], res["labelled_not_evaluated"]) == (5, 24, 19)
    assert res["subset"].startswith("5 of 24 labelled images evaluated")
    assert res["top1_interval_95"] == pytest.approx([56.55, 100.0], abs=0.01)  # Wilson, 5/5


def test_the_details_say_what_made_the_number(tmp_path):
    """Issue 17 item 1: the accuracy JSON carried no checkpoint, image set, label file, model, engine or
    precision; they are in the details beside the guide's JSON."""
    import hashlib
    case = make_case(tmp_path, "txt")
    checkpoint, model = tmp_path / "beit.pth", tmp_path / "beit_mg_bs4.onnx"
    checkpoint.write_bytes(b"weights")
    model.write_bytes(b"graph")
    with open(case["out"] + "_summary.json", "w") as f:  # what beit_infer.py's summary says it ran
        json.dump({"throughput": 1.0, "engine": "openvino", "precision": "bf16", "runner": "openvino 2026.4.1"}, f)
    assert beit_eval_acc.main(argv(case, "--checkpoint", str(checkpoint), "--model_file", str(model))) == 0
    res = read_result(case)
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in (checkpoint, model, tmp_path / "val_label.txt")}
    assert res["checkpoint"] == {"path": str(checkpoint), "sha256": sha[checkpoint]}
    assert res["model"] == {"path": str(model), "sha256": sha[model]}
    assert res["labels"] == {"path": case["labels"], "sha256": sha[tmp_path / "val_label.txt"]}
    assert res["images"]["fingerprint"] == case["manifest"]["fingerprint"]
    assert (res["outputs"]["engine"], res["outputs"]["precision"], res["outputs"]["backend"]) == ("openvino", "bf16",
                                                                                                  "cpu")
    # Outputs with no summary of ours came from ais_bench: the OM, at atc's precision.
    os.remove(case["out"] + "_summary.json")
    assert beit_eval_acc.main(argv(case)) == 0
    res = read_result(case)
    assert (res["outputs"]["engine"], res["outputs"]["backend"], res["checkpoint"]) == ("ais_bench", "ascend", None)


def test_guide_percent_is_the_guides_arithmetic():
    """The guide's str(round(np.cumsum(count_hit) / count * 100, 2)) + '%', numpy float64 rounding included."""
    from beit_pipeline.evaluation import results
    for hits, count in [(17, 17), (11, 17), (1, 3), (2, 3), (84680, 100000), (42635, 50000), (0, 7)]:
        accuracy = np.cumsum(np.zeros(1) + hits) / count
        assert results.guide_percent(hits, count) == str(round(accuracy[0] * 100, 2)) + "%"
    assert results.guide_percent(1, 3) == "33.33%" and results.guide_percent(17, 17) == "100.0%"


def test_image_names_that_are_not_utf8_are_kept_and_matched(tmp_path, capsys):
    """Issue 17 item 9: a non-UTF-8 image name wrote a raw byte into manifest.json (json.load then failed).
    Names are recorded losslessly and matched with label entries written with the same bytes."""
    import beit_preprocess
    from PIL import Image
    images = tmp_path / "images"
    images.mkdir()
    raw = [b"caf\xe9.JPEG", b"ILSVRC2012_val_00000002.JPEG", b"\xff\xfe odd.png"]
    for i, name in enumerate(raw):
        Image.new("RGB", (40 + 10 * i, 30), (30 * i, 60, 90)).save(os.path.join(os.fsencode(images), name),
                                                                    format="PNG" if name.endswith(b".png") else "JPEG")
    prep = tmp_path / "prep"
    assert beit_preprocess.main(["--image_path", str(images), "--prep_image", str(prep), "--batch_size", "4",
                                 "--workers", "1"]) == 0
    text = (prep / "manifest.json").read_bytes().decode("utf-8")  # strict UTF-8: valid JSON for any reader
    manifest = json.loads(text)
    names = manifest["batches"][0]["images"]
    assert sorted(os.fsencode(n) for n in names) == sorted(raw)
    logits = np.zeros((4, 10), dtype=np.float32)
    for row in range(3):
        logits[row, row + 1] = 5.0
    out = tmp_path / "out"
    out.mkdir()
    beit_outputs.write_output(out / "input_00000_0.txt", logits)
    labels = tmp_path / "val_label.txt"
    labels.write_bytes(b"".join(os.fsencode(n) + b" %d\n" % (row + 1) for row, n in enumerate(names)))
    case = {"out": str(out), "prep": str(prep), "labels": str(labels), "res": str(tmp_path / "res")}
    capsys.readouterr()
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 0, capsys.readouterr().err
    res = read_result(case)
    assert (res["num_images"], res["top1_correct"]) == (3, 3)
    # A label file that names one of them with other bytes (the UTF-8 spelling) is an error naming it.
    labels.write_bytes(labels.read_bytes().replace(b"caf\xe9", "café".encode()))
    assert beit_eval_acc.main(argv(case, "--num_classes", "10", batch=False)) == 1
    assert "no label for image caf\\xe9.JPEG" in capsys.readouterr().err
