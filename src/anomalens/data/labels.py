"""Labelled images for the supervised stages (`refine`): where the few confirmed defects come from,
and the MVTec-layout protocol that lends K of them per defect type to training."""

from __future__ import annotations

import hashlib
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from anomalens.data.datasets import GOOD, Dataset, DatasetError, Sample, find_mask, load_csv, mask_index
from anomalens.data.io import list_images, natural_sorted

__all__ = ["load_labelled", "split_train_defects"]


def _labelled_folder(folder: Path, masks_root: Path) -> list[Sample]:
    """`good/` (or `ok/`) beside one folder per defect type; an MVTec category's `train/` is one.
    Masks, where there are any, in `masks_root/<defect>/` named like MVTec's (`<stem>_mask.<ext>`
    or `<stem>.<ext>`)."""
    subdirs = natural_sorted(
        [d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")], folder
    )
    samples: list[Sample] = []
    for sub in subdirs:
        if sub.name.lower() in (GOOD, "ok"):
            samples.extend(Sample(path=p, label=0) for p in list_images(sub))
            continue
        if sub.resolve() == masks_root.resolve():
            continue
        masks = mask_index(masks_root / sub.name)
        samples.extend(
            Sample(path=p, label=1, defect_type=sub.name, mask_path=find_mask(masks, p.stem))
            for p in list_images(sub)
        )
    return samples


def load_labelled(source: str | Path) -> list[Sample]:
    """Labelled images from a CSV (`path,label[,mask]`: every row, whatever its split column), a
    folder with `good/` beside `<defect>/` folders (masks in `ground_truth/<defect>/` there), or an
    MVTec category whose `train/` holds defect folders beside `good/` (masks in the category's
    `ground_truth/<defect>/`). A result store's review labels are read by `workflows.refine`."""
    source = Path(source)
    if not source.exists():
        raise DatasetError(f"labels not found: '{source}'")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DatasetError(f"labels must be a CSV, a folder or a result store, got '{source}'")
        with warnings.catch_warnings():  # "no split column" is the normal case for a label list
            warnings.simplefilter("ignore")
            dataset = load_csv(source)
        samples = dataset.train + dataset.test
    else:
        folder = source / "train" if (source / "train" / GOOD).is_dir() else source
        samples = _labelled_folder(folder, source / "ground_truth")
    if not any(s.label == 1 for s in samples):
        raise DatasetError(f"no defective images among the labels in '{source}'")
    if not any(s.label == 0 for s in samples):
        raise DatasetError(f"no good images among the labels in '{source}'")
    return samples


def _seeded_order(samples: list[Sample], seed: int) -> list[Sample]:
    return sorted(
        samples, key=lambda s: (hashlib.sha1(f"{seed}:{s.path.name}".encode()).hexdigest(), str(s.path))
    )


def split_train_defects(dataset: Dataset, k: int, seed: int = 0) -> tuple[Dataset, list[Sample]]:
    """The `--train-defects K` protocol: K seeded defective test images per defect type (and as many
    test goods, so the supervised stage sees both classes) move to training; the returned dataset's
    test set is the rest only, so no image a supervised stage trained on is ever evaluated.

    A defect type with K or fewer images keeps at least one for the test."""
    if k < 1:
        raise DatasetError(f"--train-defects must be >= 1, got {k}")
    by_type: dict[str, list[Sample]] = defaultdict(list)
    for s in dataset.test_defective:
        by_type[s.defect_type].append(s)
    if not by_type:
        raise DatasetError(f"'{dataset.root}' has no defective test images to train on")
    moved: list[Sample] = []
    for defect_type in sorted(by_type):
        group = _seeded_order(by_type[defect_type], seed)
        moved.extend(group[: min(k, len(group) - 1)])
    goods = _seeded_order(dataset.test_good, seed)
    moved.extend(goods[: min(len(moved), max(0, len(goods) - 1))])
    taken = {s.path for s in moved}
    if not any(s.label == 1 for s in moved):
        raise DatasetError(f"every defect type of '{dataset.root}' has a single image: none left to train on")
    rest = [s for s in dataset.test if s.path not in taken]
    return replace(dataset, test=rest), moved
