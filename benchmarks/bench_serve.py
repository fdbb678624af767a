"""Latency and throughput of `anomalens serve` on loopback, and memory over a long soak.

Fits PatchCore (defaults: EfficientNet-Lite0, 256 px) on one category (or takes --model), starts
the real `anomalens serve` process with a result store, and POSTs the category's test images:
p50/p95 latency and requests/s under 1, 4 and 16 concurrent clients, then a soak of --soak
requests with 16 clients, sampling the server's RSS. Optionally labels a few results and writes
a screenshot of the review page (the README's docs/review.png).

    python benchmarks/bench_serve.py --data ../shared/datasets/magnetic_tile/magnetic_tile \
        --threads 2 --requests 200 --soak 5000 --screenshot docs/review.png
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

EXE = str(Path(sys.executable).parent / "anomalens")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clients(
    base: str, images: list[tuple[str, bytes]], n_requests: int, clients: int, on_progress=None
) -> dict:
    """POST n_requests images with `clients` concurrent keep-alive connections."""
    latencies: list[float] = []
    errors: list[str] = []
    counter = itertools.count()
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=base, timeout=60) as client:
            while (i := next(counter)) < n_requests:
                name, data = images[i % len(images)]
                start = time.perf_counter()
                try:
                    r = client.post("/predict", files={"file": (name, data, "image/png")})
                    ok = r.status_code == 200
                    detail = f"{r.status_code} {r.text[:100]}"
                except httpx.HTTPError as err:
                    ok, detail = False, repr(err)
                elapsed = time.perf_counter() - start
                with lock:
                    (latencies.append(elapsed) if ok else errors.append(detail))
                if on_progress:
                    on_progress(i)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "clients": clients,
        "requests": n_requests,
        "errors": len(errors),
        "first_error": errors[:1],
        "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
        "p95_ms": float(np.percentile(ms, 95)) if len(ms) else None,
        "mean_ms": float(ms.mean()) if len(ms) else None,
        "req_per_s": len(latencies) / wall,
    }


def screenshot(base: str, path: Path, n_label: int = 6) -> None:
    """Label a few of the most anomalous results (defect) and a few of the least (good), then shoot."""
    from playwright.sync_api import sync_playwright

    items = httpx.get(f"{base}/api/review/items?limit=500").json()["items"]
    for item in items[: n_label // 2]:
        httpx.post(f"{base}/api/review/items/{item['id']}/label", json={"label": "defect"})
    for item in items[-(n_label // 2) :]:
        httpx.post(f"{base}/api/review/items/{item['id']}/label", json={"label": "good"})
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{base}/review")
        page.wait_for_selector("body[data-ready='1']", timeout=60000)
        page.keyboard.press("j")  # focus the second card, to show the focus ring
        page.wait_for_function(
            "[...document.querySelectorAll('article.card img')].slice(0, 6)"
            ".every(i => i.complete && i.naturalWidth > 0)",
            timeout=120000,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/datasets/magnetic_tile/magnetic_tile"))
    ap.add_argument(
        "--model", type=Path, help="model file to serve (default: fit PatchCore on --data, cached)"
    )
    ap.add_argument("--runtime", default="onnx", choices=("onnx", "torch"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--soak", type=int, default=0, help="requests of the 16-client memory soak (0: none)")
    ap.add_argument("--screenshot", type=Path, help="write a screenshot of the review page here")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "anomalens-bench-serve")
    args = ap.parse_args()

    from anomalens.data import load_dataset

    dataset = load_dataset(args.data)
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.model or args.work / f"{dataset.name}-patchcore.model"
    if not model.is_file():
        subprocess.run([EXE, "fit", str(args.data), "-m", "patchcore", "-o", str(model), "-q"], check=True)
    images = [(s.path.name, s.path.read_bytes()) for s in dataset.test]
    store = args.work / f"results-{time.strftime('%H%M%S')}.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            EXE,
            "serve",
            str(model),
            "--port",
            str(port),
            "--runtime",
            args.runtime,
            "--threads",
            str(args.threads),
            "--store",
            str(store),
        ],
        env={**os.environ, "ANOMALENS_LOG_LEVEL": "error"},
    )
    try:
        deadline = time.time() + 600  # the first ONNX export of a model takes a while
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        proc = psutil.Process(server.pid)
        run_clients(base, images, 20, 1)  # warm-up: first calls allocate
        rows = [run_clients(base, images, args.requests, int(c)) for c in args.clients.split(",")]
        soak = None
        if args.soak:
            rss: list[float] = []

            def sample(i: int) -> None:
                if i % 250 == 0:
                    rss.append(proc.memory_info().rss / 2**20)

            soak = run_clients(base, images, args.soak, 16, on_progress=sample)
            rss.append(proc.memory_info().rss / 2**20)
            soak["rss_mb"] = rss
        info = httpx.get(f"{base}/model").json()
        if args.screenshot:
            screenshot(base, args.screenshot)
    finally:
        server.terminate()
        server.wait(30)

    print(
        f"\n{info['detector']} {info['options'].get('backbone', '')} "
        f"{info['options']['image_size']} px on {dataset.name}, runtime {info['runtime']}, "
        f"{args.threads} threads, store on; {os.cpu_count()} CPUs\n"
    )
    print("| clients | requests | errors | p50 ms | p95 ms | req/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
            f"{r['req_per_s']:.1f} |"
        )
    if soak:
        rss = soak["rss_mb"]
        third = max(1, len(rss) // 3)
        print(
            f"\nsoak: {soak['requests']} requests, 16 clients: {soak['errors']} errors {soak['first_error']}, "
            f"p50 {soak['p50_ms']:.1f} ms, p95 {soak['p95_ms']:.1f} ms, {soak['req_per_s']:.1f} req/s; "
            f"server RSS MB first third {statistics.mean(rss[:third]):.0f}, last third "
            f"{statistics.mean(rss[-third:]):.0f}, max {max(rss):.0f} (samples: {[round(x) for x in rss]})"
        )


if __name__ == "__main__":
    main()
