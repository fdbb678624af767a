"""`score --engine ray` on a small local Ray instance: same results as local scoring, written by
the driver, resumable. Deselect with `-m "not ray"` (it starts Ray: about 30 s)."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.store import ResultStore
from anomalens.workflows.scoring import Scorer, iter_input_paths, model_id_for, score_into_store
from conftest import fast_options

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def model(texture, tmp_path_factory):
    det = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    path = det.save(tmp_path_factory.mktemp("ray") / "tex.model")
    return path, *model_id_for(path, "patchcore")


def test_ray_scores_like_local_and_resumes(model, texture_root, tmp_path):
    pytest.importorskip("ray.data")
    from anomalens.workflows.distributed import score_with_ray

    path, model_id, digest = model
    folder = tmp_path / "in"
    shutil.copytree(texture_root / "test", folder)
    (folder / "broken.png").write_bytes(b"not an image")
    odd = os.path.join(os.fsencode(folder), b"odd_\xff.png")  # a name that is not UTF-8
    Path(os.fsdecode(odd)).write_bytes((folder / "good" / "000.png").read_bytes())
    paths = list(iter_input_paths(folder))
    # the command as a user types it; a local Ray instance (both CPUs of this machine)
    res = CliRunner().invoke(
        app,
        [
            "score",
            str(path),
            str(folder),
            "-o",
            str(tmp_path / "ray.db"),
            "--engine",
            "ray",
            "--batch-size",
            "4",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "scored 13 images" in res.output and "1 unreadable" in res.output
    with ResultStore(tmp_path / "ray.db") as ray_store, ResultStore(tmp_path / "local.db") as local_store:
        local_store.register_model(model_id, detector="patchcore", file_sha256=digest)
        score_into_store(Scorer(anomalens.load(path), model_id), local_store, paths, batch_size=4)
        by_ray = {r.path: r for r in ray_store.results(model_id)}
        by_local = {r.path: r for r in local_store.results(model_id)}
        assert set(by_ray) == set(by_local) and len(by_ray) == 14
        assert by_ray[str(folder / "odd_\\xff.png")].status == "ok"
        ok = sorted(k for k, r in by_local.items() if r.status == "ok")
        np.testing.assert_allclose([by_ray[k].score for k in ok], [by_local[k].score for k in ok], rtol=1e-4)
        assert [by_ray[k].decision for k in ok] == [by_local[k].decision for k in ok]
        assert [len(by_ray[k].regions) for k in ok] == [len(by_local[k].regions) for k in ok]
        assert by_ray[str(folder / "broken.png")].error == by_local[str(folder / "broken.png")].error
        assert all(by_ray[k].content_sha256 == by_local[k].content_sha256 for k in ok)
        # a rerun sends nothing to the cluster (it returns before starting Ray)
        again = score_with_ray(path, model_id, ray_store, paths)
        assert (again.n_scored, again.n_skipped) == (0, 14)


def test_ray_engine_rejects_watch_mode(model, tmp_path):
    res = CliRunner().invoke(
        app,
        ["score", str(model[0]), "--watch", str(tmp_path), "-o", str(tmp_path / "r.db"), "--engine", "ray"],
    )
    assert res.exit_code == 2 and "--watch runs locally" in res.output
