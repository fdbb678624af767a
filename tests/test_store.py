"""The result store: schema and migrations, upserts that keep labels, queries, labels, exports."""

import csv
import sqlite3
import threading

import pyarrow.parquet as pq
import pytest

from anomalens.store import MIGRATIONS, SCHEMA_VERSION, ResultRecord, ResultStore, StoreError


@pytest.fixture
def store(tmp_path):
    with ResultStore(tmp_path / "results.db") as s:
        s.register_model("m1", detector="patchcore", file_sha256="ab" * 32)
        s.register_model("m2", detector="padim", file_sha256="cd" * 32)
        yield s


def rec(path, score, model="m1", **kw):
    return ResultRecord(
        model_id=model,
        path=path,
        score=score,
        normalized_score=score / 10,
        decision="defect" if score >= 10 else "good",
        **kw,
    )


def test_new_store_has_schema_wal_and_label_columns(tmp_path):
    path = tmp_path / "r.db"
    ResultStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
    assert {
        "path",
        "content_sha256",
        "model_id",
        "score",
        "normalized_score",
        "decision",
        "regions",
        "map_path",
        "status",
        "error",
        "scored_at",
        "label",
        "labelled_at",
        "reviewer",
        "note",
    } <= cols


def test_appended_migration_upgrades_an_old_file_and_keeps_rows(tmp_path):
    path = tmp_path / "r.db"
    with ResultStore(path) as s:
        s.register_model("m1", detector="patchcore", file_sha256="x")
        s.add_results([rec("a.png", 12.0)])
    newer = (*MIGRATIONS, "ALTER TABLE results ADD COLUMN line TEXT; UPDATE results SET line = 'L1';")
    with ResultStore(path, migrations=newer) as s:
        assert s.schema_version == len(MIGRATIONS) + 1
        assert s._query("SELECT line FROM results")[0][0] == "L1"
        assert s.get("m1", "a.png").score == 12.0
    with pytest.raises(StoreError, match=f"schema version {len(MIGRATIONS) + 1}.*upgrade anomalens"):
        ResultStore(path)  # a file from a newer anomalens is refused, not damaged


def test_a_store_from_before_the_drift_column_keeps_its_rows(tmp_path):
    path = tmp_path / "old.db"
    with ResultStore(path, migrations=MIGRATIONS[:1]) as s:
        s.register_model("m1", detector="patchcore", file_sha256="x")
        with s.transaction() as conn:  # the old schema has no drift column: the row written by hand
            conn.execute(
                "INSERT INTO results (model_id, path, score, normalized_score, decision, regions, status, scored_at)"
                " VALUES ('m1', 'a.png', 3.0, 1.5, 'defect', '[]', 'ok', '2026-01-01T00:00:00Z')"
            )
    with ResultStore(path) as s:
        old = s.get("m1", "a.png")
        assert old.score == 3.0 and old.drift == []
        flag = {
            "statistic": "mean",
            "value": 154.0,
            "low": 66.0,
            "high": 137.0,
            "excess": 0.2,
            "message": "brighter",
        }
        s.add_results(
            [ResultRecord("m1", "b.png", score=1.0, normalized_score=0.5, decision="good", drift=[flag])]
        )
        assert s.get("m1", "b.png").drift == [flag]


def test_a_file_that_is_not_a_store_gives_a_one_line_error(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("hello, this is not sqlite" * 100)
    with pytest.raises(StoreError, match="notes.db' is not a usable result store") as info:
        ResultStore(bad)
    assert "\n" not in str(info.value)


def test_upsert_replaces_scores_but_keeps_the_human_label(store):
    store.add_results([rec("a.png", 12.0), rec("b.png", 3.0)])
    assert store.set_label("a.png", "defect", reviewer="ana", note="rim crack") == 1
    store.add_results([rec("a.png", 8.0)])  # rescored
    a = store.get("m1", "a.png")
    assert (a.score, a.decision, a.label, a.reviewer, a.note) == (8.0, "good", "defect", "ana", "rim crack")
    assert store.count("m1") == 2


def test_scored_paths_are_per_model_and_can_leave_errors_for_retry(store):
    store.add_results(
        [
            rec("a.png", 1.0),
            ResultRecord("m1", "bad.png", status="error", error="truncated PNG"),
            rec("a.png", 2.0, model="m2"),
        ]
    )
    assert store.scored_paths("m1") == {"a.png", "bad.png"}
    assert store.scored_paths("m1", include_errors=False) == {"a.png"}
    assert store.scored_paths("m2") == {"a.png"}
    assert store.scored_paths("nope") == set()


def test_top_orders_by_score_and_results_filter(store):
    store.add_results(
        [rec(f"{i}.png", float(s)) for i, s in enumerate([5, 20, 11, 1, 14])]
        + [ResultRecord("m1", "x.png", status="error", error="empty file")]
    )
    assert [r.path for r in store.top("m1", 3)] == ["1.png", "4.png", "2.png"]
    everything = store.results("m1")
    assert everything[-1].path == "x.png" and everything[-1].error == "empty file"  # errors sort last
    assert {r.path for r in store.results("m1", decision="defect")} == {"1.png", "2.png", "4.png"}
    assert store.count("m1", status="error") == 1
    store.set_label("0.png", "good")
    assert [r.path for r in store.results("m1", labelled=True)] == ["0.png"]
    assert store.count("m1", labelled=False) == 5
    assert [r.path for r in store.results("m1", limit=2, offset=1)] == ["4.png", "2.png"]
    with pytest.raises(StoreError, match="order must be one of"):
        store.results(order="random")


def test_labels_validate_and_apply_across_models(store):
    store.add_results([rec("a.png", 1.0), rec("a.png", 2.0, model="m2")])
    with pytest.raises(StoreError, match="label must be"):
        store.set_label("a.png", "broken")
    assert store.set_label("a.png", "good", model_id="m2") == 1
    assert store.get("m1", "a.png").label is None
    assert store.set_label("a.png", "defect", reviewer="bo") == 2
    got = store.get_label("a.png")
    assert got["label"] == "defect" and got["reviewer"] == "bo" and got["labelled_at"]
    assert store.set_label("a.png", None) == 2 and store.get_label("a.png") is None
    assert store.set_label("missing.png", "good") == 0


def test_invalid_rows_are_refused_and_nothing_of_the_batch_is_kept(store):
    with pytest.raises(StoreError, match="CHECK constraint"):
        store.add_results([rec("ok.png", 1.0), ResultRecord("m1", "b.png", status="weird")])
    with pytest.raises(StoreError, match="FOREIGN KEY"):
        store.add_results([rec("c.png", 1.0, model="unregistered")])
    assert store.count() == 0


def test_exports_csv_and_parquet(store, tmp_path):
    store.add_results(
        [
            rec("a.png", 12.0, regions=[{"x0": 1, "y0": 2, "x1": 5, "y1": 6, "area": 9, "peak": 1.5}]),
            rec("b.png", 2.0),
            rec("c.png", 4.0, model="m2"),
        ]
    )
    rows = list(csv.DictReader(open(store.export_csv(tmp_path / "r.csv", "m1"))))
    assert [r["path"] for r in rows] == ["a.png", "b.png"]
    assert rows[0]["decision"] == "defect" and '"peak": 1.5' in rows[0]["regions"]
    table = pq.read_table(store.export_parquet(tmp_path / "r.parquet"))
    assert table.num_rows == 3
    assert sorted(table.column("score").to_pylist()) == [2.0, 4.0, 12.0]


def test_threads_share_one_store_and_other_connections_read_while_writing(store):
    def writer(t):
        for i in range(20):
            store.add_results([rec(f"t{t}_{i}.png", float(i))])

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    with ResultStore(store.path, read_only=True) as reader:
        assert reader.count() <= 80  # reading never blocks on the writers
        for t in threads:
            t.join()
        assert reader.count("m1") == 80
    assert store.integrity_check() == "ok"
    with pytest.raises(StoreError, match="not found"):
        ResultStore(store.path.with_name("absent.db"), read_only=True)


class FullDisk:
    """A connection whose bulk inserts fail as SQLite does when the disk is full (everything else real)."""

    def __init__(self, conn):
        object.__setattr__(self, "_conn", conn)

    def executemany(self, *args):
        raise sqlite3.OperationalError("database or disk is full")

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __setattr__(self, name, value):
        setattr(self._conn, name, value)


def test_a_full_disk_ends_in_one_line_and_keeps_what_was_stored(store):
    store.add_results([rec("a.png", 1.0), rec("b.png", 12.0)])
    real = store._conn
    store._conn = FullDisk(real)
    with pytest.raises(StoreError) as info:
        store.add_results([rec("c.png", 3.0), rec("d.png", 4.0)])
    assert str(info.value).startswith("disk full: 2 results kept") and "\n" not in str(info.value)
    store._conn = real
    assert store.scored_paths("m1") == {"a.png", "b.png"}  # the failed batch left nothing half-written


def test_a_read_only_store_says_so_and_keeps_its_rows(store):
    store.add_results([rec("a.png", 1.0)])
    store._conn.execute("PRAGMA query_only = ON")  # SQLite's own read-only refusal (root ignores chmod)
    with pytest.raises(StoreError, match="the store is read-only: 1 results kept"):
        store.add_results([rec("b.png", 2.0)])
    with pytest.raises(StoreError, match="read-only"):
        store.set_label("a.png", "good")
    store._conn.execute("PRAGMA query_only = OFF")
    assert store.scored_paths("m1") == {"a.png"}


def test_a_store_under_a_file_or_at_a_folder_gives_a_one_line_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the result store"):
        ResultStore(blocker / "results.db")
    with pytest.raises(StoreError, match="is a folder"):
        ResultStore(tmp_path)


def test_a_corrupt_store_gives_a_one_line_error(tmp_path):
    path = tmp_path / "results.db"
    with ResultStore(path) as s:
        s.register_model("m1", detector="patchcore", file_sha256="ab" * 32)
        s.add_results([rec(f"{i}.png", float(i)) for i in range(200)])
        s._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)  # every page after the first is garbage
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="corrupt") as info, ResultStore(path) as s:
        s.scored_paths("m1")
    assert "\n" not in str(info.value)
