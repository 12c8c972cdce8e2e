"""ImageNet's label forms (beit_pipeline/evaluation/label_formats.py): each gives the Top-1 of the same val_label.txt.

One crafted evaluation (12 images in class folders, logits that hit 7 of them) is scored with the labels
in every form; the synsets are 1000 made-up ids whose devkit order (ILSVRC2012_ID) is a shuffle of their
sorted order, as in the real devkit, so reading an ID as a class index would score near 0.  meta.mat is
written with scipy.io.savemat in the devkit's layout (a 'synsets' struct array: ILSVRC2012_ID, WNID, words,
gloss, num_children, ...; non-leaf synsets after the 1000 leaves), as torchvision's datasets/imagenet.py
parse_meta_mat reads it.  No model runs: milliseconds each.
"""

import json
import os
import types

import numpy as np
import pytest

import beit_eval_acc
from beit_pipeline.preprocess import batches as beit_batches
from beit_pipeline.evaluation import label_formats
from beit_pipeline.evaluation import labels
from beit_pipeline.inference import outputs as beit_outputs
from beit_pipeline.preprocess.runner import make_manifest

NUM_CLASSES, N_IMAGES, BATCH = 1000, 12, 4
HITS = [True, False, True, True, False, True, True, False, True, False, True, False]  # Top-1: 7 of 12


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """Class folders, crafted outputs, a manifest, and the same ground truth in every label form."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(3)
    wnids = sorted(f"n{v:08d}" for v in rng.choice(10 ** 8, NUM_CLASSES, replace=False))
    devkit_order = rng.permutation(NUM_CLASSES)  # ILSVRC2012_ID i + 1 is wnids[devkit_order[i]]
    truth = rng.integers(0, NUM_CLASSES, N_IMAGES)  # class index (sorted position) of image i + 1
    names = [f"{wnids[c]}/ILSVRC2012_val_{i + 1:08d}.JPEG" for i, c in enumerate(truth)]
    images = root / "val"
    for wnid in wnids:
        (images / wnid).mkdir(parents=True)
    for name in names:
        (images / name).write_bytes(b"")  # never decoded: the outputs are crafted
    write_outputs(root, names, truth)
    forms = root / "forms"
    forms.mkdir()
    (forms / "val_label.txt").write_text("".join(f"{n} {c}\n" for n, c in zip(names, truth)))
    kaggle = forms / "kaggle"
    kaggle.mkdir()
    (kaggle / "LOC_synset_mapping.txt").write_text("".join(f"{w} a made-up class, {i}\n" for i, w in enumerate(wnids)))
    (kaggle / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{wnids[c]} 1 2 30 40 {wnids[c]} 5 6 70 80 \n" for i, c in enumerate(truth)))
    devkit = forms / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    id_of = {int(k): i + 1 for i, k in enumerate(devkit_order)}  # sorted position -> ILSVRC2012_ID
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{id_of[int(c)]}\n" for c in truth))
    write_meta_mat(devkit / "meta.mat", [wnids[k] for k in devkit_order])
    return types.SimpleNamespace(root=root, images=images, wnids=wnids, truth=truth, names=names, forms=forms,
                                 kaggle=kaggle, devkit=devkit)


def write_outputs(root, names, truth):
    """Outputs whose top-1 is the true class exactly where HITS says so, and the manifest naming the rows."""
    out, prep = root / "ais_out", root / "prep"
    out.mkdir()
    prep.mkdir()
    entries = []
    for b in range(0, N_IMAGES, BATCH):
        rows = np.zeros((BATCH, NUM_CLASSES), dtype=np.float32)
        for r in range(BATCH):
            rows[r, (truth[b + r] + (0 if HITS[b + r] else 1)) % NUM_CLASSES] = 5.0
        stem = f"input_{b // BATCH:05d}"
        beit_outputs.write_output(out / beit_outputs.output_file_name(stem, "txt"), rows)
        entries.append({"file": stem + ".bin", "images": names[b:b + BATCH], "real": BATCH})
    manifest = make_manifest(types.SimpleNamespace(batch_size=BATCH, image_path=str(root / "val")), sorted(names),
                             beit_batches.image_set_fingerprint(sorted(names)), entries, [], True)
    beit_batches.save_manifest(prep, manifest)


def write_meta_mat(path, leaves_in_devkit_order):
    """The devkit's meta.mat layout: 1000 leaves (ILSVRC2012_ID 1..1000), then non-leaf synsets."""
    import scipy.io
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "wordnet_height", "num_train_images"]
    rows = [(i + 1, w, f"class {i}", "a gloss", 0, 0, 1300) for i, w in enumerate(leaves_in_devkit_order)]
    rows += [(1001 + i, f"n9{i:07d}", "a parent", "a gloss", 3, 1, 0) for i in range(5)]
    synsets = np.empty((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    scipy.io.savemat(str(path), {"synsets": synsets})


def evaluate(imagenet, tmp_path, capsys, *label_args):
    """(Top-1 %, the 'labels:' line) of beit_eval_acc.py with these label arguments."""
    argv = ["--folder_davinci_target", str(imagenet.root / "ais_out"), "--result_json_path", str(tmp_path),
            "--json_file_name", "acc.json", "--prep_image", str(imagenet.root / "prep"), *label_args]
    rc = beit_eval_acc.main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    with open(tmp_path / "acc.json") as f:
        result = json.load(f)
    line = [text for text in out.splitlines() if text.startswith("labels: ")]
    # The guide's entry {"key": "Top1 accuracy", "value": "58.33%"}, in the guide's JSON shape.
    top1 = next(float(e["value"].rstrip("%")) for e in result["value"] if e["key"] == "Top1 accuracy")
    return top1, (line or [""])[0]


EXPECTED_TOP1 = round(100.0 * sum(HITS) / N_IMAGES, 2)


@pytest.mark.parametrize("form", ["val_label", "folder", "no_label_file", "kaggle", "devkit", "mapping_txt",
                                  "mapping_mat"])
def test_every_form_scores_as_val_label(form, imagenet, tmp_path, capsys):
    args = {"val_label": ["--annotation_file_path", str(imagenet.forms / "val_label.txt")],
            "folder": ["--annotation_file_path", str(imagenet.images)],
            "no_label_file": [],
            "kaggle": ["--annotation_file_path", str(imagenet.kaggle / "LOC_val_solution.csv")],
            "devkit": ["--annotation_file_path", str(imagenet.devkit / "ILSVRC2012_validation_ground_truth.txt")],
            "mapping_txt": ["--annotation_file_path", str(imagenet.kaggle / "LOC_synset_mapping.txt")],
            "mapping_mat": ["--annotation_file_path", str(imagenet.devkit / "meta.mat")]}[form]
    top1, line = evaluate(imagenet, tmp_path, capsys, *args)
    assert top1 == EXPECTED_TOP1
    expected_line = {"val_label": "", "folder": "class index = position of the folder among its 1000 sorted",
                     "no_label_file": f"from the class folders of {imagenet.images}",
                     "kaggle": "read as Kaggle's LOC_val_solution.csv (12 images, the synset of each image's boxes), "
                               "class indices from LOC_synset_mapping.txt (line i is class i)",
                     "devkit": "read as the devkit's ground truth (12 images, line i is ILSVRC2012_val_i), "
                               "ILSVRC2012_IDs mapped to class indices by meta.mat (sorted synsets)",
                     "mapping_txt": "from the class folders, class indices from LOC_synset_mapping.txt",
                     "mapping_mat": "from the class folders, class indices from meta.mat (sorted synsets)"}[form]
    assert expected_line in line if expected_line else line == ""


def test_devkit_ids_are_not_class_indices(imagenet):
    """The control: the ground truth's numbers minus one, read as class indices, would be wrong labels."""
    ids = [int(x) for x in (imagenet.devkit / "ILSVRC2012_validation_ground_truth.txt").read_text().split()]
    assert sum(i - 1 == c for i, c in zip(ids, imagenet.truth)) <= 1
    found = labels.read_labels(imagenet.devkit / "ILSVRC2012_validation_ground_truth.txt").match(
        [os.path.basename(n) for n in imagenet.names])
    assert list(found.values()) == list(imagenet.truth)


@pytest.fixture
def subset(imagenet, tmp_path):
    """The same images with only their own class folders: a subset of the 1000 synsets."""
    folder = tmp_path / "subset"
    for name in imagenet.names:
        (folder / os.path.dirname(name)).mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


def test_subset_of_class_folders_is_refused_then_read_with_a_mapping(imagenet, subset, tmp_path, capsys):
    argv = ["--folder_davinci_target", str(imagenet.root / "ais_out"), "--result_json_path", str(tmp_path / "r"),
            "--json_file_name", "acc.json", "--prep_image", str(imagenet.root / "prep"), "--annotation_file_path",
            str(subset)]
    assert beit_eval_acc.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{subset}: no label file and {len(set(imagenet.truth))} class folders, not all 1000 synsets" in err
    assert "a subset of class folders cannot tell it; give the synset mapping (LOC_synset_mapping.txt" in err
    assert not (tmp_path / "r").exists()
    mapping = str(imagenet.kaggle / "LOC_synset_mapping.txt")
    assert beit_eval_acc.main(argv + ["--synset_mapping", mapping]) == 0
    assert "class indices from LOC_synset_mapping.txt" in capsys.readouterr().out


@pytest.mark.parametrize("case,message", [
    ("csv_alone", "Kaggle's LOC_val_solution.csv: it names synsets, not class indices; the synset mapping is missing: "
                  "put LOC_synset_mapping.txt beside it or give --synset_mapping FILE"),
    ("devkit_alone", "the devkit's ground truth: its ILSVRC2012_IDs are in the devkit's own class order, not the "
                     "models' sorted order; the synset mapping is missing: put meta.mat beside it"),
    ("devkit_with_txt_mapping", "the devkit's ground truth needs the devkit's meta.mat (its ILSVRC2012_ID order)"),
    ("short_mapping", "lists 999 synsets, but the model has 1000 classes"),
    ("mixed_boxes", ":2: ILSVRC2012_val_00000001 has boxes of several synsets"),
])
def test_refusals_name_the_missing_piece(case, message, imagenet, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    mapping = None
    if case == "csv_alone":
        path = lone / "LOC_val_solution.csv"
        path.write_text((imagenet.kaggle / "LOC_val_solution.csv").read_text())
    elif case.startswith("devkit"):
        path = lone / "ILSVRC2012_validation_ground_truth.txt"
        path.write_text((imagenet.devkit / "ILSVRC2012_validation_ground_truth.txt").read_text())
        mapping = str(imagenet.kaggle / "LOC_synset_mapping.txt") if case.endswith("txt_mapping") else None
    elif case == "short_mapping":
        path = lone / "LOC_synset_mapping.txt"
        path.write_text("".join((imagenet.kaggle / "LOC_synset_mapping.txt").read_text().splitlines(True)[:999]))
    else:
        path = lone / "LOC_val_solution.csv"
        path.write_text(f"ImageId,PredictionString\nILSVRC2012_val_00000001,{imagenet.wnids[0]} 1 2 3 4 "
                        f"{imagenet.wnids[1]} 1 2 3 4\n")
        mapping = str(imagenet.kaggle / "LOC_synset_mapping.txt")
    with pytest.raises(labels.PipelineFileError) as caught:
        labels.read_labels(path, synset_mapping=mapping)
    assert message in str(caught.value) and str(path) in str(caught.value)


@pytest.mark.parametrize("first_lines,form", [
    ("ILSVRC2012_val_00000001.JPEG 65\n", label_formats.GUIDE),
    ("n01440764/ILSVRC2012_val_00000293.JPEG 0\n", label_formats.GUIDE),  # a synset folder, then a label
    ("my photo.jpg 3\n", label_formats.GUIDE),
    ("\ufeffImageId,PredictionString\r\nILSVRC2012_val_00008726,n02119789 255 142 454 329\r\n", label_formats.KAGGLE_CSV),
    ("65\n970\n230\n", label_formats.DEVKIT),
    ("n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n", label_formats.MAPPING),
    ("n01440764\nn01443537\n", label_formats.MAPPING),
    ("n01440764 0\n", label_formats.GUIDE),  # an image named n01440764 of class 0
])
def test_forms_are_told_apart_by_content(first_lines, form, tmp_path):
    path = tmp_path / "labels.any"
    path.write_text(first_lines, encoding="utf-8")
    assert label_formats.detect(str(path)) == form


def test_guide_rule_without_manifest_refuses_class_folders(imagenet, tmp_path, capsys):
    rc = beit_eval_acc.main(["--folder_davinci_target", str(imagenet.root / "ais_out"), "--result_json_path",
                             str(tmp_path), "--json_file_name", "acc.json", "--batch_size", str(BATCH),
                             "--annotation_file_path", str(imagenet.images)])
    err = capsys.readouterr().err
    assert rc == 1 and "labels from class folders name images by their folder: pass --prep_image" in err


def test_run_all_takes_class_folders_without_a_label_file(imagenet, tmp_path):
    """run_all.sh: no --label_file means the class sub-folders of --image_path (sourced: no step runs)."""
    import subprocess
    from helpers import REPO
    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"")
    script = ('source "$1"; parse_args --batch_size 1 --image_path "$2" --checkpoint "$3"; '
              'printf "%s\\n" "${LABEL_FILE}"')
    proc = subprocess.run(["bash", "-c", script, "bash", os.path.join(REPO, "run_all.sh"), str(imagenet.images),
                           str(checkpoint)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(imagenet.images)


def test_run_all_refuses_a_subset_of_class_folders_before_any_step(subset, tmp_path):
    from helpers import run_script
    checkpoint = tmp_path / "ckpt.pth"
    checkpoint.write_bytes(b"")
    proc = run_script(["run_all.sh", "--batch_size", "4", "--image_path", str(subset), "--checkpoint",
                       str(checkpoint), "--workdir", str(tmp_path / "work"), "--backend", "ort"])
    assert proc.returncode == 1
    assert "a subset of class folders cannot tell it; give the synset mapping" in proc.stderr
    assert "step " not in proc.stdout and not (tmp_path / "work").exists()
