"""Choose a detector's settings without real defects: fit candidates on most training goods, score the
rest of the goods and synthetic defects made from them, keep the candidate that separates them best.

The rule: a seeded share of the training goods (``holdout``) is never fitted on; every candidate is
fitted on the other goods (its own calibration split taken inside those), then scores the held-out goods
and ``defects_per_good`` synthetic defects per held-out good (`anomalens.data.defects`, sources from the
other held-out goods). The best candidate has the highest synthetic image AUROC to 3 decimals, then the
highest synthetic AUPRO, then comes first in the grid. Labelled test defects never enter the choice:
each candidate scores the test images (paths only) while it is fitted, and only after the choice are
their labels read, to report how the chosen candidate ranks among the candidates on real defects and
the Spearman rank correlation between synthetic and real image AUROC.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from anomalens.data import Dataset, Sample, calibration_split, read_image
from anomalens.data.defects import KINDS, DefectSynthesizer
from anomalens.metrics import aupro, image_metrics
from anomalens.models.base import Detector
from anomalens.registry import create, get_class

__all__ = ["DEFAULT_GRIDS", "Candidate", "TuneResult", "candidates", "parse_grid", "tune"]

#: Default candidates per method, the product of these values (kept to a few fits on 2 cores). Methods
#: not listed try the canvas geometry; a key a method lacks is dropped.
DEFAULT_GRIDS: dict[str, dict[str, list[str]]] = {
    "patchcore": {"top_k": ["1", "3", "10", "0"], "resize": ["squash", "letterbox"]},
    "padim": {"image_size": ["224", "256"], "resize": ["squash", "letterbox"]},
    "*": {"image_size": ["224", "256"], "resize": ["squash", "letterbox"]},
}


@dataclass(frozen=True)
class Candidate:
    """One setting to try: options as strings, coerced by the detector like `--set`."""

    options: dict[str, str]

    @property
    def label(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.options.items()) or "defaults"


@dataclass
class TuneResult:
    """The table (one row per candidate, in grid order), the chosen row, its fitted detector, and the
    after-the-choice comparison on real defects (None when the data has no labelled test defects)."""

    rows: list[dict[str, Any]]
    chosen: int
    detector: Detector
    real: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)


def parse_grid(pairs: Sequence[str]) -> dict[str, list[str]]:
    """`--grid key=v1,v2` pairs as {key: [v1, v2]}; a tuple value joins its items with '+'
    (`layers=2+3,1+2+3`)."""
    grid: dict[str, list[str]] = {}
    for pair in pairs:
        key, sep, values = pair.partition("=")
        options = [v.strip().replace("+", ",") for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not options:
            raise ValueError(f"--grid expects key=v1,v2,..., got {pair!r}")
        grid[key.strip()] = options
    return grid


def candidates(model: str, grid: Mapping[str, Sequence[str]] | None = None) -> list[Candidate]:
    """The product of the grid's values (default: `DEFAULT_GRIDS` for the method, keys it has)."""
    cls = get_class(model)
    allowed = {**cls.base_defaults, **cls.defaults}
    if grid is None:
        grid = {k: v for k, v in DEFAULT_GRIDS.get(model, DEFAULT_GRIDS["*"]).items() if k in allowed}
    unknown = sorted(set(grid) - set(allowed))
    if unknown:
        raise ValueError(
            f"--grid: {model} has no option(s) {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}"
        )
    keys = list(grid)
    return [Candidate(dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    return image_metrics(labels, scores)["image_auroc"]


def _synthetic_set(goods: list[np.ndarray], per_good: int, seed: int, kinds: Sequence[str]):
    """Held-out goods followed by their synthetic defects: (images, labels, masks)."""
    made = DefectSynthesizer(kinds, seed=seed).make_many(goods, per_good * len(goods))
    images = goods + [image for image, _ in made]
    masks = [np.zeros(g.shape[:2], bool) for g in goods] + [mask for _, mask in made]
    labels = np.array([0] * len(goods) + [1] * len(made))
    return images, labels, masks


def _rank_key(rows: list[dict[str, Any]], i: int) -> tuple:
    """Smaller is better: highest synthetic AUROC to 3 decimals, then AUPRO, then the earlier candidate."""
    auroc, pro = rows[i]["synthetic_auroc"], rows[i]["synthetic_aupro"]
    return (-round(auroc, 3) if auroc is not None else 1.0, -pro if pro is not None else 1.0, i)


def _choose(rows: list[dict[str, Any]]) -> int:
    """The best row by `_rank_key` among those that were fitted."""
    scored = [i for i, r in enumerate(rows) if r.get("error") is None]
    if not scored:
        raise RuntimeError("no candidate could be fitted: " + "; ".join(r["error"] for r in rows))
    return min(scored, key=lambda i: _rank_key(rows, i))


def _real_comparison(rows: list[dict[str, Any]], chosen: int, test: list[Sample]) -> dict[str, Any] | None:
    """After the choice: every candidate's image AUROC on the labelled test images, the chosen one's
    rank among them (1 = best) and the Spearman correlation of synthetic and real AUROC."""
    from scipy.stats import spearmanr

    labels = np.array([s.label for s in test])
    if not (labels == 1).any() or not (labels == 0).any():
        return None
    for row in rows:
        scores = row.pop("_test_scores", None)
        row["real_auroc"] = None if scores is None else _auroc(labels, scores)
    ok = [r for r in rows if r["real_auroc"] is not None and r["synthetic_auroc"] is not None]
    real = rows[chosen]["real_auroc"]
    if real is None:
        return None
    best = max(r["real_auroc"] for r in ok)
    rho = (
        spearmanr([r["synthetic_auroc"] for r in ok], [r["real_auroc"] for r in ok]).statistic
        if len(ok) > 2
        else None
    )
    return {
        "n_test_good": int((labels == 0).sum()),
        "n_test_defective": int((labels == 1).sum()),
        "chosen_real_auroc": real,
        "best_real_auroc": best,
        "best_candidates": [r["candidate"] for r in ok if r["real_auroc"] == best],
        "chosen_rank": 1 + sum(r["real_auroc"] > real for r in ok),
        "n_candidates": len(ok),
        "spearman": None if rho is None or np.isnan(rho) else float(rho),
    }


def tune(
    dataset: Dataset,
    model: str,
    grid: Mapping[str, Sequence[str]] | None = None,
    *,
    options: Mapping[str, Any] | None = None,
    holdout: float = 0.2,
    max_holdout: int = 60,
    defects_per_good: int = 2,
    kinds: Sequence[str] = KINDS,
    max_train: int | None = None,
    seed: int = 0,
    real: bool = True,
    progress: bool = False,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> TuneResult:
    """Fit every candidate, score held-out goods and synthetic defects, choose (see the module
    docstring). ``options``: fixed options for every candidate (a grid value overrides them).
    ``max_train``: fit on at most this many goods (a seeded subset; None: all but the held-out ones).
    ``real``: after the choice, compare on the labelled test images when there are some. ``on_row``
    is called with each candidate's row as it finishes (for printing)."""
    pool = candidates(model, grid)
    if (
        not 0 < holdout < 1
        or max_holdout < 2
        or defects_per_good < 1
        or (max_train is not None and max_train < 2)
    ):
        raise ValueError(
            f"tune needs 0 < holdout < 1, max_holdout >= 2, defects >= 1 and max_train >= 2; got {holdout}, "
            f"{max_holdout}, {defects_per_good}, {max_train}"
        )
    if len(dataset.train) < 4:
        raise ValueError(f"tune needs at least 4 training goods, '{dataset.name}' has {len(dataset.train)}")
    n_hold = min(max_holdout, max(2, round(holdout * len(dataset.train))))
    fit_goods, held = calibration_split(dataset.train, n_hold / len(dataset.train), seed, min_calibration=2)
    if max_train is not None and len(fit_goods) > max_train:
        fit_goods, _ = calibration_split(fit_goods, 1 - max_train / len(fit_goods), seed + 1)
    images, labels, masks = _synthetic_set([read_image(s.path) for s in held], defects_per_good, seed, kinds)
    test = dataset.test if real else []
    rows: list[dict[str, Any]] = []
    best: tuple[int, Detector] | None = None  # only the leading candidate's model stays in memory
    for candidate in pool:
        row: dict[str, Any] = {"candidate": candidate.label, "options": candidate.options}
        detector = None
        try:
            detector = create(model, **{**(options or {}), **candidate.options})
            start = time.perf_counter()
            detector.fit(fit_goods, progress=progress)
            row["fit_seconds"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            prediction = detector.predict(images)
            seconds = time.perf_counter() - start
            row["images_per_second"] = round(len(images) / seconds, 2)
            row["synthetic_auroc"] = _auroc(labels, prediction.scores)
            row["synthetic_aupro"] = aupro(masks, prediction.maps) if detector.localizes else None
            if test:  # scores only: the labels are read after the choice
                row["_test_scores"] = detector.predict(test, progress=progress).scores
        except (ValueError, RuntimeError) as exc:  # a setting the method or data cannot take
            row.update(error=str(exc).splitlines()[0], synthetic_auroc=None, synthetic_aupro=None)
            detector = None
        rows.append(row)
        if detector is not None and (
            best is None or _rank_key(rows, len(rows) - 1) < _rank_key(rows, best[0])
        ):
            best = (len(rows) - 1, detector)
        if on_row is not None:
            on_row({k: v for k, v in row.items() if not k.startswith("_")})
    chosen = _choose(rows)
    assert best is not None and best[0] == chosen
    comparison = _real_comparison(rows, chosen, test) if test else None
    for row in rows:
        row.pop("_test_scores", None)
    return TuneResult(
        rows,
        chosen,
        best[1],
        comparison,
        config={
            "model": model,
            "dataset": dataset.name,
            "n_fit_goods": len(fit_goods),
            "n_heldout_goods": len(held),
            "n_synthetic_defects": int(labels.sum()),
            "defect_kinds": list(kinds),
            "seed": seed,
            "rule": "highest synthetic image AUROC (3 decimals), then synthetic AUPRO, then grid order",
        },
    )
