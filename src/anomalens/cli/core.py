"""The main job: fit, predict, evaluate (with its HTML report), demo, models."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from anomalens.cli.common import (
    RUNTIME_HELP,
    SET_HELP,
    THREADS_HELP,
    Runtime,
    err,
    fail,
    out,
    parse_sets,
    user_errors,
)

REPORT_HELP = (
    "write a self-contained HTML report: metrics, ROC/PR curves, score histogram with the threshold, "
    "confusion matrix, gallery of false alarms, misses and detections"
)


def write_report(evaluation, detector, path: Path, n_gallery: int = 6) -> Path:
    """`evaluate --report PATH`: write the HTML report and say where it is."""
    from anomalens.explain import gallery_explanations
    from anomalens.report.html_report import write_evaluation_report

    # a detector without a map gets LIME on its score for the gallery images: where the score comes from
    explanations = None if detector.localizes else gallery_explanations(detector, evaluation, n_gallery)
    written = write_evaluation_report(
        evaluation, detector, path, n_gallery=n_gallery, explanations=explanations
    )
    out.print(f"wrote {written}")
    return written


def _metrics_table(metrics: dict, title: str) -> Table:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro", "aupimo"):
        value = metrics.get(key)
        table.add_row(key, "n/a" if value is None else f"{value:.4f}")
    zfn = metrics.get("accuracy_at_full_recall")
    if zfn is not None:
        table.add_row("ZFN (accuracy at 100 % recall)", f"{zfn:.4f}")
        table.add_row("false-alarm rate at 100 % recall", f"{metrics['fpr_at_full_recall']:.4f}")
    at = metrics.get("at_threshold")
    if at:
        source = metrics.get("threshold_source") or {}
        kind = "operating point" if source.get("kind") == "operating_point" else "goods quantile"
        table.add_row(f"F1 at the threshold ({kind})", f"{at['f1']:.4f}")
        table.add_row("missed defects / false alarms", f"{at['fn']} / {at['fp']}")
    drift = metrics.get("drift")
    if drift:
        table.add_row(
            "images outside the training range", f"{drift['n_images_flagged']} of {metrics['n_images']}"
        )
    return table


def _notes(metrics: dict) -> list[str]:
    """What evaluate says beside its table: where the threshold came from (and whether it saw these
    images), an image score that misses what the map finds, drift examples and a batch shift of the test goods."""
    source = metrics.get("threshold_source") or {}
    lines = [f"  threshold: {source['text']}"] if source else []
    if source.get("warning"):
        lines.append(
            f"  warning: the threshold was {source['warning']} (its precision and recall here are not a test)"
        )
    if metrics.get("n_left_out_trained_on"):
        lines.append(
            f"  left out: {metrics['n_left_out_trained_on']} labelled test images the model learnt from"
        )
    if metrics.get("score_warning"):
        lines.append(f"  warning: {metrics['score_warning']}")
    drift = metrics.get("drift") or {}
    lines += [f"  outside the training range: {example}" for example in drift.get("examples", [])]
    lines += [f"  drift: the test goods are {shift}" for shift in drift.get("goods_batch_shift", [])]
    return lines


def fit(
    data: Path = typer.Argument(
        ..., help="MVTec- or BTAD-layout category folder, folder of good images, or CSV list"
    ),
    model: str = typer.Option("patchcore", "--model", "-m", help="detector name (see `anomalens models`)"),
    output: Path = typer.Option(..., "--output", "-o", help="model file to write"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="trained models: continue an interrupted fit from its checkpoint (same command otherwise)",
    ),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="trained models: wall-clock training budget in minutes (0 = none)"
    ),
    checkpoint_dir: Path | None = typer.Option(
        None,
        "--checkpoint-dir",
        help="trained models: where the per-epoch checkpoint goes (default: <output>.checkpoints)",
    ),
    roi: Path | None = typer.Option(
        None,
        "--roi",
        help="region of interest: a mask image, white = inspect; pixels outside never score or give regions "
        "(stored in the model file)",
    ),
    multi: bool = typer.Option(
        False,
        "--multi",
        help="one model for several products: DATA is a folder of MVTec categories or a CSV with a product "
        "column; --model (patchcore or padim) is fitted per product, with a router (see docs/products.md)",
    ),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="labelled images for the methods that learn from defects (vqganodip, cyclegan_ad, capsnet, "
        "unet): a CSV (path,label[,mask]), a folder with good/ beside <defect>/ folders, or a result store "
        "labelled on the review page (its defects are used; the goods come from DATA)",
    ),
    train_defects: int | None = typer.Option(
        None,
        "--train-defects",
        help="MVTec layout: K seeded test defects per type join the training; "
        "`evaluate --train-defects K --seed S` then leaves exactly those out",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of --train-defects"),
) -> None:
    """Learn normality from the training good images and calibrate the threshold.

    A deterministic 10 % of the goods is held out to calibrate the decision threshold
    (change with --set calibration_fraction=0.2); test images are never used.

    Example: anomalens fit ../shared/datasets/magnetic_tile/magnetic_tile --model patchcore -o tile.model

    Real parts at their own shape: --set resize=letterbox keeps the aspect ratio (image_size is the
    long side, or HxW), --set resize=native --set scale=0.5 keeps the pixel scale, and with
    --set tile=256 large images are cut into overlapping tiles. Example:
    anomalens fit strips/ --set resize=native --set scale=0.5 --set tile=256 --roi strip_mask.png -o strip.model

    Trained models (autoencoder, fanogan, ganomaly, ...) checkpoint every epoch; after a crash
    or Ctrl-C, rerun the same command with --resume. Example:
    anomalens fit ../shared/datasets/magnetic_tile/magnetic_tile -m autoencoder --max-minutes 10 -o ae.model

    Few goods: --set shots=4 fits on 4 seeded goods, --set augment_copies=8 adds 8 flipped, rotated and
    shifted copies of each; with 5 goods or fewer the threshold comes from augmented leave-one-out scores
    (with a warning: it is uncertain).

    Several products: anomalens fit line/ --multi -o line.model (line/<product>/train/good/...);
    --set routing=shared learns one bank for products too alike to route.

    A few confirmed defects: the methods that learn from them take --labels SOURCE, or on an MVTec-layout
    benchmark --train-defects K (evaluate with the same K and --seed). Example:
    anomalens fit tile/ -m capsnet --train-defects 5 -o caps.model, then
    anomalens evaluate caps.model tile/ --train-defects 5
    """
    if multi:
        return _fit_multi(
            data,
            model,
            output,
            set_,
            device,
            quiet,
            resume or max_minutes or checkpoint_dir or roi or labels or train_defects is not None,
        )
    from anomalens.data import load_dataset
    from anomalens.data.labels import split_train_defects
    from anomalens.models.trainable import TrainableDetector
    from anomalens.registry import create
    from anomalens.workflows.refine import read_labels

    if labels is not None and train_defects is not None:
        fail("give --labels SOURCE or --train-defects K, not both")
    try:
        dataset = load_dataset(data)
        if not dataset.train:
            fail(f"'{data}' has no training images")
        labelled = []
        if train_defects is not None:
            dataset, labelled = split_train_defects(dataset, train_defects, seed)
        elif labels is not None:
            labelled = read_labels(labels)
        defect_samples = [s for s in labelled if s.label == 1]
        fit_labels = {"defects": defect_samples, "defect_masks": [s.mask_path for s in defect_samples]}
        sets = parse_sets(set_)
        if max_minutes is not None:
            sets["max_minutes"] = str(max_minutes)
        detector = create(model, device=device, **sets)
        detector.set_roi(roi)
        err.print(f"{dataset.summary()}")
        if labelled:
            err.print(f"labelled: {len(defect_samples)} defects learnt from")
        if isinstance(detector, TrainableDetector):
            detector.fit(
                dataset.train,
                progress=not quiet,
                resume=resume,
                checkpoint_dir=checkpoint_dir or output.with_name(output.name + ".checkpoints"),
                **fit_labels,
            )
        elif resume or max_minutes is not None or checkpoint_dir is not None:
            fail(
                f"model {model!r} is not trained by epochs: --resume, --max-minutes and --checkpoint-dir "
                "do not apply to it"
            )
        else:
            detector.fit(dataset.train, progress=not quiet, **fit_labels)
        detector.save(output)
    except user_errors() as e:
        fail(str(e))
    info = detector.fit_info
    for warning in info.get("warnings", []):
        err.print(f"warning: {warning}", highlight=False)
    out.print(
        f"fitted {model} on {info['n_fit']} images ({info['n_calibration']} held out for calibration) "
        f"in {info['fit_seconds']:.1f} s; threshold {detector.calibration.threshold:.4g}; wrote {output}"
    )


def _fit_multi(
    data: Path, model: str, output: Path, set_: list[str], device: str, quiet: bool, extra
) -> None:
    """`fit --multi`: one detector per product and a router, in one model file."""
    from anomalens.data import load_products
    from anomalens.registry import create

    if extra:
        fail(
            "--multi fits PatchCore or PaDiM per product: --resume, --max-minutes, --checkpoint-dir and --roi "
            "do not apply"
        )
    try:
        products = load_products(data)
        sets = parse_sets(set_)
        sets.setdefault("method", model)
        detector = create("multi", device=device, **sets)
        err.print(", ".join(f"{name}: {len(d.train)} goods" for name, d in products.items()), highlight=False)
        detector.fit({name: d.train for name, d in products.items()}, progress=not quiet)
        detector.save(output)
    except user_errors() as e:
        fail(str(e))
    for warning in detector.fit_info.get("warnings", []):
        err.print(f"warning: {warning}", highlight=False)
    out.print(
        f"fitted {detector.options['method']} for {len(products)} products ({detector.options['routing']} routing) "
        f"on {detector.fit_info['n_fit']} images in {detector.fit_info['fit_seconds']:.1f} s; wrote {output}"
    )


def _parse_min_region(text: str) -> tuple[int, float]:
    """`--min-region-area`: '16' is pixels, '0.5%' a share of the image -> (min_area, min_share)."""
    try:
        if text.strip().endswith("%"):
            share = float(text.strip()[:-1]) / 100
            if not 0 <= share < 1:
                raise ValueError
            return 0, share
        pixels = int(text)
        if pixels < 0:
            raise ValueError
        return pixels, 0.0
    except ValueError:
        fail(f"--min-region-area {text!r}: give pixels (16) or a share of the image below 100% (0.5%)")


def predict(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    inputs: list[Path] = typer.Argument(..., metavar="INPUT...", help="image files and/or folders"),
    output: Path = typer.Option(
        ..., "--output", "-o", help="folder for scores.csv, regions.jsonl and overlays/"
    ),
    overlays: bool = typer.Option(True, help="write an image | heat-map overlay PNG per image"),
    skip_bad: bool = typer.Option(
        False,
        "--skip-bad",
        help="skip unreadable images (listed in skipped.txt) instead of stopping at the first",
    ),
    min_region: str = typer.Option(
        "16",
        "--min-region-area",
        "--min-region",
        help="smallest defect region reported: pixels (16) or a share of the image (0.5%)",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", case_sensitive=False, help=RUNTIME_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    max_pixels: float | None = typer.Option(
        None,
        "--max-pixels",
        help="refuse images with more pixels than this, from their header, before decoding "
        "(default: $ANOMALENS_MAX_PIXELS or 100e6)",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Score images: scores.csv (score, normalized score, verdict, regions) and overlay PNGs.

    Normalized scores put the calibrated threshold at 1.0: an image is flagged when its
    normalized score is >= 1. Rows are written as images are scored, so an interrupted run
    keeps every result so far.

    Example: anomalens predict tile.model new_parts/ -o out/
    """
    from anomalens.data.inputs import as_items
    from anomalens.export import ExportError, load_model
    from anomalens.workflows.predict import PredictSummary, predict_to_folder

    min_area, min_share = _parse_min_region(str(min_region))
    if max_pixels is not None and max_pixels < 1:
        fail(f"--max-pixels must be a positive number of pixels, got {max_pixels:g}")
    try:
        detector = load_model(model_file, runtime.value, threads=threads, device=device)
        items = as_items(inputs)
        if not items:
            fail("no images found in " + ", ".join(map(str, inputs)))
    except (ExportError, *user_errors()) as e:
        fail(str(e))
    summary = PredictSummary(output)
    try:
        predict_to_folder(
            detector,
            items,
            output,
            overlays=overlays,
            on_error="skip" if skip_bad else "raise",
            min_area=min_area,
            min_share=min_share,
            progress=not quiet,
            summary=summary,
            max_pixels=None if max_pixels is None else int(max_pixels),
        )
    except KeyboardInterrupt:
        fail(f"interrupted after {summary.n_scored} images; results so far are in {summary.scores_csv}", 130)
    except user_errors() as e:
        fail(f"{e} (after {summary.n_scored} images; results so far are in {summary.scores_csv})")
    except OSError as e:  # the output folder: not writable, a file in its place, disk full
        where = e.filename or output
        fail(f"cannot write '{where}': {e.strerror or e} (after {summary.n_scored} images)")
    if summary.n_drift:
        err.print(
            f"warning: {summary.n_drift} of {summary.n_scored} images are outside the training goods' range "
            "(brightness, size, sharpness or look; see the drift column): a large defect can do that, a new "
            "camera, light or part too, and then the verdicts are less certain",
            highlight=False,
        )
    out.print(
        f"scored {summary.n_scored} images, {summary.n_flagged} flagged; wrote {summary.scores_csv}"
        + (
            f"; skipped {len(summary.skipped)} unreadable (see {summary.skipped_txt})"
            if summary.skipped
            else ""
        )
    )


def evaluate(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    data: Path = typer.Argument(..., help="dataset with a test split (MVTec layout or CSV)"),
    json_out: Path | None = typer.Option(None, "--json", help="write all metrics to this JSON file"),
    report: Path | None = typer.Option(None, "--report", help=REPORT_HELP),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable images instead of stopping"),
    pixel_size: int | None = typer.Option(
        None,
        "--pixel-size",
        min=8,
        help="compare maps and masks at SxS for pixel metrics (anomalib's protocol) instead of each "
        "image's own resolution",
    ),
    train_defects: int | None = typer.Option(
        None,
        "--train-defects",
        min=1,
        help="leave out the K seeded test defects per type (and goods) that `refine --train-defects K` "
        "trained on (same --seed)",
    ),
    seed: int = typer.Option(0, "--seed", help="seed of --train-defects"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Score the test split and report every metric, overall and per defect type.

    Image AUROC, AP, F1-max, pixel AUROC, pixel AP, AUPRO, and precision / recall / missed
    defects / false alarms at the calibrated threshold; --report writes them as an HTML page.

    Example: anomalens evaluate tile.model ../shared/datasets/magnetic_tile/magnetic_tile --json metrics.json
    """
    from anomalens.data import load_dataset
    from anomalens.data.labels import split_train_defects
    from anomalens.models.base import Detector
    from anomalens.workflows.evaluate import evaluate as run_evaluation

    try:
        detector = Detector.load(model_file)
        detector.options["device"] = device
        if detector.name == "multi" and not (data.is_dir() and (data / "train").is_dir()):
            if report:
                fail("--report takes one product: evaluate a multi-product model on one category for it")
            return _evaluate_products(detector, model_file, data, json_out, skip_bad, pixel_size, quiet)
        dataset = load_dataset(data)
        if train_defects is not None:
            dataset, _ = split_train_defects(dataset, train_defects, seed)
        result = run_evaluation(
            detector,
            dataset,
            progress=not quiet,
            on_error="skip" if skip_bad else "raise",
            pixel_size=pixel_size,
        )
    except user_errors() as e:
        fail(str(e))
    out.print(_metrics_table(result.metrics, f"{model_file.name} on {result.metrics['dataset']}"))
    for line in _notes(result.metrics):
        err.print(line, highlight=False)
    if result.prediction.skipped:
        err.print(f"skipped {len(result.prediction.skipped)} unreadable images")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result.metrics, indent=2))
        out.print(f"wrote {json_out}")
    if report:
        write_report(result, detector, report)


def _evaluate_products(detector, model_file: Path, data: Path, json_out, skip_bad, pixel_size, quiet) -> None:
    """`evaluate` of a multi-product model on every product: a table per product and overall, routing."""
    from anomalens.data import load_products
    from anomalens.workflows.evaluate import evaluate_products

    try:
        metrics, _ = evaluate_products(
            detector,
            load_products(data),
            progress=not quiet,
            on_error="skip" if skip_bad else "raise",
            pixel_size=pixel_size,
        )
    except user_errors() as e:
        fail(str(e))
    table = Table(title=f"{model_file.name} per product")
    for column in (
        "product",
        "images",
        "image AUROC",
        "pixel AUROC",
        "AUPRO",
        "F1 at threshold",
        "routed here",
    ):
        table.add_column(column, justify="left" if column == "product" else "right")
    routing = metrics["routing"]["per_product"]

    def cell(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    for name, m in [*metrics["products"].items(), ("overall", metrics["overall"])]:
        at = (m.get("at_threshold") or {}).get("f1")
        acc = routing[name]["accuracy"] if name in routing else metrics["routing"]["accuracy"]
        table.add_row(
            name,
            str(m["n_images"]),
            cell(m["image_auroc"]),
            cell(m["pixel_auroc"]),
            cell(m["aupro"]),
            cell(at),
            f"{acc:.1%}",
        )
    out.print(table)
    unmatched = metrics["routing"]["goods_matching_no_product"]
    if unmatched:
        err.print(
            f"  warning: {unmatched} test goods match no product (flagged); see route_margin", highlight=False
        )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(metrics, indent=2, default=float))
        out.print(f"wrote {json_out}")


def demo(
    output: Path = typer.Option(
        Path("anomalens-demo"), "--output", "-o", help="folder for data, model and results"
    ),
    model: str = typer.Option("patchcore", "--model", "-m", help="detector to demonstrate"),
    kind: str = typer.Option("object", help="synthetic data: object (a part seen from above) or texture"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Run the whole job on embedded synthetic data: no downloads, no external data.

    Generates a tiny dataset of parts with drawn defects and exact masks, fits PatchCore,
    evaluates it (metrics.json, report.html) and scores the test images (predictions/).

    Example: anomalens demo -o demo/
    """
    from anomalens.data import make_synthetic_dataset

    data = output / f"data-{kind}"
    if (data / "train" / "good").is_dir():  # the generator is seeded: an earlier demo's data is the same
        err.print(f"reusing synthetic {kind} data in {data}")
    else:
        make_synthetic_dataset(
            data, kind=kind, n_train=60, n_test_good=12, n_test_defect=12, size=128, seed=0
        )
        err.print(f"synthetic {kind} data in {data}")
    # 12 calibration goods: a 0.99 quantile of fewer is little more than their maximum
    fit(
        data,
        model=model,
        output=output / "demo.model",
        set_=["image_size=128", "calibration_fraction=0.2"],
        device="auto",
        quiet=quiet,
        resume=False,
        max_minutes=None,
        checkpoint_dir=None,
        roi=None,
        multi=False,
        labels=None,
        train_defects=None,
        seed=0,
    )
    evaluate(
        output / "demo.model",
        data,
        json_out=output / "metrics.json",
        report=output / "report.html",
        skip_bad=False,
        pixel_size=None,
        train_defects=None,
        seed=0,
        device="auto",
        quiet=quiet,
    )
    predict(
        output / "demo.model",
        [data / "test"],
        output=output / "predictions",
        overlays=True,
        skip_bad=False,
        min_region="16",
        device="auto",
        runtime=Runtime.torch,
        threads=None,
        max_pixels=None,
        quiet=quiet,
    )


def models() -> None:
    """List the detectors and their options with defaults (pass them with --set key=value).

    Which trained method suits which kind of part (image and pixel AUROC, AUPRO, fit time and their
    spread over seeds, per data set): docs/report_card.md, written by benchmarks/report_card.py.
    """
    from anomalens.registry import available, get_class

    table = Table(title="detectors")
    table.add_column("name")
    table.add_column("options (defaults)")
    for name in available():
        cls = get_class(name)
        opts = {**cls.base_defaults, **cls.defaults}
        table.add_row(name, ", ".join(f"{k}={v}" for k, v in opts.items()))
    out.print(table)
    out.print(
        "which trained method suits which kind of part (accuracy, fit time, spread over seeds): "
        "docs/report_card.md (regenerate it with benchmarks/report_card.py)",
        highlight=False,
    )
