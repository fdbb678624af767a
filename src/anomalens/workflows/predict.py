"""Score images into a folder: scores.csv, regions.jsonl and one overlay PNG per image.

Rows are written and flushed as images are scored, so an interrupted run keeps every result so
far; `PredictSummary` counts them while the run goes, for the caller's message when it stops.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anomalens.data import csv_writer
from anomalens.data.inputs import SkipLog
from anomalens.inference import MIN_REGION_AREA, Verdict, decide, verdict_overlay
from anomalens.inference.overlay import PNG_LEVEL
from anomalens.models.base import Inferencer

CSV_COLUMNS = [
    "path",
    "score",
    "normalized_score",
    "anomalous",
    "n_regions",
    "defect_area_px",
    "defect_area_share",
    "largest_box_x0_y0_x1_y1",
    "overlay",
    "drift",
]


@dataclass
class PredictSummary:
    output: Path
    n_scored: int = 0
    n_flagged: int = 0
    n_drift: int = 0  # images outside the training goods' range (see the drift column)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def scores_csv(self) -> Path:
        return self.output / "scores.csv"

    @property
    def skipped_txt(self) -> Path:
        return self.output / "skipped.txt"


def overlay_name(path: Path, used: set[str]) -> str:
    """A file name for an image's overlay, unique among `used` (which it extends)."""
    for name in (path.stem, f"{path.parent.name}_{path.stem}"):
        if name not in used:
            used.add(name)
            return name + ".png"
    name = f"{path.parent.name}_{path.stem}_{len(used)}"
    used.add(name)
    return name + ".png"


#: overlays waiting for the writer thread at most (each holds an image and its map)
PENDING_OVERLAYS = 8


def _write_overlay(image: np.ndarray, verdict: Verdict, name: str, path: Path) -> None:
    verdict_overlay(image, verdict, name).save(path, compress_level=PNG_LEVEL)


def predict_to_folder(
    model: Inferencer,
    images: Iterable | np.ndarray,
    output: str | Path,
    *,
    overlays: bool = True,
    on_error: str = "raise",
    min_area: int = MIN_REGION_AREA,
    min_share: float = 0.0,
    progress: bool = False,
    summary: PredictSummary | None = None,
    max_pixels: int | None = None,
) -> PredictSummary:
    """Score `images` with `model` and write the results under `output` as they come.

    on_error='skip' lists each image that fails (unreadable, too large or small, cannot be
    prepared) in skipped.txt as it is met and goes on. Pass `summary` to read the counts so far
    when the run is interrupted. max_pixels: the decode limit (see `data.io.read_image`).
    Paths are written as `data.display_name` gives them (bytes that are not UTF-8 as \\xNN), and
    CSV cells spreadsheet-safe (`data.csv_safe`).
    """
    calibration = model.decision_calibration
    if calibration is None:
        raise ValueError(f"{model.name} is not calibrated: fit it with calibration images before predicting")
    output = Path(output)
    summary = summary or PredictSummary(output)
    output.mkdir(parents=True, exist_ok=True)
    if overlays:
        (output / "overlays").mkdir(exist_ok=True)
    summary.skipped_txt.unlink(missing_ok=True)  # a rerun's list starts afresh, as scores.csv does
    skip_log = SkipLog(path=summary.skipped_txt)
    used: set[str] = set()
    # overlays (drawing and PNG encoding, which releases the GIL) are written by a thread of their
    # own while the model scores the next batch; the decoded image is reused, not read again
    pending: deque[Future] = deque()
    try:
        with (
            open(summary.scores_csv, "w", newline="", encoding="utf-8") as f_csv,
            open(output / "regions.jsonl", "w", encoding="utf-8") as f_reg,
            ThreadPoolExecutor(max_workers=1) as drawer,
        ):
            writer = csv_writer(f_csv)
            writer.writerow(CSV_COLUMNS)
            scored_images = model.iter_predict(
                images,
                progress=progress,
                on_error=on_error,
                skip_log=skip_log,
                max_pixels=max_pixels,
                keep_images=overlays,
            )
            for scored in scored_images:
                key = scored.key
                verdict = decide(
                    scored.score,
                    scored.map,
                    calibration,
                    localizes=model.localizes,
                    min_area=min_area,
                    min_share=min_share,
                    drift=scored.drift,
                )
                regions = verdict.regions
                name = ""
                if overlays:
                    name = "overlays/" + overlay_name(Path(key), used)
                    pending.append(
                        drawer.submit(_write_overlay, scored.image, verdict, Path(key).name, output / name)
                    )
                    while len(pending) > PENDING_OVERLAYS or (pending and pending[0].done()):
                        pending.popleft().result()  # a failed write stops the run, as before
                box = (
                    " ".join(map(str, (regions[0].x0, regions[0].y0, regions[0].x1, regions[0].y1)))
                    if regions
                    else ""
                )
                writer.writerow(
                    [
                        key,
                        f"{scored.score:.6g}",
                        f"{verdict.normalized_score:.4f}",
                        int(verdict.anomalous),
                        len(regions),
                        sum(r.area for r in regions),
                        f"{sum(r.area_share for r in regions):.6f}",
                        box,
                        name,
                        verdict.drift_text,
                    ]
                )
                record = {"path": key, "regions": [r.to_dict() for r in regions]}
                f_reg.write(json.dumps({**record, "drift": verdict.to_dict()["drift"]}) + "\n")
                f_csv.flush()
                summary.n_scored += 1
                summary.n_flagged += verdict.anomalous
                summary.n_drift += bool(verdict.drift)
            while pending:
                pending.popleft().result()
    finally:
        summary.skipped = skip_log.skipped
    return summary
