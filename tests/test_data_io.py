"""Tests for anomalens.data.io: image/mask reading, errors and folder listing."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from anomalens.data import IMAGE_EXTENSIONS, DatasetError, ImageReadError, list_images, read_image, read_mask

RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (12, 17), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (12, 17, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (12, 17), dtype=np.uint16)
GRAY16[0, 0] = 1234
RGB16 = RNG.integers(0, 65536, (12, 17, 3), dtype=np.uint16)
FLOAT = RNG.random((12, 17)).astype(np.float32)
SMOOTH = np.add.outer(np.arange(32), np.arange(32)).astype(np.uint8) * 4


def _expect8(a: np.ndarray) -> np.ndarray:
    return (a / 255.0).astype(np.float32)


def _expect16(a: np.ndarray) -> np.ndarray:
    return (a / 65535.0).astype(np.float32)


def _pil(array: np.ndarray, mode: str | None = None) -> Callable[[Path], None]:
    return lambda path: (Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)).save(path)


def _tiff(array: np.ndarray, **kwargs: object) -> Callable[[Path], None]:
    return lambda path: tifffile.imwrite(path, array, **kwargs)


def _palette(path: Path) -> None:
    image = Image.fromarray((GRAY8 % 4).astype(np.uint8), mode="L").convert("P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    image.save(path)


PALETTE_RGB = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)[GRAY8 % 4]
RGBA8 = np.dstack([RGB8, GRAY8])
LA8 = np.dstack([GRAY8, 255 - GRAY8])
FLOAT_16BIT = FLOAT * np.float32(1000)  # max > 1: read as 16-bit data, divided by 65535
FLOAT_LARGE = FLOAT * np.float32(1e6)  # max > 65535: divided by its maximum
BITS = GRAY8 > 127

EXACT_CASES = {
    "png-gray8": ("a.png", _pil(GRAY8), _expect8(GRAY8)),
    "png-rgb8": ("a.png", _pil(RGB8), _expect8(RGB8)),
    "png-rgba-drops-alpha": ("a.png", _pil(RGBA8), _expect8(RGB8)),
    "png-la-drops-alpha": ("a.png", _pil(LA8), _expect8(GRAY8)),
    "png-palette": ("a.png", _palette, _expect8(PALETTE_RGB)),
    "png-1bit": ("a.png", _pil(BITS), BITS.astype(np.float32)),
    "png-gray16": ("a.png", _pil(GRAY16), _expect16(GRAY16)),
    "png-gray-as-rgb-stays-rgb": ("a.png", _pil(np.dstack([GRAY8] * 3)), _expect8(np.dstack([GRAY8] * 3))),
    "png-upper-case-ext": ("A.PNG", _pil(GRAY8), _expect8(GRAY8)),
    "bmp-gray8": ("a.bmp", _pil(GRAY8), _expect8(GRAY8)),
    "bmp-rgb8": ("a.bmp", _pil(RGB8), _expect8(RGB8)),
    "tif-gray8": ("a.tif", _tiff(GRAY8), _expect8(GRAY8)),
    "tif-gray16": ("a.tiff", _tiff(GRAY16), _expect16(GRAY16)),
    "tif-rgb8": ("a.tif", _tiff(RGB8, photometric="rgb"), _expect8(RGB8)),
    "tif-rgb16": ("a.tif", _tiff(RGB16, photometric="rgb"), _expect16(RGB16)),
    "tif-rgba8": ("a.tif", _tiff(RGBA8, photometric="rgb", extrasamples=["unassalpha"]), _expect8(RGB8)),
    "tif-float32-unit": ("a.tif", _tiff(FLOAT), FLOAT),
    "tif-float32-16bit-range": ("a.tif", _tiff(FLOAT_16BIT), (FLOAT_16BIT / 65535.0).astype(np.float32)),
    "tif-float32-large": (
        "a.tif",
        _tiff(FLOAT_LARGE),
        (FLOAT_LARGE / np.float64(FLOAT_LARGE.max())).astype(np.float32),
    ),
    "tif-chw-planar": (
        "a.tif",
        _tiff(np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate"),
        _expect8(RGB8),
    ),
    "tif-1hw": ("a.tif", _tiff(GRAY8[None]), _expect8(GRAY8)),
    # Five pages: a 3-page stack would be written (and read) as planar RGB.
    "tif-multipage-first": (
        "a.tif",
        _tiff(np.stack([GRAY8, 255 - GRAY8, GRAY8 // 2, GRAY8, GRAY8])),
        _expect8(GRAY8),
    ),
}


@pytest.mark.parametrize("name", list(EXACT_CASES))
def test_round_trip_exact(tmp_path: Path, name: str) -> None:
    filename, write, expected = EXACT_CASES[name]
    path = tmp_path / filename
    write(path)
    out = read_image(path)
    assert out.dtype == np.float32
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_16bit_png_keeps_full_precision(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(GRAY16).save(path)
    out = read_image(path)
    assert out[0, 0] == np.float32(1234 / 65535)
    np.testing.assert_array_equal(np.round(out.astype(np.float64) * 65535).astype(np.uint16), GRAY16)


@pytest.mark.parametrize("mode,shape", [("L", (32, 32)), ("RGB", (32, 32, 3))])
def test_jpeg_round_trip_is_close(tmp_path: Path, mode: str, shape: tuple[int, ...]) -> None:
    path = tmp_path / "a.jpg"
    Image.fromarray(SMOOTH).convert(mode).save(path, quality=95)
    out = read_image(path)
    assert out.shape == shape and out.dtype == np.float32
    reference = _expect8(SMOOTH) if mode == "L" else np.dstack([_expect8(SMOOTH)] * 3)
    assert np.abs(out - reference).max() < 0.05


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_tiff_with_nan_or_inf_is_rejected(tmp_path: Path, bad: float) -> None:
    data = FLOAT.copy()
    data[3, 4] = bad
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, data)
    with pytest.raises(ImageReadError, match="NaN/inf"):
        read_image(path)


def test_negative_float_tiff_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, FLOAT - 0.5)
    with pytest.raises(ImageReadError, match="negative"):
        read_image(path)


def test_signed_tiff_is_unsupported(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, GRAY8.astype(np.int16))
    with pytest.raises(ImageReadError, match="unsupported bit depth"):
        read_image(path)


def _png_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (48, 48), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


CORRUPT_CASES = {
    "truncated-png": ("a.png", lambda p: p.write_bytes(_png_bytes()[:200]), "truncated PNG"),
    "random-bytes-png": (
        "a.png",
        lambda p: p.write_bytes(bytes(RNG.integers(0, 256, 500, dtype=np.uint8))),
        "not a recognised",
    ),
    "empty-file": ("a.png", lambda p: p.write_bytes(b""), "empty file"),
    "missing-file": ("missing.png", lambda p: None, "file not found"),
    "text-as-jpg": ("a.jpg", lambda p: p.write_text("hello\nworld\n"), "not a recognised"),
    "text-as-tif": ("a.tif", lambda p: p.write_text("hello\nworld\n"), "TIFF"),
    "directory": ("dir.png", lambda p: p.mkdir(), "not a file"),
    "newline-in-name": ("bad\nname.png", lambda p: p.write_bytes(b"junk"), "not a recognised"),
}


@pytest.mark.parametrize("name", list(CORRUPT_CASES))
def test_corrupt_files_raise_one_line_error(tmp_path: Path, name: str) -> None:
    filename, make, reason = CORRUPT_CASES[name]
    path = tmp_path / filename
    make(path)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot read image '")
    assert str(path).replace("\n", "\\n") in message
    assert reason in message


def test_image_read_error_pickles() -> None:
    error = ImageReadError("/x/a.png", "truncated PNG")
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error) == "cannot read image '/x/a.png': truncated PNG"
    assert isinstance(clone, ValueError)


def test_read_mask_any_nonzero_is_defect(tmp_path: Path) -> None:
    gray = np.zeros((12, 17), np.uint8)
    gray[2:4, 5:9] = 255
    gray[10, 1] = 1
    Image.fromarray(gray).save(tmp_path / "m.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), gray > 0)

    colour = np.zeros((12, 17, 3), np.uint8)
    colour[5, 5, 1] = 7
    Image.fromarray(colour).save(tmp_path / "c.png")
    mask = read_mask(tmp_path / "c.png", shape=(12, 17))
    assert mask.dtype == bool and mask.shape == (12, 17) and mask.sum() == 1 and mask[5, 5]


def test_read_mask_size_mismatch(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((12, 17), np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(ImageReadError, match="mask size 17x12 does not match image size 10x12"):
        read_mask(tmp_path / "m.png", shape=(12, 10))


def _touch_images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(GRAY8).save(folder / name, format="PNG")


def test_list_images_natural_order_and_filters(tmp_path: Path) -> None:
    _touch_images(tmp_path, ["img10.png", "img2.png", "img1.PNG", "b.bmp", ".hidden.png", "c.tiff"])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _touch_images(tmp_path / "sub", ["img3.png"])
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["b.bmp", "c.tiff", "img1.PNG", "img2.png", "img10.png"]


def test_list_images_recursive_skips_hidden_folders(tmp_path: Path) -> None:
    _touch_images(tmp_path / "a", ["x2.png", "x10.png"])
    _touch_images(tmp_path / "a10", ["y.png"])
    _touch_images(tmp_path / "a2", ["z.png"])
    _touch_images(tmp_path / ".cache", ["hidden.png"])
    rel = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)]
    assert rel == ["a/x2.png", "a/x10.png", "a2/z.png", "a10/y.png"]


@pytest.mark.parametrize("setup", ["missing", "empty", "no-images"])
def test_list_images_errors_name_the_folder(tmp_path: Path, setup: str) -> None:
    folder = tmp_path / "images"
    if setup != "missing":
        folder.mkdir()
    if setup == "no-images":
        (folder / "a.txt").write_text("x")
    with pytest.raises(DatasetError) as info:
        list_images(folder)
    assert str(folder) in str(info.value) and "\n" not in str(info.value)


def test_image_extensions() -> None:
    assert IMAGE_EXTENSIONS == (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# --- fuzzing: read_image returns a finite float32 array in [0, 1] or raises ImageReadError


def _check_read(path: Path) -> None:
    try:
        out = read_image(path)
    except ImageReadError as error:
        assert "\n" not in str(error)
        return
    assert out.dtype == np.float32
    assert out.ndim == 2 or (out.ndim == 3 and out.shape[-1] == 3)
    assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def _encode(write: Callable[[Path], None], suffix: str, folder: Path) -> bytes:
    path = folder / f"valid{suffix}"
    write(path)
    return path.read_bytes()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_files(fuzz_dir: Path) -> list[tuple[str, bytes]]:
    writers = [
        (".png", _pil(GRAY8)),
        (".png", _pil(RGB8)),
        (".png", _pil(GRAY16)),
        (".tif", _tiff(GRAY16)),
        (".tif", _tiff(RGB8, photometric="rgb")),
        (".tif", _tiff(FLOAT)),
        (".tif", _tiff(GRAY8, compression="zlib")),
        (".jpg", _pil(RGB8)),
        (".bmp", _pil(GRAY8)),
    ]
    return [(suffix, _encode(write, suffix, fuzz_dir)) for suffix, write in writers]


HEADERS = [b"", b"\x89PNG\r\n\x1a\n", b"II*\x00", b"MM\x00*", b"BM", b"\xff\xd8\xff"]


# Pillow warns about the corrupt metadata it skips; only the outcome matters here.
@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None)
@given(
    header=st.sampled_from(HEADERS), body=st.binary(max_size=1024), suffix=st.sampled_from(IMAGE_EXTENSIONS)
)
def test_fuzz_random_bytes(fuzz_dir: Path, header: bytes, body: bytes, suffix: str) -> None:
    path = fuzz_dir / f"random{suffix}"
    path.write_bytes(header + body)
    _check_read(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_fuzz_truncated_and_mutated_files(
    fuzz_dir: Path, valid_files: list[tuple[str, bytes]], data: st.DataObject
) -> None:
    suffix, content = data.draw(st.sampled_from(valid_files))
    cut = data.draw(st.integers(0, len(content)))
    mutated = bytearray(content[:cut])
    for _ in range(data.draw(st.integers(0, 3))):
        if mutated:
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
    path = fuzz_dir / f"cut{suffix}"
    path.write_bytes(bytes(mutated))
    _check_read(path)
