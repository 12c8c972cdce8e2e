"""Tests of beit_preprocess.py (step 1): exactness against torchvision, batches, resume, bad input."""

import argparse
import errno
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import beit_preprocess
from beit_pipeline.preprocess import batches
from beit_pipeline.data import synthetic
from beit_pipeline.preprocess import transform as pt
from helpers import REPO, FileProxy, read_bytes, run_script

BATCH_BYTES_PER_IMAGE = 3 * 224 * 224 * 4


# ---------------------------------------------------------------- helpers

def reference_rows(folder, names):
    """torchvision's eval transform on img.convert("RGB"), the way the guide's script applies it."""
    transform = pt.reference_transform()
    rows = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            rows[name] = transform(Image.open(f).convert("RGB")).numpy()
    return rows


def prep(folder, out, *extra, batch_size=5, workers=1, **kwargs):
    return run_script(["beit_preprocess.py", "--image_path", str(folder), "--prep_image", str(out),
                       "--batch_size", str(batch_size), "--workers", str(workers), *extra], **kwargs)


def batch_bytes(out):
    return {os.path.basename(p): read_bytes(p) for p in batches.list_batch_files(out)}


def image_info(path):
    """(mode, format, size) as stored, without decoding; the file is closed again."""
    with open(path, "rb") as f, Image.open(f) as img:
        return img.mode, img.format, img.size


def png_header_only(width, height):
    """A PNG that announces width x height greyscale pixels but holds one row: opening it is enough."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
            + chunk(b"IEND", b""))


def copy_images(src, names, dst, rename=None):
    os.makedirs(dst, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(src, name), os.path.join(dst, (rename or {}).get(name, name)))


@pytest.fixture(scope="module")
def awkward_images(tmp_path_factory):
    """24 images: every awkward size, every PIL mode, PNGs named .JPEG, next to files that are not images."""
    folder = str(tmp_path_factory.mktemp("images"))
    names = synthetic.write_image_set(folder, 24, seed=3)
    with open(os.path.join(folder, "val_label.txt"), "w") as f:
        f.writelines(f"{n} {i}\n" for i, n in enumerate(names))
    for junk in ("README.md", ".DS_Store", "._ILSVRC2012_val_00000001.JPEG"):
        with open(os.path.join(folder, junk), "wb") as f:
            f.write(b"not an image")
    os.mkdir(os.path.join(folder, "empty_class"))
    return folder, sorted(names)


@pytest.fixture(scope="module")
def prepared(awkward_images, tmp_path_factory):
    """The image set preprocessed with batch size 5 (24 images: the last batch has 4 real rows), 1 worker."""
    folder, _ = awkward_images
    out = str(tmp_path_factory.mktemp("prep") / "bs5")
    proc = prep(folder, out, batch_size=5, workers=1)
    assert proc.returncode == 0, proc.stderr
    return out, proc


# ---------------------------------------------------------------- exactness

def test_batches_equal_torchvision_reference(awkward_images, prepared):
    folder, names = awkward_images
    out, proc = prepared
    opened = [image_info(os.path.join(folder, name)) for name in names]
    # The set really exercises what it claims to (modes as stored, a PNG under a .JPEG name, all sizes).
    assert {"RGB", "L", "CMYK", "RGBA", "P", "LA", "1"} <= {mode for mode, _, _ in opened}
    assert any(fmt == "PNG" for _, fmt, _ in opened)
    assert {size for _, _, size in opened} == set(synthetic.AWKWARD_SIZES)

    manifest = batches.load_manifest(out)
    assert manifest["complete"] is True
    assert manifest["batch_size"] == 5 and manifest["image_size"] == 224
    assert manifest["num_images"] == 24 and manifest["skipped"] == []
    assert manifest["fingerprint"] == batches.image_set_fingerprint(names)
    assert [b["file"] for b in manifest["batches"]] == [batches.batch_file_name(i) for i in range(5)]
    assert [b["real"] for b in manifest["batches"]] == [5, 5, 5, 5, 4]
    # Sorted, non-image files (label file, README, hidden files, an empty sub-folder) left out.
    assert [n for b in manifest["batches"] for n in b["images"]] == names
    assert sorted(os.listdir(out)) == [batches.batch_file_name(i) for i in range(5)] + ["manifest.json"]

    reference = reference_rows(folder, names)
    for batch in manifest["batches"]:
        path = os.path.join(out, batch["file"])
        assert os.path.getsize(path) == 5 * BATCH_BYTES_PER_IMAGE == batches.batch_nbytes(5)
        arr = batches.read_batch(path, batch_size=5)
        for row, name in enumerate(batch["images"]):
            assert np.array_equal(arr[row], reference[name]), name
        assert not arr[batch["real"]:].any()  # padding rows are exactly zero
    # Rows of different images differ a lot, so a row given to the wrong image could not pass.
    first = batches.read_batch(os.path.join(out, "input_00000.bin"))
    assert np.abs(first[0] - first[1]).max() > 0.5
    assert "img/s" in proc.stdout


def test_resize_center_crop_is_exact_on_noise():
    """The split two-pass resize gives torchvision's pixels exactly, for sizes around every edge case."""
    from torchvision import transforms
    resize_crop = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224)])
    rng = np.random.default_rng(7)
    sizes = list(synthetic.AWKWARD_SIZES) + [
        (1, 300), (300, 1), (3, 3), (255, 255), (256, 1000), (1000, 256), (257, 2000), (640, 480), (480, 640),
        (500, 333), (333, 500), (224, 225), (4000, 30)]
    sizes += [(400, 1300), (260, 900), (333, 1000)]  # tall: Pillow >= 13 runs the vertical pass first
    sizes += [tuple(int(v) for v in rng.integers(20, 1300, 2)) for _ in range(25)]
    orders = {pt.pillow_vertical_first(w, h, *pt.resize_geometry(w, h)[:2])
              for w, h in sizes}
    assert orders == ({False, True} if pt._VERTICAL_FIRST_EXISTS else {False})
    for width, height in sizes:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        ours = pt.resize_center_crop(img)
        expected = np.asarray(resize_crop(img))
        assert ours.shape == (224, 224, 3)
        assert np.array_equal(ours, expected), (width, height)


def test_float_conversion_equals_totensor_normalize_for_every_value():
    from torchvision import transforms
    values = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    img = Image.fromarray(values.astype(np.uint8), "RGB")
    expected = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(img)).numpy()
    ours = pt.to_float(np.ascontiguousarray(values.astype(np.uint8).transpose(2, 0, 1)))
    assert ours.dtype == np.float32
    assert np.array_equal(ours, expected)
    assert ours.min() == -1.0 and ours.max() == 1.0


def test_preprocess_image_function(awkward_images):
    folder, names = awkward_images
    picked = names[:8]
    reference = reference_rows(folder, picked)
    for name in picked:
        arr = pt.preprocess_image(os.path.join(folder, name))
        assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
        assert np.array_equal(arr, reference[name]), name


# ---------------------------------------------------------------- workers and resume

def test_two_workers_byte_identical(awkward_images, prepared, tmp_path):
    folder, _ = awkward_images
    out1, _ = prepared
    out2 = tmp_path / "w2"
    proc = prep(folder, out2, "--force_workers", batch_size=5, workers=2)  # 2 even on a 1-core machine
    assert proc.returncode == 0, proc.stderr
    assert "2 workers" in proc.stdout
    one, two = batch_bytes(out1), batch_bytes(out2)
    assert len(one) == 5 and one == two
    assert batches.load_manifest(out2) == batches.load_manifest(out1)


@pytest.mark.parametrize("refusal", ["open", "write"])
def test_file_system_without_o_direct_gives_the_same_bytes(awkward_images, prepared, tmp_path, monkeypatch, refusal):
    """Batches go to disk with O_DIRECT; where the file system refuses it (EINVAL), the buffered write takes over."""
    folder, _ = awkward_images
    real_open, real_fdopen, direct = os.open, os.fdopen, []
    o_direct = getattr(os, "O_DIRECT", 0)

    def refusing_open(path, flags, *args, **kwargs):
        if flags & o_direct and o_direct:
            direct.append(path)
            if refusal == "open":
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), path)
        return real_open(path, flags, *args, **kwargs)

    class RefusingFile(FileProxy):  # an O_DIRECT file whose writes fail as on a file system without it
        def write(self, data):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    def refusing_fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return RefusingFile(f) if refusal == "write" and fcntl.fcntl(fd, fcntl.F_GETFL) & o_direct else f

    monkeypatch.setattr(os, "open", refusing_open)
    monkeypatch.setattr(os, "fdopen", refusing_fdopen)
    out = tmp_path / "out"
    assert beit_preprocess.main(["--image_path", folder, "--prep_image", str(out), "--batch_size", "5",
                                 "--workers", "1"]) == 0
    monkeypatch.undo()
    assert batch_bytes(out) == batch_bytes(prepared[0])
    assert sorted(os.listdir(out)) == sorted(os.listdir(prepared[0]))  # no .tmp left behind
    if o_direct and sys.platform.startswith("linux"):
        assert len(direct) == 1  # refused once, then every batch is written buffered


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    """120 images (copies of 4 distinct 1200x900 JPEGs in a shuffled order): slow enough to kill mid-way."""
    folder = str(tmp_path_factory.mktemp("big"))
    rng = np.random.default_rng(11)
    sources = []
    for i in range(4):
        path = os.path.join(folder, f"src{i}.tmpimg")
        synthetic.synthetic_image(rng, 1200, 900).save(path, format="JPEG", quality=90)
        sources.append(path)
    picks = {}
    for i, pick in enumerate(rng.integers(0, 4, 120)):
        name = synthetic.imagenet_name(i)
        shutil.copy(sources[pick], os.path.join(folder, name))
        picks[name] = int(pick)
    for path in sources:
        os.unlink(path)
    return folder, picks


def test_sigkill_then_rerun_is_byte_identical(big_set, tmp_path):
    big_set, picks = big_set
    clean = tmp_path / "clean"
    proc = prep(big_set, clean, batch_size=2, workers=2)
    assert proc.returncode == 0, proc.stderr
    expected = batch_bytes(clean)
    assert len(expected) == 60
    # 120 images go through the pool's shared slots many times over: every row is still its own image.
    first_of = {pick: name for name, pick in sorted(picks.items(), reverse=True)}
    sources = {pick: pt.preprocess_image(os.path.join(big_set, name)) for pick, name in first_of.items()}
    for batch in batches.load_manifest(clean)["batches"]:
        arr = batches.read_batch(os.path.join(clean, batch["file"]), batch_size=2)
        for row, name in enumerate(batch["images"]):
            assert np.array_equal(arr[row], sources[picks[name]]), name

    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(REPO, "beit_preprocess.py"), "--image_path", big_set,
           "--prep_image", str(out), "--batch_size", "2", "--workers", "2"]
    # Own session: SIGKILL reaches the pool workers too, as when a job is killed.
    victim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while victim.poll() is None and time.monotonic() < deadline:
            if os.path.isdir(out) and len(batches.list_batch_files(out)) >= 3:
                break
            time.sleep(0.002)
        assert victim.poll() is None, "the run finished before it could be killed"
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    written = len(batches.list_batch_files(out))
    assert 3 <= written < 60
    assert batches.load_manifest(out)["complete"] is False

    proc = prep(big_set, out, batch_size=2, workers=2)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    assert batch_bytes(out) == expected
    assert batches.load_manifest(out) == batches.load_manifest(clean)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---------------------------------------------------------------- refusals and bad input

def test_refuses_other_batch_size_and_other_image_set(awkward_images, prepared, tmp_path):
    folder, names = awkward_images
    out, _ = prepared
    before = read_bytes(os.path.join(out, "manifest.json"))
    proc = prep(folder, out, batch_size=4)
    assert proc.returncode == 2
    assert "batch size 5" in proc.stderr and "batch size 4" in proc.stderr and "delete" in proc.stderr
    assert "Traceback" not in proc.stderr

    other = tmp_path / "other"
    copy_images(folder, names[:3], other)
    proc = prep(other, out, batch_size=5)
    assert proc.returncode == 2
    old_fp = batches.image_set_fingerprint(names)
    new_fp = batches.image_set_fingerprint(names[:3])
    assert old_fp in proc.stderr and new_fp in proc.stderr and "from 24 images" in proc.stderr
    assert read_bytes(os.path.join(out, "manifest.json")) == before

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "input_00000.bin").write_bytes(b"\0" * 16)
    rc = beit_preprocess.main(["--image_path", str(other), "--prep_image", str(stray), "--batch_size", "2",
                               "--workers", "1"])
    assert rc == 2
    assert (stray / "input_00000.bin").read_bytes() == b"\0" * 16


def make_bad(path, kind, good_jpeg):
    if kind == "zero_bytes":
        open(path, "wb").close()
    elif kind == "random_bytes":
        with open(path, "wb") as f:
            f.write(np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "truncated_jpeg":
        data = read_bytes(good_jpeg)
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    else:
        raise ValueError(kind)


BAD_KINDS = {"zero_bytes": "empty file", "random_bytes": "not a readable image", "truncated_jpeg": "truncated"}


@pytest.mark.parametrize("batch_size", [2, 3])
def test_skip_bad_with_workers_is_byte_identical(awkward_images, tmp_path, batch_size):
    """Bad images found while later chunks are already decoding (their rows then move back), alone, in runs
    longer than the images in flight, and at the very end: the same bytes as one process."""
    folder, names = awkward_images
    src = tmp_path / "src"
    src.mkdir()
    jpegs = [n for n in names if image_info(os.path.join(folder, n))[1] == "JPEG"]
    bad = {1, 2, 9} | set(range(20, 62)) | {70, 77, 79}
    kinds = sorted(BAD_KINDS)
    for i in range(80):
        name = synthetic.imagenet_name(i)
        if i in bad:
            make_bad(src / name, kinds[i % len(kinds)], os.path.join(folder, jpegs[0]))
        else:
            copy_images(folder, [jpegs[i % len(jpegs)]], src, rename={jpegs[i % len(jpegs)]: name})
    one, two = tmp_path / "w1", tmp_path / "w2"
    assert prep(src, one, "--skip_bad", batch_size=batch_size).returncode == 0
    proc = prep(src, two, "--skip_bad", "--force_workers", batch_size=batch_size, workers=2)
    assert proc.returncode == 0, proc.stderr
    assert batch_bytes(two) == batch_bytes(one) and len(batch_bytes(one)) == -(-(80 - len(bad)) // batch_size)
    manifest = batches.load_manifest(two)
    assert manifest == batches.load_manifest(one) and len(manifest["skipped"]) == len(bad)
    reference = reference_rows(src, [n for b in manifest["batches"] for n in b["images"]])
    for batch in manifest["batches"]:
        arr = batches.read_batch(os.path.join(two, batch["file"]), batch_size=batch_size)
        assert all(np.array_equal(arr[row], reference[name]) for row, name in enumerate(batch["images"]))
        assert not arr[batch["real"]:].any()


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_image_stops_the_run_naming_it(awkward_images, tmp_path, kind):
    folder, names = awkward_images
    src = tmp_path / "src"
    good = [n for n in names if image_info(os.path.join(folder, n))[1] == "JPEG"][:4]
    copy_images(folder, good, src, rename=dict(zip(good, ["a.JPEG", "b.JPEG", "d.JPEG", "e.JPEG"])))
    bad = src / "c.JPEG"
    make_bad(bad, kind, src / "a.JPEG")
    out = tmp_path / "out"
    proc = prep(src, out, batch_size=2)
    assert proc.returncode == 1
    assert str(bad) in proc.stderr and BAD_KINDS[kind] in proc.stderr
    assert "--skip_bad" in proc.stderr and "Traceback" not in proc.stderr
    # The batch before it is written; none holding the bad image (or after it) is.
    assert [os.path.basename(p) for p in batches.list_batch_files(out)] == ["input_00000.bin"]
    assert batches.load_manifest(out)["complete"] is False


def test_skip_bad_records_and_skips(awkward_images, tmp_path):
    folder, names = awkward_images
    src = tmp_path / "src"
    good = [n for n in names if image_info(os.path.join(folder, n))[1] == "JPEG"][:7]
    copy_images(folder, good, src)
    bad_names = ["ILSVRC2012_val_00000001.x.JPEG", "ILSVRC2012_val_00000005.x.JPEG",
                 "ILSVRC2012_val_00000009.x.JPEG"]
    for bad, kind in zip(bad_names, sorted(BAD_KINDS)):
        make_bad(src / bad, kind, src / good[0])
    out = tmp_path / "out"
    proc = prep(src, out, "--skip_bad", batch_size=3, workers=2)
    assert proc.returncode == 0, proc.stderr
    manifest = batches.load_manifest(out)
    assert manifest["complete"] is True and manifest["num_images"] == 10
    assert [s["name"] for s in manifest["skipped"]] == bad_names
    for s, kind in zip(manifest["skipped"], sorted(BAD_KINDS)):
        assert BAD_KINDS[kind] in s["error"] and s["name"] in s["error"]
    assert [b["real"] for b in manifest["batches"]] == [3, 3, 1]
    assert [n for b in manifest["batches"] for n in b["images"]] == sorted(good)
    assert "3 bad images skipped" in proc.stderr and all(n in proc.stderr for n in bad_names)
    reference = reference_rows(src, good)
    for batch in manifest["batches"]:
        arr = batches.read_batch(os.path.join(out, batch["file"]), batch_size=3)
        for row, name in enumerate(batch["images"]):
            assert np.array_equal(arr[row], reference[name]), name
        assert not arr[batch["real"]:].any()

    # A rerun finds everything done and changes nothing; without --skip_bad it is refused.
    before = batch_bytes(out), read_bytes(out / "manifest.json")
    proc = prep(src, out, "--skip_bad", batch_size=3)
    assert proc.returncode == 0, proc.stderr
    assert (batch_bytes(out), read_bytes(out / "manifest.json")) == before
    proc = prep(src, out, batch_size=3)
    assert proc.returncode == 2 and "--skip_bad" in proc.stderr


def test_missing_empty_and_imageless_folders(tmp_path, capsys):
    def run(folder):
        rc = beit_preprocess.main(["--image_path", str(folder), "--prep_image", str(tmp_path / "out"),
                                   "--batch_size", "2", "--workers", "1"])
        return rc, capsys.readouterr().err

    rc, err = run(tmp_path / "nope")
    assert rc == 2 and "no such folder" in err and str(tmp_path / "nope") in err
    (tmp_path / "empty").mkdir()
    rc, err = run(tmp_path / "empty")
    assert rc == 2 and "no images found" in err
    (tmp_path / "labels_only").mkdir()
    (tmp_path / "labels_only" / "val_label.txt").write_text("ILSVRC2012_val_00000001.JPEG 1\n")
    rc, err = run(tmp_path / "labels_only")
    assert rc == 2 and "no images found" in err
    assert not (tmp_path / "out").exists()


def test_class_subfolder_layout_and_batchsize_alias(awkward_images, tmp_path):
    folder, names = awkward_images
    src = tmp_path / "train"
    copy_images(folder, names[:3], src / "n01440764")
    copy_images(folder, names[3:5], src / "n01443537")
    copy_images(folder, names[5:6], src / "n01443537" / "deeper")  # two levels down: not looked at
    copy_images(folder, names[6:7], src)
    out = tmp_path / "out"
    rc = beit_preprocess.main(["--image_path", str(src), "--prep_image", str(out), "--batchsize", "4",
                               "--workers", "1"])
    assert rc == 0
    manifest = batches.load_manifest(out)
    expected = sorted([names[6]] + [f"n01440764/{n}" for n in names[:3]] + [f"n01443537/{n}" for n in names[3:5]])
    assert manifest["batch_size"] == 4
    assert [n for b in manifest["batches"] for n in b["images"]] == expected
    reference = reference_rows(src, expected)
    for batch in manifest["batches"]:
        arr = batches.read_batch(os.path.join(out, batch["file"]), batch_size=4)
        for row, name in enumerate(batch["images"]):
            assert np.array_equal(arr[row], reference[name]), name


def test_symlink_loops_do_not_hang(awkward_images, tmp_path, capsys):
    folder, names = awkward_images
    src = tmp_path / "links"
    copy_images(folder, names[:2], src)
    os.symlink(".", src / "loop")                         # directory loop
    os.symlink("..", src / "up")
    os.symlink("nowhere.JPEG", src / "gone.JPEG")         # dangling
    os.symlink("y.JPEG", src / "x.JPEG")                  # file loop
    os.symlink("x.JPEG", src / "y.JPEG")
    os.symlink(names[0], src / "alias.JPEG")              # a good file symlink is an image like any other
    out = tmp_path / "out"
    args = ["--image_path", str(src), "--prep_image", str(out), "--batch_size", "2", "--workers", "1"]
    start = time.monotonic()
    assert beit_preprocess.main(args) == 1
    err = capsys.readouterr().err
    assert str(src / "gone.JPEG") in err and "No such file" in err
    assert beit_preprocess.main(args + ["--skip_bad"]) == 0
    assert time.monotonic() - start < 60
    manifest = batches.load_manifest(out)
    assert [s["name"] for s in manifest["skipped"]] == ["gone.JPEG", "x.JPEG", "y.JPEG"]
    assert "Too many levels of symbolic links" in manifest["skipped"][1]["error"]
    assert [n for b in manifest["batches"] for n in b["images"]] == sorted(["alias.JPEG"] + names[:2])
    arr = batches.read_batch(out / "input_00000.bin")
    assert np.array_equal(arr[0], pt.preprocess_image(os.path.join(folder, names[0])))


def test_decompression_bomb_refused(awkward_images, tmp_path, capsys, monkeypatch):
    folder, names = awkward_images
    src = tmp_path / "src"
    copy_images(folder, names[:1], src)
    (src / "bomb.png").write_bytes(png_header_only(20000, 20000))
    out = tmp_path / "out"
    rc = beit_preprocess.main(["--image_path", str(src), "--prep_image", str(out), "--batch_size", "1",
                               "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and str(src / "bomb.png") in err and "decompression bomb" in err
    assert Image.MAX_IMAGE_PIXELS == pt.DEFAULT_MAX_PIXELS  # main() put Pillow's limit back

    # Between the limit and twice it Pillow only warns: that is refused too (--max_pixels lowers the limit).
    small = src / names[0]
    width, height = image_info(small)[2]
    pixels = width * height
    out2 = tmp_path / "out2"
    rc = beit_preprocess.main(["--image_path", str(src), "--prep_image", str(out2), "--batch_size", "1",
                               "--workers", "1", "--skip_bad", "--max_pixels", str(pixels * 3 // 4)])
    assert rc == 1  # both images refused: nothing to write
    err = capsys.readouterr().err
    assert f"{small}: refused as a possible decompression bomb" in err
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pixels - 1)
    with pytest.raises(pt.BadImageError, match="decompression bomb"):
        pt.preprocess_image(small)


def test_write_error_leaves_no_partial_batch(awkward_images, tmp_path, capsys, monkeypatch):
    folder, names = awkward_images
    real_replace = os.replace

    def disk_full(src, dst, *args, **kwargs):
        if os.path.basename(dst).startswith("input_"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full)
    out = tmp_path / "out"
    rc = beit_preprocess.main(["--image_path", folder, "--prep_image", str(out), "--batch_size", "4",
                               "--workers", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"cannot write {out / 'input_00000.bin'}: No space left on device" in err
    assert batches.list_batch_files(out) == []
    assert sorted(os.listdir(out)) == ["manifest.json"]  # no .tmp left behind either
    assert batches.load_manifest(out)["complete"] is False


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        beit_preprocess.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flags = {"--image_path", "--prep_image", "--batch_size", "--batchsize", "--workers", "--skip_bad", "--max_pixels",
             "--force_workers", "--wait_lock", "--image_size"}  # --image_size: issue 11
    for flag in flags:
        assert flag in text
    assert text.count("(default") >= 2
    # Every option has its own help text, not just a place in the usage line.
    options = [a for a in beit_preprocess.build_parser()._actions
               if a.option_strings and not isinstance(a, argparse._HelpAction)]
    assert {o for a in options for o in a.option_strings} == flags
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS and len(action.help.split()) >= 4, \
            action.option_strings


# ---------------------------------------------------------------- issue 10: locks, signals, limits, odd names

# Slows every os.fsync by $SLOW_FSYNC seconds and, after fsync number $SLOW_FLAG_AT, writes $SLOW_FLAG:
# a run that can be watched, signalled or raced while it holds its folder.
SLOW_SCRIPT = r'''
import os, runpy, signal, sys, time
# Ctrl-C as a terminal's foreground job gets it, also when this test run was started with SIGINT ignored
# (a background job of a shell script): the script's own handling is what the tests check.
signal.signal(signal.SIGINT, signal.default_int_handler)
_real_fsync, _count = os.fsync, [0]
def _fsync(fd):
    _real_fsync(fd)
    _count[0] += 1
    if _count[0] == int(os.environ["SLOW_FLAG_AT"]):
        with open(os.environ["SLOW_FLAG"], "w") as f:
            f.write(str(os.getpid()))
    time.sleep(float(os.environ["SLOW_FSYNC"]))
os.fsync = _fsync
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
'''


def start_slow(tmp_path, script_args, delay, flag_at=1, timeout=120):
    """Start a repo script under SLOW_SCRIPT in its own session; return (Popen, flag) once the flag is up."""
    wrapper = tmp_path / "slow.py"
    wrapper.write_text(SLOW_SCRIPT)
    flag = tmp_path / f"flag{len(list(tmp_path.glob('flag*')))}"
    env = dict(os.environ, PYTHONUNBUFFERED="1", SLOW_FSYNC=str(delay), SLOW_FLAG=str(flag),
               SLOW_FLAG_AT=str(flag_at))
    cmd = [sys.executable, str(wrapper), os.path.join(REPO, script_args[0])] + [str(a) for a in script_args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not flag.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    if proc.poll() is not None or not flag.exists():
        out, err = proc.communicate()
        raise AssertionError(f"{script_args[0]} did not reach fsync {flag_at}: exit {proc.returncode}\n{out}\n{err}")
    return proc, flag


def prep_args(folder, out, batch_size, *extra):
    return ["beit_preprocess.py", "--image_path", folder, "--prep_image", out, "--batch_size", batch_size,
            *extra]


def tree_bytes(folder):
    return {name: read_bytes(os.path.join(folder, name)) for name in os.listdir(folder)}


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def clean_bs2(awkward_images, tmp_path_factory):
    """The image set at batch size 2 (12 batches), one plain run: what every raced or signalled run must end as."""
    folder, _ = awkward_images
    out = tmp_path_factory.mktemp("clean") / "bs2"
    proc = prep(folder, out, batch_size=2, workers=1)
    assert proc.returncode == 0, proc.stderr
    return tree_bytes(out)


def test_second_run_on_the_same_folder_is_refused(awkward_images, clean_bs2, tmp_path):
    folder, _ = awkward_images
    out = tmp_path / "out"
    # fsync 1 is the first manifest: from then on the first run is writing batches, slowly.
    first, _ = start_slow(tmp_path, prep_args(folder, out, 2, "--workers", "1"), delay=0.25)
    try:
        second = prep(folder, out, batch_size=2)
        assert first.poll() is None, "the first run ended before the second one started"
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 4, second.stderr
    (line,) = error_lines(second.stderr)
    # The holder's PID and its command line (issue 17: name the process that holds the lock).
    assert re.fullmatch(re.escape(f"error: {out} (--prep_image) is in use by PID {first.pid} (") + r"python\S* "
                        r"slow\.py \S*beit_preprocess\.py .*" + re.escape(
                            f") (lock {tmp_path / '.out.lock'}); wait for it to finish, or pass --wait_lock to wait"),
                        line), line
    assert "Traceback" not in second.stderr
    # The first run was left alone: its temporaries were not deleted under it, it ends as a single run does.
    assert first.returncode == 0, stderr
    assert tree_bytes(out) == clean_bs2
    assert not (tmp_path / ".out.lock").exists()


def test_wait_lock_waits_and_finds_the_folder_complete(awkward_images, clean_bs2, tmp_path):
    folder, _ = awkward_images
    out = tmp_path / "out"
    first, _ = start_slow(tmp_path, prep_args(folder, out, 2, "--workers", "1"), delay=0.2)
    try:
        second = prep(folder, out, "--wait_lock", batch_size=2)
    finally:
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    # It waited, and then found the first run's work finished (a complete manifest), not a half-written folder.
    assert second.returncode == 0, second.stderr
    assert re.search(re.escape(f"waiting for PID {first.pid} (") + r"python\S* slow\.py .*" +
                     re.escape(f"), which holds {out} (--prep_image)"), second.stdout), second.stdout
    assert f"{out} is already complete: 24 images in 12 batches of 2; nothing to do" in second.stdout
    assert tree_bytes(out) == clean_bs2


def pool_children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def gone(pid, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc to find the pool workers")
@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_ctrl_c_and_sigterm_end_with_one_line(awkward_images, clean_bs2, tmp_path, signum, code, said):
    folder, _ = awkward_images
    out = tmp_path / "out"
    # fsync 3 is the second batch: the pool is up and batches are being written.
    victim, _ = start_slow(tmp_path, prep_args(folder, out, 2, "--workers", "2", "--force_workers"),
                           delay=0.25, flag_at=3)
    try:
        workers = pool_children(victim.pid)
        assert len(workers) == 2
        # Ctrl-C in a terminal reaches the whole process group; kill(1) only the process named.
        if signum == signal.SIGINT:
            os.killpg(victim.pid, signum)
        else:
            os.kill(victim.pid, signum)
        stdout, stderr = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    assert victim.returncode == code, stderr
    assert "Traceback" not in stderr and "Exception" not in stderr, stderr
    assert error_lines(stderr) == [f"error: {said}; the batches written so far are kept; rerun the same "
                                   "command to resume"]
    assert all(gone(pid) for pid in workers)
    assert not (tmp_path / ".out.lock").exists()
    written = len(batches.list_batch_files(out))
    assert 2 <= written < 12 and batches.load_manifest(out)["complete"] is False

    proc = prep(folder, out, batch_size=2)
    assert proc.returncode == 0, proc.stderr
    assert f"resuming: {written} batches already in" in proc.stdout
    assert tree_bytes(out) == clean_bs2


def test_workers_capped_at_usable_cores(awkward_images, tmp_path):
    folder, _ = awkward_images
    one_core = min(os.sched_getaffinity(0))

    def on_one_core(*extra):
        cmd = [sys.executable, os.path.join(REPO, "beit_preprocess.py"), "--image_path", folder, "--prep_image",
               str(tmp_path / f"out{len(extra)}"), "--batch_size", "8", *extra]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: os.sched_setaffinity(0, {one_core}))

    proc = on_one_core("--workers", "1000")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --workers 1000 is more than the 1 usable cores; using 1 (--force_workers starts 1000)" \
        in proc.stderr
    assert "(" in proc.stdout and " 1 workers)" in proc.stdout
    proc = on_one_core("--workers", "3", "--force_workers")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --workers" not in proc.stderr and " 3 workers)" in proc.stdout


def test_os_error_is_one_line_naming_the_file(awkward_images, tmp_path):
    folder, _ = awkward_images
    (tmp_path / "a_file").write_text("")
    proc = prep(folder, tmp_path / "a_file" / "out", batch_size=2)  # its lock cannot go in a file
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {tmp_path / 'a_file'}: File exists"]


def test_files_that_are_not_images_are_counted(prepared):
    _, proc = prepared
    # val_label.txt, README.md, .DS_Store and ._ILSVRC2012_val_00000001.JPEG; the empty sub-folder is no file.
    assert "ignored 4 files that are not images: hidden 2, .md 1, .txt 1\n" in proc.stdout


def test_non_utf8_file_names_work_end_to_end(awkward_images, tmp_path):
    folder, names = awkward_images
    src = tmp_path / "src"
    good = [n for n in names if image_info(os.path.join(folder, n))[1] == "JPEG"][:2]
    copy_images(folder, good, src, rename=dict(zip(good, ["a.JPEG", "c.JPEG"])))
    odd = os.fsdecode(b"b\xff.JPEG")  # os.listdir's surrogate escape of the byte 0xff
    shutil.copy(os.path.join(folder, good[0]), os.path.join(os.fsencode(src), b"b\xff.JPEG"))
    open(os.path.join(os.fsencode(src), b"broken\xfe.JPEG"), "wb").close()
    out = tmp_path / "out"
    # Printing such a name in a strict UTF-8 locale would raise: every message must escape it.
    env = {"PYTHONIOENCODING": "utf-8:strict"}
    proc = prep(src, out, "--skip_bad", batch_size=2, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "broken\\xfe.JPEG: empty file" in proc.stderr
    manifest = batches.load_manifest(out)  # the manifest round-trips the names byte for byte
    assert [b["images"] for b in manifest["batches"]] == [["a.JPEG", odd], ["c.JPEG"]]
    assert [s["name"] for s in manifest["skipped"]] == [os.fsdecode(b"broken\xfe.JPEG")]
    assert manifest["fingerprint"] == batches.image_set_fingerprint(sorted(["a.JPEG", odd, "c.JPEG",
                                                                           os.fsdecode(b"broken\xfe.JPEG")]))
    row = batches.read_batch(out / "input_00000.bin", batch_size=2)[1]
    assert np.array_equal(row, pt.preprocess_image(os.path.join(os.fsencode(src), b"b\xff.JPEG")))
    before = tree_bytes(out)
    proc = prep(src, out, "--skip_bad", batch_size=2, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "is already complete" in proc.stdout and tree_bytes(out) == before


def test_batch_size_too_big_for_memory_is_a_usage_error(awkward_images, tmp_path, capsys, monkeypatch):
    folder, _ = awkward_images
    out = tmp_path / "out"
    proc = prep(folder, out, batch_size=2_000_000)  # 4.7 TiB of buffers: more than any machine here has
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr)[0].startswith("error: --batch_size 2000000 needs 4486.1 GiB for its batch "
                                                  "buffers (4 float32 batches of 2000000 images) but only ")
    assert not out.exists()

    from beit_pipeline.preprocess import runner as preprocess
    need = preprocess.buffer_bytes(6)
    assert need == 6 * 4 * BATCH_BYTES_PER_IMAGE
    # With workers, the ring also holds the images they decode ahead: 2 workers x 2 chunks of 8.
    assert preprocess.buffer_bytes(6, workers=2) == 6 * (4 + 6) * BATCH_BYTES_PER_IMAGE
    args = ["--image_path", folder, "--prep_image", str(out), "--batch_size", "6", "--workers", "1"]
    monkeypatch.setattr(preprocess, "available_memory", lambda: need - 1)
    assert beit_preprocess.main(args) == 2
    assert "--batch_size 6 needs" in capsys.readouterr().err and not out.exists()
    monkeypatch.setattr(preprocess, "available_memory", lambda: need)
    assert beit_preprocess.main(args) == 0
    assert len(batches.list_batch_files(out)) == 4


def test_skipped_image_is_retried_once_fixed(awkward_images, tmp_path):
    folder, names = awkward_images
    src = tmp_path / "src"
    good = [n for n in names if image_info(os.path.join(folder, n))[1] == "JPEG"][:8]
    copy_images(folder, good, src)
    bad = src / good[2]
    bad.write_bytes(b"")
    out = tmp_path / "out"
    proc = prep(src, out, "--skip_bad", batch_size=3)
    assert proc.returncode == 0, proc.stderr
    manifest = batches.load_manifest(out)
    assert [s["name"] for s in manifest["skipped"]] == [good[2]] and len(manifest["batches"]) == 3

    shutil.copy(os.path.join(folder, good[2]), bad)  # fixed: the rerun must not keep skipping it
    proc = prep(src, out, "--skip_bad", batch_size=3)
    assert proc.returncode == 0, proc.stderr
    assert (f"redoing {out} from scratch: 1 image that an earlier run skipped as bad now decodes ({good[2]}), "
            "which changes the batch layout") in proc.stdout
    manifest = batches.load_manifest(out)
    assert manifest["skipped"] == [] and [n for b in manifest["batches"] for n in b["images"]] == sorted(good)
    clean = tmp_path / "clean"
    assert prep(src, clean, batch_size=3).returncode == 0
    assert tree_bytes(out) == tree_bytes(clean)


# ---------------------------------------------------------------- the demo data

def test_synthetic_image_sets_of_any_count(tmp_path):
    folder = tmp_path / "forty"
    names = synthetic.write_image_set(str(folder), 40, seed=0)
    assert names == [synthetic.imagenet_name(i) for i in range(40)]
    # Image 35 is the first CMYK image forced into another format than its name's; PNG cannot hold CMYK.
    assert image_info(folder / names[34]) == ("CMYK", "TIFF", (256, 256))
    for name in names:
        assert pt.preprocess_image(folder / name).shape == (3, 224, 224)
    # A set of N images is the first N of a bigger one, so 40 working images mean every count up to 40 works.
    for count in (1, 28, 35):
        part = synthetic.write_image_set(str(tmp_path / str(count)), count, seed=0)
        assert part == names[:count]
        assert all(read_bytes(tmp_path / str(count) / n) == read_bytes(folder / n) for n in part)


def test_make_demo_data_with_35_images(tmp_path):
    out = tmp_path / "demo"
    proc = run_script(["make_demo_data.py", "--out", str(out), "--model", "beit_tiny_test_patch16_224",
                       "--images", "synthetic", "--count", "35"])
    assert proc.returncode == 0, proc.stderr
    assert len(os.listdir(out / "images")) == 35
    labels = (out / "val_label.txt").read_text().splitlines()
    assert [line.split()[0] for line in labels] == [synthetic.imagenet_name(i) for i in range(35)]
    assert all(0 <= int(line.split()[1]) < 1000 for line in labels)


def test_make_demo_data_ctrl_c(tmp_path):
    out = tmp_path / "demo"
    # fsync 1 is val_label.txt's (torch.save does not fsync): the run sleeps there until the signal comes.
    victim, _ = start_slow(tmp_path, ["make_demo_data.py", "--out", out, "--model", "beit_tiny_test_patch16_224",
                                      "--images", "synthetic", "--count", "3"], delay=60)
    try:
        os.killpg(victim.pid, signal.SIGINT)
        stdout, stderr = victim.communicate(timeout=60)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait()
    assert victim.returncode == 130
    assert "Traceback" not in stderr
    assert error_lines(stderr) == ["error: interrupted; the demo is unfinished; rerun the same command to make it"]
    # The labels' temporary file was removed and no demo.json says the folder is done, so a rerun remakes it.
    assert sorted(os.listdir(out)) == ["images", "random_checkpoint.pth"]
    proc = run_script(["make_demo_data.py", "--out", str(out), "--model", "beit_tiny_test_patch16_224",
                       "--images", "synthetic", "--count", "3"])
    assert proc.returncode == 0 and "wrote 3 images" in proc.stdout, proc.stderr
    assert sorted(os.listdir(out)) == ["demo.json", "images", "random_checkpoint.pth", "val_label.txt"]


# ---------------------------------------------------------------- the model's size, real photographs (issue 11)

@pytest.mark.parametrize("size, resize", [(224, 256), (256, 292), (288, 329), (384, 384), (512, 512)])
def test_unilm_rule_for_the_resize(size, resize):
    """unilm beit/datasets.py build_transform: below 384, Resize(int(size / crop_pct)) with crop_pct
    224/256; from 384 up, crop_pct is 1.0 (the published 384/512 models' eval): Resize(size)."""
    assert pt.Geometry.for_size(size) == pt.Geometry(resize, size)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    from beit_pipeline.data import photos
    folder = tmp_path_factory.mktemp("photos")
    names = photos.write_photo_set(str(folder))
    return folder, names


def test_photo_set_is_imagenet_style_and_made_from_the_installed_package(photo_folder):
    """ILSVRC2012_val_%08d.JPEG names, the guide's val_label.txt lines, and the odd files the real val set
    has: greyscale JPEGs, a CMYK JPEG and a PNG under a .JPEG name."""
    from beit_pipeline.data import photos
    folder, names = photo_folder
    assert names == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, len(photos.PHOTOS) + 1)]
    assert len(names) == 20
    kinds = [image_info(folder / n)[1::-1] for n in names]  # (format, mode)
    assert ("PNG", "RGB") in kinds and ("JPEG", "CMYK") in kinds and kinds.count(("JPEG", "L")) >= 5
    lines = (folder / "val_label.txt").read_text().splitlines()
    assert [line.split()[0] for line in lines] == names and all(0 <= int(l.split()[1]) < 1000 for l in lines)
    assert lines[names.index("ILSVRC2012_val_00000007.JPEG")].endswith(" 967")  # coffee.png: espresso


@pytest.mark.parametrize("size", [224, 384, 512])
def test_photos_at_every_model_size_equal_torchvision(photo_folder, tmp_path, size):
    """beit_preprocess.py --image_size S on real photographs is bit-equal to torchvision's unilm transform
    for S, with 2 workers (forked after the size is set); the manifest records the size and transform."""
    folder, names = photo_folder
    out = tmp_path / "prep"
    proc = prep(folder, out, "--image_size", str(size), batch_size=8, workers=2)
    assert proc.returncode == 0, proc.stderr
    manifest = batches.load_manifest(str(out))
    geo = pt.Geometry.for_size(size)
    assert (manifest["image_size"], manifest["resize_size"], manifest["transform"]) == (size, geo.resize,
                                                                                       geo.description)
    transform = pt.reference_transform(size)
    got = np.concatenate([batches.read_batch(p, image_size=size) for p in batches.list_batch_files(str(out))])
    for row, name in enumerate(names):
        with Image.open(folder / name) as img:
            assert np.array_equal(got[row], transform(img.convert("RGB")).numpy()), (size, name)


def test_a_folder_made_at_another_size_is_refused(photo_folder, tmp_path):
    folder, _ = photo_folder
    out = tmp_path / "prep"
    assert prep(folder, out, batch_size=8).returncode == 0
    proc = prep(folder, out, "--image_size", "384", batch_size=8)
    assert proc.returncode == 2 and "image size 224" in proc.stderr and "image size 384" in proc.stderr
    proc = prep(folder, tmp_path / "other", "--image_size", "300", batch_size=8)
    assert proc.returncode == 2 and "--image_size must be a multiple of 16" in proc.stderr


# ---------------------------------------------------------------- issue 17: images of more than 8 bits

def test_16_bit_images_are_converted_as_torchvision_does_with_one_warning(tmp_path, capsys):
    """Issue 17 item 9: a 16-bit PNG became an all-white image without a word.  torchvision's loader does the
    same (PIL convert('RGB') clips at 255), so the bytes stay torchvision's; the run says so in one line."""
    import torch
    folder = tmp_path / "images"
    folder.mkdir()
    ramp = (np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)  # 0 .. 61420: mostly above 255
    Image.fromarray(ramp).save(folder / "a16.png")
    Image.fromarray(ramp.astype(np.int32)).save(folder / "b32.tif")
    Image.new("RGB", (50, 40), (10, 200, 30)).save(folder / "c8.png")
    out = tmp_path / "prep"
    assert beit_preprocess.main(["--image_path", str(folder), "--prep_image", str(out), "--batch_size", "4",
                                 "--workers", "1"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "more than 8 bits" in line]
    assert warnings == ["warning: 2 images have more than 8 bits per channel (PIL mode I, I;16: a16.png, b32.tif): "
                        "converted to RGB as torchvision's loader does, which clips values above 255 (mostly white); "
                        "listed under 'high_bit_depth' in the manifest; convert them to 8 bits first if that is not "
                        "what you want"]
    assert batches.load_manifest(out)["high_bit_depth"] == {"a16.png": "I;16", "b32.tif": "I"}
    transform = pt.reference_transform()
    expected = torch.stack([transform(Image.open(folder / n).convert("RGB")) for n in ("a16.png", "b32.tif", "c8.png")])
    got = batches.read_batch(out / "input_00000.bin")[:3]
    assert np.array_equal(got, expected.numpy())
    # A rerun on the complete folder repeats the warning (from the manifest).
    assert beit_preprocess.main(["--image_path", str(folder), "--prep_image", str(out), "--batch_size", "4",
                                 "--workers", "1"]) == 0
    assert "2 images have more than 8 bits per channel" in capsys.readouterr().err
