"""The HTML report (beit_report.py, beit_pipeline/report/html.py), checked in real headless Chromium.

The fast tests write the report of a crafted work folder that holds every file the report reads (in the
formats of beit_eval_acc.py, beit_fidelity.py with its top-5 lists and --locate, beit_infer.py's two summary
files, --suggest_keep_dtype) and real photographs for the thumbnails, then load it once in Debian's
chromium (installed by .ci/run): no console message, every image decoded (naturalWidth > 0, written into
the DOM by a checking script added to a copy of the page and read back with --dump-dom), and a screenshot
in the test's folder.  The slow test runs run_all.sh end to end on the tiny model with class folders and
no label file, then --locate, and checks the report it wrote.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
from helpers import TINY, run_script

import beit_report
from beit_pipeline.data import photos
from beit_pipeline.report import data as report_data
from beit_pipeline.report import html as report_html

BS = 4
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]
CHECKER = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || (e.target && e.target.src))), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const result = {images: images.length, broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).length,
                  errors: window.__errors};
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def write_json(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f)


def crafted_workdir(root):
    """A work folder with every file the report reads; 3 real photographs for the flipped images."""
    images = root / "images"
    names = photos.write_photo_set(str(images), 3, labels=False)
    work = root / "work"
    write_json(work / f"prep_image_bs{BS}" / "manifest.json", {"source": str(images), "num_images": 3})
    write_json(work / ".run_all_run.json", {"batch_size": BS, "checkpoint": "/models/beit.pth", "backend": "ort",
                                            "label_file": str(images), "model": "beit_base_patch16_224"})
    write_json(work / f"acc_bs{BS}.json", {"title": "Overall statistical evaluation", "value": [
        {"key": "Number of images", "value": "200"}, {"key": "Number of classes", "value": "1000"},
        {"key": "Top1 accuracy", "value": "85.5%"}], "num_images": 200, "top1": 85.5, "top5": 97.5,
        "top1_correct": 171})
    flip = {"image": names[0], "label": 7, "pytorch": [[7, 9.25], [3, 9.2], [1, 4.0], [2, 3.0], [5, 1.0]],
            "stage": [[3, 9.24], [7, 9.23], [1, 4.0], [2, 3.0], [5, 1.0]]}
    stages = [
        {"name": "pytorch", "top1": 85.5, "top5": 97.5, "agree_top1": 100.0, "max_rel_err": 0.0, "min_cosine": 1.0,
         "num_images": 200, "flipped": []},
        {"name": "graph_modify", "top1": 85.5, "top5": 97.5, "agree_top1": 100.0, "max_rel_err": 5.8e-7,
         "min_cosine": 1.0, "num_images": 200, "flipped": [], "top1_ci95": [79.9, 89.7]},
        {"name": "om_emulation", "top1": 85.0, "top5": 97.5, "agree_top1": 99.5, "max_rel_err": 7.9e-4,
         "min_cosine": 0.99999, "num_images": 200, "flipped": [names[0]], "flipped_detail": [flip],
         "delta_top1": -0.5, "delta_top1_ci95": [-2.8, 1.6],
         "saturated_nodes": [], "images_run": 37},
        {"name": "guide_om_emulation", "top1": 85.5, "top5": 97.5, "agree_top1": 100.0, "max_rel_err": 9e-2,
         "min_cosine": 0.99, "num_images": 200, "flipped": [], "images_run": 40, "saturated_nodes": [
             {"node": "/blocks.0/attn/MatMul_1", "op_type": "MatMul", "position": "block 0, attention scores q @ k^T",
              "images": [names[0]], "values_clamped": 316190, "nodes": ["/blocks.0/attn/MatMul_1"], "where": "output",
              "num_images": 12}]},
        {"name": "guide_padding", "top1": 84.0, "top5": 97.0, "agree_top1": 98.0, "max_rel_err": 8.3e-2,
         "min_cosine": 0.995, "num_images": 200, "flipped": [names[1], names[2], "gone.JPEG", "n1/x.JPEG"]},
    ]
    write_json(work / f"fidelity_bs{BS}.json", {"batch_size": BS, "num_images": 200, "stages": stages})
    write_json(work / f"locate_om_emulation_bs{BS}.json", {
        "stage": "om_emulation", "reference": "graph_modify", "compared": 40, "first": None, "first_saturating": None,
        "worst": {"op_type": "Softmax", "position": "block 1, attention softmax", "rel_err": 2e-3, "cosine": 0.9999},
        "blocks": [{"rel_err": 8e-4, "cosine": 0.99999}, {"rel_err": 1.2e-3, "cosine": 0.99998}]})
    write_json(work / "ais_out" / f"bs{BS}_summary.json", {"throughput": 5.1, "engine": "openvino", "precision": "fp32"})
    write_json(work / "ais_out" / f"bs{BS}_bf16_beit_summary.json", {
        "format": 1, "engine": "openvino", "precision": "bf16", "provider": "CPU",
        "last_full_measurement": {"throughput_real_images": 11.2, "real_images": 200,
                                  "measured_at": "2026-11-26T17:01:00+00:00"}})
    # Another batch size's figures: its own report's, never this one's (a bs16 run must not change this page).
    write_json(work / "ais_out" / "bs16_summary.json", {"throughput": 777.25, "engine": "openvino", "precision": "fp32"})
    write_json(work / f"keep_dtype_bs{BS}.json", {"keep": ["/blocks.0/attn/Softmax"], "why": "block 0's scores "
               "saturate in fp16", "operators": [{"kind": "softmax", "position": "block 0, attention softmax",
                                                   "nodes": ["/blocks.0/attn/Softmax"]}]})
    (work / f"keep_dtype_bs{BS}.cfg").write_text("# made by beit_fidelity.py --suggest_keep_dtype\n"
                                                 "/blocks.0/attn/Softmax\n")
    return work


def check_in_chromium(html_path, folder):
    """Load a copy of the report with CHECKER in one headless Chromium run: (check result, console lines,
    screenshot path)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does it in CI)")
    page = folder / "checked.html"
    page.write_text(html_path.read_text(encoding="utf-8").replace("</body>", CHECKER + "</body>"), encoding="utf-8")
    shot = folder / "report.png"
    proc = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={folder / 'profile'}", "--enable-logging=stderr",
                           "--v=0", "--window-size=1280,2400", f"--screenshot={shot}", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = re.search(r'<pre id="report-check">(.*?)</pre>', proc.stdout, re.S)
    assert found, proc.stdout[-2000:]
    console = [line for line in proc.stderr.splitlines() if "CONSOLE" in line]
    return json.loads(found.group(1).replace("&quot;", '"')), console, shot


def test_report_of_a_crafted_folder_renders_in_chromium(tmp_path, capsys):
    work = crafted_workdir(tmp_path)
    assert beit_report.main(["--workdir", str(work), "--batch_size", str(BS)]) == 0
    path = work / f"report_bs{BS}.html"
    assert capsys.readouterr().out.strip() == f"report: {path}"
    text = path.read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//)""", text)  # nothing from the network
    assert "Top-1 85.50%" in text and "on <b>200 images</b>" in text
    assert "<th>backend</th><td>ort (engine openvino fp32)</td>" in text  # the engine that ran, not only --backend
    lo, hi = report_data.wilson(171, 200)
    assert f"[{lo:.1f}, {hi:.1f}]" in text  # the accuracy's own interval, from its counts
    assert "exact: the same Top-1 on every image" in text  # graph_modify's verdict
    assert "Top-1 changes on 1 of 200 images" in text and "Top-1 changes on 4 of 200 images" in text
    assert "[79.9, 89.7]" in text and "-0.50 <span class=muted>[-2.8, 1.6]</span>" in text  # intervals as given
    assert "Predicted OM Top-1 (om_emulation, on 200 images): <b>85.00%</b>" in text
    assert report_html.esc(report_html.STAGE_LEGEND["guide_padding"]) in text
    assert "om_emulation: no tensor departs from graph_modify; no fp16 rounding saturates on the batch" in text
    assert "om_emulation: no fp16 rounding saturates on the 37 images it ran" in text  # issue 20's saturated_nodes
    assert ("guide_om_emulation: fp16 saturates at 1 node(s) on the 40 images it ran; first MatMul <code>"
            "/blocks.0/attn/MatMul_1</code> at block 0, attention scores q @ k^T: 316190 values clamped to "
            "&plusmn;65504 on 12 image(s)") in text
    assert "guide_padding: no fp16" not in text  # a stage without an fp16 emulation says nothing of it
    assert "<td class=label>7</td><td class=num>9.250</td>" in text  # the label marked in pytorch's top-5
    assert text.count("data:image/jpeg;base64,") == 3 and text.count("(image not found)") == 2
    assert "11.20" in text and "bf16" in text and "/blocks.0/attn/Softmax" in text
    assert "777.25" not in text
    result, console, shot = check_in_chromium(path, tmp_path)
    assert result == {"images": 5, "broken": 0, "errors": []}  # 3 thumbnails, 2 plots
    assert console == []
    assert shot.stat().st_size > 20000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_says_what_is_missing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert beit_report.main(["--workdir", str(tmp_path / "empty"), "--batch_size", "8"]) == 0
    text = (tmp_path / "empty" / "report_bs8.html").read_text()
    for sentence in ("no accuracy result (acc_bs8.json)", "no fidelity report (fidelity_bs8.json",
                     "no throughput figures", "--locate om_emulation</code> writes it", "--suggest_keep_dtype"):
        assert sentence in text


def test_a_file_we_did_not_write_is_never_overwritten(tmp_path, capsys):
    mine = tmp_path / "report_bs8.html"
    mine.write_text("<html>my own notes</html>")
    assert beit_report.main(["--workdir", str(tmp_path), "--batch_size", "8"]) == 1
    assert "was not written by beit_report.py; not overwritten" in capsys.readouterr().err
    assert mine.read_text() == "<html>my own notes</html>"
    assert beit_report.main(["--workdir", str(tmp_path), "--batch_size", "8", "--output",
                             str(tmp_path / "other.html")]) == 0
    assert beit_report.main(["--workdir", str(tmp_path), "--batch_size", "8", "--output",
                             str(tmp_path / "other.html")]) == 0  # ours: rewritten


@pytest.mark.slow
def test_run_all_with_class_folders_writes_the_report(tmp_path):
    """run_all.sh on the tiny model with ImageNet-style class folders and no --label_file (1000 synset
    folders, each photograph in the folder of PyTorch's prediction): eval and fidelity read the folders,
    --locate adds the per-block figures, and the report shows them."""
    demo = tmp_path / "demo"
    run_script(["make_demo_data.py", "--out", str(demo), "--model", TINY, "--count", "8"], check=True)
    classes = tmp_path / "val"
    for i in range(1000):
        (classes / f"n{i:08d}").mkdir(parents=True)
    for line in (demo / "val_label.txt").read_text().splitlines():
        name, label = line.rsplit(" ", 1)
        shutil.copy(demo / "images" / name, classes / f"n{int(label):08d}" / name)
    work = tmp_path / "work"
    proc = run_script(["run_all.sh", "--batch_size", str(BS), "--image_path", str(classes), "--checkpoint",
                       str(demo / "random_checkpoint.pth"), "--workdir", str(work), "--backend", "ort"], timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"labels: from the class folders of {classes}" in proc.stdout
    assert f"report: {work / f'report_bs{BS}.html'}" in proc.stdout
    run_script(["beit_fidelity.py", "--workdir", str(work), "--batch_size", str(BS), "--locate", "om_emulation"],
               check=True)
    assert beit_report.main(["--workdir", str(work), "--batch_size", str(BS)]) == 0
    text = (work / f"report_bs{BS}.html").read_text()
    assert "Top-1 100.00%" in text and "on <b>8 images</b>" in text
    assert "alt='error after each block'" in text and "om_emulation" in text
    result, console, _ = check_in_chromium(work / f"report_bs{BS}.html", tmp_path)
    assert result["broken"] == 0 and result["images"] >= 2 and result["errors"] == [] and console == []


def test_the_same_files_give_the_same_page_and_leave_it_alone(tmp_path, capsys):
    """No time of writing in the page: a run_all.sh rerun that skips every step changes no file."""
    work = crafted_workdir(tmp_path)
    path = report_html.write_report(str(work), BS)
    first = open(path).read()
    os.utime(path, ns=(1, 1))  # an mtime a rewrite could not keep
    assert report_html.write_report(str(work), BS) == path and os.stat(path).st_mtime_ns == 1
    assert open(path).read() == first
    (work / f"acc_bs{BS}.json").write_text((work / f"acc_bs{BS}.json").read_text().replace('"top5": 97.5', '"top5": 96.0'))
    report_html.write_report(str(work), BS)
    assert os.stat(path).st_mtime_ns != 1 and "Top-5 96.00%" in open(path).read()
