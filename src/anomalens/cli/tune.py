"""`anomalens tune`: choose a detector's settings on synthetic defects made from held-out goods."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from anomalens.cli.common import SET_HELP, err, fail, out, parse_sets, user_errors

_COLUMNS = (
    ("candidate", "candidate", "{}"),
    ("synthetic_auroc", "synthetic image AUROC", "{:.4f}"),
    ("synthetic_aupro", "synthetic AUPRO", "{:.4f}"),
    ("fit_seconds", "fit s", "{:.1f}"),
    ("images_per_second", "images/s", "{:.1f}"),
    ("real_auroc", "real image AUROC (not used)", "{:.4f}"),
)


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return row["error"] if key == "synthetic_auroc" and row.get("error") else "n/a"
    return fmt.format(value)


def markdown_table(rows: list[dict], chosen: int) -> str:
    """The table as Markdown; the chosen candidate is marked with *."""
    columns = [c for c in _COLUMNS if c[0] != "real_auroc" or any("real_auroc" in r for r in rows)]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for i, row in enumerate(rows):
        cells = [_cell(row, key, fmt) for key, _, fmt in columns]
        cells[0] += " *" if i == chosen else ""
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tune(
    data: Path = typer.Argument(..., help="MVTec-layout category folder, folder of good images, or CSV list"),
    model: str = typer.Option("patchcore", "--model", "-m", help="detector name (see `anomalens models`)"),
    output: Path = typer.Option(..., "--output", "-o", help="model file to write: the chosen candidate"),
    grid: list[str] = typer.Option(
        [],
        "--grid",
        help="candidate values key=v1,v2, repeatable; candidates are the product (a tuple value joins its "
        "items with +, e.g. layers=2+3,1+2+3). Default: a small grid per method (see docs/tune.md)",
    ),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP + "; fixed for every candidate"),
    holdout: float = typer.Option(
        0.2, "--holdout", help="share of the training goods held out (never fitted)"
    ),
    max_holdout: int = typer.Option(60, "--max-holdout", help="at most this many held-out goods"),
    defects: int = typer.Option(2, "--defects", help="synthetic defects per held-out good"),
    kinds: str = typer.Option(
        "cutpaste,scar,perlin,nsa,scratch,spot", "--kinds", help="synthetic defect kinds, comma-separated"
    ),
    max_train: int | None = typer.Option(
        None, "--max-train", help="fit each candidate on at most this many goods (a seeded subset)"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the split and the synthetic defects"),
    table: Path | None = typer.Option(
        None, "--table", help="where the table goes, as .json and .md (default: <output>.tune.json/.md)"
    ),
    no_real: bool = typer.Option(
        False, "--no-real", help="do not score the labelled test images after the choice"
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Choose settings without real defects, and write the chosen model.

    Holds out a seeded share of the training goods, fits every candidate on the rest, scores the
    held-out goods and synthetic defects made from them (cutpaste, scar, perlin, nsa, scratch, spot)
    and keeps the candidate with the best synthetic image AUROC (ties: synthetic AUPRO). Prints and
    saves the table (candidate, synthetic AUROC and AUPRO, fit seconds, images/s). Labelled test
    defects never enter the choice; when the data has them, each candidate's real image AUROC, the
    chosen one's rank and the synthetic-real rank correlation are reported afterwards.

    Example: anomalens tune ../shared/datasets/lookout_cookies/cookie -m patchcore --grid top_k=1,3,10 -o cookie.model
    """
    from anomalens.data import load_dataset
    from anomalens.workflows.tune import parse_grid
    from anomalens.workflows.tune import tune as run_tune

    def show(row: dict) -> None:
        err.print(
            f"  {row['candidate']}: " + ", ".join(_cell(row, k, f) for k, _, f in _COLUMNS[1:5]),
            highlight=False,
        )

    try:
        dataset = load_dataset(data)
        err.print(dataset.summary())
        sets = parse_sets(set_)
        result = run_tune(
            dataset,
            model,
            parse_grid(grid) if grid else None,
            options={"device": device, **sets},
            holdout=holdout,
            max_holdout=max_holdout,
            defects_per_good=defects,
            kinds=[k.strip() for k in kinds.split(",") if k.strip()],
            max_train=max_train,
            seed=seed,
            real=not no_real,
            progress=not quiet,
            on_row=show,
        )
        result.detector.save(output)
    except user_errors() as e:
        fail(str(e))
    rows, chosen = result.rows, result.chosen
    shown = Table(
        title=f"tune {model} on {dataset.name}: {result.config['n_fit_goods']} goods fitted, "
        f"{result.config['n_heldout_goods']} held out, {result.config['n_synthetic_defects']} synthetic defects"
    )
    columns = [c for c in _COLUMNS if c[0] != "real_auroc" or result.real]
    for key, title, _ in columns:
        shown.add_column(title, justify="left" if key == "candidate" else "right", no_wrap=key == "candidate")
    for i, row in enumerate(rows):
        cells = [_cell(row, key, fmt) for key, _, fmt in columns]
        shown.add_row(*cells, style="bold" if i == chosen else None)
    out.print(shown)
    out.print(f"chosen: {rows[chosen]['candidate']} ({result.config['rule']}); wrote {output}")
    real = result.real
    if real:
        rho = "n/a" if real["spearman"] is None else f"{real['spearman']:.2f}"
        out.print(
            f"afterwards, on the {real['n_test_defective']} labelled test defects (not used for the choice): "
            f"the chosen candidate ranks {real['chosen_rank']} of {real['n_candidates']} with real image AUROC "
            f"{real['chosen_real_auroc']:.4f} (best {real['best_real_auroc']:.4f}); "
            f"Spearman rank correlation synthetic vs real AUROC {rho}"
        )
    base = output.with_name(output.name + ".tune") if table is None else table
    if table is not None and table.suffix in (".json", ".md"):
        base = table.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": result.config, "chosen": rows[chosen]["candidate"], "rows": rows, "real": real}
    json_path, md_path = base.with_name(base.name + ".json"), base.with_name(base.name + ".md")
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown_table(rows, chosen) + "\n")
    out.print(f"wrote {json_path} and {md_path}")
