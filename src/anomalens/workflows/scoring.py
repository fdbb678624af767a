"""Score a production archive into the result store: stream, batch, commit, resume.

Images stream from a folder, a CSV list or stdin through a bounded read-ahead (worker threads
read, hash and preprocess them), are scored a batch at a time, and each batch is committed to
the store in one transaction. A rerun skips what the store already holds for the model, so a
killed job loses at most the batch in flight. Unreadable files are stored with their error.

`Detector.iter_predict` takes a finished list and one reader thread; a production stream can
be endless (stdin, watch mode) and needs the content hash, so this module drives the
`Inferencer` protocol (`preprocess`, `score_batch`) itself and judges each image with
`inference.decide`, as every other path does.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from PIL import Image

from anomalens.data import (
    IMAGE_EXTENSIONS,
    DatasetError,
    ImageReadError,
    csv_writer,
    display_name,
    list_images,
    read_image,
)
from anomalens.data.drift import DriftFlag, image_statistics
from anomalens.data.geometry import Placement
from anomalens.data.io import natural_sorted
from anomalens.data.progress import progress_bar
from anomalens.inference import MIN_REGION_AREA, Verdict, decide, verdict_overlay
from anomalens.models.base import Inferencer, score_canvases
from anomalens.store import CLAIM_STALE_SECONDS, ResultRecord, ResultStore, claim_owner

#: saved maps are 16-bit PNGs of the normalized map clipped to [0, MAP_PNG_RANGE]: value / 65535 *
#: MAP_PNG_RANGE is the normalized score, so the pixel threshold 1.0 is 65535 / MAP_PNG_RANGE
MAP_PNG_RANGE = 4.0


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def model_id_for(model_path: str | Path, detector_name: str) -> tuple[str, str]:
    """(model_id, sha256 of the file): the id names the method and pins the exact model file, so
    results of another model (or a refit) never count as already scored."""
    digest = file_sha256(model_path)
    return f"{detector_name}-{digest[:16]}", digest


def path_key(path: str | Path) -> str:
    """How a file is named in the store: absolute (symlinks kept), so a rerun from another working
    folder still finds what it scored, and valid UTF-8 (`data.display_name`: bytes that are not
    UTF-8 as \\xNN escapes)."""
    return display_name(os.path.abspath(os.fspath(path)))


# -- inputs --------------------------------------------------------------------------------------
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_folder(folder: Path, pattern: str | None = None) -> list[Path]:
    """Image files under `folder`, recursively, in natural order; `pattern` is a glob relative to the
    folder (e.g. 'line3/**/*.png'). An empty folder gives [] (watch mode waits for files)."""
    if not folder.is_dir():
        raise DatasetError(f"input folder not found: '{folder}'")
    if pattern is None:
        try:
            return list_images(folder, recursive=True)
        except DatasetError:
            return []
    return natural_sorted((p for p in folder.glob(pattern) if p.is_file() and _is_image(p)), folder)


def _csv_paths(csv_path: Path) -> Iterator[Path]:
    """The 'path' column (or the first column without such a header); relative paths are relative to the CSV."""
    with open(csv_path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            return
        column = header.index("path") if "path" in header else 0
        if "path" not in header:
            rows = iter([header, *rows])  # no header: the first row is a file too
        for row in rows:
            if not row or not row[column].strip():
                continue
            p = Path(row[column].strip())
            yield p if p.is_absolute() else csv_path.parent / p


def iter_input_paths(
    source: str | Path, pattern: str | None = None, stdin: TextIO | None = None
) -> Iterator[Path]:
    """The images named by INPUT: '-' = one path per line on stdin, a folder (recursive, optional
    glob), a .csv list, or one image file. Streams: stdin is read as scoring goes."""
    if str(source) == "-":
        # the process's stdin as bytes: a name that is not UTF-8 keeps its bytes (os.fsdecode)
        lines = stdin if stdin is not None else (os.fsdecode(b) for b in sys.stdin.buffer)
        for line in lines:
            if line.strip():
                yield Path(line.strip())
        return
    source = Path(source)
    if source.is_dir():
        yield from list_folder(source, pattern)
    elif source.suffix.lower() == ".csv" and source.is_file():
        yield from _csv_paths(source)
    elif source.is_file():
        yield source
    else:
        raise DatasetError(
            f"input '{source}' not found: give a folder, a .csv list, an image or '-' for stdin"
        )


# -- scoring -------------------------------------------------------------------------------------
@dataclass
class Decoded:
    """One file after the reader thread: pixels ready for the model, or the error that stopped it."""

    key: str
    content_sha256: str | None = None
    pixels: torch.Tensor | None = None  # the image's canvases (n, C, H, W)
    placement: Placement | None = None
    drift: list[DriftFlag] = field(default_factory=list)
    error: str | None = None


@dataclass
class ScoreSummary:
    n_scored: int = 0  # images written with status 'ok'
    n_errors: int = 0  # unreadable files written with status 'error'
    n_skipped: int = 0  # already in the store for this model
    n_elsewhere: int = 0  # claimed by another scorer process on the same store
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return (self.n_scored + self.n_errors) / self.seconds if self.seconds > 0 else 0.0


class Scorer:
    """Turns files into store records with one detector: decode (thread-safe), then score a batch."""

    def __init__(
        self,
        detector: Inferencer,
        model_id: str,
        *,
        min_region: int = MIN_REGION_AREA,
        maps_dir: str | Path | None = None,
        max_pixels: int | None = None,
    ) -> None:
        if detector.decision_calibration is None:
            raise ValueError(
                f"model {model_id} is not calibrated: refit it (fit calibrates on held-out goods)"
            )
        self.detector = detector
        self.model_id = model_id
        self.min_region = min_region
        self.max_pixels = max_pixels  # None: data.io.max_pixels_limit()
        self.maps_dir = Path(os.path.abspath(maps_dir)) / model_id if maps_dir else None
        self.preprocess = detector.preprocess()
        self.calibration = detector.decision_calibration  # the operating point's threshold when one is stored
        self.drift_profile = detector.drift_profile
        if self.maps_dir:
            self.maps_dir.mkdir(parents=True, exist_ok=True)

    def decode(self, path: str | Path) -> Decoded:
        """Read, hash and prepare one file; whatever fails is this file's error, never the batch's."""
        key = path_key(path)
        try:
            digest = file_sha256(path)
            image = read_image(path, max_pixels=self.max_pixels)
            pixels, placement = self.preprocess.canvases(image, key)
            drift = [] if self.drift_profile is None else self.drift_profile.check(image_statistics(image))
            return Decoded(key, digest, pixels, placement, drift)
        except ImageReadError as err:
            return Decoded(key, error=str(err))
        except OSError as err:  # unreadable before decoding: permissions, a file gone since listing
            return Decoded(key, error=f"cannot read image '{display_name(path)}': {err.strerror or err}")
        except Exception as err:  # noqa: BLE001 - preprocessing or measuring failed for this image only
            text = " ".join(str(err).split())[:120]
            return Decoded(
                key, error=f"cannot prepare image '{display_name(path)}': {type(err).__name__}: {text}"
            )

    def score(self, batch: list[Decoded]) -> list[ResultRecord]:
        """Score the readable files of a batch together; unreadable ones become error records."""
        good = [d for d in batch if d.error is None]
        by_key: dict[str, ResultRecord] = {}
        if good:
            results = score_canvases(
                self.detector, torch.cat([d.pixels for d in good]), [d.placement for d in good]
            )
            for d, (score, amap) in zip(good, results):
                by_key[d.key] = self._record(d, self.verdict(score, amap, d.drift))
        return [
            by_key.get(d.key) or ResultRecord(self.model_id, d.key, status="error", error=d.error)
            for d in batch
        ]

    def verdict(self, score: float, amap: np.ndarray, drift: list[DriftFlag] | None = None) -> Verdict:
        return decide(
            score,
            amap,
            self.calibration,
            localizes=self.detector.localizes,
            min_area=self.min_region,
            drift=drift,
        )

    def _record(self, d: Decoded, verdict: Verdict) -> ResultRecord:
        map_path = None
        if self.maps_dir:
            map_path = str(self.maps_dir / (hashlib.sha1(d.key.encode()).hexdigest()[:20] + ".png"))
            save_map(verdict.normalized_map, map_path)
        return ResultRecord(
            self.model_id,
            d.key,
            content_sha256=d.content_sha256,
            score=verdict.score,
            normalized_score=verdict.normalized_score,
            decision=verdict.decision,
            regions=[r.to_dict() for r in verdict.regions],
            map_path=map_path,
            drift=verdict.to_dict()["drift"],
        )

    def score_paths(self, paths: Iterable[str | Path]) -> list[ResultRecord]:
        """Decode and score in this thread (a distributed worker's batch)."""
        return self.score([self.decode(p) for p in paths])


def save_map(normalized_map: np.ndarray, path: str | Path) -> None:
    """A normalized anomaly map as a 16-bit grayscale PNG (see MAP_PNG_RANGE)."""
    values = np.clip(normalized_map / MAP_PNG_RANGE, 0, 1) * 65535
    Image.fromarray(values.round().astype(np.uint16)).save(path)


def load_map(path: str | Path) -> np.ndarray:
    """Inverse of `save_map`: the normalized map (clipped to [0, MAP_PNG_RANGE]) as float32."""
    with Image.open(path) as im:
        return np.asarray(im).astype(np.float32) / 65535 * MAP_PNG_RANGE


def iter_decoded(
    scorer: Scorer, paths: Iterable[Path], *, workers: int = 2, prefetch: int = 32
) -> Iterator[Decoded]:
    """Decode in `workers` threads, in input order, with at most `prefetch` images read ahead, so
    memory stays flat however long the stream is."""
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="anomalens-decode") as pool:
        pending = deque()
        for path in paths:
            pending.append(pool.submit(scorer.decode, path))
            if len(pending) >= prefetch:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pending_paths(paths: Iterable[Path], done: set[str], summary: ScoreSummary) -> Iterator[Path]:
    """Paths not yet in the store (nor met earlier in this stream); counts the skipped ones."""
    for p in paths:
        key = path_key(p)
        if key in done:
            summary.n_skipped += 1
            continue
        done.add(key)
        yield p


def claimed_paths(
    store: ResultStore,
    model_id: str,
    paths: Iterable[Path],
    owner: str,
    summary: ScoreSummary,
    *,
    chunk: int = 8,
    include_errors: bool = True,
    stale_after: float = CLAIM_STALE_SECONDS,
    on_elsewhere: Callable[[int], None] | None = None,
) -> Iterator[Path]:
    """The paths `owner` claims in the store, `chunk` at a time as the stream is read, so scorers
    started on the same folder and store share it; those another live scorer holds (or stored
    meanwhile) are counted in `summary.n_elsewhere` and left to it."""
    pending: list[Path] = []

    def take() -> Iterator[Path]:
        keys = [path_key(p) for p in pending]
        got = set(store.claim(model_id, keys, owner, include_errors=include_errors, stale_after=stale_after))
        lost = len(keys) - len(got)
        summary.n_elsewhere += lost
        if lost and on_elsewhere is not None:
            on_elsewhere(lost)
        yield from (p for p, k in zip(pending, keys) if k in got)
        pending.clear()

    for p in paths:
        pending.append(p)
        if len(pending) >= chunk:
            yield from take()
    if pending:
        yield from take()


def score_into_store(
    scorer: Scorer,
    store: ResultStore,
    paths: Iterable[Path],
    *,
    batch_size: int = 8,
    workers: int = 2,
    prefetch: int | None = None,
    progress: bool = False,
    retry_errors: bool = False,
    done: set[str] | None = None,
    on_batch: Callable[[list[ResultRecord]], None] | None = None,
    owner: str | None = None,
    stale_after: float = CLAIM_STALE_SECONDS,
) -> ScoreSummary:
    """Score every path not yet stored for `scorer.model_id`, committing each batch as it finishes.

    A list of paths gets a progress bar with an ETA; a stream (stdin) shows the rate only.
    retry_errors: rescore files stored with status 'error' (e.g. after fixing them).
    done: path keys to skip, when the caller knows them (saves reading them from the store).
    Images are claimed in the store a batch at a time (`owner`: this process by default), so
    scorers run at once on one store split the work; claims left by a killed scorer are taken over
    once its process is gone (same host) or after `stale_after` seconds.
    """
    summary = ScoreSummary()
    start = time.perf_counter()
    owner = owner or claim_owner()
    if done is None:
        done = store.scored_paths(scorer.model_id, include_errors=not retry_errors)
    todo = pending_paths(paths, done, summary)
    total = None
    if isinstance(paths, list):
        todo = list(todo)
        total = len(todo)
    with progress_bar(total, f"score {scorer.model_id}", enabled=progress) as bar:
        todo = claimed_paths(
            store,
            scorer.model_id,
            todo,
            owner,
            summary,
            chunk=batch_size,
            include_errors=not retry_errors,
            stale_after=stale_after,
            on_elsewhere=bar.update if bar is not None else None,
        )
        batch: list[Decoded] = []

        def flush() -> None:
            records = scorer.score(batch)
            store.add_results(records)  # one transaction, which also ends these claims
            store.refresh_claims(owner)  # the claims read ahead stay this process's
            batch.clear()
            n_errors = sum(r.status == "error" for r in records)
            summary.n_errors += n_errors
            summary.n_scored += len(records) - n_errors
            if bar is not None:
                bar.update(len(records))
            if on_batch is not None:
                on_batch(records)

        try:
            for decoded in iter_decoded(scorer, todo, workers=workers, prefetch=prefetch or 4 * batch_size):
                batch.append(decoded)
                if len(batch) >= batch_size:
                    flush()
            if batch:
                flush()
        finally:
            # what this run did not store is free for the next; if the store itself failed, the
            # claims lapse anyway once this process is gone
            with contextlib.suppress(sqlite3.Error):
                store.release_claims(owner)
    summary.seconds = time.perf_counter() - start
    return summary


def export_top(store: ResultStore, scorer: Scorer, k: int, out_dir: str | Path) -> list[Path]:
    """Overlays (image | heat map with regions) of the k most anomalous stored images, named by
    rank, plus top.csv; maps are recomputed, so this needs no saved maps."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    top = store.top(scorer.model_id, k)
    written = []
    with open(out_dir / "top.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv_writer(f)
        writer.writerow(["rank", "path", "score", "normalized_score", "decision", "n_regions", "overlay"])
        for rank, rec in enumerate(top, start=1):
            decoded = scorer.decode(rec.path)
            if decoded.error is not None:  # changed or gone since it was scored
                writer.writerow(
                    [rank, rec.path, rec.score, rec.normalized_score, rec.decision, "", decoded.error]
                )
                continue
            [(score, amap)] = score_canvases(scorer.detector, decoded.pixels, [decoded.placement])
            verdict = scorer.verdict(score, amap, decoded.drift)
            name = f"{rank:04d}_{Path(rec.path).stem}.png"
            verdict_overlay(read_image(rec.path), verdict, f"#{rank} {Path(rec.path).name}").save(
                out_dir / name
            )
            writer.writerow(
                [rank, rec.path, rec.score, rec.normalized_score, rec.decision, len(verdict.regions), name]
            )
            written.append(out_dir / name)
    return written
