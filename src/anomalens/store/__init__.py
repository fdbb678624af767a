"""The result store: every scored image of a production archive in one SQLite file.

One file, WAL mode: readers (a review page, a dashboard, `sqlite3 results.db`) never block the
scorer and see only committed batches. A killed scorer loses at most the batch it had not
committed yet and never corrupts the file (SQLite's journal), and a rerun skips what is stored.

Tables (see store/schema.py, versioned with PRAGMA user_version and ordered migrations):

* ``models``: one row per model file (model_id = detector name + content hash of the file, so
  the same images scored by another model are kept apart).
* ``results``: one row per (model_id, path): content hash, raw and normalized score, decision
  ('defect' / 'good'), regions (JSON), saved map path, status ('ok' / 'error') and error text,
  scored_at; human review columns label ('defect' / 'good' / NULL), labelled_at, reviewer, note.

Example::

    from anomalens.store import ResultStore, ResultRecord

    with ResultStore("results.db") as store:
        store.register_model(model_id, detector="patchcore", model_path="m.model", file_sha256=h)
        done = store.scored_paths(model_id)          # resume: skip these
        store.add_results([ResultRecord(model_id=model_id, path="a.png", score=1.2, ...)])
        worst = store.top(model_id, k=20)            # most anomalous first
        store.set_label("a.png", "defect", reviewer="ana", note="crack at the rim")
        store.export_csv("results.csv", model_id)

Thread safety: one ResultStore may be shared by threads (a lock serializes its use of the one
connection); processes should each open their own ResultStore on the same file, which
SQLite's WAL locking makes safe (one writer at a time; writers wait up to `timeout` seconds).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from anomalens.data.csv_safe import csv_writer
from anomalens.store.schema import MIGRATIONS, SCHEMA_VERSION, StoreError, migrate

__all__ = [
    "CLAIM_STALE_SECONDS",
    "LABELS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ResultRecord",
    "ResultStore",
    "StoreError",
    "claim_owner",
    "utc_now",
]

LABELS = ("defect", "good")
#: a claim not refreshed for this many seconds is abandoned (its owner died on another machine)
CLAIM_STALE_SECONDS = 600.0


def claim_owner() -> str:
    """This process as a claim owner: '<host>:<pid>'."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_gone(owner: str) -> bool:
    """True when `owner` is a process of this host that no longer runs (its claims are free at once)."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine: only the timeout frees its claims
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def utc_now() -> str:
    """Timestamps in the store: ISO 8601, UTC, seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class ResultRecord:
    """One image's row in ``results`` (regions as a list of dicts, JSON in the file)."""

    model_id: str
    path: str
    status: str = "ok"  # 'ok' or 'error'
    content_sha256: str | None = None
    score: float | None = None
    normalized_score: float | None = None
    decision: str | None = None  # 'defect' or 'good'
    regions: list[dict] = field(default_factory=list)
    map_path: str | None = None
    drift: list[dict] = field(default_factory=list)  # drift warnings (see data/drift.py)
    error: str | None = None
    scored_at: str = field(default_factory=utc_now)
    label: str | None = None
    labelled_at: str | None = None
    reviewer: str | None = None
    note: str | None = None
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_COLUMNS = [f.name for f in fields(ResultRecord)]
_JSON_COLUMNS = ("regions", "drift")  # lists, stored as JSON text
# named, not *: columns a later migration (or another tool) adds do not break ResultRecord
_SELECT = ", ".join(_COLUMNS)
# what scoring writes; rescoring a row keeps its human label
_SCORE_COLUMNS = [
    "model_id",
    "path",
    "content_sha256",
    "score",
    "normalized_score",
    "decision",
    "regions",
    "map_path",
    "drift",
    "status",
    "error",
    "scored_at",
]


def _reason(err: sqlite3.Error) -> str:
    """What a SQLite error means for the user, in words (its own text where none fits better)."""
    text = str(err).lower()
    if "readonly" in text or "read-only" in text:
        return "the store is read-only"
    if "disk is full" in text or "disk full" in text:
        return "disk full"
    if "malformed" in text or "not a database" in text or "disk image" in text:
        return "the store file is corrupt (restore it from a backup, or score into a new one)"
    if "locked" in text or "busy" in text:
        return "the store is locked by another process"
    return str(err)


def _record(row: sqlite3.Row) -> ResultRecord:
    values = dict(row)
    for key in _JSON_COLUMNS:
        values[key] = json.loads(values[key]) if values[key] else []
    return ResultRecord(**values)


class ResultStore:
    """An open result store file: ``ResultStore(path)`` creates or migrates it.

    read_only: open an existing file without writing (a report or dashboard process).
    migrations: the ordered migration list to apply (default: this anomalens's schema; tests and
    tools may pass a longer one).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        timeout: float = 30.0,
        read_only: bool = False,
        migrations: tuple[str, ...] = MIGRATIONS,
    ) -> None:
        self.path = Path(path)
        if read_only and not self.path.is_file():
            raise StoreError(f"result store '{self.path}' not found")
        if self.path.is_dir():
            raise StoreError(f"result store '{self.path}' is a folder: give a file name, e.g. results.db")
        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as err:  # a file where a folder should be, no permission
                raise StoreError(
                    f"cannot create the result store '{self.path}': {err.strerror or err}"
                ) from None
        uri = f"{self.path.resolve().as_uri()}?mode=ro" if read_only else str(self.path)
        try:
            # autocommit mode: transactions are the explicit BEGIN/COMMIT in `transaction()`
            self._conn = sqlite3.connect(
                uri, uri=read_only, timeout=timeout, isolation_level=None, check_same_thread=False
            )
            self._conn.row_factory = sqlite3.Row
            if not read_only:
                self._conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a killed process never loses a commit; only power loss may
                # drop the last few, and never corrupts the file
                self._conn.execute("PRAGMA synchronous=NORMAL")
                migrate(self._conn, migrations)
            self._conn.execute("PRAGMA foreign_keys=ON")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.DatabaseError as err:
            raise StoreError(f"'{self.path}' is not a usable result store: {_reason(err)}") from None
        except StoreError as err:
            raise StoreError(f"'{self.path}' is not a usable result store: {err}") from None
        if read_only and version != len(migrations):
            raise StoreError(
                f"result store '{self.path}' has schema version {version}, expected {len(migrations)}: "
                "open it once for writing to migrate it"
            )
        self._lock = threading.RLock()

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all (BEGIN IMMEDIATE takes the write lock now).

        A SQLite failure (read-only, disk full, corrupt, locked) ends in one StoreError that says
        how many results the store keeps: every earlier commit is intact."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:  # SQLite may have rolled back already (disk full)
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as err:
                raise self._write_error(err) from None

    def _write_error(self, err: sqlite3.Error) -> StoreError:
        reason = _reason(err)
        try:
            kept = f"{self._conn.execute('SELECT COUNT(*) FROM results').fetchone()[0]} results kept"
        except sqlite3.Error:
            kept = "earlier results kept"
        return StoreError(f"{reason}: {kept} in '{self.path}' (nothing already stored is lost)")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._conn.execute(sql, tuple(params)).fetchall()
            except sqlite3.DatabaseError as err:
                raise StoreError(f"cannot read the result store '{self.path}': {_reason(err)}") from None

    # -- models ------------------------------------------------------------------------------
    def register_model(
        self,
        model_id: str,
        *,
        detector: str,
        file_sha256: str,
        model_path: str | None = None,
        threshold: float | None = None,
        operating_point: dict | None = None,
    ) -> None:
        """Record a model (idempotent: an already registered model_id keeps its first row)."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO models (model_id, detector, model_path, file_sha256, threshold, "
                "operating_point, registered_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    model_id,
                    detector,
                    model_path,
                    file_sha256,
                    threshold,
                    json.dumps(operating_point) if operating_point else None,
                    utc_now(),
                ),
            )

    def models(self) -> list[dict[str, Any]]:
        """Registered models, oldest first, with their result counts."""
        rows = self._query(
            "SELECT m.*, (SELECT COUNT(*) FROM results r WHERE r.model_id = m.model_id) AS n_results "
            "FROM models m ORDER BY registered_at, model_id"
        )
        out = []
        for row in rows:
            d = dict(row)
            d["operating_point"] = json.loads(d["operating_point"]) if d["operating_point"] else None
            out.append(d)
        return out

    # -- results -----------------------------------------------------------------------------
    def add_results(self, records: Iterable[ResultRecord]) -> int:
        """Insert or replace (same model_id and path) results in one transaction; labels are kept."""
        rows = [
            tuple(json.dumps(getattr(r, c)) if c in _JSON_COLUMNS else getattr(r, c) for c in _SCORE_COLUMNS)
            for r in records
        ]
        updates = ", ".join(f"{c} = excluded.{c}" for c in _SCORE_COLUMNS[2:])
        try:
            with self.transaction() as conn:
                conn.executemany(
                    f"INSERT INTO results ({', '.join(_SCORE_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_SCORE_COLUMNS))}) "
                    f"ON CONFLICT (model_id, path) DO UPDATE SET {updates}",
                    rows,
                )
                # a stored result ends its claim, in the same transaction
                conn.executemany("DELETE FROM claims WHERE model_id = ? AND path = ?", [r[:2] for r in rows])
        except sqlite3.IntegrityError as err:
            # CHECK (status, decision values) or FOREIGN KEY (model not registered) failed
            raise StoreError(f"cannot store results in '{self.path}': {err}") from None
        return len(rows)

    # -- claims: concurrent scorers split the work ------------------------------------------
    def claim(
        self,
        model_id: str,
        paths: Iterable[str],
        owner: str,
        *,
        include_errors: bool = True,
        stale_after: float = CLAIM_STALE_SECONDS,
    ) -> list[str]:
        """Claim `paths` for `owner` in one transaction and return those it got: not stored yet (an
        'error' row counts as stored unless include_errors=False) and not held by another live
        claimer. A claim is free again when its owner is a dead process of this host, or when it
        was not refreshed for `stale_after` seconds (an owner on another machine that died)."""
        now = time.time()
        done = "" if include_errors else " AND status = 'ok'"
        taken = []
        with self.transaction() as conn:
            for path in paths:
                if conn.execute(
                    f"SELECT 1 FROM results WHERE model_id = ? AND path = ?{done}", (model_id, path)
                ).fetchone():
                    continue
                held = conn.execute(
                    "SELECT owner, claimed_at FROM claims WHERE model_id = ? AND path = ?", (model_id, path)
                ).fetchone()
                if (
                    held is not None
                    and held[0] != owner
                    and held[1] > now - stale_after
                    and not _owner_gone(held[0])
                ):
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO claims (model_id, path, owner, claimed_at) VALUES (?, ?, ?, ?)",
                    (model_id, path, owner, now),
                )
                taken.append(path)
        return taken

    def refresh_claims(self, owner: str) -> None:
        """Keep `owner`'s claims alive (a scorer calls this as it commits batches)."""
        with self.transaction() as conn:
            conn.execute("UPDATE claims SET claimed_at = ? WHERE owner = ?", (time.time(), owner))

    def release_claims(self, owner: str) -> int:
        """Drop `owner`'s claims (a scorer that stops hands back what it did not score)."""
        with self.transaction() as conn:
            return conn.execute("DELETE FROM claims WHERE owner = ?", (owner,)).rowcount

    def scored_paths(self, model_id: str, *, include_errors: bool = True) -> set[str]:
        """Paths already in the store for this model: a resumed run skips them.

        With include_errors=False, files recorded as unreadable are not in the set (so they are retried).
        """
        where = "" if include_errors else " AND status = 'ok'"
        return {r[0] for r in self._query(f"SELECT path FROM results WHERE model_id = ?{where}", (model_id,))}

    def get(self, model_id: str, path: str) -> ResultRecord | None:
        rows = self._query(f"SELECT {_SELECT} FROM results WHERE model_id = ? AND path = ?", (model_id, path))
        return _record(rows[0]) if rows else None

    def results(
        self,
        model_id: str | None = None,
        *,
        order: str = "score",
        status: str | None = None,
        decision: str | None = None,
        labelled: bool | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[ResultRecord]:
        """Results filtered by model / status / decision / whether labelled.

        order: 'score' (most anomalous first, errors last), 'path', or 'scored_at' (newest first).
        """
        orders = {
            "score": "score IS NULL, score DESC, path",
            "path": "path",
            "scored_at": "scored_at DESC, id DESC",
        }
        if order not in orders:
            raise StoreError(f"order must be one of {', '.join(orders)}, got {order!r}")
        where, params = self._filters(model_id, status, decision, labelled)
        sql = f"SELECT {_SELECT} FROM results{where} ORDER BY {orders[order]} LIMIT ? OFFSET ?"
        return [_record(r) for r in self._query(sql, [*params, -1 if limit is None else limit, offset])]

    def top(self, model_id: str, k: int = 20) -> list[ResultRecord]:
        """The k most anomalous scored images of a model (highest raw score first)."""
        return self.results(model_id, status="ok", limit=k)

    def count(
        self,
        model_id: str | None = None,
        *,
        status: str | None = None,
        decision: str | None = None,
        labelled: bool | None = None,
    ) -> int:
        where, params = self._filters(model_id, status, decision, labelled)
        return self._query(f"SELECT COUNT(*) FROM results{where}", params)[0][0]

    @staticmethod
    def _filters(
        model_id: str | None, status: str | None, decision: str | None, labelled: bool | None
    ) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for column, value in (("model_id", model_id), ("status", status), ("decision", decision)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if labelled is not None:
            clauses.append("label IS NOT NULL" if labelled else "label IS NULL")
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    # -- human labels -----------------------------------------------------------------------
    def set_label(
        self,
        path: str,
        label: str | None,
        *,
        reviewer: str | None = None,
        note: str | None = None,
        model_id: str | None = None,
    ) -> int:
        """Label an image 'defect' or 'good' (None clears it), on every model's row for that path
        unless model_id is given; returns the number of rows changed (0: path not in the store)."""
        if label is not None and label not in LABELS:
            raise StoreError(f"label must be 'defect', 'good' or None, got {label!r}")
        sql = "UPDATE results SET label = ?, labelled_at = ?, reviewer = ?, note = ? WHERE path = ?"
        params: list[Any] = [label, utc_now() if label else None, reviewer, note, path]
        if model_id is not None:
            sql += " AND model_id = ?"
            params.append(model_id)
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def get_label(self, path: str) -> dict[str, Any] | None:
        """The newest label given to this path: {label, labelled_at, reviewer, note}, or None."""
        rows = self._query(
            "SELECT label, labelled_at, reviewer, note FROM results WHERE path = ? AND label IS NOT "
            "NULL ORDER BY labelled_at DESC LIMIT 1",
            (path,),
        )
        return dict(rows[0]) if rows else None

    # -- export and checks -------------------------------------------------------------------
    def _export_rows(self, model_id: str | None) -> tuple[list[str], list[tuple]]:
        cols = [c for c in _COLUMNS if c != "id"]
        where, params = self._filters(model_id, None, None, None)
        rows = self._query(f"SELECT {', '.join(cols)} FROM results{where} ORDER BY model_id, path", params)
        return cols, [tuple(r) for r in rows]

    def export_csv(self, path: str | Path, model_id: str | None = None) -> Path:
        """All results (of one model, or all) as CSV, regions as JSON text; cells that start like a
        spreadsheet formula are quoted (`data.csv_safe`)."""
        cols, rows = self._export_rows(model_id)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv_writer(f)
            writer.writerow(cols)
            writer.writerows(rows)
        return path

    def export_parquet(self, path: str | Path, model_id: str | None = None) -> Path:
        """All results (of one model, or all) as a Parquet file (pyarrow), regions as JSON text."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols, rows = self._export_rows(model_id)
        types = {"score": pa.float64(), "normalized_score": pa.float64()}
        table = pa.table(
            {c: pa.array([r[i] for r in rows], type=types.get(c, pa.string())) for i, c in enumerate(cols)}
        )
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        return path

    def integrity_check(self) -> str:
        """SQLite's own full check: 'ok' for a healthy file."""
        return self._query("PRAGMA integrity_check")[0][0]

    @property
    def schema_version(self) -> int:
        return self._query("PRAGMA user_version")[0][0]
