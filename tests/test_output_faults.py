"""Output and store faults at the command line: one line `error: ...`, exit 2, and nothing that
was already stored is lost (predict -o, score -o/--csv, read-only/corrupt/full stores, serve --store)."""

import sqlite3

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app as cli
from anomalens.data import synthetic_image
from anomalens.store import ResultStore
from conftest import TINY_AUTOENCODER

TINY = {**TINY_AUTOENCODER, "batch_size": 2}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    goods = [synthetic_image("texture", 32, rng=rng) for _ in range(6)]
    model = root / "tiny.model"
    anomalens.create("autoencoder", **TINY).fit(goods).save(model)
    images = root / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray((synthetic_image("texture", 32, rng=rng) * 255).astype(np.uint8)).save(
            images / f"{i}.png"
        )
    blocker = root / "a-file"
    blocker.write_text("not a folder")
    return model, images, blocker


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    return result.exit_code, lines


def one_line_error(code, lines, *words):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for word in words:
        assert word in lines[0], lines[0]


def test_predict_to_an_unwritable_place(setup):
    model, images, blocker = setup
    one_line_error(*run("predict", model, images, "-o", blocker / "out", "-q"), "cannot write", "a-file")


def test_score_into_a_store_under_a_file(setup):
    model, images, blocker = setup
    one_line_error(
        *run("score", model, images, "-o", blocker / "r.db", "-q"), "cannot create the result store"
    )


def test_csv_to_an_unwritable_path_keeps_the_results(setup, tmp_path):
    model, images, blocker = setup
    store = tmp_path / "r.db"
    code, lines = run("score", model, images, "-o", store, "--csv", blocker / "x.csv", "-q")
    assert code == 2 and lines[-1].startswith("error:") and "4 results stay in" in lines[-1]
    with ResultStore(store) as s:
        assert s.count() == 4


def test_a_read_only_store(setup, tmp_path, monkeypatch):
    model, images, _ = setup
    connect = sqlite3.connect

    def read_only(*args, **kwargs):  # SQLite's own refusal to write (chmod does not stop root)
        conn = connect(*args, **kwargs)
        conn.execute("PRAGMA query_only = ON")
        return conn

    store = tmp_path / "r.db"
    ResultStore(store).close()
    monkeypatch.setattr(sqlite3, "connect", read_only)
    one_line_error(*run("score", model, images, "-o", store, "-q"), "read-only")


def test_a_corrupt_store(setup, tmp_path):
    model, images, _ = setup
    store = tmp_path / "r.db"
    store.write_bytes(b"SQLite format 3\x00" + b"\xff" * 8000)
    one_line_error(*run("score", model, images, "-o", store, "-q"), "r.db")


class FullAfterFirstBatch:
    """A real connection whose second bulk insert fails as SQLite does on a full disk."""

    def __init__(self, conn):
        object.__setattr__(self, "_conn", conn)
        object.__setattr__(self, "_batches", 0)

    def executemany(self, sql, *args):
        if "INTO results" not in sql:  # claims and other bookkeeping are not the results batch
            return self._conn.executemany(sql, *args)
        object.__setattr__(self, "_batches", self._batches + 1)
        if self._batches > 1:
            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __setattr__(self, name, value):
        setattr(self._conn, name, value)


def test_a_full_disk_while_scoring_keeps_the_first_batch(setup, tmp_path, monkeypatch):
    model, images, _ = setup
    store = tmp_path / "r.db"
    connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: FullAfterFirstBatch(connect(*a, **k)))
    code, lines = run("score", model, images, "-o", store, "-q", "--batch-size", "2")
    one_line_error(code, lines, "disk full: 2 results kept")
    monkeypatch.undo()
    with ResultStore(store) as s:
        assert s.count() == 2  # the first batch's commit survives; a rerun scores the other two


def test_serve_with_a_store_under_a_file(setup):
    model, _, blocker = setup
    one_line_error(*run("serve", model, "--runtime", "torch", "--store", blocker / "r.db"), "cannot create")
