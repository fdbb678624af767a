"""Thirty-odd hostile requests against a token-guarded service with a store: every one gets a 4xx
(or a clean 200 where the request is legal), never a 500, and the service keeps scoring after them."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from test_hostile_input import bmp_bomb, jpeg_bomb, png_header, tiff_header
from test_service_auth import AUTH, TOKEN, make_client, png


def _bytes(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def upload(data: bytes, name: str = "x.png", kind: str = "image/png") -> dict:
    return {"files": {"file": (name, data, kind)}}


GOOD = png()
HOSTILE = [
    # (method, path, request arguments, headers): uploads that are not images, bombs, lies
    ("post", "/predict", {}, AUTH),  # no file field
    ("post", "/predict", upload(b""), AUTH),  # empty file
    ("post", "/predict", upload(b"not an image at all"), AUTH),
    ("post", "/predict", upload(GOOD[: len(GOOD) // 2]), AUTH),  # truncated PNG
    ("post", "/predict", upload(png_header(13000, 13000)), AUTH),  # decompression bomb, PNG
    ("post", "/predict", upload(tiff_header(60416, 60416), "b.tif", "image/tiff"), AUTH),
    ("post", "/predict", upload(jpeg_bomb(20000, 20000), "b.jpg", "image/jpeg"), AUTH),
    ("post", "/predict", upload(bmp_bomb(20000, 20000), "b.bmp", "image/bmp"), AUTH),
    ("post", "/predict", upload(_bytes(Image.new("L", (1, 1)), "PNG")), AUTH),  # 1x1
    ("post", "/predict", upload(_bytes(Image.new("L", (16, 16)), "GIF"), "a.gif", "image/gif"), AUTH),
    ("post", "/predict", upload(GOOD, "../../etc/passwd.png"), AUTH),  # traversal name
    ("post", "/predict", upload(GOOD, '=HYPERLINK("http://x").png'), AUTH),  # formula name
    ("post", "/predict", upload(GOOD, "a" * 5000 + ".png"), AUTH),  # very long name
    ("post", "/predict", upload(GOOD, "\x00nul.png"), AUTH),  # NUL in the name
    ("post", "/predict", upload(GOOD, "x.exe", "application/x-msdownload"), AUTH),
    ("post", "/predict", {"content": b"\x00" * 25 * 2**20, "headers": {"Content-Type": "image/png"}}, AUTH),
    ("post", "/predict", upload(GOOD), {}),  # no token
    ("post", "/predict", upload(GOOD), {"Authorization": "Bearer wrong"}),
    ("post", "/predict", upload(GOOD), {"Authorization": TOKEN}),  # no scheme
    ("get", "/api/review/items/9223372036854775808", {}, AUTH),  # above 2^63 - 1
    ("get", "/api/review/items/-1", {}, AUTH),
    ("get", "/api/review/items/abc", {}, AUTH),
    ("get", "/api/review/items?offset=-5", {}, AUTH),
    ("get", "/api/review/items?limit=100000", {}, AUTH),
    ("get", "/api/review/items?filter=drop%20table", {}, AUTH),
    ("get", "/api/review/items/1/overlay?x=" + "A" * 4000, {}, AUTH),
    ("get", "/api/review/stats?threshold=nan", {}, AUTH),
    ("get", "/api/review/stats?threshold=1e400", {}, AUTH),
    ("post", "/api/review/items/1/label", {"json": {"label": "=cmd|' /C calc'!A0"}}, AUTH),
    (
        "post",
        "/api/review/items/1/label",
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        AUTH,
    ),
    ("post", "/api/review/items/1/label", {"json": {"label": "good", "note": "n" * 100_000}}, AUTH),
    ("get", "/static/..%2f..%2fapp.py", {}, AUTH),
    ("get", "/static/review.js", {}, {"Cookie": "anomalens_token=forged"}),
    ("get", "/login?next=https://evil.example/", {}, {}),
    ("delete", "/predict", {}, AUTH),
]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    client = make_client(tmp_path_factory.mktemp("hostile"), token=TOKEN)
    first = client.post("/predict", **upload(GOOD), headers=AUTH)
    assert first.status_code == 200
    return client


def test_at_least_30_hostile_requests():
    assert len(HOSTILE) >= 30


@pytest.mark.parametrize(
    "method, path, kwargs, headers", HOSTILE, ids=[f"{m} {p[:40]}" for m, p, *_ in HOSTILE]
)
def test_a_hostile_request_is_answered_without_a_server_error(service, method, path, kwargs, headers):
    kwargs = dict(kwargs)
    extra = kwargs.pop("headers", {})
    r = service.request(method.upper(), path, headers={**headers, **extra}, follow_redirects=False, **kwargs)
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if path == "/predict" and r.status_code == 200:  # only a real image passes, whatever it is called
        assert np.isfinite(r.json()["score"])
    # the service still scores a good image afterwards
    ok = service.post("/predict", **upload(GOOD), headers=AUTH)
    assert ok.status_code == 200 and ok.json()["decision"] in ("good", "defect")


def test_four_bombs_at_once_are_refused_from_their_headers(service):
    bombs = [
        png_header(13000, 13000),
        tiff_header(60416, 60416),
        jpeg_bomb(20000, 20000),
        bmp_bomb(20000, 20000),
    ]
    names = ["b.png", "b.tif", "b.jpg", "b.bmp"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(
                lambda nb: service.post("/predict", **upload(nb[1], nb[0]), headers=AUTH), zip(names, bombs)
            )
        )
    assert [a.status_code for a in answers] == [422] * 4
    assert all("too large" in a.json()["detail"] for a in answers)
