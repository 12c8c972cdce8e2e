"""Tests of beit_preprocess.py (step 1): exactness against torchvision, batches, resume, bad input."""

import argparse
import errno
import os
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

import beit_io
import beit_preprocess
import synthetic_data
from helpers import REPO, run_script

BATCH_BYTES_PER_IMAGE = 3 * 224 * 224 * 4


# ---------------------------------------------------------------- helpers

def reference_rows(folder, names):
    """torchvision's eval transform on img.convert("RGB"), the way the guide's script applies it."""
    transform = beit_preprocess.reference_transform()
    rows = {}
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            rows[name] = transform(Image.open(f).convert("RGB")).numpy()
    return rows


def prep(folder, out, *extra, batch_size=5, workers=1, **kwargs):
    return run_script(["beit_preprocess.py", "--image_path", str(folder), "--prep_image", str(out),
                       "--batch_size", str(batch_size), "--workers", str(workers), *extra], **kwargs)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def batch_bytes(out):
    return {os.path.basename(p): read_bytes(p) for p in beit_io.list_batch_files(out)}


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
def image_set(tmp_path_factory):
    """24 images: every awkward size, every PIL mode, PNGs named .JPEG, next to files that are not images."""
    folder = str(tmp_path_factory.mktemp("images"))
    names = synthetic_data.write_image_set(folder, 24, seed=3)
    with open(os.path.join(folder, "val_label.txt"), "w") as f:
        f.writelines(f"{n} {i}\n" for i, n in enumerate(names))
    for junk in ("README.md", ".DS_Store", "._ILSVRC2012_val_00000001.JPEG"):
        with open(os.path.join(folder, junk), "wb") as f:
            f.write(b"not an image")
    os.mkdir(os.path.join(folder, "empty_class"))
    return folder, sorted(names)


@pytest.fixture(scope="module")
def prepared(image_set, tmp_path_factory):
    """The image set preprocessed with batch size 5 (24 images: the last batch has 4 real rows), 1 worker."""
    folder, _ = image_set
    out = str(tmp_path_factory.mktemp("prep") / "bs5")
    proc = prep(folder, out, batch_size=5, workers=1)
    assert proc.returncode == 0, proc.stderr
    return out, proc


# ---------------------------------------------------------------- exactness

def test_batches_equal_torchvision_reference(image_set, prepared):
    folder, names = image_set
    out, proc = prepared
    opened = [image_info(os.path.join(folder, name)) for name in names]
    # The set really exercises what it claims to (modes as stored, a PNG under a .JPEG name, all sizes).
    assert {"RGB", "L", "CMYK", "RGBA", "P", "LA", "1"} <= {mode for mode, _, _ in opened}
    assert any(fmt == "PNG" for _, fmt, _ in opened)
    assert {size for _, _, size in opened} == set(synthetic_data.AWKWARD_SIZES)

    manifest = beit_io.load_manifest(out)
    assert manifest["complete"] is True
    assert manifest["batch_size"] == 5 and manifest["image_size"] == 224
    assert manifest["num_images"] == 24 and manifest["skipped"] == []
    assert manifest["fingerprint"] == beit_io.image_set_fingerprint(names)
    assert [b["file"] for b in manifest["batches"]] == [beit_io.batch_file_name(i) for i in range(5)]
    assert [b["real"] for b in manifest["batches"]] == [5, 5, 5, 5, 4]
    # Sorted, non-image files (label file, README, hidden files, an empty sub-folder) left out.
    assert [n for b in manifest["batches"] for n in b["images"]] == names
    assert sorted(os.listdir(out)) == [beit_io.batch_file_name(i) for i in range(5)] + ["manifest.json"]

    reference = reference_rows(folder, names)
    for batch in manifest["batches"]:
        path = os.path.join(out, batch["file"])
        assert os.path.getsize(path) == 5 * BATCH_BYTES_PER_IMAGE == beit_io.batch_nbytes(5)
        arr = beit_io.read_batch(path, batch_size=5)
        for row, name in enumerate(batch["images"]):
            assert np.array_equal(arr[row], reference[name]), name
        assert not arr[batch["real"]:].any()  # padding rows are exactly zero
    # Rows of different images differ a lot, so a row given to the wrong image could not pass.
    first = beit_io.read_batch(os.path.join(out, "input_00000.bin"))
    assert np.abs(first[0] - first[1]).max() > 0.5
    assert "img/s" in proc.stdout


def test_resize_center_crop_is_exact_on_noise():
    """The split two-pass resize gives torchvision's pixels exactly, for sizes around every edge case."""
    from torchvision import transforms
    resize_crop = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(224)])
    rng = np.random.default_rng(7)
    sizes = list(synthetic_data.AWKWARD_SIZES) + [
        (1, 300), (300, 1), (3, 3), (255, 255), (256, 1000), (1000, 256), (257, 2000), (640, 480), (480, 640),
        (500, 333), (333, 500), (224, 225), (4000, 30)]
    sizes += [(400, 1300), (260, 900), (333, 1000)]  # tall: Pillow >= 13 runs the vertical pass first
    sizes += [tuple(int(v) for v in rng.integers(20, 1300, 2)) for _ in range(25)]
    orders = {beit_preprocess.pillow_vertical_first(w, h, *beit_preprocess.resize_geometry(w, h)[:2])
              for w, h in sizes}
    assert orders == ({False, True} if beit_preprocess._VERTICAL_FIRST_EXISTS else {False})
    for width, height in sizes:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
        ours = beit_preprocess.resize_center_crop(img)
        expected = np.asarray(resize_crop(img))
        assert ours.shape == (224, 224, 3)
        assert np.array_equal(ours, expected), (width, height)


def test_float_conversion_equals_totensor_normalize_for_every_value():
    from torchvision import transforms
    values = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    img = Image.fromarray(values.astype(np.uint8), "RGB")
    expected = transforms.Normalize([0.5] * 3, [0.5] * 3)(transforms.ToTensor()(img)).numpy()
    ours = beit_preprocess.to_float(np.ascontiguousarray(values.astype(np.uint8).transpose(2, 0, 1)))
    assert ours.dtype == np.float32
    assert np.array_equal(ours, expected)
    assert ours.min() == -1.0 and ours.max() == 1.0


def test_preprocess_image_function(image_set):
    folder, names = image_set
    picked = names[:8]
    reference = reference_rows(folder, picked)
    for name in picked:
        arr = beit_preprocess.preprocess_image(os.path.join(folder, name))
        assert arr.shape == (3, 224, 224) and arr.dtype == np.float32
        assert np.array_equal(arr, reference[name]), name


# ---------------------------------------------------------------- workers and resume

def test_two_workers_byte_identical(image_set, prepared, tmp_path):
    folder, _ = image_set
    out1, _ = prepared
    out2 = tmp_path / "w2"
    proc = prep(folder, out2, batch_size=5, workers=2)
    assert proc.returncode == 0, proc.stderr
    assert "2 workers" in proc.stdout
    one, two = batch_bytes(out1), batch_bytes(out2)
    assert len(one) == 5 and one == two
    assert beit_io.load_manifest(out2) == beit_io.load_manifest(out1)


@pytest.fixture(scope="module")
def big_set(tmp_path_factory):
    """120 images (copies of 4 distinct 1200x900 JPEGs in a shuffled order): slow enough to kill mid-way."""
    folder = str(tmp_path_factory.mktemp("big"))
    rng = np.random.default_rng(11)
    sources = []
    for i in range(4):
        path = os.path.join(folder, f"src{i}.tmpimg")
        synthetic_data.synthetic_image(rng, 1200, 900).save(path, format="JPEG", quality=90)
        sources.append(path)
    picks = {}
    for i, pick in enumerate(rng.integers(0, 4, 120)):
        name = synthetic_data.imagenet_name(i)
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
    sources = {pick: beit_preprocess.preprocess_image(os.path.join(big_set, name)) for pick, name in first_of.items()}
    for batch in beit_io.load_manifest(clean)["batches"]:
        arr = beit_io.read_batch(os.path.join(clean, batch["file"]), batch_size=2)
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
            if os.path.isdir(out) and len(beit_io.list_batch_files(out)) >= 3:
                break
            time.sleep(0.002)
        assert victim.poll() is None, "the run finished before it could be killed"
        os.killpg(victim.pid, signal.SIGKILL)
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    written = len(beit_io.list_batch_files(out))
    assert 3 <= written < 60
    assert beit_io.load_manifest(out)["complete"] is False

    proc = prep(big_set, out, batch_size=2, workers=2)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout
    assert batch_bytes(out) == expected
    assert beit_io.load_manifest(out) == beit_io.load_manifest(clean)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


# ---------------------------------------------------------------- refusals and bad input

def test_refuses_other_batch_size_and_other_image_set(image_set, prepared, tmp_path):
    folder, names = image_set
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
    old_fp = beit_io.image_set_fingerprint(names)
    new_fp = beit_io.image_set_fingerprint(names[:3])
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


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_image_stops_the_run_naming_it(image_set, tmp_path, kind):
    folder, names = image_set
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
    assert [os.path.basename(p) for p in beit_io.list_batch_files(out)] == ["input_00000.bin"]
    assert beit_io.load_manifest(out)["complete"] is False


def test_skip_bad_records_and_skips(image_set, tmp_path):
    folder, names = image_set
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
    manifest = beit_io.load_manifest(out)
    assert manifest["complete"] is True and manifest["num_images"] == 10
    assert [s["name"] for s in manifest["skipped"]] == bad_names
    for s, kind in zip(manifest["skipped"], sorted(BAD_KINDS)):
        assert BAD_KINDS[kind] in s["error"] and s["name"] in s["error"]
    assert [b["real"] for b in manifest["batches"]] == [3, 3, 1]
    assert [n for b in manifest["batches"] for n in b["images"]] == sorted(good)
    assert "3 bad images skipped" in proc.stderr and all(n in proc.stderr for n in bad_names)
    reference = reference_rows(src, good)
    for batch in manifest["batches"]:
        arr = beit_io.read_batch(os.path.join(out, batch["file"]), batch_size=3)
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


def test_class_subfolder_layout_and_batchsize_alias(image_set, tmp_path):
    folder, names = image_set
    src = tmp_path / "train"
    copy_images(folder, names[:3], src / "n01440764")
    copy_images(folder, names[3:5], src / "n01443537")
    copy_images(folder, names[5:6], src / "n01443537" / "deeper")  # two levels down: not looked at
    copy_images(folder, names[6:7], src)
    out = tmp_path / "out"
    rc = beit_preprocess.main(["--image_path", str(src), "--prep_image", str(out), "--batchsize", "4",
                               "--workers", "1"])
    assert rc == 0
    manifest = beit_io.load_manifest(out)
    expected = sorted([names[6]] + [f"n01440764/{n}" for n in names[:3]] + [f"n01443537/{n}" for n in names[3:5]])
    assert manifest["batch_size"] == 4
    assert [n for b in manifest["batches"] for n in b["images"]] == expected
    reference = reference_rows(src, expected)
    for batch in manifest["batches"]:
        arr = beit_io.read_batch(os.path.join(out, batch["file"]), batch_size=4)
        for row, name in enumerate(batch["images"]):
            assert np.array_equal(arr[row], reference[name]), name


def test_symlink_loops_do_not_hang(image_set, tmp_path, capsys):
    folder, names = image_set
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
    manifest = beit_io.load_manifest(out)
    assert [s["name"] for s in manifest["skipped"]] == ["gone.JPEG", "x.JPEG", "y.JPEG"]
    assert "Too many levels of symbolic links" in manifest["skipped"][1]["error"]
    assert [n for b in manifest["batches"] for n in b["images"]] == sorted(["alias.JPEG"] + names[:2])
    arr = beit_io.read_batch(out / "input_00000.bin")
    assert np.array_equal(arr[0], beit_preprocess.preprocess_image(os.path.join(folder, names[0])))


def test_decompression_bomb_refused(image_set, tmp_path, capsys, monkeypatch):
    folder, names = image_set
    src = tmp_path / "src"
    copy_images(folder, names[:1], src)
    (src / "bomb.png").write_bytes(png_header_only(20000, 20000))
    out = tmp_path / "out"
    rc = beit_preprocess.main(["--image_path", str(src), "--prep_image", str(out), "--batch_size", "1",
                               "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and str(src / "bomb.png") in err and "decompression bomb" in err
    assert Image.MAX_IMAGE_PIXELS == beit_preprocess.DEFAULT_MAX_PIXELS  # main() put Pillow's limit back

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
    with pytest.raises(beit_preprocess.BadImageError, match="decompression bomb"):
        beit_preprocess.preprocess_image(small)


def test_write_error_leaves_no_partial_batch(image_set, tmp_path, capsys, monkeypatch):
    folder, names = image_set
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
    assert beit_io.list_batch_files(out) == []
    assert sorted(os.listdir(out)) == ["manifest.json"]  # no .tmp left behind either
    assert beit_io.load_manifest(out)["complete"] is False


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        beit_preprocess.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    flags = {"--image_path", "--prep_image", "--batch_size", "--batchsize", "--workers", "--skip_bad", "--max_pixels"}
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
