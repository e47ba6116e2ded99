"""Zoom into a study's convergence boundary: pick a window, re-sweep it at the same resolution, repeat.

Window picking (``pick_window``). Coordinates are grid-index units ``t`` along each axis (``t = 0`` at
the first cell, ``n - 1`` at the last; uniform in log space on a log axis). Boundary pixel (j, i) of the
2x2 rule (``fractal.boundary_mask``) is the square ``[i, i+1] x [j, j+1]`` between the four cells it
summarises. A window is ``fraction * (n - 1)`` index units wide per axis (so 1/8 of each axis in log
space for log axes, and a child cell is ``fraction`` of a parent cell). Its *boundary density* is the
share of its area covered by boundary pixels (exact, from an integral image; windows may be smaller
than one pixel on coarse grids).

"Away from the edges": a window must lie in ``[1, n - 2]`` along each axis, i.e. between the second
and the second-to-last cell. It never reaches into an outer edge cell and never counts a boundary
pixel built from one, since a boundary at the edge of the parent range may be the range cut-off rather
than structure of the boundary. A grid whose boundary touches only edge cells raises ConfigError.

The density is piecewise bilinear in the window position, so its maximum over all continuous
positions is attained at a breakpoint (a window side on an integer ``t``) or a range end; those,
plus the positions centred on each pixel, are the candidates. Ties (equal density, rounded to 1e-9)
go to: the higher density of the 3x larger window with the same centre (the thick of the boundary),
then the centre nearest the grid centre (in fractions of each axis), then the lowest y, then the
lowest x. So the result is deterministic.

Folders: a child of the study in ``DIR`` lives in ``DIR/zoom-<level>-<hash>`` (hash: 8 hex of the
window), nested for deeper levels (``DIR/zoom-1-ab12cd34/zoom-2-...``). The same window always maps
to the same folder, so re-running a zoom resumes the unfinished child with ``run_study``; a different
window of the same parent gets its own folder. Each child is registered in its parent
(``store.add_child``, after it has been trained) and records its own level and window in its extra
``zoom_of``; levels are absolute (zooming from a level-1 study makes level-2 children).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from vmap_sweep.analysis.classify import study_criterion
from vmap_sweep.analysis.fractal import boundary_mask, fractal_dimension, pooled_dimension
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.study import study_classes
from vmap_sweep.errors import ConfigError, StoreError, VmapSweepError
from vmap_sweep.run.pipeline import LocalBackend, Progress, build_grid, check_data_unchanged, run_study
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import AxisSpec, parse_axis_spec
from vmap_sweep.study.config import StudyConfig, study_numerics

Window = tuple[float, float, float, float]
ZOOM_EXTRA = "zoom_of"  # a child's own {"level", "window", "parent"} in its extra table
DEFAULT_FRACTION = 1 / 8
_TIE_DIGITS = 9
_MAX_LEVELS = 64  # a chain deeper than this is a cycle in hand-edited databases, not a zoom


# ----------------------------------------------------------------------------- picking a window


def _index_range(n: int, width: float) -> tuple[float, float]:
    """Allowed start positions of a window of ``width`` index units: inside [1, n - 2]."""
    return 1.0, float(n - 2) - width


def _candidates(n: int, width: float) -> np.ndarray:
    lo, hi = _index_range(n, width)
    k = np.arange(n, dtype=np.float64)
    cand = np.concatenate([k, k - width, k + 0.5 - width / 2, [lo, hi]])
    eps = 1e-12 * n
    cand = cand[(cand >= lo - eps) & (cand <= hi + eps)]
    return np.unique(np.clip(cand, lo, hi))


def _integral_at(corner: np.ndarray, ty: np.ndarray, tx: np.ndarray) -> np.ndarray:
    """Boundary area in [0, tx] x [0, ty]: bilinear in each pixel, so interpolating corners is exact."""
    hy, hx = corner.shape[0] - 1, corner.shape[1] - 1
    ty, tx = np.clip(ty, 0.0, hy), np.clip(tx, 0.0, hx)
    j0 = np.minimum(np.floor(ty).astype(np.int64), hy - 1)
    i0 = np.minimum(np.floor(tx).astype(np.int64), hx - 1)
    fy, fx = ty - j0, tx - i0
    return (corner[j0, i0] * (1 - fy) * (1 - fx) + corner[j0 + 1, i0] * fy * (1 - fx)
            + corner[j0, i0 + 1] * (1 - fy) * fx + corner[j0 + 1, i0 + 1] * fy * fx)


def _area(corner: np.ndarray, b: np.ndarray, a: np.ndarray, hy: float, wx: float) -> np.ndarray:
    """Boundary area inside the windows [a, a + wx] x [b, b + hy] (b a column, a a row vector)."""
    return (_integral_at(corner, b + hy, a + wx) - _integral_at(corner, b, a + wx)
            - _integral_at(corner, b + hy, a) + _integral_at(corner, b, a))


def _to_real(values: np.ndarray, log: bool, t: float) -> float:
    lo, hi = float(values[0]), float(values[-1])
    if log:
        return float(math.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)) / (len(values) - 1)))
    return float(lo + t * (hi - lo) / (len(values) - 1))


def check_fraction(fraction: float) -> float:
    f = float(fraction)
    if not (math.isfinite(f) and 0 < f < 1):
        raise ConfigError(f"--fraction {fraction!r}: the window's share of each axis must be in (0, 1), e.g. 0.125")
    return f


def pick_window(converged: np.ndarray, xs: Sequence[float], ys: Sequence[float], x_log: bool, y_log: bool,
                fraction: float = DEFAULT_FRACTION) -> Window:
    """The window (x0, x1, y0, y1), in real units, of highest boundary density away from the edges.

    ``converged``: bool (ny, nx), True = converged; ``xs``/``ys``: the cells' axis values (log axes
    uniform in log space). See the module docstring for the density, "away from the edges" and ties.
    """
    c = np.asarray(converged)
    xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if c.dtype != bool or c.ndim != 2 or c.shape != (ys.size, xs.size):
        raise ConfigError(f"converged array of dtype {c.dtype}, shape {c.shape}: needs a bool (len(ys), len(xs)) = "
                          f"({ys.size}, {xs.size}) mask, True = converged")
    f = check_fraction(fraction)
    ny, nx = c.shape
    wx, hy = f * (nx - 1), f * (ny - 1)
    if nx < 4 or ny < 4 or wx > nx - 3 or hy > ny - 3:
        raise ConfigError(f"--fraction {f:g}: a window of {wx:.3g} x {hy:.3g} cells does not fit between the edge "
                          f"cells of a {nx}x{ny} grid; use a smaller fraction or a parent of at least 4x4")
    boundary = boundary_mask(c)
    if not boundary.any():
        which = "converged" if c.all() else "diverged"
        raise ConfigError(f"grid of {nx}x{ny}: every cell is {which}, so there is no boundary to zoom into; "
                          "widen or move the parent range, or give --window X0 X1 Y0 Y1")
    corner = np.zeros((ny, nx), dtype=np.float64)
    corner[1:, 1:] = np.cumsum(np.cumsum(boundary, axis=0), axis=1)
    a = _candidates(nx, wx)[None, :]
    b = _candidates(ny, hy)[:, None]
    density = _area(corner, b, a, hy, wx) / (wx * hy)
    if density.max() <= 10.0 ** -_TIE_DIGITS:
        raise ConfigError(f"grid of {nx}x{ny}: the boundary touches only the outer edge cells; zoom windows stay "
                          "between them, so widen the parent range or give --window X0 X1 Y0 Y1")
    context = _area(corner, b - hy, a - wx, 3 * hy, 3 * wx) / (9 * wx * hy)
    dist = np.hypot((a + wx / 2) / (nx - 1) - 0.5, (b + hy / 2) / (ny - 1) - 0.5)
    shape = density.shape
    keys = [np.broadcast_to(a, shape).ravel(), np.broadcast_to(b, shape).ravel(),  # least significant first
            np.round(dist, 12).ravel(), -np.round(context, _TIE_DIGITS).ravel(),
            -np.round(density, _TIE_DIGITS).ravel()]
    best = int(np.lexsort(keys)[0])
    jb, ia = np.unravel_index(best, shape)
    ta, tb = float(a[0, ia]), float(b[jb, 0])
    return (_to_real(xs, x_log, ta), _to_real(xs, x_log, ta + wx),
            _to_real(ys, y_log, tb), _to_real(ys, y_log, tb + hy))


# ----------------------------------------------------------------------------- zooming


def check_window(window: Sequence[float]) -> Window:
    try:
        values = tuple(float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(f"--window {window!r}: give four numbers X0 X1 Y0 Y1") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--window {' '.join(map(str, values))}: give four finite numbers X0 X1 Y0 Y1")
    return values  # type: ignore[return-value]


def child_config(cfg: StudyConfig, window: Sequence[float]) -> StudyConfig:
    """The parent's config with x/y replaced by the window (same resolution and everything else)."""
    x0, x1, y0, y1 = check_window(window)
    try:
        grid = build_grid(cfg).window(x0, x1, y0, y1)
    except ConfigError as e:
        raise ConfigError(f"--window {x0:g} {x1:g} {y0:g} {y1:g}: {e}") from None
    return cfg.with_overrides(x=str(grid.x), y=str(grid.y))


def axis_window(cfg: StudyConfig | dict) -> Window:
    """A study's own range (x.lo, x.hi, y.lo, y.hi): for a child, the window it zooms into."""
    d = cfg.to_dict() if isinstance(cfg, StudyConfig) else cfg
    x, y = parse_axis_spec(d["x"]), parse_axis_spec(d["y"])
    return (x.lo, x.hi, y.lo, y.hi)


def child_name(level: int, window: Window) -> str:
    digest = hashlib.sha256(json.dumps([float(v) for v in window]).encode()).hexdigest()[:8]
    return f"zoom-{level}-{digest}"


def study_level(store: StudyStore) -> int:
    """0 for a study made by `run`, else the zoom level it was made at."""
    info = store.get_extra(ZOOM_EXTRA)
    return int(info["level"]) if isinstance(info, dict) and "level" in info else 0


def _finished_classes(store: StudyStore) -> np.ndarray:
    done, total = store.done_count(), store.cell_count()
    if done < total:
        raise ConfigError(f"{store.directory}: {done} of {total} cells are done; finish the study first (the same "
                          "`vmap-sweep run` command resumes it), then zoom")
    return study_classes(store)


def _coords(spec: AxisSpec, n: int) -> np.ndarray:
    """Cell coordinates before int axes are rounded: windows then lie inside the range exactly."""
    return np.geomspace(spec.lo, spec.hi, n) if spec.scale == "log" else np.linspace(spec.lo, spec.hi, n)


def _auto_window(store: StudyStore, fraction: float) -> Window:
    cfg = store.config
    x, y = parse_axis_spec(cfg["x"]), parse_axis_spec(cfg["y"])
    converged = _finished_classes(store)
    try:
        return pick_window(converged, _coords(x, store.nx), _coords(y, store.ny), x.scale == "log",
                           y.scale == "log", fraction)
    except ConfigError as e:
        raise ConfigError(f"{store.directory}: {e}") from None


class _SharedBackend:
    """One backend for every level: children differ from their parent only in x/y, which no backend reads
    (each cell carries its hyperparameters), so the model and data are loaded once per zoom."""

    def __init__(self, factory: Callable[..., Any]):
        self._factory = factory
        self._inner: Any = None

    def __call__(self, cfg: StudyConfig, device: Any, micro_batch_size: int | None = None) -> _Borrowed:
        if self._inner is None:
            self._inner = self._factory(cfg, device, micro_batch_size)
        return _Borrowed(self._inner)

    def close(self) -> None:
        if self._inner is not None:
            self._inner.close()


class _Borrowed:
    def __init__(self, inner: Any):
        self._inner = inner

    def models_per_batch(self, limit: int) -> int:
        return self._inner.models_per_batch(limit)

    def run(self, jobs, started):
        return self._inner.run(jobs, started)

    def close(self) -> None:
        """Closed once by _SharedBackend after the last level."""


def zoom_study(
    parent_dir: str | os.PathLike,
    window: Sequence[float] | None = None,
    depth: int = 1,
    fraction: float = DEFAULT_FRACTION,
    models_per_batch: int | str = 8,
    device: str = "auto",
    progress: Progress | None = None,
    backend_factory: Callable[..., LocalBackend] | None = None,
    *,
    micro_batch_size: int | None = None,
    deterministic: bool = False,
) -> list[Path]:
    """Zoom ``depth`` levels down from a finished study; returns the child study folders, top first.

    Level 1 uses ``window`` (real units) or, when None, the auto-picked one; deeper levels are always
    auto-picked in their parent. Re-running with the same arguments resumes (nothing done is re-trained).
    Errors in the arguments or the top parent raise before anything is written; a deeper level that can't
    be zoomed (say its boundary touches only its edge cells) raises after the levels above it are done and
    recorded. The model and data are loaded once for all levels (one shared backend).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"--depth {depth!r}: give a whole number of levels >= 1")
    fraction = check_fraction(fraction)
    given = check_window(window) if window is not None else None
    shared = _SharedBackend(backend_factory or LocalBackend)
    made: list[Path] = []
    current = Path(parent_dir)
    try:
        for k in range(depth):
            with StudyStore.open(current) as parent:
                # a child computes as its parent did (NUMERICS), so that its cells compare with the parent's
                numerics = study_numerics(parent.get_extra("runtime"))
                cfg = replace(StudyConfig.from_dict(parent.config), numerics=numerics)
                check_data_unchanged(parent, cfg.data)  # a child compares with its parent: the same data
                level = study_level(parent) + 1
                if k == 0 and given is not None:
                    _finished_classes(parent)
                    child_cfg = child_config(cfg, given)
                else:
                    child_cfg = child_config(cfg, _auto_window(parent, fraction))
                child_cfg.validate()
                win = axis_window(child_cfg)
                name = child_name(level, win)
                child_dir = current / name
                # the child's classes follow the parent's criterion: levels of one chain compare
                child = run_study(child_cfg, child_dir, models_per_batch, device, micro_batch_size, None,
                                  deterministic, progress, shared, criterion=study_criterion(parent))
                with child:
                    child.put_extra(ZOOM_EXTRA, {"level": level, "window": list(win), "parent": "..",
                                                 "fraction": fraction if k or given is None else None})
                parent.add_child(win, name, level)
            made.append(child_dir)
            current = child_dir
    finally:
        shared.close()
    return made


# ----------------------------------------------------------------------------- reading a zoom chain


def zoom_levels(parent_dir: str | os.PathLike) -> list[tuple[int, Path, Window]]:
    """(level, folder, window) from ``parent_dir`` (its own level and range first) down its zoom chain.

    Where a study has several zoom children the chain follows the most recently created one (ties: the
    folder name); each window is that study's own range in real units.
    """
    current = Path(parent_dir)
    with StudyStore.open(current) as store:
        chain = [(study_level(store), current, axis_window(store.config))]
        children = store.children()
    seen = {current.resolve()}
    while children:
        c = max(children, key=lambda ch: (ch.created, ch.child_dir))
        nxt = current / c.child_dir
        if nxt.resolve() in seen or len(chain) > _MAX_LEVELS:
            raise StoreError(f"{current}: zoom child {c.child_dir!r} leads back up the chain; remove that entry")
        if not (nxt / "study.db").is_file():
            raise StoreError(f"{current}: zoom child {c.child_dir!r} is recorded but its folder has no study; "
                             "run the zoom again to recreate it")
        seen.add(nxt.resolve())
        with StudyStore.open(nxt) as store:
            children = store.children()
        chain.append((int(c.level), nxt, c.window))
        current = nxt
    return chain


def _axis_span(cfg: dict, n: int, axis: str) -> float:
    """One cell's size along an axis, in log units on a log axis."""
    spec: AxisSpec = parse_axis_spec(cfg[axis])
    if spec.scale == "log":
        return (math.log(spec.hi) - math.log(spec.lo)) / (n - 1)
    return (spec.hi - spec.lo) / (n - 1)




def dimension_report(parent_dir: str | os.PathLike) -> dict:
    """Box-counting dimension of each zoom level and pooled over the levels, as a JSON-ready dict.

    ``scale`` of a level: one of its cells in cells of the top level (geometric mean of the x and y
    ratios, in log units on log axes); auto windows give ``fraction ** level``. A level that can't be
    measured (one class only, unfinished, too small) has ``dimension: null`` and an ``error``; it is left
    out of the pooled fit. Non-finite numbers (e.g. a stderr from two box sizes) are written as null.
    """
    chain = zoom_levels(parent_dir)
    top_cfg: dict | None = None
    top_criterion: dict | None = None
    top_n: tuple[int, int] = (0, 0)
    levels: list[dict] = []
    pool = []
    for level, folder, win in chain:
        entry: dict[str, Any] = {"level": level, "dir": str(folder), "window": list(win)}
        with StudyStore.open(folder) as store:
            cfg = store.config
            if top_cfg is None:
                top_cfg, top_n = cfg, (store.nx, store.ny)
            sx = _axis_span(cfg, store.nx, "x") / _axis_span(top_cfg, top_n[0], "x")
            sy = _axis_span(cfg, store.ny, "y") / _axis_span(top_cfg, top_n[1], "y")
            entry.update(scale=math.sqrt(sx * sy), scale_x=sx, scale_y=sy, resolution=[store.ny, store.nx])
            if top_criterion is None:
                top_criterion = study_criterion(store)
            try:
                if study_criterion(store) != top_criterion:  # other classes draw another boundary
                    raise ConfigError(f"classified by {study_criterion(store)}, level {chain[0][0]} by "
                                      f"{top_criterion}; run `vmap-sweep classify` on the top study (its zoom "
                                      "studies follow)")
                box = fractal_dimension(study_classes(store))
            except VmapSweepError as e:
                entry.update(dimension=None, error=str(e))
            else:
                entry.update(dimension=box.dimension, stderr=box.stderr, ci_low=box.ci_low, ci_high=box.ci_high,
                             fit_range=list(box.fit_range), box_sizes=box.box_sizes, box_counts=box.box_counts,
                             error=None)
                pool.append((box, entry["scale"], level))
        levels.append({k: json_safe(v) for k, v in entry.items()})
    pooled: dict[str, Any]
    if pool:
        try:
            p = pooled_dimension([(box, scale) for box, scale, _ in pool])
        except VmapSweepError as e:
            pooled = {"dimension": None, "error": str(e)}
        else:
            pooled = {"dimension": p.dimension, "stderr": p.stderr, "ci_low": p.ci_low, "ci_high": p.ci_high,
                      "n_points": p.n_points, "size_range": list(p.size_range), "level_slopes": p.level_slopes,
                      "levels": [lv for _, _, lv in pool], "method": p.method, "error": None}
    else:
        pooled = {"dimension": None, "error": "no level could be measured; see each level's error"}
    return {"levels": levels, "pooled": {k: json_safe(v) for k, v in pooled.items()}}
