"""End to end in headless Chromium: the review page against a real uvicorn server.

Needs Debian's /usr/bin/chromium (apt-get install chromium) and Python playwright; it fails,
never skips, when they are missing, so CI cannot pass without running it.
"""

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

import anomalens
from anomalens.serve import ServeConfig, create_app
from conftest import fast_options

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(texture, tmp_path_factory):
    """A real server with a store holding the scored test images; yields its base URL."""
    folder = tmp_path_factory.mktemp("review")
    model = folder / "tex.model"
    anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train).save(model)
    app = create_app(ServeConfig(model=model, runtime="torch", threads=1, store=folder / "results.db"))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    for sample in texture.test:
        r = httpx.post(
            f"{base}/predict", files={"file": (sample.path.name, sample.path.read_bytes(), "image/png")}
        )
        assert r.status_code == 200, r.text
    yield base
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is missing: apt-get install chromium (`make test` does it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI always runs the browser test
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def labels(page) -> list[str]:
    return page.locator("article.card [data-testid=label]").all_text_contents()


def test_label_with_keyboard_and_reload_keeps_labels(server, browser, texture):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{server}/review")
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    n = len(texture.test)
    assert page.locator("article.card").count() == n
    assert page.inner_text("#n-total") == str(n)
    assert page.inner_text("#n-labelled") == f"0 / {n}"
    first_two = page.locator("article.card").evaluate_all("cards => cards.slice(0, 2).map(c => c.dataset.id)")
    assert "focused" in page.locator("article.card").first.get_attribute("class")

    page.keyboard.press("d")  # defect, focus moves on
    page.keyboard.press("g")  # good
    page.wait_for_function("document.getElementById('n-labelled').textContent.startsWith('2 /')")
    assert labels(page)[:2] == ["defect", "good"]
    assert "focused" in page.locator("article.card").nth(2).get_attribute("class")
    page.keyboard.press("k")  # back to the second card
    assert "focused" in page.locator("article.card").nth(1).get_attribute("class")
    assert page.inner_text("#n-defect") == "1" and page.inner_text("#n-good") == "1"

    page.reload()
    page.wait_for_selector("body[data-ready='1']", timeout=20000)
    assert labels(page)[:2] == ["defect", "good"]
    assert labels(page)[2:] == ["not reviewed"] * (n - 2)
    ids = page.locator("article.card").evaluate_all("cards => cards.slice(0, 2).map(c => c.dataset.id)")
    assert ids == first_two
    stored = httpx.get(f"{server}/api/review/items/{first_two[0]}").json()
    assert stored["label"] == "defect"

    # the threshold slider updates the counts live: at its minimum every image is flagged
    page.eval_on_selector("#threshold", "s => { s.value = s.min; s.dispatchEvent(new Event('input')); }")
    page.wait_for_function("document.getElementById('n-pass').textContent === '0'")
    assert page.inner_text("#n-flagged") == str(n)
    assert page.inner_text("#recall") == "100.0 %" and page.inner_text("#far") == "100.0 %"
    assert page.locator(".verdict.pass").count() == 0
    # overlays load as real images
    page.locator("article.card img").first.scroll_into_view_if_needed()
    page.wait_for_function("document.querySelector('article.card img').naturalWidth > 0")
    csv_text = httpx.get(f"{server}/api/review/export.csv").text
    assert csv_text.count("\n") == 3 and ",defect," in csv_text and ",good," in csv_text
    assert not errors, errors
