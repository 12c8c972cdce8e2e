"""The built-in demo's inputs: what run_all.sh feeds the pipeline when no ImageNet is given.

    [make_demo_data.py] -> beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py
    -> atc + ais_bench | beit_infer.py -> beit_eval_acc.py

Writes, seeded and once (a complete demo folder is left alone unless --force)::

    OUT/images/ILSVRC2012_val_00000001.JPEG ...  real photographs (scikit-image's bundled data:
                                                 grey, CMYK and a PNG under a .JPEG name among
                                                 them), or with --images synthetic, synthetic
                                                 images of awkward sizes and every PIL mode
    OUT/random_checkpoint.pth                    a randomly initialised BEiT in the real unilm
                                                 format ({'model': state_dict})
    OUT/val_label.txt                            'ILSVRC2012_val_00000001.JPEG 65' lines: the
                                                 PyTorch model's own predictions on the images as
                                                 beit_preprocess.py prepares them
    OUT/demo.json                                written last: the recipe and the label margins

The photographs are real but the model is random, with no ImageNet accuracy: the
labels are its PyTorch predictions, so the demo's Top-1 measures how faithfully the
exported pipeline reproduces PyTorch (100% expected), not ImageNet accuracy.  The
default image counts (20 photographs, 28 synthetic) are not multiples of 8 or 16, so
the last batch is padded at batch sizes 8 and 16.
The work is in beit_pipeline/data/demo.py.
"""

import argparse
import sys

from beit_pipeline import cli
from beit_pipeline.data.demo import (
    CHECKPOINT_NAME,
    DEFAULT_COUNT,
    IMAGE_KINDS,
    LABELS_NAME,
    default_count,
    is_complete,
    make_demo,
    recipe,
)
from beit_pipeline.data.photos import PHOTOS
from beit_pipeline.model.variants import KNOWN_VARIANTS


def build_parser():
    parser = argparse.ArgumentParser(
        description="Make the built-in demo's inputs for run_all.sh: real photographs, a random BEiT checkpoint "
                    "in the unilm format and labels that are PyTorch's own predictions.")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="demo folder to write (run_all.sh uses WORKDIR/demo)")
    parser.add_argument("--model", default="beit_base_patch16_224", metavar="NAME",
                        choices=sorted(KNOWN_VARIANTS),
                        help="BEiT variant of the random checkpoint, any input size (default: %(default)s; "
                             "beit_tiny_test_patch16_224 or _384 for fast tests); the labels are computed at "
                             "the variant's size with its preprocessing")
    parser.add_argument("--images", choices=IMAGE_KINDS, default="photos",
                        help="photos: scikit-image's bundled photographs as ImageNet val files (default); "
                             "synthetic: generated images of awkward sizes and every PIL mode")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help=f"number of images (default: all {len(PHOTOS)} photographs, or {DEFAULT_COUNT} "
                             "synthetic images; neither a multiple of 8 or 16, so the last batch is padded)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and weights (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="remake the demo even when it is complete")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    if args.count is None:
        args.count = default_count(args.images)
    cli.check(args.count >= 1, f"--count must be at least 1, got {args.count}")
    cli.check(args.images != "photos" or args.count <= len(PHOTOS),
              f"--count {args.count}: there are {len(PHOTOS)} photographs (use --images synthetic for more)")


def run(args):
    wanted = recipe(args.model, args.count, args.seed, args.images)
    if not args.force and is_complete(args.out, wanted):
        cli.log.info(f"skip: {args.out} already holds the demo ({args.count} images, {args.model}, "
                     f"seed {args.seed})")
        return
    record = make_demo(args.out, args.model, args.count, args.seed, args.images)
    cli.log.info(f"wrote {args.count} images, {CHECKPOINT_NAME} ({args.model}, random) and {LABELS_NAME} "
                 f"to {args.out}")
    cli.log.info(f"labels are PyTorch's own predictions ({record['distinct_labels']} distinct classes; smallest "
                 f"top-1 margin {record['min_top1_margin']:.4g}): the demo's Top-1 measures fidelity to PyTorch, "
                 "not ImageNet accuracy")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args,
                        interrupted_hint="the demo is unfinished; rerun the same command to make it")


if __name__ == "__main__":
    sys.exit(main())
