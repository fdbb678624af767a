"""Production scoring into the result store (`score`) and operating points (`threshold`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer

from anomalens.cli.common import RUNTIME_HELP, THREADS_HELP, Runtime, err, fail, out, user_errors

RULE_HELP = (
    "recall: highest threshold reaching --target recall (1.0 = no missed defect); fpr: lowest threshold "
    "within --target false-positive rate; f1: best F1; good_quantile: --target quantile of the goods' scores"
)


def score(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    source: str | None = typer.Argument(
        None,
        metavar="[INPUT]",
        help="folder (recursive), .csv list (column 'path'), image, or - for "
        "paths on stdin; omit with --watch",
    ),
    output: Path = typer.Option(..., "--output", "-o", help="result store (SQLite file; created if missing)"),
    pattern: str | None = typer.Option(
        None, "--glob", help="only files matching this glob under the folder, e.g. '**/cam2_*.png'"
    ),
    watch: Path | None = typer.Option(
        None, "--watch", help="score new files as they land in this folder (Ctrl-C stops)"
    ),
    poll: float = typer.Option(1.0, "--poll", help="watch: seconds between folder scans"),
    settle_polls: int = typer.Option(
        1, "--settle-polls", help="watch: scans a file's size must stay the same before it is read"
    ),
    idle_timeout: float = typer.Option(
        0, "--idle-timeout", help="watch: stop after this many seconds without a new file (0 = never)"
    ),
    batch_size: int = typer.Option(
        0, "--batch-size", help="images per model batch and per commit (0 = the model's batch_size)"
    ),
    workers: int = typer.Option(2, "--workers", help="image decoding threads"),
    maps: Path | None = typer.Option(
        None,
        "--maps",
        help="save each normalized anomaly map as a 16-bit PNG "
        "under this folder (path recorded in the store)",
    ),
    min_region: int = typer.Option(16, help="smallest defect region reported, in pixels"),
    max_pixels: float | None = typer.Option(
        None,
        "--max-pixels",
        help="refuse images with more pixels than this, from their header, before decoding "
        "(default: $ANOMALENS_MAX_PIXELS or 100e6)",
    ),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="rescore files stored as unreadable"),
    csv_out: Path | None = typer.Option(None, "--csv", help="export this model's results as CSV"),
    parquet_out: Path | None = typer.Option(None, "--parquet", help="export this model's results as Parquet"),
    top: int = typer.Option(0, "--top", help="write overlays of the K most anomalous images"),
    top_dir: Path | None = typer.Option(
        None, "--top-dir", help="folder for --top (default: next to the store, <name>_top/)"
    ),
    engine: str = typer.Option("local", "--engine", help="local, or ray (Ray Data batch inference)"),
    address: str | None = typer.Option(
        None, "--address", help="ray: cluster address (e.g. auto or ray://head:10001); omitted = a local Ray"
    ),
    ray_workers: int = typer.Option(1, "--ray-workers", help="ray: scoring actors (one model copy each)"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    runtime: Runtime = typer.Option(Runtime.torch, "--runtime", case_sensitive=False, help=RUNTIME_HELP),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Score a production archive into a result store; rerunning resumes where it stopped.

    Each batch is committed in one transaction, so killing the job loses at most that batch, and
    the same command skips every image already stored for this model (model id = method +
    hash of the model file). Unreadable files are stored with their error, not fatal. Several
    `score` processes on one store split the images between them (each claims a batch at a time).

    Examples:
      anomalens score tile.model /archive/2026-11 -o results.db --csv results.csv --top 50
      find /archive -name '*.png' | anomalens score tile.model - -o results.db
      anomalens score tile.model --watch /camera/out -o results.db
      anomalens score tile.model /archive/2026-11 -o results.db --runtime openvino
      anomalens score tile.model /shared/archive -o results.db --engine ray --address auto --ray-workers 8
    """
    from anomalens.export import ExportError, load_model
    from anomalens.store import ResultStore, StoreError
    from anomalens.workflows.scoring import (
        Scorer,
        export_top,
        iter_input_paths,
        model_id_for,
        score_into_store,
    )

    if (source is None) == (watch is None):
        fail(
            "give INPUT (folder, .csv, image or -) or --watch DIR, not both"
            if source
            else "give INPUT (folder, .csv, image or -) or --watch DIR"
        )
    if engine not in ("local", "ray"):
        fail(f"--engine must be local or ray, got {engine!r}")
    if engine == "ray" and watch is not None:
        fail("--watch runs locally: drop --engine ray")
    if max_pixels is not None and max_pixels < 1:
        fail(f"--max-pixels must be a positive number of pixels, got {max_pixels:g}")
    limit = None if max_pixels is None else int(max_pixels)
    if engine == "ray" and runtime != Runtime.torch:
        fail("--engine ray scores with torch: drop --runtime")
    try:
        detector = load_model(model_file, runtime.value, threads=threads, device=device)
        model_id, digest = model_id_for(model_file, detector.name)
        store = ResultStore(output)
    except (ExportError, *user_errors(), StoreError) as e:
        fail(str(e))
    batch = batch_size or detector.options["batch_size"]
    with store:
        cal = detector.decision_calibration
        try:
            store.register_model(
                model_id,
                detector=detector.name,
                file_sha256=digest,
                model_path=str(model_file),
                threshold=cal.threshold if cal else None,
                operating_point=detector.operating_point,
            )
            scorer = Scorer(detector, model_id, min_region=min_region, maps_dir=maps, max_pixels=limit)
            if watch is not None:
                from anomalens.workflows.watch import watch_folder

                err.print(f"watching {watch} (every {poll:g} s; Ctrl-C stops); results in {output}")
                summary = watch_folder(
                    scorer,
                    store,
                    watch,
                    pattern=pattern,
                    poll_seconds=poll,
                    settle_polls=settle_polls,
                    batch_size=batch,
                    workers=workers,
                    idle_timeout=idle_timeout or None,
                )
            else:
                paths = iter_input_paths(source, pattern)
                if source != "-":
                    paths = list(paths)  # known length: the progress bar shows an ETA
                if engine == "ray":
                    from anomalens.workflows.distributed import score_with_ray

                    summary = score_with_ray(
                        model_file,
                        model_id,
                        store,
                        paths,
                        address=address,
                        num_workers=ray_workers,
                        batch_size=batch,
                        min_region=min_region,
                        maps_dir=maps,
                        retry_errors=retry_errors,
                        progress=not quiet,
                        max_pixels=limit,
                    )
                else:
                    summary = score_into_store(
                        scorer,
                        store,
                        paths,
                        batch_size=batch,
                        workers=workers,
                        progress=not quiet,
                        retry_errors=retry_errors,
                    )
        except KeyboardInterrupt:
            fail(
                f"interrupted; {store.count(model_id)} images of {model_id} are stored in {output}: "
                "run the same command to resume",
                130,
            )
        except (*user_errors(), StoreError) as e:
            fail(str(e))
        out.print(
            f"{model_id}: scored {summary.n_scored} images ({summary.images_per_second:.1f} img/s), "
            f"{summary.n_errors} unreadable, {summary.n_skipped} already stored"
            + (f", {summary.n_elsewhere} left to another scorer" if summary.n_elsewhere else "")
            + "; "
            f"{store.count(model_id, decision='defect')} of {store.count(model_id, status='ok')} flagged "
            f"in {output}",
            highlight=False,
            soft_wrap=True,
        )
        try:
            if csv_out:
                out.print(f"wrote {store.export_csv(csv_out, model_id)}")
            if parquet_out:
                out.print(f"wrote {store.export_parquet(parquet_out, model_id)}")
            if top:
                folder = top_dir or output.with_name(output.stem + "_top")
                written = export_top(store, scorer, top, folder)
                out.print(f"wrote {len(written)} overlays of the most anomalous images to {folder}")
        except (OSError, StoreError) as e:  # after scoring: the results are safe in the store
            reason = f"'{e.filename}': {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
            fail(
                f"cannot write {reason}; the {store.count(model_id)} results stay in {output}: "
                "export them again with a writable path"
            )


def threshold(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    data: Path = typer.Argument(
        ...,
        help="labelled images (MVTec layout or CSV; its test split is used): "
        "a validation set, not the images you will report on",
    ),
    rule: str = typer.Option("recall", "--rule", help=RULE_HELP),
    target: float | None = typer.Option(
        None,
        "--target",
        help="recall, FPR or quantile for the rule "
        "(default 1.0 for recall, 0.01 for fpr, 0.99 "
        "for good_quantile)",
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="model file to write with the chosen point (default: update MODEL)"
    ),
    save: bool = typer.Option(True, "--save/--no-save", help="store the point in the model file"),
    curve_out: Path | None = typer.Option(None, "--curve", help="write the threshold curve as CSV"),
    json_out: Path | None = typer.Option(None, "--json", help="write the point and metrics as JSON"),
    holdout: float = typer.Option(
        0.0,
        "--holdout",
        help="choose on a seeded share of the labelled images and report the threshold on the rest, "
        "which the choice never saw (e.g. 0.5)",
    ),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable images instead of stopping"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Choose the operating point (decision threshold) on labelled data and store it in the model.

    Reports recall, FPR, precision and the share of goods that pass at the chosen point, and the
    high-recall metrics (partial AUROC for TPR >= 0.9, FPR and accuracy at 100 % recall). Once
    stored, `predict` and `score` decide with it instead of the calibrated threshold. The model
    file records which images it was chosen on: `evaluate` on those images says its numbers are
    optimistic. With --holdout 0.5 the point is chosen on half and reported on the other half.

    Example: anomalens threshold tile.model validation/ --rule recall --target 1.0 --holdout 0.5
    """
    from anomalens.data import load_dataset
    from anomalens.models.base import Detector
    from anomalens.thresholds import threshold_curve
    from anomalens.workflows.threshold import choose_operating_point

    try:
        detector = Detector.load(model_file)
        detector.options["device"] = device
        choice = choose_operating_point(
            detector,
            load_dataset(data),
            rule,
            target,
            progress=not quiet,
            on_error="skip" if skip_bad else "raise",
            holdout=holdout,
        )
    except user_errors() as e:
        fail(str(e))
    point, labels, high, target = choice.point, choice.labels, choice.high_recall, choice.point.target
    calibrated = detector.calibration.threshold if detector.calibration else None
    versus = f" (calibrated: {calibrated:.6g})" if calibrated is not None else ""
    out.print(
        f"operating point ({rule}{'' if target is None else f' {target:g}'}) chosen on {len(labels)} images "
        f"({sum(labels)} defective): threshold {point.threshold:.6g}{versus}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"  recall {point.recall:.4f} ({point.fn} missed)   FPR {point.fpr:.4f} ({point.fp} false alarms)   "
        f"precision {point.precision:.4f}   goods passing {point.good_pass_rate:.4f}",
        highlight=False,
        soft_wrap=True,
    )
    if high:
        out.print(
            f"  pAUROC (TPR >= {high['pauroc_min_tpr']}) {high['image_pauroc_high_recall']:.4f}   "
            f"at 100 % recall: FPR {high['fpr_at_full_recall']:.4f}, "
            f"accuracy {high['accuracy_at_full_recall']:.4f}",
            highlight=False,
            soft_wrap=True,
        )
    if choice.holdout is not None:
        held = choice.holdout
        out.print(
            f"  on the {choice.n_holdout} held-out images (never used to choose): recall {held.recall:.4f} "
            f"({held.fn} missed)   FPR {held.fpr:.4f} ({held.fp} false alarms)   precision {held.precision:.4f}",
            highlight=False,
            soft_wrap=True,
        )
    if curve_out:
        rows = threshold_curve(labels, choice.scores).rows()
        curve_out.parent.mkdir(parents=True, exist_ok=True)
        with open(curve_out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        out.print(f"wrote {curve_out}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(
            json.dumps(
                {
                    "operating_point": point.to_dict(),
                    "chosen_on": {k: v for k, v in choice.chosen_on.items() if k != "image_digests"},
                    "holdout": None
                    if choice.holdout is None
                    else {"n_images": choice.n_holdout, **choice.holdout.to_dict()},
                    "calibrated_threshold": calibrated,
                    **high,
                },
                indent=2,
            )
        )
        out.print(f"wrote {json_out}")
    if save:
        detector.operating_point = choice.stored()
        written = detector.save(output or model_file)
        out.print(f"stored the operating point in {written} (a new model id for `score`)")
