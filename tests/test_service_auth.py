"""The service with a token: every route but /health needs it (API header, or a browser's login
cookie), out-of-range ids are 4xx, and at most `max_concurrent` images are decoded and scored at once."""

import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import anomalens.serve.app as serve_app
from anomalens.cli import app as cli
from anomalens.data.inputs import Preprocess
from anomalens.models.base import predict
from anomalens.serve import ServeConfig, ServedModel, create_app
from anomalens.thresholds import Calibration

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HTML = {"Accept": "text/html,application/xhtml+xml"}


class MeanBrightness:
    """The smallest real `Inferencer`: an image's score is its mean, its map the pixels themselves."""

    name = "mean"
    options = {"batch_size": 4}
    localizes = True
    map_score = {"reduce": "max"}
    roi = None
    drift_profile = None
    refiner = None
    decision_calibration = Calibration(
        threshold=0.6, center=0.5, pixel_threshold=0.9, pixel_center=0.5, quantile=0.99, n_images=10
    )

    def preprocess(self) -> Preprocess:
        return Preprocess(image_size=16, channels=1, mean=(0.0,), std=(1.0,))

    def score_batch(self, pixels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return pixels.mean(dim=(1, 2, 3)).numpy(), pixels[:, 0].numpy()

    def predict(self, images, **options):
        return predict(self, images, **options)


def png(value: float = 0.5) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16), int(value * 255), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_client(tmp_path, **options) -> TestClient:
    model = tmp_path / "mean.model"
    model.write_bytes(b"stands in for a model file: only its hash names the model")
    served = ServedModel(MeanBrightness(), "torch", {"detector": "mean", "options": MeanBrightness.options})
    config = ServeConfig(model=model, runtime="torch", store=tmp_path / "results.db", **options)
    return TestClient(create_app(config, inferencer=served), raise_server_exceptions=False)


@pytest.fixture
def guarded(tmp_path):
    client = make_client(tmp_path, token=TOKEN)
    r = client.post("/predict", files={"file": ("a.png", png(), "image/png")}, headers=AUTH)
    assert r.status_code == 200
    return client, r.json()["id"]


ROUTES = [
    "/model",
    "/review",
    "/docs",
    "/openapi.json",
    "/static/review.js",
    "/api/review/summary",
    "/api/review/items",
    "/api/review/items/{id}",
    "/api/review/items/{id}/overlay",
    "/api/review/stats",
    "/api/review/export.csv",
]


def test_every_route_but_health_needs_the_token(guarded):
    client, rid = guarded
    for route in ROUTES:
        url = route.format(id=rid)
        r = client.get(url)
        assert r.status_code == 401, url
        assert "Bearer" in r.headers["www-authenticate"] and "items" not in r.text
        assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401, url
        assert client.get(url, headers=AUTH).status_code == 200, url
    r = client.post(f"/api/review/items/{rid}/label", json={"label": "good"})
    assert r.status_code == 401
    assert client.post("/predict", files={"file": ("b.png", png(), "image/png")}).status_code == 401
    assert client.get("/health").status_code == 200


def test_browsers_log_in_once_and_keep_a_cookie(guarded):
    client, rid = guarded
    page = client.get("/review", headers=HTML)
    assert page.status_code == 401 and "<form" in page.text and 'name="token"' in page.text
    wrong = client.post("/login", data={"token": "nope", "next": "/review"}, follow_redirects=False)
    assert wrong.status_code == 401 and "wrong token" in wrong.text and not client.cookies
    r = client.post("/login", data={"token": TOKEN, "next": "/review"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/review"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower() and TOKEN not in cookie
    # the cookie alone now opens the pages, the API and the label writes
    assert client.get("/review").status_code == 200
    assert client.get(f"/api/review/items/{rid}/overlay").status_code == 200
    assert client.post(f"/api/review/items/{rid}/label", json={"label": "good"}).json()["label"] == "good"
    client.cookies.clear()
    assert client.get("/api/review/export.csv").status_code == 401


def test_a_token_in_the_url_once_sets_the_cookie_and_leaves_the_address(guarded):
    client, _ = guarded
    assert client.get("/review?token=wrong", follow_redirects=False).status_code == 401
    r = client.get(f"/api/review/items?limit=5&token={TOKEN}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/api/review/items?limit=5"
    assert client.get("/api/review/items?limit=5").json()["total"] == 1


def test_login_only_redirects_within_the_service(guarded):
    client, _ = guarded
    for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)"):
        r = client.post("/login", data={"token": TOKEN, "next": target}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/", target


def test_without_a_token_everything_is_open(tmp_path):
    client = make_client(tmp_path)
    assert client.get("/review").status_code == 200 and client.get("/model").json()["token_required"] is False


def test_out_of_range_ids_and_offsets_are_client_errors(guarded):
    client, _ = guarded
    client.headers.update(AUTH)
    for url in (
        f"/api/review/items/{2**63}",
        f"/api/review/items/{2**64 + 5}/overlay",
        "/api/review/items/-1",
        f"/api/review/items?offset={2**63}",
        "/api/review/items?offset=-3",
    ):
        assert 400 <= client.get(url).status_code < 500, url
    r = client.post(f"/api/review/items/{2**70}/label", json={"label": "good"})
    assert 400 <= r.status_code < 500
    assert client.get(f"/api/review/items/{2**63 - 1}").status_code == 404


def test_at_most_max_concurrent_decodes_at_once(tmp_path, monkeypatch):
    client = make_client(tmp_path, max_concurrent=2)
    decode, active, peak, lock = serve_app.decode_upload, [0], [0], threading.Lock()

    def slow_decode(data, name):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.3)  # long enough for every request to be waiting at once
        try:
            return decode(data, name)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(serve_app, "decode_upload", slow_decode)

    def post(i):
        return client.post("/predict", files={"file": (f"{i}.png", png(i / 10), "image/png")}).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(post, range(6)))
    assert codes == [200] * 6 and peak[0] == 2


def test_a_busy_service_answers_503_after_its_wait(tmp_path, monkeypatch):
    client = make_client(tmp_path, max_concurrent=1, busy_timeout=0.05)
    decode = serve_app.decode_upload
    monkeypatch.setattr(serve_app, "decode_upload", lambda d, n: (time.sleep(0.5), decode(d, n))[1])
    with ThreadPoolExecutor(2) as pool:
        codes = sorted(
            pool.map(
                lambda i: client.post("/predict", files={"file": ("a.png", png(), "image/png")}).status_code,
                range(2),
            )
        )
    assert codes == [200, 503]


def test_cli_token_file_and_help(tmp_path):
    runner = CliRunner()
    help_text = " ".join(runner.invoke(cli, ["serve", "--help"], terminal_width=200).output.split())
    assert "process list" in help_text and "--token-file" in help_text and "ANOMALENS_TOKEN" in help_text
    empty = tmp_path / "token.txt"
    empty.write_text("\n")
    r = runner.invoke(cli, ["serve", str(tmp_path / "m.model"), "--token-file", str(empty)])
    assert r.exit_code == 2 and "empty" in r.output
    r = runner.invoke(cli, ["serve", "m.model", "--token-file", str(empty), "--token", "x"])
    assert r.exit_code == 2 and "once" in r.output
