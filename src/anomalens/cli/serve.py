"""`serve`: the REST service and the review page."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from anomalens.cli.common import RUNTIME_HELP, THREADS_HELP, Runtime, err, fail, user_errors


def serve(
    model_file: Path = typer.Argument(..., metavar="MODEL", help="model file written by `anomalens fit`"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the service to the network"),
    port: int = typer.Option(8000, help="TCP port"),
    store: Path | None = typer.Option(
        None,
        "--store",
        help="SQLite result store: predictions are written there and the review page at /review reads it",
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="ANOMALENS_TOKEN",
        show_envvar=True,
        help="require this token on every route but /health (API: 'Authorization: Bearer TOKEN'; "
        "browsers: a login form, then a cookie). Given on the command line it shows in the process "
        "list: prefer the environment variable or --token-file",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        help="read the token from this file (its first line), which other users cannot read from the process list",
    ),
    max_concurrent: int = typer.Option(
        2,
        "--max-concurrent",
        min=1,
        help="images decoded and scored at once; further requests wait their turn",
    ),
    runtime: Runtime = typer.Option(
        Runtime.onnx, "--runtime", case_sensitive=False, help=RUNTIME_HELP + " (default here: onnx)"
    ),
    threads: int | None = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    max_upload_mb: float = typer.Option(
        20.0, "--max-upload-mb", help="largest request body; bigger uploads get 413"
    ),
    uploads: Path | None = typer.Option(
        None,
        "--uploads",
        help="folder keeping uploaded images for review (default: STORE-images/ next to the store)",
    ),
    min_region: int = typer.Option(16, help="smallest defect region reported, in pixels"),
) -> None:
    """Serve a model over HTTP: POST /predict, GET /health, GET /model, docs at /docs, and
    with --store the inspector's review page at /review. With a token (ANOMALENS_TOKEN,
    --token-file or --token) every route but /health needs it; at most --max-concurrent images
    are decoded and scored at once.

    Example: anomalens serve tile.model --store results.db --port 8000
    """
    import uvicorn

    from anomalens.serve import ServeConfig, create_app
    from anomalens.store import StoreError

    if token_file is not None:
        if token:
            fail("give the token once: --token-file, or --token / ANOMALENS_TOKEN")
        try:
            token = token_file.read_text().splitlines()[0].strip() if token_file.is_file() else None
        except (OSError, UnicodeDecodeError, IndexError) as e:
            fail(
                f"cannot read the token file '{token_file}': {getattr(e, 'strerror', None) or 'empty or not text'}"
            )
        if not token:
            fail(f"token file '{token_file}' is missing or empty")
    try:
        app = create_app(
            ServeConfig(
                model=model_file,
                runtime=runtime.value,
                threads=threads,
                store=store,
                token=token,
                max_upload_mb=max_upload_mb,
                max_concurrent=max_concurrent,
                uploads=uploads,
                min_region=min_region,
            )
        )
    except (*user_errors(), StoreError) as e:
        fail(str(e))
    except OSError as e:  # the uploads folder: a file in its place, no permission
        fail(f"cannot use '{e.filename}': {e.strerror or e}")
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        err.print(
            f"warning: serving on {host} without a token: anyone who can reach it can read and write the store"
        )
    where = f"http://{host}:{port}"
    err.print(
        f"serving {model_file} ({runtime.value}) on {where}  docs: {where}/docs"
        + (f"  review: {where}/review" if store else ""),
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("ANOMALENS_LOG_LEVEL", "warning"))
