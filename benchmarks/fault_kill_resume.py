"""Fault test: kill -9 `anomalens score` at random moments, then resume; nothing lost, nothing twice.

Usage: python benchmarks/fault_kill_resume.py --data ../shared/datasets/lookout_cookies/cookie --n 2000 --kills 10

Builds an N-image archive (symlinks cycling the category's test images, as bench_score.py),
fits PatchCore unless --model is given, and before the first run adds a trigger to the store
that logs every UPDATE of a result row: a path scored twice would show up there (the store's
upsert would otherwise hide it). Then it starts the command `--kills` times and kills it with
SIGKILL at a random moment: once its first batch is committed (so every kill lands mid-scoring,
however long the start-up takes on a busy machine), after a further random 0..--max-delay
seconds. Then it runs the command once more to the end and checks: one 'ok' row per image, no
row ever rescored, `PRAGMA integrity_check` ok. Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from anomalens.store import ResultStore
from bench_score import build_archive, fit_model

RESCORE_LOG = """
CREATE TABLE IF NOT EXISTS fault_rescored (path TEXT, at TEXT DEFAULT CURRENT_TIMESTAMP);
CREATE TRIGGER IF NOT EXISTS fault_log_rescore AFTER UPDATE OF score ON results
BEGIN INSERT INTO fault_rescored (path) VALUES (new.path); END;
"""


def stored(db: Path) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category folder")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument(
        "--max-delay", type=float, default=10.0, help="seconds after the run's first commit, at most"
    )
    parser.add_argument("--model", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fault_kill_"))
    archive = work / f"archive_{args.n}"  # one folder per size: a smaller run never sees extra files
    build_archive(args.data, args.n, archive)
    model = args.model or fit_model(args.data, work / "patchcore.model")
    db = work / "results.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    ResultStore(db).close()  # create the schema, then add the rescore log
    with sqlite3.connect(db) as conn:
        conn.executescript(RESCORE_LOG)
    cmd = [
        str(Path(sys.executable).parent / "anomalens"),
        "score",
        str(model),
        str(archive),
        "-o",
        str(db),
        "-q",
    ]
    rng = random.Random(args.seed)
    kills = []
    for i in range(args.kills):
        delay = rng.uniform(0, args.max_delay)
        before = stored(db)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while stored(db) == before and proc.poll() is None:
            time.sleep(0.05)
        try:
            proc.wait(delay)
            kills.append({"run": i, "delay_s": round(delay, 1), "killed": False, "stored_after": stored(db)})
            break  # finished before its kill: nothing left to interrupt
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills.append(
            {
                "run": i,
                "stored_before": before,
                "delay_after_first_commit_s": round(delay, 1),
                "killed": True,
                "stored_after": stored(db),
            }
        )
        print(json.dumps(kills[-1]), file=sys.stderr)
    start = time.perf_counter()
    final = subprocess.run(cmd, capture_output=True, text=True)
    with sqlite3.connect(db) as conn:
        checks = {
            "final_returncode": final.returncode,
            "final_stdout": final.stdout.strip(),
            "final_seconds": round(time.perf_counter() - start, 1),
            "rows": conn.execute("SELECT COUNT(*) FROM results").fetchone()[0],
            "distinct_paths": conn.execute("SELECT COUNT(DISTINCT path) FROM results").fetchone()[0],
            "rows_not_ok": conn.execute("SELECT COUNT(*) FROM results WHERE status != 'ok'").fetchone()[0],
            "rescored": conn.execute("SELECT COUNT(*) FROM fault_rescored").fetchone()[0],
            "integrity_check": conn.execute("PRAGMA integrity_check").fetchone()[0],
        }
    passed = (
        checks["final_returncode"] == 0
        and checks["rows"] == checks["distinct_paths"] == args.n
        and checks["rows_not_ok"] == 0
        and checks["rescored"] == 0
        and checks["integrity_check"] == "ok"
    )
    print(json.dumps({"n": args.n, "kills": kills, **checks, "passed": passed}, indent=2))
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
