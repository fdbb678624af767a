"""Hostile input (issue 16, data side): decompression bombs, truncated files, wrong extensions, odd
modes, NaN/inf, tiny images and names that are not UTF-8, beside good images, through `predict`
and `score` as a user runs them; plus one test per problem of the issue (bombs, names, a failure
while preparing, CSV injection, concurrent scorers, GIF, minimum size, permissions, a folder as
the model). The corpus is generated here, small on disk: bombs are headers, never huge decodes."""

import csv
import io
import os
import sqlite3
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

import anomalens
from anomalens.cli import app
from anomalens.data import ImageReadError, display_name, read_header, read_image, safe_cell
from anomalens.data.inputs import as_items, load_item
from anomalens.data.io import IMAGE_EXTENSIONS, list_images
from anomalens.data.synthetic import synthetic_image
from anomalens.models.base import Detector, ModelFileError
from anomalens.serve.review import ReviewStore
from anomalens.store import ResultRecord, ResultStore, claim_owner
from anomalens.workflows.predict import predict_to_folder
from anomalens.workflows.scoring import Scorer, model_id_for, path_key, score_into_store
from conftest import fast_options

BOMB = "image too large"
SMALL = "image too small"
SCORED = None  # expected outcome of a hostile file that is still a fine image


# -- building hostile files ---------------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, bit_depth: int = 8, colour: int = 2) -> bytes:
    """A PNG whose header says width x height; its pixel data is a few bytes (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


def tiff_header(width: int, height: int, samples: int = 1, bits: int = 8, sample_format: int = 1) -> bytes:
    """A zlib TIFF whose one IFD says width x height x samples; a few bytes of strip data."""
    data = zlib.compress(b"\0" * 64)
    entries = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, bits),
        (259, 3, 8),  # zlib
        (262, 3, 2 if samples == 3 else 1),
        (273, 4, 0),  # strip offset, set below
        (277, 3, samples),
        (278, 4, height),
        (279, 4, len(data)),
        (339, 3, sample_format),
    ]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        value = offset if tag == 273 else value
        ifd += (
            struct.pack("<HHIHH", tag, 3, 1, value, 0)
            if kind == 3
            else struct.pack("<HHII", tag, 4, 1, value)
        )
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    return buffer.getvalue()


def jpeg_bomb(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16), (90, 120, 60)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_bomb(width: int, height: int) -> bytes:
    data = bytearray(encoded(Image.new("RGB", (16, 16)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_bytes(array: np.ndarray, **kw) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kw)
    return buffer.getvalue()


def hostile_corpus(folder: Path) -> dict[bytes, str | None]:
    """Write the corpus into `folder`: {file name (bytes): expected error text, or None if scored}."""
    gray = (synthetic_image("texture", 64, rng=np.random.default_rng(3)) * 255).astype(np.uint8)
    rgb = np.stack([gray, gray[::-1], gray.T], axis=-1)
    good_png = encoded(Image.fromarray(rgb), "PNG")
    good_jpeg = encoded(Image.fromarray(rgb), "JPEG")
    good_tiff = tiff_bytes(rgb)
    good_bmp = encoded(Image.fromarray(rgb), "BMP")
    gray16 = gray.astype(np.uint16) * 257
    floats = gray.astype(np.float32) / 255
    nan, inf, neg = floats.copy(), floats.copy(), floats.copy()
    nan[3, 3], inf[5, 5], neg[7, 7] = np.nan, np.inf, -0.5
    files: dict[bytes, tuple[bytes, str | None]] = {
        # decompression bombs under Pillow's own refusal size: only the header is real
        b"bomb_rgb_13000.png": (png_header(13000, 13000), BOMB),
        b"bomb_gray_12000.png": (png_header(12000, 12000, colour=0), BOMB),
        b"bomb_16bit.png": (png_header(11000, 11000, bit_depth=16, colour=0), BOMB),
        b"bomb_wide.png": (png_header(120_000, 1000), BOMB),
        b"bomb_60416.tif": (tiff_header(60416, 60416), BOMB),
        b"bomb_rgb.tiff": (tiff_header(20000, 20000, samples=3), BOMB),
        b"bomb_float.tif": (tiff_header(30000, 30000, bits=32, sample_format=3), BOMB),
        b"bomb_channels.tif": (tiff_header(64, 64, samples=1000), "error"),
        b"bomb.jpg": (jpeg_bomb(12000, 12000), BOMB),
        b"bomb.bmp": (bmp_bomb(12000, 12000), BOMB),
        b"bomb_png_named.jpg": (png_header(13000, 13000), BOMB),
        # truncated and empty
        b"truncated.png": (good_png[: len(good_png) // 2], "truncated"),
        b"truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "error"),
        b"truncated.tif": (good_tiff[: len(good_tiff) // 2], "error"),
        b"truncated.bmp": (good_bmp[: len(good_bmp) // 2], "error"),
        b"signature_only.png": (good_png[:8], "error"),
        b"header_only.png": (good_png[:33], "error"),
        b"empty.png": (b"", "empty file"),
        b"bad_crc.png": (good_png[:40] + bytes([good_png[40] ^ 0xFF]) + good_png[41:], "error"),
        # wrong extensions: a real image under another name is read; anything else is refused
        b"png_named.jpg": (good_png, SCORED),
        b"jpeg_named.tif": (good_jpeg, SCORED),
        b"text_named.png": (b"this is not an image\n" * 10, "not a recognised image"),
        b"html_named.bmp": (b"<html><body>hello</body></html>", "not a recognised image"),
        b"zip_named.tiff": (b"PK\x03\x04" + b"\0" * 60, "error"),
        b"gif_named.png": (encoded(Image.fromarray(gray), "GIF"), "GIF is not supported"),
        # odd modes: all fine images
        b"mode_1.png": (encoded(Image.fromarray(gray > 128), "PNG"), SCORED),
        b"mode_P.png": (encoded(Image.fromarray(rgb).convert("P"), "PNG"), SCORED),
        b"mode_LA.png": (encoded(Image.fromarray(gray).convert("LA"), "PNG"), SCORED),
        b"mode_I16.png": (encoded(Image.fromarray(gray16), "PNG"), SCORED),
        b"mode_F.tif": (tiff_bytes(floats), SCORED),
        b"mode_CMYK.jpg": (encoded(Image.fromarray(rgb).convert("CMYK"), "JPEG"), SCORED),
        b"mode_RGBA.png": (encoded(Image.fromarray(rgb).convert("RGBA"), "PNG"), SCORED),
        b"planar_rgb.tif": (
            tiff_bytes(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate"),
            SCORED,
        ),
        b"float64_large.tif": (tiff_bytes(gray.astype(np.float64) * 1000), SCORED),
        b"five_channels.tif": (
            tiff_bytes(np.zeros((64, 64, 5), np.uint8), photometric="minisblack"),
            "error",
        ),
        # NaN, inf, negative floats
        b"nan.tif": (tiff_bytes(nan), "NaN/inf"),
        b"inf.tif": (tiff_bytes(inf), "NaN/inf"),
        b"negative.tif": (tiff_bytes(neg), "negative"),
        # tiny images
        b"one_pixel.png": (encoded(Image.new("L", (1, 1)), "PNG"), SMALL),
        b"thin_7x64.png": (encoded(Image.fromarray(gray[:, :7]), "PNG"), SMALL),
        b"one_pixel.tif": (tiff_bytes(np.zeros((1, 1), np.uint8)), SMALL),
        b"smallest_8x8.png": (encoded(Image.fromarray(gray[:8, :8]), "PNG"), SCORED),
        # names: not UTF-8, line breaks, formulas
        b"latin1_\xe9t\xe9.png": (good_png, SCORED),
        b"broken_\xff\xfe.png": (good_png[:100], "truncated"),
        b"line\nbreak.png": (good_png, SCORED),
        b'=HYPERLINK("http:evil","x").png': (good_png, SCORED),
        b"@SUM(1+1).png": (good_png, SCORED),
    }
    for name, (data, _) in files.items():
        with open(os.path.join(os.fsencode(folder), name), "wb") as f:
            f.write(data)
    return {name: expected for name, (data, expected) in files.items()}


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(texture, tmp_path_factory):
    det = anomalens.create("patchcore", **fast_options("patchcore")).fit(texture.train)
    path = det.save(tmp_path_factory.mktemp("hostile") / "tex.model")
    return path, model_id_for(path, "patchcore")[0]


@pytest.fixture(scope="module")
def detector(model):
    return anomalens.load(model[0])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, texture_root):
    folder = tmp_path_factory.mktemp("hostile_corpus")
    expected = hostile_corpus(folder)
    for src in sorted((texture_root / "test" / "good").iterdir())[:3]:
        (folder / src.name).write_bytes(src.read_bytes())
        expected[os.fsencode(src.name)] = SCORED
    return folder, expected


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exc_info
    assert "Traceback" not in result.output
    return result


def shown(folder: Path, name: bytes) -> str:
    return display_name(os.path.join(os.fsencode(folder), name))


def one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


# -- the corpus through the CLI -----------------------------------------------------------------
def test_corpus_has_at_least_40_hostile_files(corpus):
    folder, expected = corpus
    assert len([n for n in expected if not n[:3].isdigit()]) >= 40
    assert len(list_images(folder)) == len(expected)


def test_predict_keeps_every_good_result_and_records_each_bad_file(model, corpus, tmp_path):
    folder, expected = corpus
    out = tmp_path / "out"
    result = invoke("predict", model[0], folder, "-o", out, "--skip-bad", "-q")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(open(out / "scores.csv", encoding="utf-8", newline="")))
    good = {shown(folder, n) for n, e in expected.items() if e is SCORED}
    assert {r["path"] for r in rows} == good
    assert str(folder / "latin1_\\xe9t\\xe9.png") in good  # not UTF-8: escaped, not lost
    assert all(np.isfinite(float(r["score"])) for r in rows)
    skipped = (out / "skipped.txt").read_text(encoding="utf-8").splitlines()
    bad = {n: e for n, e in expected.items() if e is not SCORED}
    assert len(skipped) == len(bad)
    for name, reason in bad.items():
        [line] = [s for s in skipped if f"'{one_line(shown(folder, name))}'" in s]
        assert line.startswith("cannot read image") and (reason == "error" or reason in line), line
    assert f"skipped {len(bad)} unreadable" in result.output


def test_score_stores_every_good_result_and_each_bad_file_with_its_reason(model, corpus, tmp_path):
    folder, expected = corpus
    db = tmp_path / "r.db"
    result = invoke("score", model[0], folder, "-o", db, "--csv", tmp_path / "r.csv", "-q")
    assert result.exit_code == 0, result.output
    with ResultStore(db) as store:
        rows = {r.path: r for r in store.results(model[1])}
    assert len(rows) == len(expected)
    assert rows[str(folder / "latin1_\\xe9t\\xe9.png")].status == "ok"  # stored escaped
    for name, reason in expected.items():
        row = rows[path_key(os.path.join(os.fsencode(folder), name))]
        if reason is SCORED:
            assert row.status == "ok" and np.isfinite(row.score), (name, row.error)
        else:
            assert row.status == "error" and "\n" not in row.error, name
            assert reason == "error" or reason in row.error, (name, row.error)
    # a rerun finds everything stored, bad names included
    again = invoke("score", model[0], folder, "-o", db, "-q")
    assert f"{len(expected)} already stored" in again.output


# -- one test per problem of the issue ------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("bomb.png", png_header(13000, 13000)),
        ("bomb.tif", tiff_header(60416, 60416)),
        ("bomb.jpg", jpeg_bomb(12000, 12000)),
        ("bomb.bmp", bmp_bomb(12000, 12000)),
    ],
)
def test_bombs_are_refused_from_their_header_naming_the_file(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    header = read_header(path)
    assert header.pixels > 100e6 and header.decode_bytes > header.pixels * 4
    with pytest.raises(ImageReadError, match=r"bomb\.\w+'.*image too large: \d+x\d+x\d.*max_pixels") as err:
        read_image(path)
    assert "\n" not in str(err.value)


def test_max_pixels_is_an_option_and_an_environment_variable(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    Image.new("L", (64, 64)).save(path)
    assert read_image(path).shape == (64, 64)
    with pytest.raises(ImageReadError, match="max_pixels is 0.001 M"):
        read_image(path, max_pixels=1000)
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "4000")
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path)
    monkeypatch.setenv("ANOMALENS_MAX_PIXELS", "lots")
    with pytest.raises(ValueError, match="ANOMALENS_MAX_PIXELS"):
        read_image(path)


@pytest.mark.parametrize("kind", ["png", "tiff-float"])
def test_decoding_makes_no_float64_copy(tmp_path, kind):
    rng = np.random.default_rng(0)
    if kind == "png":
        path = tmp_path / "big.png"
        Image.fromarray(rng.integers(0, 255, (1000, 1000, 3), dtype=np.uint8)).save(path, compress_level=1)
    else:
        path = tmp_path / "big.tif"
        tifffile.imwrite(path, rng.random((1000, 1000, 3), dtype=np.float32), photometric="rgb")
    tracemalloc.start()
    image = read_image(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert image.dtype == np.float32
    # the result and the decoder's array; a float64 copy alone would be twice the result
    assert peak < 1.8 * image.nbytes, peak / image.nbytes


def _fail_on(monkeypatch, stem: str):
    """Preprocessing raises for the image named `stem` (a failure that is not a read error)."""
    from anomalens.data.inputs import Preprocess

    real = Preprocess.canvases

    def canvases(self, image, key="image"):
        if Path(key).stem == stem:
            raise RuntimeError("out of memory while resizing")
        return real(self, image, key)

    monkeypatch.setattr(Preprocess, "canvases", canvases)


def test_a_failure_while_preparing_is_that_images_error(model, detector, texture_root, tmp_path, monkeypatch):
    _fail_on(monkeypatch, "001")
    images = sorted((texture_root / "test" / "good").iterdir())[:4]
    det = detector
    summary = predict_to_folder(det, images, tmp_path / "out", on_error="skip", overlays=False)
    assert summary.n_scored == 3 and [k for k, _ in summary.skipped] == [str(images[1])]
    assert "cannot prepare it (RuntimeError: out of memory" in (tmp_path / "out" / "skipped.txt").read_text()
    with ResultStore(tmp_path / "r.db") as store:
        store.register_model(model[1], detector="patchcore", file_sha256="x")
        s = score_into_store(Scorer(det, model[1]), store, images, batch_size=4)
        assert (s.n_scored, s.n_errors) == (3, 1)
        bad = store.get(model[1], path_key(images[1]))
        assert bad.status == "error" and "RuntimeError: out of memory" in bad.error


def test_skipped_txt_is_written_as_files_are_skipped(detector, texture_root, tmp_path, monkeypatch):
    import anomalens.workflows.predict as predict_module

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "000_bad.png").write_bytes(b"not an image")
    for src in sorted((texture_root / "test" / "good").iterdir())[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    seen = []
    real = predict_module.decide

    def decide(*args, **kw):  # the moment a good image after the bad one is judged
        seen.append((tmp_path / "out" / "skipped.txt").is_file())
        return real(*args, **kw)

    monkeypatch.setattr(predict_module, "decide", decide)
    predict_to_folder(detector, [folder], tmp_path / "out", on_error="skip", overlays=False)
    assert seen == [True, True]


def test_csv_cells_that_start_like_formulas_are_quoted(detector, texture_root, tmp_path, monkeypatch):
    assert [safe_cell(v) for v in ("=1+1", "+cmd", "-2+3", "@SUM(1)", "\tx", "\rx", "-0.25", "a=b", 3)] == [
        "'=1+1",
        "'+cmd",
        "'-2+3",
        "'@SUM(1)",
        "'\tx",
        "'\rx",
        "-0.25",
        "a=b",
        3,
    ]
    folder = tmp_path / "in"
    folder.mkdir()
    good = (texture_root / "test" / "good" / "000.png").read_bytes()
    (folder / '=HYPERLINK("http:evil","x").png').write_bytes(good)
    monkeypatch.chdir(folder)
    predict_to_folder(detector, ["."], tmp_path / "out", overlays=False)
    [row] = list(csv.reader(open(tmp_path / "out" / "scores.csv")))[1:]
    assert row[0] == '\'=HYPERLINK("http:evil","x").png'
    db = tmp_path / "r.db"
    with ResultStore(db) as store:
        store.register_model("m", detector="patchcore", file_sha256="x")
        store.add_results([ResultRecord("m", "a.png", score=-1.5, normalized_score=0.5, decision="good")])
        store.set_label("a.png", "good", reviewer="@SUM(1+1)", note="=cmd|'/c calc'!A1")
        store.export_csv(tmp_path / "r.csv", "m")
    [row] = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert (row["reviewer"], row["note"], row["score"]) == ("'@SUM(1+1)", "'=cmd|'/c calc'!A1", "-1.5")
    review = ReviewStore(db, "m")
    try:
        [row] = list(csv.DictReader(io.StringIO(review.labels_csv())))
    finally:
        review.close()
    assert row["reviewer"] == "'@SUM(1+1)" and row["note"] == "'=cmd|'/c calc'!A1"


def test_concurrent_scorers_split_the_work_and_take_over_a_dead_ones(model, detector, texture_root, tmp_path):
    images = sorted((texture_root / "test").rglob("*.png"))[:8]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = claim_owner().rpartition(":")[0]
    live = f"{host}:{os.getppid()}"  # another scorer still running: this test's parent process
    with ResultStore(tmp_path / "r.db") as store:
        store.register_model(model[1], detector="patchcore", file_sha256="x")
        keys = [path_key(p) for p in images]
        assert store.claim(model[1], keys[:3], live) == keys[:3]
        assert store.claim(model[1], keys[3:6], f"{host}:{dead.stdout.strip()}") == keys[3:6]  # killed
        s = score_into_store(Scorer(detector, model[1]), store, images, batch_size=4)
        assert (s.n_scored, s.n_elsewhere) == (5, 3)
        assert store.scored_paths(model[1]) == set(keys[3:])
        # this run's claims are gone with its results; the live scorer's stay until it stores or stops
        assert store.claim(model[1], keys, claim_owner()) == []
        assert store.release_claims(live) == 3
        s = score_into_store(Scorer(detector, model[1]), store, images, batch_size=4)
        assert (s.n_scored, s.n_skipped, s.n_elsewhere) == (3, 5, 0)
        assert sqlite3.connect(tmp_path / "r.db").execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0


def test_a_stale_claim_from_another_machine_is_taken_over(tmp_path):
    with ResultStore(tmp_path / "r.db") as store:
        store.register_model("m", detector="patchcore", file_sha256="x")
        assert store.claim("m", ["a", "b"], "elsewhere:1") == ["a", "b"]
        assert store.claim("m", ["a", "b"], claim_owner()) == []
        assert store.claim("m", ["a", "b"], claim_owner(), stale_after=-1) == ["a", "b"]


def test_gif_is_refused_by_name_and_left_out_of_folders(tmp_path):
    Image.new("L", (64, 64)).save(tmp_path / "a.gif")
    Image.new("L", (64, 64)).save(tmp_path / "b.png")
    assert ".gif" not in IMAGE_EXTENSIONS and [p.name for p in list_images(tmp_path)] == ["b.png"]
    with pytest.raises(ImageReadError, match=r"a\.gif'.*GIF is not supported"):
        read_image(tmp_path / "a.gif")


def test_images_under_8_px_a_side_are_refused(tmp_path):
    for w, h in ((1, 1), (7, 64), (64, 7)):
        Image.new("L", (w, h)).save(tmp_path / f"{w}x{h}.png")
        with pytest.raises(ImageReadError, match=f"image too small: {w}x{h}"):
            read_image(tmp_path / f"{w}x{h}.png")
    Image.new("L", (8, 8)).save(tmp_path / "8.png")
    assert read_image(tmp_path / "8.png").shape == (8, 8)
    with pytest.raises(ImageReadError, match=r"array\[0\]'.*too small: 4x4"):
        load_item(as_items([np.zeros((4, 4), np.float32)])[0])


def test_a_permission_error_is_reported_as_such(tmp_path, monkeypatch):
    import anomalens.data.io as io_module

    path = tmp_path / "locked.png"
    Image.new("L", (64, 64)).save(path)

    def denied(*args, **kw):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(io_module.Image, "open", denied)
    with pytest.raises(ImageReadError, match=r"locked\.png': permission denied$"):
        read_image(path)


def test_a_folder_given_as_the_model_says_so(tmp_path):
    with pytest.raises(ModelFileError, match="is a folder"):
        Detector.load(tmp_path)
    result = invoke("predict", tmp_path, tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "is a folder" in result.output


def test_score_reads_names_that_are_not_utf8_from_stdin(model, corpus, tmp_path):
    folder, _ = corpus
    name = os.path.join(os.fsencode(folder), b"latin1_\xe9t\xe9.png")
    result = CliRunner().invoke(
        app, ["score", str(model[0]), "-", "-o", str(tmp_path / "r.db"), "-q"], input=name + b"\n"
    )
    assert result.exit_code == 0, result.output
    with ResultStore(tmp_path / "r.db") as store:
        [row] = store.results(model[1])
    assert row.status == "ok" and row.path == display_name(name)
