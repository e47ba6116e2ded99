"""Two finished studies over the same grid, side by side: which cells changed class, converged shares, the
difference of the boundary's dimension, and the critical LR of both per dataset size.

Comparable: both sweep the same two axes over the same ranges, scales and resolution, so that cell (i, j) is the
same hyperparameter point in both (what differs is what the configs fix: schedule, optimizer, model...).

ΔD = D_B - D_A, each measured by ``fractal_dimension`` (box counting; its 95% CI from the spread over box
lattices). Interval of the difference: the two studies are measured independently, so the half-widths of their
CIs add in quadrature, ΔD +- sqrt(h_A^2 + h_B^2) with h = (ci_high - ci_low) / 2 (a normal approximation).
Critical LR: the first diverging LR per dataset size (analysis/rules.py) of each, and their ratio B / A, when
the axes are an LR and ``tokens``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.fractal import fractal_dimension
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.rules import rules_of_thumb
from vmap_sweep.analysis.view import GridView, grid_view
from vmap_sweep.errors import ConfigError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore, config_diff
from vmap_sweep.study.axes import parse_axis_spec

AXIS_KEYS = ("x", "y")


@dataclass(frozen=True)
class Dimension:
    """One study's box-counting dimension, or why there is none (one class, too small a grid)."""

    dimension: float | None
    ci_low: float | None
    ci_high: float | None
    reason: str | None = None


@dataclass(frozen=True)
class CritRow:
    """Per dataset size: LR_crit (first diverging LR) of A and B and B / A; None where censored."""

    size: float
    lr_crit_a: float | None
    lr_crit_b: float | None
    ratio: float | None


@dataclass
class CompareResult:
    a: str
    b: str
    x_name: str
    y_name: str
    resolution: tuple[int, int]
    differs: str  # what the two configs differ in (config_diff), for the reader
    converged_share_a: float
    converged_share_b: float
    gained: int  # cells converged in B only
    lost: int  # cells converged in A only
    dimension_a: Dimension
    dimension_b: Dimension
    delta_d: float | None  # D_B - D_A
    delta_d_ci: tuple[float, float] | None
    crit: list[CritRow]
    notes: list[str] = field(default_factory=list)
    views: tuple[GridView, GridView] | None = field(default=None, repr=False, compare=False)  # for the figure

    @property
    def changed(self) -> int:
        return self.gained + self.lost

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "views"}
        d["changed"] = self.changed
        return json_safe(d)

    def summary(self) -> list[str]:
        """The findings in sentences (the CLI and the report)."""
        n = self.resolution[0] * self.resolution[1]
        lines = [f"B differs from A in: {self.differs or 'nothing but the folder'}.",
                 f"Converged share: A {self.converged_share_a:.1%}, B {self.converged_share_b:.1%} "
                 f"({self.changed} of {n} cells changed class: {self.gained} converge only in B, "
                 f"{self.lost} only in A)."]
        if self.delta_d is None:
            why = "; ".join(f"{k}: {d.reason}" for k, d in (("A", self.dimension_a), ("B", self.dimension_b))
                            if d.reason)
            lines.append(f"ΔD not measured ({why}).")
        else:
            lo, hi = self.delta_d_ci
            lines.append(f"Boundary dimension: A {_dim(self.dimension_a)}, B {_dim(self.dimension_b)}; "
                         f"ΔD = D_B - D_A = {self.delta_d:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]"
                         + (" (contains 0: no shift shown)." if lo <= 0 <= hi else "."))
        ratios = [r.ratio for r in self.crit if r.ratio is not None]
        if ratios:
            g = math.exp(float(np.mean(np.log(ratios))))
            lines.append(f"LR_crit(B) / LR_crit(A): geometric mean {g:.3g}x over {len(ratios)} dataset sizes "
                         f"(range {min(ratios):.3g}x to {max(ratios):.3g}x).")
        return lines + self.notes

    def crit_rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["D (tokens)", "LR_crit A", "LR_crit B", "B / A"]
        return header, [[f"{r.size:,.0f}", _g(r.lr_crit_a), _g(r.lr_crit_b), _g(r.ratio)] for r in self.crit]


def _g(v: float | None) -> str:
    return "censored" if v is None else f"{v:.3g}"


def _dim(d: Dimension) -> str:
    return f"{d.dimension:.3f} [{d.ci_low:.3f}, {d.ci_high:.3f}]"


def _axes(store: StudyStore) -> tuple[str, ...]:
    return tuple(str(parse_axis_spec(store.config[k])) for k in AXIS_KEYS)


def check_comparable(a: StudyStore, b: StudyStore) -> None:
    """Refuse, in one line, two studies whose cells are not the same hyperparameter points."""
    axes_a, axes_b = _axes(a), _axes(b)
    if axes_a != axes_b:
        raise ConfigError(f"{b.directory} sweeps {' x '.join(axes_b)} but {a.directory} sweeps "
                          f"{' x '.join(axes_a)}; compare needs the same axes and ranges (run B with --x "
                          f"{axes_a[0]} --y {axes_a[1]})")
    if (a.nx, a.ny) != (b.nx, b.ny):
        raise ConfigError(f"{b.directory} has {b.nx}x{b.ny} cells but {a.directory} {a.nx}x{a.ny}; compare needs "
                          f"the same resolution (run B with --resolution {a.nx}x{a.ny})")


def _dimension(converged: np.ndarray) -> Dimension:
    try:
        r = fractal_dimension(converged)
    except ConfigError as e:
        return Dimension(None, None, None, str(e))
    return Dimension(float(r.dimension), float(r.ci_low), float(r.ci_high))


def delta_dimension(a: Dimension, b: Dimension) -> tuple[float | None, tuple[float, float] | None]:
    """D_B - D_A and its 95% interval, half-widths added in quadrature; (None, None) if either is missing."""
    if a.dimension is None or b.dimension is None:
        return None, None
    delta = b.dimension - a.dimension
    half = math.hypot((a.ci_high - a.ci_low) / 2, (b.ci_high - b.ci_low) / 2)
    return delta, (delta - half, delta + half)


def _crit_rows(a: StudyStore, b: StudyStore) -> tuple[list[CritRow], list[str]]:
    try:
        ra, rb = rules_of_thumb(a), rules_of_thumb(b)
    except ConfigError:
        return [], ["LR_crit per dataset size needs an LR axis and `tokens`; not compared."]
    # matched by size: each study leaves out the sizes that repeat a smaller one's experiment, and two seeds (or
    # data files) of one grid repeat different sizes
    by_a = {r.size: r.lr_first_diverging for r in ra.sizes}
    by_b = {r.size: r.lr_first_diverging for r in rb.sizes}
    rows = []
    for size in sorted(set(by_a) | set(by_b)):
        la, lb = by_a.get(size), by_b.get(size)
        rows.append(CritRow(size, la, lb, None if la is None or lb is None else lb / la))
    notes = []
    for name, only in (("A", set(by_a) - set(by_b)), ("B", set(by_b) - set(by_a))):
        if only:
            other = "B" if name == "A" else "A"
            notes.append(f"{len(only)} dataset size(s) measured only in {name} ({other} counts them as repeats of a "
                         f"smaller size): {', '.join(f'{s:,.0f}' for s in sorted(only))}; no ratio there.")
    return rows, notes


def check_criteria(a: StudyStore, b: StudyStore, mixed: bool) -> list[str]:
    """Refuse two studies classified by different criteria (a cell may change class by the criterion alone),
    unless `mixed`; then the note that says so."""
    ca, cb = extras.criterion(a), extras.criterion(b)
    if ca == cb:
        return []
    text = f"A ({a.directory}) is classified by {_criterion(ca)}, B ({b.directory}) by {_criterion(cb)}"
    if not mixed:
        raise ConfigError(f"{text}: a cell could change class by the criterion alone; classify both the same way "
                          f"(`vmap-sweep classify {b.directory} ...` with A's options), or pass --mixed-criteria")
    return [f"{text}: changes of class mix the criterion's with the studies'."]


def _criterion(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items()))


def what_differs(a: StudyStore, b: StudyStore) -> str:
    """What B differs from A in: the config's settings; for one config, what the two runs recorded beside it."""
    if _same_file(a.path, b.path):
        return f"nothing: A and B are the same study ({a.path})"
    if a.config != b.config:
        return config_diff(a.config, b.config)
    if (a.study_id, a.created) == (b.study_id, b.created):
        return "nothing but the folder: B is a copy of A"
    runs = [f"{key}: {_short(va)} -> {_short(vb)}"
            for key in (extras.RUN_SETTINGS, extras.DATA_DIGEST, extras.CRITERION, extras.PROVENANCE)
            for va, vb in [(a.get_extra(key), b.get_extra(key))] if va != vb]
    return "nothing in the config: the same settings, run twice" + (f" ({'; '.join(runs)})" if runs else "")


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _same_file(p: Path, q: Path) -> bool:
    try:
        return os.path.samefile(p, q)
    except OSError:
        return False


def compare_studies(a: StudyStore | str | os.PathLike, b: StudyStore | str | os.PathLike,
                    mixed_criteria: bool = False) -> CompareResult:
    """Compare two finished, classified studies over the same grid (A is the reference); studies classified by
    different criteria only with `mixed_criteria`."""
    if not isinstance(a, StudyStore):
        with StudyStore.open(a) as opened:
            return compare_studies(opened, b, mixed_criteria)
    if not isinstance(b, StudyStore):
        with StudyStore.open(b) as opened:
            return compare_studies(a, opened, mixed_criteria)
    check_comparable(a, b)
    criteria = check_criteria(a, b, mixed_criteria)
    ca, cb = study_classes(a), study_classes(b)
    da, db = _dimension(ca), _dimension(cb)
    delta, ci = delta_dimension(da, db)
    crit, notes = _crit_rows(a, b)
    return CompareResult(
        a=str(a.directory), b=str(b.directory),
        x_name=parse_axis_spec(a.config["x"]).name, y_name=parse_axis_spec(a.config["y"]).name,
        resolution=(a.nx, a.ny), differs=what_differs(a, b),
        converged_share_a=float(ca.mean()), converged_share_b=float(cb.mean()),
        gained=int((~ca & cb).sum()), lost=int((ca & ~cb).sum()),
        dimension_a=da, dimension_b=db, delta_d=delta, delta_d_ci=ci, crit=crit, notes=criteria + notes,
        views=(grid_view(a), grid_view(b)),
    )
