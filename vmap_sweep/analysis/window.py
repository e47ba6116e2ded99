"""Where to zoom into a study's convergence boundary: the window of highest boundary density, and its name.

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

A child study made from a window lives in the folder ``child_name(level, window)`` of its parent:
``zoom-<level>-<hash>`` (hash: 8 hex of the window), so the same window always maps to the same folder.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

import numpy as np

from vmap_sweep.analysis.fractal import boundary_mask
from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import AxisSpec
from vmap_sweep.study.config import StudyConfig

Window = tuple[float, float, float, float]  # (x0, x1, y0, y1) in real axis units
DEFAULT_FRACTION = 1 / 8
_TIE_DIGITS = 9


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
        which = "converged" if c.all() else "not converged"
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


# ----------------------------------------------------------------------------- windows in real units


def check_window(window: Sequence[float]) -> Window:
    try:
        values = tuple(float(v) for v in window)
    except (TypeError, ValueError):
        raise ConfigError(f"--window {window!r}: give four numbers X0 X1 Y0 Y1") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"--window {' '.join(map(str, values))}: give four finite numbers X0 X1 Y0 Y1")
    return values  # type: ignore[return-value]


def axis_window(cfg: StudyConfig) -> Window:
    """A study's own range (x.lo, x.hi, y.lo, y.hi): for a child, the window it zooms into."""
    x, y = cfg.axes
    return (x.lo, x.hi, y.lo, y.hi)


def child_name(level: int, window: Window) -> str:
    digest = hashlib.sha256(json.dumps([float(v) for v in window]).encode()).hexdigest()[:8]
    return f"zoom-{level}-{digest}"


def cell_coords(spec: AxisSpec, n: int) -> np.ndarray:
    """Cell coordinates before int axes are rounded: windows then lie inside the range exactly."""
    return np.geomspace(spec.lo, spec.hi, n) if spec.scale == "log" else np.linspace(spec.lo, spec.hi, n)
