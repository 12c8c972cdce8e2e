"""The entries of a label file, whatever its form: the one record labels.py and label_formats.py both fill.

Kept apart from both so that label_formats.py (the other forms) does not import labels.py (which
dispatches to it): no import circle.
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
from collections.abc import Mapping, Sequence

from beit_pipeline.errors import PipelineFileError

NUM_CLASSES = 1000


def normalise_name(name: str) -> str:
    """A label entry or image name as a relative POSIX path: ``.\\a\\b.jpg`` -> ``a/b.jpg``."""
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def stem_of(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


@dataclasses.dataclass
class LabelFile:
    """The entries of a label file, in file order, and where it came from."""

    path: str
    entries: dict  # normalised name as written -> class index
    lines: dict  # normalised name -> line number, for messages

    def match(self, image_names: Sequence[str], where: Mapping[str, str] | None = None) -> dict[str, int]:
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

    def names(self) -> list[str]:
        return list(self.entries)


class _NoLabel(Exception):
    """Internal: match() adds where the image is used before raising PipelineFileError."""


def _index(entries, key):
    index = collections.defaultdict(list)
    for name in entries:
        index[key(name)].append(name)
    return index
