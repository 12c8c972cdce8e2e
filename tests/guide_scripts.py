"""The guide's own scripts, re-stated, so tests can run them on what the pipeline writes (a plain module, not tests).

From Ascend/ModelZoo-PyTorch ACL_PyTorch/contrib/cv/classfication/Beit/beit_eval_acc.py
(``cre_groundtruth_dict_fromtxt``, ``load_statistical_predict_result`` and
``create_visualization_statistical_result``, called with ``topn=1``): the same listing of the
folder, the same parsing of every name, the same counting, so that what crashes it here
crashes it there.  Only the JSON writing is left out: the result is returned.
"""

import os

import numpy as np


def guide_labels(annotation_file):
    """cre_groundtruth_dict_fromtxt: {image stem: label string}, and the number of lines."""
    img_gt_dict, img_count = {}, 0
    with open(annotation_file, "r") as f:
        for line in f.readlines():
            img_count += 1
            temp = line.strip().split(" ")
            img_gt_dict[temp[0].split(".")[0]] = temp[1]
    return img_gt_dict, img_count


def guide_row(filepath, index):
    """load_statistical_predict_result: line ``index`` of a TXT output as float32 values, and their count."""
    data = None
    with open(filepath, "r") as f:
        for i, index_data in enumerate(f):
            if i == index:
                data = index_data
    if data is None:  # the guide's 'data' is then unbound
        raise UnboundLocalError(f"{filepath}: no line {index} (the guide's script fails here)")
    temp = data.strip().split(" ")
    n_label = 0 if data == "" else len(temp)
    return np.array([np.float32(v) for v in temp] if n_label else [], dtype=np.float32), n_label


def guide_eval(prediction_file_path, annotation_file, batch_size, topn=1):
    """create_visualization_statistical_result: every entry of the folder, each name parsed as the guide does.

    Returns {"count": images counted, "n_labels": width of the last row, "top1": percent}.  Raises as the
    guide's script does (ValueError on a name that is not ``<prefix>_<5-digit batch>...``).
    """
    img_gt_dict, img_num = guide_labels(annotation_file)
    count, n_labels, count_hit = 0, 0, np.zeros(topn)
    for tfile_name in os.listdir(prediction_file_path):
        for i in range(batch_size):
            count += 1
            temp = tfile_name.split(".")[0]
            index = temp.find("_") + 1
            img_index = temp[index: index + 5]
            convert_index = int(img_index) * batch_size + i + 1
            if convert_index > img_num:
                break
            img_name = "ILSVRC2012_val_{:08d}".format(convert_index)
            prediction, n_labels = guide_row(os.path.join(prediction_file_path, tfile_name), i)
            sort_index = np.argsort(-prediction)
            real_label = int(img_gt_dict[img_name]) + (1 if n_labels == 1001 else 0)
            for j in range(min(len(sort_index), topn)):
                if str(real_label) == str(sort_index[j]):
                    count_hit[j] += 1
                    break
    accuracy = np.cumsum(count_hit) / count if count else [0]
    return {"count": count, "n_labels": n_labels, "top1": float(round(accuracy[0] * 100, 2))}
