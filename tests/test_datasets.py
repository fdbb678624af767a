"""Tests for anomalens.data.datasets: loaders, layout detection and calibration split."""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.data import (
    Dataset,
    DatasetError,
    Sample,
    calibration_split,
    find_mvtec_categories,
    load_csv,
    load_dataset,
    load_folder,
    load_mvtec,
    make_synthetic_dataset,
    read_mask,
)


def _small_category(root: Path) -> Path:
    return make_synthetic_dataset(root, n_train=6, n_test_good=2, n_test_defect=6, size=32, seed=1)


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), 100, np.uint8)).save(path)
    return path


@pytest.fixture
def category(tmp_path: Path) -> Path:
    """Synthetic category with one defect missing its mask and one with an all-zero mask."""
    root = _small_category(tmp_path / "widget")
    (root / "ground_truth" / "scratch" / "001_mask.png").unlink()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "ground_truth" / "blob" / "000_mask.png")
    return root


def test_load_mvtec(category: Path) -> None:
    dataset = load_mvtec(category)
    assert dataset.name == "widget" and dataset.root == category
    assert [s.path.name for s in dataset.train] == [f"{i:03d}.png" for i in range(6)]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in dataset.train)
    assert len(dataset.test_good) == 2 and all(s.mask_path is None for s in dataset.test_good)
    assert dataset.defect_types == ["blob", "crack", "scratch"]
    by_name = {(s.defect_type, s.path.name): s for s in dataset.test_defective}
    assert len(by_name) == 6 and all(s.label == 1 for s in by_name.values())
    assert by_name["scratch", "001.png"].mask_path is None
    assert by_name["crack", "000.png"].mask_path == category / "ground_truth" / "crack" / "000_mask.png"
    zero = by_name["blob", "000.png"]
    assert zero.mask_path is not None and not read_mask(zero.mask_path).any()
    assert dataset.summary() == "widget: 6 train, 8 test (2 good, 6 defective: blob 2, crack 2, scratch 2)"


@pytest.mark.parametrize("mask_name", ["000.png", "000_mask.bmp", "000.TIF", "000_mask.tiff"])
def test_load_mvtec_mask_name_variants(tmp_path: Path, mask_name: str) -> None:
    root = tmp_path / "cat"
    _image(root / "train" / "good" / "a.png")
    _image(root / "test" / "dent" / "000.png")
    _image(root / "ground_truth" / "dent" / mask_name)
    (sample,) = load_mvtec(root).test
    assert sample.mask_path == root / "ground_truth" / "dent" / mask_name


def test_load_mvtec_without_test_and_with_empty_type(tmp_path: Path) -> None:
    root = tmp_path / "cat"
    _image(root / "train" / "good" / "a.png")
    assert load_mvtec(root).test == []
    (root / "test" / "dent").mkdir(parents=True)
    with pytest.warns(UserWarning, match="empty test folder"):
        assert load_mvtec(root).test == []


def test_load_mvtec_rejects_other_layouts(tmp_path: Path) -> None:
    _image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="no train/good or train/ok"):
        load_mvtec(tmp_path)


def test_load_folder(tmp_path: Path) -> None:
    for name in ["g10.png", "g2.png"]:
        _image(tmp_path / "parts" / name)
    _image(tmp_path / "ok" / "t.png")
    _image(tmp_path / "bad" / "d1.png")
    dataset = load_folder(tmp_path / "parts", test={"good": tmp_path / "ok", "dent": tmp_path / "bad"})
    assert dataset.name == "parts"
    assert [s.path.name for s in dataset.train] == ["g2.png", "g10.png"]
    assert [(s.label, s.defect_type) for s in dataset.test] == [(0, "good"), (1, "dent")]
    assert load_folder(tmp_path / "parts").test == []


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def csv_files(tmp_path: Path) -> Path:
    for name in ["g1.png", "g2.png", "g3.png", "d1.png", "d2.png", "d3.png", "m1.png"]:
        _image(tmp_path / "img" / name)
    return tmp_path


def test_load_csv_with_split(csv_files: Path) -> None:
    csv_path = _write_csv(
        csv_files / "parts.csv",
        "path,label,mask,split\n"
        "img/g1.png,good,,train\n"
        f"{csv_files / 'img' / 'g2.png'},OK,,train\n"
        "img/g3.png,normal,,test\n"
        "img/d1.png,1,img/m1.png,test\n"
        "img/d2.png,anomaly,,test\n"
        "img/d3.png,dent,,test\n",
    )
    dataset = load_csv(csv_path)
    assert dataset.name == "parts" and dataset.root == csv_files
    assert [s.path for s in dataset.train] == [csv_files / "img" / "g1.png", csv_files / "img" / "g2.png"]
    assert [(s.path.name, s.label, s.defect_type) for s in dataset.test] == [
        ("g3.png", 0, "good"),
        ("d1.png", 1, "defect"),
        ("d2.png", 1, "defect"),
        ("d3.png", 1, "dent"),
    ]
    assert dataset.test[1].mask_path == csv_files / "img" / "m1.png"
    assert dataset.summary() == "parts: 2 train, 4 test (1 good, 3 defective: defect 2, dent 1)"


def test_load_csv_without_split_warns(csv_files: Path) -> None:
    csv_path = _write_csv(
        csv_files / "a.csv", "\ufeffPath, Label\nimg/g1.png,0\nimg/g2.png,good\n\nimg/d1.png,bad\n"
    )
    with pytest.warns(UserWarning, match="no good images"):
        dataset = load_csv(csv_path)
    assert len(dataset.train) == 2 and len(dataset.test) == 1 and dataset.test_good == []


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "path,label,split\nimg/g1.png,good,train\nimg/d1.png,dent,train\n",
            "line 3: defective image in the train split",
        ),
        ("path,label\nimg/g1.png,good\nimg/nope.png,good\n", "line 3: image not found: '.*nope.png'"),
        ("path,label,mask\nimg/d1.png,dent,img/nope.png\n", "line 2: mask not found"),
        ("path,label,mask\nimg/g1.png,good,img/m1.png\n", "line 2: a good image cannot have a mask"),
        ("path,label,split\nimg/g1.png,good,val\n", "line 2: split must be 'train' or 'test'"),
        ("path,label\nimg/g1.png,\n", "line 2: empty label"),
        ("path,label\nimg/g1.png,good,extra\n", "line 2: expected 2 columns"),
        ("file,label\nimg/g1.png,good\n", "line 1: bad header"),
        ("path,label,colour\nimg/g1.png,good,red\n", "line 1: bad header"),
        ("path,label\n", "no rows"),
        ("", "line 1: bad header"),
    ],
)
def test_load_csv_bad_rows(csv_files: Path, text: str, message: str) -> None:
    csv_path = _write_csv(csv_files / "bad.csv", text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DatasetError, match=message) as info:
            load_csv(csv_path)
    assert "\n" not in str(info.value) and str(csv_path) in str(info.value)


def test_load_dataset_detects_layouts(tmp_path: Path, csv_files: Path) -> None:
    category = _small_category(tmp_path / "cat")
    assert load_dataset(category).summary() == load_mvtec(category).summary()
    assert [s.path for s in load_dataset(csv_files / "img").train] == [
        s.path for s in load_folder(csv_files / "img").train
    ]
    csv_path = _write_csv(csv_files / "a.csv", "path,label,split\nimg/g1.png,good,train\n")
    assert load_dataset(csv_path) == load_csv(csv_path)


def test_load_dataset_rejects_parent_of_categories(tmp_path: Path) -> None:
    _small_category(tmp_path / "all" / "bottle")
    _small_category(tmp_path / "all" / "tiles" / "tile")
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path / "all")
    message = str(info.value)
    assert "not one dataset" in message and str(tmp_path / "all" / "bottle") in message
    assert "bottle, tiles/tile" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "other-file"])
def test_load_dataset_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "data"
    if kind == "empty-dir":
        path.mkdir()
    elif kind == "other-file":
        path = _image(tmp_path / "x.png")
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        load_dataset(path)


def test_find_mvtec_categories(tmp_path: Path) -> None:
    for rel in ["b10", "b2", "group/a", "group/.hidden", "deep/x/y"]:
        (tmp_path / rel / "train" / "good").mkdir(parents=True)
    (tmp_path / "b2" / "inner" / "train" / "good").mkdir(parents=True)  # inside a category: ignored
    (tmp_path / "notes").mkdir()
    found = [p.relative_to(tmp_path).as_posix() for p in find_mvtec_categories(tmp_path)]
    assert found == ["b2", "b10", "group/a"]
    with pytest.raises(DatasetError, match="folder not found"):
        find_mvtec_categories(tmp_path / "missing")


def _goods(n: int) -> list[Sample]:
    return [Sample(path=Path(f"/data/train/good/{i:03d}.png"), label=0) for i in range(n)]


def test_calibration_split_is_deterministic_and_order_free() -> None:
    samples = _goods(50)
    fit, calibration = calibration_split(samples, fraction=0.2, seed=3)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    fit2, calibration2 = calibration_split(shuffled, fraction=0.2, seed=3)
    assert set(calibration) == set(calibration2) and set(fit) == set(fit2)
    assert fit == [s for s in samples if s in set(fit)]  # input order kept
    assert fit2 == [s for s in shuffled if s in set(fit2)]
    assert not set(fit) & set(calibration) and set(fit) | set(calibration) == set(samples)
    assert len(calibration) == 10
    expected = sorted(samples, key=lambda s: hashlib.sha1(f"3:{s.path.name}".encode()).hexdigest())[:10]
    assert set(calibration) == set(expected)
    assert set(calibration_split(samples, fraction=0.2, seed=4)[1]) != set(calibration)


@pytest.mark.parametrize(
    "n,fraction,min_calibration,expected",
    [(20, 0.1, 1, 2), (5, 0.1, 1, 1), (10, 0.1, 3, 3), (2, 0.9, 1, 1), (4, 0.5, 10, 3), (30, 0.5, 0, 15)],
)
def test_calibration_split_sizes(n: int, fraction: float, min_calibration: int, expected: int) -> None:
    fit, calibration = calibration_split(_goods(n), fraction=fraction, min_calibration=min_calibration)
    assert len(calibration) == expected and len(fit) == n - expected


def test_calibration_split_only_uses_what_it_is_given(category: Path) -> None:
    dataset = load_mvtec(category)
    before = list(dataset.test)
    fit, calibration = calibration_split(dataset.train, fraction=0.3)
    assert set(fit) | set(calibration) == set(dataset.train)
    assert dataset.test == before and not set(calibration) & set(dataset.test)


@pytest.mark.parametrize(
    "samples,fraction,message",
    [
        (_goods(1), 0.1, "at least 2"),
        (_goods(10), 0.0, r"fraction must be in \(0, 1\)"),
        (_goods(10), 1.0, r"fraction must be in \(0, 1\)"),
        ([*_goods(3), Sample(Path("/d/x.png"), 1, "dent")], 0.1, "good training images only"),
    ],
)
def test_calibration_split_errors(samples: list[Sample], fraction: float, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        calibration_split(samples, fraction=fraction)


def test_dataset_properties_on_empty_test() -> None:
    dataset = Dataset(name="x", root=Path("."), train=_goods(2), test=[])
    assert dataset.test_good == [] and dataset.defect_types == []
    assert dataset.summary() == "x: 2 train, 0 test (0 good, 0 defective)"


def _btad_copy(mvtec: Path, root: Path) -> Path:
    """BTAD's layout from a synthetic MVTec category: train/ok, test/ok, test/ko with .bmp images,
    ground_truth/ko with .png masks named like their image (one defective image left without)."""
    for src, dst in (("train/good", "train/ok"), ("test/good", "test/ok")):
        (root / dst).mkdir(parents=True)
        for p in sorted((mvtec / src).iterdir()):
            Image.open(p).save(root / dst / f"{p.stem}.bmp")
    (root / "test" / "ko").mkdir()
    (root / "ground_truth" / "ko").mkdir(parents=True)
    for type_dir in sorted((mvtec / "test").iterdir()):
        if type_dir.name == "good":
            continue
        for p in sorted(type_dir.iterdir()):
            name = f"{type_dir.name}_{p.stem}"
            Image.open(p).save(root / "test" / "ko" / f"{name}.bmp")
            mask = mvtec / "ground_truth" / type_dir.name / f"{p.stem}_mask.png"
            if name != "scratch_001":
                Image.open(mask).save(root / "ground_truth" / "ko" / f"{name}.png")
    return root


def test_load_btad_layout(tmp_path: Path) -> None:
    mvtec = _small_category(tmp_path / "mvtec")
    root = _btad_copy(mvtec, tmp_path / "btad" / "01")
    dataset = load_dataset(root)
    assert dataset.summary() == "01: 6 train, 8 test (2 good, 6 defective: ko 6)"
    assert all(s.path.suffix == ".bmp" for s in dataset.train + dataset.test)
    by_name = {s.path.stem: s for s in dataset.test_defective}
    assert by_name["scratch_001"].mask_path is None
    crack = by_name["crack_000"]
    assert crack.mask_path == root / "ground_truth" / "ko" / "crack_000.png"
    np.testing.assert_array_equal(
        read_mask(crack.mask_path), read_mask(mvtec / "ground_truth" / "crack" / "000_mask.png")
    )
    assert [p.name for p in find_mvtec_categories(tmp_path / "btad")] == ["01"]
    with pytest.raises(DatasetError, match="folder of MVTec categories"):
        load_dataset(tmp_path / "btad")
