"""Many distinct real-photograph images from scikit-image's ~20 bundled photographs: crops, scales, flips.

The fidelity benchmark (beit_fidelity_bench.py) needs hundreds of real photographs and the
machine has no ImageNet.  Each image written here is one bundled photograph (photos.PHOTOS)
cut to a seeded random crop (35% to 100% of each side, at a random place), scaled to a random
ImageNet-like size (its longer side 200 to 500 px, bicubic), flipped left-right half the time,
and saved as an RGB (or, for the grey photographs, greyscale) quality-90 JPEG named
``ILSVRC2012_val_%08d.JPEG``.  So the images are real photographic content, each a different random view, but
they are views of only ~20 scenes: they are
not a substitute for ImageNet's variety, and a random model's margins on them say nothing
about a trained model's.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from beit_pipeline import files
from beit_pipeline.data import photos

MIN_CROP, MAX_SIDE_RANGE = 0.35, (200, 500)


def _sources():
    """[(file name, PIL image loaded, mode to save)] of the bundled photographs."""
    found = []
    for photo in photos.PHOTOS:
        with Image.open(os.path.join(photos.data_dir(), photo.file)) as img:
            img.load()
            grey = img.mode in ("L", "I", "I;16", "1") or photo.mode == "L"
            found.append((photo.file, img.convert("L" if grey else "RGB"), "L" if grey else "RGB"))
    return found


def variant(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One seeded crop, scale and (maybe) left-right flip of ``image``."""
    width, height = image.size
    cw = max(16, int(width * rng.uniform(MIN_CROP, 1.0)))
    ch = max(16, int(height * rng.uniform(MIN_CROP, 1.0)))
    left, top = int(rng.integers(0, width - cw + 1)), int(rng.integers(0, height - ch + 1))
    crop = image.crop((left, top, left + cw, top + ch))
    side = int(rng.integers(MAX_SIDE_RANGE[0], MAX_SIDE_RANGE[1] + 1))
    scale = side / max(cw, ch)
    crop = crop.resize((max(8, round(cw * scale)), max(8, round(ch * scale))), Image.Resampling.BICUBIC)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def write_variants(folder: str | os.PathLike[str], count: int, seed: int = 0) -> list[str]:
    """Write ``count`` distinct variants into ``folder``, cycling through the photographs; returns their names."""
    sources, rng = _sources(), np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    names = []
    for index in range(count):
        _, image, mode = sources[index % len(sources)]
        buf = io.BytesIO()
        variant(image, rng).convert(mode).save(buf, "JPEG", quality=photos.JPEG_QUALITY)
        names.append(photos.image_name(index))
        files.write_bytes_atomic(os.path.join(folder, names[-1]), buf.getvalue())
    return names
