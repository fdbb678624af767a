"""The per-method report card (benchmarks/report_card.py): real cells on a tiny synthetic set, read
through a limited mirror of linked files, and the card's table against the cells it summarizes."""

import importlib.util
import json
import statistics
from pathlib import Path

from anomalens.report.benchmark_report import render_report_card
from anomalens.workflows.benchmark import summarize
from conftest import fast_options

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "report_card.py"


def load_script():
    spec = importlib.util.spec_from_file_location("report_card", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_card_command_runs_every_seed_on_a_limited_mirror(texture_root, tmp_path):
    card = load_script()
    assert {"autoencoder", "fanogan", "ganomaly", "vtadl"} <= set(card.trained_methods())
    assert "patchcore" not in card.trained_methods()
    # the plumbing is under test, not the accuracy: a few epochs
    options = {**fast_options("autoencoder"), "epochs": 2}
    sets = [f"--set=autoencoder.{k}={v}" for k, v in options.items()]
    doc = tmp_path / "card.md"
    out = tmp_path / "run"
    argv = ["-o", str(out), "--doc", str(doc), "--models", "autoencoder", "--seeds", "2"]
    argv += ["--sets", f"tex={texture_root}", "--limit", "8", "--in-process", "--note", "tiny test", *sets]
    assert card.main(argv) == 0
    mirror = out / "data" / "tex"
    train = sorted((mirror / "train" / "good").iterdir())
    assert len(train) == 8 and all(p.is_symlink() for p in train)  # 16 goods, every second one linked
    assert (mirror / "ground_truth").is_symlink() and len(list((mirror / "test" / "good").iterdir())) == 6
    text = doc.read_text()
    assert "## tex (12 test images)" in text and "tiny test" in text and "at most 8 images" in text
    cells = json.loads((out / "benchmark.json").read_text())["cells"]
    assert sorted(c["seed"] for c in cells) == [0, 1] and all(c["status"] == "ok" for c in cells)
    aurocs = [c["image_auroc"] for c in cells]
    row = next(line for line in text.splitlines() if line.startswith("| autoencoder |"))
    assert f"{statistics.fmean(aurocs):.3f} ± {statistics.stdev(aurocs):.3f}" in row
    assert row.split("|")[2].strip() == "2"  # seeds that ran
    # a third seed planned, none run: the card from the finished cells says one is missing
    assert card.main([*argv, "--write-only", "--seeds", "3"]) == 0
    assert "Partial card: 1 planned cells had not run yet." in doc.read_text()
    assert len(json.loads((out / "benchmark.json").read_text())["cells"]) == 2


def test_card_ranks_by_image_auroc_and_lists_failures():
    records = [
        {"category": "c", "model": "a", "seed": 0, "status": "ok", "image_auroc": 0.6, "fit_s": 2.0},
        {"category": "c", "model": "b", "seed": 0, "status": "ok", "image_auroc": 0.9, "fit_s": 1.0},
        {"category": "c", "model": "b", "seed": 1, "status": "failed", "error": "out of memory"},
    ]
    config = {"date": "today", "seeds": 2, "options": {"a": {}, "b": {"max_minutes": "1"}}}
    text = render_report_card(config, summarize(records), records)
    rows = [line for line in text.splitlines() if line.startswith("| a |") or line.startswith("| b |")]
    assert rows[0].startswith("| b | 1 (1 failed) | 0.900 |") and rows[1].startswith("| a | 1 | 0.600 |")
    assert "- b options: `max_minutes=1`" in text and "| b | c | 1 | out of memory |" in text


def test_models_command_links_the_card():
    from typer.testing import CliRunner

    from anomalens.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0 and "docs/report_card.md" in " ".join(result.output.split())
    assert (SCRIPT.parents[1] / "docs" / "report_card.md").is_file()
