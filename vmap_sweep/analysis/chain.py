"""Reading a zoom tree: a study, the zoom studies made from its windows, theirs, and so on.

Each zoom child is registered in its parent (``store.add_child``: window, folder relative to the parent,
level) and records its own level and window in its extra ``zoom_of`` (store/extras.py); levels are
absolute (zooming from a level-1 study makes level-2 children).

``zoom_tree`` walks every registered child below a study; ``zoom_levels`` follows one chain down it (the
newest child at each level). Both walk the tree the same way: every recorded child must hold a study, no
child leads back to a folder already visited, and no chain is deeper than ``_MAX_LEVELS`` (a loop in a
hand-edited database, never a zoom). ``dimension_report`` measures the boundary's box-counting dimension
at each level of a chain and pooled over the levels: a ``ChainDimensions`` of one ``LevelDimension`` per
level and a ``PooledDimension``, whose ``to_dict`` is the JSON `zoom-dimension --json` prints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.fractal import AGREE_P, FractalResult, fractal_dimension, pooled_dimension
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.view import StudyView, stored_config
from vmap_sweep.analysis.window import Window, axis_window, cell_coords, pick_window
from vmap_sweep.errors import ConfigError, StoreError, VmapSweepError
from vmap_sweep.store import extras
from vmap_sweep.store.db import DB_NAME, StudyStore, holds_schema, live_run
from vmap_sweep.study.axes import AxisSpec
from vmap_sweep.study.settings import RunSettings

if TYPE_CHECKING:
    from vmap_sweep.store.db import Child

_MAX_LEVELS = 64  # a chain deeper than this is a cycle in hand-edited databases, not a zoom


# ----------------------------------------------------------------------------- a study's place in the tree


def finished_classes(store: StudyStore) -> np.ndarray:
    """The class grid of a study to zoom into: every cell done (else "finish the study first") and classified."""
    done, total = store.done_count(), store.cell_count()
    if done < total:
        raise ConfigError(f"{store.directory}: {done} of {total} cells are done; finish the study first (the same "
                          "`vmap-sweep run` command resumes it), then zoom")
    return study_classes(store)


def auto_window(store: StudyStore, fraction: float) -> Window:
    """The window ``pick_window`` chooses in a finished study."""
    x, y = stored_config(store).axes
    converged = finished_classes(store)
    try:
        return pick_window(converged, cell_coords(x, store.nx), cell_coords(y, store.ny), x.scale == "log",
                           y.scale == "log", fraction)
    except ConfigError as e:
        raise ConfigError(f"{store.directory}: {e}") from None


# ----------------------------------------------------------------------------- walking the tree


def _walk(top: str | os.PathLike, follow: Callable[[list[Child]], list[Child]]) -> list[tuple[Path, Child | None]]:
    """(folder, its record in its parent; None for ``top``), breadth first from ``top`` through the children
    ``follow`` picks from each study's records. Every folder is checked and opened before this returns, so a
    caller that writes only afterwards changes nothing when the tree is broken."""
    top = Path(top)
    found: list[tuple[Path, Child | None]] = [(top, None)]
    depth = {top: 0}
    seen = {top.resolve()}
    for folder, _ in found:  # grows as children are found
        with StudyStore.open(folder) as store:
            children = [(store.child_folder(c), c) for c in follow(store.children())]
            parent_config = store.config
        for child, c in children:
            if child.resolve() in seen or depth[folder] >= _MAX_LEVELS:
                raise StoreError(f"{folder}: zoom child {c.child_dir!r} leads back up the tree; remove that entry")
            if not (child / DB_NAME).is_file():
                raise StoreError(f"{folder}: zoom child {c.child_dir!r} is recorded but its folder has no "
                                 f"{DB_NAME}; run the zoom again to recreate it")
            with StudyStore.open(child) as child_store:
                why = _not_the_child(parent_config, child_store, c)
            if why is not None:
                raise StoreError(f"{folder}: zoom child {c.child_dir!r} holds a study that is not that zoom ({why}); "
                                 "remove that entry, or run the zoom again into a new folder")
            seen.add(child.resolve())
            depth[child] = depth[folder] + 1
            found.append((child, c))
    return found


def _not_the_child(parent_config: dict, child: StudyStore, record: Child) -> str | None:
    """Why the study in a child's folder is not the zoom its parent recorded (window, level, and the parent's
    config with only its axes narrowed to that window), or None."""
    info = extras.zoom_of(child)
    if info is None:
        return "it records no zoom of its own: a study made by `run`"
    if info.get("level") != record.level:
        return f"it is a level-{info.get('level')} zoom, recorded as level {record.level}"
    try:
        window = [float(v) for v in info.get("window")]
        own = axis_window(stored_config(child))
    except (TypeError, ValueError, KeyError, VmapSweepError):
        return "its recorded window can't be read"
    if not (np.allclose(window, record.window, rtol=1e-9, atol=0)
            and np.allclose(own, record.window, rtol=1e-9, atol=0)):
        return f"it sweeps {tuple(float(v) for v in own)}, recorded as window {record.window}"
    differ = sorted(k for k in set(parent_config) | set(child.config)
                    if k not in ("x", "y") and parent_config.get(k) != child.config.get(k))
    if differ:
        return f"its config differs from its parent's in {', '.join(differ)}"
    return None


def zoom_tree(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and every zoom study below it, parents before their children."""
    return [path for path, _ in _walk(folder, lambda children: children)]


def _newest(children: list[Child]) -> list[Child]:
    """The most recently created child (ties: the folder name), or none."""
    return [max(children, key=lambda ch: (ch.created, ch.child_dir))] if children else []


def zoom_levels(parent_dir: str | os.PathLike) -> list[tuple[int, Path, Window]]:
    """(level, folder, window) from ``parent_dir`` (its own level and range first) down its zoom chain.

    Where a study has several zoom children the chain follows the most recently created one (ties: the
    folder name); each window is that study's own range in real units.
    """
    (top, _), *rest = _walk(parent_dir, _newest)
    with StudyStore.open(top) as store:
        chain = [(extras.level(store), top, axis_window(stored_config(store)))]
    return chain + [(int(c.level), folder, c.window) for folder, c in rest]


# ----------------------------------------------------------------------------- results

# The keys of a measured level after its place (level, dir, window, scales, resolution), in the order
# `zoom-dimension --json` writes them.
_MEASURED_KEYS = ("dimension", "stderr", "ci_low", "ci_high", "fit_range", "octaves", "warnings", "box_sizes",
                  "box_counts", "too_small", "error")


@dataclass(frozen=True)
class LevelDimension:
    """One zoom level's box-counting dimension, or why it has none (``error``).

    ``scale``: one of its cells in cells of the top level (geometric mean of ``scale_x`` and ``scale_y``,
    in log units on log axes); auto windows give ``fraction ** level``. A level too small a map for a
    number keeps the numbers it counted, with ``too_small`` saying why they are not a dimension, as
    `fractal` does. Numbers that are not finite (a stderr from two box sizes) are None, as JSON writes them.
    """

    level: int
    folder: Path
    window: Window  # the level's own range in real units
    scale: float
    scale_x: float
    scale_y: float
    resolution: tuple[int, int]  # (ny, nx)
    dimension: float | None = None  # None where the level can't be measured
    stderr: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    fit_range: tuple[int, int] | None = None  # smallest and largest box size of any fit window, in its own cells
    octaves: float | None = None
    warnings: tuple[str, ...] = ()
    box_sizes: tuple[int, ...] = ()
    box_counts: tuple[float, ...] = ()
    too_small: str | None = None  # why the map is too small for a number, else None
    error: str | None = None  # why the level can't be measured (one class only, unfinished, another criterion)

    @property
    def measured(self) -> bool:
        """Box-counted: its numbers are set (though ``too_small`` may say they make no dimension)."""
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """The level as `zoom-dimension --json` writes it: one that can't be measured has only its place,
        ``dimension: null`` and the error."""
        place = {"level": self.level, "dir": str(self.folder), "window": self.window, "scale": self.scale,
                 "scale_x": self.scale_x, "scale_y": self.scale_y, "resolution": self.resolution}
        if not self.measured:
            return json_safe({**place, "dimension": None, "error": self.error})
        return json_safe({**place, **{name: getattr(self, name) for name in _MEASURED_KEYS}})


PoolOutcome = Literal["pooled", "levels_disagree", "all_too_small", "none_measured", "fit_refused"]

# The keys `zoom-dimension --json` writes for each outcome, in order: a pooled number with its fit, levels
# that disagree with their test, otherwise only why there is no number.
_POOLED_KEYS: dict[PoolOutcome, tuple[str, ...]] = {
    "pooled": ("dimension", "stderr", "ci_low", "ci_high", "n_points", "size_range", "level_slopes",
               "level_stderrs", "birge_ratio", "levels", "method", "agreement_p", "too_small_levels", "error"),
    "levels_disagree": ("dimension", "disagree", "agreement_p", "birge_ratio", "levels", "too_small_levels",
                        "error"),
    "all_too_small": ("dimension", "too_small_levels", "error"),
    "none_measured": ("dimension", "error"),
    "fit_refused": ("dimension", "error"),
}


@dataclass(frozen=True)
class PooledDimension:
    """The dimension pooled over a chain's measured levels (analysis.fractal.pooled_dimension), or, with
    ``dimension`` None, why there is none: ``outcome`` names the case and ``error`` says it to a reader.
    Numbers that are not finite are None."""

    outcome: PoolOutcome
    dimension: float | None = None
    error: str | None = None
    stderr: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    n_points: int | None = None  # box sizes fitted over all levels
    size_range: tuple[float, float] | None = None  # smallest and largest box used, in top-level cells
    level_slopes: tuple[float, ...] = ()  # each pooled level's own dimension
    level_stderrs: tuple[float, ...] = ()
    birge_ratio: float | None = None
    levels: tuple[int, ...] = ()  # the levels pooled, or compared where they disagree
    method: str | None = None
    agreement_p: float | None = None  # chi^2 test of one shared dimension; below AGREE_P they disagree
    too_small_levels: tuple[int, ...] = ()  # measured, but too small a map to pool

    @property
    def disagree(self) -> bool:
        """The levels' dimensions differ beyond their errors, so they are reported apart."""
        return self.outcome == "levels_disagree"

    def to_dict(self) -> dict[str, Any]:
        """As `zoom-dimension --json` writes it: only the keys of its outcome."""
        return json_safe({name: getattr(self, name) for name in _POOLED_KEYS[self.outcome]})


@dataclass(frozen=True)
class ChainDimensions:
    """The box-counting dimension of each level of a zoom chain, top first, and pooled over the levels."""

    levels: tuple[LevelDimension, ...]
    pooled: PooledDimension
    begun: tuple[BegunZoom, ...] = ()  # zoom studies below the deepest level, begun and not finished

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `zoom-dimension --json` prints."""
        return {"levels": [lv.to_dict() for lv in self.levels], "pooled": self.pooled.to_dict(),
                "begun": [{"dir": str(b.folder), "window": list(b.window)} for b in self.begun]}


@dataclass(frozen=True)
class BegunZoom:
    """A zoom study begun and not finished: its folder, its window and the run settings it was trained with,
    which the command that finishes it names."""

    folder: Path
    window: Window
    settings: RunSettings | None


def begun_zooms(folder: str | os.PathLike, children: Sequence[Child] | None = None) -> list[BegunZoom]:
    """Zoom studies in `folder` that were begun and not finished (killed): a zoom records its child in the parent
    once the child is trained. One training now is not listed (its run finishes it), nor a folder that can't be
    read as a study. children: the parent's recorded ones, where the caller has the parent open."""
    found = [p for p in sorted(Path(folder).glob("zoom-*")) if holds_schema(p)]
    if not found:
        return []
    if children is None:
        with StudyStore.open(folder) as store:
            children = store.children()
    known = {(Path(folder) / c.child_dir).resolve() for c in children}
    begun = []
    for path in found:
        if path.resolve() in known or live_run(path) is not None:
            continue
        try:
            with StudyStore.open(path) as child:
                begun.append(BegunZoom(path, axis_window(stored_config(child)), extras.run_settings(child)))
        except VmapSweepError:  # not this tool's study, or damaged: a command given that folder names why
            continue
    return begun


def _json_tuple(values) -> tuple:
    """A sequence (numpy array, tuple) as a tuple of JSON values: Python numbers, non-finite floats None."""
    return tuple(json_safe(list(values)))


# ----------------------------------------------------------------------------- dimension per level


def _axis_span(axis: AxisSpec, n: int) -> float:
    """One cell's size along an axis, in log units on a log axis."""
    if axis.scale == "log":
        return (math.log(axis.hi) - math.log(axis.lo)) / (n - 1)
    return (axis.hi - axis.lo) / (n - 1)


def _box_count(view: StudyView, top_criterion: dict, top_level: int) -> FractalResult:
    """Box-count one level; a VmapSweepError says why it can't be measured."""
    if view.criterion != top_criterion:  # other classes draw another boundary
        raise ConfigError(f"classified by {view.criterion}, level {top_level} by {top_criterion}; "
                          "run `vmap-sweep classify` on the top study (its zoom studies follow)")
    return fractal_dimension(study_classes(view))


def _with_box(place: LevelDimension, box: FractalResult) -> LevelDimension:
    """``place`` with the numbers box counting gave it."""
    return replace(place, dimension=json_safe(box.dimension), stderr=json_safe(box.stderr),
                   ci_low=json_safe(box.ci_low), ci_high=json_safe(box.ci_high),
                   fit_range=_json_tuple(box.fit_range), octaves=json_safe(box.octaves),
                   warnings=tuple(box.warnings), box_sizes=_json_tuple(box.box_sizes),
                   box_counts=_json_tuple(box.box_counts), too_small=box.too_small, error=None)


def pool_small_reason(levels: Sequence[int]) -> str:
    names = ", ".join(str(v) for v in levels)
    return f"level{'s' if len(levels) > 1 else ''} {names}"


def _pooled(pool: list[tuple[FractalResult, float, int]]) -> PooledDimension:
    """The fixed-effects dimension over the measured levels ``(box, scale, level)`` that are large enough to
    measure; levels whose dimensions disagree (chi^2 test, p < AGREE_P) are not pooled."""
    if not pool:
        return PooledDimension("none_measured", error="no level could be measured; see each level's error")
    small = tuple(lv for box, _, lv in pool if box.too_small is not None)
    pool = [item for item in pool if item[0].too_small is None]
    if not pool:
        return PooledDimension("all_too_small", too_small_levels=small,
                               error=f"every level is too small a map to measure a dimension "
                                     f"({pool_small_reason(small)}); sweep 128x128 or more per level")
    try:
        p = pooled_dimension([(box, scale) for box, scale, _ in pool])
    except VmapSweepError as e:
        return PooledDimension("fit_refused", error=str(e))
    levels = tuple(lv for _, _, lv in pool)
    if len(pool) > 1 and p.agreement_p < AGREE_P:
        apart = ", ".join(f"level {lv}: {box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}]"
                          for box, _, lv in pool)
        return PooledDimension(
            "levels_disagree", agreement_p=json_safe(p.agreement_p), birge_ratio=json_safe(p.birge_ratio),
            levels=levels, too_small_levels=small,
            error=f"the levels disagree (chi-squared test of one shared dimension: p = {p.agreement_p:.2g}), so "
                  f"they are reported apart, not pooled: {apart}; the dimension changes with the scale or the grid")
    return PooledDimension(
        "pooled", dimension=json_safe(p.dimension), stderr=json_safe(p.stderr), ci_low=json_safe(p.ci_low),
        ci_high=json_safe(p.ci_high), n_points=json_safe(p.n_points), size_range=_json_tuple(p.size_range),
        level_slopes=_json_tuple(p.level_slopes), level_stderrs=_json_tuple(p.level_stderrs),
        birge_ratio=json_safe(p.birge_ratio), levels=levels, method=p.method,
        agreement_p=json_safe(p.agreement_p), too_small_levels=small)


@dataclass
class ZoomLevel:
    level: int
    folder: Path
    window: Window  # the level's own range in real units
    view: StudyView


def load_zoom_chain(parent_dir: str | os.PathLike) -> list[ZoomLevel]:
    """Every study of ``parent_dir``'s zoom chain (zoom_levels), read: the one place the measures of a chain
    open its studies."""
    return [ZoomLevel(level, folder, win, StudyView.load(folder)) for level, folder, win in zoom_levels(parent_dir)]


def dimension_report(parent_dir: str | os.PathLike) -> ChainDimensions:
    """``chain_dimensions`` of the zoom chain below ``parent_dir``, and the zoom begun below its deepest level."""
    chain = load_zoom_chain(parent_dir)
    return replace(chain_dimensions(chain), begun=tuple(begun_zooms(chain[-1].folder)))


def chain_dimensions(chain: list[ZoomLevel]) -> ChainDimensions:
    """Box-counting dimension of each zoom level and pooled over the levels.

    A level that can't be measured (one class only, unfinished, too small, classified by another criterion
    than the top) has no dimension and an error; it is left out of the pooled fit.
    """
    top = chain[0].view
    levels: list[LevelDimension] = []
    pool = []
    for z in chain:
        view = z.view
        sx = _axis_span(view.x, view.nx) / _axis_span(top.x, top.nx)
        sy = _axis_span(view.y, view.ny) / _axis_span(top.y, top.ny)
        scale = math.sqrt(sx * sy)
        place = LevelDimension(z.level, z.folder, _json_tuple(z.window), json_safe(scale), json_safe(sx),
                               json_safe(sy), _json_tuple((view.ny, view.nx)))
        try:
            box = _box_count(view, top.criterion, chain[0].level)
        except VmapSweepError as e:
            levels.append(replace(place, error=str(e)))
            continue
        pool.append((box, scale, z.level))
        levels.append(_with_box(place, box))
    return ChainDimensions(tuple(levels), _pooled(pool))
