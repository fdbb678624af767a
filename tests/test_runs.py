"""Run and resume (workflows/runs.py): the cells file and cells in child processes, with tiny
`python -c` children."""

import sys

import pytest

from anomalens.workflows.runs import (
    RESULT_MARKER,
    CellError,
    CellTimeout,
    Worker,
    append_cell,
    load_cells,
    parse_child_output,
    resume_cells,
    run_child,
)

# a Worker's child: each task says what to do (print noise then echo it, sleep, or exit)
SERVE = """
import os, sys, time
from anomalens.workflows.runs import serve_tasks

def run(task):
    print("a library's chatter")
    time.sleep(task.get("sleep", 0))
    if "exit" in task:
        os._exit(task["exit"])
    return {"echo": task["echo"], "pid": os.getpid()}

serve_tasks(run)
"""


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_torn_last_line_is_repaired_and_the_next_record_stays_whole(tmp_path):
    path = tmp_path / "cells.jsonl"
    assert resume_cells(path) == {}  # no file yet
    append_cell(path, {"key": "a", "status": "ok"})
    append_cell(path, {"key": "a", "status": "failed"})  # the latest record of a key wins
    with open(path, "a") as f:
        f.write('{"key": "b", "sta')  # a crash mid-write
    assert resume_cells(path) == {"a": {"key": "a", "status": "failed"}}
    append_cell(path, {"key": "c", "status": "ok"})
    assert set(load_cells(path)) == {"a", "c"}
    assert path.read_text().endswith('"ok"}\n')


def test_a_child_prints_noise_and_its_marked_result():
    code = f"print('loading weights'); print({RESULT_MARKER!r} + '{{\"auroc\": 0.9}}'); print('bye')"
    assert run_child(python(code), timeout=60) == {"auroc": 0.9}
    # the marked line counts only when the child ended well
    with pytest.raises(CellError, match="^exit code 3 without a result$"):
        parse_child_output(3, RESULT_MARKER + "{}", "")


def test_a_child_that_fails_or_dies_says_why_in_one_line():
    with pytest.raises(CellError, match="^ValueError: bad input$"):
        run_child(python("import sys; sys.stderr.write('warning\\nValueError: bad input\\n'); sys.exit(1)"))
    with pytest.raises(CellError, match=r"^killed by signal 9 \(out of memory\?\)$"):
        run_child(python("import os, signal; os.kill(os.getpid(), signal.SIGKILL)"))


def test_a_child_over_its_timeout_is_killed():
    with pytest.raises(CellTimeout, match=r"^timed out after 0\.5 s$"):
        run_child(python("import time; time.sleep(60)"), timeout=0.5)


def test_worker_runs_cells_one_after_another_and_replaces_a_killed_or_dead_process(tmp_path):
    worker = Worker(python(SERVE), tmp_path / "worker.log")
    try:
        first = worker.run({"echo": 1}, timeout=60)
        second = worker.run({"echo": 2}, timeout=60)
        assert (first["echo"], second["echo"]) == (1, 2) and first["pid"] == second["pid"]  # the same process
        proc = worker.proc
        with pytest.raises(CellTimeout):
            worker.run({"echo": 3, "sleep": 60}, timeout=0.5)
        assert worker.proc is None and proc.returncode is not None  # killed
        with pytest.raises(
            CellError, match=r"^the cell's worker process died \(exit code 7; out of memory\?\)$"
        ):
            worker.run({"echo": 4, "exit": 7}, timeout=60)
        assert worker.run({"echo": 5}, timeout=60)["echo"] == 5  # a fresh process
    finally:
        worker.close()
    assert worker.proc is None
