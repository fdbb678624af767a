"""Drift check on real data: how many test goods does a profile of the training goods flag, and why?

Usage:
    python benchmarks/bench_drift.py [--datasets ../shared/datasets] [--margin 0.25] [-o benchmarks/results]

For each case, builds a `DriftProfile` from `<category>/train/good` and checks every `test/good` image:
- `magnetic_tile/exposure_shift`: its test goods come mostly from an exposure (exp6) no training good has,
  so most should flag (target >= 90 %); the share is also given per acquisition (file-name prefix expN).
- `magnetic_tile/magnetic_tile`: train and test goods share the acquisitions, so few should flag (<= 5 %).
- `lookout_cookies/cookie`: 31 training goods, 14 test goods of the same setup (reported, no target).
Prints a Markdown table (share flagged, the statistic that flags most, ms per image for statistics and
for the check) and writes drift.json to the output folder. For context, two columns that are not the
check: the share flagged with margin 0 (only the per-statistic floors; the most a range check can flag),
and a two-sample Kolmogorov-Smirnov p-value of the test goods' mean grey against the training goods'
(a batch-level shift test, which sees a shift of the distribution that stays inside the range).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

from scipy.stats import ks_2samp

from anomalens.data import list_images, read_image
from anomalens.data.drift import DEFAULT_MARGIN, DriftProfile, image_statistics

ROOT = Path(__file__).resolve().parents[1]
CASES = [  # (category, target as (comparison, share) or None)
    ("magnetic_tile/exposure_shift", (">=", 0.90)),
    ("magnetic_tile/magnetic_tile", ("<=", 0.05)),
    ("lookout_cookies/cookie", None),
]


def statistics_of(folder: Path) -> tuple[list[Path], list[dict], float]:
    """Statistics of every image in the folder, and the mean seconds per image (decoding excluded)."""
    paths = list_images(folder)
    stats, seconds = [], 0.0
    for path in paths:
        image = read_image(path)
        start = time.perf_counter()
        stats.append(image_statistics(image))
        seconds += time.perf_counter() - start
    return paths, stats, seconds / len(paths)


def run_case(category: Path, margin: float) -> dict:
    _, train, train_s = statistics_of(category / "train" / "good")
    start = time.perf_counter()
    profile = DriftProfile.fit(train, margin=margin)
    fit_s = time.perf_counter() - start
    paths, test, test_s = statistics_of(category / "test" / "good")
    start = time.perf_counter()
    flags = [profile.check(s) for s in test]
    check_s = (time.perf_counter() - start) / len(test)
    no_margin = DriftProfile.fit(train, margin=0.0)
    flagged_no_margin = sum(bool(no_margin.check(s)) for s in test)
    by_statistic = Counter(f.statistic for image_flags in flags for f in image_flags)
    groups: dict[str, list[bool]] = {}
    for path, image_flags in zip(paths, flags):
        match = re.match(r"(exp\d+)_", path.name)  # magnetic tile acquisitions (exposures)
        if match:
            groups.setdefault(match.group(1), []).append(bool(image_flags))
    train_groups = Counter(
        m.group(1) for p in list_images(category / "train" / "good") if (m := re.match(r"(exp\d+)_", p.name))
    )
    examples = [f.message for image_flags in flags for f in image_flags][:3]
    return {
        "category": str(category),
        "n_train": len(train),
        "n_test_good": len(test),
        "flagged": sum(bool(f) for f in flags),
        "share_flagged": sum(bool(f) for f in flags) / len(test),
        "flags_by_statistic": dict(by_statistic.most_common()),
        "by_acquisition": {
            g: {"n_test": len(v), "flagged": sum(v), "n_train": train_groups.get(g, 0)}
            for g, v in sorted(groups.items())
        },
        "ranges": profile.ranges,
        "largest_goods_distance": float(profile.nn_distances.max(initial=0.0)),
        "share_flagged_margin_0": flagged_no_margin / len(test),
        "ks_p_mean": float(ks_2samp([s["mean"] for s in train], [s["mean"] for s in test]).pvalue),
        # what evaluate reports: the test goods as one batch against the training goods
        "batch_shift": [shift.message for shift in profile.compare_batch(test)],
        "ms_statistics_train": 1000 * train_s,
        "ms_statistics_test": 1000 * test_s,
        "ms_check": 1000 * check_s,
        "s_fit": fit_s,
        "example_messages": examples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN)
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    rows = []
    for name, target in CASES:
        row = run_case(args.datasets / name, args.margin)
        row["target"] = f"{target[0]} {target[1]:.0%}" if target else "-"
        if target:
            share = row["share_flagged"]
            row["target_met"] = share >= target[1] if target[0] == ">=" else share <= target[1]
        rows.append(row)
    print(f"\nmargin {args.margin} (share of the goods' range, plus per-statistic floors)\n")
    print(
        "| set | train goods | test goods | flagged | target | most flagging statistic (images) | "
        "ms/image statistics | ms/image check | flagged at margin 0 | KS p, mean grey |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        top = ", ".join(f"{k} ({v})" for k, v in list(r["flags_by_statistic"].items())[:3]) or "-"
        print(
            f"| {Path(r['category']).relative_to(args.datasets)} | {r['n_train']} | {r['n_test_good']} | "
            f"{r['flagged']} ({r['share_flagged']:.1%}) | {r['target']} | {top} | "
            f"{r['ms_statistics_test']:.2f} | {r['ms_check']:.2f} | {r['share_flagged_margin_0']:.1%} | "
            f"{r['ks_p_mean']:.1e} |"
        )
    for r in rows:
        if r["by_acquisition"]:
            parts = [
                f"{g}: {v['flagged']}/{v['n_test']} (train {v['n_train']})"
                for g, v in r["by_acquisition"].items()
            ]
            print(f"\n{Path(r['category']).name} test goods flagged per acquisition: {'; '.join(parts)}")
        print(f"{Path(r['category']).name} examples: {r['example_messages']}")
        print(f"{Path(r['category']).name} batch test of the test goods: {r['batch_shift'] or 'no shift'}")
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / "drift.json"
    summary = {"margin": args.margin, "load_average": os.getloadavg(), "cases": rows}
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {out}; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
