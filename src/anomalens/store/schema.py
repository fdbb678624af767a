"""The result store's SQLite schema as an ordered list of migrations.

`PRAGMA user_version` holds how many migrations a database file has applied; opening a file
applies the missing ones in order, each in its own transaction. Never edit a released
migration: append a new one (add columns with ALTER TABLE, backfill with UPDATE).
"""

from __future__ import annotations

import sqlite3


class StoreError(ValueError):
    """A result store that cannot be opened or a request it cannot serve; the message names the file."""


MIGRATIONS: tuple[str, ...] = (
    # 1: models and per-image results, with human-label columns for the review page
    """
    CREATE TABLE models (
        model_id      TEXT PRIMARY KEY,       -- '<detector>-<first 16 hex of the file's sha256>'
        detector      TEXT NOT NULL,
        model_path    TEXT,
        file_sha256   TEXT NOT NULL,
        threshold     REAL,                   -- raw score at which an image is flagged
        operating_point TEXT,                 -- JSON, NULL when the calibrated threshold decides
        registered_at TEXT NOT NULL
    );
    CREATE TABLE results (
        id               INTEGER PRIMARY KEY,
        model_id         TEXT NOT NULL REFERENCES models(model_id),
        path             TEXT NOT NULL,
        content_sha256   TEXT,
        score            REAL,                -- raw detector score; NULL when status = 'error'
        normalized_score REAL,                -- threshold at 1.0
        decision         TEXT CHECK (decision IN ('defect', 'good')),
        regions          TEXT,                -- JSON list of {x0, y0, x1, y1, area, peak}
        map_path         TEXT,                -- saved anomaly map (.npy), when asked for
        status           TEXT NOT NULL CHECK (status IN ('ok', 'error')),
        error            TEXT,
        scored_at        TEXT NOT NULL,       -- ISO 8601 UTC
        label            TEXT CHECK (label IN ('defect', 'good')),
        labelled_at      TEXT,
        reviewer         TEXT,
        note             TEXT,
        UNIQUE (model_id, path)
    );
    CREATE INDEX results_by_score ON results (model_id, score DESC);
    CREATE INDEX results_by_label ON results (label);
    """,
    # 2: drift warnings: the image's statistics outside the training goods' range
    """
    ALTER TABLE results ADD COLUMN drift TEXT;   -- JSON list of {statistic, value, low, high, excess, message}
    """,
    # 3: claims: which scorer process is working on which image, so concurrent scorers split the work
    """
    CREATE TABLE claims (
        model_id   TEXT NOT NULL,
        path       TEXT NOT NULL,
        owner      TEXT NOT NULL,             -- '<host>:<pid>' of the claiming process
        claimed_at REAL NOT NULL,             -- unix time; refreshed as the owner commits batches
        PRIMARY KEY (model_id, path)
    );
    CREATE INDEX claims_by_owner ON claims (owner);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, migrations: tuple[str, ...] = MIGRATIONS) -> int:
    """Apply the migrations `conn`'s database lacks, in order; returns the version it had before."""
    before = conn.execute("PRAGMA user_version").fetchone()[0]
    if before > len(migrations):
        raise StoreError(
            f"result store has schema version {before}; this anomalens knows up to "
            f"{len(migrations)}: upgrade anomalens"
        )
    for version in range(before + 1, len(migrations) + 1):
        # BEGIN IMMEDIATE: the migration and its version bump commit together, and two processes
        # opening a new file at once cannot both apply it (the second sees the new version)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if conn.execute("PRAGMA user_version").fetchone()[0] >= version:
                conn.execute("ROLLBACK")
                continue
            for statement in _statements(migrations[version - 1]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return before


def _statements(script: str) -> list[str]:
    """Split a migration into statements (inside a transaction sqlite3 runs one at a time).
    Comments (-- to the end of the line) are dropped first: migrations keep '--' out of strings."""
    text = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    out, current = [], ""
    for piece in text.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):  # a ';' inside a string literal is not an end
            if current.strip(" ;\n"):
                out.append(current.strip())
            current = ""
    return out
