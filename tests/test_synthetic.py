"""Tests for anomalens.data.synthetic: determinism, layout, mask exactness and speed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.data import (
    add_defect,
    load_mvtec,
    make_synthetic_dataset,
    read_image,
    read_mask,
    synthetic_image,
)
from anomalens.data.synthetic import AREA_TOLERANCE, add_small_defect, make_strip_dataset, strip_image

KINDS = ["texture", "object"]
DEFECTS = ["scratch", "blob", "crack"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("channels", [1, 3])
def test_synthetic_image_is_seeded(kind: str, channels: int) -> None:
    a = synthetic_image(kind, 64, channels, np.random.default_rng(5))
    b = synthetic_image(kind, 64, channels, np.random.default_rng(5))
    c = synthetic_image(kind, 64, channels, np.random.default_rng(6))
    assert a.dtype == np.float32 and a.shape == ((64, 64) if channels == 1 else (64, 64, 3))
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Goods vary a little but share statistics.
    assert abs(float(a.mean()) - float(c.mean())) < 0.05 and abs(float(a.std()) - float(c.std())) < 0.05


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("defect_type", DEFECTS)
@pytest.mark.parametrize("channels", [1, 3])
def test_defect_mask_is_exactly_the_changed_pixels(kind: str, defect_type: str, channels: int) -> None:
    rng = np.random.default_rng(11)
    for _ in range(10):
        image = synthetic_image(kind, 96, channels, rng)
        out, mask = add_defect(image, defect_type, rng)
        changed = out != image
        changed = changed.any(axis=-1) if channels == 3 else changed
        assert mask.dtype == bool and mask.shape == (96, 96)
        np.testing.assert_array_equal(mask, changed)
        assert 0.005 <= mask.mean() <= 0.05
        diff = np.abs(out - image)[mask]
        assert diff.mean() > 0.1  # clearly visible
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_add_defect_is_seeded_and_respects_region() -> None:
    image = synthetic_image("object", 64, 1, np.random.default_rng(0))
    a = add_defect(image, "crack", np.random.default_rng(1))
    b = add_defect(image, "crack", np.random.default_rng(1))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    region = np.zeros((64, 64), bool)
    region[16:48, 10:54] = True
    for seed in range(5):
        _, mask = add_defect(image, "scratch", np.random.default_rng(seed), region=region)
        assert mask.any() and not (mask & ~region).any()


def test_make_synthetic_dataset_layout(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "tex", n_train=5, n_test_good=2, n_test_defect=4, size=48, channels=3
    )
    assert root == tmp_path / "tex"
    assert sorted(p.name for p in (root / "train" / "good").iterdir()) == [
        "000.png",
        "001.png",
        "002.png",
        "003.png",
        "004.png",
    ]
    dataset = load_mvtec(root)
    assert dataset.summary() == "tex: 5 train, 6 test (2 good, 4 defective: blob 1, crack 1, scratch 2)"
    for sample in dataset.test_defective:
        assert sample.mask_path == root / "ground_truth" / sample.defect_type / f"{sample.path.stem}_mask.png"
        with Image.open(sample.mask_path) as mask_file:
            assert mask_file.mode == "L"
            assert set(np.unique(np.asarray(mask_file))) == {0, 255}
        assert read_image(sample.path).shape == (48, 48, 3)
        assert 0.005 <= read_mask(sample.mask_path, (48, 48)).mean() <= 0.05
    assert not (root / "ground_truth" / "good").exists()


def test_make_synthetic_dataset_is_byte_identical(tmp_path: Path) -> None:
    kwargs = dict(kind="object", n_train=3, n_test_good=2, n_test_defect=3, size=64)
    a = _files(make_synthetic_dataset(tmp_path / "a", seed=7, **kwargs))
    b = _files(make_synthetic_dataset(tmp_path / "b", seed=7, **kwargs))
    c = _files(make_synthetic_dataset(tmp_path / "c", seed=8, **kwargs))
    assert a == b
    assert a.keys() == c.keys() and all(a[name] != c[name] for name in a)


def test_object_defects_stay_on_the_object(tmp_path: Path) -> None:
    root = make_synthetic_dataset(
        tmp_path / "obj", kind="object", n_train=1, n_test_good=0, n_test_defect=9, size=64
    )
    yy, xx = np.mgrid[0:64, 0:64] + 0.5 - 32
    outside_cap = np.hypot(yy, xx) > 0.3 * 64
    for sample in load_mvtec(root).test_defective:
        assert not (read_mask(sample.mask_path) & outside_cap).any()


def test_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_synthetic_dataset(tmp_path / "speed", n_train=40, n_test_good=10, n_test_defect=10, size=128)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(kind="fabric"), "unknown kind"),
        (dict(channels=2), "channels must be 1 or 3"),
        (dict(size=16), "size must be at least 32"),
        (dict(defect_types=("scratch", "hole")), "defect_types"),
        (dict(defect_types=()), "defect_types"),
        (dict(n_train=0), "n_train"),
    ],
)
def test_make_synthetic_dataset_validates_before_writing(tmp_path: Path, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make_synthetic_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_make_synthetic_dataset_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_synthetic_dataset(tmp_path)


def test_unknown_defect_type() -> None:
    with pytest.raises(ValueError, match="unknown defect type"):
        add_defect(np.full((64, 64), 0.5, np.float32), "dent", np.random.default_rng(0))


# -- elongated high-resolution strips with small defects ------------------------------------------


@pytest.mark.parametrize("shape", [(500, 2000), (64, 900), (900, 64), (97, 131)])
@pytest.mark.parametrize("channels", [1, 3])
def test_strip_image_shapes_and_seeding(shape: tuple[int, int], channels: int) -> None:
    a = strip_image(*shape, channels, np.random.default_rng(3))
    b = strip_image(*shape, channels, np.random.default_rng(3))
    c = strip_image(*shape, channels, np.random.default_rng(4))
    assert a.dtype == np.float32 and a.shape == (shape if channels == 1 else (*shape, 3))
    assert a.min() >= 0.05 and a.max() <= 0.95
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("defect_type", DEFECTS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("shape,area", [((500, 2000), 0.0005), ((128, 1024), 0.002), ((600, 150), 0.001)])
def test_small_defect_mask_is_exact_and_of_the_requested_area(
    defect_type: str, channels: int, shape: tuple[int, int], area: float
) -> None:
    rng = np.random.default_rng(21)
    image = strip_image(*shape, channels, rng)
    for _ in range(4):
        out, mask = add_small_defect(image, defect_type, rng, area)
        changed = out != image
        assert mask.dtype == bool and mask.shape == shape
        np.testing.assert_array_equal(mask, changed.any(axis=-1) if channels == 3 else changed)
        # still exact once both are saved as 8-bit PNGs
        changed_8bit = np.round(out * 255) != np.round(image * 255)
        np.testing.assert_array_equal(mask, changed_8bit.any(axis=-1) if channels == 3 else changed_8bit)
        assert abs(mask.mean() / area - 1) <= AREA_TOLERANCE
        assert 0.05 < np.abs(out - image)[mask].mean() < 0.35  # moderate contrast
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_small_defects_reach_the_short_edges() -> None:
    rng = np.random.default_rng(0)
    image = strip_image(100, 800, 1, rng)
    columns = [np.nonzero(add_small_defect(image, "blob", rng, 0.002)[1].any(0))[0] for _ in range(60)]
    assert min(c.min() for c in columns) < 40 and max(c.max() for c in columns) > 760


def test_make_strip_dataset_layout_and_determinism(tmp_path: Path) -> None:
    kwargs = dict(height=96, width=384, n_train=3, n_test_good=2, n_test_defect=3, defect_area=0.002)
    root = make_strip_dataset(tmp_path / "a", seed=5, **kwargs)
    dataset = load_mvtec(root)
    assert dataset.summary() == "a: 3 train, 5 test (2 good, 3 defective: blob 1, crack 1, scratch 1)"
    for sample in dataset.test_defective:
        image = read_image(sample.path)
        mask = read_mask(sample.mask_path, image.shape[:2])
        assert image.shape == (96, 384)
        assert abs(mask.mean() / 0.002 - 1) <= AREA_TOLERANCE
    assert _files(root) == _files(make_strip_dataset(tmp_path / "b", seed=5, **kwargs))
    other = _files(make_strip_dataset(tmp_path / "c", seed=6, **kwargs))
    assert all(other[name] != data for name, data in _files(root).items())


def test_strip_generation_is_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    make_strip_dataset(tmp_path / "speed", n_train=8, n_test_good=1, n_test_defect=3)  # 500 x 2000
    assert time.perf_counter() - start < 12 * 0.5  # about 0.25 s an image, with room for a busy machine


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(channels=2), "channels must be 1 or 3"),
        (dict(height=16), "at least 32"),
        (dict(defect_area=0.1), "defect area"),
        (dict(height=32, width=32, defect_area=0.001), "defect area"),
        (dict(defect_types=("dent",)), "defect_types"),
    ],
)
def test_make_strip_dataset_validates_before_writing(tmp_path: Path, kwargs: dict, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        make_strip_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
