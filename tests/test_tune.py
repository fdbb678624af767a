"""Tests for `anomalens tune`: the choice follows its rule on synthetic defects only (scrambled test
labels give the same choice), held-out goods are never fitted, the CLI writes the chosen model and the
table."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data import Dataset
from anomalens.workflows.tune import _choose, candidates, parse_grid, tune
from conftest import fast_options

GRID = {"top_k": ["1", "10"]}


@pytest.fixture(scope="module")
def tuned(texture):
    return tune(texture, "patchcore", GRID, options=fast_options("patchcore"), seed=0)


def _poisoned(dataset: Dataset) -> Dataset:
    """The same test images with every label and defect type scrambled (goods called defects and back)."""
    flipped = [
        dataclasses.replace(s, label=1 - s.label, defect_type="good" if s.label else "crack", mask_path=None)
        for s in dataset.test
    ]
    return dataclasses.replace(dataset, test=flipped)


def test_choice_follows_the_rule_and_never_the_test_labels(texture, tuned) -> None:
    rows = tuned.rows
    assert [r["candidate"] for r in rows] == [c.label for c in candidates("patchcore", GRID)]
    aurocs = [round(r["synthetic_auroc"], 3) for r in rows]
    assert aurocs[tuned.chosen] == max(aurocs)
    assert tuned.detector.options["top_k"] == int(rows[tuned.chosen]["options"]["top_k"])
    assert all(
        0 <= r["synthetic_aupro"] <= 1 and r["fit_seconds"] > 0 and r["images_per_second"] > 0 for r in rows
    )
    real = tuned.real
    assert real["n_test_defective"] == len(texture.test_defective)
    assert real["chosen_real_auroc"] == rows[tuned.chosen]["real_auroc"]
    assert real["chosen_rank"] == 1 + sum(r["real_auroc"] > real["chosen_real_auroc"] for r in rows)

    poisoned = tune(_poisoned(texture), "patchcore", GRID, options=fast_options("patchcore"), seed=0)
    assert poisoned.chosen == tuned.chosen
    for a, b in zip(tuned.rows, poisoned.rows):
        assert a["synthetic_auroc"] == b["synthetic_auroc"] and a["synthetic_aupro"] == b["synthetic_aupro"]
        # the labels were read afterwards: flipped labels flip the real AUROC
        assert b["real_auroc"] == pytest.approx(1 - a["real_auroc"])


def test_heldout_goods_are_not_fitted(texture, tuned) -> None:
    config = tuned.config
    assert config["n_fit_goods"] + config["n_heldout_goods"] == len(texture.train)
    assert config["n_synthetic_defects"] == 2 * config["n_heldout_goods"]
    info = tuned.detector.fit_info
    assert info["n_fit"] + info["n_calibration"] == config["n_fit_goods"]


def test_tie_break_by_aupro_then_grid_order() -> None:
    rows = [
        {"synthetic_auroc": 0.9001, "synthetic_aupro": 0.5},
        {"synthetic_auroc": 0.8996, "synthetic_aupro": 0.7},  # same AUROC to 3 decimals, better AUPRO
        {"synthetic_auroc": 0.9004, "synthetic_aupro": 0.7},
        {"synthetic_auroc": None, "synthetic_aupro": None, "error": "failed"},
    ]
    assert _choose(rows) == 1
    assert _choose([{"synthetic_auroc": None, "synthetic_aupro": None, "error": "x"}, rows[0]]) == 1


def test_grid_parsing_and_errors(texture) -> None:
    assert parse_grid(["top_k=1,10", "layers=2+3,1+2+3"]) == {
        "top_k": ["1", "10"],
        "layers": ["2,3", "1,2,3"],
    }
    assert len(candidates("patchcore")) == 8  # the default grid: top_k x resize
    with pytest.raises(ValueError, match="key=v1,v2"):
        parse_grid(["top_k"])
    with pytest.raises(ValueError, match="has no option"):
        candidates("patchcore", {"depth": ["1"]})
    with pytest.raises(ValueError, match="holdout"):
        tune(texture, "patchcore", GRID, holdout=1.5)


def test_cli_writes_the_chosen_model_and_table(texture_root, tmp_path) -> None:
    out = tmp_path / "chosen.model"
    sets = [f"--set={k}={v}" for k, v in fast_options("patchcore").items() if k != "image_size"]
    result = CliRunner().invoke(
        app,
        [
            "tune",
            str(texture_root),
            "-m",
            "patchcore",
            "--grid",
            "top_k=1,10",
            *sets,
            "--set",
            "image_size=64",
            "-q",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "chosen.model.tune.json").read_text())
    chosen = next(r for r in table["rows"] if r["candidate"] == table["chosen"])
    assert anomalens.load(out).options["top_k"] == int(chosen["options"]["top_k"])
    assert "Spearman" in result.output and table["real"]["n_candidates"] == 2
    markdown = (tmp_path / "chosen.model.tune.md").read_text()
    assert f"| {table['chosen']} * |" in markdown
    bad = CliRunner().invoke(app, ["tune", str(texture_root), "--grid", "depth=1", "-o", str(out)])
    assert bad.exit_code == 2 and "has no option" in bad.output
    assert np.isfinite(chosen["synthetic_auroc"])
