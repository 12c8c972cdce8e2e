"""A tiny ImageNet-style val set of REAL photographs, made from scikit-image's bundled data.

scikit-image's wheel ships about twenty photographs under permissive licences
(``skimage/data/*.png|jpg``: astronaut, coffee, chelsea, rocket, motorcycle, camera, moon,
coins, hubble_deep_field, ...).  ``write_photo_set`` writes them the way ImageNet's val
folder holds its images: ``ILSVRC2012_val_%08d.JPEG`` names, most of them RGB JPEGs, the
grey photographs as greyscale JPEGs, one CMYK JPEG and one PNG under a .JPEG name (the real
val set has both), with ``val_label.txt`` in the guide's format (``NAME LABEL`` lines).
Nothing is committed: the files are made from the installed package, at test or demo time.

The labels are the ImageNet-1k class each photograph nominally shows (``NOMINAL_CLASS``);
a randomly initialised model has no ImageNet accuracy, so the demo replaces them with the
PyTorch model's own predictions.
"""

from __future__ import annotations

import dataclasses
import io
import os

from PIL import Image

from beit_pipeline import files
from beit_pipeline.errors import PipelineFileError

LABELS_NAME = "val_label.txt"
JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class Photo:
    """One bundled photograph and how it is written: ``mode`` "RGB" | "L" | "CMYK", or "PNG" (a PNG
    under a .JPEG name, as ImageNet val has one), or "copy" (a JPEG file kept byte for byte)."""

    file: str
    label: int  # the ImageNet-1k class it nominally shows
    mode: str


# In name order.  Labels are ImageNet-1k class indices (torchvision's weights meta order); where no
# class fits the photograph, the nearest one, marked so: they make the file's format real, not a score.
PHOTOS = [
    Photo("astronaut.png", 834, "PNG"),           # suit
    Photo("brick.png", 825, "L"),                 # stone wall
    Photo("camera.png", 759, "L"),                # reflex camera
    Photo("cell.png", 971, "L"),                  # bubble
    Photo("chelsea.png", 285, "CMYK"),            # Egyptian cat
    Photo("clock_motion.png", 409, "L"),          # analog clock
    Photo("coffee.png", 967, "RGB"),              # espresso
    Photo("coins.png", 464, "L"),                 # buckle (no coin class: the nearest)
    Photo("grass.png", 984, "L"),                 # rapeseed field
    Photo("gravel.png", 825, "L"),                # stone wall
    Photo("hubble_deep_field.jpg", 971, "copy"),  # bubble (no class for galaxies: the nearest)
    Photo("ihc.png", 971, "RGB"),                 # bubble
    Photo("microaneurysms.png", 971, "L"),        # bubble
    Photo("moon.png", 971, "L"),                  # bubble
    Photo("motorcycle_left.png", 670, "RGB"),     # motor scooter
    Photo("motorcycle_right.png", 670, "RGB"),    # motor scooter
    Photo("page.png", 921, "L"),                  # book jacket
    Photo("retina.jpg", 971, "copy"),             # bubble
    Photo("rocket.jpg", 812, "copy"),             # space shuttle
    Photo("text.png", 919, "L"),                  # street sign
]


def data_dir() -> str:
    """scikit-image's bundled data folder (requirements.txt pins scikit-image)."""
    try:
        import skimage
    except ImportError as exc:
        raise PipelineFileError("the real-photo set needs scikit-image (pip install -r requirements.txt)") from exc
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def image_name(index: int) -> str:
    """ImageNet val's file name of the ``index``-th image (from 0): ILSVRC2012_val_00000001.JPEG ..."""
    return f"ILSVRC2012_val_{index + 1:08d}.JPEG"


def encode(photo: Photo, source: str) -> bytes:
    """The bytes written for ``photo`` read from ``source``."""
    if photo.mode == "copy":
        with open(source, "rb") as f:
            return f.read()
    with Image.open(source) as img:
        img.load()
        buf = io.BytesIO()
        if photo.mode == "PNG":
            img.save(buf, "PNG")
        else:
            # skimage's grey PNGs are "L" already; RGBA photos lose alpha as a JPEG must.
            img.convert(photo.mode).save(buf, "JPEG", quality=JPEG_QUALITY)
        return buf.getvalue()


def write_photo_set(folder: str | os.PathLike[str], count: int | None = None, labels: bool = True) -> list[str]:
    """Write the first ``count`` (default all) photographs into ``folder``; returns their file names.

    With ``labels``, also ``folder/val_label.txt`` with each photo's nominal class.
    """
    chosen = PHOTOS if count is None else PHOTOS[:count]
    if count is not None and not 1 <= count <= len(PHOTOS):
        raise ValueError(f"count must be in [1, {len(PHOTOS)}], got {count}")
    source = data_dir()
    os.makedirs(folder, exist_ok=True)
    names = []
    for i, photo in enumerate(chosen):
        names.append(image_name(i))
        files.write_bytes_atomic(os.path.join(folder, names[-1]), encode(photo, os.path.join(source, photo.file)))
    if labels:
        files.write_text_atomic(os.path.join(folder, LABELS_NAME),
                                "".join(f"{n} {p.label}\n" for n, p in zip(names, chosen)))
    return names
