"""Run and resume: the file of finished cells, and cells run in child processes.

A *cell* is one unit of a workflow's grid: the benchmark's (model, category, seed), the classical
study's (detector, representation). Each finished cell is appended to OUT/cells.jsonl at once and
fsynced, so a run that crashed or was interrupted resumes with the cells recorded there.

A cell runs in a child process (its peak RSS is its own; a crash or an overrun costs only that cell)
that prints its result as one JSON line marked with RESULT_MARKER on stdout: libraries may print
other lines, they are ignored. Two ways to run them:

- `run_child`: one process per cell, its stderr's last line is the error message;
- `Worker`: one long-lived process running cells one after another (`serve_tasks` on its side), for
  cells that share what the process loaded; killed and replaced when a cell overruns its time.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CELLS_FILE",
    "RESULT_MARKER",
    "CellError",
    "CellTimeout",
    "Worker",
    "append_cell",
    "load_cells",
    "one_line",
    "parse_child_output",
    "parse_result_line",
    "print_result",
    "repair_tail",
    "resume_cells",
    "run_child",
    "serve_tasks",
]

CELLS_FILE = "cells.jsonl"
RESULT_MARKER = "ANOMALENS_CELL "  # prefix of a child's result line on stdout


class CellError(RuntimeError):
    """A cell that could not finish; the message is one line."""


class CellTimeout(CellError):
    """A cell past its time; its process was killed."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:g} s")
        self.seconds = seconds


def one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- the cells file --------------------------------------------------------------------------------
def load_cells(path: str | Path) -> dict[str, dict[str, Any]]:
    """key -> latest record of a cells file; a line cut by a crash is ignored."""
    path = Path(path)
    records: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "key" in record:
                records[record["key"]] = record
    return records


def append_cell(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record and make sure it is on disk before the next cell starts."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def repair_tail(path: str | Path) -> None:
    """A crash mid-write can leave a last line without newline: end it so the next record stays whole."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def resume_cells(path: str | Path) -> dict[str, dict[str, Any]]:
    """The cells file as a run resumes it: torn last line repaired, then the latest record per key."""
    repair_tail(path)
    return load_cells(path)


# -- the child's side ------------------------------------------------------------------------------
def print_result(result: Mapping[str, Any]) -> None:
    """The cell's result line, for the parent to find among whatever else went to stdout."""
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)


def serve_tasks(run: Callable[[dict[str, Any]], Mapping[str, Any]]) -> None:
    """A Worker's loop: one JSON task per stdin line, one result line per task, until stdin closes."""
    for line in sys.stdin.buffer:
        if line.strip():
            print_result(run(json.loads(line)))


# -- the parent's side -----------------------------------------------------------------------------
def parse_result_line(line: str) -> dict[str, Any] | None:
    """The result a stdout line carries, or None for any other line."""
    return json.loads(line[len(RESULT_MARKER) :]) if line.startswith(RESULT_MARKER) else None


def parse_child_output(returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    """The result a cell process printed, or CellError with its one-line reason."""
    if returncode == 0:
        for line in reversed(stdout.splitlines()):
            result = parse_result_line(line)
            if result is not None:
                return result
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if returncode < 0:
        why = f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    else:
        why = lines[-1] if lines else f"exit code {returncode} without a result"
    raise CellError(one_line(why))


def run_child(
    cmd: list[str], timeout: float | None = None, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run one cell's process to its end: its result, CellTimeout (killed) or CellError."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:  # subprocess.run has killed it
        raise CellTimeout(timeout) from None
    return parse_child_output(proc.returncode, proc.stdout, proc.stderr)


class Worker:
    """One long-lived process (`cmd` runs `serve_tasks`) running cells one after another; killed and
    replaced when a cell overruns its time. A fresh interpreter, so no main-module re-import and no
    fork of a process holding threads. Its stderr goes to `log_path`."""

    def __init__(self, cmd: list[str], log_path: Path | None = None) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    def _start(self) -> None:
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if stderr is not subprocess.DEVNULL:
            stderr.close()
        self.buf = b""

    def run(self, task: Mapping[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """The task's result; CellTimeout when it overran `timeout` s (the process is killed), CellError
        when the process died."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(task).encode() + b"\n")
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError included: it died between two cells
            self._died()
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                result = parse_result_line(line.decode("utf-8", "replace"))
                if result is not None:
                    return result
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                self.kill()
                raise CellTimeout(timeout)
            ready, _, _ = select.select([fd], [], [], wait)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self._died()
                self.buf += chunk

    def _died(self) -> None:
        try:  # its stdout or stdin closed: it is ending, wait for its exit code (poll() could be too early)
            code = self.proc.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        raise CellError(f"the cell's worker process died (exit code {code}; out of memory?)")

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            for stream in (self.proc.stdin, self.proc.stdout):
                with contextlib.suppress(OSError):
                    stream.close()
        self.proc = None
        self.buf = b""

    def close(self) -> None:
        """Let the process end on closed stdin; kill it when it does not within 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()
