"""Critical LR as a function of dataset size and model size, fitted across several studies of different models.

Each study gives, per dataset size D whose edge lies inside its LR grid, the first diverging LR (analysis/rules.py);
each study's model has P parameters. The joint rule LR_crit = a * D^b * P^c is fitted by ordinary least squares
of log10 LR_crit on log10 D and log10 P over every uncensored (study, size) point; the 95% CI of each exponent is
estimate +- t(0.975, n - 3) * its standard error (from s^2 (X'X)^-1). Each study's own fit LR_crit = a_i * D^b_i
is listed beside it, so a reader sees whether one D exponent fits all models.

Comparable: every study sweeps an LR axis of one name against ``tokens`` and classifies by one criterion (their
ranges may differ: a larger model wants smaller LRs), and there are at least two distinct model sizes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vmap_sweep.analysis.fmt import format_count
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.rules import PowerLaw, RulesResult
from vmap_sweep.analysis.stats import t_quantile
from vmap_sweep.errors import ConfigError


@dataclass(frozen=True)
class Exponent:
    value: float
    stderr: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class JointFit:
    """log10 LR_crit = log10 a + b log10 D + c log10 P."""

    coefficient: float  # a
    size_exponent: Exponent  # b
    params_exponent: Exponent  # c
    n: int
    r2: float
    method: str = "OLS of log10 LR_crit on log10 D and log10 P; CI = estimate +- t(0.975, n-3) * stderr"

    def predict(self, size: float | np.ndarray, params: float) -> float | np.ndarray:
        return self.coefficient * np.asarray(size, dtype=float) ** self.size_exponent.value \
            * float(params) ** self.params_exponent.value


@dataclass(frozen=True)
class StudyPoints:
    study: str
    params: float
    sizes: tuple[float, ...]  # uncensored dataset sizes
    lr_crit: tuple[float, ...]  # first diverging LR at each
    own_fit: PowerLaw | None


@dataclass
class JointResult:
    lr_axis: str
    studies: list[StudyPoints]
    fit: JointFit | None  # None with fewer than 4 points
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def fit_joint(sizes: np.ndarray, params: np.ndarray, lrs: np.ndarray) -> JointFit | None:
    """LR = a D^b P^c by OLS in log10; None with fewer than 4 points or without two distinct D and P."""
    x1, x2, y = (np.log10(np.asarray(v, dtype=float)) for v in (sizes, params, lrs))
    n = y.size
    if n < 4 or np.unique(x1).size < 2 or np.unique(x2).size < 2:
        return None
    design = np.column_stack([np.ones(n), x1, x2])
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    if rank < 3:  # D and P move together (each model at its own sizes only): the two exponents can't be told apart
        return None
    resid = y - design @ coef
    dof = n - 3
    s2 = float(resid @ resid) / dof
    cov = s2 * np.linalg.inv(design.T @ design)
    t = t_quantile(0.975, dof)
    sst = float(((y - y.mean()) ** 2).sum())

    def exponent(k: int) -> Exponent:
        se = math.sqrt(cov[k, k])
        return Exponent(float(coef[k]), se, float(coef[k] - t * se), float(coef[k] + t * se))

    return JointFit(coefficient=10.0 ** float(coef[0]), size_exponent=exponent(1), params_exponent=exponent(2),
                    n=int(n), r2=1.0 - float(resid @ resid) / sst if sst > 0 else 1.0)


def joint_rules(results: list[RulesResult], params: list[float]) -> JointResult:
    """The joint power law over the rules of several studies; ``params[i]`` is the size of study i's model."""
    if len(results) < 2:
        raise ConfigError("a joint fit across studies needs at least two study folders")
    if len(params) != len(results):
        raise ConfigError(f"--params: {len(params)} model sizes for {len(results)} studies; give one per study")
    axes = {r.lr_axis for r in results}
    if len(axes) > 1:
        raise ConfigError(f"the studies sweep different LR axes ({', '.join(sorted(axes))}) against tokens; a joint "
                          "fit needs one LR axis in all of them")
    criteria = {r.criterion for r in results}
    if len(criteria) > 1:
        raise ConfigError(f"the studies are classified by different criteria ({', '.join(sorted(criteria))}); run "
                          "`vmap-sweep classify DIR --criterion ...` on each so that they agree")
    if len(set(params)) < 2:
        raise ConfigError(f"all {len(results)} studies fine-tune models of {format_count(params[0])} parameters; a "
                          "model-size exponent needs at least two model sizes (or give them with --params)")
    studies = []
    for r, p in zip(results, params, strict=True):
        edge = [row for row in r.sizes if row.censored is None and row.lr_first_diverging is not None]
        studies.append(StudyPoints(r.study, float(p), tuple(row.size for row in edge),
                                   tuple(row.lr_first_diverging for row in edge), r.crit_fit))
    sizes = np.array([d for s in studies for d in s.sizes])
    ps = np.array([s.params for s in studies for _ in s.sizes])
    lrs = np.array([lr for s in studies for lr in s.lr_crit])
    fit = fit_joint(sizes, ps, lrs)
    notes = []
    if fit is None and len(sizes) >= 4:
        notes.append("Dataset size and model size are confounded in these points (or one of them takes one value); "
                     "the two exponents can't be told apart.")
    return JointResult(lr_axis=results[0].lr_axis, studies=studies, fit=fit, notes=notes)
