"""Reading a zoom tree: a study, the zoom studies made from its windows, theirs, and so on.

Each zoom child is registered in its parent (``store.add_child``: window, folder relative to the parent,
level) and records its own level and window in its extra ``zoom_of`` (store/extras.py); levels are
absolute (zooming from a level-1 study makes level-2 children).

``zoom_tree`` walks every registered child below a study; ``zoom_levels`` follows one chain down it (the
newest child at each level). Both walk the tree the same way: every recorded child must hold a study, no
child leads back to a folder already visited, and no chain is deeper than ``_MAX_LEVELS`` (a loop in a
hand-edited database, never a zoom). ``dimension_report`` measures the boundary's box-counting dimension
at each level of a chain and pooled over the levels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.fractal import AGREE_P, fractal_dimension, pooled_dimension
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.view import StudyView, stored_config
from vmap_sweep.analysis.window import Window, axis_window, cell_coords, pick_window
from vmap_sweep.errors import ConfigError, StoreError, VmapSweepError
from vmap_sweep.store import extras
from vmap_sweep.store.db import DB_NAME, StudyStore
from vmap_sweep.study.axes import AxisSpec

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


# ----------------------------------------------------------------------------- dimension per level


def _axis_span(axis: AxisSpec, n: int) -> float:
    """One cell's size along an axis, in log units on a log axis."""
    if axis.scale == "log":
        return (math.log(axis.hi) - math.log(axis.lo)) / (n - 1)
    return (axis.hi - axis.lo) / (n - 1)


def _measure_level(view: StudyView, entry: dict[str, Any], top_criterion: dict, top_level: int):
    """Box-count one level into ``entry`` (dimension, CI, counts; or dimension None and the error).
    Returns the FractalResult, or None where the level can't be measured."""
    try:
        if view.criterion != top_criterion:  # other classes draw another boundary
            raise ConfigError(f"classified by {view.criterion}, level {top_level} by {top_criterion}; "
                              "run `vmap-sweep classify` on the top study (its zoom studies follow)")
        box = fractal_dimension(study_classes(view))
    except VmapSweepError as e:
        entry.update(dimension=None, error=str(e))
        return None
    entry.update(dimension=box.dimension, stderr=box.stderr, ci_low=box.ci_low, ci_high=box.ci_high,
                 fit_range=list(box.fit_range), octaves=box.octaves, warnings=list(box.warnings),
                 box_sizes=box.box_sizes, box_counts=box.box_counts, too_small=box.too_small, error=None)
    return box


def pool_small_reason(levels: list[int]) -> str:
    names = ", ".join(str(v) for v in levels)
    return f"level{'s' if len(levels) > 1 else ''} {names}"


def _pooled(pool: list[tuple[Any, float, int]]) -> dict[str, Any]:
    """The fixed-effects dimension over the measured levels ``(box, scale, level)`` that are large enough to
    measure, JSON-ready; levels whose dimensions disagree (chi^2 test, p < AGREE_P) are not pooled."""
    if not pool:
        return {"dimension": None, "error": "no level could be measured; see each level's error"}
    small = [lv for box, _, lv in pool if box.too_small is not None]
    pool = [item for item in pool if item[0].too_small is None]
    if not pool:
        return {"dimension": None, "too_small_levels": small,
                "error": f"every level is too small a map to measure a dimension ({pool_small_reason(small)}); "
                         "sweep 128x128 or more per level"}
    try:
        p = pooled_dimension([(box, scale) for box, scale, _ in pool])
    except VmapSweepError as e:
        return {"dimension": None, "error": str(e)}
    if len(pool) > 1 and p.agreement_p < AGREE_P:
        apart = ", ".join(f"level {lv}: {box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}]"
                          for box, _, lv in pool)
        return {"dimension": None, "disagree": True, "agreement_p": p.agreement_p, "birge_ratio": p.birge_ratio,
                "levels": [lv for _, _, lv in pool], "too_small_levels": small,
                "error": f"the levels disagree (chi-squared test of one shared dimension: p = {p.agreement_p:.2g}), "
                         f"so they are reported apart, not pooled: {apart}; the dimension changes with the scale "
                         "or the grid"}
    pooled = {"dimension": p.dimension, "stderr": p.stderr, "ci_low": p.ci_low, "ci_high": p.ci_high,
              "n_points": p.n_points, "size_range": list(p.size_range), "level_slopes": p.level_slopes,
              "level_stderrs": p.level_stderrs, "birge_ratio": p.birge_ratio,
              "levels": [lv for _, _, lv in pool], "method": p.method, "agreement_p": p.agreement_p,
              "too_small_levels": small, "error": None}
    return {k: json_safe(v) for k, v in pooled.items()}


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


def dimension_report(parent_dir: str | os.PathLike) -> dict:
    """``chain_dimensions`` of the zoom chain below ``parent_dir``."""
    return chain_dimensions(load_zoom_chain(parent_dir))


def chain_dimensions(chain: list[ZoomLevel]) -> dict:
    """Box-counting dimension of each zoom level and pooled over the levels, as a JSON-ready dict.

    ``scale`` of a level: one of its cells in cells of the top level (geometric mean of the x and y
    ratios, in log units on log axes); auto windows give ``fraction ** level``. A level that can't be
    measured (one class only, unfinished, too small, classified by another criterion than the top) has
    ``dimension: null`` and an ``error``; it is left out of the pooled fit. Non-finite numbers (e.g. a
    stderr from two box sizes) are written as null.
    """
    top = chain[0].view
    levels: list[dict] = []
    pool = []
    for z in chain:
        view = z.view
        entry: dict[str, Any] = {"level": z.level, "dir": str(z.folder), "window": list(z.window)}
        sx = _axis_span(view.x, view.nx) / _axis_span(top.x, top.nx)
        sy = _axis_span(view.y, view.ny) / _axis_span(top.y, top.ny)
        entry.update(scale=math.sqrt(sx * sy), scale_x=sx, scale_y=sy, resolution=[view.ny, view.nx])
        box = _measure_level(view, entry, top.criterion, chain[0].level)
        if box is not None:
            pool.append((box, entry["scale"], z.level))
        levels.append({k: json_safe(v) for k, v in entry.items()})
    return {"levels": levels, "pooled": _pooled(pool)}
