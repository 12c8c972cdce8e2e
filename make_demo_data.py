"""The built-in demo's inputs: what run_all.sh feeds the pipeline when no ImageNet is given.

    [make_demo_data.py] -> beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py
    -> atc + ais_bench | beit_infer.py -> beit_eval_acc.py

Writes, seeded and once (a complete demo folder is left alone unless --force)::

    OUT/images/ILSVRC2012_val_00000001.JPEG ...  synthetic images of awkward sizes and every PIL
                                                 mode, some PNGs under a .JPEG name
    OUT/random_checkpoint.pth                    a randomly initialised BEiT in the real unilm
                                                 format ({'model': state_dict})
    OUT/val_label.txt                            'ILSVRC2012_val_00000001.JPEG 65' lines: the
                                                 PyTorch model's own predictions on the images as
                                                 beit_preprocess.py prepares them
    OUT/demo.json                                written last: the recipe and the label margins

So the demo's Top-1 measures how faithfully the exported pipeline reproduces
PyTorch (100% expected), not ImageNet accuracy.  The default image count (28) is
not a multiple of 8 or 16, so the last batch is padded at batch sizes 8 and 16.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from tqdm import tqdm

import beit_io
import beit_model
import synthetic_data
# The labels must come from the pipeline's own transform, not a look-alike.
from beit_preprocess import preprocess_image

DEMO_FORMAT = 1
DEFAULT_COUNT = 28
IMAGES_DIR = "images"
CHECKPOINT_NAME = "random_checkpoint.pth"
LABELS_NAME = "val_label.txt"
RECORD_NAME = "demo.json"
TMP_IMAGES_PREFIX = "." + IMAGES_DIR + "."  # write_images()'s temporary folder: .images.XXXX.tmp
TMP_SUFFIX = ".tmp"


def recipe(model, count, seed):
    """What the demo folder is made from; a folder with another recipe is remade."""
    return {"format": DEMO_FORMAT, "model": model, "count": count, "seed": seed}


def is_complete(out, wanted):
    """True when OUT holds a finished demo made from the recipe ``wanted``."""
    try:
        with open(os.path.join(out, RECORD_NAME), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or any(record.get(k) != v for k, v in wanted.items()):
        return False
    images = os.path.join(out, IMAGES_DIR)
    return (os.path.isfile(os.path.join(out, CHECKPOINT_NAME)) and os.path.isfile(os.path.join(out, LABELS_NAME))
            and os.path.isdir(images) and len(os.listdir(images)) == wanted["count"])


def remove_stale_image_folders(out):
    """Delete the '.images.XXXX.tmp' folders that a killed write_images() left in OUT.

    beit_io.remove_stale_temporaries() removes only the files of interrupted atomic writes.
    """
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name.startswith(TMP_IMAGES_PREFIX) and name.endswith(TMP_SUFFIX) and os.path.isdir(path) \
                and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)


def write_images(out, count, seed):
    """Write the images into a fresh folder, then put it in place whole."""
    final = os.path.join(out, IMAGES_DIR)
    tmp = tempfile.mkdtemp(prefix=TMP_IMAGES_PREFIX, suffix=TMP_SUFFIX, dir=out)
    try:
        names = synthetic_data.write_image_set(tmp, count, seed=seed)
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [os.path.join(final, n) for n in names]


def predict(model, paths, batch_size=8):
    """PyTorch logits (len(paths), classes) for the images, preprocessed as the pipeline does."""
    logits = []
    with torch.inference_mode():
        for start in tqdm(range(0, len(paths), batch_size), desc="PyTorch labels", unit="batch", file=sys.stderr):
            batch = np.stack([np.asarray(preprocess_image(p), dtype=np.float32)
                              for p in paths[start:start + batch_size]])
            logits.append(model(torch.from_numpy(batch)).float().numpy())
    return np.concatenate(logits)


def top1_margins(logits):
    """Gap between the two highest logits of each row: how far a label is from flipping."""
    top2 = np.sort(logits, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def make_demo(out, model_name, count, seed):
    """Write the whole demo folder; returns the record written to demo.json."""
    os.makedirs(out, exist_ok=True)
    beit_io.remove_stale_temporaries(out)
    remove_stale_image_folders(out)
    # A changed recipe must never leave a stale record next to new files.
    record_path = os.path.join(out, RECORD_NAME)
    if os.path.exists(record_path):
        os.unlink(record_path)

    ckpt_path = os.path.join(out, CHECKPOINT_NAME)
    beit_model.save_random_checkpoint(ckpt_path, model_name, seed=seed)  # random_checkpoint(), atomically

    paths = write_images(out, count, seed)
    # Built from the saved file, as beit_pth2onnx.py builds it, so both start from the same tensors.
    model, _, _ = beit_model.build_model(beit_model.load_state_dict(ckpt_path), model_name)
    logits = predict(model, paths)
    labels = logits.argmax(axis=1)
    lines = [f"{os.path.basename(p)} {int(label)}\n" for p, label in zip(paths, labels)]
    beit_io.write_text_atomic(os.path.join(out, LABELS_NAME), "".join(lines))

    margins = top1_margins(logits)
    record = dict(recipe(model_name, count, seed),
                  images=IMAGES_DIR, checkpoint=CHECKPOINT_NAME, labels=LABELS_NAME,
                  labels_from="PyTorch predictions of the checkpoint (fp32) on beit_preprocess.py's input",
                  distinct_labels=int(len(set(labels.tolist()))),
                  min_top1_margin=float(margins.min()), median_top1_margin=float(np.median(margins)))
    beit_io.write_json_atomic(record_path, record)
    return record


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Make the built-in demo's inputs for run_all.sh: synthetic images, a random BEiT checkpoint "
                    "in the unilm format and labels that are PyTorch's own predictions.")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="demo folder to write (run_all.sh uses WORKDIR/demo)")
    parser.add_argument("--model", default="beit_base_patch16_224", metavar="NAME",
                        choices=sorted(beit_model.KNOWN_VARIANTS),
                        help="BEiT variant of the random checkpoint: one that takes 224x224 images, "
                             "as the pipeline does (default: %(default)s; beit_tiny_test_patch16_224 for fast "
                             "tests)")
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT, metavar="N",
                        help="number of images (default: %(default)s, not a multiple of 8 or 16 so that "
                             "the last batch is padded at batch sizes 8 and 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and weights (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="remake the demo even when it is complete")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size = beit_model.KNOWN_VARIANTS[args.model][3]
    if size != beit_io.IMAGE_SIZE:
        print(f"error: --model {args.model} takes {size}px input; the pipeline is "
              f"{beit_io.IMAGE_SIZE}px", file=sys.stderr)
        return 2
    if args.count < 1:
        print(f"error: --count must be at least 1, got {args.count}", file=sys.stderr)
        return 2
    wanted = recipe(args.model, args.count, args.seed)
    if not args.force and is_complete(args.out, wanted):
        print(f"skip: {args.out} already holds the demo ({args.count} images, {args.model}, seed {args.seed})")
        return 0
    try:
        record = make_demo(args.out, args.model, args.count, args.seed)
    except (OSError, beit_model.CheckpointError) as exc:
        print(f"error: making the demo in {args.out}: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.count} images, {CHECKPOINT_NAME} ({args.model}, random) and {LABELS_NAME} to {args.out}")
    print(f"labels are PyTorch's own predictions ({record['distinct_labels']} distinct classes; smallest "
          f"top-1 margin {record['min_top1_margin']:.4g}): the demo's Top-1 measures fidelity to PyTorch, "
          "not ImageNet accuracy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
