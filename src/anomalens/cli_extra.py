"""CLI pieces for reports and benchmarks, registered on the main app in cli.py:

    from anomalens.cli_extra import benchmark
    app.command()(benchmark)

and, inside `evaluate`, `write_report(result, detector, report)` when `--report PATH` is given.
Thin: the work lives in report/html_report.py and engine/benchmark.py. Helpers of cli.py are
imported inside the functions, so cli.py may import this module at its top.
"""
from __future__ import annotations

from pathlib import Path

import typer

REPORT_HELP = ("write a self-contained HTML report: metrics, ROC/PR curves, score histogram with the threshold, "
               "confusion matrix, gallery of false alarms, misses and detections")


def write_report(evaluation, detector, path: Path, n_gallery: int = 6) -> Path:
    """`evaluate --report PATH`: write the HTML report and say where it is."""
    from anomalens.cli import out
    from anomalens.report.html_report import write_evaluation_report

    written = write_evaluation_report(evaluation, detector, path, n_gallery=n_gallery)
    out.print(f"wrote {written}")
    return written


def benchmark(
    data: Path = typer.Option(..., "--data", help="folder of MVTec-layout categories (searched 2 levels deep), "
                                                  "or one category folder"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for cells.jsonl, benchmark.json/.md/.html"),
    models: str = typer.Option("patchcore,padim", "--models", help="comma-separated detector names; "
                                                                   "classical:all for the 15 PyOD detectors"),
    seeds: int = typer.Option(3, "--seeds", help="seeds 0..N-1 for methods that depend on the seed"),
    set_: list[str] = typer.Option([], "--set", help="model.option=value for that model only, repeatable "
                                                      "(e.g. --set patchcore.coreset_ratio=0.01); a bare "
                                                      "option=value applies to every model"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    cell_timeout: float = typer.Option(0, "--cell-timeout", help="seconds allowed per cell, 0 = no limit"),
) -> None:
    """Run every model on every category (over seeds) and write a comparison: JSON, Markdown, HTML.

    Each (model, category, seed) cell runs in its own process: fit, model file size, every metric,
    predict images/s, single-image latency, peak RSS. Finished cells are appended to
    OUTPUT/cells.jsonl at once, so an interrupted benchmark resumes where it stopped when you run
    the same command again (failed cells are retried).

    Example: anomalens benchmark --data ../shared/datasets --models patchcore,padim -o bench/ --seeds 3
    """
    from anomalens.cli import _fail, _user_errors, err, out
    from anomalens.engine.benchmark import parse_model_sets, run_benchmark

    from anomalens.models.classical import expand_models

    names = expand_models(models)  # classical:all -> the 15 PyOD detectors
    try:
        sets = parse_model_sets(set_, names)
        if device != "auto":
            for options in sets.values():
                options.setdefault("device", device)
        result = run_benchmark(names, data, output, seeds=seeds, sets=sets, timeout=cell_timeout or None,
                               log=lambda message: err.print(message, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        _fail(f"interrupted; finished cells are kept in {output / 'cells.jsonl'}: run the same command to resume",
              130)
    except _user_errors() as e:
        _fail(str(e))
    for row in result.summary:
        auroc = row["image_auroc"]
        text = "n/a" if auroc is None else (f"{auroc['mean']:.3f} ± {auroc['std']:.3f}" if auroc["n"] > 1
                                            else f"{auroc['mean']:.3f}")
        out.print(f"{row['model']:>12}  {row['category']}: image AUROC {text} ({len(row['seeds'])} seeds"
                  + (f", {len(row['failed_seeds'])} failed)" if row["failed_seeds"] else ")"), highlight=False)
    out.print(f"ran {result.n_run} cells, kept {result.n_reused} finished before; wrote "
              f"{result.outputs['html']}, {result.outputs['markdown']}, {result.outputs['json']}")
    if result.failed:
        err.print(f"{len(result.failed)} cells failed (listed in {result.outputs['markdown']}); "
                  "run the same command again to retry them")
        raise typer.Exit(1)
