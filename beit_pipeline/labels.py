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

import collections
import dataclasses
import os
import posixpath

from beit_pipeline import label_formats
from beit_pipeline.errors import PipelineFileError

NUM_CLASSES = 1000


def normalise_name(name):
    """A label entry or image name as a relative POSIX path: ``.\\a\\b.jpg`` -> ``a/b.jpg``."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def stem_of(name):
    return posixpath.splitext(posixpath.basename(name))[0]


@dataclasses.dataclass
class LabelFile:
    """The entries of a label file, in file order, and where it came from."""

    path: str
    entries: dict  # normalised name as written -> class index
    lines: dict  # normalised name -> line number, for messages

    def match(self, image_names, where=None):
        """{image name: class index} for every image; PipelineFileError naming the first problem.

        ``image_names`` are the relative names beit_preprocess.py records in its
        manifest (or the guide's generated stems).  An image without a label, or one
        that matches only ambiguously, is an error: a silent guess would change Top-1.
        ``where`` (optional) maps an image name to where it is used (``row of X``),
        added to the message about a missing label.
        """
        by_base = _index(self.entries, posixpath.basename)
        by_stem = _index(self.entries, stem_of)
        normalised = [normalise_name(n) for n in image_names]
        image_base = _index(normalised, posixpath.basename)
        image_stem = _index(normalised, stem_of)
        result = {}
        for name in image_names:
            try:
                result[name] = self._label_of(normalise_name(name), by_base, by_stem, image_base, image_stem)
            except _NoLabel as exc:
                context = f" ({where[name]})" if where and name in where else ""
                raise PipelineFileError(f"{exc}{context}") from None
        return result

    def _label_of(self, name, by_base, by_stem, image_base, image_stem):
        if name in self.entries:
            return self.entries[name]
        for key, index, images in ((posixpath.basename(name), by_base, image_base),
                                   (stem_of(name), by_stem, image_stem)):
            candidates = index.get(key, [])
            if len(candidates) == 1 and len(images[key]) == 1:
                return self.entries[candidates[0]]
            if len(candidates) > 1 or (candidates and len(images[key]) > 1):
                shown = ", ".join(f"'{c}' (line {self.lines[c]})" for c in candidates[:3])
                sharing = ("several entries share" if len(candidates) > 1 else
                           f"the images {', '.join(sorted(images[key])[:5])} share")
                raise PipelineFileError(
                    f"{self.path}: image {name} matches {shown} only by '{key}', which {sharing}; name the "
                    "images by their path relative to --image_path in the label file (e.g. 'dogs/1.jpg 3')")
        raise _NoLabel(f"{self.path}: no label for image {name}")

    def names(self):
        return list(self.entries)


class _NoLabel(Exception):
    """Internal: match() adds where the image is used before raising PipelineFileError."""


def _index(entries, key):
    index = collections.defaultdict(list)
    for name in entries:
        index[key(name)].append(name)
    return index


def parse_label_line(line):
    """(name, label text) of one line, split at its last whitespace; None for a blank line."""
    text = line.strip()
    if not text:
        return None
    parts = text.rsplit(None, 1)
    if len(parts) != 2:
        return parts[0], None
    return parts[0].strip(), parts[1]


def read_labels(path, num_classes=NUM_CLASSES, synset_mapping=None):
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


def image_key(name):
    """An image's name without folder and extension (the guide's generated names are stems)."""
    return stem_of(normalise_name(name))
