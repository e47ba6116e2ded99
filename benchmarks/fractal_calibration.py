"""Box counting on shapes of known dimension: coverage of the 95% interval and bias per family.

    PYTHONPATH=. python benchmarks/fractal_calibration.py [--resolutions 256 512 1024 2048] [--per 3] [--jobs 2]

The cases (tests/shapes.py ``calibration_cases``: seeded sizes, positions and rotations per family and
resolution) are the ones tests/test_fractal_calibration.py samples. Families in ``shapes.TUNING`` chose the
estimator's constants; the others are held out and summed apart. The table goes to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from shapes import TUNING, calibration_cases  # noqa: E402

from vmap_sweep.analysis.fractal import fractal_dimension  # noqa: E402


def measure(args: tuple[int, tuple[int, ...], int]) -> tuple[str, float, int, float, float, float, float]:
    """(family, true, n, dimension, ci_low, ci_high, octaves) of case ``index``."""
    index, resolutions, per = args
    case = calibration_cases(resolutions, per)[index]
    r = fractal_dimension(case.make())
    return case.family, case.true, case.n, r.dimension, r.ci_low, r.ci_high, r.octaves


def table(rows: list[tuple]) -> str:
    """One line per family: cases, coverage, mean bias (and its range), mean CI half-width; then the splits."""
    by_family: dict[str, list[tuple]] = defaultdict(list)
    for row in rows:
        by_family[row[0]].append(row)
    head = f"{'family':<18} {'true D':>6} {'cases':>5} {'coverage':>8} {'bias':>7} {'bias range':>16} {'CI half':>7}"
    lines = [head, "-" * len(head)]
    split: dict[str, list[bool]] = defaultdict(list)
    for family in sorted(by_family, key=lambda f: (f not in TUNING, f)):
        fam = by_family[family]
        err = np.array([d - true for _, true, _, d, *_ in fam])
        covered = [lo <= true <= hi for _, true, _, _, lo, hi, _ in fam]
        half = np.mean([(hi - lo) / 2 for *_, lo, hi, _ in fam])
        split["tuning" if family in TUNING else "held out"] += covered
        lines.append(f"{family:<18} {fam[0][1]:>6.3f} {len(fam):>5} {np.mean(covered):>8.0%} {err.mean():>+7.3f} "
                     f"{f'{err.min():+.3f}..{err.max():+.3f}':>16} {half:>7.3f}")
    lines.append("-" * len(head))
    for name in ("tuning", "held out"):
        lines.append(f"coverage, {name} families: {np.mean(split[name]):.0%} of {len(split[name])} cases")
    both = split["tuning"] + split["held out"]
    lines.append(f"coverage, all cases: {np.mean(both):.0%} of {len(both)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", nargs="*", type=int, default=[256, 512, 1024, 2048])
    parser.add_argument("--per", type=int, default=3, help="cases per family and resolution")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    resolutions = tuple(args.resolutions)
    n_cases = len(calibration_cases(resolutions, args.per))
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(measure, [(i, resolutions, args.per) for i in range(n_cases)]))
    print(table(rows))


if __name__ == "__main__":
    main()
