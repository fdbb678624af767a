"""The REST service: score uploaded images, and serve the inspector's review page.

    from anomalens.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model=Path("tile.model"), store=Path("results.db")))
    # uvicorn.run(app, host="127.0.0.1", port=8000)   -- or `anomalens serve tile.model`

Endpoints: `POST /predict` (multipart field `file`), `GET /health`, `GET /model`, the review page
at `/review` (see serve/review.py) and OpenAPI docs at `/docs`. When a token is configured every
POST needs `Authorization: Bearer <token>`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from anomalens._version import __version__
from anomalens.data import ImageReadError, read_image
from anomalens.data.io import IMAGE_EXTENSIONS
from anomalens.inference import verdict_overlay
from anomalens.serve.model import ServedModel, load_inferencer
from anomalens.serve.review import ReviewStore, png_bytes, review_router
from anomalens.workflows.scoring import model_id_for, path_key


@dataclass
class ServeConfig:
    """Everything `create_app` needs; `anomalens serve` fills it from its options."""

    model: Path
    runtime: str = "onnx"  # onnx (ONNX Runtime), openvino or torch
    threads: int | None = None  # intra-op threads of the model; None = the runtime's default
    store: Path | None = None  # SQLite result store: predictions are written there, the review page reads it
    token: str | None = None  # when set, POST requests need "Authorization: Bearer <token>"
    max_upload_mb: float = 20.0  # larger request bodies get 413
    min_region: int = 16  # smallest defect region reported, in pixels
    uploads: Path | None = None  # where uploaded images are kept for review; default: next to the store

    def uploads_dir(self) -> Path | None:
        if self.store is None:
            return None
        return self.uploads or self.store.with_name(self.store.stem + "-images")


def upload_path(folder: Path, data_sha256: str, filename: str) -> Path:
    """Where an upload is kept for review: a folder per content hash (resending an image reuses
    its row) holding it under its original name, reduced to safe characters (the client chose it)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename).name)[-100:].lstrip(".") or "upload.png"
    return folder / data_sha256[:16] / safe


def decode_upload(data: bytes, filename: str) -> np.ndarray:
    """Decode uploaded bytes with the same reader as files on disk (same formats, same errors)."""
    suffix = Path(filename).suffix.lower() or ".png"  # Pillow sniffs the format; only TIFF needs the suffix
    # read_image works on paths (tifffile and Pillow both need seekable files): a temp file is the
    # simplest way to keep one decoder for disk and uploads
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            return read_image(tmp.name)
        except ImageReadError as err:
            raise ImageReadError(filename, err.reason) from None


def map_png(normalized_map: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a normalized map: 0 = calibration median, 128 = threshold, 255 = twice it."""
    return png_bytes((np.clip(normalized_map / 2.0, 0, 1) * 255).round().astype(np.uint8))


class UploadLimit:
    """ASGI middleware: 413 for request bodies over the limit, before any of it is parsed or spooled.

    Checks Content-Length up front and counts the bytes of bodies sent without one (chunked).
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response = JSONResponse(
            {"detail": f"upload too large: the limit is {self.max_bytes / 1e6:g} MB"}, status_code=413
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await response(scope, receive, send)
        received = 0
        too_large = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # end the body here; whatever the app answers to the cut body is replaced by the 413
                too_large = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def replacing_send(message):
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start":
                await response(scope, receive, send)

        await self.app(scope, counting_receive, replacing_send)


def bearer_guard(token: str | None) -> Callable[[Request], None]:
    """Dependency for write endpoints: a no-op without a token, else 401 unless the token matches."""

    def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(
                401,
                "missing or wrong token: send 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def create_app(config: ServeConfig, inferencer: ServedModel | None = None) -> FastAPI:
    """Build the FastAPI app; `inferencer` overrides loading `config.model` (tests, embedding)."""
    if config.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {config.max_upload_mb}")
    inferencer = inferencer or load_inferencer(config.model, config.runtime, config.threads)
    mid, model_sha = model_id_for(
        config.model, inferencer.metadata["detector"]
    )  # the ids `anomalens score` uses
    review = ReviewStore(config.store, mid) if config.store else None
    uploads = config.uploads_dir()
    if review is not None:
        review.register_model(
            inferencer.metadata["detector"], model_sha, str(config.model), inferencer.calibration.threshold
        )
        uploads.mkdir(parents=True, exist_ok=True)
    require_token = Depends(bearer_guard(config.token))
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        if review is not None:
            review.close()

    app = FastAPI(
        title="anomalens",
        version=__version__,
        lifespan=lifespan,
        description="Visual anomaly detection: score images against a model of good parts, "
        "review the results. POST endpoints need a Bearer token when one is configured.",
    )
    app.add_middleware(UploadLimit, max_bytes=int(config.max_upload_mb * 1e6))

    @app.exception_handler(ImageReadError)
    async def unreadable(_: Request, err: ImageReadError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.get("/", include_in_schema=False)
    def index() -> RedirectResponse:
        return RedirectResponse("/review" if review else "/docs")

    @app.get("/health", summary="Liveness: the model is loaded")
    def health() -> dict:
        return {
            "status": "ok",
            "model_id": mid,
            "runtime": inferencer.runtime,
            "uptime_s": round(time.time() - started, 1),
        }

    @app.get("/model", summary="Model metadata and decision threshold")
    def model_info() -> dict:
        cal = inferencer.calibration
        return {
            **inferencer.metadata,
            "model_id": mid,
            "model_file": config.model.name,
            "runtime": inferencer.runtime,
            "threads": config.threads,
            "localizes": inferencer.localizes,
            "threshold": {
                "raw": cal.threshold,
                "normalized": 1.0,
                "rule": "flagged when normalized_score >= 1.0",
            },
            "store": config.store is not None,
            "token_required": config.token is not None,
            "max_upload_mb": config.max_upload_mb,
            "anomalens_version": __version__,
        }

    @app.post("/predict", summary="Score one image (multipart field 'file')", dependencies=[require_token])
    async def predict(
        file: UploadFile = File(..., description="the image: PNG, JPEG, BMP or TIFF"),
        with_map: bool = Query(
            False, alias="map", description="add the normalized anomaly map as base64 PNG (128 = threshold)"
        ),
        with_overlay: bool = Query(
            False, alias="overlay", description="add the image | heat-map overlay as base64 PNG"
        ),
    ) -> dict:
        name = Path(file.filename or "upload").name
        suffix = Path(name).suffix.lower()
        content_type = (file.content_type or "").lower()
        if (suffix and suffix not in IMAGE_EXTENSIONS) or not (
            content_type.startswith("image/") or content_type in ("", "application/octet-stream")
        ):
            raise HTTPException(
                415,
                f"'{name}' ({content_type or 'no content type'}) is not a supported image; "
                f"send one of {', '.join(IMAGE_EXTENSIONS)}",
            )
        data = await file.read()
        if not data:
            raise HTTPException(422, f"'{name}' is empty")
        return await run_in_threadpool(_score_upload, data, name, with_map, with_overlay)

    def _score_upload(data: bytes, name: str, with_map: bool, with_overlay: bool) -> dict:
        start = time.perf_counter()
        image = decode_upload(data, name)
        verdict = inferencer.verdict(image, config.min_region)
        body: dict[str, Any] = {
            "filename": name,
            "score": verdict.score,
            "normalized_score": verdict.normalized_score,
            "decision": verdict.decision,
            "anomalous": verdict.anomalous,
            "regions": [r.to_dict() for r in verdict.regions],
            "drift": verdict.to_dict()["drift"],  # statistics outside the training goods' range
            "width": int(image.shape[1]),
            "height": int(image.shape[0]),
            "model_id": mid,
        }
        if with_map:
            body["map_png"] = base64.b64encode(map_png(verdict.normalized_map)).decode()
        if with_overlay:
            body["overlay_png"] = base64.b64encode(png_bytes(verdict_overlay(image, verdict, name))).decode()
        if review is not None:
            digest = hashlib.sha256(data).hexdigest()
            path = upload_path(uploads, digest, name)
            if not path.exists():  # written whole under a temporary name: the gallery never reads half a file
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(path)
            body["id"] = review.add_result(path=path_key(path), content_hash=digest, verdict=verdict)
        body["elapsed_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return body

    if review is not None:
        app.include_router(review_router(review, inferencer, require_token, config.min_region))
    return app
