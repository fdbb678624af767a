"""The REST service: scoring uploads, limits, errors, the token, the store and the review API."""

import base64
import csv
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import anomalens
from anomalens.serve import ServeConfig, create_app, load_inferencer
from anomalens.serve.app import upload_path
from conftest import fast_options, require_openvino

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def model_file(texture, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "tex.model"
    anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train).save(path)
    return path


@pytest.fixture(scope="module")
def inferencer(model_file):
    return load_inferencer(model_file, runtime="torch", threads=1)


def client_for(model_file, inferencer, **options) -> TestClient:
    return TestClient(
        create_app(ServeConfig(model=model_file, runtime="torch", **options), inferencer=inferencer)
    )


@pytest.fixture(scope="module")
def client(model_file, inferencer):
    return client_for(model_file, inferencer)


def upload(client, path, *, name=None, content_type="image/png", query="", headers=None):
    return client.post(
        f"/predict{query}",
        files={"file": (name or path.name, path.read_bytes(), content_type)},
        headers=headers or {},
    )


def test_health_and_model_metadata(client, inferencer):
    assert client.get("/health").json()["status"] == "ok"
    info = client.get("/model").json()
    assert info["detector"] == "patchcore"
    assert info["threshold"]["raw"] == pytest.approx(inferencer.calibration.threshold)
    assert info["model_id"].startswith("patchcore-") and info["token_required"] is False
    assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_flags_planted_defects_and_returns_map(client, texture, inferencer):
    good = [s for s in texture.test if s.label == 0]
    defects = [s for s in texture.test if s.label == 1]
    good_scores = [upload(client, s.path).json()["normalized_score"] for s in good]
    bodies = [upload(client, s.path, query="?map=true&overlay=true").json() for s in defects]
    # the same numbers as the detector itself
    raw = inferencer.model.predict([s.path for s in defects]).scores
    direct = inferencer.calibration.normalize(raw)
    assert np.allclose([b["normalized_score"] for b in bodies], direct, atol=1e-6)
    assert min(b["normalized_score"] for b in bodies) > np.median(good_scores)
    # the service's verdicts are the detector's, image by image
    assert [b["anomalous"] for b in bodies] == [bool(x) for x in inferencer.calibration.is_anomalous(raw)]
    flagged = [b for b in bodies if b["decision"] == "defect"]
    assert flagged and all(b["anomalous"] for b in flagged)
    # regions of flagged images cover the planted defect
    hits = 0
    for sample, body in zip(defects, bodies):
        mask = np.asarray(Image.open(sample.mask_path)) > 0
        hits += any(mask[r["y0"] : r["y1"], r["x0"] : r["x1"]].any() for r in body["regions"])
    assert hits == len(flagged)  # every flagged defect has a region on its planted defect
    amap = Image.open(io.BytesIO(base64.b64decode(bodies[0]["map_png"])))
    assert amap.mode == "L" and amap.size == (bodies[0]["width"], bodies[0]["height"])
    overlay = Image.open(io.BytesIO(base64.b64decode(bodies[0]["overlay_png"])))
    assert overlay.size[0] == 2 * bodies[0]["width"] + 4
    assert "map_png" not in upload(client, defects[0].path).json()


def test_corrupt_image_is_a_422_naming_the_file(client, texture):
    data = texture.test[0].path.read_bytes()[:200]  # a truncated PNG
    r = client.post("/predict", files={"file": ("broken.png", data, "image/png")})
    assert r.status_code == 422
    assert "broken.png" in r.json()["detail"] and "PNG" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 422 and "empty" in r.json()["detail"]


def test_wrong_type_and_missing_field(client, texture):
    r = client.post("/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert r.status_code == 415 and "notes.txt" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("x.png", b"hello", "application/pdf")})
    assert r.status_code == 415
    assert client.post("/predict", files={"image": ("a.png", b"x", "image/png")}).status_code == 422


def test_oversized_upload_is_413(model_file, inferencer, texture):
    small = client_for(model_file, inferencer, max_upload_mb=0.001)  # 1000 bytes
    r = upload(small, texture.test[0].path)
    assert r.status_code == 413 and "limit" in r.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it arrives
        yield b"x" * 800
        yield b"x" * 800

    r = small.post("/predict", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert small.get("/health").status_code == 200


def test_token_guards_every_route_but_health(model_file, inferencer, texture):
    guarded = client_for(model_file, inferencer, token=TOKEN)
    path = texture.test[0].path
    assert upload(guarded, path).status_code == 401
    assert upload(guarded, path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = upload(guarded, path, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and "score" in r.json()
    assert guarded.get("/model").status_code == 401
    assert (
        guarded.get("/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()["token_required"] is True
    )
    assert guarded.get("/health").status_code == 200


def test_store_records_predictions_and_review_api(model_file, inferencer, texture, tmp_path):
    store = tmp_path / "results.db"
    c = client_for(model_file, inferencer, store=store, token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert c.get("/api/review/items").status_code == 401
    scored = {
        s.path: upload(c, s.path, headers=auth).json() for s in texture.test
    }  # names repeat across folders
    assert all("id" in b for b in scored.values())
    assert (
        c.post(
            f"/api/review/items/{next(iter(scored.values()))['id']}/label", json={"label": "good"}
        ).status_code
        == 401
    )
    c.headers.update(auth)  # every read needs the token too
    page = c.get("/api/review/items?limit=5").json()
    assert page["total"] == len(texture.test) and len(page["items"]) == 5
    all_items = c.get("/api/review/items?limit=500").json()["items"]
    norms = [i["normalized_score"] for i in all_items]
    assert norms == sorted(norms, reverse=True)  # most anomalous first
    # uploads are kept under their content hash and original name, and the overlay renders
    first = all_items[0]
    assert first["name"] == next(p.name for p, b in scored.items() if b["id"] == first["id"])
    png = c.get(f"/api/review/items/{first['id']}/overlay")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert c.get("/api/review/items/99999/overlay").status_code == 404

    # label two defects and two goods; the stats follow by hand
    by_label = {0: [], 1: []}
    for s in texture.test:
        by_label[s.label].append(scored[s.path])
    for body, label in [
        (by_label[1][0], "defect"),
        (by_label[1][1], "defect"),
        (by_label[0][0], "good"),
        (by_label[0][1], "good"),
    ]:
        r = c.post(
            f"/api/review/items/{body['id']}/label", json={"label": label, "reviewer": "ana"}, headers=auth
        )
        assert r.status_code == 200 and r.json()["label"] == label and r.json()["labelled_at"]
    bad = c.post(f"/api/review/items/{by_label[0][0]['id']}/label", json={"label": "maybe"}, headers=auth)
    assert bad.status_code == 422
    t = 1.0
    stats = c.get(f"/api/review/stats?threshold={t}").json()
    norm = [b["normalized_score"] for b in scored.values()]
    assert stats["n_total"] == len(norm) and stats["n_flagged"] == sum(n >= t for n in norm)
    assert stats["n_pass"] == len(norm) - stats["n_flagged"] and stats["n_labelled"] == 4
    # a model never refined: every label is one `anomalens refine` has not used yet
    assert stats["labels_since_refine"] == 4 and c.get("/api/review/summary").json()["refined_at"] is None
    caught = sum(b["normalized_score"] >= t for b in by_label[1][:2])
    false_alarms = sum(b["normalized_score"] >= t for b in by_label[0][:2])
    assert stats["recall"] == caught / 2 and stats["false_alarm_rate"] == false_alarms / 2
    low = c.get("/api/review/stats?threshold=-1000").json()
    assert low["n_pass"] == 0 and low["recall"] == 1.0 and low["false_alarm_rate"] == 1.0
    assert c.get("/api/review/items?filter=unlabelled").json()["total"] == len(norm) - 4

    rows = list(csv.DictReader(io.StringIO(c.get("/api/review/export.csv").text)))
    assert sorted(r["label"] for r in rows) == ["defect", "defect", "good", "good"]
    assert {r["reviewer"] for r in rows} == {"ana"}

    # a new app on the same store (a restart) keeps the labels; clearing one is saved too
    again = client_for(model_file, inferencer, store=store)
    assert again.get("/api/review/stats").json()["n_labelled"] == 4
    r = again.post(f"/api/review/items/{by_label[0][0]['id']}/label", json={"label": None})
    assert r.json()["label"] is None and again.get("/api/review/stats").json()["n_labelled"] == 3


def test_review_page_only_with_a_store(client, model_file, inferencer, tmp_path):
    assert client.get("/review").status_code == 404
    c = client_for(model_file, inferencer, store=tmp_path / "r.db")
    page = c.get("/review")
    assert page.status_code == 200 and "review.js" in page.text
    assert c.get("/static/review.js").status_code == 200
    assert c.get("/static/..%2Fapp.py").status_code == 404


def test_upload_names_cannot_leave_the_folder(tmp_path):
    path = upload_path(tmp_path, "ab" * 32, "../../etc/passwd")
    assert path == tmp_path / "abababababababab" / "passwd"
    assert upload_path(tmp_path, "cd" * 32, "..") == tmp_path / "cdcdcdcdcdcdcdcd" / "upload.png"
    assert upload_path(tmp_path, "ef" * 32, "a b<c>.png").name == "a_b_c_.png"


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
def test_onnx_runtimes_score_like_torch(runtime, model_file, inferencer, texture, tmp_path, monkeypatch):
    if runtime == "openvino":
        require_openvino()
    monkeypatch.setenv("ANOMALENS_CACHE", str(tmp_path / "cache"))  # the export is cached there
    client = TestClient(create_app(ServeConfig(model=model_file, runtime=runtime, threads=1)))
    assert client.get("/model").json()["runtime"] == runtime
    for sample in texture.test[:3]:
        a = upload(client, sample.path).json()
        b = inferencer.calibration.normalize(inferencer.model.predict([sample.path]).scores[0])
        assert abs(a["normalized_score"] - b) < 1e-3


def test_review_of_a_store_filled_by_score_uses_its_saved_maps(model_file, inferencer, texture, tmp_path):
    from dataclasses import replace

    from anomalens.store import ResultRecord, ResultStore
    from anomalens.workflows.scoring import model_id_for, save_map

    mid, sha = model_id_for(model_file, "patchcore")
    hot = np.zeros((64, 64), np.float32)
    hot[10:30, 20:40] = 3.0
    save_map(hot, tmp_path / "map.png")
    with ResultStore(tmp_path / "r.db") as store:
        store.register_model(mid, detector="patchcore", file_sha256=sha)
        store.register_model("other-model", detector="padim", file_sha256="0" * 64)
        store.add_results(
            [
                ResultRecord(
                    mid,
                    str(texture.test[0].path),
                    score=1.0,
                    normalized_score=2.0,
                    decision="defect",
                    map_path=str(tmp_path / "map.png"),
                ),
                ResultRecord(
                    mid, str(texture.test[1].path), score=0.1, normalized_score=0.2, decision="good"
                ),
                ResultRecord(mid, "/nowhere/gone.png", score=0.0, normalized_score=0.1, decision="good"),
                ResultRecord(
                    "other-model",
                    str(texture.test[2].path),
                    score=9.0,
                    normalized_score=9.0,
                    decision="defect",
                ),
            ]
        )
    calls = []

    class CountingModel:
        """The served model, counting its calls."""

        def __getattr__(self, name):
            return getattr(inferencer.model, name)

        def predict(self, images, **options):
            calls.append(len(images))
            return inferencer.model.predict(images, **options)

    c = client_for(model_file, replace(inferencer, model=CountingModel()), store=tmp_path / "r.db")
    items = c.get("/api/review/items").json()["items"]
    assert [i["normalized_score"] for i in items] == [2.0, 0.2, 0.1]  # this model's rows only
    overlay = Image.open(io.BytesIO(c.get(f"/api/review/items/{items[0]['id']}/overlay").content)).convert(
        "RGB"
    )
    assert calls == []  # drawn from the saved map: no model call
    right = np.asarray(overlay)[18:, 64 + 4 :]  # the heat-map half, under the 18 px title
    assert right[20, 30, 0] > right[20, 30, 2] and right[50, 50].tolist() != right[20, 30].tolist()
    assert c.get(f"/api/review/items/{items[1]['id']}/overlay").status_code == 200 and calls == [1]
    assert c.get(f"/api/review/items/{items[2]['id']}/overlay").status_code == 404  # file gone


def test_cli_serve_fails_in_one_line_on_a_bad_model(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    exe = str(Path(sys.executable).parent / "anomalens")
    proc = subprocess.run(
        [exe, "serve", str(tmp_path / "missing.model"), "--runtime", "torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "missing.model" in proc.stderr and "not found" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
