"""A study's grid: two axes, a resolution and fixed hyperparameters -> cells.

Array convention everywhere: shape (ny, nx), element [j, i]; i indexes x (columns), j indexes y (rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import AXES, AxisSpec, check_axis_pair

# Window bounds computed from stored float coordinates may be off by rounding; accept this much.
_REL_TOL = 1e-9


@dataclass(frozen=True)
class Cell:
    """One grid point = one fine-tune. ``hparams`` = base hyperparameters + the two axis values."""

    i: int
    j: int
    x: float
    y: float
    hparams: dict[str, Any]

    @property
    def key(self) -> tuple[int, int]:
        return (self.i, self.j)


@dataclass(frozen=True)
class Grid:
    x: AxisSpec
    y: AxisSpec
    nx: int
    ny: int
    base: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 1  # tokens per row: a per-row axis (batch_size) takes values in whole rows

    def __post_init__(self) -> None:
        check_axis_pair(self.x, self.y)
        for n, side in ((self.nx, "x"), (self.ny, "y")):
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
                raise ConfigError(f"grid: resolution along {side} is {n!r}; use an integer >= 2")
        unknown = sorted(set(self.base) - set(AXES))
        if unknown:
            raise ConfigError(f"grid: unknown fixed hyperparameter(s) {', '.join(unknown)}; "
                              f"known: {', '.join(AXES)}")
        clash = sorted(set(self.base) & {self.x.name, self.y.name})
        if clash:
            raise ConfigError(f"grid: {', '.join(clash)} is both swept and fixed; drop the fixed value")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.ny, self.nx)

    @property
    def xs(self) -> np.ndarray:
        return self.x.values(self.nx, self.seq_len)

    @property
    def ys(self) -> np.ndarray:
        return self.y.values(self.ny, self.seq_len)

    def cell(self, i: int, j: int) -> Cell:
        if not (0 <= i < self.nx and 0 <= j < self.ny):
            raise ConfigError(f"grid: cell ({i}, {j}) outside {self.nx}x{self.ny}")
        return self._make(i, j, float(self.xs[i]), float(self.ys[j]))

    def _make(self, i: int, j: int, xv: float, yv: float) -> Cell:
        hp = dict(self.base)
        hp[self.x.name] = self.x.convert(xv)
        hp[self.y.name] = self.y.convert(yv)
        return Cell(i, j, xv, yv, hp)

    def cells(self) -> list[Cell]:
        """All cells in row-major order: j (y) outer, i (x) inner."""
        xs, ys = self.xs, self.ys
        return [self._make(i, j, float(xs[i]), float(ys[j])) for j in range(self.ny) for i in range(self.nx)]

    def window(self, x0: float, x1: float, y0: float, y1: float) -> Grid:
        """The child grid over [x0, x1] x [y0, y1] at the same resolution (zoom)."""
        x0, x1 = _inside(self.x, x0, x1)
        y0, y1 = _inside(self.y, y0, y1)
        return Grid(AxisSpec(self.x.name, x0, x1, self.x.scale), AxisSpec(self.y.name, y0, y1, self.y.scale),
                    self.nx, self.ny, dict(self.base), self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return {"x": self.x.to_dict(), "y": self.y.to_dict(), "nx": self.nx, "ny": self.ny,
                "base": dict(sorted(self.base.items()))}


def _inside(spec: AxisSpec, a: float, b: float) -> tuple[float, float]:
    a, b = float(a), float(b)
    if not a < b:
        raise ConfigError(f"zoom window along {spec.name}: [{a!r}, {b!r}] is not ordered; give min < max")
    tol = _REL_TOL * max(abs(spec.lo), abs(spec.hi))
    if a < spec.lo - tol or b > spec.hi + tol:
        raise ConfigError(f"zoom window along {spec.name}: [{a!r}, {b!r}] is outside the parent range "
                          f"[{spec.lo!r}, {spec.hi!r}]; pick a window inside it")
    return max(a, spec.lo), min(b, spec.hi)
