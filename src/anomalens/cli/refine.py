"""`refine`: a supervised stage on top of a fitted model, trained on a few labelled images."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from anomalens.cli.common import fail, out, user_errors


def refine(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    labels: Path | None = typer.Option(
        None,
        "--labels",
        help="labelled images: a CSV (path,label), a folder with good/ beside one folder per defect type, "
        "an MVTec category whose train/ holds defect folders, or a result store (.db) labelled on the review page",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        help="with --train-defects: the MVTec-layout dataset whose test defects lend K per type",
    ),
    train_defects: int | None = typer.Option(
        None,
        "--train-defects",
        min=1,
        help="take K seeded test defects per type (and as many test goods) of --data as the labels; "
        "`evaluate --train-defects K --seed S` then leaves exactly those out",
    ),
    classifier: str = typer.Option(
        "extra_trees", "--classifier", help="extra_trees, logistic, adaboost or hist_gradient_boosting"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the folds, the classifier and --train-defects"),
    output: Path = typer.Option(..., "--output", "-o", help="refined model file to write"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Train a classifier on a few labelled images on top of a model's score and map.

    Per image it reads the score, map statistics (peak, mean, spread, 99th percentile), the area
    above the pixel threshold, the region count and the largest region; the classifier's defect
    probability becomes the image score, deciding at the full-recall threshold chosen by
    cross-validation. Recall and false-alarm rate before and after are cross-validated: each
    fold is judged by a threshold and classifier that never saw it.

    Example: anomalens refine tile.model --data DATA --train-defects 5 -o tile-refined.model
    """
    from anomalens.data import load_dataset
    from anomalens.data.labels import split_train_defects
    from anomalens.models.base import Detector
    from anomalens.workflows.refine import read_labels
    from anomalens.workflows.refine import refine as run_refine

    if (labels is None) == (train_defects is None):
        fail("give either --labels SOURCE or --data DATA --train-defects K")
    if train_defects is not None and data is None:
        fail("--train-defects needs --data DATA (an MVTec-layout dataset with test defects)")
    try:
        detector = Detector.load(model_file)
        if labels is not None:
            samples, source = read_labels(labels), str(labels)
        else:
            _, samples = split_train_defects(load_dataset(data), train_defects, seed)
            source = f"{data} (--train-defects {train_defects}, seed {seed})"
        refined, report = run_refine(
            detector, samples, classifier=classifier, seed=seed, source=source, progress=not quiet
        )
        refined.save(output)
    except user_errors() as e:
        fail(str(e))
    table = Table(
        title=f"{model_file.name} + {classifier}: {report.n_defect} defects, {report.n_good} goods, {report.folds}-fold"
    )
    table.add_column("at full recall (cross-validated)")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key, label in (
        ("recall", "recall"),
        ("false_alarm_rate", "false-alarm rate"),
        ("zfn_accuracy", "ZFN accuracy"),
    ):
        table.add_row(label, f"{report.before[key]:.3f}", f"{report.after[key]:.3f}")
    out.print(table)
    out.print(f"wrote {output}")
