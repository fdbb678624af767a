"""The REST service: score uploaded images, and serve the inspector's review page.

    from anomalens.serve import ServeConfig, create_app
    app = create_app(ServeConfig(model=Path("tile.model"), store=Path("results.db")))
    # uvicorn.run(app, host="127.0.0.1", port=8000)   -- or `anomalens serve tile.model`

Endpoints: `POST /predict` (multipart field `file`), `GET /health`, `GET /model`, the review page
at `/review` (see serve/review.py) and OpenAPI docs at `/docs`. When a token is configured every
route but `/health` needs it (see `TokenGate`): API clients send `Authorization: Bearer <token>`,
browsers log in once (a form at `/login`, or `?token=` in a URL) and keep an HttpOnly cookie.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from anomalens._version import __version__
from anomalens.data import ImageReadError, read_image
from anomalens.data.io import IMAGE_EXTENSIONS
from anomalens.inference import verdict_overlay
from anomalens.serve.model import ServedModel, load_inferencer
from anomalens.serve.review import ReviewStore, png_bytes, review_router
from anomalens.thresholds import NonFiniteScoreError
from anomalens.workflows.scoring import model_id_for, path_key


@dataclass
class ServeConfig:
    """Everything `create_app` needs; `anomalens serve` fills it from its options."""

    model: Path
    runtime: str = "onnx"  # onnx (ONNX Runtime), openvino or torch
    threads: int | None = None  # intra-op threads of the model; None = the runtime's default
    store: Path | None = None  # SQLite result store: predictions are written there, the review page reads it
    token: str | None = None  # when set, every route but /health needs it (see TokenGate)
    max_upload_mb: float = 20.0  # larger request bodies get 413
    max_concurrent: int = 2  # images decoded and scored at once; further requests wait their turn
    busy_timeout: float = 60.0  # seconds a request waits for a turn before it gets 503
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


COOKIE = "anomalens_session"
LOGIN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>anomalens: log in</title></head>
<body style="font-family:sans-serif;max-width:24em;margin:4em auto"><h1>anomalens</h1>
<p>This service needs its access token.</p>{error}
<form method="post" action="/login"><input type="hidden" name="next" value="{next}">
<input type="password" name="token" autofocus required style="width:100%" aria-label="token">
<p><button type="submit">Log in</button></p></form></body></html>"""


def _local_path(target: str | None) -> str:
    """Where to go after logging in: a path on this service only (no other host, no scheme)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


class TokenGate:
    """ASGI middleware: with a token, every route but /health (and the login form) needs it.

    Accepted: `Authorization: Bearer <token>` (API clients), or the session cookie that logging in
    sets (browsers): POST /login with the form's token, or any GET with `?token=<token>`, which
    redirects to the same URL without it. The cookie holds an HMAC of the token, never the token,
    and is HttpOnly and SameSite=Strict (another site cannot make a browser send it). Without
    either, pages get the login form and the API 401.
    """

    OPEN = ("/health", "/login")

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token.encode()
        self.session = hmac.new(self.token, b"anomalens-session", hashlib.sha256).hexdigest()

    def _given(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token):
            return True
        return secrets.compare_digest(request.cookies.get(COOKIE, "").encode(), self.session.encode())

    def _logged_in(self, response: Response) -> Response:
        response.set_cookie(COOKIE, self.session, httponly=True, samesite="strict", path="/")
        return response

    def _form(self, target: str, status: int, error: str = "") -> HTMLResponse:
        note = f'<p style="color:#b00">{html.escape(error)}</p>' if error else ""
        return HTMLResponse(
            LOGIN_PAGE.format(error=note, next=html.escape(_local_path(target))),
            status_code=status,
            headers={"WWW-Authenticate": "Bearer", "Cache-Control": "no-store"},
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope, receive)
        path = scope["path"]
        if path == "/login":
            response = await self._login(request)
        elif path in self.OPEN or self._given(request):
            return await self.app(scope, receive, send)
        elif request.method == "GET" and "token" in request.query_params:
            given = request.query_params["token"].encode()
            if not secrets.compare_digest(given, self.token):
                response = self._form(path, 401, "wrong token")
            else:
                # the token leaves the address bar at once
                rest = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
                response = self._logged_in(
                    RedirectResponse(_local_path(path) + (f"?{rest}" if rest else ""), 303)
                )
        elif request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            response = self._form(
                path + (f"?{scope['query_string'].decode()}" if scope["query_string"] else ""), 401
            )
        else:
            response = JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>' (browsers: /login)"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        await response(scope, receive, send)

    async def _login(self, request: Request) -> Response:
        if request.method != "POST":
            return self._form(request.query_params.get("next", "/"), 200)
        form = await request.form()
        target = str(form.get("next") or "/")
        if not secrets.compare_digest(str(form.get("token", "")).strip().encode(), self.token):
            return self._form(target, 401, "wrong token")
        return self._logged_in(RedirectResponse(_local_path(target), 303))


def create_app(config: ServeConfig, inferencer: ServedModel | None = None) -> FastAPI:
    """Build the FastAPI app; `inferencer` overrides loading `config.model` (tests, embedding)."""
    if config.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {config.max_upload_mb}")
    if config.max_concurrent < 1:
        raise ValueError(f"--max-concurrent must be at least 1, got {config.max_concurrent}")
    if config.token is not None and not config.token.strip():
        raise ValueError("the service token is empty: give a non-empty token, or none")
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
    # decoding and scoring hold memory in proportion to the image: at most this many at once
    turns = threading.BoundedSemaphore(config.max_concurrent)
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
        "review the results. With a token configured every route but /health needs it.",
    )
    app.add_middleware(UploadLimit, max_bytes=int(config.max_upload_mb * 1e6))
    if config.token is not None:
        app.add_middleware(TokenGate, token=config.token.strip())

    @contextlib.contextmanager
    def turn():
        """One of the `max_concurrent` turns to decode and score; 503 after `busy_timeout` s."""
        if not turns.acquire(timeout=config.busy_timeout):
            raise HTTPException(
                503,
                f"busy: {config.max_concurrent} images are being scored; retry",
                headers={"Retry-After": "5"},
            )
        try:
            yield
        finally:
            turns.release()

    @app.exception_handler(ImageReadError)
    async def unreadable(_: Request, err: ImageReadError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=422)

    @app.exception_handler(NonFiniteScoreError)
    async def not_judged(_: Request, err: NonFiniteScoreError) -> JSONResponse:
        return JSONResponse({"detail": f"the image cannot be judged: {err}"}, status_code=422)

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
            "max_concurrent": config.max_concurrent,
            "anomalens_version": __version__,
        }

    @app.post("/predict", summary="Score one image (multipart field 'file')")
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
        with turn():
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
        app.include_router(review_router(review, inferencer, turn, config.min_region))
    return app
