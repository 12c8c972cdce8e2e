"""Step 6 of the pipeline: Top-1 / Top-5 accuracy of the inference outputs.

    beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py
    -> atc + ais_bench (Ascend) or beit_infer.py (ONNX Runtime) -> beit_eval_acc.py

Reads the outputs as ais_bench writes them (``input_00000_0.txt`` / ``.bin`` /
``.npy``, one row per batch item), maps every row to its image, compares with
``val_label.txt`` and writes two files: ``--json_file_name`` exactly as the guide's own
eval script writes it (one line: title, number of images, number of classes, Top1
accuracy), and beside it ``<name>_details.json`` with our figures (Top-1..Top-5, counts,
95% intervals, the labelled images not evaluated) and what they were made from (image
set, label file, model, engine and precision, checkpoint)::

    python3 beit_eval_acc.py --folder_davinci_target ./ais_out/2024_01_01-00_00_00 \\
        --annotation_file_path /opt/npu/imageNet/val_label.txt \\
        --result_json_path ./ --json_file_name acc_bs8.json --batch_size 8 \\
        --prep_image ./prep_image_bs8

With the manifest that beit_preprocess.py wrote (``--prep_image``), each row is
matched to the image the manifest names and only the real rows of a batch are
counted; the zero-padded rows of the last batch never are.  Without it, the
guide's rule is used (row i of input_k is ILSVRC2012_val_{k*bs+i+1:08d}); it is
refused unless the label file names exactly ILSVRC2012_val_00000001 .. _N and every
output but the last holds --batch_size rows, and rows past image N are taken to be
padding.  Label entries are matched to the manifest's images by relative path, then
file name, then stem (beit_pipeline/evaluation/labels.py); the work is in beit_pipeline/evaluation/accuracy.py.

Outputs that beit_infer.py wrote carry a record beside their folder naming the manifest they
were made from: scoring them against another manifest (``--prep_image``), or by the guide's rule
where that manifest's rows are not the images 1, 2, 3 ... in order (class sub-folders, a subset),
is refused with the reason (beit_pipeline/inference/record.py).

ImageNet's other label forms (class sub-folders with no label file, Kaggle's
LOC_val_solution.csv, the devkit's ground truth, a synset mapping) are told apart
by content and read by beit_pipeline/evaluation/label_formats.py.
"""

import argparse
import os
import sys

from beit_pipeline import cli, files
from beit_pipeline.cli import log
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.evaluation import accuracy as evaluation
from beit_pipeline.evaluation import label_formats, labels, results
from beit_pipeline.inference import outputs
from beit_pipeline.pipeline.chain import ChainFiles
from beit_pipeline.preprocess import batches

GUIDE_BATCH_SIZE = 8  # the guide's beit_eval_acc.py default
GUIDE_LABELS = "/opt/npu/imageNet/val_label.txt"  # the guide's --annotation_file_path default


# ---------------------------------------------------------------- main

def build_parser():
    parser = argparse.ArgumentParser(
        description="Top-1/Top-5 accuracy of BEiT inference outputs against val_label.txt (pipeline step 6): "
                    "writes the guide's accuracy JSON and, beside it, <name>_details.json with our figures.")
    parser.add_argument("--folder_davinci_target", default=f"./{ChainFiles(64).outputs}/", metavar="DIR",  # the guide's default
                        help="folder of inference outputs as ais_bench writes them (default: the guide's "
                             "%(default)s): <input_stem>_0.txt, _0.bin (raw float32, or float16 from an OM with "
                             "fp16 outputs: named by the summary's output_dtype or, with the manifest, told by the "
                             "file size) or _0.npy; other files (sumary.json, logs) are ignored. Pointed at "
                             "ais_bench's --output folder, the error names its newest dated subfolder and lists the "
                             "others")
    parser.add_argument("--annotation_file_path", default=None, metavar="FILE_OR_DIR",
                        help="the labels, in any of ImageNet's forms (told apart by content; one line says how "
                             "they were read): val_label.txt ('ILSVRC2012_val_00000001.JPEG 65'; names that are not "
                             "UTF-8 are matched byte for byte); Kaggle's LOC_val_solution.csv (LOC_synset_mapping.txt "
                             "beside it); the devkit's ILSVRC2012_validation_ground_truth.txt (meta.mat beside it); "
                             "the image folder of class sub-folders (all 1000 synsets); or a synset mapping "
                             f"(LOC_synset_mapping.txt, meta.mat): labels from the images' class folders.  Default: "
                             f"the guide's {GUIDE_LABELS}; where that is missing and --prep_image is given, the "
                             "class folders of the image folder the manifest names")
    parser.add_argument("--synset_mapping", default=None, metavar="FILE",
                        help="LOC_synset_mapping.txt or the devkit's meta.mat, where it is not beside the CSV or "
                             "ground truth file, or for a subset of class folders")
    parser.add_argument("--result_json_path", default="./result", metavar="DIR",
                        help="folder to write the result files into (default: the guide's %(default)s; created if "
                             "missing)")
    parser.add_argument("--json_file_name", default=ChainFiles(8).accuracy, metavar="NAME",
                        help="name of the guide's result JSON (default: the guide's %(default)s); our figures go "
                             "to NAME without .json + _details.json beside it")
    parser.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, default=None, metavar="N",
                        help="batch size of the outputs (default: the manifest's with --prep_image, else the "
                             "guide's 8); with a manifest it must match the manifest's (--batchsize is accepted "
                             "as in the guide)")
    parser.add_argument("--prep_image", "--manifest", dest="prep_image", default=None, metavar="DIR_OR_FILE",
                        help="beit_preprocess.py's output folder or its manifest.json: maps rows to images and "
                             "tells padded rows apart (refused when beit_infer.py's record shows the outputs were "
                             "made from another manifest); without it the guide's naming rule is used, refused "
                             "where the outputs' manifest puts other images in those rows")
    parser.add_argument("--num_classes", type=int, default=outputs.NUM_CLASSES, metavar="C",
                        help="number of classes, the width of every output row (default: %(default)s; run_all.sh "
                             "reads it from the model)")
    parser.add_argument("--checkpoint", default=None, metavar="PTH",
                        help="the checkpoint the model was made from: its SHA-256 goes into the details, so that "
                             "the number says which weights it measures (the outputs cannot tell)")
    parser.add_argument("--model_file", default=None, metavar="FILE",
                        help="the model that made the outputs (.onnx or .om): its name and SHA-256 go into the "
                             "details (default: the model beit_infer.py's summary names, if any)")
    return parser


def check_args(args):
    """Flag values and path arguments, before anything is read: exit 2 with the flag's name."""
    cli.check(args.batch_size is None or args.batch_size >= 1,
              f"--batch_size must be at least 1, got {args.batch_size}")
    cli.check(args.num_classes >= 1, f"--num_classes must be at least 1, got {args.num_classes}")
    if args.prep_image is None and args.batch_size is None:
        args.batch_size = GUIDE_BATCH_SIZE
    folder = args.folder_davinci_target
    cli.check(os.path.isdir(folder), f"--folder_davinci_target {folder}: output folder not found"
              if not os.path.exists(folder) else f"--folder_davinci_target {folder}: is not a folder")
    label_path = args.annotation_file_path
    if label_path is None and (os.path.exists(GUIDE_LABELS) or args.prep_image is None):
        label_path = args.annotation_file_path = GUIDE_LABELS
    if label_path is not None:
        cli.check(os.path.exists(label_path), f"--annotation_file_path {label_path}: label file not found")
        is_class_folder = os.path.isdir(label_path) and label_formats.class_folders(label_path)
        cli.check(os.path.isfile(label_path) or is_class_folder, f"--annotation_file_path {label_path}: is not a "
                  "file (a folder is read as class sub-folders, and it has none)")
    if args.synset_mapping is not None:
        cli.check(os.path.isfile(args.synset_mapping), f"--synset_mapping {args.synset_mapping}: file not found")
    for flag in ("prep_image", "checkpoint", "model_file"):
        path = getattr(args, flag)
        cli.check(path is None or os.path.exists(path), f"--{flag} {path}: not found")
    out_dir = args.result_json_path
    cli.check(not os.path.exists(out_dir) or os.path.isdir(out_dir),
              f"--result_json_path {out_dir}: exists and is not a folder")
    cli.check(args.json_file_name and os.sep not in args.json_file_name,
              f"--json_file_name {args.json_file_name!r}: give a file name, without a folder")


def write_results(args, result, label_path):
    """Write the guide's JSON and our details beside it (each atomically); returns their paths and the details.

    The details go first: a guide-shaped JSON never stands without the file that says what it measured.
    An OSError names the file it was writing (files.write_bytes_atomic).
    """
    os.makedirs(args.result_json_path, exist_ok=True)
    guide_path = os.path.join(args.result_json_path, args.json_file_name)
    details_path = os.path.join(args.result_json_path, results.details_name(args.json_file_name))
    source = results.provenance(result, args.folder_davinci_target, label_path, args.prep_image,
                                args.checkpoint, args.model_file)
    acc = result.accuracy
    for path in (guide_path, details_path):
        # Only these files' leftovers: the result folder may be a work folder shared with other steps.
        files.remove_stale_temporaries_of(path)
    details = results.details(result, source, args.json_file_name)
    files.write_json_atomic(details_path, details)
    files.write_text_atomic(guide_path, results.guide_json_text(acc.num_images, acc.num_classes, acc.correct[0]))
    return guide_path, details_path, details


def manifest_image_folder(prep_image):
    """The image folder beit_preprocess.py read (its manifest's ``source``): its class folders are the labels."""
    source = batches.load_manifest(prep_image).get("source")
    if not source or not os.path.isdir(source):
        raise PipelineFileError(f"{batches.manifest_path(prep_image)}: names no image folder that is still there "
                                f"({source}); give --annotation_file_path")
    return source


def run(args):
    """Evaluate and write the result files; PipelineError (exit 1) for a bad output, label or manifest file."""
    label_path = args.annotation_file_path or manifest_image_folder(args.prep_image)
    label_file = labels.read_labels(label_path, args.num_classes, args.synset_mapping)
    result = evaluation.evaluate_folder(args.folder_davinci_target, label_file, args.prep_image,
                                        args.batch_size, args.num_classes)
    guide_path, details_path, details = write_results(args, result, label_path)
    acc = result.accuracy
    low, high = results.wilson_interval(acc.correct[0], acc.num_images)
    model = os.path.basename((details.get("model") or {}).get("path") or "") or "a model not given (--model_file)"
    log.info(evaluation.summary_line(acc))
    log.info(f"Top-1 {acc.correct[0]}/{acc.num_images} images (95% interval {low:.2f}-{high:.2f}%): the outputs of "
             f"{model} on {results.describe_run(details)}")
    log.info(f"wrote {guide_path} (the guide's JSON) and {details_path}")


def main(argv=None):
    return cli.run_main(build_parser(), run, argv, setup=check_args)


if __name__ == "__main__":
    sys.exit(main())
