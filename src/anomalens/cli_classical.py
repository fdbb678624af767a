"""CLI for the classical-detector study, registered on the main app in cli.py, e.g.:

    from anomalens.cli_classical import classical_study
    app.command("classical-study")(classical_study)

Thin: the work lives in engine/classical_study.py. Helpers of cli.py are imported inside the
function, so cli.py may import this module at its top.
"""
from __future__ import annotations

from pathlib import Path

import typer

from anomalens.engine.classical_study import DEFAULT_FEATURES


def classical_study(
    data: Path = typer.Argument(..., help="MVTec-layout category folder (train/good, test/<type>) or CSV list"),
    models: str = typer.Option("classical:all", "--models", help="comma-separated classical detectors, "
                                                                 "classical:all for the 15"),
    features: str = typer.Option(",".join(DEFAULT_FEATURES), "--features",
                                 help="comma-separated representations: raw, pca:K, kpca-rbf:K (poly, sigmoid, "
                                      "cosine), deep[:1+2+3+4], patch[:2+3]"),
    output: Path = typer.Option(Path("classical_study"), "--output", "-o",
                                help="folder for cells.jsonl, study.json, study.md and cached features"),
    set_: list[str] = typer.Option([], "--set", help="key=value for every detector (e.g. pixel_size=64), or "
                                                     "detector.key=value for one (e.g. knn.pyod=n_neighbors=10), "
                                                     "repeatable"),
    cell_budget: float = typer.Option(120.0, "--cell-budget", help="seconds allowed per cell (0 = no limit); "
                                                                   "slower cells are skipped with the reason"),
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
    from anomalens.cli import _fail, _user_errors, err, out
    from anomalens.engine.classical_study import parse_study_sets, run_study
    from anomalens.models.classical import expand_models

    try:
        names = expand_models(models)
        common, per = parse_study_sets(set_, names)
        if device != "auto":
            common.setdefault("device", device)
        result = run_study(data, names, features, output, options=common, per_detector=per,
                           cell_budget_s=cell_budget or None, progress=not quiet,
                           log_fn=lambda message: err.print(message, highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        _fail(f"interrupted; finished cells are kept in {output / 'cells.jsonl'}: run the same command to resume", 130)
    except _user_errors() as e:
        _fail(str(e))
    top = result.markdown.split("## All cells")[0]
    out.print(top, highlight=False, markup=False, soft_wrap=True)
    failed = [c for c in result.cells if c["status"] == "failed"]
    out.print(f"ran {result.n_run} cells, reused {result.n_reused}; wrote {result.outputs['markdown']} and "
              f"{result.outputs['json']}", highlight=False)
    if failed:
        err.print(f"{len(failed)} cells failed (listed in {result.outputs['markdown']}); run the same command "
                  "again to retry them")
        raise typer.Exit(1)
