"""Watch mode: score images as they land in a folder (a line camera's output).

Polling, not inotify: it works the same on network shares and in containers. A file is scored
once its size and modification time have stayed the same for `settle_polls` polls in a row, so
a file still being written is left for a later poll. A camera that writes to a hidden or
non-image temporary name and renames when done is never seen half-written at all.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from anomalens.store import ResultStore
from anomalens.workflows.scoring import Scorer, ScoreSummary, list_folder, path_key, score_into_store


@dataclass
class FileTracker:
    """Which files in a folder are new and have stopped changing.

    A file handed out and then found unreadable (`failed`) is handed out again once it changes:
    a writer that stalled longer than the settle time finishes the file later.
    """

    settle_polls: int = 1
    done: set[str] = field(default_factory=set)  # path keys handed out (or already in the store)
    _seen: dict[str, tuple[tuple[int, int], int]] = field(default_factory=dict)  # key -> (size, mtime), polls
    _handed: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (size, mtime) when handed out
    _failed: dict[str, tuple[int, int]] = field(default_factory=dict)  # key -> (size, mtime) when unreadable

    def ready(self, paths: list[Path]) -> list[Path]:
        """The files of this listing that are new and unchanged for `settle_polls` polls (not empty)."""
        out = []
        for p in paths:
            key = path_key(p)
            if key in self.done and key not in self._failed:
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:  # renamed or removed since the listing
                self._seen.pop(key, None)
                continue
            sig = (st.st_size, st.st_mtime_ns)
            if key in self._failed:
                if sig == self._failed[key]:
                    continue
                del self._failed[key]  # changed since it failed to read: settle and try again
                self.done.discard(key)
            old_sig, stable = self._seen.get(key, (None, -1))
            stable = stable + 1 if sig == old_sig else 0
            if stable >= self.settle_polls and st.st_size > 0:
                out.append(p)
                self.done.add(key)
                self._handed[key] = sig
                self._seen.pop(key, None)
            else:
                self._seen[key] = (sig, stable)
        return out

    def finished(self, key: str, ok: bool) -> None:
        """Report a handed-out file's result: an unreadable one is watched for changes."""
        sig = self._handed.pop(key, None)
        if not ok and sig is not None:
            self._failed[key] = sig


def watch_folder(
    scorer: Scorer,
    store: ResultStore,
    folder: str | Path,
    *,
    pattern: str | None = None,
    poll_seconds: float = 1.0,
    settle_polls: int = 1,
    batch_size: int = 8,
    workers: int = 2,
    idle_timeout: float | None = None,
    stop: threading.Event | None = None,
    on_batch: Callable | None = None,
) -> ScoreSummary:
    """Score new files under `folder` into `store` until `stop` is set, Ctrl-C, or no new file has
    come for `idle_timeout` seconds (None: forever). Files already stored for the model are skipped,
    so a restarted watcher picks up where it stopped (files stored as unreadable are retried once).
    Returns the totals."""
    folder = Path(folder)
    stop = stop or threading.Event()
    tracker = FileTracker(
        settle_polls=settle_polls, done=store.scored_paths(scorer.model_id, include_errors=False)
    )

    def after_batch(records: list) -> None:
        for r in records:
            tracker.finished(r.path, r.status == "ok")
        if on_batch is not None:
            on_batch(records)

    total = ScoreSummary()
    start = last_new = time.monotonic()
    try:
        while not stop.is_set():
            ready = tracker.ready(list_folder(folder, pattern))
            if ready:
                s = score_into_store(
                    scorer,
                    store,
                    ready,
                    batch_size=batch_size,
                    workers=workers,
                    done=set(),
                    retry_errors=True,  # the tracker hands out a failed file again only once it changed
                    on_batch=after_batch,
                )
                total.n_scored += s.n_scored
                total.n_errors += s.n_errors
                last_new = time.monotonic()
            elif idle_timeout is not None and time.monotonic() - last_new >= idle_timeout:
                break
            stop.wait(poll_seconds)
    except KeyboardInterrupt:
        pass  # every finished batch is committed: stopping here loses nothing
    total.seconds = time.monotonic() - start
    return total
