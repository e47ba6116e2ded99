"""Fractal analysis of the convergence boundary: box counting, uncertainty exponent, zoom pooling.

Boundary (Sohl-Dickstein's rule, as in "The boundary of neural network trainability is fractal"): for a
class grid of shape (H, W) the boundary is an (H-1, W-1) array; pixel (i, j) is boundary iff the 2x2
block ``grid[i:i+2, j:j+2]`` holds both classes. Each boundary pixel is the unit square between four cell
centres, so a box of s x s boundary pixels is occupied exactly when the class edge crosses that square.

Box counting (``box_counting``), chosen after measuring the shapes in tests/shapes.py:
- Sizes: every integer round(2^(k/4)), four per octave, from 1 to the boundary's extent (its bounding box).
- Lattices: the aligned one plus ``n_offsets - 1`` at random offsets in [0, s)^2; N(s) is the geometric
  mean over lattices. No wrap-around. A box cut by the frame counts by the share of its area inside the
  frame, but only on the sides where the boundary reaches the frame (a window onto a larger boundary:
  exact for noise and straight lines); where it does not (an island) the frame does not cut boxes.
- Fit windows tied to the boundary's extent L = max(bounding-box height, width): every window [a, b] of
  box sizes with a in 2..8, b in L/16..L/6 and b >= 4a (two octaves). Below 2 the pixel staircase
  dominates; above L/6 an island is covered by a handful of boxes and the slope drifts.
- Small-box correction: rasterising loses sub-pixel detail, so a fractal's count falls short at small
  boxes (Koch: local slope 1.13 at s = 2 against 1.26). The finite-size model N(s) = A (s + delta)^-D
  (delta >= 0, one offset fitted on the union of the windows with scipy's bounded scalar minimiser) takes
  it out; a smooth edge gets delta ~ 0. (A shifted power law is the usual finite-size correction to a
  scaling law; Sohl-Dickstein fitted plain box counts of 2-D masks, which reads low on rasterised fractals.)
  It is applied only where the fit spans CORRECTION_OCTAVES (3) or more above box size 2: on fewer it cannot
  be told from a bend of the counts (touching arcs, frontiers), which it would read as a raster shortfall.
- Point estimate: the median over the windows of the slope of log N against log(s + delta).
- Uncertainty (``stderr``; CI = +-1.96 of it), the root sum of squares of five terms: the spread of the
  windows' slopes (fit-range sensitivity, incl. the log-periodic wobble of self-similar sets); the spread
  of single-lattice slopes (where the boxes sit; the OLS slope error with one lattice); the small-box
  correction in full (fitted even where not applied); the curvature, CURVATURE_SHARE x the drift of the local
  slopes across the fit range (upper half minus lower half in log s: a bend every window shares, which their
  spread does not see); 0.003 for finite-window end effects.
- Resolution honesty: ``octaves`` spanned by the widest window, ``local_slopes`` (slope over one octave
  around each size), ``warnings`` (fit under two octaves; local slopes spread over more than 0.2) and
  ``too_small`` (under MEASURABLE_OCTAVES above box size 2, or no two-octave window between the usual ends:
  callers print no number for such a map, only why).

Calibration: ``PYTHONPATH=. python benchmarks/fractal_calibration.py`` prints coverage and bias per resolution
(32-2048 px) and per shape family, tuned cases apart from held-out ones, and what each interval term adds; the
tables and the families out of reach are in benchmarks/RESULTS.md. The constants were chosen on the seed-1 cases
of Koch islands, inward-bump Koch islands, disks, half-planes, noise, Brownian frontiers and percolation hulls;
every family's seed-2 cases, fixed before tuning, and the families never tuned on are held out.

Uncertainty exponent: f(eps) = fraction of grid cell pairs eps apart (horizontal and vertical pairs pooled)
whose classes differ; f ~ eps^phi and dimension = 2 - phi (smooth edge: phi = 1; noise: phi = 0). It needs
two classes of positive area: for the Sierpinski triangle (a set of zero area) it reads ~2.03, not 1.585.

Zoom pooling (``pooled_dimension``): the levels' dimensions combined by inverse-variance weights, the
interval widened when the levels disagree beyond their intervals and never narrower than the best level's
(the levels share the estimator's systematic error, so pooling does not average it away); ``agreement_p``, a
chi^2 test of one shared dimension, tells a caller to report the levels apart instead (analysis.chain does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.stats import chi2 as chi2_dist

from vmap_sweep.analysis.stats import ols
from vmap_sweep.errors import ConfigError

MIN_OCTAVES = 2.0  # a fit window spans at least this many octaves of box size when the boundary allows it
SIZES_PER_OCTAVE = 4
DEFAULT_OFFSETS = 16
SMALLEST_BOX = 2  # size 1 sees only the pixel staircase of the 2x2 rule
LOWER_ENDS = (2, 8)  # window lower ends: box sizes in this range
UPPER_ENDS = (1 / 16, 1 / 6)  # window upper ends: box sizes in this range of the boundary's extent
OFFSET_BOUNDS = (0.0, 3.0)  # the small-box offset delta of N ~ (s + delta)^-D, in pixels
MODEL_SHARE = 1.0  # the small-box correction counted in full as uncertainty: a bend reads like a raster shortfall
CORRECTION_OCTAVES = 3.0  # the offset is fitted only over a fit range of at least this many octaves
CURVATURE_SHARE = 0.5  # the curvature term: this share of the drift of the local slopes across the fit range
END_EFFECT_SD = 0.003  # finite-window end effects (half-planes: +0.002..+0.007), not seen by the other terms
AGREE_P = 0.05  # levels whose chi^2 test of one shared dimension gives p below this are reported apart
MEASURABLE_OCTAVES = 2.5  # under this many octaves a map is too small to report a number (32^2, 64^2)
_Z95 = 1.959963984540054


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FractalResult:
    """Box-counting estimate. Sizes in pixels of the analysed grid; fit_range inclusive."""

    dimension: float
    stderr: float  # combined standard uncertainty (see the module docstring); CI = +-1.96 stderr
    ci_low: float
    ci_high: float
    box_sizes: np.ndarray
    box_counts: np.ndarray  # geometric mean over the lattices, the values fitted
    fit_range: tuple[int, int]  # smallest and largest box size of any fit window
    local_slopes: np.ndarray  # -dlogN/dlogs over one octave around each size (nan where it runs off the sizes)
    resolution: tuple[int, int]  # shape of the class grid (boundary is one smaller per axis)
    method: str
    aligned_counts: np.ndarray  # area-weighted counts of the offset-0 lattice (boxes from the top-left)
    n_offsets: int = 1
    intercept: float = 0.0  # log2 N at s + delta = 1 of the widest window's fitted line
    small_box_offset: float = 0.0  # delta of N ~ (s + delta)^-D
    extent: tuple[int, int] = (0, 0)  # the boundary's bounding box (height, width) in pixels
    windows: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))  # (lo, hi) rows
    window_dimensions: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the slope of each window
    window_sd: float = 0.0
    lattice_sd: float = 0.0
    model_sd: float = 0.0
    octaves: float = 0.0  # log2(largest / smallest box) of the widest window
    local_slope_range: tuple[float, float] = (math.nan, math.nan)  # min and max local slope inside fit_range
    warnings: tuple[str, ...] = ()
    curvature_sd: float = 0.0  # CURVATURE_SHARE x |local_slope_drift|
    local_slope_drift: float = 0.0  # mean local slope of the fit range's upper half minus its lower half
    too_small: str | None = None  # why the map is too small for a number (too few octaves), else None

    @property
    def measured_on(self) -> str:
        """The grid and the octaves the number stands on, for every line that reports it."""
        return (f"at {self.resolution[0]}x{self.resolution[1]} over {self.octaves:.1f} octaves "
                f"(box sizes {self.fit_range[0]}-{self.fit_range[1]})")

    def fit_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """(sizes, counts) inside the fit range."""
        keep = (self.box_sizes >= self.fit_range[0]) & (self.box_sizes <= self.fit_range[1])
        return self.box_sizes[keep], self.box_counts[keep]

    def fitted_counts(self, sizes: ArrayLike) -> np.ndarray:
        """N of the fitted model A (s + delta)^-D at ``sizes`` (the line of the widest window)."""
        s = np.asarray(sizes, dtype=np.float64)
        return 2.0 ** (self.intercept - self.dimension * np.log2(s + self.small_box_offset))

    def to_dict(self) -> dict:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, np.ndarray):
                out[key] = value.tolist()
            elif isinstance(value, tuple):
                out[key] = list(value)
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
    """The levels' dimensions combined (see ``pooled_dimension``)."""

    dimension: float
    stderr: float
    ci_low: float  # dimension -/+ 1.96 stderr
    ci_high: float
    level_slopes: np.ndarray  # each level's own dimension
    level_stderrs: np.ndarray  # and its standard uncertainty
    n_points: int  # box sizes fitted over all levels
    size_range: tuple[float, float]  # smallest and largest box used, in parent (level-0) pixels
    birge_ratio: float  # sqrt(chi^2 / (levels - 1)): > 1 when the levels disagree beyond their errors
    agreement_p: float = 1.0  # P(chi^2 this large | the levels share one dimension); below AGREE_P: they don't
    method: str = field(default=(
        "inverse-variance mean of the levels' dimensions; stderr widened by the Birge ratio when it exceeds 1 "
        "and never below the best level's stderr"))


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
        which = "converged" if n_conv else "not converged"
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


def box_sizes(longest: int) -> np.ndarray:
    """Integer box sizes round(2^(k / SIZES_PER_OCTAVE)) from 1 to ``longest`` (duplicates dropped)."""
    k = np.arange(0, int(SIZES_PER_OCTAVE * math.log2(max(longest, 1))) + 1)
    return np.unique(np.round(2.0 ** (k / SIZES_PER_OCTAVE)).astype(np.int64))


def _edges(n: int, size: int, offset: int, cut: tuple[bool, bool]) -> tuple[np.ndarray, ...]:
    """Boxes along one axis: [offset-shifted start, stop) clamped to the array for the integral image, and the
    box's length that counts (cut by the frame only at an end where ``cut`` says the boundary reaches it)."""
    start = np.arange(-offset, n, size)
    stop = start + size
    lo, hi = np.clip(start, 0, n), np.clip(stop, 0, n)
    length = np.where(cut[1], hi, stop) - np.where(cut[0], lo, start)
    return lo, hi, length


def _lattice_count(integral: np.ndarray, size: int, oy: int, ox: int, cut: tuple[bool, ...]) -> float:
    """Occupied boxes of one lattice, each weighted by the share of its area that counts (see ``_edges``)."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    ya, yb, ylen = _edges(h, size, oy, cut[0:2])
    xa, xb, xlen = _edges(w, size, ox, cut[2:4])
    inside = integral[np.ix_(yb, xb)] - integral[np.ix_(ya, xb)] - integral[np.ix_(yb, xa)] + integral[np.ix_(ya, xa)]
    weight = np.outer(ylen, xlen) / float(size * size)
    return float(weight[inside > 0].sum())


def _lattice_counts(occupied: np.ndarray, sizes: np.ndarray, n_offsets: int, seed: int) -> np.ndarray:
    """(n_offsets, len(sizes)) counts: row 0 the aligned lattice, the rest at random offsets in [0, s)^2."""
    integral = _integral(occupied)
    # the frame cuts boxes only where the boundary reaches it (top, bottom, left, right)
    cut = (bool(occupied[0].any()), bool(occupied[-1].any()), bool(occupied[:, 0].any()), bool(occupied[:, -1].any()))
    rng = np.random.default_rng(seed)
    out = np.empty((n_offsets, sizes.size))
    for j, size in enumerate(int(v) for v in sizes):
        out[0, j] = _lattice_count(integral, size, 0, 0, cut)
        for r in range(1, n_offsets):
            oy, ox = (int(v) for v in rng.integers(0, size, size=2))
            out[r, j] = out[0, j] if size == 1 else _lattice_count(integral, size, oy, ox, cut)
    return out


def _fit_windows(sizes: np.ndarray, extent: int) -> np.ndarray:
    """(k, 2) windows (lo, hi) of box sizes: lo in LOWER_ENDS, hi in UPPER_ENDS x extent, hi >= 2^MIN_OCTAVES lo.
    Where none spans two octaves: the widest window from SMALLEST_BOX up to extent/4, else from 1 up to the
    largest size that still needs two boxes to span the extent."""
    lows = sizes[(sizes >= LOWER_ENDS[0]) & (sizes <= LOWER_ENDS[1])]
    highs = sizes[(sizes >= UPPER_ENDS[0] * extent) & (sizes <= UPPER_ENDS[1] * extent)]
    rows = [(a, b) for a in lows for b in highs if b >= a * 2**MIN_OCTAVES]
    if rows:
        return np.array(rows, dtype=np.int64)
    for lo, top in ((SMALLEST_BOX, extent / 4), (1, extent - 1)):
        inside = sizes[(sizes >= lo) & (sizes <= top)]
        if inside.size >= 3 or (lo == 1 and inside.size >= 2):
            return np.array([(inside[0], inside[-1])], dtype=np.int64)
    raise ConfigError(
        f"boundary of extent {extent} pixels: too small for box counting (fewer than 2 box sizes below its "
        "extent); use a grid of at least 4x4 (32x32 or more for a meaningful fit)"
    )


def _slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each row of ``y`` (or of ``y``) on ``x``."""
    xc = x - x.mean()
    return (xc * (y - y.mean(axis=-1, keepdims=True))).sum(axis=-1) / float((xc**2).sum())


def _small_box_offset(sizes: np.ndarray, log_counts: np.ndarray) -> float:
    """delta >= 0 of log2 N = c - D log2(s + delta) by least squares (0 with fewer than 4 sizes)."""
    if sizes.size < 4:
        return 0.0

    def ssr(delta: float) -> float:
        x = np.log2(sizes + delta)
        resid = log_counts - log_counts.mean() - _slopes(x, log_counts) * (x - x.mean())
        return float((resid**2).sum())

    return float(minimize_scalar(ssr, bounds=OFFSET_BOUNDS, method="bounded").x)


def _local_slopes(sizes: np.ndarray, log_counts: np.ndarray) -> np.ndarray:
    """-dlog2 N / dlog2 s over about one octave (SIZES_PER_OCTAVE // 2 sizes each side) around each size."""
    out = np.full(sizes.size, np.nan)
    half = SIZES_PER_OCTAVE // 2
    ls = np.log2(sizes.astype(np.float64))
    for i in range(half, sizes.size - half):
        out[i] = -(log_counts[i + half] - log_counts[i - half]) / (ls[i + half] - ls[i - half])
    return out


def _slope_drift(sizes: np.ndarray, local: np.ndarray, union: np.ndarray) -> float:
    """Mean local slope over the upper half of the fit range (in log s) minus the mean over its lower half: how far
    the counts bend inside the fit, which no window's spread sees when every window bends alike (0 with fewer than
    two local slopes on a side)."""
    ok = union & np.isfinite(local)
    if ok.sum() < 4:
        return 0.0
    ls = np.log2(sizes[ok].astype(np.float64))
    mid = (ls.min() + ls.max()) / 2
    lower, upper = local[ok][ls < mid], local[ok][ls >= mid]
    if lower.size < 2 or upper.size < 2:
        return 0.0
    return float(upper.mean() - lower.mean())


def _checked_fit_range(fit_range: tuple[int, int], sizes: np.ndarray) -> np.ndarray:
    lo, hi = (int(v) for v in fit_range)
    if hi <= lo or ((sizes >= lo) & (sizes <= hi)).sum() < 2:
        raise ConfigError(
            f"fit_range={tuple(fit_range)!r}: needs smallest < largest and 2+ box sizes from {sizes.tolist()} "
            "between them"
        )
    return np.array([(lo, hi)], dtype=np.int64)


def box_counting(
    boundary: ArrayLike,
    *,
    fit_range: tuple[int, int] | None = None,
    n_offsets: int = DEFAULT_OFFSETS,
    seed: int = 0,
    resolution: tuple[int, int] | None = None,
) -> FractalResult:
    """Box-counting dimension of a 2-D boolean array of occupied (boundary) pixels (module docstring: method).

    ``fit_range=(smallest, largest)`` box sizes (inclusive) replaces the family of fit windows by that one
    window. ``n_offsets`` lattices per box size: the aligned one plus ``n_offsets - 1`` at random offsets
    (``seed``). ``resolution`` is only recorded (default: the class grid shape, boundary shape + 1).
    """
    occ = _as_occupied(boundary)
    if n_offsets < 1:
        raise ConfigError(f"n_offsets={n_offsets}: needs at least 1 (the aligned lattice)")
    rows, cols = np.nonzero(occ.any(axis=1))[0], np.nonzero(occ.any(axis=0))[0]
    extent = (int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1))
    sizes = box_sizes(max(extent))
    windows = _fit_windows(sizes, max(extent)) if fit_range is None else _checked_fit_range(fit_range, sizes)

    per_lattice = _lattice_counts(occ, sizes, n_offsets, seed)
    log_counts = np.log2(per_lattice)
    mean_log = log_counts.mean(axis=0)
    s = sizes.astype(np.float64)
    lo, hi = int(windows[:, 0].min()), int(windows[:, 1].max())
    union = (sizes >= lo) & (sizes <= hi)
    octaves = float(math.log2(hi / lo))
    clean_octaves = float(math.log2(hi / max(lo, SMALLEST_BOX)))  # size 1 sees only the pixel staircase
    # the offset is told apart from a bend of the counts only with octaves of clean scaling above the smallest
    # boxes; on fewer it is fitted all the same, to size the uncertainty term, but not applied
    fitted = _small_box_offset(s[union], mean_log[union])
    corrected = clean_octaves >= CORRECTION_OCTAVES and lo >= SMALLEST_BOX
    delta = fitted if corrected else 0.0

    dims, lattice_sds, plain, shifted = [], [], [], []
    for a, b in windows:
        keep = (sizes >= a) & (sizes <= b)
        x = np.log2(s[keep] + delta)
        dims.append(-float(_slopes(x, mean_log[keep])))
        plain.append(-float(_slopes(np.log2(s[keep]), mean_log[keep])))
        shifted.append(-float(_slopes(np.log2(s[keep] + fitted), mean_log[keep])))
        if n_offsets > 1:
            lattice_sds.append(float(np.std(_slopes(x, log_counts[:, keep]))))
        else:
            lattice_sds.append(ols(x, mean_log[keep]).stderr if keep.sum() > 2 else math.nan)
    dims_arr = np.array(dims)
    dim = float(np.median(dims_arr))
    window_sd = float(dims_arr.std())
    lattice_sd = float(np.mean(lattice_sds))
    model_sd = MODEL_SHARE * abs(float(np.median(shifted)) - float(np.median(plain)))
    local = _local_slopes(sizes, mean_log)
    inside = local[union & np.isfinite(local)]
    local_range = (float(inside.min()), float(inside.max())) if inside.size else (math.nan, math.nan)
    drift = _slope_drift(sizes, local, union)
    curvature_sd = CURVATURE_SHARE * abs(drift)
    stderr = math.sqrt(window_sd**2 + lattice_sd**2 + model_sd**2 + curvature_sd**2 + END_EFFECT_SD**2)
    x_union = np.log2(s[union] + delta)
    intercept = float(mean_log[union].mean() + dim * x_union.mean())

    warnings = []
    if octaves < MIN_OCTAVES:
        warnings.append(f"the fit spans {octaves:.1f} octaves of box size (under {MIN_OCTAVES:.0f}): the grid is too "
                        "coarse for this boundary to show a scaling range; zoom in or sweep more cells")
    if inside.size and local_range[1] - local_range[0] > 0.2:
        warnings.append(f"local slopes range over {local_range[0]:.2f}..{local_range[1]:.2f} inside the fit: no "
                        "single power law at this resolution")
    res = resolution if resolution is not None else (occ.shape[0] + 1, occ.shape[1] + 1)
    too_small = None
    # a fallback window (none of two octaves between the usual ends) runs into the staircase or up to boxes that
    # cover the boundary with a handful: too small however many octaves it nominally spans
    fallback = fit_range is None and not (lo >= LOWER_ENDS[0] and hi <= UPPER_ENDS[1] * max(extent)
                                          and (windows[:, 1] >= windows[:, 0] * 2**MIN_OCTAVES).all())
    if clean_octaves < MEASURABLE_OCTAVES or fallback:
        why = (f"{clean_octaves:.2f} octaves above size {SMALLEST_BOX} (under {MEASURABLE_OCTAVES})" if not fallback
               else f"no two octaves between size {LOWER_ENDS[0]} and a sixth of its extent ({max(extent)})")
        too_small = (f"the boundary spans box sizes {lo}-{hi} at {res[0]}x{res[1]}, {why}: too small a map to measure "
                     "a dimension; sweep 128x128 or more, or refine or zoom into the boundary")
    method = (
        f"box counting: 2x2-rule boundary, {SIZES_PER_OCTAVE} box sizes per octave, {n_offsets} lattices "
        f"(seed {seed}), frame-cut boxes weighted by area only where the boundary meets the frame; median slope "
        f"of log N on log(s + {delta:.2f}) over {len(windows)} fit windows within box sizes {lo}..{hi} "
        + ("" if corrected else f"(small-box offset {fitted:.2f} not applied: under {CORRECTION_OCTAVES:.0f} octaves) ")
        + f"(boundary extent {extent[0]}x{extent[1]}); stderr = root sum of squares of window spread "
        f"{window_sd:.3f}, lattice spread {lattice_sd:.3f}, the small-box correction {model_sd:.3f}, curvature "
        f"{curvature_sd:.3f} ({CURVATURE_SHARE} x the local slopes' drift {drift:+.3f}) and end effects "
        f"{END_EFFECT_SD}; CI = +-1.96 stderr"
    )
    return FractalResult(
        dimension=dim,
        stderr=float(stderr) if math.isfinite(stderr) else math.nan,
        ci_low=dim - _Z95 * stderr,
        ci_high=dim + _Z95 * stderr,
        box_sizes=sizes,
        box_counts=2.0**mean_log,
        fit_range=(lo, hi),
        local_slopes=local,
        resolution=(int(res[0]), int(res[1])),
        method=method,
        aligned_counts=per_lattice[0].copy(),
        n_offsets=int(n_offsets),
        intercept=intercept,
        small_box_offset=delta,
        extent=extent,
        windows=windows,
        window_dimensions=dims_arr,
        window_sd=window_sd,
        lattice_sd=lattice_sd,
        model_sd=model_sd,
        octaves=octaves,
        local_slope_range=local_range,
        warnings=tuple(warnings),
        curvature_sd=float(curvature_sd),
        local_slope_drift=float(drift),
        too_small=too_small,
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


def _level_estimate(k: int, item: tuple[LevelCounts, float]) -> tuple[float, float, int, float, float]:
    """(dimension, stderr, sizes fitted, smallest and largest box in level-0 pixels) of ``levels[k]``.

    A FractalResult brings its own estimate; bare ``(box_sizes, box_counts)`` get a log-log OLS slope and its
    standard error (sizes above 1 where 3+ remain)."""
    if not (isinstance(item, tuple | list) and len(item) == 2):
        raise ConfigError(f"levels[{k}]: expected (counts, scale) with scale = zoom ** -level")
    counts, scale = item
    scale = float(scale)
    if isinstance(counts, FractalResult):
        if not scale > 0:
            raise ConfigError(f"levels[{k}]: needs a scale > 0")
        n_sizes = int(np.count_nonzero((counts.box_sizes >= counts.fit_range[0])
                                       & (counts.box_sizes <= counts.fit_range[1])))
        return counts.dimension, counts.stderr, n_sizes, counts.fit_range[0] * scale, counts.fit_range[1] * scale
    s, n = (np.asarray(v, dtype=np.float64).reshape(-1) for v in counts)
    if s.size != n.size or s.size < 3 or not (np.all(s > 0) and np.all(n > 0)) or not scale > 0:
        raise ConfigError(f"levels[{k}]: needs 3+ equally long positive box sizes and counts and a scale > 0")
    if (s > 1).sum() >= 3:
        s, n = s[s > 1], n[s > 1]
    fit = ols(np.log2(s), np.log2(n))
    return -fit.slope, fit.stderr, int(s.size), float(s.min() * scale), float(s.max() * scale)


def pooled_dimension(levels: Sequence[tuple[LevelCounts, float]]) -> PooledResult:
    """One dimension from several zoom levels.

    Each level is ``(counts, scale)``: ``counts`` a FractalResult or ``(box_sizes, box_counts)``; ``scale`` the
    size of one of its pixels in level-0 pixels (``zoom ** -level`` for windows 1/zoom per axis at the same
    resolution), used only for ``size_range``.

    The levels' dimensions are averaged with weights 1/stderr^2. The pooled stderr is sqrt(1 / sum of weights)
    times the Birge ratio sqrt(chi^2 / (levels - 1)) when that exceeds 1 (levels disagreeing beyond their
    intervals), and never below the smallest level stderr: every level carries the same estimator's
    systematic error (small-box correction, fit range), which pooling cannot average away. ``agreement_p`` is the
    chi^2 test of one shared dimension (the weighted squared deviations, levels - 1 degrees of freedom); a caller
    that pools should first check it against AGREE_P and report the levels apart when they disagree.
    """
    if not levels:
        raise ConfigError("levels: empty; pass at least one (counts, scale) pair")
    est = [_level_estimate(k, item) for k, item in enumerate(levels)]
    d = np.array([e[0] for e in est])
    se = np.array([e[1] for e in est])
    if not np.all(np.isfinite(se) & (se > 0)):
        raise ConfigError("levels: every level needs a positive, finite stderr; pass 3+ box sizes per level")
    w = 1.0 / se**2
    dim = float((w * d).sum() / w.sum())
    chi2 = float((w * (d - dim) ** 2).sum())
    birge = math.sqrt(chi2 / (d.size - 1)) if d.size > 1 else 1.0
    agreement = float(chi2_dist.sf(chi2, d.size - 1)) if d.size > 1 else 1.0
    stderr = max(math.sqrt(1.0 / float(w.sum())) * max(1.0, birge), float(se.min()))
    return PooledResult(
        dimension=dim,
        stderr=stderr,
        ci_low=dim - _Z95 * stderr,
        ci_high=dim + _Z95 * stderr,
        level_slopes=d,
        level_stderrs=se,
        n_points=int(sum(e[2] for e in est)),
        size_range=(min(e[3] for e in est), max(e[4] for e in est)),
        birge_ratio=birge,
        agreement_p=agreement,
    )
