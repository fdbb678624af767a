"""The review page's data: gallery pages, labels, live threshold statistics and CSV export.

Built on the result store (anomalens.store): writes go through `ResultStore` (`add_results`,
`set_label`); the gallery and statistics are SQL reads on its `results` table over a second
connection, which WAL mode lets run beside the writer. Images are only ever read from paths
recorded in the store, looked up by result id: a request cannot name a file.
"""

from __future__ import annotations

import io
import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from anomalens.data import ImageReadError, csv_writer, read_image
from anomalens.inference import Region, Verdict, overlay_image, verdict_overlay
from anomalens.inference.overlay import verdict_title
from anomalens.serve.model import ServedModel
from anomalens.store import ResultRecord, ResultStore
from anomalens.workflows.scoring import load_map

STATIC = Path(__file__).parent / "static"
FILTERS = {
    "all": "",
    "unlabelled": " AND label IS NULL",
    "defect": " AND label = 'defect'",
    "good": " AND label = 'good'",
}
_ITEM_COLUMNS = (
    "id, path, score, normalized_score, decision, regions, drift, map_path, "
    "label, labelled_at, reviewer, note"
)
_EXPORT_COLUMNS = (
    "path",
    "score",
    "normalized_score",
    "decision",
    "label",
    "reviewer",
    "labelled_at",
    "note",
)


class ReviewStore:
    """One model's results in a result store file, as the review page sees them."""

    def __init__(self, path: Path, model_id: str) -> None:
        self.path, self.model_id = Path(path), model_id
        self.store = ResultStore(self.path)  # creates and migrates the file when new
        self._read = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0)
        self._read.row_factory = sqlite3.Row
        self._read_lock = threading.Lock()

    def close(self) -> None:
        self.store.close()
        self._read.close()

    def _rows(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._read_lock:
            return self._read.execute(sql, params).fetchall()

    @staticmethod
    def _item(row: sqlite3.Row) -> dict[str, Any]:
        item = dict(row)
        item["regions"] = json.loads(item["regions"]) if item["regions"] else []
        item["drift"] = json.loads(item["drift"]) if item["drift"] else []
        item["name"] = Path(item["path"]).name
        return item

    # -- writes ---------------------------------------------------------------------------------
    def register_model(self, detector: str, file_sha256: str, model_path: str, threshold: float) -> None:
        self.store.register_model(
            self.model_id,
            detector=detector,
            file_sha256=file_sha256,
            model_path=model_path,
            threshold=threshold,
        )

    def add_result(self, *, path: str, content_hash: str, verdict: Verdict) -> int:
        """Record one scored image; returns its result id."""
        record = ResultRecord(
            model_id=self.model_id,
            path=path,
            content_sha256=content_hash,
            score=verdict.score,
            normalized_score=verdict.normalized_score,
            decision=verdict.decision,
            regions=[r.to_dict() for r in verdict.regions],
            drift=verdict.to_dict()["drift"],
        )
        self.store.add_results([record])
        return self.store.get(self.model_id, path).id

    def set_label(
        self, result_id: int, label: str | None, reviewer: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Label one result (None clears it); saved before this returns."""
        item = self.item(result_id)
        self.store.set_label(item["path"], label, reviewer=reviewer, note=note, model_id=self.model_id)
        return self.item(result_id)

    # -- reads ----------------------------------------------------------------------------------
    def item(self, result_id: int) -> dict[str, Any]:
        rows = self._rows(
            f"SELECT {_ITEM_COLUMNS} FROM results WHERE id = ? AND model_id = ?", (result_id, self.model_id)
        )
        if not rows:
            raise HTTPException(404, f"no result {result_id} for model {self.model_id}")
        return self._item(rows[0])

    def page(self, offset: int = 0, limit: int = 60, label_filter: str = "all") -> dict[str, Any]:
        """Scored images, most anomalous first, with the total matching the filter."""
        where = f"WHERE model_id = ? AND status = 'ok'{FILTERS[label_filter]}"
        rows = self._rows(
            f"SELECT {_ITEM_COLUMNS} FROM results {where} "
            "ORDER BY normalized_score DESC, path LIMIT ? OFFSET ?",
            (self.model_id, limit, offset),
        )
        total = self._rows(f"SELECT COUNT(*) FROM results {where}", (self.model_id,))[0][0]
        return {"items": [self._item(r) for r in rows], "total": total, "offset": offset}

    def summary(self) -> dict[str, Any]:
        row = self._rows(
            "SELECT COUNT(*), MIN(normalized_score), MAX(normalized_score) FROM results "
            "WHERE model_id = ? AND status = 'ok'",
            (self.model_id,),
        )[0]
        return {
            "model_id": self.model_id,
            "n_total": row[0],
            "score_min": row[1] or 0.0,
            "score_max": row[2] or 0.0,
        }

    def labels_since(self, timestamp: str | None) -> int:
        """Images of this model labelled after `timestamp` (ISO 8601 UTC, as the store writes), or all."""
        sql = "SELECT COUNT(*) FROM results WHERE model_id = ? AND label IS NOT NULL"
        if timestamp is None:
            return self._rows(sql, (self.model_id,))[0][0]
        return self._rows(sql + " AND labelled_at > ?", (self.model_id, timestamp))[0][0]

    def stats(self, threshold: float = 1.0) -> dict[str, Any]:
        """Counts at a normalized-score threshold (an image passes below it) and, from the human
        labels, recall (marked defects flagged) and false-alarm rate (marked goods flagged)."""
        row = self._rows(
            "SELECT COUNT(*), COALESCE(SUM(normalized_score >= :t), 0), COALESCE(SUM(label IS NOT NULL), 0), "
            "COALESCE(SUM(label = 'defect'), 0), COALESCE(SUM(label = 'good'), 0), "
            "COALESCE(SUM(label = 'defect' AND normalized_score >= :t), 0), "
            "COALESCE(SUM(label = 'good' AND normalized_score >= :t), 0) "
            "FROM results WHERE model_id = :m AND status = 'ok'",
            {"t": threshold, "m": self.model_id},
        )[0]
        n, flagged, labelled, n_defect, n_good, caught, false_alarms = row
        return {
            "threshold": threshold,
            "n_total": n,
            "n_pass": n - flagged,
            "n_flagged": flagged,
            "n_labelled": labelled,
            "n_defect": n_defect,
            "n_good": n_good,
            "n_defect_caught": caught,
            "n_good_flagged": false_alarms,
            "recall": caught / n_defect if n_defect else None,
            "false_alarm_rate": false_alarms / n_good if n_good else None,
        }

    def labels_csv(self) -> str:
        """The reviewed images of this model as CSV text."""
        rows = self._rows(
            f"SELECT {', '.join(_EXPORT_COLUMNS)} FROM results WHERE model_id = ? AND label IS NOT NULL "
            "ORDER BY normalized_score DESC, path",
            (self.model_id,),
        )
        buffer = io.StringIO()
        writer = csv_writer(buffer)  # names, reviewers and notes may start like formulas
        writer.writerow(_EXPORT_COLUMNS)
        writer.writerows(tuple(r) for r in rows)
        return buffer.getvalue()


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


#: SQLite integers are signed 64-bit: a larger id or offset is the client's error (422), not a 500
SQLITE_MAX = 2**63 - 1
ResultId = Annotated[int, PathParam(ge=0, le=SQLITE_MAX, description="the result's id")]


class LabelIn(BaseModel):
    label: Literal["defect", "good"] | None = Field(..., description="'defect', 'good', or null to clear")
    reviewer: str | None = Field(None, max_length=100)
    note: str | None = Field(None, max_length=2000)


def review_router(
    review: ReviewStore,
    inferencer: ServedModel,
    turn: Callable[[], AbstractContextManager],
    min_region: int,
    cache_size: int = 128,
) -> APIRouter:
    """Routes of the review page and its API (the app's TokenGate guards them all); `turn` is the
    service's bound on concurrent decodes and model calls, which drawing an overlay takes."""
    router = APIRouter()
    overlays: OrderedDict[int, bytes] = OrderedDict()  # small LRU: re-rendering costs a model call
    overlay_lock = threading.Lock()

    def draw_overlay(result_id: int) -> bytes:
        with overlay_lock:
            if result_id in overlays:
                overlays.move_to_end(result_id)
                return overlays[result_id]
        item = review.item(result_id)
        with turn():
            png = _render(item)
        with overlay_lock:
            overlays[result_id] = png
            while len(overlays) > cache_size:
                overlays.popitem(last=False)
        return png

    def _render(item: dict[str, Any]) -> bytes:
        try:
            image = read_image(item["path"])
        except ImageReadError as err:
            raise HTTPException(404, str(err)) from None
        if item["map_path"] and Path(item["map_path"]).is_file():  # saved by `anomalens score --maps`
            # the stored verdict and regions, drawn on the stored map: no model call
            anomalous = item["decision"] == "defect"
            return png_bytes(
                overlay_image(
                    image,
                    load_map(item["map_path"]),
                    [Region(**r) for r in item["regions"]],
                    verdict_title(item["name"], item["normalized_score"], anomalous),
                    anomalous,
                )
            )
        return png_bytes(verdict_overlay(image, inferencer.verdict(image, min_region), item["name"]))

    @router.get("/review", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "review.html")

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        files = {p.name: p for p in STATIC.iterdir()}  # only the page's own files, by exact name
        if name not in files:
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(files[name])

    # when `anomalens refine` last trained this model on labels (None: never)
    refined_at = inferencer.metadata.get("refined_at")

    @router.get("/api/review/summary", tags=["review"], summary="Model id, image count and score range")
    def summary() -> dict:
        return {**review.summary(), "detector": inferencer.metadata["detector"], "refined_at": refined_at}

    @router.get("/api/review/items", tags=["review"], summary="Scored images, most anomalous first")
    def items(
        offset: int = Query(0, ge=0, le=SQLITE_MAX),
        limit: int = Query(60, ge=1, le=500),
        filter: Literal["all", "unlabelled", "defect", "good"] = "all",
    ) -> dict:
        return review.page(offset, limit, filter)

    @router.get("/api/review/items/{result_id}", tags=["review"], summary="One scored image")
    def item(result_id: ResultId) -> dict:
        return review.item(result_id)

    @router.post(
        "/api/review/items/{result_id}/label",
        tags=["review"],
        summary="Mark an image 'defect' or 'good' (null clears); saved at once",
    )
    def label(result_id: ResultId, body: LabelIn) -> dict:
        return review.set_label(result_id, body.label, body.reviewer, body.note)

    @router.get(
        "/api/review/items/{result_id}/overlay",
        tags=["review"],
        summary="Image | heat-map overlay PNG",
        response_class=Response,
    )
    async def overlay(result_id: ResultId) -> Response:
        png = await run_in_threadpool(draw_overlay, result_id)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @router.get(
        "/api/review/stats", tags=["review"], summary="Pass / flagged counts, recall and false alarms"
    )
    def stats(
        threshold: float = Query(1.0, description="normalized score at which an image is flagged"),
    ) -> dict:
        return {**review.stats(threshold), "labels_since_refine": review.labels_since(refined_at)}

    @router.get(
        "/api/review/export.csv",
        tags=["review"],
        summary="Reviewed images and their labels as CSV",
        response_class=Response,
    )
    def export() -> Response:
        return Response(
            review.labels_csv(),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="labels-{review.model_id}.csv"'},
        )

    return router
