"""unilm's fine-tuned classifiers through run_all.sh (issue 11).

unilm's beit/README.md lists beit_{base,large}_patch16_{224,384}_pt22k_ft22kto1k.pth and
beit_large_patch16_512_pt22k_ft22kto1k.pth; its eval transform (beit/datasets.py, build_transform)
is Resize(int(size / (224/256))) + CenterCrop(size) below 384 px and Resize(size) + CenterCrop(size)
from 384 up.  The fast test of the same path is test_run_all.py's tiny 384-px model; base-384 is slow
(a random checkpoint of 350 MB) and marked so, as is large-512, whose models are written with external
data past protobuf's 2 GiB (onnx_files).
"""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from beit_pipeline.model import build as beit_model
from beit_pipeline.data import photos
from beit_pipeline.preprocess.transform import reference_transform
from beit_pipeline.model.variants import KNOWN_VARIANTS, PUBLISHED_CHECKPOINTS, image_size, token_count
from helpers import run_script


def test_every_published_checkpoint_has_a_variant():
    assert set(PUBLISHED_CHECKPOINTS) == {n for n in KNOWN_VARIANTS if "tiny_test" not in n}
    assert {n: image_size(n) for n in PUBLISHED_CHECKPOINTS} == {
        "beit_base_patch16_224": 224, "beit_base_patch16_384": 384, "beit_large_patch16_224": 224,
        "beit_large_patch16_384": 384, "beit_large_patch16_512": 512}
    # graph_modify pads to the next multiple of 16: 197 -> 208, 577 -> 592, 1025 -> 1040.
    assert [token_count(s) for s in (224, 384, 512)] == [197, 577, 1025]
    assert [-(-token_count(s) // 16) * 16 for s in (224, 384, 512)] == [208, 592, 1040]


def labelled_photos(tmp_path, variant, count):
    """``count`` photographs, a random ``variant`` checkpoint and labels = PyTorch's top-1 on torchvision's
    unilm transform for the variant's size (an independent reference for the whole pipeline)."""
    images, checkpoint = tmp_path / "val", tmp_path / f"{variant}.pth"
    names = photos.write_photo_set(images, count, labels=False)
    beit_model.save_random_checkpoint(checkpoint, variant, seed=1)
    model, _, _ = beit_model.build_model(beit_model.load_state_dict(checkpoint), variant)
    transform = reference_transform(image_size(variant))
    with torch.inference_mode():
        batch = torch.stack([transform(Image.open(images / n).convert("RGB")) for n in names])
        top1 = model(batch).numpy().argmax(axis=1)
    del model
    labels = tmp_path / "val_label.txt"
    labels.write_text("".join(f"{n} {int(c)}\n" for n, c in zip(names, top1)))
    return images, labels, checkpoint


@pytest.mark.slow
def test_large_512_runs_through_run_all(tmp_path):
    """beit_large_patch16_512: 2.9 GB once padded, past protobuf's 2 GiB (refused before issue 11's external
    data).  The export folds (52 s here), beit_pipeline.graph.simplify holds the weights out of onnxsim (21 s,
    7 GB; onnxsim itself was killed at 24 GB), graph_modify pads 1025 -> 1040 and writes beit_mg_bs1.onnx
    + .data, ONNX Runtime runs it: Top-1 is PyTorch's agreement with its own labels (100%)."""
    images, labels, checkpoint = labelled_photos(tmp_path, "beit_large_patch16_512", 2)
    workdir = tmp_path / "work"
    proc = run_script(["run_all.sh", "--batch_size", "1", "--workdir", str(workdir), "--backend", "ort",
                       "--image_path", str(images), "--label_file", str(labels), "--checkpoint", str(checkpoint),
                       "--no_fidelity"], timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tokens 1025 -> 1040 at batch size 1" in proc.stdout
    assert ("[run_all] step onnxsim: python3 -m beit_pipeline.progress --label onnxsim -- "
            "python3 -m beit_pipeline.graph.simplify ") in proc.stdout
    for name in ("beit_large_patch16_512.onnx", "beit_onnxsim_bs1.onnx", "beit_mg_bs1.onnx"):
        assert os.path.getsize(workdir / (name + ".data")) > 2 ** 31, name  # over protobuf's limit
        assert os.path.getsize(workdir / name) < 2 ** 20, name  # the graph alone
    assert not list(workdir.glob("*.partial*")) and not list(workdir.glob(".*.tmp"))
    acc = json.loads((workdir / "acc_bs1_details.json").read_text())
    assert (acc["num_images"], acc["top1"]) == (2, 100.0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["beit_base_patch16_384"])
def test_published_size_runs_through_run_all(tmp_path, variant):
    """A unilm-format checkpoint of the real shapes, no --model: Top-1 is PyTorch's agreement (100%)."""
    images, labels, checkpoint = labelled_photos(tmp_path, variant, 3)
    workdir = tmp_path / "work"
    proc = run_script(["run_all.sh", "--batch_size", "2", "--workdir", str(workdir), "--backend", "ort",
                       "--image_path", str(images), "--label_file", str(labels), "--checkpoint", str(checkpoint)],
                      timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    size = image_size(variant)
    tokens = token_count(size)
    assert f"tokens {tokens} -> {-(-tokens // 16) * 16}" in proc.stdout
    manifest = json.loads((workdir / "prep_image_bs2" / "manifest.json").read_text())
    assert (manifest["image_size"], manifest["resize_size"]) == (size, size)
    acc = json.loads((workdir / "acc_bs2_details.json").read_text())
    assert (acc["num_images"], acc["top1"]) == (3, 100.0)
    assert np.isclose(acc["top5"], 100.0)
