"""`score --engine ray`: the same scoring on a Ray cluster, with Ray Data batch inference.

The model file's bytes are put in Ray's object store once and every scoring actor loads the
detector from them once; workers read the images themselves (the paths must be visible to
them: a shared file system), score, and return small rows (scores, regions, hashes) - never
maps. Only the driver writes to the result store, a batch per transaction, so resume and
kill-safety are those of local scoring: already stored paths are never sent to the cluster.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from anomalens.data.progress import progress_bar
from anomalens.store import ResultRecord, ResultStore
from anomalens.workflows.scoring import ScoreSummary, pending_paths

# the columns a worker returns per image (regions as JSON text: Arrow-friendly)
_ROW_FIELDS = (
    "path",
    "status",
    "content_sha256",
    "score",
    "normalized_score",
    "decision",
    "regions",
    "map_path",
    "error",
)


class _RayScorer:
    """A Ray Data actor: loads the detector once from the shipped model bytes, then scores batches."""

    def __init__(
        self, model_box: list, model_id: str, min_region: int, maps_dir: str | None, max_pixels: int | None
    ) -> None:
        import ray

        from anomalens.models.base import Detector
        from anomalens.workflows.scoring import Scorer

        # the ref travels in a list so Ray hands it over as a ref and this actor fetches it once
        model_bytes = ray.get(model_box[0])
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.safetensors"
            path.write_bytes(model_bytes)
            detector = Detector.load(path)  # safetensors reads the file fully: it can go now
        detector.options["device"] = "auto"  # the worker's own GPU if it has one, whatever the fit used
        self.scorer = Scorer(
            detector, model_id, min_region=min_region, maps_dir=maps_dir, max_pixels=max_pixels
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        records = self.scorer.score_paths([os.fsdecode(p) for p in batch["path"]])
        return {
            f: [json.dumps(r.regions) if f == "regions" else getattr(r, f) for r in records]
            for f in _ROW_FIELDS
        }


def score_with_ray(
    model_path: str | Path,
    model_id: str,
    store: ResultStore,
    paths: Iterable[Path],
    *,
    address: str | None = None,
    num_workers: int = 1,
    batch_size: int = 8,
    min_region: int = 16,
    maps_dir: str | Path | None = None,
    commit_every: int = 64,
    retry_errors: bool = False,
    progress: bool = False,
    ray_init: dict[str, Any] | None = None,
    max_pixels: int | None = None,
) -> ScoreSummary:
    """Score every path not yet stored for `model_id` on Ray and write the results here.

    address: a cluster ('ray://head:10001' or 'auto'); None starts a local Ray instance (pass
    `ray_init` such as {"num_cpus": 2} for its size). num_workers: scoring actors, each holding
    one detector. Results are committed every `commit_every` images. max_pixels: the decode limit
    on the workers (None: theirs, from ANOMALENS_MAX_PIXELS or the default).
    """
    import ray

    summary = ScoreSummary()
    start = time.perf_counter()
    done = store.scored_paths(model_id, include_errors=not retry_errors)
    # as bytes: a name that is not UTF-8 is no valid Arrow string (workers store it escaped)
    todo = [os.fsencode(p) for p in pending_paths(paths, done, summary)]
    if not todo:
        summary.seconds = time.perf_counter() - start
        return summary
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            **(ray_init or {}),
        )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts stored rows
        model_ref = ray.put(Path(model_path).read_bytes())  # shipped once, shared by every actor
        ds = ray.data.from_items([{"path": p} for p in todo]).map_batches(
            _RayScorer,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=num_workers),
            num_cpus=1,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model_box": [model_ref],
                "model_id": model_id,
                "min_region": min_region,
                "maps_dir": str(maps_dir) if maps_dir else None,
                "max_pixels": max_pixels,
            },
        )
        with progress_bar(len(todo), f"score {model_id} (ray)", enabled=progress) as bar:
            for rows in ds.iter_batches(batch_size=commit_every, batch_format="numpy"):
                records = [
                    _record(model_id, {f: rows[f][i] for f in _ROW_FIELDS}) for i in range(len(rows["path"]))
                ]
                store.add_results(records)
                n_errors = sum(r.status == "error" for r in records)
                summary.n_errors += n_errors
                summary.n_scored += len(records) - n_errors
                if bar is not None:
                    bar.update(len(records))
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


def _record(model_id: str, row: dict[str, Any]) -> ResultRecord:
    def value(v: Any) -> Any:  # numpy scalars and Arrow nulls (None / NaN) back to plain Python
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        return v.item() if isinstance(v, np.generic) else v

    fields = {f: value(row[f]) for f in _ROW_FIELDS}
    fields["regions"] = json.loads(fields["regions"]) if fields["regions"] else []
    return ResultRecord(model_id=model_id, **fields)
