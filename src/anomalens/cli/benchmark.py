"""Comparisons: `benchmark` (registered detectors over categories and seeds) and `classical-study`."""

from __future__ import annotations

from pathlib import Path

import typer

from anomalens.cli.common import err, fail, out, user_errors
from anomalens.workflows.classical_study import DEFAULT_FEATURES


def benchmark(
    data: Path = typer.Option(
        ...,
        "--data",
        help="folder of MVTec- or BTAD-layout categories (searched 2 levels deep), or one category folder",
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="folder for cells.jsonl, benchmark.json/.md/.html"
    ),
    models: str = typer.Option(
        "patchcore,padim",
        "--models",
        help="comma-separated detector names; classical:all for the 15 PyOD detectors",
    ),
    seeds: int = typer.Option(3, "--seeds", help="seeds 0..N-1 for methods that depend on the seed"),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="model.option=value for that model only, repeatable "
        "(e.g. --set patchcore.coreset_ratio=0.01); a bare "
        "option=value applies to every model",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    cell_timeout: float = typer.Option(0, "--cell-timeout", help="seconds allowed per cell, 0 = no limit"),
    train_defects: int = typer.Option(
        0,
        "--train-defects",
        help="the labelled-defects protocol: K seeded test defects per type lent to training (every model "
        "runs every seed, all evaluated on the rest); methods that learn from defects get them, and "
        "NAME+refine adds `anomalens refine` on them",
    ),
) -> None:
    """Run every model on every category (over seeds) and write a comparison: JSON, Markdown, HTML.

    Each (model, category, seed) cell runs in its own process: fit, model file size, every metric,
    predict images/s, single-image latency, peak RSS. Finished cells are appended to
    OUTPUT/cells.jsonl at once, so an interrupted benchmark resumes where it stopped when you run
    the same command again (failed cells are retried).

    Example: anomalens benchmark --data ../shared/datasets --models patchcore,padim -o bench/ --seeds 3

    A few labelled defects (the papers' protocol, K = 5 per type, 5 seeds):
    anomalens benchmark --data DATA --models patchcore,patchcore+refine,capsnet --train-defects 5 --seeds 5 -o bench/
    """
    from anomalens.models.classical import expand_models
    from anomalens.report.benchmark_report import write_outputs
    from anomalens.workflows.benchmark import parse_model_sets, run_benchmark

    names = expand_models(models)  # classical:all -> the 15 PyOD detectors
    try:
        sets = parse_model_sets(set_, names)
        if device != "auto":
            for options in sets.values():
                options.setdefault("device", device)
        result = run_benchmark(
            names,
            data,
            output,
            seeds=seeds,
            sets=sets,
            train_defects=train_defects,
            timeout=cell_timeout or None,
            log=lambda message: err.print(message, highlight=False, soft_wrap=True),
        )
        outputs = write_outputs(output, result.config, result.cells, result.summary)
    except KeyboardInterrupt:
        _interrupted(output)
    except user_errors() as e:
        fail(str(e))
    for row in result.summary:
        auroc = row["image_auroc"]
        text = (
            "n/a"
            if auroc is None
            else (f"{auroc['mean']:.3f} ± {auroc['std']:.3f}" if auroc["n"] > 1 else f"{auroc['mean']:.3f}")
        )
        out.print(
            f"{row['model']:>12}  {row['category']}: image AUROC {text} ({len(row['seeds'])} seeds"
            + (f", {len(row['failed_seeds'])} failed)" if row["failed_seeds"] else ")"),
            highlight=False,
        )
    out.print(
        f"ran {result.n_run} cells, kept {result.n_reused} finished before; wrote "
        f"{outputs['html']}, {outputs['markdown']}, {outputs['json']}"
    )
    if result.failed:
        err.print(
            f"{len(result.failed)} cells failed (listed in {outputs['markdown']}); "
            "run the same command again to retry them"
        )
        raise typer.Exit(1)


def classical_study(
    data: Path = typer.Argument(
        ..., help="MVTec-layout category folder (train/good, test/<type>) or CSV list"
    ),
    models: str = typer.Option(
        "classical:all", "--models", help="comma-separated classical detectors, classical:all for the 15"
    ),
    features: str = typer.Option(
        ",".join(DEFAULT_FEATURES),
        "--features",
        help="comma-separated representations: raw, pca:K, kpca-rbf:K (poly, sigmoid, "
        "cosine), deep[:1+2+3+4], patch[:2+3]",
    ),
    output: Path = typer.Option(
        Path("classical_study"),
        "--output",
        "-o",
        help="folder for cells.jsonl, study.json, study.md and cached features",
    ),
    set_: list[str] = typer.Option(
        [],
        "--set",
        help="key=value for every detector (e.g. pixel_size=64), or "
        "detector.key=value for one (e.g. knn.pyod=n_neighbors=10), "
        "repeatable",
    ),
    cell_budget: float = typer.Option(
        120.0,
        "--cell-budget",
        help="seconds allowed per cell (0 = no limit); slower cells are skipped with the reason",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda (deep and patch features)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """The PyOD study: every classical detector on every representation, ranked.

    Image AUROC, AP, F1 at PyOD's own threshold and at the calibrated one, fit and score time,
    with the top 5 by F1 and by AUROC.

    Each representation is computed once and shared by the detectors; each cell runs in a worker
    process within --cell-budget seconds. Finished cells are appended to OUTPUT/cells.jsonl at once:
    run the same command again to resume after an interruption.

    Example: anomalens classical-study ../shared/datasets/magnetic_tile/magnetic_tile -o study/
    --features raw,pca:300,deep --set pixel_size=64
    """
    from anomalens.models.classical import expand_models
    from anomalens.report.study_report import write_outputs
    from anomalens.workflows.classical_study import parse_study_sets, run_study

    try:
        names = expand_models(models)
        common, per = parse_study_sets(set_, names)
        if device != "auto":
            common.setdefault("device", device)
        result = run_study(
            data,
            names,
            features,
            output,
            options=common,
            per_detector=per,
            cell_budget_s=cell_budget or None,
            progress=not quiet,
            log_fn=lambda message: err.print(message, highlight=False, soft_wrap=True),
        )
        outputs, markdown = write_outputs(output, result.config, result.cells, result.features)
    except KeyboardInterrupt:
        _interrupted(output)
    except user_errors() as e:
        fail(str(e))
    top = markdown.split("## All cells")[0]
    out.print(top, highlight=False, markup=False, soft_wrap=True)
    failed = [c for c in result.cells if c["status"] == "failed"]
    out.print(
        f"ran {result.n_run} cells, reused {result.n_reused}; wrote {outputs['markdown']} and "
        f"{outputs['json']}",
        highlight=False,
    )
    if failed:
        err.print(
            f"{len(failed)} cells failed (listed in {outputs['markdown']}); run the same command "
            "again to retry them"
        )
        raise typer.Exit(1)


def _interrupted(output: Path) -> None:
    fail(
        f"interrupted; finished cells are kept in {output / 'cells.jsonl'}: run the same command to resume",
        130,
    )
