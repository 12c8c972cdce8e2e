"""The run's report as one self-contained HTML file: ``report_bs{N}.html`` in the work folder.

No network and no script: the style is inline, the plots are matplotlib PNGs and the thumbnails JPEGs,
all as ``data:`` URIs.  It shows the accuracy with what it was computed on, the fidelity table with
intervals and a one-line verdict per stage (and a legend of the stage names), where the emulated stages'
fp16 roundings saturate, the error after each block from ``beit_fidelity.py --locate`` (with the first
saturating node), the images whose Top-1 flipped with both top-5 lists, the throughput
per engine and precision, and atc's keep_dtype suggestion.  The data comes from data.py, which
tolerates missing files; a section without data says how to get it.

``python3 beit_report.py --workdir W --batch_size N`` writes it (run_all.sh does, and prints its path).
A file at that path that this module did not write is never overwritten.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import os
from typing import TYPE_CHECKING

from beit_pipeline import files
from beit_pipeline.errors import PipelineFileError
from beit_pipeline.pipeline.chain import OUTPUTS_ROOT, ChainFiles
from beit_pipeline.report import data as report_data

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

GENERATOR = "beit_pipeline.report_html"  # the page's mark (this module's name before issue 22: old pages stay ours)
THUMBNAIL = 128
MAX_FLIPS_SHOWN = 24
STAGE_LEGEND = {
    "pytorch": "the checkpoint in PyTorch, fp32: the reference of every other row",
    "onnx": "the exported ONNX model, fp32 (ONNX Runtime)",
    "onnxsim": "the model after onnxsim, fp32",
    "graph_modify": "the model padded to the 310P's 16-aligned tokens by our graph_modify.py (exact), fp32",
    "cpu_bf16": "the graph_modify model on OpenVINO in bf16, as beit_infer.py --precision bf16 runs it",
    "guide_padding": "the guide's own graph_modify.py edits (zero tokens that take softmax weight), fp32",
    "om_emulation": "what the OM computes (atc's force_fp16), emulated on the CPU: the predicted OM",
    "guide_om_emulation": "the same emulation of the guide's graph (compare with the guide's 84.68%)",
    "om": "the real OM's outputs, as ais_bench wrote them",
}
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:24px auto;padding:0 16px;max-width:1180px;color:#1d2433}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #dde2ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f9}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.muted{color:#5d6677}.big{font-size:26px;font-weight:600}.ok{color:#17753a}.warn{color:#a35a00}.bad{color:#b3261e}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #dde2ea;border-radius:6px;padding:8px;width:300px}
.card img{display:block;margin:0 auto 6px;border-radius:4px}.card table{font-size:12px;width:100%}
pre{background:#f3f5f9;padding:8px;overflow-x:auto}code{background:#f3f5f9;padding:0 3px}
.label{font-weight:700;background:#fff3c4}
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def pct(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}%"


def ci(bounds: tuple[float, float] | None) -> str:
    return "" if not bounds else f" <span class=muted>[{bounds[0]:.1f}, {bounds[1]:.1f}]</span>"


def sci(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3e}"


def png_uri(figure: Figure) -> str:
    """A matplotlib figure as a data: URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def thumbnail_uri(path: str) -> str | None:
    """A JPEG thumbnail of an image file as a data: URI; None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------- sections

def engine_of(data: report_data.ReportData) -> str | None:
    """The engine and precision that wrote this batch size's default outputs (ais_out/bs{N}), if recorded."""
    main = next((t for t in data.throughput if t.folder == ChainFiles(data.batch_size).outputs_dirname), None)
    return f"{main.engine or '?'} {main.precision or ''}".strip() if main else None


def header(data: report_data.ReportData) -> str:
    inputs = data.inputs
    rows = [("work folder", data.workdir), ("batch size", data.batch_size)]
    rows += [(label, inputs[key]) for key, label in (("checkpoint", "checkpoint"), ("image_folder", "images"),
                                                    ("label_file", "labels"), ("model", "model"),
                                                    ("backend", "backend")) if inputs.get(key)]
    engine = engine_of(data)
    if engine:  # run_all.sh's --backend (ort) says less than the engine that ran (openvino fp32)
        rows = [(k, f"{v} (engine {engine})" if k == "backend" else v) for k, v in rows]
    if inputs.get("label_file") and inputs.get("label_file") == inputs.get("image_folder"):
        rows = [(k, "the class sub-folders of the images" if k == "labels" else v) for k, v in rows]
    table = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    demo = ("<p class=warn>The built-in demo: a randomly initialised model whose labels are its own PyTorch "
            "predictions, so Top-1 measures fidelity to PyTorch, not ImageNet accuracy.</p>") if inputs.get("demo") else ""
    missing = "".join(f"<li>{esc(m)}</li>" for m in data.missing)
    # No time of writing: the same files give the same page, so a rerun that changed nothing rewrites nothing.
    return (f"<h1>BEiT offline inference, batch size {data.batch_size}</h1><p class=muted>written by beit_report.py "
            f"from the files of the work folder</p>{demo}<table>{table}</table>"
            + (f"<p>Not found:</p><ul>{missing}</ul>" if missing else ""))


def accuracy_section(data: report_data.ReportData) -> str:
    acc = data.accuracy
    if acc is None:
        return "<h2>Accuracy</h2><p>No accuracy result yet: run beit_eval_acc.py (run_all.sh's eval step).</p>"
    om = next((s for s in data.stages if s.name == "om_emulation"), None)
    predicted = (f"<p>Predicted OM Top-1 (om_emulation, on {om.num_images} images): <b>{pct(om.top1)}</b>"
                 f"{ci(om.top1_ci)}</p>") if om is not None else ""
    engine = engine_of(data) or "an engine not recorded"
    return (f"<h2>Accuracy</h2><p><span class=big>Top-1 {pct(acc.top1)}</span>{ci(acc.top1_ci)} &nbsp; "
            f"Top-5 {pct(acc.top5)} &nbsp; on <b>{acc.num_images if acc.num_images is not None else '?'} images</b>"
            f" <span class=muted>(95% Wilson interval in brackets)</span></p>"
            f"<p class=muted>From {esc(os.path.basename(acc.path))}: the outputs of {esc(engine)} against "
            f"{esc(data.inputs.get('label_file', 'the label file'))}.</p>{predicted}")


def verdict(stage: report_data.Stage) -> tuple[str, str]:
    """(css class, one line) saying what a stage's numbers mean."""
    if stage.name == "pytorch":
        return "muted", "the reference"
    flips = len(stage.flipped)
    if stage.agree is None:
        return "muted", "no agreement figure"
    if flips == 0 and stage.max_rel_err is not None and stage.max_rel_err <= 1e-4:
        return "ok", "exact: the same Top-1 on every image, logits within 1e-4 of PyTorch's"
    if flips == 0:
        return "ok", f"the same Top-1 on every image; rounding moves the logits by {sci(stage.max_rel_err)}"
    share = f"{flips} of {stage.num_images}" if stage.num_images else str(flips)
    tone = "warn" if stage.agree >= 99.0 else "bad"
    return tone, f"Top-1 changes on {share} images (near-ties flip); agreement {pct(stage.agree)}"


def stage_row(s: report_data.Stage, deltas: bool) -> str:
    tone, line = verdict(s)
    delta = "" if s.delta is None else f"{s.delta:+.2f}{ci(s.delta_ci)}"
    cells = [f"<b>{esc(s.name)}</b>", f"{pct(s.top1)}{ci(s.top1_ci)}", f"{pct(s.agree)}{ci(s.agree_ci)}"]
    cells += [delta] if deltas else []
    cells += [sci(s.max_rel_err), "n/a" if s.min_cosine is None else f"{s.min_cosine:.6f}",
              str(s.num_images if s.num_images is not None else "?"), str(len(s.flipped))]
    numbers = "".join(f"<td class=num>{c}</td>" for c in cells[1:])
    return f"<tr><td>{cells[0]}</td>{numbers}<td class={tone}>{esc(line)}</td></tr>"


def fidelity_section(data: report_data.ReportData) -> str:
    if not data.stages:
        return ("<h2>Fidelity</h2><p>No fidelity report: run <code>beit_fidelity.py --workdir W --batch_size N"
                "</code> (run_all.sh's last step).</p>")
    deltas = any(s.delta is not None for s in data.stages)  # older fidelity reports have no paired difference
    head = "".join(f"<th>{h}</th>" for h in ["stage", "Top-1", "agrees with PyTorch"] + (["&Delta; Top-1"] if deltas
               else []) + ["max rel err", "min cosine", "images", "flipped", "verdict"])
    rows = "".join(stage_row(s, deltas) for s in data.stages)
    legend = "".join(f"<tr><td><b>{esc(s.name)}</b></td><td>{esc(STAGE_LEGEND.get(s.name, 'a stage of the report'))}"
                     f"</td></tr>" for s in data.stages)
    return (f"<h2>Fidelity: every stage against PyTorch</h2><table><tr>{head}</tr>{rows}</table>"
            "<p class=muted>Intervals: 95%, in brackets (Wilson for rates; paired for &Delta; Top-1 where the "
            "report gives it). Relative error is max|a&minus;b|/max|b| over all logits.</p>"
            f"{saturation_list(data)}<table><tr><th>stage</th><th>what runs</th></tr>{legend}</table>")


def saturation_line(s: report_data.Stage) -> str:
    """One item: where an emulated stage's fp16 roundings saturate (the 310P clamps overflow to +-65504)."""
    on = f" on the {s.images_run} images it ran" if s.images_run else ""
    if not s.saturated:
        return f"<li class=ok>{esc(s.name)}: no fp16 rounding saturates{on}</li>"
    first = s.saturated[0]
    images = first.get("num_images") or len(first.get("images") or [])
    return (f"<li class=bad>{esc(s.name)}: fp16 saturates at {len(s.saturated)} node(s){on}; first "
            f"{esc(first.get('op_type', '?'))} <code>{esc(first.get('node', '?'))}</code> at "
            f"{esc(first.get('position', '?'))}: {esc(first.get('values_clamped', '?'))} values clamped to "
            f"&plusmn;65504 on {images} image(s) (<code>--suggest_keep_dtype</code> finds operators to keep in "
            "fp32)</li>")


def saturation_list(data: report_data.ReportData) -> str:
    items = "".join(saturation_line(s) for s in data.stages if s.saturated is not None)
    return f"<p>fp16 overflow, saturated as the 310P does:</p><ul>{items}</ul>" if items else ""


def blocks_figure(located: list) -> str:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 3.4))
    for found in located:
        errors = [e for e, _ in found.blocks]
        axis.plot(range(len(errors)), errors, marker="o", label=f"{found.stage} vs {found.reference}")
    axis.set_yscale("log")
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axis.set_xlabel("block")
    axis.set_ylabel("max|a-b| / max|b| after the block")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    return png_uri(figure)


def blocks_section(data: report_data.ReportData) -> str:
    located = [b for b in data.blocks if b.blocks]
    if not located:
        return ("<h2>Error after each block</h2><p>Not located yet: <code>beit_fidelity.py --workdir W "
                f"--batch_size {data.batch_size} --locate om_emulation</code> writes it.</p>")
    firsts = "".join((f"<li>{esc(b.stage)} departs from {esc(b.reference)} first at {esc(b.first)}"
                      if b.first else f"<li>{esc(b.stage)}: no tensor departs from {esc(b.reference)}")
                     + first_saturating(b) + "</li>" for b in located)
    return (f"<h2>Error after each block</h2><img alt='error after each block' src='{blocks_figure(located)}'>"
            f"<ul>{firsts}</ul>")


def first_saturating(b: report_data.BlockErrors) -> str:
    """The locate file's first saturating node, as the rest of its line ("" where it was not looked for)."""
    if b.saturating is None:
        return ""
    if not b.saturating:
        return "; no fp16 rounding saturates on the batch"
    node = b.saturating
    return (f"; fp16 first saturates at {esc(node.get('op_type', '?'))} <code>{esc(node.get('node', '?'))}</code> "
            f"({esc(node.get('position', '?'))})")


def top5_table(flip: report_data.Flip, stage: str) -> str:
    rows = []
    for k in range(max(len(flip.pytorch_top5), len(flip.stage_top5))):
        cells = []
        for pairs in (flip.pytorch_top5, flip.stage_top5):
            if k < len(pairs):
                cls, logit = pairs[k]
                mark = " class=label" if cls == flip.label else ""
                cells.append(f"<td{mark}>{cls}</td><td class=num>{'' if logit is None else f'{logit:.3f}'}</td>")
            else:
                cells.append("<td></td><td></td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (f"<table><tr><th colspan=2>pytorch</th><th colspan=2>{esc(stage)}</th></tr>"
            f"<tr><th>class</th><th>logit</th><th>class</th><th>logit</th></tr>{''.join(rows)}</table>")


def flip_card(flip: report_data.Flip, stage: str, image_folder: str | None) -> str:
    uri = thumbnail_uri(os.path.join(image_folder, flip.image)) if image_folder else None
    picture = f"<img alt='{esc(flip.image)}' src='{uri}'>" if uri else "<p class=muted>(image not found)</p>"
    label = "" if flip.label is None else f" &middot; label {flip.label}"
    return (f"<div class=card>{picture}<div><b>{esc(flip.image)}</b>{label}</div>"
            f"{top5_table(flip, stage) if flip.pytorch_top5 or flip.stage_top5 else ''}</div>")


def flips_section(data: report_data.ReportData) -> str:
    parts = []
    for s in data.stages:
        if not s.flipped:
            continue
        flips = s.flips or [report_data.Flip(name, None, [], []) for name in s.flipped]
        shown = flips[:MAX_FLIPS_SHOWN]
        more = f"<p class=muted>and {len(flips) - len(shown)} more</p>" if len(flips) > len(shown) else ""
        note = "" if s.flips else "<p class=muted>(this fidelity report has no top-5 lists)</p>"
        cards = "".join(flip_card(f, s.name, data.inputs.get("image_folder")) for f in shown)
        parts.append(f"<h3>{esc(s.name)}: {len(s.flipped)} image{'s' if len(s.flipped) != 1 else ''}</h3>{note}<div class=cards>{cards}</div>{more}")
    if not parts:
        return "" if not data.stages else "<h2>Flipped images</h2><p>No stage changed a Top-1 prediction.</p>"
    return "<h2>Flipped images: Top-1 differs from PyTorch</h2>" + "".join(parts)


def throughput_figure(rows: list) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 0.5 + 0.45 * len(rows)))
    names = [f"{r.engine or '?'} {r.precision or ''} ({r.folder})" for r in rows]
    axis.barh(names, [r.img_per_s for r in rows], color="#3b6fb6")
    axis.set_xlabel("images per second")
    axis.invert_yaxis()
    return png_uri(figure)


def throughput_section(data: report_data.ReportData) -> str:
    rows = data.throughput
    if not rows:
        return f"<h2>Throughput</h2><p>No throughput figures ({OUTPUTS_ROOT}/*_summary.json).</p>"
    table = "".join(f"<tr><td>{esc(r.folder)}</td><td>{esc(r.engine or '?')}</td><td>{esc(r.precision or '?')}</td>"
                    f"<td>{esc(r.provider or '')}</td><td class=num>{r.img_per_s:.2f}</td><td class=num>"
                    f"{r.real_images if r.real_images is not None else ''}</td><td>{esc(r.measured_at or '')}</td></tr>"
                    for r in rows)
    return ("<h2>Throughput per engine and precision</h2><table><tr><th>outputs</th><th>engine</th><th>precision"
            "</th><th>provider</th><th>img/s</th><th>images</th><th>measured</th></tr>" + table + "</table>"
            f"<img alt='throughput' src='{throughput_figure(rows)}'>")


def keep_section(data: report_data.ReportData) -> str:
    keep = data.keep
    if keep is None:
        return ("<h2>atc --keep_dtype</h2><p>No suggestion: <code>beit_fidelity.py --suggest_keep_dtype</code> "
                "writes one when fp16 saturates.</p>")
    operators = "".join(f"<tr><td>{esc(o.get('kind', '?'))}</td><td>{esc(o.get('position', '?'))}</td>"
                        f"<td>{esc(', '.join(map(str, o.get('nodes') or [])))}</td></tr>" for o in keep.operators)
    listing = (f"<table><tr><th>operator</th><th>where</th><th>nodes</th></tr>{operators}</table>"
               if operators else "<p>Nothing needs keeping in fp32.</p>")
    cfg = (f"<p>{esc(os.path.basename(keep.cfg_path))}:</p><pre>{esc(keep.cfg_text)}</pre>") if keep.cfg_path else ""
    return f"<h2>atc --keep_dtype</h2><p>{esc(keep.why)}</p>{listing}{cfg}"


def render(data: report_data.ReportData) -> str:
    body = "".join(section(data) for section in (header, accuracy_section, fidelity_section, blocks_section,
                                                 flips_section, throughput_section, keep_section))
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><meta name=generator content='{GENERATOR}'>"
            f"<title>BEiT report, batch size {data.batch_size}</title><style>{STYLE}</style></head>"
            f"<body>{body}</body></html>\n")


def report_path(workdir: str, batch_size: int) -> str:
    return os.path.join(os.path.abspath(workdir), ChainFiles(batch_size).report_html)


def write_report(workdir: str, batch_size: int, path: str | None = None) -> str:
    """Write the report (atomically) and return its path; a file there that we did not write is refused."""
    path = path or report_path(workdir, batch_size)
    old = None
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            old = f.read()
        if GENERATOR not in old[:4096]:
            raise PipelineFileError(f"{path}: exists and was not written by beit_report.py; not overwritten "
                                    "(move it, or give --output)")
    text = render(report_data.load(workdir, batch_size))
    if text != old:  # unchanged inputs leave the file (and its mtime) alone
        files.write_text_atomic(path, text)
    return path
