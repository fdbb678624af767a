"""A self-contained HTML evaluation report: metrics, curves, score histogram, confusion matrix and a
gallery of false alarms, misses and true detections. One file, images embedded as base64 PNG.

    from anomalens.workflows.evaluate import evaluate
    from anomalens.report.html_report import write_evaluation_report
    write_evaluation_report(evaluate(det, dataset), det, "report.html")

Plots use matplotlib's object API on the Agg canvas (no pyplot, no global backend switch).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from anomalens.inference import MIN_REGION_AREA, Region, decide, find_regions, overlay_image
from anomalens.workflows.evaluate import gallery_indices

if TYPE_CHECKING:  # pragma: no cover
    from anomalens.models.base import Detector
    from anomalens.workflows.evaluate import Evaluation

__all__ = [
    "write_evaluation_report",
    "render_evaluation_report",
    "figure_data_uri",
    "png_data_uri",
    "page",
    "fmt",
    "BASE_CSS",
]

GOOD_COLOR = "#2b7bba"
DEFECT_COLOR = "#d64541"
THUMB = (180, 240)  # the box (width, height) one gallery panel fits in, in pixels: two items a row

METRIC_ROWS = [
    (
        "image_auroc",
        "Image AUROC",
        "how well scores rank defective above good images (1 = perfect, 0.5 = chance)",
    ),
    ("image_ap", "Image AP", "average precision of the defective class over all thresholds"),
    (
        "image_f1_max",
        "Image F1-max",
        "best F1 over all thresholds (an upper bound: the threshold uses test labels)",
    ),
    ("pixel_auroc", "Pixel AUROC", "how well map values rank defect pixels above good pixels"),
    ("pixel_ap", "Pixel AP", "average precision of defect pixels"),
    ("aupro", "AUPRO", "per-region overlap up to 30 % false-positive rate, normalized (MVTec definition)"),
    (
        "aupimo",
        "AUPIMO",
        "mean per-image overlap while the goods' pixel false-positive rate is 1e-5 to 1e-4 (Bertoldo et al. 2024)",
    ),
    (
        "accuracy_at_full_recall",
        "ZFN",
        "accuracy at the highest threshold that misses no defect, zero false negatives (an upper bound: "
        "the threshold uses test labels)",
    ),
]

BASE_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f4f7;color:#1d2330;font:14px/1.45 -apple-system,"Segoe UI",Roboto,"Helvetica Neue",
Arial,"DejaVu Sans",sans-serif}
header{background:#1e2533;color:#f3f4f7;padding:22px 36px 18px}
header h1{margin:0 0 4px;font-size:22px;font-weight:600}
header .sub{color:#b8c0cf;font-size:13px}
header .sub b{color:#fff;font-weight:600}
.chips{margin-top:14px;display:flex;flex-wrap:wrap;gap:8px}
.chip{display:inline-block;padding:4px 12px;border-radius:14px;background:#2f3a4f;color:#e6e9ef;font-size:13px}
.chip b{font-size:15px;margin-right:3px}
.chip.good{background:#1f5f3a}.chip.bad{background:#8a2a27}.chip.warn{background:#8a6a16}
main{max-width:1320px;margin:0 auto;padding:8px 36px 48px}
section{background:#fff;border:1px solid #e1e4ea;border-radius:8px;padding:16px 22px 18px;margin:18px 0}
section h2{margin:0 0 4px;font-size:17px;font-weight:600}
section p.note{margin:0 0 12px;color:#5b6475;font-size:13px}
p.warn-note{margin:8px 0 0;padding:6px 10px;background:#fff4d6;color:#8a5a00;border-radius:6px;font-size:13px}
.row{display:flex;flex-wrap:wrap;gap:28px;align-items:flex-start}
.row>div{min-width:0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:5px 12px;border-bottom:1px solid #e8ebf0;text-align:right;vertical-align:top}
th{font-weight:600;color:#3a4356;border-bottom:2px solid #d5dae3;background:#fafbfc}
th.l,td.l{text-align:left}
td.desc{color:#6b7385;font-size:12px;text-align:left;max-width:430px}
td.na{color:#9aa1ad}
tr:last-child td{border-bottom:none}
table.cm td,table.cm th{padding:10px 16px;text-align:center;vertical-align:middle}
table.cm td.v{font-size:20px;font-weight:600;min-width:120px}
table.cm td.v small{display:block;font-size:12px;font-weight:400;color:#4b5366}
td.tp,td.tn{background:#e3f3e8}td.fp,td.fn{background:#fbe4e2}
img.plot{max-width:100%;height:auto;display:block}
.gallery{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;border:1px solid #e1e4ea;border-radius:6px;padding:8px;background:#fcfcfd;max-width:100%}
figure img{display:block;max-width:100%;height:auto;image-rendering:auto}
figcaption{font-size:12.5px;color:#3a4356;margin-top:6px;overflow-wrap:anywhere}
.tag{display:inline-block;padding:1px 8px;border-radius:10px;font-size:11.5px;font-weight:600;margin-right:6px;
color:#fff}
.tag.fa,.tag.miss{background:#c0392b}.tag.ok{background:#2e8b57}.tag.near{background:#7b8494}
.legend{font-size:12.5px;color:#5b6475;margin:0 0 10px}
.empty{color:#6b7385;font-style:italic}
h3{font-size:15px;margin:18px 0 6px}
nav{font-size:13px;margin-top:10px}
nav a{color:#9fc3ff;margin-right:14px;text-decoration:none}
footer{color:#8a92a3;font-size:12px;text-align:center;padding:0 0 24px}
"""


# -- shared helpers (also used by benchmark_report.py) ---------------------------------------------
def fmt(value: Any, digits: int = 4) -> str:
    """A metric value for a table cell: 'n/a' for None/NaN."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.{digits}f}"


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_data_uri(fig) -> str:
    """A matplotlib Figure as an embedded PNG (rendered by Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def new_figure(width: float, height: float, dpi: int = 110):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    return fig


def style_axes(ax) -> None:
    ax.grid(True, color="#e3e6ec", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9aa1ad")
    ax.tick_params(colors="#3a4356", labelsize=9)


def page(title: str, header_html: str, body_html: str) -> str:
    """A whole self-contained HTML page with the shared CSS."""
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{BASE_CSS}</style></head>\n<body>\n"
        f"<header>{header_html}</header>\n<main>\n{body_html}\n</main>\n"
        f"<footer>generated by anomalens on {datetime.now():%Y-%m-%d %H:%M}</footer>\n</body></html>\n"
    )


def _e(text: Any) -> str:
    return html.escape(str(text))


# -- report pieces ---------------------------------------------------------------------------------
def _labels_scores(evaluation: Evaluation) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    labels = np.array([s.label for s in evaluation.samples], dtype=int)
    scores = np.asarray(evaluation.prediction.scores, dtype=np.float64)
    return labels, scores, evaluation.prediction.normalized_scores


def _header(
    evaluation: Evaluation, detector: Detector, labels: np.ndarray, flagged: np.ndarray | None
) -> str:
    m = evaluation.metrics
    model = getattr(detector, "name", m.get("model", "?"))
    dataset = m.get("dataset", "?")
    paths = [str(s.path) for s in evaluation.samples]
    try:
        folder = os.path.commonpath(paths) if paths else ""
    except ValueError:
        folder = ""
    n_good, n_def = int((labels == 0).sum()), int((labels == 1).sum())
    chips = [
        f"<span class=chip><b>{len(labels)}</b> test images</span>",
        f"<span class=chip><b>{n_good}</b> good</span>",
        f"<span class=chip><b>{n_def}</b> defective</span>",
    ]
    if flagged is not None:
        tp = int((flagged & (labels == 1)).sum())
        fp = int((flagged & (labels == 0)).sum())
        fn = int((~flagged & (labels == 1)).sum())
        caught_cls = "good" if n_def and fn == 0 else ""
        chips += [
            f"<span class=chip><b>{int(flagged.sum())}</b> flagged</span>",
            f"<span class='chip {caught_cls}'><b>{tp}</b> of {n_def} defects caught</span>",
            f"<span class='chip {'bad' if fn else 'good'}'><b>{fn}</b> missed</span>",
            f"<span class='chip {'bad' if fp else 'good'}'><b>{fp}</b> false alarm{'' if fp == 1 else 's'}"
            "</span>",
        ]
    else:
        chips.append("<span class='chip warn'>not calibrated: no threshold, no verdicts</span>")
    skipped = evaluation.prediction.skipped
    if skipped:
        chips.append(f"<span class='chip warn'><b>{len(skipped)}</b> unreadable, skipped</span>")
    auroc = m.get("image_auroc")
    sub = (
        f"model <b>{_e(model)}</b>{_e(_options_text(detector))} &nbsp;·&nbsp; dataset <b>{_e(dataset)}</b>"
        + (f" <span title='{_e(folder)}'>({_e(_short(folder))})</span>" if folder else "")
        + f" &nbsp;·&nbsp; {datetime.now():%Y-%m-%d %H:%M}"
    )
    nav = (
        "<nav><a href='#metrics'>metrics</a><a href='#curves'>curves</a><a href='#scores'>scores</a>"
        "<a href='#gallery'>gallery</a></nav>"
    )
    title = f"Evaluation: {_e(model)} on {_e(dataset)}"
    if auroc is not None:
        title += f" — image AUROC {fmt(auroc, 3)}"
    return f"<h1>{title}</h1><div class=sub>{sub}</div><div class=chips>{''.join(chips)}</div>{nav}"


def _short(path: str, keep: int = 70) -> str:
    return path if len(path) <= keep else "…" + path[-keep:]


def _options_text(detector: Detector) -> str:
    try:
        defaults = {**detector.base_defaults, **detector.defaults}
        changed = {k: v for k, v in detector.options.items() if defaults.get(k) != v and k != "device"}
    except AttributeError:
        return ""
    if not changed:
        return ""
    return (
        " ("
        + ", ".join(
            f"{k}={','.join(map(str, v)) if isinstance(v, (tuple, list)) else v}" for k, v in changed.items()
        )
        + ")"
    )


def _metrics_section(
    evaluation: Evaluation, detector: Detector, labels: np.ndarray, normalized: np.ndarray | None
) -> str:
    m = evaluation.metrics
    rows = "".join(
        f"<tr><td class=l>{label}</td><td class='{'na' if m.get(key) is None else ''}'>{fmt(m.get(key))}</td>"
        f"<td class=desc>{desc}</td></tr>"
        for key, label, desc in METRIC_ROWS
    )
    overall = f"<table><tr><th class=l>metric</th><th>value</th><th class=l>meaning</th></tr>{rows}</table>"
    cal = evaluation.prediction.calibration
    at = m.get("at_threshold")
    right = ""
    source = m.get("threshold_source") or {}
    if cal is not None and at:
        warning = (
            f"<p class=warn-note>The threshold was {_e(source['warning'])}.</p>"
            if source.get("warning")
            else ""
        )
        right = (
            "<table><tr><th class=l>at the threshold</th><th>value</th></tr>"
            f"<tr><td class=l>precision</td><td>{fmt(at['precision'])}</td></tr>"
            f"<tr><td class=l>recall (defects caught)</td><td>{fmt(at['recall'])}</td></tr>"
            f"<tr><td class=l>F1</td><td>{fmt(at['f1'])}</td></tr>"
            f"<tr><td class=l>raw threshold</td><td>{cal.threshold:.5g}</td></tr>"
            f"<tr><td class=l>threshold from</td><td>{_e(source.get('text', ''))}</td></tr>"
            "</table>" + warning
        )
    info = getattr(detector, "fit_info", {}) or {}
    extra = []
    if info.get("n_fit") is not None:
        extra.append(
            f"fitted on {info['n_fit']} good images"
            + (f" in {info['fit_seconds']:.1f} s" if info.get("fit_seconds") is not None else "")
        )
    if m.get("images_per_second"):
        extra.append(f"predicted {m.get('n_images')} test images at {m['images_per_second']:.1f} images/s")
    note = " · ".join(extra)
    guard = m.get("score_warning")
    html_ = (
        f"<section id=metrics><h2>Metrics</h2><p class=note>{_e(note) if note else ''}</p>"
        + (f"<p class=warn-note>Warning: {_e(guard)}.</p>" if guard else "")
        + f"<div class=row><div>{overall}</div><div>{right}</div></div>"
    )
    html_ += _per_type_table(evaluation, normalized)
    return html_ + _drift_table(m.get("drift")) + "</section>"


def _drift_table(drift: dict[str, Any] | None) -> str:
    """Images unlike the training goods: how many, by which statistic, and a shift of the test goods."""
    if not drift:
        return ""
    rows = "".join(f"<tr><td class=l>{_e(k)}</td><td>{v}</td></tr>" for k, v in drift["by_statistic"].items())
    items = "".join(f"<li>{_e(x)}</li>" for x in drift["examples"] + drift["goods_batch_shift"])
    return (
        "<h3>Drift: images unlike the training goods</h3><p class=note>"
        f"{drift['n_images_flagged']} test images lie outside the training goods' range by more than the "
        f"margin ({drift['n_goods_flagged']} of {drift['n_goods']} good ones). A large defect can do that; "
        "flagged good parts, or a shift of the goods as a batch, point at a new camera, light or part."
        " The test goods as a batch are also compared with the training goods (Kolmogorov-Smirnov).</p>"
        + (f"<table><tr><th class=l>statistic</th><th>images</th></tr>{rows}</table>" if rows else "")
        + (f"<ul>{items}</ul>" if items else "")
    )


def _per_type_table(evaluation: Evaluation, normalized: np.ndarray | None) -> str:
    per = evaluation.metrics.get("per_defect_type")
    if not per:
        return ""
    head = (
        "<h3>Per defect type <span class=legend>(each against all good test images)</span></h3><table><tr>"
        "<th class=l>defect type</th><th>images</th><th>caught at threshold</th><th>image AUROC</th>"
        "<th>image AP</th><th>pixel AUROC</th><th>AUPRO</th><th>AUPIMO</th></tr>"
    )
    rows = []
    for dtype, d in per.items():
        caught = "n/a"
        if normalized is not None:
            idx = [i for i, s in enumerate(evaluation.samples) if s.label == 1 and s.defect_type == dtype]
            caught = f"{int(evaluation.prediction.is_anomalous[idx].sum())}/{len(idx)}"
        cells = "".join(
            f"<td class='{'na' if d.get(k) is None else ''}'>{fmt(d.get(k))}</td>"
            for k in ("image_auroc", "image_ap", "pixel_auroc", "aupro", "aupimo")
        )
        rows.append(f"<tr><td class=l>{_e(dtype)}</td><td>{d.get('n', '')}</td><td>{caught}</td>{cells}</tr>")
    return head + "".join(rows) + "</table>"


def _curves_section(labels: np.ndarray, scores: np.ndarray, evaluation: Evaluation) -> str:
    head = (
        "<section id=curves><h2>ROC and precision-recall curves <span class=legend>(image level)</span></h2>"
    )
    if labels.min(initial=0) == labels.max(initial=0):
        return head + (
            "<p class=empty>Not available: the test set needs both good and defective images "
            f"(it has only {'defective' if labels.size and labels[0] == 1 else 'good'} ones).</p></section>"
        )
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    m = evaluation.metrics
    at = m.get("at_threshold")
    fig = new_figure(10.5, 3.7)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(fpr, tpr, color=DEFECT_COLOR, lw=2, label=f"AUROC {auc(fpr, tpr):.3f}")
    ax1.plot([0, 1], [0, 1], color="#9aa1ad", lw=1, ls="--", label="chance")
    ax2.step(
        recall, precision, where="post", color=DEFECT_COLOR, lw=2, label=f"AP {fmt(m.get('image_ap'), 3)}"
    )
    ax2.axhline(labels.mean(), color="#9aa1ad", lw=1, ls="--", label=f"chance ({labels.mean():.2f})")
    if at:
        n_good, n_def = max(1, int((labels == 0).sum())), max(1, int((labels == 1).sum()))
        ax1.plot(at["fp"] / n_good, at["tp"] / n_def, "o", ms=9, color="#1e2533", label="deciding threshold")
        if at["tp"] + at["fp"]:
            ax2.plot(at["recall"], at["precision"], "o", ms=9, color="#1e2533", label="deciding threshold")
    ax1.set(
        xlabel="false-positive rate (goods flagged)",
        ylabel="true-positive rate (defects caught)",
        title="ROC",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.02),
    )
    ax2.set(
        xlabel="recall (defects caught)",
        ylabel="precision (flagged that are defective)",
        title="Precision-recall",
        xlim=(-0.02, 1.02),
        ylim=(-0.02, 1.05),
    )
    for ax in (ax1, ax2):
        style_axes(ax)
        ax.legend(loc="lower right" if ax is ax1 else "lower left", fontsize=9, frameon=False)
    fig.tight_layout(w_pad=3)
    return head + f"<img class=plot alt='ROC and PR curves' src='{figure_data_uri(fig)}'></section>"


def _scores_section(
    labels: np.ndarray, scores: np.ndarray, normalized: np.ndarray | None, evaluation: Evaluation
) -> str:
    values = normalized if normalized is not None else scores
    fig = new_figure(5.8, 3.6)
    ax = fig.subplots()
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if normalized is not None:
        lo, hi = min(lo, 0.0), max(hi, 1.2)
    edges = np.linspace(lo, hi + 1e-9, 31)
    for label, name, color in ((0, "good", GOOD_COLOR), (1, "defective", DEFECT_COLOR)):
        v = values[labels == label]
        if v.size:
            ax.hist(
                v, bins=edges, color=color, alpha=0.55, label=f"{name} ({v.size})", edgecolor=color, lw=0.8
            )
    if normalized is not None:
        ax.axvline(1.0, color="#1e2533", lw=2, ls="--", label="deciding threshold (1.0)")
        ax.set_xlabel("normalized score (calibration median = 0, deciding threshold = 1.0)")
    else:
        ax.set_xlabel("raw score (detector not calibrated: no threshold)")
    ax.set_ylabel("images")
    style_axes(ax)
    ax.legend(fontsize=9, frameon=False, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    hist = f"<img class=plot alt='score histogram' src='{figure_data_uri(fig)}'>"
    return (
        "<section id=scores><h2>Scores and verdicts</h2><p class=note>An image is flagged when its normalized "
        f"score is ≥ 1.0: the threshold is {_e((evaluation.metrics.get('threshold_source') or {}).get('text', ''))}."
        "</p><div class=row><div><h3 style='margin-top:0'>Scores of good vs defective test images</h3>"
        f"{hist}</div><div>{_confusion(labels, evaluation.prediction.is_anomalous)}</div></div></section>"
    )


def _confusion(labels: np.ndarray, flagged: np.ndarray | None) -> str:
    if flagged is None:
        return "<p class=empty>No confusion matrix: the detector has no calibrated threshold.</p>"
    good, bad = labels == 0, labels == 1
    tn, fp = int((good & ~flagged).sum()), int((good & flagged).sum())
    fn, tp = int((bad & ~flagged).sum()), int((bad & flagged).sum())

    def cell(n: int, total: int, cls: str, what: str) -> str:
        share = f"{100 * n / total:.0f} % of row" if total else "—"
        return f"<td class='v {cls}'>{n}<small>{what} · {share}</small></td>"

    return (
        "<h3 style='margin-top:0'>Confusion matrix at threshold 1.0</h3><table class=cm>"
        "<tr><th></th><th>predicted good</th><th>predicted defective</th></tr>"
        f"<tr><th>actually good ({tn + fp})</th>{cell(tn, tn + fp, 'tn', 'correct')}"
        f"{cell(fp, tn + fp, 'fp', 'false alarms')}</tr>"
        f"<tr><th>actually defective ({fn + tp})</th>{cell(fn, fn + tp, 'fn', 'missed')}"
        f"{cell(tp, fn + tp, 'tp', 'caught')}</tr></table>"
    )


# -- gallery ---------------------------------------------------------------------------------------
def _thumb_size(h: int, w: int) -> tuple[int, int]:
    scale = min(THUMB[0] / w, THUMB[1] / h)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(array: np.ndarray, size: tuple[int, int], resample=Image.BILINEAR) -> np.ndarray:
    """Resize a float (H, W) or (H, W, C) array to size=(h, w)."""
    h, w = size
    if array.shape[:2] == (h, w):
        return array.astype(np.float32)
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((w, h), resample))
    return np.stack([_resize(array[..., c], size, resample) for c in range(array.shape[2])], axis=-1)


def _scale_region(r: Region, sy: float, sx: float) -> Region:
    return replace(
        r,
        x0=int(r.x0 * sx),
        y0=int(r.y0 * sy),
        x1=max(int(r.x0 * sx) + 1, round(r.x1 * sx)),
        y1=max(int(r.y0 * sy) + 1, round(r.y1 * sy)),
    )


def _truth_panel(image: np.ndarray, mask: np.ndarray | None, label: int, header: int) -> Image.Image:
    """The image with the ground-truth defect outlined (green contour, light tint inside)."""
    rgb = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    rgb = (np.clip(rgb, 0, 1) * 255).astype(np.float32)
    h, w = rgb.shape[:2]
    if label == 0:
        text, color = "ground truth: good", (0, 110, 0)
    elif mask is None:
        text, color = "ground truth: no mask", (120, 120, 120)
        rgb = rgb * 0.55 + 255 * 0.45
    else:
        small = _resize(mask.astype(np.float32), (h, w), Image.NEAREST) > 0.5
        if not small.any() and mask.any():  # a defect smaller than one thumbnail pixel
            small = _resize(mask.astype(np.float32), (h, w), Image.BILINEAR) > 0
        edge = small & ~ndimage.binary_erosion(small, iterations=1, border_value=0)
        edge = ndimage.binary_dilation(edge, iterations=1) if min(h, w) >= 100 else edge
        rgb[small] = rgb[small] * 0.7 + np.array([0, 255, 0]) * 0.3
        rgb[edge] = (0, 230, 0)
        text = "ground truth (mask outline)" if small.any() else "ground truth: empty mask"
        color = (0, 0, 0)
    canvas = Image.new("RGB", (w, h + header), (255, 255, 255))
    canvas.paste(Image.fromarray(rgb.round().astype(np.uint8)), (0, header))
    ImageDraw.Draw(canvas).text((3, 3), text, fill=color)
    return canvas


def _regions_caption(regions: list[Region], how: str) -> str:
    """The explanation panel's words: how many regions, and where the largest one is."""
    if not regions:
        return f"<br><small>{how}: no region</small>"
    r = regions[0]
    return (
        f"<br><small>{how}: {len(regions)} region{'s' if len(regions) != 1 else ''}; largest at "
        f"x {r.x0}–{r.x1}, y {r.y0}–{r.y1}, {r.area_share:.1%} of the image, peak {r.peak:.2f}, "
        f"mean {r.mean:.2f}</small>"
    )


def _gallery_item(
    evaluation: Evaluation, i: int, detector: Detector | None = None, explanation: np.ndarray | None = None
) -> str:
    from anomalens.data import read_image

    sample = evaluation.samples[i]
    pred = evaluation.prediction
    amap = pred.maps[i]
    try:
        image = read_image(sample.path)
    except Exception as err:  # noqa: BLE001 - the file may have changed since it was scored
        return f"<figure><figcaption>{_e(sample.path)}: cannot read ({_e(err)})</figcaption></figure>"
    if image.shape[:2] != amap.shape:
        image = _resize(image, amap.shape)
    localizes = detector is None or detector.localizes
    if pred.calibration is not None:
        verdict = decide(pred.scores[i], amap, pred.calibration, localizes=localizes)
        nmap, regions, norm, flagged = (
            verdict.normalized_map,
            verdict.regions,
            verdict.normalized_score,
            verdict.anomalous,
        )
    else:
        nmap, regions, norm, flagged = amap / max(float(amap.max()), 1e-12), [], None, False
    how = "detector's map"
    if explanation is not None and not localizes:  # a constant map says nothing about where
        nmap = 2.0 * explanation  # half the strongest evidence -> 1.0
        regions, how = find_regions(nmap, MIN_REGION_AREA), "LIME on the score"
    size = _thumb_size(*amap.shape)
    sy, sx = size[0] / amap.shape[0], size[1] / amap.shape[1]
    small_img, small_map = _resize(image, size), _resize(nmap, size)
    score_txt = f"score {norm:.2f}" if norm is not None else f"raw {pred.scores[i]:.4g}"
    title = (
        f"{score_txt}  {'DEFECT' if flagged else 'ok'}  ({len(regions)} region{'s' if len(regions) != 1 else ''})"
        + ("" if how == "detector's map" else f" [{how}]")
    )
    over = overlay_image(small_img, small_map, [_scale_region(r, sy, sx) for r in regions], title, flagged)
    truth = _truth_panel(small_img, evaluation.masks[i], sample.label, over.height - size[0])
    canvas = Image.new("RGB", (over.width + 4 + truth.width, over.height), (255, 255, 255))
    canvas.paste(over, (0, 0))
    canvas.paste(truth, (over.width + 4, 0))
    if sample.label == 0:
        tag = (
            "<span class='tag fa'>false alarm</span>"
            if flagged
            else "<span class='tag near'>good, below threshold</span>"
        )
    else:
        tag = "<span class='tag ok'>caught</span>" if flagged else "<span class='tag miss'>missed</span>"
    kind = "good" if sample.label == 0 else f"defect: {sample.defect_type}"
    score = (
        f"normalized score <b>{norm:.3f}</b> (raw {pred.scores[i]:.4g})"
        if norm is not None
        else f"raw score <b>{pred.scores[i]:.4g}</b>"
    )
    rel = f"{sample.path.parent.name}/{sample.path.name}"
    return (
        f"<figure style='width:{canvas.width + 18}px'><img alt='{_e(rel)}' src='{png_data_uri(canvas)}'>"
        f"<figcaption>{tag}<b>{_e(rel)}</b> · "
        f"{_e(kind)} · {score}{_regions_caption(regions, how)}</figcaption></figure>"
    )


def _gallery_section(
    evaluation: Evaluation,
    labels: np.ndarray,
    n: int,
    detector: Detector | None = None,
    explanations: Mapping[str, np.ndarray] | None = None,
) -> str:
    if n <= 0:
        return "<section id=gallery><h2>Gallery</h2><p class=empty>Left out (n_gallery=0).</p></section>"
    selection = gallery_indices(evaluation, n)
    goods, defects_low, caught = selection["goods"], selection["defects_low"], selection["caught"]
    shown = set(defects_low)
    explanations = explanations or {}

    def block(title: str, note: str, idx: list[int], empty: str) -> str:
        items = "".join(
            _gallery_item(evaluation, i, detector, explanations.get(str(evaluation.samples[i].path)))
            for i in idx
        )
        body = f"<div class=gallery>{items}</div>" if idx else f"<p class=empty>{empty}</p>"
        return f"<h3>{title}</h3><p class=legend>{note}</p>{body}"

    flagged = evaluation.prediction.is_anomalous
    n_fa = None if flagged is None else int((flagged & (labels == 0)).sum())
    n_miss = None if flagged is None else int((~flagged & (labels == 1)).sum())
    legend = (
        "Each row: the image | the image under the anomaly heat map (transparent below half the threshold; "
        "magenta boxes = defect regions ≥ 1.0) | the ground truth (green outline = defect mask)."
    )
    if detector is not None and not detector.localizes and explanations:
        legend += (
            " This detector scores whole images only, so its heat map is LIME on the anomaly score: "
            "superpixels whose normal replacement lowers the score; boxes where the evidence reaches half "
            "its maximum."
        )
    parts = [
        block(
            "Highest-scoring good images"
            + ("" if n_fa is None else f" — {n_fa} false alarm{'' if n_fa == 1 else 's'}"),
            "Good parts the detector finds most suspicious: flagged ones are false alarms.",
            goods,
            "No good images in the test set.",
        ),
        block(
            f"Lowest-scoring defective images{f' — {n_miss} missed' if n_miss is not None else ''}",
            "Defects the detector finds least suspicious: those below the threshold are misses.",
            defects_low,
            "No defective images in the test set.",
        ),
        block(
            "True detections",
            "Defects flagged by the detector, highest score first"
            + (" (not repeated from above)." if caught and caught[0] not in shown else "."),
            caught,
            "No defect was flagged." if labels.any() else "No defective images in the test set.",
        ),
    ]
    return f"<section id=gallery><h2>Gallery</h2><p class=note>{legend}</p>{''.join(parts)}</section>"


# -- public API ------------------------------------------------------------------------------------
def render_evaluation_report(
    evaluation: Evaluation,
    detector: Detector,
    n_gallery: int = 6,
    explanations: Mapping[str, np.ndarray] | None = None,
) -> str:
    """The report as one HTML string (no external resources); `explanations` as for
    `write_evaluation_report`."""
    labels, scores, normalized = _labels_scores(evaluation)
    flagged = evaluation.prediction.is_anomalous
    m = evaluation.metrics
    title = f"anomalens report: {getattr(detector, 'name', m.get('model', ''))} on {m.get('dataset', '')}"
    body = (
        _metrics_section(evaluation, detector, labels, normalized)
        + _curves_section(labels, scores, evaluation)
        + _scores_section(labels, scores, normalized, evaluation)
        + _gallery_section(evaluation, labels, max(0, int(n_gallery)), detector, explanations)
    )
    return page(title, _header(evaluation, detector, labels, flagged), body)


def write_evaluation_report(
    evaluation: Evaluation,
    detector: Detector,
    path: str | Path,
    n_gallery: int = 6,
    explanations: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write the self-contained HTML report of `evaluation` (from `workflows.evaluate.evaluate`) to `path`.

    Sections: header (model, dataset, date, verdict counts), metrics (overall and per defect type),
    image-level ROC and PR curves, histogram of normalized scores with the threshold at 1.0 and the
    confusion matrix at it, and a gallery of the `n_gallery` highest-scoring goods (false alarms),
    lowest-scoring defects (misses) and true detections. Returns the path written.

    `explanations` (image path -> map in [0, 1], e.g. `explain.gallery_explanations`) are drawn in
    the gallery of a detector whose own map is constant; the report computes none itself.
    """
    if not evaluation.samples:
        raise ValueError("nothing to report: the evaluation has no scored images")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = render_evaluation_report(evaluation, detector, n_gallery, explanations)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
