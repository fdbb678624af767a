"""The `anomalens` command. Each command group lives in its own module and is a thin layer over a
function of the Python API; `common` holds what they share."""

from __future__ import annotations

import sys

import typer

from anomalens.cli.benchmark import benchmark, classical_study
from anomalens.cli.core import demo, evaluate, fit, models, predict
from anomalens.cli.explain import explain
from anomalens.cli.export import export
from anomalens.cli.refine import refine
from anomalens.cli.score import score, threshold
from anomalens.cli.serve import serve
from anomalens.cli.tune import tune

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Unsupervised visual anomaly detection and localization for industrial inspection.",
)

for command in (fit, predict, evaluate, demo, models, benchmark, score, threshold, refine, export, tune):
    app.command()(command)
app.command("classical-study")(classical_study)
app.command()(explain)
app.command()(serve)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
