"""The CLI end to end, run as a user types it (a real `anomalens` process)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

EXE = str(Path(sys.executable).parent / "anomalens")


def run(*args, ok=True):
    proc = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=300)
    if ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def model_file(texture_root, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tex.model"
    proc = run(
        "fit",
        texture_root,
        "--model",
        "patchcore",
        "-o",
        path,
        "--set",
        "image_size=64",
        "--set",
        "coreset_min_size=200",
        "-q",
    )
    assert "fitted patchcore" in proc.stdout and path.is_file()
    return path


def test_predict_writes_scores_regions_and_overlays(model_file, texture_root, tmp_path):
    out = tmp_path / "out"
    proc = run("predict", model_file, texture_root / "test", "-o", out, "-q")
    assert "scored 12 images" in proc.stdout
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 12
    assert {"path", "score", "normalized_score", "anomalous", "n_regions", "largest_box_x0_y0_x1_y1"} <= set(
        rows[0]
    )
    defects = [r for r in rows if "/good/" not in r["path"]]
    assert sum(int(r["anomalous"]) for r in defects) >= 4
    for r in rows:
        assert (out / r["overlay"]).is_file()
    assert len(set(r["overlay"] for r in rows)) == 12  # same file names in different folders stay apart
    assert len(open(out / "regions.jsonl").readlines()) == 12


def test_evaluate_json_has_the_documented_keys(model_file, texture_root, tmp_path):
    out = tmp_path / "m.json"
    proc = run("evaluate", model_file, texture_root, "--json", out, "-q")
    metrics = json.loads(out.read_text())
    for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro"):
        assert 0.0 <= metrics[key] <= 1.0, key
        assert key in proc.stdout
    assert metrics["image_auroc"] >= 0.9
    assert set(metrics["per_defect_type"]) == {"blob", "crack", "scratch"}


def test_bad_image_is_one_line_error_or_skipped_with_results_kept(model_file, texture_root, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted((texture_root / "test" / "good").iterdir())[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
    (folder / "001b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    proc = run("predict", model_file, folder, "-o", tmp_path / "o1", "-q", ok=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "001b_corrupt.png" in proc.stderr
    assert "results so far" in proc.stderr
    kept = list(csv.DictReader(open(tmp_path / "o1" / "scores.csv")))
    assert [Path(r["path"]).name for r in kept] == ["000.png", "001.png"]  # scored before the bad file
    proc = run("predict", model_file, folder, "-o", tmp_path / "o2", "-q", "--skip-bad")
    assert "skipped 1 unreadable" in proc.stdout
    assert "001b_corrupt.png" in (tmp_path / "o2" / "skipped.txt").read_text()
    assert len(list(csv.DictReader(open(tmp_path / "o2" / "scores.csv")))) == 3


def test_user_errors_are_one_line(tmp_path, model_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in (
        ["fit", empty, "-o", tmp_path / "x.model"],
        ["fit", empty, "--model", "nosuch", "-o", tmp_path / "x.model"],
        ["predict", tmp_path / "missing.model", empty, "-o", tmp_path / "o"],
        ["fit", empty, "-o", tmp_path / "x.model", "--set", "novalue"],
    ):
        proc = run(*args, ok=False)
        assert proc.returncode == 2, args
        assert proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0, proc.stderr


@pytest.mark.parametrize("verb", ["fit", "predict", "evaluate", "demo", "models", "tune"])
def test_help_says_what_and_shows_an_example(verb):
    proc = run(verb, "--help")
    if verb != "models":
        assert "Example: anomalens " + verb in " ".join(proc.stdout.split())


def test_demo_runs_on_embedded_data(tmp_path):
    proc = run("demo", "-o", tmp_path / "demo", "-q")
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.9
    assert (tmp_path / "demo" / "predictions" / "scores.csv").is_file()
    assert "image_auroc" in proc.stdout
    again = run("demo", "-o", tmp_path / "demo", "-q")  # a second run reuses the data and overwrites results
    assert "reusing synthetic" in again.stderr and (tmp_path / "demo" / "report.html").is_file()
