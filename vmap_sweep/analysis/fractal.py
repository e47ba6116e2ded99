"""Fractal analysis of the convergence boundary: box counting, uncertainty exponent, zoom pooling.

Boundary (Sohl-Dickstein's rule): for a class grid of shape (H, W) the boundary is an
(H-1, W-1) array; pixel (i, j) is boundary iff the 2x2 block ``grid[i:i+2, j:j+2]`` holds both
classes. (Not dilation-xor-erosion, which marks pixels on both sides of an edge.)

Box counting: box sizes are powers of two; a box is occupied if any boundary pixel lies inside.
Grids of any shape (non-square, non-power-of-two) are covered completely: for box size s the
array is padded with False (never boundary) at the bottom and right up to a multiple of s, so the
last row/column of boxes may be partial and no row or column is ever dropped. Counts come from an
integral image, so any lattice costs only O(number of boxes).

Lattice offsets: besides the aligned lattice (boxes from the top-left corner) each size is counted
on ``n_offsets - 1`` lattices shifted by a random (dy, dx) in [0, s)^2, periodically in the padded
domain (the box that runs off the bottom/right wraps to the top/left, so every lattice has the
same number of boxes and no sliver boxes appear at the edges). The fitted count N(s) is the
geometric mean over the lattices. Why: the aligned lattice alone is biased whenever the shape
has structure locked to the pixel grid: the Sierpinski triangle reads 1.68 and the centred Koch
snowflake 1.21 at 1024 with it (table below).
Point estimate: least-squares slope of log2 N(s) on log2 s over the fit range; ``stderr`` is the
OLS slope standard error. Confidence interval: 2.5 / 97.5 percentiles of the slopes fitted to each
single lattice (resampling of lattice offsets; no bootstrap over box sizes). It says how much one
lattice's answer depends on where the boxes sit; it does not include the discretisation bias.

Automatic fit range: sizes s with at least 4 boxes per side along the shorter side
(``ceil(min(h, w) / s) >= 4``, h, w = boundary shape) and s >= 2 (size 1 only sees the pixel
staircase of a rasterised edge) as long as >= 3 sizes remain, else size 1 is kept; with fewer than
2 sizes (>= 2 boxes per side) the grid is too small. Override with ``fit_range=(smallest, largest)``.

Calibration (``PYTHONPATH=. python benchmarks/fractal_calibration.py`` reproduces it; the shapes are in
tests/shapes.py): dimension with defaults (32 lattices; in brackets the aligned lattice alone,
``n_offsets=1``); fit range 2..32 at 128^2 and 2..256 at 1024^2.

====================  =====  ===============  ================
shape                 true   measured at 128  measured at 1024
====================  =====  ===============  ================
filled disk edge      1.000  1.014 (1.001)    1.009 (1.000)
Koch snowflake edge   1.262  1.248 (1.181)    1.258 (1.213)
Sierpinski triangle   1.585  1.608 (1.729)    1.602 (1.677)
coin-flip noise       2.000  1.999 (1.998)    2.000 (2.000)
====================  =====  ===============  ================

So with offset averaging the bias at 128^2 is within about +-0.025 for these shapes (Koch -0.014,
Sierpinski +0.023); the aligned lattice alone is biased low by 0.08 for the Koch edge at 128^2.
Zoom windows of the Koch curve read lower than the whole snowflake (1.19-1.24 at 512^2 per
window, depending on where the window sits) since a window holds a short piece of curve that looks
straight at its largest scales; ``pooled_dimension`` combines zoom levels.

Uncertainty exponent: f(eps) = fraction of grid cell pairs eps apart (horizontal and vertical
pairs pooled) whose classes differ; f ~ eps^phi and dimension = 2 - phi (smooth edge: phi = 1;
noise: phi = 0). Measured phi-based dimension: disk 0.973 (128^2) / 0.987 (1024^2), Koch 1.243 /
1.251, noise 2.009 / 2.000. It needs two classes of positive area: for the Sierpinski triangle (a
set of zero area) it reads ~2.03 rather than 1.585.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from vmap_sweep.analysis.stats import ols
from vmap_sweep.errors import ConfigError

MIN_BOXES_PER_SIDE = 4
DEFAULT_OFFSETS = 32
_Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FractalResult:
    """Box-counting estimate. Sizes in pixels of the analysed grid; fit_range inclusive."""

    dimension: float
    stderr: float
    ci_low: float
    ci_high: float
    box_sizes: np.ndarray
    box_counts: np.ndarray  # geometric mean over the lattices, the values fitted
    fit_range: tuple[int, int]
    local_slopes: np.ndarray  # -dlogN/dlogs between consecutive sizes (len(box_sizes) - 1)
    resolution: tuple[int, int]  # shape of the class grid (boundary is one smaller per axis)
    method: str
    aligned_counts: np.ndarray  # integer counts of the offset-0 lattice (boxes from the top-left)
    n_offsets: int = 1
    intercept: float = 0.0  # log2 N at s = 1 of the fitted line

    def fit_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(sizes, counts) inside the fit range."""
        keep = (self.box_sizes >= self.fit_range[0]) & (self.box_sizes <= self.fit_range[1])
        return self.box_sizes[keep], self.box_counts[keep]

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
        out["fit_range"] = list(self.fit_range)
        out["resolution"] = list(self.resolution)
        return out


@dataclass(frozen=True)
class UncertaintyResult:
    """f(eps) ~ eps^phi for the fraction of eps-apart cell pairs in different classes."""

    phi: float
    dimension: float  # 2 - phi
    stderr: float  # OLS standard error of phi (and so of the dimension)
    eps: np.ndarray
    fractions: np.ndarray
    resolution: tuple[int, int]
    method: str = "uncertainty exponent: horizontal+vertical pairs, log-log OLS"


@dataclass(frozen=True)
class PooledResult:
    """Fixed-effects fit over zoom levels: one slope, one intercept per level."""

    dimension: float
    stderr: float
    ci_low: float  # dimension -/+ 1.96 stderr (normal approximation)
    ci_high: float
    intercepts: np.ndarray  # per level, log2 N at parent-unit size 1
    level_slopes: np.ndarray  # each level's own OLS dimension (nan with < 2 sizes)
    n_points: int
    size_range: tuple[float, float]  # smallest and largest box used, in parent (level-0) pixels
    method: str = field(default="box counting pooled over zoom levels: shared slope, per-level intercepts (OLS)")


# ----------------------------------------------------------------------------- input checks


def _as_class_grid(array: ArrayLike) -> np.ndarray:
    """Bool mask (True = converged) or signed score (negative = converged) -> bool grid."""
    arr = np.asarray(array)
    hint = "pass a 2-D boolean mask (True = converged) or a 2-D signed score (negative = converged)"
    if arr.dtype.kind in "USO":
        raise ConfigError(f"array of {arr.dtype} labels: {hint}; turn labels into a mask with classify.converged_mask")
    if arr.ndim != 2:
        raise ConfigError(f"array of shape {arr.shape}: not 2-D; {hint}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ConfigError(f"array of shape {arr.shape}: smaller than 2x2, no 2x2 block to hold a boundary; {hint}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ConfigError(f"array of dtype {arr.dtype}: {hint}")
    if not np.isfinite(arr).all():
        raise ConfigError(
            f"score array has {int((~np.isfinite(arr)).sum())} non-finite values; "
            "pass finite scores or a boolean mask (True = converged)"
        )
    return arr < 0


def _check_two_classes(grid: np.ndarray) -> None:
    n_conv = int(grid.sum())
    if n_conv == 0 or n_conv == grid.size:
        which = "converged" if n_conv else "diverged"
        raise ConfigError(
            f"grid of shape {grid.shape}: every cell is {which}, so there is no boundary to measure; "
            "widen or move the grid until it holds both classes"
        )


def _as_occupied(array: ArrayLike) -> np.ndarray:
    arr = np.asarray(array)
    if arr.dtype != bool or arr.ndim != 2 or arr.size == 0:
        raise ConfigError(
            f"boundary array of dtype {arr.dtype}, shape {arr.shape}: box_counting needs a non-empty 2-D "
            "boolean array of boundary pixels; use fractal_dimension for a class mask or score"
        )
    if not arr.any():
        raise ConfigError(f"boundary array of shape {arr.shape} has no boundary pixels; the grid holds one class only")
    return arr


# ----------------------------------------------------------------------------- boundary


def boundary_mask(converged: ArrayLike) -> np.ndarray:
    """(H, W) class grid -> (H-1, W-1) bool: True where the 2x2 block holds both classes."""
    c = np.asarray(converged)
    if c.dtype != bool or c.ndim != 2 or c.shape[0] < 2 or c.shape[1] < 2:
        raise ConfigError(
            f"converged array of dtype {c.dtype}, shape {c.shape}: needs a 2-D boolean mask of at least 2x2"
        )
    a, b, d, e = c[:-1, :-1], c[:-1, 1:], c[1:, :-1], c[1:, 1:]
    return (a | b | d | e) & ~(a & b & d & e)


# ----------------------------------------------------------------------------- box counting


def _integral(occupied: np.ndarray) -> np.ndarray:
    out = np.zeros((occupied.shape[0] + 1, occupied.shape[1] + 1), dtype=np.int64)
    np.cumsum(np.cumsum(occupied, axis=0, dtype=np.int64), axis=1, out=out[1:, 1:])
    return out


def _intervals(n: int, size: int, offset: int) -> tuple[np.ndarray, ...]:
    """Boxes along one axis of the periodic padded domain P = ceil(n / size) * size.

    Box k covers [offset + k*size, offset + (k+1)*size) modulo P; the last box wraps round to
    [0, offset). Returned as two half-open parts (a1, b1), (a2, b2) per box (empty when unused),
    clamped to n for lookups in the integral image of the unpadded array (padding is all False).
    """
    period = -(-n // size) * size
    start = offset + size * np.arange(period // size)
    stop = start + size
    a1, b1 = np.minimum(start, period), np.minimum(stop, period)
    a2, b2 = np.maximum(start, period) - period, np.maximum(stop, period) - period
    return tuple(np.minimum(v, n) for v in (a1, b1, a2, b2))


def _count(integral: np.ndarray, size: int, oy: int = 0, ox: int = 0) -> int:
    """Occupied boxes of one lattice (box size, offset), by integral-image block sums."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    ry, rx = _intervals(h, size, oy), _intervals(w, size, ox)
    total = np.zeros((ry[0].size, rx[0].size), dtype=np.int64)
    for ya, yb in ((ry[0], ry[1]), (ry[2], ry[3])):
        for xa, xb in ((rx[0], rx[1]), (rx[2], rx[3])):
            total += integral[np.ix_(yb, xb)] - integral[np.ix_(ya, xb)]
            total -= integral[np.ix_(yb, xa)] - integral[np.ix_(ya, xa)]
    return int(np.count_nonzero(total))


def _auto_fit_range(sizes: np.ndarray, shape: tuple[int, int]) -> tuple[int, int]:
    short = min(shape)
    ok = sizes[-(-short // sizes) >= MIN_BOXES_PER_SIDE]
    if ok.size < 2:
        ok = sizes[-(-short // sizes) >= 2]
    if ok.size < 2:
        raise ConfigError(
            f"boundary of shape {shape}: too small for box counting (fewer than 2 box sizes with "
            "2+ boxes per side); use a grid of at least 4x4 (16x16 or more for a meaningful fit)"
        )
    if ok.size >= 4 and ok[0] == 1:
        ok = ok[1:]
    return int(ok[0]), int(ok[-1])


def _lattice_counts(integral: np.ndarray, sizes: np.ndarray, n_offsets: int, seed: int) -> np.ndarray:
    """(n_offsets, len(sizes)) occupied-box counts: row 0 the aligned lattice, the rest at random offsets."""
    rng = np.random.default_rng(seed)
    per_lattice = np.empty((n_offsets, sizes.size), dtype=np.int64)
    for j, size in enumerate(int(v) for v in sizes):
        per_lattice[0, j] = _count(integral, size)
        for r in range(1, n_offsets):
            oy, ox = (int(v) for v in rng.integers(0, size, size=2))
            per_lattice[r, j] = per_lattice[0, j] if size == 1 else _count(integral, size, oy, ox)
    return per_lattice


def _lattice_ci(
    dim: float, stderr: float, x: np.ndarray, log_counts: np.ndarray, seed: int
) -> tuple[float, float, str]:
    """95% CI of the dimension and how it was found: the spread of the single-lattice fits when there are
    several lattices (``log_counts`` one row per lattice, fit sizes only), else +-1.96 OLS stderr."""
    n_offsets = log_counts.shape[0]
    if n_offsets > 1:
        dims = np.array([-ols(x, row).slope for row in log_counts])
        ci_low, ci_high = (float(v) for v in np.percentile(dims, [2.5, 97.5]))
        return ci_low, ci_high, (
            f"CI: 2.5-97.5 percentiles of single-lattice fits over {n_offsets} lattices "
            f"(aligned + random periodic offsets, seed {seed})"
        )
    half = _Z95 * stderr if np.isfinite(stderr) else float("nan")
    return dim - half, dim + half, "CI: +-1.96 OLS stderr (aligned lattice only)"


def box_counting(
    boundary: ArrayLike,
    *,
    fit_range: tuple[int, int] | None = None,
    n_offsets: int = DEFAULT_OFFSETS,
    seed: int = 0,
    resolution: tuple[int, int] | None = None,
) -> FractalResult:
    """Box-counting dimension of a 2-D boolean array of occupied (boundary) pixels.

    ``fit_range=(smallest, largest)`` box sizes (powers of two, inclusive) overrides the automatic
    range. ``n_offsets`` lattices per box size: the aligned one plus ``n_offsets - 1`` at random
    offsets (``seed``); 1 gives the aligned lattice alone and CI = estimate +- 1.96 stderr.
    ``resolution`` is only recorded (default: the class grid shape, boundary shape + 1).
    """
    occ = _as_occupied(boundary)
    shape = (int(occ.shape[0]), int(occ.shape[1]))
    if n_offsets < 1:
        raise ConfigError(f"n_offsets={n_offsets}: needs at least 1 (the aligned lattice)")
    integral = _integral(occ)
    sizes = 2 ** np.arange(0, max(1, math.ceil(math.log2(max(shape)))) + 1)

    if fit_range is None:
        lo, hi = _auto_fit_range(sizes, shape)
    else:
        lo, hi = (int(v) for v in fit_range)
        if lo not in sizes or hi not in sizes or hi <= lo:
            raise ConfigError(
                f"fit_range={fit_range!r}: needs two box sizes from {sizes.tolist()} with smallest < largest"
            )

    per_lattice = _lattice_counts(integral, sizes, n_offsets, seed)
    log_counts = np.log2(per_lattice.astype(np.float64))
    mean_log = log_counts.mean(axis=0)

    keep = (sizes >= lo) & (sizes <= hi)
    x = np.log2(sizes[keep].astype(np.float64))
    fit = ols(x, mean_log[keep])
    dim = -fit.slope
    local = -(mean_log[1:] - mean_log[:-1])  # sizes double each step, so dlog2 s = 1
    ci_low, ci_high, ci_method = _lattice_ci(dim, fit.stderr, x, log_counts[:, keep], seed)
    res = resolution if resolution is not None else (shape[0] + 1, shape[1] + 1)
    method = (
        "box counting: 2x2-rule boundary, power-of-two boxes, partial edge boxes counted, "
        f"geometric mean count over {n_offsets} lattice offsets, log-log OLS over sizes {lo}..{hi}; " + ci_method
    )
    return FractalResult(
        dimension=float(dim),
        stderr=float(fit.stderr),
        ci_low=ci_low,
        ci_high=ci_high,
        box_sizes=sizes.astype(np.int64),
        box_counts=2.0**mean_log,
        fit_range=(lo, hi),
        local_slopes=local,
        resolution=(int(res[0]), int(res[1])),
        method=method,
        aligned_counts=per_lattice[0].copy(),
        n_offsets=int(n_offsets),
        intercept=float(fit.intercept),
    )


def fractal_dimension(
    array: ArrayLike,
    *,
    fit_range: tuple[int, int] | None = None,
    n_offsets: int = DEFAULT_OFFSETS,
    seed: int = 0,
) -> FractalResult:
    """Box-counting dimension of the convergence boundary of a class grid.

    ``array``: 2-D boolean mask (True = converged) or 2-D signed score (negative = converged).
    The boundary is taken with the 2x2 rule first (see ``boundary_mask``).
    """
    grid = _as_class_grid(array)
    _check_two_classes(grid)
    return box_counting(
        boundary_mask(grid),
        fit_range=fit_range,
        n_offsets=n_offsets,
        seed=seed,
        resolution=(int(grid.shape[0]), int(grid.shape[1])),
    )


# ----------------------------------------------------------------------------- uncertainty exponent


def uncertainty_exponent(converged: ArrayLike, eps_list: Sequence[int] | None = None) -> UncertaintyResult:
    """Fraction of eps-apart pairs (horizontal and vertical) in different classes ~ eps^phi.

    ``eps_list`` in grid cells; default powers of two up to a sixteenth of the shorter side
    (at least 1, 2, 4). Returns phi, dimension = 2 - phi and the OLS standard error.
    """
    grid = _as_class_grid(converged)
    _check_two_classes(grid)
    h, w = grid.shape
    if eps_list is None:
        top = max(4, min(h, w) // 16)
        eps = 2 ** np.arange(0, int(math.log2(top)) + 1)
    else:
        eps = np.asarray(sorted({int(e) for e in eps_list}), dtype=np.int64)
    if eps.size < 2 or eps[0] < 1 or eps[-1] >= max(h, w):
        raise ConfigError(
            f"eps_list={None if eps_list is None else list(eps_list)}: needs 2+ distinct distances "
            f"in 1..{max(h, w) - 1} grid cells for a grid of shape {grid.shape}"
        )
    fractions = np.empty(eps.size)
    for k, e in enumerate(eps):
        differ = pairs = 0
        if e < w:
            differ += int(np.count_nonzero(grid[:, e:] != grid[:, :-e]))
            pairs += h * (w - e)
        if e < h:
            differ += int(np.count_nonzero(grid[e:, :] != grid[:-e, :]))
            pairs += (h - e) * w
        fractions[k] = differ / pairs
    ok = fractions > 0
    if ok.sum() < 2:
        raise ConfigError(f"grid of shape {grid.shape}: fewer than 2 distances with class changes; pass other eps_list")
    fit = ols(np.log(eps[ok].astype(np.float64)), np.log(fractions[ok]))
    return UncertaintyResult(
        phi=float(fit.slope),
        dimension=float(2.0 - fit.slope),
        stderr=float(fit.stderr),
        eps=eps,
        fractions=fractions,
        resolution=(int(h), int(w)),
    )


# ----------------------------------------------------------------------------- zoom pooling


LevelCounts = FractalResult | tuple[ArrayLike, ArrayLike]


def _level_curve(k: int, item: tuple[LevelCounts, float]) -> tuple[np.ndarray, np.ndarray]:
    """(log2 box size in level-0 pixels, log2 count) of ``levels[k]`` = ``(counts, scale)``."""
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise ConfigError(f"levels[{k}]: expected (counts, scale) with scale = zoom ** -level")
    counts, scale = item
    if isinstance(counts, FractalResult):
        s, n = counts.fit_sizes()
    else:
        s, n = (np.asarray(v, dtype=np.float64).reshape(-1) for v in counts)
    s, n = np.asarray(s, dtype=np.float64), np.asarray(n, dtype=np.float64)
    scale = float(scale)
    if s.size != n.size or s.size == 0 or not (np.all(s > 0) and np.all(n > 0)) or not scale > 0:
        raise ConfigError(f"levels[{k}]: needs equally long positive box sizes and counts and a scale > 0")
    return np.log2(s * scale), np.log2(n)


def pooled_dimension(levels: Sequence[tuple[LevelCounts, float]]) -> PooledResult:
    """One dimension from the box-count curves of several zoom levels.

    Each level is ``(counts, scale)``: ``counts`` a FractalResult (its fit range is used) or
    ``(box_sizes, box_counts)``; ``scale`` the size of one of its pixels in level-0 pixels
    (``zoom ** -level`` for windows 1/zoom per axis at the same resolution).

    Model: ``log2 N[l, i] = a_l - D * log2(size_i * scale_l)`` with one intercept per level. A
    child window holds an unknown share of the whole boundary, so its counts are not comparable
    to its parent's in absolute terms; the intercepts absorb that. Consequently the slope is the
    pooled *within-level* slope: shifting a level's sizes into parent units changes only its
    intercept. The pooling gains points and checks the same slope across scales (the per-level
    slopes are reported); ``size_range`` gives the span of scales covered in parent pixels.
    """
    curves = [_level_curve(k, item) for k, item in enumerate(levels)]
    xs, ys = [x for x, _ in curves], [y for _, y in curves]
    level_slopes = [-ols(x, y).slope if np.unique(x).size >= 2 else float("nan") for x, y in curves]
    if not xs:
        raise ConfigError("levels: empty; pass at least one (counts, scale) pair")
    n_levels = len(xs)
    n_points = int(sum(x.size for x in xs))
    # Fixed effects: demean within each level, then one slope through the origin.
    xd = np.concatenate([x - x.mean() for x in xs])
    yd = np.concatenate([y - y.mean() for y in ys])
    sxx = float((xd**2).sum())
    dof = n_points - n_levels - 1
    if sxx == 0 or dof < 0:
        raise ConfigError("levels: fewer than 2 box sizes per level; pass more sizes per zoom level")
    slope = float((xd * yd).sum() / sxx)
    intercepts = np.array([float(y.mean() - slope * x.mean()) for x, y in zip(xs, ys, strict=True)])
    resid = yd - slope * xd
    stderr = math.sqrt(float((resid**2).sum()) / dof / sxx) if dof > 0 else float("nan")
    dim = -slope
    allx = np.concatenate(xs)
    half = _Z95 * stderr
    return PooledResult(
        dimension=dim,
        stderr=stderr,
        ci_low=dim - half,
        ci_high=dim + half,
        intercepts=intercepts,
        level_slopes=np.array(level_slopes),
        n_points=n_points,
        size_range=(float(2 ** allx.min()), float(2 ** allx.max())),
    )
