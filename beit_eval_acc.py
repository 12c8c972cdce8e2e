"""Step 6 of the pipeline: Top-1 / Top-5 accuracy of the inference outputs.

    beit_preprocess.py -> beit_pth2onnx.py -> onnxsim -> graph_modify.py
    -> atc + ais_bench (Ascend) or beit_infer.py (ONNX Runtime) -> beit_eval_acc.py

Reads the outputs as ais_bench writes them (``input_00000_0.txt`` / ``.bin`` /
``.npy``, one row per batch item), maps every row to its image, compares with
``val_label.txt`` and writes the ModelZoo result JSON::

    python3 beit_eval_acc.py --folder_davinci_target ./ais_out/2024_01_01-00_00_00 \\
        --annotation_file_path /opt/npu/imageNet/val_label.txt \\
        --result_json_path ./ --json_file_name acc_bs8.json --batch_size 8 \\
        --prep_image ./prep_image_bs8

With the manifest that beit_preprocess.py wrote (``--prep_image``), each row is
matched to the image the manifest names and only the real rows of a batch are
counted; the zero-padded rows of the last batch never are.  Without it, the
guide's rule is used (row i of input_k is ILSVRC2012_val_{k*bs+i+1:08d}); the
padding can then not be known, so a row counts only if its generated name is in
the label file.
"""

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

import beit_io
from beit_io import PipelineFileError

TOPN = 5


# ---------------------------------------------------------------- accuracy

def label_ranks(logits, labels):
    """Rank of each row's true label among its logits (0 = the top prediction).

    Ties are broken by class index (a stable sort), so the result does not
    depend on numpy's sort algorithm.
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels, dtype=np.int64)
    order = np.argsort(-logits, axis=1, kind="stable")
    return np.argmax(order == labels[:, None], axis=1)


def evaluate(batches, labels, num_classes=beit_io.NUM_CLASSES, label_file="the label file"):
    """Count Top-1..Top-5 hits.

    ``batches`` yields ``(output file, logits, image names)`` where the logits'
    rows are exactly the rows to count, one per name.  ``labels`` maps image
    keys (name without extension) to class indices.  Returns a dict with
    ``num_images``, ``num_classes``, ``correct`` (hits for k = 1..topn) and the
    ``top1`` / ``top5`` percentages.
    """
    topn = min(TOPN, num_classes)
    correct = np.zeros(topn, dtype=np.int64)
    count = 0
    for path, logits, names in batches:
        if logits.shape[0] != len(names):
            raise PipelineFileError(f"{path}: {logits.shape[0]} rows for {len(names)} images")
        truth = []
        for name in names:
            key = beit_io.image_key(name)
            if key not in labels:
                raise PipelineFileError(f"{label_file}: no label for image {name} (row of {path})")
            truth.append(labels[key])
        if not names:
            continue
        ranks = label_ranks(logits, truth)
        for k in range(topn):
            correct[k] += np.count_nonzero(ranks <= k)
        count += len(names)
    return {
        "num_images": count,
        "num_classes": num_classes,
        "correct": [int(c) for c in correct],
        "top1": percent(correct[0], count),
        "top5": percent(correct[topn - 1], count),
    }


def percent(hits, count):
    return 100.0 * float(hits) / count if count else 0.0


# ---------------------------------------------------------------- which row is which image

def plan_from_manifest(manifest, outputs, batch_size, manifest_file):
    """[(stem, output path, image names)] for every batch the manifest lists.

    Refuses a batch size other than the manifest's, an image listed twice and
    batches with no output file; outputs the manifest does not list are
    returned separately so that the caller can warn about them.
    """
    if batch_size is not None and batch_size != manifest["batch_size"]:
        raise PipelineFileError(
            f"{manifest_file}: batch size is {manifest['batch_size']} but --batch_size {batch_size} was given")
    plan, seen, missing = [], set(), []
    for stem, names in beit_io.rows_from_manifest(manifest):
        for name in names:
            if name in seen:
                raise PipelineFileError(f"{manifest_file}: image {name} is listed twice")
            seen.add(name)
        if stem not in outputs:
            missing.append(stem)
            continue
        plan.append((stem, outputs[stem], names))
    if missing:
        shown = ", ".join(f"{s}_0.*" for s in missing[:5])
        if len(missing) > 5:
            shown += f" and {len(missing) - 5} more"
        raise PipelineFileError(
            f"outputs do not cover the manifest {manifest_file}: {len(missing)} of "
            f"{len(manifest['batches'])} batches have no output ({shown})")
    listed = {stem for stem, _ in beit_io.rows_from_manifest(manifest)}
    extra = sorted(os.path.basename(p) for s, p in outputs.items() if s not in listed)
    return plan, extra


def plan_from_guide_rule(outputs, folder):
    """[(stem, output path, batch index)] in batch order, for outputs of ``input_NNNNN``.

    Without a manifest, the batch index in the name is all there is to go on,
    so an output of another name, or a gap in the indices, is an error.
    """
    plan = []
    for stem, path in outputs.items():
        index = beit_io.batch_index(stem)
        if index is None:
            raise PipelineFileError(
                f"{path}: without a manifest only outputs of input_NNNNN batches can be matched to images "
                "(pass --prep_image)")
        plan.append((index, stem, path))
    plan.sort()
    present = {index for index, _, _ in plan}
    gaps = [i for i in range(plan[-1][0] + 1) if i not in present]
    if gaps:
        shown = ", ".join(f"{beit_io.BATCH_PREFIX}{i:05d}_0.*" for i in gaps[:5])
        raise PipelineFileError(
            f"{folder}: {len(gaps)} batches between input_00000 and {plan[-1][1]} have no output ({shown})")
    return [(stem, path, index) for index, stem, path in plan]


def manifest_batches(plan, manifest, num_classes):
    """Yield (path, real rows, names) for the manifest plan, checking row counts."""
    batch_size = manifest["batch_size"]
    for stem, path, names in tqdm(plan, desc="eval", unit="batch", file=sys.stderr):
        logits = beit_io.read_output(path, num_classes)
        rows = logits.shape[0]
        if rows < len(names):
            raise PipelineFileError(f"{path}: {rows} rows but batch {stem} holds {len(names)} images")
        if rows > batch_size:
            raise PipelineFileError(f"{path}: {rows} rows, more than the batch size {batch_size}")
        # Rows past len(names) are the zero padding of the last batch: never counted.
        yield path, logits[:len(names)], names


def guide_rule_batches(plan, batch_size, labels, num_classes, uncounted):
    """Yield (path, rows, names) under the guide's naming rule.

    A row whose generated name has no label is taken to be padding and left
    out; ``uncounted`` (a one-item list) collects how many were.
    """
    for stem, path, index in tqdm(plan, desc="eval", unit="batch", file=sys.stderr):
        logits = beit_io.read_output(path, num_classes)
        if logits.shape[0] > batch_size:
            raise PipelineFileError(f"{path}: {logits.shape[0]} rows, more than the batch size {batch_size}")
        names = [beit_io.guide_image_name(index, row, batch_size) for row in range(logits.shape[0])]
        keep = [row for row, name in enumerate(names) if name in labels]
        uncounted[0] += len(names) - len(keep)
        yield path, logits[keep], [names[row] for row in keep]


# ---------------------------------------------------------------- result file

def modelzoo_json(result, skipped=(), rows_from="manifest"):
    """The ModelZoo vision_metric JSON, plus plain numbers a program can read."""
    count = result["num_images"]
    table = [
        {"key": "Number of images", "value": str(count)},
        {"key": "Number of classes", "value": str(result["num_classes"])},
    ]
    for k, hits in enumerate(result["correct"], 1):
        # The ModelZoo scripts write str(round(acc * 100, 2)) + '%': "97.1%", not "97.10%".
        table.append({"key": f"Top{k} accuracy", "value": str(round(percent(hits, count), 2)) + "%"})
    return {
        "title": "Overall statistical evaluation",
        "value": table,
        "num_images": count,
        "num_classes": result["num_classes"],
        "top1": result["top1"],
        "top5": result["top5"],
        "top1_correct": result["correct"][0],
        "top5_correct": result["correct"][-1],
        "rows_from": rows_from,
        "skipped": list(skipped),
    }


def summary_line(result):
    return (f"Top-1 accuracy: {result['top1']:.2f}%  Top-5 accuracy: {result['top5']:.2f}%  "
            f"images: {result['num_images']}")


# ---------------------------------------------------------------- main

def build_parser():
    parser = argparse.ArgumentParser(
        description="Top-1/Top-5 accuracy of BEiT inference outputs against val_label.txt "
                    "(pipeline step 6; writes the ModelZoo result JSON).")
    parser.add_argument("--folder_davinci_target", required=True, metavar="DIR",
                        help="folder of inference outputs as ais_bench writes them: <input_stem>_0.txt, _0.bin "
                             "(raw float32) or _0.npy; other files (sumary.json, logs) are ignored")
    parser.add_argument("--annotation_file_path", required=True, metavar="FILE",
                        help="label file with lines 'ILSVRC2012_val_00000001.JPEG 65'")
    parser.add_argument("--result_json_path", required=True, metavar="DIR",
                        help="folder to write the result JSON into (created if missing)")
    parser.add_argument("--json_file_name", required=True, metavar="NAME",
                        help="name of the result JSON, e.g. acc_bs8.json")
    parser.add_argument("--batch_size", "--batchsize", dest="batch_size", type=int, default=None, metavar="N",
                        help="batch size of the outputs; required without a manifest, and must match the "
                             "manifest's when one is given (--batchsize is accepted as in the guide)")
    parser.add_argument("--prep_image", "--manifest", dest="prep_image", default=None, metavar="DIR_OR_FILE",
                        help="beit_preprocess.py's output folder or its manifest.json: maps rows to images and "
                             "tells padded rows apart; without it the guide's naming rule is used")
    parser.add_argument("--num_classes", type=int, default=beit_io.NUM_CLASSES, metavar="C",
                        help="number of classes, the width of every output row (default: %(default)s)")
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def run(args):
    """Evaluate and write the JSON; raises PipelineFileError on bad input files."""
    folder = args.folder_davinci_target
    if not os.path.isdir(folder):
        raise PipelineFileError(f"{folder}: output folder not found")
    labels = beit_io.read_labels(args.annotation_file_path, args.num_classes)
    outputs = beit_io.find_outputs(folder)
    if not outputs:
        subdirs = [d for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
        hint = f" (ais_bench writes into a dated subfolder: {os.path.join(folder, subdirs[0])}?)" if subdirs else ""
        raise PipelineFileError(f"{folder}: no inference outputs (<input_stem>_0.txt/.bin/.npy) here{hint}")

    skipped = []
    if args.prep_image is not None:
        manifest_file = beit_io.manifest_path(args.prep_image)
        manifest = beit_io.require_complete_manifest(manifest_file)
        skipped = manifest.get("skipped") or []
        plan, extra = plan_from_manifest(manifest, outputs, args.batch_size, manifest_file)
        if extra:
            print(f"warning: {folder}: {len(extra)} output files are not in the manifest and are ignored "
                  f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})", file=sys.stderr)
        batches = manifest_batches(plan, manifest, args.num_classes)
        result = evaluate(batches, labels, args.num_classes, args.annotation_file_path)
        rows_from = "manifest"
    else:
        plan = plan_from_guide_rule(outputs, folder)
        uncounted = [0]
        batches = guide_rule_batches(plan, args.batch_size, labels, args.num_classes, uncounted)
        result = evaluate(batches, labels, args.num_classes, args.annotation_file_path)
        rows_from = "guide rule"
        if uncounted[0]:
            print(f"warning: no manifest given, so padded rows cannot be told apart: {uncounted[0]} rows whose "
                  f"ILSVRC2012_val_ name is not in {args.annotation_file_path} were not counted "
                  "(pass --prep_image to be exact)", file=sys.stderr)

    if result["num_images"] == 0:
        raise PipelineFileError(f"{folder}: no output row matches an image of {args.annotation_file_path}")
    if skipped:
        print(f"warning: {len(skipped)} images were skipped in preprocessing and are not counted "
              "(listed under 'skipped' in the JSON)", file=sys.stderr)

    out_dir = args.result_json_path
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PipelineFileError(f"{out_dir}: --result_json_path exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, args.json_file_name)
    # Only this JSON's leftovers: the result folder may be a work folder shared with other steps.
    beit_io.remove_stale_temporaries_of(out_path)
    beit_io.write_json_atomic(out_path, modelzoo_json(result, skipped, rows_from))
    return result, out_path


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        print(f"error: --batch_size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if args.num_classes < 1:
        print(f"error: --num_classes must be at least 1, got {args.num_classes}", file=sys.stderr)
        return 2
    if args.prep_image is None and args.batch_size is None:
        print("error: --batch_size is required without --prep_image (the guide's rule needs it to name rows)",
              file=sys.stderr)
        return 2
    try:
        result, out_path = run(args)
    except PipelineFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(summary_line(result))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
