"""The label file (``val_label.txt``) and the matching of its entries to images.

Lines are ``<image name> <class index>``, split at the LAST whitespace so that a
name may hold spaces (``my photo.jpg 3``).  An entry names an image by its path
relative to ``--image_path`` (``dogs/1.jpg``), by its file name
(``ILSVRC2012_val_00000001.JPEG``) or by its stem (``ILSVRC2012_val_00000001``).
An image is matched by, in this order:

1. its relative path, exactly;
2. its file name, when no other image and no other entry share that file name;
3. its stem, likewise only when unique on both sides.

So ``dogs/1.jpg`` and ``cats/1.jpg`` never share one label silently: they must be
named by their relative paths, and an ambiguous match is an error naming both.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation import label_formats
from beit_pipeline.evaluation.label_file import NUM_CLASSES, LabelFile, normalise_name, stem_of  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

def parse_label_line(line: str) -> tuple[str, str | None] | None:
    """(name, label text) of one line, split at its last whitespace; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    parts = text.rsplit(None, 1)
    if len(parts) != 2:
        return parts[0], None
    return parts[0].strip(), parts[1]


def read_labels(path: str | os.PathLike[str], num_classes: int = NUM_CLASSES,
                synset_mapping: str | None = None) -> LabelFile | label_formats.FolderLabels:
    """Read a label file into a LabelFile; PipelineFileError naming the file and line on any fault.

    Windows line endings, a UTF-8 BOM, trailing blanks and blank lines are
    accepted, and names that are not UTF-8 are kept byte for byte; a name listed twice, a label that is not an
    integer in [0, num_classes) or a line without a label is refused.  ImageNet's other
    forms (class folders, a synset mapping, Kaggle's CSV, the devkit's ground
    truth) are told apart by label_formats.detect and read there.
    """
    path = os.fspath(path)
    # Issue 21: the other label forms (dispatch only; the guide's format is read below).
    try:
        form = label_formats.detect(path)
    except OSError:
        form = label_formats.GUIDE  # the messages below name the problem
    if form != label_formats.GUIDE:
        return label_formats.read(path, form, num_classes, synset_mapping)
    try:
        # Bytes that are not UTF-8 are surrogate-escaped, as os.listdir does with file names: an image whose
        # name is not UTF-8 matches the entry written with the same bytes.
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline=None) as f:
            lines = f.read().splitlines()
    except FileNotFoundError as exc:
        raise PipelineFileError(f"{path}: label file not found") from exc
    except IsADirectoryError as exc:
        raise PipelineFileError(f"{path}: is a folder, not a label file") from exc
    except OSError as exc:
        raise PipelineFileError(f"{path}: cannot read the label file ({exc.strerror or exc})") from exc
    entries, where = {}, {}
    for lineno, line in enumerate(lines, 1):
        parsed = parse_label_line(line)
        if parsed is None:
            continue
        name, label = parsed
        if label is None:
            raise PipelineFileError(f"{path}:{lineno}: expected 'IMAGE_NAME LABEL', got {line.strip()!r}")
        try:
            value = int(label)
        except ValueError as exc:
            raise PipelineFileError(f"{path}:{lineno}: label {label!r} is not an integer") from exc
        if not 0 <= value < num_classes:
            raise PipelineFileError(f"{path}:{lineno}: label {value} is outside [0, {num_classes})")
        key = normalise_name(name)
        if key in entries:
            raise PipelineFileError(f"{path}:{lineno}: image {name} is listed twice (first on line {where[key]})")
        entries[key], where[key] = value, lineno
    if not entries:
        raise PipelineFileError(f"{path}: label file has no labels")
    return LabelFile(path=path, entries=entries, lines=where)


def image_key(name: str) -> str:
    """An image's name without folder and extension (the guide's generated names are stems)."""
    return stem_of(normalise_name(name))


# ---------------------------------------------------------------- run_all.sh's check before the first step

def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m beit_pipeline.evaluation.labels",
                                     description="Read labels as beit_eval_acc.py will, and say how (run_all.sh "
                                                 "runs this before its first step).")
    parser.add_argument("labels", help="a label file in any form, or a folder of class sub-folders")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes of the model (default 1000)")
    parser.add_argument("--synset_mapping", default=None,
                        help="LOC_synset_mapping.txt or meta.mat, where it is not beside the label file")
    return parser


def check(args: argparse.Namespace) -> None:
    found = read_labels(args.labels, args.num_classes, args.synset_mapping)
    if isinstance(found, LabelFile) and label_formats.detect(args.labels) == label_formats.GUIDE:
        log.info(f"labels: {args.labels}: {len(found.entries)} images in the guide's val_label.txt form")


def main(argv: list[str] | None = None) -> int:
    from beit_pipeline import cli

    return cli.run_main(build_parser(), check, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
