"""Two finished studies over the same grid, side by side: which cells changed class, converged shares, the
difference of the boundary's dimension, and the critical LR of both per dataset size.

Comparable: both sweep the same two axes over the same ranges, scales and resolution, so that cell (i, j) is the
same hyperparameter point in both (what differs is what the configs fix: schedule, optimizer, model...). A box-counting
dimension depends on the grid it was measured on (a real trainability mask reads 1.42 at 128^2 and 1.70 at 2048^2),
so studies of different resolutions are refused unless ``across_resolutions``; then only their dimensions (each with
its grid and octaves) and converged shares are set side by side, and no cell is matched.

ΔD = D_B - D_A, each measured by ``fractal_dimension`` (box counting; its 95% CI from the spread over box
lattices). Interval of the difference: the two studies are measured independently, so the half-widths of their
CIs add in quadrature, ΔD +- sqrt(h_A^2 + h_B^2) with h = (ci_high - ci_low) / 2 (a normal approximation).
Critical LR: the first diverging LR per dataset size (analysis/rules.py) of each, and their ratio B / A, when
the axes are an LR and ``tokens``.

The classes are each study's stored ones, or recomputed from the trajectories by a criterion given per side
(`criterion_a`, `criterion_b`: ratio or last20), so one study can be compared with itself across criteria; what
differs then names the criterion, beside any difference of the configs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vmap_sweep.analysis.classify import classify_rows, study_classes
from vmap_sweep.analysis.fractal import fractal_dimension
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.rules import rules_of_thumb
from vmap_sweep.analysis.view import GridView, StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.store import extras
from vmap_sweep.store.db import config_diff, holds_schema
from vmap_sweep.store.levels import MAX_LEVELS, level_dir
from vmap_sweep.study.criterion import CONVERGED
from vmap_sweep.study.refine import level_points


@dataclass(frozen=True)
class Dimension:
    """One study's box-counting dimension, or why there is none (one class, too small a grid)."""

    dimension: float | None
    ci_low: float | None
    ci_high: float | None
    reason: str | None = None
    grid: tuple[int, int] | None = None  # the class grid it was measured on (rows, columns)
    octaves: float | None = None  # of box size, the widest fit window


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
    gained: int | None  # cells converged in B only (None: grids of different resolutions, no cell matched)
    lost: int | None  # cells converged in A only
    dimension_a: Dimension
    dimension_b: Dimension
    delta_d: float | None  # D_B - D_A
    delta_d_ci: tuple[float, float] | None
    crit: list[CritRow]
    notes: list[str] = field(default_factory=list)
    size_unit: str = "tokens"  # what D of the LR_crit rows counts
    views: tuple[GridView, GridView] | None = field(default=None, repr=False, compare=False)  # for the figure

    resolution_b: tuple[int, int] | None = None  # B's (nx, ny) where it differs from A's

    @property
    def changed(self) -> int | None:
        return None if self.gained is None or self.lost is None else self.gained + self.lost

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "views"}
        d["changed"] = self.changed
        return json_safe(d)


def _axes(view: StudyView) -> tuple[str, ...]:
    return str(view.x), str(view.y)


def check_comparable(a: StudyView, b: StudyView, across_resolutions: bool = False) -> None:
    """Refuse, in one line, two studies whose cells are not the same hyperparameter points (with
    ``across_resolutions``, the same axes and ranges at different resolutions pass)."""
    axes_a, axes_b = _axes(a), _axes(b)
    if axes_a != axes_b:
        raise ConfigError(f"{b.directory} sweeps {' x '.join(axes_b)} but {a.directory} sweeps "
                          f"{' x '.join(axes_a)}; compare needs the same axes and ranges (run B with --x "
                          f"{axes_a[0]} --y {axes_a[1]})")
    if (a.nx, a.ny) != (b.nx, b.ny) and not across_resolutions:
        coarser = a if a.nx * a.ny < b.nx * b.ny else b
        finer = b if coarser is a else a
        top, levels = _top(coarser), _levels_to(coarser, finer)
        if top is not None and levels and holds_schema(level_dir(top, levels)):
            fix = f"give {level_dir(top, levels)}, the level of {top} at {finer.nx}x{finer.ny}"
        elif top is not None and levels:
            fix = f"refine {top} to {finer.nx}x{finer.ny} (`vmap-sweep refine {top} --levels {levels}`)"
        else:
            fix = f"run B with --resolution {a.nx}x{a.ny}"
        raise ConfigError(f"{b.directory} has {b.nx}x{b.ny} cells but {a.directory} {a.nx}x{a.ny}; compare needs "
                          "the same resolution: a dimension moves with the grid it is measured on, so a difference "
                          f"would mix resolution into it ({fix}, or pass --across-resolutions to set the two "
                          "dimensions side by side without matching cells)")


def _top(view: StudyView) -> Path | None:
    """The folder a refinement of this study's grid goes on from: a refined study's (from its level), or its own
    where it is a top study; None for a zoom child."""
    if view.inferred is not None:
        return view.directory.parent
    return None if view.level else view.directory


def _levels_to(coarse: StudyView, fine: StudyView) -> int | None:
    """How many levels of refinement take `coarse`'s grid to `fine`'s (each level: n -> 2n - 1 per axis), from
    the study's own grid; None where none does."""
    for levels in range(coarse.refinement_level + 1, MAX_LEVELS + 1):
        more = levels - coarse.refinement_level
        if (level_points(coarse.nx, more), level_points(coarse.ny, more)) == (fine.nx, fine.ny):
            return levels
    return None


def _dimension(converged: np.ndarray) -> Dimension:
    try:
        r = fractal_dimension(converged)
    except ConfigError as e:
        return Dimension(None, None, None, str(e))
    grid = (int(r.resolution[0]), int(r.resolution[1]))
    if r.too_small is not None:
        return Dimension(None, None, None, r.too_small, grid, float(r.octaves))
    return Dimension(float(r.dimension), float(r.ci_low), float(r.ci_high), None, grid, float(r.octaves))


def delta_dimension(a: Dimension, b: Dimension) -> tuple[float | None, tuple[float, float] | None]:
    """D_B - D_A and its 95% interval, half-widths added in quadrature; (None, None) if either is missing."""
    if a.dimension is None or b.dimension is None:
        return None, None
    delta = b.dimension - a.dimension
    half = math.hypot((a.ci_high - a.ci_low) / 2, (b.ci_high - b.ci_low) / 2)
    return delta, (delta - half, delta + half)


def _crit_rows(a: StudyView, b: StudyView, ca: np.ndarray, cb: np.ndarray) -> tuple[list[CritRow], list[str]]:
    unit = _unit(a)
    if _unit(b) != unit:
        return [], [f"A counts its budgets in {unit}, B in {_unit(b)}: LR_crit per dataset size not compared."]
    try:
        ra, rb = rules_of_thumb(a, unit, classes=ca), rules_of_thumb(b, unit, classes=cb)
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


def _unit(view: StudyView) -> str:
    return view.config.budget_unit


COMPARE_CRITERIA = ("ratio", "last20")  # those that take no option (threshold: classify the study, then compare)


def _classes(study: StudyView, criterion: str | None) -> tuple[np.ndarray, GridView, str]:
    """(converged grid, view, criterion name): as stored, or recomputed from the trajectories by `criterion`."""
    if criterion is None:
        return study_classes(study), study.grid, study.criterion_name
    if criterion not in COMPARE_CRITERIA:
        raise ConfigError(f"criterion {criterion!r}: compare recomputes {' or '.join(COMPARE_CRITERIA)}; for "
                          "threshold, `vmap-sweep classify` the study first and compare its stored classes")
    if study.inferred is not None and study.inferred.any():
        raise ConfigError(f"{study.directory}: a refinement level's inferred cells have no trajectory to classify "
                          "again; compare its stored classes (drop the --criterion option for it)")
    got = classify_rows(study.all_rows(), criterion)
    labels = np.full((study.ny, study.nx), "", dtype="<U9")
    scores = np.full((study.ny, study.nx), np.nan)
    for (i, j), (label, score) in got.items():
        labels[j, i], scores[j, i] = label, score
    if (labels == "").any():
        raise ConfigError(f"{study.directory}: {int((labels == '').sum())} cells are pending; finish the run first")
    converged = labels == CONVERGED
    view = replace(study.grid, labels=labels, scores=scores, converged=converged,
                   criterion={"criterion": criterion})
    return converged, view, criterion


def check_criteria(a: StudyView, b: StudyView, mixed: bool) -> list[str]:
    """Refuse two studies classified by different criteria (a cell may change class by the criterion alone),
    unless `mixed`; then the note that says so."""
    ca, cb = a.criterion, b.criterion
    if ca == cb:
        return []
    text = f"A ({a.directory}) is classified by {_criterion(ca)}, B ({b.directory}) by {_criterion(cb)}"
    if not mixed:
        raise ConfigError(f"{text}: a cell could change class by the criterion alone; classify both the same way "
                          f"(`vmap-sweep classify {b.directory} ...` with A's options), or pass --mixed-criteria")
    return [f"{text}: changes of class mix the criterion's with the studies'."]


def _criterion(c: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(c.items()))


def what_differs(a: StudyView, b: StudyView) -> str:
    """What B differs from A in: the config's settings; for one config, what the two runs recorded beside it."""
    if _same_file(a.path, b.path):
        return f"nothing: A and B are the same study ({a.path})"
    mine, theirs = _as_compared(a, b), _as_compared(b, a)
    if mine != theirs:
        return config_diff(mine, theirs)
    if (a.study_id, a.created) == (b.study_id, b.created):
        return "nothing but the folder: B is a copy of A"
    def recorded(view: StudyView, key: str):  # the criterion as it classes the cells: a study never classified
        return view.criterion if key == extras.CRITERION else view.get_extra(key)  # has the default's

    runs = [f"{name}: {_short(va)} -> {_short(vb)}"
            for key in (extras.RUN_SETTINGS, extras.DATA_DIGEST, extras.CRITERION, extras.PROVENANCE)
            for name, va, vb in _differing(key, recorded(a, key), recorded(b, key))]
    return "nothing in the config: the same settings, run twice" + (f" ({'; '.join(runs)})" if runs else "")


def _as_compared(view: StudyView, other: StudyView) -> dict:
    """A study's config as compare sets it beside `other`'s: beside a refinement level, without the eval tokens,
    which a level leaves out (or takes) for its own reasons, not its study's."""
    if view.inferred is None and other.inferred is None:
        return view.raw_config
    return {k: v for k, v in view.raw_config.items() if k != "eval_tokens"}


def _differing(name: str, va: Any, vb: Any) -> list[tuple[str, Any, Any]]:
    """(name, A's, B's) of what differs between two recorded values: for two records, each differing entry by its
    dotted name (shortening a whole record could cut the difference off)."""
    if va == vb:
        return []
    if not (isinstance(va, dict) and isinstance(vb, dict)):
        return [(name, va, vb)]
    return [d for k in sorted(set(va) | set(vb), key=str) for d in _differing(f"{name}.{k}", va.get(k), vb.get(k))]


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _same_file(p: Path, q: Path) -> bool:
    try:
        return os.path.samefile(p, q)
    except OSError:
        return False


def _refined_note(name: str, view: StudyView) -> str:
    inferred = int(view.inferred.sum())
    return (f"{name} is level {view.refinement_level} of a refined study ({view.nx}x{view.ny}): {inferred:,} of its "
            f"{view.nx * view.ny:,} cells have the class inferred from their coarser neighbourhood, not trained.")


def compare_studies(a: StudyView, b: StudyView,
                    criterion_a: str | None = None, criterion_b: str | None = None,
                    across_resolutions: bool = False, mixed_criteria: bool = False) -> CompareResult:
    """Compare two finished studies over the same grid (A is the reference), each by its stored classes or by
    a criterion recomputed from its trajectories (B may be A itself, under another criterion). Stored classes of
    different criteria only with `mixed_criteria`; ``across_resolutions`` compares the dimensions (and converged
    shares) of two grids of the same ranges at different resolutions."""
    check_comparable(a, b, across_resolutions)
    # criteria asked for by name are meant to differ; stored ones that do are refused unless asked
    criteria = check_criteria(a, b, mixed_criteria) if criterion_a is None and criterion_b is None else []
    (ca, va, name_a), (cb, vb, name_b) = _classes(a, criterion_a), _classes(b, criterion_b)
    da, db = _dimension(ca), _dimension(cb)
    delta, ci = delta_dimension(da, db)
    differs = [what_differs(a, b)]
    refined = [_refined_note(name, view) for name, view in (("A", a), ("B", b)) if view.inferred is not None]
    if name_a != name_b and _same_file(a.path, b.path):
        differs = []  # one study under two criteria: the criterion is all that differs
    if name_a != name_b:
        differs.append(f"criterion: {name_a} -> {name_b}")
    if (a.nx, a.ny) != (b.nx, b.ny):
        notes = [f"Resolutions differ (A {a.nx}x{a.ny}, B {b.nx}x{b.ny}, compared as asked): part of ΔD is the "
                 "grid's, not the change between the studies; no cell and no LR_crit compared."]
        return CompareResult(
            a=str(a.directory), b=str(b.directory),
            x_name=a.x.name, y_name=a.y.name,
            resolution=(a.nx, a.ny), differs="; ".join(differs),
            converged_share_a=float(ca.mean()), converged_share_b=float(cb.mean()), gained=None, lost=None,
            dimension_a=da, dimension_b=db, delta_d=delta, delta_d_ci=ci, crit=[], notes=refined + notes,
            resolution_b=(b.nx, b.ny), size_unit=_unit(a))  # no views: grids of two resolutions draw no cell map
    crit, notes = _crit_rows(a, b, ca, cb)
    return CompareResult(
        a=str(a.directory), b=str(b.directory),
        x_name=a.x.name, y_name=a.y.name,
        resolution=(a.nx, a.ny), differs="; ".join(differs),
        converged_share_a=float(ca.mean()), converged_share_b=float(cb.mean()),
        gained=int((~ca & cb).sum()), lost=int((ca & ~cb).sum()),
        dimension_a=da, dimension_b=db, delta_d=delta, delta_d_ci=ci, crit=crit, notes=refined + criteria + notes,
        size_unit=_unit(a), views=(va, vb),
    )
