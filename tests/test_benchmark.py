"""The benchmark runner: planning, resuming, failures, mean ± std, and its outputs (written by
report.benchmark_report). Cells are faked by an injected runner, except one real cell run as the child
process runs it, and one real child process that fails."""

import json
import re
import statistics

import numpy as np
import pytest
import torch
from PIL import Image

from anomalens.data import DatasetError
from anomalens.data.inputs import Preprocess
from anomalens.report.benchmark_report import write_outputs
from anomalens.workflows.benchmark import (
    CellError,
    CellSpec,
    _child_main,
    append_cell,
    find_categories,
    is_stochastic,
    load_cells,
    network_size,
    parse_child_output,
    parse_model_sets,
    plan_cells,
    run_benchmark,
    run_cell_in_process,
    run_cell_subprocess,
    summarize,
)
from conftest import fast_options


class FakeRunner:
    """Counts calls; returns made-up measurements that depend on the seed; fails where told."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, spec):
        self.calls.append((spec.model, spec.category, spec.seed))
        if (spec.model, spec.seed) in self.fail:
            raise RuntimeError("out of memory\nwhile building the index")
        return {
            "image_auroc": 0.9 + 0.05 * spec.seed,
            "pixel_auroc": None,
            "aupro": 0.5,
            "fit_s": 1.0 + spec.seed,
            "predict_img_s": 10.0,
            "latency_ms": 40.0 + spec.seed,
            "peak_rss_mb": 500.0,
            "model_mb": 2.0,
            "onnx_mb": None,
            **(
                {"params_m": 2.5, "forward_mb": 40.0, "backward_mb": 0.0} if spec.model == "patchcore" else {}
            ),
        }


def written(out, result):
    """The outputs the `benchmark` command writes after the run."""
    return write_outputs(out, result.config, result.cells, result.summary)


@pytest.fixture()
def two_categories(tmp_path):
    """Folder with a category at depth 1 and one at depth 2 (only the layout matters to the fake runner)."""
    root = tmp_path / "data"
    for rel in ("bottle", "group/tile"):
        (root / rel / "train" / "good").mkdir(parents=True)
    return root


def test_parse_model_sets_applies_options_to_their_model_only():
    sets = parse_model_sets(
        ["patchcore.coreset_ratio=0.01", "image_size=64", "padim.n_features=40"], ["patchcore", "padim"]
    )
    assert sets == {
        "patchcore": {"coreset_ratio": "0.01", "image_size": "64"},
        "padim": {"image_size": "64", "n_features": "40"},
    }
    with pytest.raises(ValueError, match="not benchmarked"):
        parse_model_sets(["other.k=1"], ["patchcore"])
    with pytest.raises(ValueError, match="model.option=value"):
        parse_model_sets(["patchcore.coreset_ratio"], ["patchcore"])


def test_btad_products_are_categories(tmp_path):
    for product in ("01", "02"):
        (tmp_path / product / "train" / "ok").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / product / "train" / "ok" / "0.bmp")
    assert [name for name, _ in find_categories(tmp_path)] == ["01", "02"]
    assert find_categories(tmp_path / "01") == [("01", tmp_path / "01")]


def test_plan_seeds_categories_and_validation(two_categories, texture_root):
    assert [name for name, _ in find_categories(two_categories)] == ["bottle", "group/tile"]
    assert [p for _, p in find_categories(texture_root)] == [texture_root]  # a category itself
    cells = plan_cells(["patchcore", "padim"], two_categories, seeds=2)
    assert [(c.category, c.model, c.seed) for c in cells] == [
        ("bottle", "patchcore", 0),
        ("bottle", "patchcore", 1),
        ("bottle", "padim", 0),
        ("bottle", "padim", 1),
        ("group/tile", "patchcore", 0),
        ("group/tile", "patchcore", 1),
        ("group/tile", "padim", 0),
        ("group/tile", "padim", 1),
    ]
    pinned = plan_cells(["padim"], texture_root, seeds=3, sets={"padim": {"seed": "7"}})
    assert [c.seed for c in pinned] == [7] and "seed" not in pinned[0].options
    with pytest.raises(ValueError, match="unknown model"):
        plan_cells(["nope"], two_categories)
    with pytest.raises(ValueError, match="unknown option"):
        plan_cells(["patchcore"], two_categories, sets={"patchcore": {"n_features": "3"}})
    with pytest.raises(DatasetError):
        plan_cells(["patchcore"], two_categories / "group" / "tile" / "train")


def test_resume_skips_finished_cells_and_retries_failed_ones(two_categories, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cells = plan_cells(["patchcore"], two_categories, seeds=2)
    done, failed = cells[0], cells[1]
    # a previous run finished one cell, failed another, and crashed while writing a third
    append_cell(out / "cells.jsonl", {**done.to_dict(), "key": done.key, "status": "ok", "image_auroc": 0.5})
    append_cell(
        out / "cells.jsonl", {**failed.to_dict(), "key": failed.key, "status": "failed", "error": "boom"}
    )
    with open(out / "cells.jsonl", "a") as f:
        f.write('{"model": "patchcore", "categ')
    runner = FakeRunner()
    result = run_benchmark(["patchcore"], two_categories, out, seeds=2, runner=runner)
    assert runner.calls == [
        ("patchcore", "bottle", 1),
        ("patchcore", "group/tile", 0),
        ("patchcore", "group/tile", 1),
    ]
    assert result.n_run == 3 and result.n_reused == 1 and not result.failed
    assert result.cells[0]["image_auroc"] == 0.5  # the kept record, not recomputed
    latest = load_cells(out / "cells.jsonl")
    assert len(latest) == 4 and all(r["status"] == "ok" for r in latest.values())
    again = FakeRunner()
    result = run_benchmark(["patchcore"], two_categories, out, seeds=2, runner=again)
    assert again.calls == [] and result.n_reused == 4
    # other options are other cells
    changed = FakeRunner()
    run_benchmark(
        ["patchcore"],
        two_categories,
        out,
        seeds=1,
        runner=changed,
        sets={"patchcore": {"coreset_ratio": "0.05"}},
    )
    assert len(changed.calls) == 2


def test_a_failed_cell_is_recorded_the_others_go_on_and_it_is_retried(two_categories, tmp_path):
    out = tmp_path / "out"
    runner = FakeRunner(fail={("padim", 1)})
    result = run_benchmark(["patchcore", "padim"], two_categories, out, seeds=2, runner=runner)
    assert len(runner.calls) == 8
    assert [(c["category"], c["seed"]) for c in result.failed] == [("bottle", 1), ("group/tile", 1)]
    assert result.failed[0]["error"] == "RuntimeError: out of memory while building the index"  # one line
    rows = {(r["category"], r["model"]): r for r in result.summary}
    assert rows[("bottle", "padim")]["seeds"] == [0] and rows[("bottle", "padim")]["failed_seeds"] == [1]
    md = written(out, result)["markdown"].read_text()
    assert "Failed cells" in md and "out of memory while building the index" in md
    retry = FakeRunner()
    result = run_benchmark(["patchcore", "padim"], two_categories, out, seeds=2, runner=retry)
    assert retry.calls == [("padim", "bottle", 1), ("padim", "group/tile", 1)] and not result.failed
    assert "Failed cells" not in written(out, result)["markdown"].read_text()


def test_mean_and_std_over_seeds():
    records = [
        {
            "category": "c",
            "model": "m",
            "seed": s,
            "status": "ok",
            "image_auroc": v,
            "pixel_auroc": None,
            "fit_s": f,
        }
        for s, (v, f) in enumerate([(0.9, 1.0), (0.95, 2.0), (1.0, 6.0)])
    ]
    records.append({"category": "c", "model": "m", "seed": 3, "status": "failed", "error": "x"})
    records.append({"category": "c", "model": "solo", "seed": 0, "status": "ok", "image_auroc": 0.8})
    rows = summarize(records)
    assert [(r["category"], r["model"]) for r in rows] == [("c", "m"), ("c", "solo")]
    auroc = rows[0]["image_auroc"]
    assert auroc["n"] == 3 and auroc["mean"] == pytest.approx(0.95) and auroc["std"] == pytest.approx(0.05)
    assert rows[0]["fit_s"]["mean"] == pytest.approx(3.0)
    assert rows[0]["fit_s"]["std"] == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))
    assert rows[0]["pixel_auroc"] is None and rows[0]["failed_seeds"] == [3]
    assert rows[1]["image_auroc"] == {"mean": 0.8, "std": 0.0, "n": 1}


def test_outputs_json_markdown_html(two_categories, tmp_path):
    result = run_benchmark(
        ["patchcore", "padim"], two_categories, tmp_path / "out", seeds=3, runner=FakeRunner()
    )
    paths = written(tmp_path / "out", result)
    assert {p.name for p in paths.values()} == {
        "benchmark.json",
        "benchmark.md",
        "benchmark.html",
        "cells.jsonl",
    }
    data = json.loads(paths["json"].read_text())
    assert len(data["cells"]) == 12 and len(data["summary"]) == 4
    assert data["summary"][0]["image_auroc"]["mean"] == pytest.approx(0.95)
    md = paths["markdown"].read_text()
    assert "| bottle | patchcore | 3 | 0.950 ± 0.050 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| bottle | patchcore"))
    # model MB, ONNX MB (no export yet), params, forward and backward MB
    assert row.endswith("| 2.0 ± 0.0 | n/a | 2.50 ± 0.00 | 40 ± 0 | 0 ± 0 |")
    row = next(line for line in md.splitlines() if line.startswith("| bottle | padim"))
    assert row.endswith("| n/a | n/a | n/a | n/a |")  # no network sizes measured
    html = paths["html"].read_text()
    targets = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", html)
    # scatter, bars, network size
    assert len(targets) == 3 and all(t.startswith("data:image/png;base64,") for t in targets)
    assert "Accuracy vs latency" in html and "Per category" in html and "0.950" in html
    assert "Network size" in html


def test_one_real_cell_as_the_child_runs_it(texture_root, capsys):
    """What `python -m anomalens.workflows.benchmark --cell SPEC` does, in this process: run_cell, then
    the result line the parent parses."""
    spec = CellSpec("patchcore", "tex", str(texture_root), 1, fast_options("patchcore"))
    assert _child_main(["--cell", json.dumps(spec.to_dict())]) == 0
    m = parse_child_output(0, "some log line\n" + capsys.readouterr().out, "")
    assert 0.5 <= m["image_auroc"] <= 1.0 and m["pixel_auroc"] is not None and m["aupro"] is not None
    assert m["fit_s"] > 0 and m["predict_img_s"] > 0 and m["latency_ms"] > 0
    assert m["peak_rss_mb"] > 50 and m["model_mb"] > 0 and m["onnx_mb"] > 0
    # PatchCore's frozen backbone and memory bank: a forward pass, nothing saved for a backward one
    assert m["params_m"] > 0.1 and m["forward_mb"] > 0 and m["backward_mb"] == 0
    assert m["per_defect_type"] and all("image_auroc" in d for d in m["per_defect_type"].values())
    with pytest.raises(CellError, match="killed by signal 9"):
        parse_child_output(-9, "", "")


class _Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, x):
        return (x * self.w).relu()


def test_network_size_measures_activations():
    """x * w, then relu: the forward peak holds both results (2 x-sized tensors); backward keeps x
    (for w's gradient) and the relu output, never the weight."""

    class Fake:
        options = {"batch_size": 4}

        def inference_module(self):
            return _Scaled()

        def preprocess(self):
            return Preprocess(32, 3, (0.5,) * 3, (0.5,) * 3)

    x_mb = 4 * 3 * 32 * 32 * 4 / 2**20
    sizes = network_size(Fake())
    assert sizes["params_m"] == pytest.approx(3e-6)
    assert sizes["forward_mb"] == pytest.approx(2 * x_mb, abs=0.01)
    assert sizes["backward_mb"] == pytest.approx(2 * x_mb, abs=0.01)
    assert network_size(Fake(), batch_size=8)["backward_mb"] == pytest.approx(4 * x_mb, abs=0.01)


def test_child_process_reports_its_error_in_one_line(tmp_path):
    spec = CellSpec("patchcore", "gone", str(tmp_path / "missing"), 0, {})
    with pytest.raises(CellError, match=r"^DatasetError: dataset not found") as info:
        run_cell_subprocess(spec, timeout=120)
    assert "\n" not in str(info.value)


def cli_app():
    import typer

    from anomalens.cli.benchmark import benchmark

    app = typer.Typer()
    app.command()(benchmark)
    app.command()(lambda: None)  # two commands, so `benchmark` is a subcommand as on the main app
    return app


def test_cli_benchmark_runs_resumes_and_reports_failures(two_categories, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from anomalens.workflows import benchmark as bench

    fake = FakeRunner(fail={("padim", 0)})
    monkeypatch.setattr(bench, "run_cell_subprocess", lambda spec, timeout=None: fake(spec))
    args = [
        "benchmark",
        "--data",
        str(two_categories),
        "-o",
        str(tmp_path / "out"),
        "--models",
        "patchcore,padim",
        "--seeds",
        "1",
        "--set",
        "patchcore.coreset_ratio=0.05",
    ]
    res = CliRunner().invoke(cli_app(), args)
    assert res.exit_code == 1, res.output  # failed cells: recorded, reported, exit 1
    assert "2 cells failed" in res.output and "benchmark.html" in res.output
    assert len(fake.calls) == 4
    fake.fail.clear()
    res = CliRunner().invoke(cli_app(), args)
    assert res.exit_code == 0, res.output
    assert "ran 2 cells, kept 2 finished before" in res.output and len(fake.calls) == 6


def test_cli_benchmark_user_errors(two_categories, tmp_path):
    from typer.testing import CliRunner

    base = ["benchmark", "--data", str(two_categories), "-o", str(tmp_path / "o")]
    for extra, message in (
        (["--models", "nope"], "unknown model"),
        (["--models", "patchcore", "--set", "padim.n_features=3"], "not benchmarked"),
        (["--models", "patchcore", "--set", "patchcore.bogus=1"], "unknown option"),
    ):
        res = CliRunner().invoke(cli_app(), base + extra)
        assert res.exit_code == 2 and "error:" in res.output and message in res.output, res.output
    assert not (tmp_path / "o").exists()  # rejected before anything ran


def test_every_method_that_depends_on_its_seed_says_so():
    from anomalens.models.trainable import TrainableDetector
    from anomalens.registry import available, get_class

    for name in available():
        cls = get_class(name)
        if issubclass(cls, TrainableDetector) or name in ("patchcore", "padim"):
            assert is_stochastic(name), name
    assert not is_stochastic("classical:hbos")  # a deterministic histogram: one run says it all


def test_real_runner_repeats_a_trained_model_over_seeds(texture_root, tmp_path):
    # the real child processes, on a tiny set: the autoencoder's seeds give different models
    options = {k: str(v) for k, v in fast_options("autoencoder").items()}
    result = run_benchmark(
        ["autoencoder"], texture_root, tmp_path / "bench", seeds=2, sets={"autoencoder": options}
    )
    assert sorted(c["seed"] for c in result.cells) == [0, 1]
    assert all(c["status"] == "ok" for c in result.cells), [c.get("error") for c in result.cells]
    numbers = [(c["image_auroc"], c["pixel_auroc"], c["aupro"]) for c in result.cells]
    assert numbers[0] != numbers[1]  # two seeds, two models
    [row] = result.summary
    assert row["seeds"] == [0, 1] and row["pixel_auroc"]["n"] == 2


def test_train_defects_protocol_plans_every_seed_and_evaluates_on_the_same_rest(texture_root, tmp_path):
    with pytest.raises(ValueError, match="--train-defects"):
        plan_cells(["patchcore+refine"], texture_root, seeds=2)
    cells = plan_cells(["padim", "padim+refine"], texture_root, seeds=2, train_defects=1)
    assert [(c.model, c.seed) for c in cells] == [
        ("padim", 0),
        ("padim", 1),
        ("padim+refine", 0),
        ("padim+refine", 1),
    ]
    assert cells[0].key != CellSpec("padim", cells[0].category, str(texture_root), 0).key  # resumes apart
    options = {k: str(v) for k, v in fast_options("padim").items()}
    result = run_benchmark(
        ["padim", "padim+refine"],
        texture_root,
        tmp_path / "bench",
        seeds=1,
        sets={"padim": options, "padim+refine": options},
        train_defects=1,
        runner=run_cell_in_process,
    )
    assert all(c["status"] == "ok" for c in result.cells), [c.get("error") for c in result.cells]
    plain, refined = result.cells
    # 6 test defects over 3 types: one per type lent, with as many goods; both score the same rest
    assert plain["n_test"] == refined["n_test"] == 12 - 6
    # the refine stage learnt from the 3 lent defects and 3 lent goods; plain PaDiM from none
    assert plain["n_labelled_trained_on"] == 0 and refined["n_labelled_trained_on"] == 6
    assert result.config["train_defects"] == 1
