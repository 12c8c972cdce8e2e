"""Step 1 of the BEiT offline-inference pipeline: images -> batch files.

    [beit_preprocess.py] -> beit_pth2onnx.py -> onnxsim -> graph_modify.py
    -> atc + ais_bench (Ascend) or beit_infer.py (ONNX Runtime) -> beit_eval_acc.py

Reads a folder of images (ImageNet val as it comes, flat, or one level of
class sub-folders), applies unilm BEiT's eval transform exactly as
torchvision computes it on a PIL image::

    img.convert("RGB") -> Resize(256, bicubic, short side) -> CenterCrop(224)
    -> ToTensor -> Normalize(mean=0.5, std=0.5)

(at ``--image_size`` S below 384: Resize(int(S / (224/256))) + CenterCrop(S); from 384 up,
Resize(S) + CenterCrop(S), unilm's rule) and writes ``input_00000.bin``, ``input_00001.bin``,
... (raw float32, C order, (batch_size, 3, S, S), the last batch zero-padded) plus ``manifest.json``
saying which image is in which row (see beit_pipeline/preprocess/batches.py).

Usage::

    python3 beit_preprocess.py --image_path imagenet/val --prep_image prep_bs8 --batch_size 8

The output is byte-identical whatever ``--workers`` is, and a run that was
killed finishes where it stopped when started again with the same arguments.
The work is in beit_pipeline/preprocess/runner.py (the folder run),
transform.py (the transform) and workers.py (decoding workers, batch ring, O_DIRECT writer) beside it.
"""

import argparse
import sys

from beit_pipeline import cli  # first: it catches Ctrl-C from here on (cli's docstring)
from beit_pipeline.pipeline.chain import ChainFiles
from beit_pipeline.preprocess.runner import IMAGE_EXTENSIONS, INTERRUPTED_HINT, check_args, run
from beit_pipeline.preprocess.transform import DEFAULT_MAX_PIXELS, UNILM_FULL_CROP_FROM
from beit_pipeline.preprocess.workers import keep_freed_memory, usable_cpus


def build_parser():
    p = argparse.ArgumentParser(
        description="Step 1 of the BEiT pipeline: turn a folder of images into float32 batch files "
                    "(input_00000.bin, ...) and manifest.json, with unilm BEiT's eval transform.")
    p.add_argument("--image_path", default="/opt/npu/imageNet/val",
                   help="folder of images (default: the guide's %(default)s): flat (ImageNet val) or with one "
                        "level of class sub-folders. Files are "
                        f"images by extension ({', '.join(IMAGE_EXTENSIONS)}, any case); others such as "
                        "val_label.txt, hidden files and directory symlinks are ignored (and counted)")
    p.add_argument("--prep_image", default="./" + ChainFiles(8).prep,
                   help="output folder for input_NNNNN.bin and manifest.json (default: the guide's %(default)s; "
                        "created if missing); rerunning into "
                        "it resumes, one made with another batch size or image set is refused. One run at a time: "
                        "a lock file .<name>.lock beside it keeps a second one out")
    p.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, default=8,
                   help="images per batch file (default: the guide's %(default)s); must match the batch size of "
                        "the ONNX/OM model (--batchsize is the guide's spelling)")
    p.add_argument("--image_size", type=int, default=224,
                   help="the model's input size S (default %(default)s; 384 or 512 for those BEiT variants): "
                        f"below {UNILM_FULL_CROP_FROM}, Resize(int(S / (224/256)), bicubic) + CenterCrop(S); from "
                        f"{UNILM_FULL_CROP_FROM} up, Resize(S) + CenterCrop(S), as unilm's beit/datasets.py does")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="processes that decode and resize images (default: all %(default)s usable cores, "
                        "also the most allowed without --force_workers); the output is the same for any number")
    p.add_argument("--force_workers", action="store_true",
                   help="start --workers processes even when that is more than the usable cores")
    p.add_argument("--skip_bad", action="store_true",
                   help="skip images that cannot be decoded (listed at the end and under 'skipped' in the "
                        "manifest) instead of stopping at the first one; a rerun tries them again")
    p.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="refuse images with more pixels than this as possible decompression bombs "
                        "(default: Pillow's %(default)s)")
    p.add_argument("--wait_lock", action="store_true",
                   help="when another run is writing --prep_image, wait for it to finish instead of "
                        "exiting with code 4")
    return p


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, interrupted_hint=INTERRUPTED_HINT, setup=check_args)


if __name__ == "__main__":
    keep_freed_memory()  # before the workers fork: the workers inherit it
    sys.exit(main())
