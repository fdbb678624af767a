"""Dataset descriptions (lists of samples) and loaders for MVTec (and BTAD), folder and CSV layouts."""

from __future__ import annotations

import csv
import hashlib
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from anomalens.data.io import IMAGE_EXTENSIONS, DatasetError, list_images, natural_sorted

__all__ = [
    "Dataset",
    "DatasetError",
    "Sample",
    "calibration_split",
    "find_mvtec_categories",
    "is_category",
    "load_csv",
    "load_dataset",
    "load_folder",
    "load_mvtec",
]

GOOD = "good"
# the good folders' names: MVTec's train/good and test/good, BTAD's train/ok and test/ok
_GOOD_FOLDERS = (GOOD, "ok")
_GOOD_LABELS = {"good", "ok", "normal", "0"}
_DEFECT_LABELS = {"1", "defect", "bad", "anomaly"}
_CSV_COLUMNS = ("path", "label", "mask", "split", "product")


@dataclass(frozen=True)
class Sample:
    """One image: ``label`` is 0 for good, 1 for defective."""

    path: Path
    label: int
    defect_type: str = GOOD
    mask_path: Path | None = None
    product: str = ""  # a multi-product CSV's product column (empty elsewhere)


@dataclass
class Dataset:
    """Training samples (good only) and test samples of one inspection task."""

    name: str
    root: Path
    train: list[Sample]
    test: list[Sample]

    @property
    def test_good(self) -> list[Sample]:
        return [s for s in self.test if s.label == 0]

    @property
    def test_defective(self) -> list[Sample]:
        return [s for s in self.test if s.label == 1]

    @property
    def defect_types(self) -> list[str]:
        return sorted({s.defect_type for s in self.test_defective})

    def summary(self) -> str:
        """One line, e.g. "tile: 10 train, 6 test (2 good, 4 defective: crack 3, hole 1)"."""
        defective = self.test_defective
        counts = Counter(s.defect_type for s in defective)
        types = ", ".join(f"{t} {counts[t]}" for t in sorted(counts))
        detail = f"{len(self.test_good)} good, {len(defective)} defective"
        if types:
            detail += f": {types}"
        return f"{self.name}: {len(self.train)} train, {len(self.test)} test ({detail})"


def _goods(paths: Sequence[Path]) -> list[Sample]:
    return [Sample(path=p, label=0) for p in paths]


def mask_index(folder: Path) -> dict[str, Path]:
    """Lower-cased file stem -> path for the mask files of one defect type (any image extension;
    of two masks with one stem, the first by name)."""
    if not folder.is_dir():
        return {}
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    index: dict[str, Path] = {}
    for p in files:
        index.setdefault(p.stem.lower(), p)
    return index


def find_mask(index: Mapping[str, Path], stem: str) -> Path | None:
    # MVTec names masks "<stem>_mask.png"; VisA/BTAD reuse the image stem (BTAD: .bmp images, .png masks)
    for name in (f"{stem}_mask", stem):
        found = index.get(name.lower())
        if found is not None:
            return found
    return None


def _good_folder(root: Path) -> str | None:
    """The category's name for good images (MVTec's `good`, BTAD's `ok`), None if neither."""
    return next((g for g in _GOOD_FOLDERS if (root / "train" / g).is_dir()), None)


def load_mvtec(root: str | Path) -> Dataset:
    """Load an MVTec-AD style category: train/good, test/<type>, ground_truth/<type>; or a BTAD
    product: train/ok, test/ok, test/ko, ground_truth/ko (`ok` is good, `ko` a defect type).

    Masks are matched by name whatever their extension: ``<stem>_mask.<ext>`` or ``<stem>.<ext>``;
    a defective image without a mask gets ``mask_path=None``. A missing ``test`` folder gives an
    empty test set; empty defect-type folders are skipped with a warning.
    """
    root = Path(root)
    good = _good_folder(root)
    if good is None:
        raise DatasetError(f"not an MVTec or BTAD category (no train/good or train/ok folder): '{root}'")
    train = _goods(list_images(root / "train" / good))
    test: list[Sample] = []
    test_dir = root / "test"
    type_dirs = (
        [d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")]
        if test_dir.is_dir()
        else []
    )
    for type_dir in natural_sorted(type_dirs, test_dir):
        try:
            images = list_images(type_dir)
        except DatasetError:
            warnings.warn(f"skipping empty test folder '{type_dir}'", stacklevel=2)
            continue
        defect_type = type_dir.name
        if defect_type == good:
            test.extend(_goods(images))
            continue
        masks = mask_index(root / "ground_truth" / defect_type)
        test.extend(
            Sample(path=p, label=1, defect_type=defect_type, mask_path=find_mask(masks, p.stem))
            for p in images
        )
    return Dataset(name=root.resolve().name, root=root, train=train, test=test)


def load_folder(good: str | Path, test: Mapping[str, str | Path] | None = None) -> Dataset:
    """A plain folder of good training images, plus optional test folders.

    ``test`` maps a defect type (or "good") to a folder of test images; no masks.
    """
    good = Path(good)
    train = _goods(list_images(good))
    samples: list[Sample] = []
    for defect_type, folder in (test or {}).items():
        images = list_images(folder)
        if defect_type == GOOD:
            samples.extend(_goods(images))
        else:
            samples.extend(Sample(path=p, label=1, defect_type=defect_type) for p in images)
    return Dataset(name=good.resolve().name, root=good, train=train, test=samples)


def _parse_label(value: str) -> tuple[int, str] | None:
    """(label, defect_type) for a CSV label cell, None if empty."""
    text = value.strip()
    if not text:
        return None
    if text.lower() in _GOOD_LABELS:
        return 0, GOOD
    if text.lower() in _DEFECT_LABELS:
        return 1, "defect"
    return 1, text


def load_csv(csv_path: str | Path) -> Dataset:
    """Load a CSV with header ``path,label[,mask][,split][,product]``; relative paths are CSV-relative.

    Labels good/ok/normal/0 are good, 1/defect/bad/anomaly are defective of type "defect",
    and any other label is a defective image of that defect type. Without a ``split``
    column good rows go to train and defective rows to test (with a warning: no test goods).
    """
    csv_path = Path(csv_path)
    base = csv_path.parent

    def fail(line: int, message: str) -> DatasetError:
        return DatasetError(f"{csv_path}, line {line}: {message}")

    def resolve(line: int, value: str, what: str) -> Path:
        path = Path(value.strip())
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise fail(line, f"{what} not found: '{path}'")
        return path

    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [h.strip().lower() for h in next(reader, [])]
            unknown = [h for h in header if h not in _CSV_COLUMNS]
            if "path" not in header or "label" not in header or unknown or len(set(header)) != len(header):
                raise fail(1, f"bad header {header}: expected columns path,label[,mask][,split][,product]")
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read CSV '{csv_path}': {exc}") from exc
    if not rows:
        raise DatasetError(f"no rows in CSV '{csv_path}'")

    has_split = "split" in header
    train: list[Sample] = []
    test: list[Sample] = []
    for line, cells in rows:
        if len(cells) != len(header):
            raise fail(line, f"expected {len(header)} columns, got {len(cells)}")
        row = dict(zip(header, cells, strict=True))
        parsed = _parse_label(row["label"])
        if parsed is None:
            raise fail(line, "empty label")
        label, defect_type = parsed
        if not row["path"].strip():
            raise fail(line, "empty path")
        path = resolve(line, row["path"], "image")
        mask_value = row.get("mask", "").strip()
        if mask_value and label == 0:
            raise fail(line, "a good image cannot have a mask")
        mask_path = resolve(line, mask_value, "mask") if mask_value else None
        split = row["split"].strip().lower() if has_split else ("train" if label == 0 else "test")
        if split not in ("train", "test"):
            raise fail(line, f"split must be 'train' or 'test', got '{row['split'].strip()}'")
        if split == "train" and label == 1:
            raise fail(line, f"defective image in the train split: '{path}'")
        sample = Sample(path, label, defect_type, mask_path, row.get("product", "").strip())
        (train if split == "train" else test).append(sample)
    if not has_split:
        warnings.warn(
            f"{csv_path} has no split column: good images go to train, defective ones to test, "
            "so the test set has no good images",
            stacklevel=2,
        )
    return Dataset(name=csv_path.stem, root=base, train=train, test=test)


def is_category(folder: str | Path) -> bool:
    """Whether `folder` is one MVTec (train/good) or BTAD (train/ok) category."""
    return _good_folder(folder) is not None


def _subdirs(folder: Path) -> list[Path]:
    return [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")]


def find_mvtec_categories(root: str | Path) -> list[Path]:
    """Folders at depth 1 or 2 below ``root`` that hold train/good (or BTAD's train/ok), in natural order.

    The search does not descend into a category found at depth 1.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"folder not found: '{root}'")
    found: list[Path] = []
    for child in _subdirs(root):
        if is_category(child):
            found.append(child)
        else:
            found.extend(d for d in _subdirs(child) if is_category(d))
    return natural_sorted(found, root)


def load_dataset(path: str | Path) -> Dataset:
    """Load a dataset, detecting its layout: CSV file, MVTec or BTAD category, or folder of images."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset not found: '{path}'")
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return load_csv(path)
        raise DatasetError(f"not a dataset (expected a .csv file or a folder): '{path}'")
    if is_category(path):
        return load_mvtec(path)
    if any(p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") for p in path.iterdir()):
        return load_folder(path)
    categories = find_mvtec_categories(path)
    if categories:
        names = ", ".join(c.relative_to(path).as_posix() for c in categories)
        raise DatasetError(
            f"'{path}' is a folder of MVTec categories, not one dataset; "
            f"pass one of them, e.g. '{categories[0]}' (found: {names})"
        )
    raise DatasetError(f"no images, CSV, MVTec (train/good) or BTAD (train/ok) layout found in '{path}'")


def load_products(path: str | Path) -> dict[str, Dataset]:
    """One dataset per product: the MVTec categories under a folder (named by their path below it),
    or a CSV's rows grouped by its ``product`` column."""
    path = Path(path)
    if path.is_file():
        data = load_csv(path)
        products = sorted({s.product for s in data.train + data.test})
        if products == [""]:
            raise DatasetError(f"'{path}' has no product column: add one to fit a multi-product model")
        if "" in products:
            raise DatasetError(f"'{path}': some rows have an empty product")
        return {
            p: Dataset(
                name=p,
                root=data.root,
                train=[s for s in data.train if s.product == p],
                test=[s for s in data.test if s.product == p],
            )
            for p in products
        }
    if path.is_dir() and is_category(path):
        raise DatasetError(f"'{path}' is one category: give the folder above several categories")
    categories = find_mvtec_categories(path)
    if not categories:
        raise DatasetError(f"no MVTec categories (<product>/train/good) found under '{path}'")
    out = {}
    for c in categories:
        data = load_mvtec(c)
        data.name = c.relative_to(path).as_posix()
        out[data.name] = data
    return out


def _stable_hash(seed: int, sample: Sample) -> tuple[str, str]:
    digest = hashlib.sha1(f"{seed}:{sample.path.name}".encode()).hexdigest()
    return digest, sample.path.as_posix()  # the full path only breaks ties of equal names


def calibration_split(
    samples: Sequence[Sample], fraction: float = 0.1, seed: int = 0, min_calibration: int = 1
) -> tuple[list[Sample], list[Sample]]:
    """Split training goods deterministically into (fit, calibration).

    The ``max(min_calibration, round(fraction * n))`` samples with the lowest
    ``sha1(f"{seed}:{file name}")`` go to calibration (at most n - 1, so fitting keeps
    one), independent of input order and machine. Both lists keep the input order.
    """
    samples = list(samples)
    if len(samples) < 2:
        raise DatasetError(f"calibration split needs at least 2 training images, got {len(samples)}")
    if not 0 < fraction < 1:
        raise DatasetError(f"calibration fraction must be in (0, 1), got {fraction}")
    if min_calibration < 0:
        raise DatasetError(f"min_calibration must be >= 0, got {min_calibration}")
    defective = [s for s in samples if s.label != 0]
    if defective:
        raise DatasetError(f"calibration split takes good training images only, got '{defective[0].path}'")
    count = min(len(samples) - 1, max(min_calibration, round(fraction * len(samples))))
    chosen = set(sorted(range(len(samples)), key=lambda i: _stable_hash(seed, samples[i]))[:count])
    fit = [s for i, s in enumerate(samples) if i not in chosen]
    calibration = [s for i, s in enumerate(samples) if i in chosen]
    return fit, calibration
