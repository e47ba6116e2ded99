"""Shapes of known boundary dimension for calibrating box counting (tests and benchmarks/fractal_calibration.py).

disk 1, Koch snowflake log4/log3, Sierpinski triangle log3/log2, coin-flip noise 2. ``calibrate`` measures
each at some resolutions; the table in vmap_sweep.analysis.fractal's docstring is its output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from vmap_sweep.analysis.fractal import DEFAULT_OFFSETS, fractal_dimension
from vmap_sweep.errors import ConfigError


def disk_mask(shape: int | tuple[int, int], radius: float = 0.4) -> np.ndarray:
    """Filled disk (True inside), radius as a fraction of the shorter side; edge dimension 1."""
    h, w = (shape, shape) if isinstance(shape, int) else shape
    y, x = np.ogrid[:h, :w]
    r = radius * min(h, w)
    return (y + 0.5 - h / 2) ** 2 + (x + 0.5 - w / 2) ** 2 < r**2


def noise_mask(shape: int | tuple[int, int], seed: int = 0, p: float = 0.5) -> np.ndarray:
    """I.i.d. coin flips; its 2x2-rule boundary fills the plane (dimension 2)."""
    h, w = (shape, shape) if isinstance(shape, int) else shape
    return np.random.default_rng(seed).random((h, w)) < p


def sierpinski_mask(shape: int | tuple[int, int]) -> np.ndarray:
    """Sierpinski triangle (Pascal's triangle mod 2: i & j == 0); set and boundary dim log2(3).

    The set has no interior, so every set pixel with a non-set neighbour in its 2x2 block is
    boundary: the boundary is the set itself at every scale. Exact for power-of-two sizes.
    """
    h, w = (shape, shape) if isinstance(shape, int) else shape
    i, j = np.ogrid[:h, :w]
    return (i & j) == 0


def polygon_mask(vertices: np.ndarray, shape: tuple[int, int], window: tuple[float, float, float, float]) -> np.ndarray:
    """Even-odd scanline fill of a closed polygon, sampled at pixel centres.

    ``vertices`` (n, 2) as (x, y); ``window`` = (x0, x1, y0, y1) maps onto columns and rows.
    Every edge crossing a row's centre line toggles the parity of all pixels to its right;
    a cumulative sum of toggles per row gives inside/outside. O(edges + crossings).
    """
    h, w = shape
    x0, x1, y0, y1 = window
    px = (vertices[:, 0] - x0) / (x1 - x0) * w
    py = (vertices[:, 1] - y0) / (y1 - y0) * h
    qx, qy = np.roll(px, -1), np.roll(py, -1)
    ylo, yhi = np.minimum(py, qy), np.maximum(py, qy)
    # rows r whose centre r + 0.5 lies in [ylo, yhi)
    r_lo = np.clip(np.ceil(ylo - 0.5), 0, h).astype(np.int64)
    r_hi = np.clip(np.ceil(yhi - 0.5), 0, h).astype(np.int64)
    keep = (r_hi > r_lo) & (np.minimum(px, qx) < w)
    px, py, qx, qy, r_lo, r_hi = (a[keep] for a in (px, py, qx, qy, r_lo, r_hi))
    n_cross = r_hi - r_lo
    edge = np.repeat(np.arange(n_cross.size), n_cross)
    first = np.cumsum(n_cross) - n_cross
    rows = r_lo[edge] + (np.arange(edge.size) - first[edge])
    yc = rows + 0.5
    t = (yc - py[edge]) / (qy[edge] - py[edge])
    xc = px[edge] + t * (qx[edge] - px[edge])
    cols = np.clip(np.ceil(xc - 0.5), 0, w).astype(np.int64)
    toggles = np.bincount(rows * (w + 1) + cols, minlength=h * (w + 1)).reshape(h, w + 1)
    return (np.cumsum(toggles, axis=1)[:, :w] % 2) == 1


def koch_snowflake(iterations: int) -> np.ndarray:
    """Vertices (x, y) of the Koch snowflake, scaled into [0.05, 0.95]^2 (same for every depth)."""
    if not 0 <= iterations <= 10:
        raise ConfigError(f"iterations={iterations}: use 0..10 (3 * 4**10 vertices at most)")
    ang = np.pi / 2 + np.array([0.0, -2.0, -4.0]) * np.pi / 3  # clockwise, tip up
    pts = np.stack([np.cos(ang), np.sin(ang)], axis=1)
    rot = np.array([[0.5, -math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]])  # +60 deg: bumps outward

    def refine(p: np.ndarray) -> np.ndarray:
        d = (np.roll(p, -1, axis=0) - p) / 3
        a = p + d
        return np.stack([p, a, a + d @ rot.T, p + 2 * d], axis=1).reshape(-1, 2)

    # The convex hull (hence bounding box) is the hexagram's tips, reached at depth 1.
    hull = refine(pts)
    lo, hi = hull.min(axis=0), hull.max(axis=0)
    for _ in range(iterations):
        pts = refine(pts)
    scale = 0.9 / float((hi - lo).max())
    centre = (lo + hi) / 2
    return (pts - centre) * scale + 0.5


def koch_mask(
    shape: int | tuple[int, int],
    window: tuple[float, float, float, float] = (0.0, 1.0, 0.0, 1.0),
    iterations: int | None = None,
) -> np.ndarray:
    """Filled Koch snowflake rasterised in ``window`` of the unit square; edge dim log4/log3.

    ``iterations`` default: deep enough that the finest segment is under half a pixel.
    """
    h, w = (shape, shape) if isinstance(shape, int) else shape
    if iterations is None:
        px_per_unit = max(w / (window[1] - window[0]), h / (window[3] - window[2]))
        side = 0.9 * math.sqrt(3) / 2 * px_per_unit  # side of the base triangle in pixels (approx.)
        iterations = min(10, max(1, math.ceil(math.log(side / 0.5, 3))))
    return polygon_mask(koch_snowflake(iterations), (h, w), window)


def calibrate(resolutions: Sequence[int] = (128, 1024), n_offsets: int = DEFAULT_OFFSETS) -> dict:
    """Measured dimension per calibration shape and resolution (the table in the fractal module's docstring)."""
    shapes = {
        "disk": (1.0, disk_mask),
        "koch": (math.log(4) / math.log(3), koch_mask),
        "sierpinski": (math.log(3) / math.log(2), sierpinski_mask),
        "noise": (2.0, noise_mask),
    }
    out: dict = {}
    for name, (true, make) in shapes.items():
        out[name] = {"true": true}
        for n in resolutions:
            mask = make(n)
            r = fractal_dimension(mask, n_offsets=n_offsets)
            aligned = fractal_dimension(mask, n_offsets=1).dimension
            out[name][n] = {
                "dimension": r.dimension,
                "ci": (r.ci_low, r.ci_high),
                "aligned": aligned,
                "fit_range": r.fit_range,
            }
    return out
