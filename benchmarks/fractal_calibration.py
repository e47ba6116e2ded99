"""Box counting on shapes of known dimension: coverage of the 95% interval and bias, tuned cases apart from
held-out ones, per resolution and per family; what each term of the interval adds; real training masks.

    nice -n 10 env PYTHONPATH=. python benchmarks/fractal_calibration.py \\
        [--resolutions 32 64 128 256 512 1024 2048] [--per 2] [--jobs 2] [--masks DIR] [--save rows.json]

Cases (tests/shapes.py ``calibration_cases``): ``--per`` seeded cases of every family at every resolution. The
tuned cases are the seed-1 cases (``TUNING_SEED``) of the ``TUNING`` families, the only ones the estimator's
constants were chosen on; the held-out cases are the seed-2 cases (``HELD_OUT_SEED``) of every family, drawn from
a seed fixed before any tuning, plus the seed-1 cases of the families never tuned on. ``--masks DIR`` adds the
trainability masks that benchmarks/sohl_dickstein.py writes (``*.npz``): each mask's finest grid is measured and
its subsamples (every 2nd, 4th ... cell, down to 32 x 32) are checked against that reference; they are reported
apart, since a real boundary has no known dimension and its estimate moves with resolution.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from shapes import HELD_OUT_SEED, SEPARATED, TUNING, TUNING_SEED, calibration_cases  # noqa: E402

from vmap_sweep.analysis import fractal  # noqa: E402

Z95 = 1.959963984540054
FIELDS = ("family", "true", "n", "split", "dimension", "ci_low", "ci_high", "octaves", "window_sd", "lattice_sd",
          "model_sd", "curvature_sd", "drift", "too_small")


def _split(family: str, seed: int) -> str:
    return "tuned" if seed == TUNING_SEED and family in TUNING else "held out"


def _row(family: str, true: float, n: int, split: str, r: fractal.FractalResult) -> dict:
    return dict(family=family, true=true, n=n, split=split, dimension=r.dimension, ci_low=r.ci_low,
                ci_high=r.ci_high, octaves=r.octaves, window_sd=r.window_sd, lattice_sd=r.lattice_sd,
                model_sd=r.model_sd, curvature_sd=r.curvature_sd, drift=r.local_slope_drift,
                too_small=r.too_small is not None)


def measure(args: tuple[int, tuple[int, ...], int, int]) -> dict:
    """One case of ``calibration_cases(resolutions, per, seed)``, measured."""
    index, resolutions, per, seed = args
    case = calibration_cases(resolutions, per, seed)[index]
    return _row(case.family, case.true, case.n, _split(case.family, seed), fractal.fractal_dimension(case.make()))


def measure_masks(directory: Path) -> list[dict]:
    """Every mask in ``directory``'s .npz files at its finest grid (the reference) and subsampled by 2, 4, ...
    down to 32 cells a side; each row's ``true`` is the reference's dimension."""
    rows = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as data:
            for key in sorted(k for k in data.files if k.startswith("mask")):
                mask = data[key].astype(bool)
                ref = fractal.fractal_dimension(mask)
                name = f"{path.stem}:{key}"
                rows.append(_row(name, ref.dimension, mask.shape[0], "reference", ref))
                step = 2
                while mask.shape[0] // step >= 32:
                    sub = mask[::step, ::step]
                    if sub.all() or not sub.any():
                        break
                    rows.append(_row(name, ref.dimension, sub.shape[0], "subsampled",
                                     fractal.fractal_dimension(sub)))
                    step *= 2
    return rows


def _covered(row: dict, stderr: float | None = None) -> bool:
    if stderr is None:
        return row["ci_low"] <= row["true"] <= row["ci_high"]
    return abs(row["dimension"] - row["true"]) <= Z95 * stderr


def _pct(flags: list[bool]) -> str:
    return f"{np.mean(flags):.0%} of {len(flags)}" if flags else "-"


def by_resolution(rows: list[dict]) -> str:
    """Coverage per resolution, tuned and held out apart; mean CI half-width and the bias on separated curves."""
    head = (f"{'grid':>6} {'tuned':>12} {'held out':>12} {'held out, separated':>20} {'bias sep.':>9} "
            f"{'CI half sep.':>12} {'no number':>9}")
    lines = [head, "-" * len(head)]
    for n in sorted({r["n"] for r in rows}):
        at = [r for r in rows if r["n"] == n]
        tuned = [_covered(r) for r in at if r["split"] == "tuned"]
        held = [_covered(r) for r in at if r["split"] == "held out"]
        sep = [r for r in at if r["split"] == "held out" and r["family"] in SEPARATED]
        bias = np.mean([r["dimension"] - r["true"] for r in sep]) if sep else math.nan
        half = np.mean([(r["ci_high"] - r["ci_low"]) / 2 for r in sep]) if sep else math.nan
        small = np.mean([r["too_small"] for r in at])
        lines.append(f"{n:>6} {_pct(tuned):>12} {_pct(held):>12} {_pct([_covered(r) for r in sep]):>20} "
                     f"{bias:>+9.3f} {half:>12.3f} {small:>9.0%}")
    return "\n".join(lines)


def by_family(rows: list[dict], split: str) -> str:
    """One line per family of ``split``: cases, coverage, mean bias and its range, mean CI half-width."""
    fam: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["split"] == split:
            fam[r["family"]].append(r)
    head = f"{'family':<18} {'true D':>6} {'cases':>5} {'coverage':>8} {'bias':>7} {'bias range':>16} {'CI half':>7}"
    lines = [f"{split} cases", head, "-" * len(head)]
    for name in sorted(fam, key=lambda f: (f not in SEPARATED, f)):
        group = fam[name]
        err = np.array([r["dimension"] - r["true"] for r in group])
        half = np.mean([(r["ci_high"] - r["ci_low"]) / 2 for r in group])
        lines.append(f"{name:<18} {group[0]['true']:>6.3f} {len(group):>5} "
                     f"{np.mean([_covered(r) for r in group]):>8.0%} {err.mean():>+7.3f} "
                     f"{f'{err.min():+.3f}..{err.max():+.3f}':>16} {half:>7.3f}")
    return "\n".join(lines)


def terms(rows: list[dict]) -> str:
    """Held-out coverage with the interval's terms added one at a time (same point estimates)."""
    held = [r for r in rows if r["split"] == "held out"]
    steps = [
        ("window + lattice + end effects", lambda r: (r["window_sd"], r["lattice_sd"])),
        ("+ half the small-box correction", lambda r: (r["window_sd"], r["lattice_sd"], r["model_sd"] / 2)),
        ("+ the correction in full", lambda r: (r["window_sd"], r["lattice_sd"], r["model_sd"])),
        ("+ curvature (all terms)", lambda r: (r["window_sd"], r["lattice_sd"], r["model_sd"], r["curvature_sd"])),
    ]
    lines = [f"{'interval terms':<34} {'held out':>12} {'separated':>12} {'others':>12} {'CI half sep.':>12}"]
    for name, parts in steps:
        def se(r, parts=parts):
            return math.sqrt(sum(v * v for v in parts(r)) + fractal.END_EFFECT_SD**2)
        sep = [r for r in held if r["family"] in SEPARATED]
        other = [r for r in held if r["family"] not in SEPARATED]
        half = np.mean([Z95 * se(r) for r in sep]) if sep else math.nan
        lines.append(f"{name:<34} {_pct([_covered(r, se(r)) for r in held]):>12} "
                     f"{_pct([_covered(r, se(r)) for r in sep]):>12} {_pct([_covered(r, se(r)) for r in other]):>12} "
                     f"{half:>12.3f}")
    return "\n".join(lines)


def masks_table(rows: list[dict]) -> str:
    head = f"{'mask':<40} {'grid':>5} {'D':>6} {'95% CI':>16} {'octaves':>7} {'covers ref.':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cover = "reference" if r["split"] == "reference" else ("yes" if _covered(r) else "no")
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        lines.append(f"{r['family']:<40} {r['n']:>5} {r['dimension']:>6.3f} {ci:>16} {r['octaves']:>7.1f} {cover:>11}"
                     + ("  (too small: no number printed)" if r["too_small"] else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", nargs="*", type=int, default=[32, 64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--per", type=int, default=2, help="cases per family, resolution and split")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--masks", type=Path, help="folder of .npz masks (benchmarks/sohl_dickstein.py --out)")
    parser.add_argument("--save", type=Path, help="write every measured row as JSON")
    parser.add_argument("--load", type=Path, help="tabulate rows saved by --save instead of measuring")
    args = parser.parse_args()
    if args.load:
        rows = json.loads(args.load.read_text())
    else:
        resolutions = tuple(args.resolutions)
        jobs = [(i, resolutions, args.per, seed) for seed in (TUNING_SEED, HELD_OUT_SEED)
                for i in range(len(calibration_cases(resolutions, args.per, seed)))]
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(measure, jobs, chunksize=4))
    if args.masks:
        rows = [r for r in rows if r["split"] in ("tuned", "held out")] + measure_masks(args.masks)
    if args.save and not args.load:
        args.save.write_text(json.dumps(rows, default=float))
    shapes = [r for r in rows if r["split"] in ("tuned", "held out")]
    print(f"{len(shapes)} shape cases ({sum(r['split'] == 'tuned' for r in shapes)} tuned, "
          f"{sum(r['split'] == 'held out' for r in shapes)} held out)\n")
    print(by_resolution(shapes), "\n")
    print(terms(shapes), "\n")
    print(by_family(shapes, "tuned"), "\n")
    print(by_family(shapes, "held out"))
    real = [r for r in rows if r["split"] in ("reference", "subsampled")]
    if real:
        print("\ntrainability masks (their finest grid is the reference)\n" + masks_table(real))


if __name__ == "__main__":
    main()
