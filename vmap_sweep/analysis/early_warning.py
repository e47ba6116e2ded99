"""Early warning signs: how well the first k steps of a fine-tune predict whether it ends converged.

Per cell and per k = 1, 2, 4, 8, ... (the first k optimizer steps, trajectory[:k]), five features, each
oriented so that larger means "more likely to fail":

* ``loss_ratio``: the training loss at step k over the base model's loss on the same batch (the quantity the
  ratio criterion averages at the end);
* ``ratio_slope``: least-squares slope of log(loss ratio) over steps 1..k (k >= 2);
* ``grad_growth``: gradient norm at step k over the one at step 1;
* ``grad_spike``: the largest jump of the gradient norm, max over steps t in 2..k of g_t / median(g_1..g_{t-1})
  (k >= 2);
* ``lr_grad``: learning rate x gradient norm at step k (the size of the update before the optimizer's
  normalisation), largest over steps 1..k.

A cell whose run stopped (diverged) before step k is counted with every feature at its most alarming value
(``CAP``): by step k its failure is already known. A cell whose whole run is k steps or fewer is left out at k
(nothing remains to predict); so later k are measured on the larger datasets only, and ``n`` says on how many.

The target is the stored final class: positive = not converged (diverged, or marginal under the threshold
criterion). ROC AUC is the Mann-Whitney statistic (ties count one half); its 95% interval is the 2.5 / 97.5
percentile of the AUC over cells resampled with replacement (seeded, so reruns agree).

The simple rule: at each k, for each feature, the lowest threshold t such that "feature >= t predicts failure"
has precision >= 95% on this study's cells, and its recall. The earliest k is the smallest k at which some
feature's rule reaches that precision while catching at least ``min_recall`` of the cells that fail (without a
floor on recall, one alarming cell gives 100% precision at k = 1). Precision is in-sample: the threshold is
chosen on the same cells it is scored on.

Signed distance to the boundary (for the figure): the Euclidean distance in grid cells to the nearest cell of
the other class (scipy's exact distance transform), negative on the converged side.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage
from scipy import stats as _scipy_stats

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.study.criterion import MARGINAL

FEATURES = ("loss_ratio", "ratio_slope", "grad_growth", "grad_spike", "lr_grad")
FEATURE_TEXT = {
    "loss_ratio": "loss / base loss at step k",
    "ratio_slope": "slope of log(loss / base loss), steps 1..k",
    "grad_growth": "grad norm at k / grad norm at step 1",
    "grad_spike": "largest grad-norm jump over the running median",
    "lr_grad": "max LR x grad norm, steps 1..k",
}
CAP = 1e6  # a non-finite or stopped trajectory's feature value: the most alarming
PRECISION = 0.95
MIN_RECALL = 0.5
N_BOOT = 1000


# ----------------------------------------------------------------------------- per-cell features


@dataclass(frozen=True)
class Trajectory:
    """One done cell's per-step arrays and final class."""

    i: int
    j: int
    losses: np.ndarray
    base: np.ndarray
    grad_norms: np.ndarray
    lrs: np.ndarray
    steps: int  # planned steps
    failed: bool  # final class is not converged


def _finite_or_cap(v: float) -> float:
    return float(v) if math.isfinite(v) else CAP


def features_at(t: Trajectory, k: int) -> dict[str, float] | None:
    """The five features after k steps; None when the run is k steps or shorter by plan (nothing to predict)."""
    if t.steps <= k:
        return None
    if len(t.losses) < k:  # stopped before step k: its divergence is already seen
        return dict.fromkeys(FEATURES, CAP)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = t.losses[:k] / t.base[:k]
        log_ratio = np.log(ratio)
        g = t.grad_norms[:k]
        out = {"loss_ratio": _finite_or_cap(ratio[-1])}
        if not np.isfinite(log_ratio).all():
            out["ratio_slope"] = CAP if k >= 2 else math.nan
        else:
            out["ratio_slope"] = float(np.polyfit(np.arange(k), log_ratio, 1)[0]) if k >= 2 else math.nan
        out["grad_growth"] = _finite_or_cap(g[-1] / g[0]) if g[0] > 0 else CAP
        if k >= 2:
            jumps = [g[s] / np.median(g[:s]) for s in range(1, k)]
            out["grad_spike"] = _finite_or_cap(max(jumps))
        else:
            out["grad_spike"] = math.nan
        out["lr_grad"] = _finite_or_cap(float(np.max(t.lrs[:k] * g)))
    return out


# ----------------------------------------------------------------------------- AUC and its interval


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties one half (Mann-Whitney); nan without
    both classes."""
    scores, positive = np.asarray(scores, dtype=float), np.asarray(positive, dtype=bool)
    n1, n0 = int(positive.sum()), int((~positive).sum())
    if n1 == 0 or n0 == 0:
        return math.nan
    ranks = _scipy_stats.rankdata(scores)
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bootstrap_auc(scores: np.ndarray, positive: np.ndarray, n_boot: int = N_BOOT,
                  seed: int = 0) -> tuple[float | None, float | None]:
    """95% percentile interval of the AUC over cells resampled with replacement; resamples of one class skipped."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        a = roc_auc(scores[idx], positive[idx])
        if math.isfinite(a):
            boots.append(a)
    if not boots:
        return None, None
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return float(lo), float(hi)


@dataclass(frozen=True)
class ThresholdRule:
    """feature >= threshold predicts failure: its precision and recall on the study's cells."""

    feature: str
    k: int
    threshold: float
    precision: float
    recall: float
    flagged: int


def best_rule(feature: str, k: int, scores: np.ndarray, positive: np.ndarray,
              precision: float = PRECISION) -> ThresholdRule | None:
    """The threshold with the highest recall among those with precision >= ``precision``; None if none."""
    ok = np.isfinite(scores)
    scores, positive = scores[ok], positive[ok]
    n_pos = int(positive.sum())
    if n_pos == 0:
        return None
    best = None
    for t in np.unique(scores)[::-1]:  # from the most alarming down: recall only grows
        flag = scores >= t
        prec = float(positive[flag].mean())
        if prec >= precision:
            rec = float(positive[flag].sum() / n_pos)
            best = ThresholdRule(feature, k, float(t), prec, rec, int(flag.sum()))
    return best


# ----------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class FeatureAuc:
    feature: str
    k: int
    auc: float | None
    ci_low: float | None
    ci_high: float | None
    n: int  # cells with more than k planned steps and a finite feature
    n_failed: int


@dataclass
class WarningResult:
    study: str
    ks: list[int]
    aucs: list[FeatureAuc]
    rules: list[ThresholdRule]  # the best rule per (feature, k) that reaches the precision
    earliest: ThresholdRule | None  # the earliest k with precision >= PRECISION and recall >= min_recall
    precision: float
    min_recall: float
    n_cells: int
    n_failed: int
    criterion: str
    notes: list[str] = field(default_factory=list)
    n_marginal: int = 0  # of n_failed: marginal cells (threshold criterion), which count as not converged
    curves: dict[str, Any] | None = field(default=None, repr=False, compare=False)  # for the figure

    def to_dict(self) -> dict[str, Any]:
        return json_safe({k: v for k, v in asdict(self).items() if k != "curves"})


def trajectories_of(view: StudyView, conv: np.ndarray) -> list[Trajectory]:
    """Every done cell's per-step arrays and whether it ended not converged (``conv``: study_classes)."""
    out = []
    for r in view.all_rows():
        out.append(Trajectory(
            i=r["i"], j=r["j"], losses=r["trajectory"], base=r["base_losses"], grad_norms=r["grad_norms"],
            lrs=r["lrs"], steps=int(r["steps"]), failed=not bool(conv[r["j"], r["i"]])))
    return out


def default_ks(max_steps: int) -> list[int]:
    """1, 2, 4, ... below the longest run's planned steps."""
    ks, k = [], 1
    while k < max_steps:
        ks.append(k)
        k *= 2
    return ks


def signed_distance(converged: np.ndarray) -> np.ndarray:
    """Distance in grid cells to the nearest cell of the other class, negative where converged; nan when the
    grid holds one class (no boundary)."""
    conv = np.asarray(converged, dtype=bool)
    if conv.all() or not conv.any():
        return np.full(conv.shape, np.nan)
    return np.where(conv, -ndimage.distance_transform_edt(conv), ndimage.distance_transform_edt(~conv))


def early_warning(view: StudyView, ks: list[int] | None = None,
                  precision: float = PRECISION, min_recall: float = MIN_RECALL, n_boot: int = N_BOOT,
                  seed: int = 0) -> WarningResult:
    """Features of the first k steps against the final class, for every k; see the module docstring."""
    if not 0 < precision <= 1 or not 0 <= min_recall <= 1:
        raise ConfigError(f"precision {precision} and min recall {min_recall}: give fractions in (0, 1]")
    conv = study_classes(view)  # every cell done and classified, else one clear error
    trajs = trajectories_of(view, conv)
    max_steps = max(t.steps for t in trajs)
    ks = default_ks(max_steps) if ks is None else sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ConfigError(f"{view.directory}: steps k must be >= 1 and below the longest run ({max_steps} steps)")
    aucs, rules = [], []
    for k in ks:
        rows = [(features_at(t, k), t.failed) for t in trajs]
        rows = [(f, y) for f, y in rows if f is not None]
        if not rows:
            continue
        positive = np.array([y for _, y in rows])
        for name in FEATURES:
            scores = np.array([f[name] for f, _ in rows])
            ok = np.isfinite(scores)
            s, p = scores[ok], positive[ok]
            auc = roc_auc(s, p) if ok.any() else math.nan
            lo, hi = bootstrap_auc(s, p, n_boot, seed) if math.isfinite(auc) else (None, None)
            aucs.append(FeatureAuc(name, k, None if not math.isfinite(auc) else auc, lo, hi, int(ok.sum()),
                                   int(p.sum())))
            rule = best_rule(name, k, scores, positive, precision)
            if rule is not None:
                rules.append(rule)
    good = [r for r in rules if r.recall >= min_recall]
    earliest = min(good, key=lambda r: (r.k, -r.recall, FEATURES.index(r.feature))) if good else None
    failed = sum(t.failed for t in trajs)
    notes = []
    if failed == 0 or failed == len(trajs):
        notes.append("Every cell has the same final class: nothing to predict, no AUC.")
    return WarningResult(
        study=str(view.directory), ks=ks, aucs=aucs, rules=rules, earliest=earliest, precision=precision,
        min_recall=min_recall, n_cells=len(trajs), n_failed=failed, n_marginal=int((view.labels == MARGINAL).sum()),
        criterion=view.criterion_name, notes=notes, curves=_curves(conv, trajs))


def _curves(conv: np.ndarray, trajs: list[Trajectory]) -> dict[str, Any]:
    """Per cell: signed distance, the per-step loss ratio and gradient norm (what the figure draws)."""
    dist = signed_distance(conv)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"distance": [float(dist[t.j, t.i]) for t in trajs],
                "ratio": [t.losses / t.base[:len(t.losses)] for t in trajs],
                "grad_norm": [t.grad_norms[:len(t.losses)] for t in trajs]}
