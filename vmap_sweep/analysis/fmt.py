"""How numbers read in tables and sentences (the CLI, the rules of thumb, the report): one rule each."""

from __future__ import annotations

import math


def format_ci(lo: float | None, hi: float | None, fmt: str = ".3f") -> str:
    """A confidence interval as "[lo, hi]"; "n/a" where either end is missing or not finite."""
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def format_or_dash(v: float | None, fmt: str = ".3g") -> str:
    """A number in `fmt`; "—" where it is missing or not finite."""
    return "—" if v is None or not math.isfinite(v) else format(v, fmt)


def format_count(v: float) -> str:
    """Whole numbers (token counts, rounded axis values) with thousands separators, others to 4 digits."""
    return f"{v:,.0f}" if float(v).is_integer() and abs(v) < 1e15 else f"{v:.4g}"


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    """ "1 size", "2 sizes": a count and its noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
