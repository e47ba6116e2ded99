"""The statistics shared by the analyses: least-squares lines, Student t, Spearman's rank correlation.

* ``ols``: ordinary least squares of y on x with the slope's standard error and R² (box counting, the
  uncertainty exponent and the power-law rules of thumb all fit a line in log-log).
* ``t_cdf``/``t_quantile``: Student's t (scipy.stats.t), for confidence intervals from few points.
* ``spearman``: rank correlation with a seeded percentile-bootstrap CI (distance to the boundary vs
  out-of-distribution accuracy); ``rankdata`` gives tied values their average rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy_stats

# ----------------------------------------------------------------------------- least squares


@dataclass(frozen=True)
class LineFit:
    """y = intercept + slope * x by ordinary least squares over ``n`` points."""

    slope: float
    intercept: float
    stderr: float  # standard error of the slope; nan with 2 points (no residual degrees of freedom)
    r2: float  # 1 - SSR / SST; 1.0 when y is constant (the line fits exactly)
    n: int


def ols(x: np.ndarray, y: np.ndarray) -> LineFit:
    """Least-squares line through (x, y); x needs at least two distinct values."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    b = float(((x - xm) * (y - ym)).sum() / sxx)
    a = float(ym - b * xm)
    resid = y - (a + b * x)
    ssr, sst = float((resid**2).sum()), float(((y - ym) ** 2).sum())
    se = math.sqrt(ssr / (x.size - 2) / sxx) if x.size > 2 else math.nan
    return LineFit(slope=b, intercept=a, stderr=se, r2=1.0 - ssr / sst if sst > 0 else 1.0, n=int(x.size))


# ----------------------------------------------------------------------------- Student t


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t with ``dof`` degrees of freedom."""
    return float(_scipy_stats.t.cdf(t, dof))


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom; nan for dof < 1."""
    if dof < 1:
        return math.nan
    return float(_scipy_stats.t.ppf(p, dof))


# ----------------------------------------------------------------------------- rank correlation


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (accuracies over `limit` examples tie often)."""
    return _scipy_stats.rankdata(np.asarray(a, dtype=np.float64), method="average").astype(np.float64)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; nan where either variable is constant (no correlation is defined)."""
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else math.nan


@dataclass(frozen=True)
class SpearmanResult:
    rho: float | None  # None where undefined: fewer than 3 points or a constant variable
    ci_low: float | None
    ci_high: float | None
    n: int

    def to_dict(self) -> dict:
        return {"rho": self.rho, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n}


def spearman(x: Sequence[float], y: Sequence[float], n_boot: int = 2000, confidence: float = 0.95,
             seed: int = 0) -> SpearmanResult:
    """Spearman's rho with a percentile bootstrap CI over resampled (x, y) pairs (seeded, so reruns agree).
    Pairs with a non-finite value are dropped; resamples where a variable is constant have no rho and are
    skipped."""
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise ValueError(f"spearman: x and y must be 1-D of one length, got {xa.shape} and {ya.shape}")
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(xa.size)
    rho = pearson(rankdata(xa), rankdata(ya)) if n >= 3 else math.nan
    if not math.isfinite(rho):
        return SpearmanResult(None, None, None, n)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        r = pearson(rankdata(xa[idx]), rankdata(ya[idx]))
        if math.isfinite(r):
            boots.append(r)
    if not boots:
        return SpearmanResult(rho, None, None, n)
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha])
    # A percentile interval of a skewed bootstrap can miss its own point estimate; widen it to hold rho.
    return SpearmanResult(rho, float(min(low, rho)), float(max(high, rho)), n)
