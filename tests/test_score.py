"""`score`: archive -> result store with resume, bad files, maps, exports, watch mode, and a
kill -9 / resume cycle in real processes."""

import csv
import hashlib
import io
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.store import ResultStore
from anomalens.workflows.scoring import (
    Scorer,
    export_top,
    iter_decoded,
    iter_input_paths,
    load_map,
    model_id_for,
    score_into_store,
)
from anomalens.workflows.watch import FileTracker, watch_folder
from conftest import fast_options


@pytest.fixture(scope="module")
def model(texture, tmp_path_factory):
    """(model file, model id) of a PatchCore fitted on the synthetic texture."""
    det = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    path = det.save(tmp_path_factory.mktemp("score") / "tex.model")
    return path, model_id_for(path, "patchcore")[0]


def open_scorer(model, store, **kw):
    path, model_id = model
    det = anomalens.load(path)
    store.register_model(model_id, detector=det.name, file_sha256=model_id_for(path, det.name)[1])
    return Scorer(det, model_id, **kw)


def test_folder_is_scored_into_the_store(model, texture_root, tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        scorer = open_scorer(model, store)
        summary = score_into_store(scorer, store, list(iter_input_paths(texture_root / "test")), batch_size=4)
        assert (summary.n_scored, summary.n_errors, summary.n_skipped) == (12, 0, 0)
        rows = store.results(model[1])
    assert len(rows) == 12 and all(Path(r.path).is_absolute() for r in rows)
    defects = [r for r in rows if "/good/" not in r.path]
    assert sum(r.decision == "defect" for r in defects) >= 4  # the planted defects are found
    assert np.mean([r.score for r in defects]) > np.mean([r.score for r in rows if "/good/" in r.path])
    for r in rows:
        assert r.content_sha256 == hashlib.sha256(Path(r.path).read_bytes()).hexdigest()
        assert (r.decision == "defect") == (r.normalized_score >= 1.0 - 1e-9)
    flagged = [r for r in rows if r.decision == "defect"]
    assert any(r.regions for r in flagged) and {"x0", "y0", "x1", "y1", "area", "peak"} <= set(
        flagged[0].regions[0]
    )


def test_rerun_resumes_and_bad_files_are_recorded(model, texture_root, tmp_path):
    folder = tmp_path / "in"
    shutil.copytree(texture_root / "test", folder)
    (folder / "truncated.png").write_bytes((folder / "good" / "000.png").read_bytes()[:200])
    with ResultStore(tmp_path / "r.db") as store:
        scorer = open_scorer(model, store)
        first = score_into_store(scorer, store, list(iter_input_paths(folder)), batch_size=4)
        assert (first.n_scored, first.n_errors) == (12, 1)
        bad = store.get(model[1], str(folder / "truncated.png"))
        assert bad.status == "error" and "truncated" in bad.error and bad.score is None
        shutil.copy(folder / "good" / "001.png", folder / "new.png")
        again = score_into_store(scorer, store, list(iter_input_paths(folder)), batch_size=4)
        assert (again.n_scored, again.n_errors, again.n_skipped) == (1, 0, 13)  # only the new file
        shutil.copy(folder / "good" / "002.png", folder / "truncated.png")  # fixed
        retry = score_into_store(
            scorer, store, list(iter_input_paths(folder)), batch_size=4, retry_errors=True
        )
        assert (retry.n_scored, retry.n_errors) == (1, 0)
        assert store.get(model[1], str(folder / "truncated.png")).status == "ok"
        assert store.count(model[1]) == 14


def test_inputs_from_csv_stdin_and_glob(texture_root, tmp_path):
    test = texture_root / "test"
    listing = tmp_path / "list.csv"
    listing.write_text("path,line\n" + "".join(f"{p},L1\n" for p in sorted(test.glob("crack/*.png"))))
    assert [p.parent.name for p in iter_input_paths(listing)] == ["crack", "crack"]
    stdin = io.StringIO(f"{test / 'good' / '000.png'}\n\n{test / 'blob' / '001.png'}\n")
    assert [p.name for p in iter_input_paths("-", stdin=stdin)] == ["000.png", "001.png"]
    assert {p.parent.name for p in iter_input_paths(test, pattern="**/0*.png")} == {
        "good",
        "crack",
        "blob",
        "scratch",
    }
    assert [p.parent.name for p in iter_input_paths(test, pattern="scratch/*.png")] == ["scratch", "scratch"]
    with pytest.raises(ValueError, match="input '.*nowhere' not found"):
        list(iter_input_paths(tmp_path / "nowhere"))


def test_read_ahead_is_bounded():
    decoded = []

    class Slow:
        def decode(self, path):
            decoded.append(path)
            return path

    consumed = 0
    for _ in iter_decoded(Slow(), iter(range(100)), workers=2, prefetch=5):
        consumed += 1
        assert len(decoded) - consumed <= 5  # never more than `prefetch` images waiting in memory
    assert consumed == 100


def test_maps_are_saved_and_recorded(model, texture_root, tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        scorer = open_scorer(model, store, maps_dir=tmp_path / "maps")
        score_into_store(scorer, store, list(iter_input_paths(texture_root / "test" / "crack")))
        for rec in store.results(model[1]):
            amap = load_map(rec.map_path)
            assert amap.shape == (64, 64)
            if rec.regions:  # the saved map reaches the region's peak (up to 16-bit rounding)
                assert amap.max() == pytest.approx(min(rec.regions[0]["peak"], 4.0), abs=1e-3)


def test_operating_point_decides_and_another_model_is_kept_apart(model, texture_root, tmp_path):
    det = anomalens.load(model[0])
    det.operating_point = {"threshold": 0.0}  # flags everything
    op_path = det.save(tmp_path / "op.model")
    op_id = model_id_for(op_path, det.name)[0]
    assert op_id != model[1]
    with ResultStore(tmp_path / "r.db") as store:
        paths = list(iter_input_paths(texture_root / "test" / "good"))
        score_into_store(open_scorer(model, store), store, paths)
        op = open_scorer((op_path, op_id), store)
        assert score_into_store(op, store, paths).n_scored == 6  # not "already scored"
        assert store.count(op_id, decision="defect") == 6
        assert store.count(model[1], decision="defect") <= 1


def test_top_k_overlays(model, texture_root, tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        scorer = open_scorer(model, store)
        score_into_store(scorer, store, list(iter_input_paths(texture_root / "test")))
        written = export_top(store, scorer, 3, tmp_path / "top")
        top = store.top(model[1], 3)
    assert [p.name[:4] for p in written] == ["0001", "0002", "0003"]
    rows = list(csv.DictReader(open(tmp_path / "top" / "top.csv")))
    assert [r["path"] for r in rows] == [t.path for t in top]
    assert all("/good/" not in r["path"] for r in rows)  # the most anomalous are defects


def test_tracker_waits_until_a_file_stops_growing(tmp_path):
    f = tmp_path / "cam_001.png"
    f.write_bytes(b"\x89PNG partial")
    tracker = FileTracker(settle_polls=1)
    key = str(f)
    assert tracker.ready([f]) == []  # first sight: not known to be complete
    with open(f, "ab") as out:
        out.write(b"more bytes")
    assert tracker.ready([f]) == []  # grew since the last poll
    assert tracker.ready([f]) == [f]  # unchanged for a poll: ready
    assert tracker.ready([f]) == []  # handed out once
    tracker.finished(key, ok=False)  # it was unreadable
    assert tracker.ready([f]) == []  # unchanged: not retried
    with open(f, "ab") as out:
        out.write(b"the rest")
    assert tracker.ready([f]) == [] and tracker.ready([f]) == [f]  # changed, settled: retried
    empty = tmp_path / "empty.png"
    empty.touch()
    assert tracker.ready([empty]) == [] and tracker.ready([empty]) == []  # empty files wait


def test_watch_scores_files_as_they_land(model, texture_root, tmp_path):
    inbox = tmp_path / "camera"
    inbox.mkdir()
    sources = sorted((texture_root / "test").rglob("*.png"))[:5]
    with ResultStore(tmp_path / "r.db") as store:
        scorer = open_scorer(model, store)
        stop = threading.Event()
        result = {}
        watcher = threading.Thread(
            target=lambda: result.update(
                s=watch_folder(scorer, store, inbox, poll_seconds=0.05, batch_size=2, stop=stop)
            )
        )
        watcher.start()
        try:
            for i, src in enumerate(sources):
                (inbox / f".tmp_{i}").write_bytes(src.read_bytes())  # hidden while being written
                (inbox / f".tmp_{i}").rename(inbox / f"part_{i}.png")
            half = inbox / "slow.png"
            half.write_bytes(sources[0].read_bytes()[:100])  # a writer that stalls longer than a poll
            deadline = time.monotonic() + 60
            while store.count(model[1]) < 6 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert store.get(model[1], str(half)).status == "error"  # read too early: recorded, not fatal
            with open(half, "ab") as f:  # the slow writer finishes: the changed file is scored again
                f.write(sources[0].read_bytes()[100:])
            while store.get(model[1], str(half)).status == "error" and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            watcher.join(30)
        assert not watcher.is_alive()
        rows = {Path(r.path).name: r for r in store.results(model[1])}
    assert set(rows) == {f"part_{i}.png" for i in range(5)} | {"slow.png"}
    assert all(r.status == "ok" for r in rows.values())
    assert (result["s"].n_scored, result["s"].n_errors) == (6, 1)


def test_score_command_exports_and_resumes(model, texture_root, tmp_path):
    db = tmp_path / "results.db"
    args = ["score", str(model[0]), str(texture_root / "test"), "-o", str(db), "-q"]
    res = CliRunner().invoke(
        app,
        [
            *args,
            "--csv",
            str(tmp_path / "r.csv"),
            "--parquet",
            str(tmp_path / "r.parquet"),
            "--top",
            "2",
            "--batch-size",
            "4",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "scored 12 images" in res.output
    assert len(list(csv.DictReader(open(tmp_path / "r.csv")))) == 12
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 12
    assert sorted(p.name[:5] for p in (tmp_path / "results_top").glob("*.png")) == ["0001_", "0002_"]
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "scored 0 images" in again.output and "12 already stored" in again.output
    neither = CliRunner().invoke(app, ["score", str(model[0]), "-o", str(db)])
    assert neither.exit_code == 2 and "give INPUT" in neither.output


def _count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_kill_9_then_resume_scores_every_image_exactly_once(model, texture_root, tmp_path):
    folder = tmp_path / "archive"
    folder.mkdir()
    sources = sorted((texture_root / "test").rglob("*.png"))
    n = 600  # enough that a quiet machine is still scoring when the kill lands
    for i in range(n):  # distinct files cycling the 12 test images
        os.symlink(sources[i % 12], folder / f"img_{i:03d}.png")
    db = tmp_path / "results.db"
    ResultStore(db).close()
    with sqlite3.connect(db) as conn:  # log every rescoring: the upsert would otherwise hide one
        conn.executescript(
            "CREATE TABLE rescored (path TEXT); CREATE TRIGGER log_rescore AFTER UPDATE OF score "
            "ON results BEGIN INSERT INTO rescored VALUES (new.path); END;"
        )
    cmd = [
        str(Path(sys.executable).parent / "anomalens"),
        "score",
        str(model[0]),
        str(folder),
        "-o",
        str(db),
        "--batch-size",
        "2",
        "-q",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _count(db) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(
            0.01
        )  # kill at once after its first commit (benchmarks/ kills at random moments, 10 times)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _count(db)
    assert 0 < killed_at < n  # the kill landed mid-run
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"scored {n - killed_at} images" in done.stdout  # the resumed run skips all stored images
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        paths = [r[0] for r in conn.execute("SELECT path FROM results")]
        assert conn.execute("SELECT COUNT(*) FROM results WHERE status != 'ok'").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM rescored").fetchone()[0] == 0
    assert len(paths) == len(set(paths)) == n
