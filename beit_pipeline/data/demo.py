"""The built-in demo's inputs: what run_all.sh feeds the pipeline when no ImageNet is given.

A demo folder holds, written seeded and once::

    images/ILSVRC2012_val_00000001.JPEG ...  real photographs (scikit-image's bundled data, as
                                             photos.py writes them: grey, CMYK and a PNG among
                                             them), or synthetic images of awkward sizes and
                                             every PIL mode (``images="synthetic"``)
    random_checkpoint.pth                    a randomly initialised BEiT in the real unilm
                                             format ({'model': state_dict})
    val_label.txt                            'ILSVRC2012_val_00000001.JPEG 65' lines: the
                                             PyTorch model's own predictions on the images as
                                             the pipeline preprocesses them
    demo.json                                written last: the recipe and the label margins

The photographs are real, the model is not: a randomly initialised BEiT has no
ImageNet accuracy, so the labels stay the PyTorch model's own predictions and the
demo's Top-1 measures how faithfully the exported pipeline reproduces PyTorch
(100% expected), not ImageNet accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from beit_pipeline import files, progress  # progress: plain lines when stderr is a log (issue 21)
from beit_pipeline.data import photos, synthetic
from beit_pipeline.model import build as beit_model
from beit_pipeline.model.variants import image_size
from beit_pipeline.pipeline import chain

# The labels must come from the pipeline's own transform, not a look-alike.
from beit_pipeline.preprocess.transform import preprocess_image, use_image_size

DEMO_FORMAT = 1
DEFAULT_COUNT = 28  # synthetic images; the photographs are all of photos.PHOTOS by default
IMAGE_KINDS = ("photos", "synthetic")
IMAGES_DIR, LABELS_NAME, CHECKPOINT_NAME = chain.DEMO_IMAGES, chain.DEMO_LABELS, chain.DEMO_CHECKPOINT
RECORD_NAME = chain.DEMO_RECORD
TMP_IMAGES_PREFIX = "." + IMAGES_DIR + "."  # write_images()'s temporary folder: .images.XXXX.tmp
TMP_SUFFIX = ".tmp"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a demo folder is made from; a folder with another recipe is remade."""

    model: str
    count: int
    seed: int
    images: str = "photos"

    def as_record(self) -> dict[str, Any]:
        return {"format": DEMO_FORMAT, "model": self.model, "count": self.count, "seed": self.seed,
                "images_from": self.images}


def default_count(images: str) -> int:
    return len(photos.PHOTOS) if images == "photos" else DEFAULT_COUNT


def recipe(model: str, count: int, seed: int, images: str = "photos") -> dict[str, Any]:
    """The recipe as demo.json records it (a dict: the file's format is unchanged)."""
    return Recipe(model, count, seed, images).as_record()


def is_complete(out: str, wanted: Mapping[str, Any]) -> bool:
    """True when OUT holds a finished demo made from the recipe ``wanted`` (a recipe() dict)."""
    record = files.read_json(os.path.join(out, RECORD_NAME))
    if record is None or any(record.get(k) != v for k, v in wanted.items()):
        return False
    images = os.path.join(out, IMAGES_DIR)
    return (os.path.isfile(os.path.join(out, CHECKPOINT_NAME)) and os.path.isfile(os.path.join(out, LABELS_NAME))
            and os.path.isdir(images) and len(os.listdir(images)) == wanted["count"])


def remove_stale_image_folders(out: str) -> None:
    """Delete the '.images.XXXX.tmp' folders that a killed write_images() left in OUT.

    files.remove_stale_temporaries() removes only the files of interrupted atomic writes.
    """
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith(TMP_IMAGES_PREFIX) and name.endswith(TMP_SUFFIX) and os.path.isdir(path) \
                and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def write_images(out: str, count: int, seed: int, images: str = "photos") -> list[str]:
    """Write the images into a fresh folder, then put it in place whole; returns their paths."""
    final = os.path.join(out, IMAGES_DIR)
    tmp = tempfile.mkdtemp(prefix=TMP_IMAGES_PREFIX, suffix=TMP_SUFFIX, dir=out)
    try:
        if images == "photos":  # their nominal labels are not written: the demo's are PyTorch's
            names = photos.write_photo_set(tmp, count, labels=False)
        else:
            names = synthetic.write_image_set(tmp, count, seed=seed)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:  # Ctrl-C and SIGTERM too: no half-written folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(final, n) for n in names]


def predict(model: torch.nn.Module, paths: Sequence[str], batch_size: int = 8) -> np.ndarray:
    """PyTorch logits (len(paths), classes) for the images, preprocessed as the pipeline does."""
    logits = []
    with torch.inference_mode():
        for start in progress.bar(range(0, len(paths), batch_size), desc="PyTorch labels", unit="batch",
                                  file=sys.stderr):
            batch = np.stack([np.asarray(preprocess_image(p), dtype=np.float32)
                              for p in paths[start:start + batch_size]])
            logits.append(model(torch.from_numpy(batch)).float().numpy())
    return np.concatenate(logits)


def top1_margins(logits: np.ndarray) -> np.ndarray:
    """Gap between the two highest logits of each row: how far a label is from flipping."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def start_demo_folder(out: str) -> None:
    """Create OUT and clear what a killed run left, the old record first."""
    os.makedirs(out, exist_ok=True)
    files.remove_stale_temporaries(out)
    remove_stale_image_folders(out)
    # A changed recipe must never leave a stale record next to new files.
    record_path = os.path.join(out, RECORD_NAME)
    if os.path.exists(record_path):
        os.unlink(record_path)


def write_labels(out: str, paths: Sequence[str], logits: np.ndarray) -> np.ndarray:
    labels = logits.argmax(axis=1)
    lines = [f"{os.path.basename(p)} {int(label)}\n" for p, label in zip(paths, labels)]
    files.write_text_atomic(os.path.join(out, LABELS_NAME), "".join(lines))
    return labels


def make_demo(out: str, model_name: str, count: int, seed: int, images: str = "photos") -> dict[str, Any]:
    """Write the whole demo folder; returns the record written to demo.json."""
    start_demo_folder(out)
    use_image_size(image_size(model_name))  # the labels come from the model's own input size
    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    beit_model.save_random_checkpoint(ckpt_path, model_name, seed=seed)  # random_checkpoint(), atomically
    paths = write_images(out, count, seed, images)
    # Built from the saved file, as beit_pth2onnx.py builds it, so both start from the same tensors.
    model, _, _ = beit_model.build_model(beit_model.load_state_dict(ckpt_path), model_name)
    logits = predict(model, paths)
    labels = write_labels(out, paths, logits)
    margins = top1_margins(logits)
    record = dict(recipe(model_name, count, seed, images),
                  images=IMAGES_DIR, checkpoint=CHECKPOINT_NAME, labels=LABELS_NAME,
                  labels_from="PyTorch predictions of the checkpoint (fp32) on beit_preprocess.py's input",
                  distinct_labels=int(len(set(labels.tolist()))),
                  min_top1_margin=float(margins.min()), median_top1_margin=float(np.median(margins)))
    files.write_json_atomic(os.path.join(out, RECORD_NAME), record)
    return record
