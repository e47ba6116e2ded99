"""Box counting on shapes of known dimension: the calibration table in vmap_sweep.analysis.fractal's docstring.

    PYTHONPATH=. python benchmarks/fractal_calibration.py [RESOLUTION ...]   (default 128 1024)

The shapes (disk, Koch snowflake, Sierpinski triangle, coin-flip noise) live in tests/shapes.py, where the
tests that check this table against the docstring use them too; this script only prints their measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from shapes import calibrate  # noqa: E402

NAMES = {
    "disk": "filled disk edge",
    "koch": "Koch snowflake edge",
    "sierpinski": "Sierpinski triangle",
    "noise": "coin-flip noise",
}


def table(result: dict, resolutions: list[int]) -> str:
    """reStructuredText table: true dimension, then per resolution the offset-averaged (aligned) estimate."""
    head = ["shape", "true"] + [f"measured at {n}" for n in resolutions]
    cols = [20, 5] + [max(15, len(h)) for h in head[2:]]
    rule = "  ".join("=" * c for c in cols)
    lines = [rule, "  ".join(h.ljust(c) for h, c in zip(head, cols, strict=True)).rstrip(), rule]
    for key, name in NAMES.items():
        row = [name, f"{result[key]['true']:.3f}"]
        row += [f"{result[key][n]['dimension']:.3f} ({result[key][n]['aligned']:.3f})" for n in resolutions]
        lines.append("  ".join(v.ljust(c) for v, c in zip(row, cols, strict=True)).rstrip())
    lines.append(rule)
    fits = ", ".join(f"{n}: {result['disk'][n]['fit_range'][0]}..{result['disk'][n]['fit_range'][1]}"
                     for n in resolutions)
    return "\n".join(lines) + f"\nfit ranges (box sizes) {fits}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("resolutions", nargs="*", type=int, default=[128, 1024])
    args = parser.parse_args()
    print(table(calibrate(tuple(args.resolutions)), args.resolutions))


if __name__ == "__main__":
    main()
