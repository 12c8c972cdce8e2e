"""ImageNet's other label forms, read into the LabelFile (label_file.py) of the guide's val_label.txt (labels.py).

The model's class index is the position of the image's synset (n01440764 ...) among the 1000 ImageNet-1k
synsets in sorted order (torchvision's ImageFolder, timm and unilm train with it).  The forms:

- **class sub-folders, no label file**: the image folder itself (or nothing: beit_eval_acc.py takes the
  manifest's image folder).  As torchvision's datasets/folder.py find_classes: the class index is the
  position of the folder in the sorted list of sub-folders (hidden ones left out), so it holds only when all
  1000 synset folders are there; a subset cannot tell the index and is refused unless a synset mapping
  is given (as the label file, or ``synset_mapping``).
- **a synset mapping as the label file** (LOC_synset_mapping.txt or the devkit's meta.mat): labels from the
  images' class folders, indexed by that mapping (a subset of class folders works).
- **Kaggle's LOC_val_solution.csv** (``ImageId,PredictionString``: the synset of every box, then its
  corners), with LOC_synset_mapping.txt (``n01440764 tench, Tinca tinca``; line i is class i) beside it
  or given as ``synset_mapping``.
- **the devkit's ILSVRC2012_validation_ground_truth.txt** (line i: the ILSVRC2012_ID, 1-based in the
  devkit's own class order, of ILSVRC2012_val_{i:08d}), with the devkit's meta.mat beside it or given:
  ILSVRC2012_ID -> WNID -> sorted position, as torchvision's datasets/imagenet.py parse_devkit_archive
  (parse_meta_mat, parse_val_groundtruth_txt) reads them with scipy.io.loadmat.

Each reader logs one line saying how the labels were read.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
import re
from collections.abc import Mapping, Sequence

from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation.label_file import LabelFile, normalise_name

log = logging.getLogger(__name__)

GUIDE, FOLDERS, MAPPING, KAGGLE_CSV, DEVKIT = "val_label", "class folders", "synset mapping", "kaggle csv", "devkit"
KAGGLE_HEADER = "imageid,predictionstring"
KAGGLE_MAPPING, DEVKIT_META = "LOC_synset_mapping.txt", "meta.mat"
MAT_MAGIC = b"MATLAB 5.0 MAT-file"
WNID = re.compile(r"n\d{8}")


# ---------------------------------------------------------------- which form

def head_lines(path: str, count: int = 50) -> list[str]:
    """The first non-blank lines of a text file, decoded leniently (only for telling the form)."""
    lines = []
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                lines.append(line.strip())
            if len(lines) >= count:
                break
    return lines


def is_synset_line(line: str) -> bool:
    """``n01440764 tench, Tinca tinca`` or ``n01440764``; never ``n01440764/x.JPEG 0`` or ``n01440764 0``,
    which are label lines (an image name, then its class)."""
    parts = line.split()
    return bool(WNID.fullmatch(parts[0])) and not (len(parts) == 2 and re.fullmatch(r"[+-]?\d+", parts[1]))


def detect(path: str) -> str:
    """GUIDE, FOLDERS, MAPPING, KAGGLE_CSV or DEVKIT for a label path (a folder: its class sub-folders)."""
    if os.path.isdir(path):
        return FOLDERS
    with open(path, "rb") as f:
        if f.read(len(MAT_MAGIC)) == MAT_MAGIC:
            return MAPPING
    lines = head_lines(path)
    if not lines:
        return GUIDE  # labels.py says the file is empty
    if lines[0].replace(" ", "").lower() == KAGGLE_HEADER:
        return KAGGLE_CSV
    if all(re.fullmatch(r"\d+", line) for line in lines):
        return DEVKIT
    if all(is_synset_line(line) for line in lines):
        return MAPPING
    return GUIDE


# ---------------------------------------------------------------- synset mappings

@dataclasses.dataclass
class SynsetIndex:
    """{synset: class index}, the devkit's {ILSVRC2012_ID: synset} where known, and where it came from."""

    index: dict
    source: str
    devkit_ids: dict = dataclasses.field(default_factory=dict)


def read_synset_mapping(path: str, num_classes: int) -> SynsetIndex:
    """LOC_synset_mapping.txt (line i is class i) or the devkit's meta.mat (the sorted leaf synsets)."""
    with open(path, "rb") as f:
        is_mat = f.read(len(MAT_MAGIC)) == MAT_MAGIC
    mapping = read_meta_mat(path) if is_mat else read_synset_list(path)
    if len(mapping.index) != num_classes:
        raise PipelineFileError(f"{path}: lists {len(mapping.index)} synsets, but the model has {num_classes} "
                                "classes: a class index is a position among all of them")
    return mapping


def read_synset_list(path: str) -> SynsetIndex:
    index = {}
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            wnid = line.split()[0]
            if not WNID.fullmatch(wnid):
                raise PipelineFileError(f"{path}:{lineno}: expected a synset id such as n01440764, got {wnid!r}")
            if wnid in index:
                raise PipelineFileError(f"{path}:{lineno}: synset {wnid} is listed twice")
            index[wnid] = len(index)
    return SynsetIndex(index, f"{os.path.basename(path)} (line i is class i)")


def read_meta_mat(path: str) -> SynsetIndex:
    """The devkit's meta.mat: ILSVRC2012_ID -> WNID of the leaf synsets (num_children == 0), indexed sorted."""
    import scipy.io

    try:
        synsets = scipy.io.loadmat(path, squeeze_me=True)["synsets"]
        rows = [(int(s["ILSVRC2012_ID"]), str(s["WNID"])) for s in synsets if int(s["num_children"]) == 0]
    except Exception as exc:  # scipy raises many kinds for a file that is not the devkit's
        raise PipelineFileError(f"{path}: not the ImageNet devkit's meta.mat (a 'synsets' struct with "
                                f"ILSVRC2012_ID, WNID, num_children): {type(exc).__name__}: {exc}") from exc
    wnids = sorted(wnid for _, wnid in rows)
    return SynsetIndex({wnid: i for i, wnid in enumerate(wnids)}, f"{os.path.basename(path)} (sorted synsets)",
                       devkit_ids=dict(rows))


def mapping_beside(path: str, name: str, synset_mapping: str | None, what: str, form: str) -> str:
    """The synset mapping given, else ``name`` beside ``path``; a refusal naming the missing piece."""
    found = synset_mapping or os.path.join(os.path.dirname(os.path.abspath(path)), name)
    if not os.path.isfile(found):
        raise PipelineFileError(f"{path}: {form}: {what}; the synset mapping is missing: put {name} beside it "
                                "or give --synset_mapping FILE")
    return found


def mappings_beside(label_path: str) -> list[str]:
    """The synset mappings a label file in another form may read from beside it (LOC_synset_mapping.txt,
    meta.mat), those that exist: run_all.sh keys its eval on them too, so a changed mapping redoes the eval."""
    if os.path.isdir(label_path):  # class folders read no mapping but the one given as the label file
        return []
    folder = os.path.dirname(os.path.abspath(label_path))
    return [path for path in (os.path.join(folder, name) for name in (KAGGLE_MAPPING, DEVKIT_META))
            if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(label_path)]


# ---------------------------------------------------------------- the label forms

def read_kaggle_csv(path: str, num_classes: int, synset_mapping: str | None) -> LabelFile:
    """LOC_val_solution.csv: each image's synset (the first of its boxes; all its boxes share it)."""

    mapping_path = mapping_beside(path, KAGGLE_MAPPING, synset_mapping, "it names synsets, not class indices",
                                  "Kaggle's LOC_val_solution.csv")
    mapping = read_synset_mapping(mapping_path, num_classes)
    entries, lines = {}, {}
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f)
        next(rows)
        for lineno, row in enumerate(rows, 2):
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2 or not row[1].split():
                raise PipelineFileError(f"{path}:{lineno}: expected 'ImageId,PredictionString', got {','.join(row)!r}")
            image, wnids = row[0].strip(), set(row[1].split()[0::5])
            if len(wnids) != 1:
                raise PipelineFileError(f"{path}:{lineno}: {image} has boxes of several synsets "
                                        f"({', '.join(sorted(wnids))}); an ImageNet val image has one class")
            wnid = wnids.pop()
            if wnid not in mapping.index:
                raise PipelineFileError(f"{path}:{lineno}: synset {wnid} is not in {mapping_path}")
            if image in entries:
                raise PipelineFileError(f"{path}:{lineno}: image {image} is listed twice (first on line {lines[image]})")
            entries[image], lines[image] = mapping.index[wnid], lineno
    log.info(f"labels: {os.path.basename(path)} read as Kaggle's LOC_val_solution.csv ({len(entries)} images, "
             f"the synset of each image's boxes), class indices from {mapping.source}")
    return LabelFile(path=path, entries=entries, lines=lines)


def read_devkit(path: str, num_classes: int, synset_mapping: str | None) -> LabelFile:
    """ILSVRC2012_validation_ground_truth.txt: line i is the ILSVRC2012_ID of ILSVRC2012_val_{i:08d}."""

    meta_path = mapping_beside(path, DEVKIT_META, synset_mapping, "its ILSVRC2012_IDs are in the devkit's own "
                               "class order, not the models' sorted order", "the devkit's ground truth")
    mapping = read_synset_mapping(meta_path, num_classes)
    if not mapping.devkit_ids:
        raise PipelineFileError(f"{path}: the devkit's ground truth needs the devkit's meta.mat (its "
                                f"ILSVRC2012_ID order); {meta_path} gives only the sorted synsets")
    entries, lines = {}, {}
    with open(path, encoding="utf-8-sig") as f:
        numbers = [(lineno, line.strip()) for lineno, line in enumerate(f, 1) if line.strip()]
    for image_number, (lineno, text) in enumerate(numbers, 1):
        if not text.isdigit() or int(text) not in mapping.devkit_ids:
            raise PipelineFileError(f"{path}:{lineno}: {text!r} is not an ILSVRC2012_ID of {meta_path}")
        name = f"ILSVRC2012_val_{image_number:08d}"
        entries[name], lines[name] = mapping.index[mapping.devkit_ids[int(text)]], lineno
    log.info(f"labels: {os.path.basename(path)} read as the devkit's ground truth ({len(entries)} images, line i "
             f"is ILSVRC2012_val_i), ILSVRC2012_IDs mapped to class indices by {mapping.source}")
    return LabelFile(path=path, entries=entries, lines=lines)


@dataclasses.dataclass
class FolderLabels:
    """Labels from the images' class folders: ``n01440764/x.JPEG`` has the class of ``n01440764``.

    Duck-types labels.LabelFile's ``match``; the guide's row rule (no manifest) cannot name class folders.
    """

    path: str
    index: dict  # class folder -> class index
    source: str

    @property
    def entries(self) -> dict[str, int]:
        raise PipelineFileError(f"{self.path}: labels from class folders name images by their folder: pass "
                                "--prep_image (beit_preprocess.py's folder) so that rows are matched to images")

    def names(self) -> list:
        return []

    def match(self, image_names: Sequence[str], where: Mapping[str, str] | None = None) -> dict:
        """{image name: class index}; PipelineFileError naming the first image outside a known class folder."""

        result = {}
        for name in image_names:
            parts = normalise_name(name).split("/")
            context = f" ({where[name]})" if where and name in where else ""
            if len(parts) < 2:
                raise PipelineFileError(f"{self.path}: image {name} is not in a class sub-folder, so it has no "
                                        f"label{context}")
            if parts[0] not in self.index:
                raise PipelineFileError(f"{self.path}: the class folder {parts[0]} of image {name} is not in "
                                        f"{self.source}{context}")
            result[name] = self.index[parts[0]]
        return result


def class_folders(folder: str) -> list[str]:
    """As torchvision's find_classes: the sorted sub-folders (hidden ones, such as .ipynb_checkpoints, left out)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def read_class_folders(folder: str, num_classes: int, synset_mapping: str | None) -> FolderLabels:
    """FolderLabels of an image folder of class sub-folders: all synsets sorted, or a mapping given."""
    if synset_mapping:
        return read_mapping_as_labels(synset_mapping, num_classes, folder)
    classes = class_folders(folder)
    if len(classes) != num_classes:
        synsets = sum(bool(WNID.fullmatch(c)) for c in classes)
        what = (f"{len(classes)} class folders, not all {num_classes} synsets" if synsets == len(classes) and classes
                else f"{len(classes)} sub-folders, {synsets} of them synset ids (n01440764 ...)")
        raise PipelineFileError(
            f"{folder}: no label file and {what}: a class index is the position of the synset among all "
            f"{num_classes} sorted synsets, so a subset of class folders cannot tell it; give the synset mapping "
            "(LOC_synset_mapping.txt or the devkit's meta.mat) as the label file, or a label file")
    log.info(f"labels: from the class folders of {folder} (class index = position of the folder among its "
             f"{len(classes)} sorted sub-folders, as torchvision's ImageFolder)")
    return FolderLabels(folder, {c: i for i, c in enumerate(classes)}, f"the {len(classes)} class folders of {folder}")


def read_mapping_as_labels(path: str, num_classes: int, folder: str | None = None) -> FolderLabels:
    """A synset mapping given as the label file: labels from the images' class folders, indexed by it."""
    mapping = read_synset_mapping(path, num_classes)
    where = f"the class folders{f' of {folder}' if folder else ''}"
    log.info(f"labels: from {where}, class indices from {mapping.source}")
    return FolderLabels(path, mapping.index, path)


def read(path: str, form: str, num_classes: int, synset_mapping: str | None = None) -> LabelFile | FolderLabels:
    """The labels of a non-guide form (detect()); labels.read_labels dispatches here."""
    try:
        if form == FOLDERS:
            return read_class_folders(path, num_classes, synset_mapping)
        if form == MAPPING:
            return read_mapping_as_labels(path, num_classes)
        if form == KAGGLE_CSV:
            return read_kaggle_csv(path, num_classes, synset_mapping)
        return read_devkit(path, num_classes, synset_mapping)
    except UnicodeDecodeError as exc:
        raise PipelineFileError(f"{path}: not UTF-8 text ({exc})") from exc
