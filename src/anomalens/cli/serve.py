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
        help="require 'Authorization: Bearer TOKEN' on every POST",
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
    with --store the inspector's review page at /review.

    Example: anomalens serve tile.model --store results.db --port 8000
    """
    import uvicorn

    from anomalens.serve import ServeConfig, create_app

    try:
        app = create_app(
            ServeConfig(
                model=model_file,
                runtime=runtime.value,
                threads=threads,
                store=store,
                token=token,
                max_upload_mb=max_upload_mb,
                uploads=uploads,
                min_region=min_region,
            )
        )
    except user_errors() as e:
        fail(str(e))
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        err.print(
            f"warning: serving on {host} without --token: anyone who can reach it can write to the store"
        )
    where = f"http://{host}:{port}"
    err.print(
        f"serving {model_file} ({runtime.value}) on {where}  docs: {where}/docs"
        + (f"  review: {where}/review" if store else ""),
        highlight=False,
        soft_wrap=True,
    )
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("ANOMALENS_LOG_LEVEL", "warning"))
