"""Rules of thumb from a finished learning-rate x dataset-size study: critical, safe and optimal LR vs D.

Per dataset size D (one row or column of the ``tokens`` axis), on the LR grid in ascending order:

* first diverging LR: the smallest LR that is not converged, *above the smallest converged LR*. Cells
  below the lowest converged LR that did not converge (too small a step to lower the loss under the
  ratio criterion) are not the divergence edge; they are counted in ``low_lr_failures``.
* last converging LR: the largest converged LR. Near a fractal edge islands of convergence lie above
  the first failure, so the two differ; both are reported (``islands`` says when they are not neighbours).
* optimal LR: the lowest held-out eval loss among converged cells; one at the lowest or highest grid LR is
  flagged ``opt_at_edge`` (the optimum may lie beyond the grid) and left out of the LR_opt fit.
* censored: a size whose LR_crit lies outside the grid, "below grid" (no cell converged) or "above grid"
  (nothing diverged above the lowest converged LR). Censored sizes are excluded from the critical-LR fits;
  the optimal-LR fit uses every size with an optimum inside the grid, censored or not.

Fits: LR = a * D^b by ordinary least squares of log10 LR on log10 D; the 95% CI of the exponent is
b +- t(0.975, n-2) * stderr (Student t, n = number of sizes fitted; n = 2 fits exactly and has no CI).
The primary critical-LR fit uses the first diverging LR (the conservative edge); the last converging LR
is fitted too. Safe LR = 0.5 * LR_crit (first diverging). Leave-one-size-out: for each size, LR_opt is
refitted without it and its prediction checked to lie within 2x of that size's optimal LR.
"Does 10x more data allow 2x more LR": ratio LR_crit(10D) / LR_crit(D) = 10^b with CI 10^[b_lo, b_hi];
yes only if the whole CI lies above 2 (b_lo > log10 2), no only if it lies below (b_hi < log10 2), and
"inconclusive" (printed "can't tell", with the interval and the fit's R²) otherwise, including a fit of two
sizes, which has no CI.

The converse, per LR (one column of the LR axis), on the size grid in ascending order:

* tokens_min: the smallest dataset size on which this LR converges (the minimum viable dataset).
* tokens_all: the smallest size from which every larger size converges; above tokens_min only where islands
  of convergence lie below the last failing size (the conservative answer).
* censored: "above grid" (no size converges at this LR) or "below grid" (the smallest size already converges,
  so tokens_min is at most the grid's smallest size). Each fit uses the LRs whose own value lies inside the
  grid: tokens_all can be inside where tokens_min is censored below (small datasets converge, middle ones fail).

Fits: D_min = a * LR^c by the same OLS in log10-log10 (of log10 D on log10 LR) with the same Student-t CI of
the exponent. Where LR_crit = a * D^b holds exactly, c = 1 / b.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.fmt import count_of, format_count
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.analysis.repeats import check_unit
from vmap_sweep.analysis.stats import ols, t_quantile
from vmap_sweep.analysis.view import GridView, StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import AxisSpec

SIZE_AXIS = "tokens"
SAFE_FACTOR = 0.5
WITHIN = 2.0  # leave-one-size-out success: prediction within this factor of the measured optimum
TARGET_RATIO = 2.0  # "does 10x more data allow 2x more LR"


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class PowerLaw:
    """LR = coefficient * D^exponent, fitted in log10-log10 by OLS over ``n`` sizes."""

    coefficient: float
    exponent: float
    stderr: float  # OLS standard error of the exponent (nan for n = 2)
    ci_low: float  # 95% CI of the exponent, Student t with n - 2 dof (nan for n = 2)
    ci_high: float
    n: int
    r2: float
    sizes: tuple[float, ...]  # the abscissae fitted (dataset sizes; LRs for a tokens_min fit)
    method: str = "OLS of log10 LR on log10 D; exponent CI = b +- t(0.975, n-2) * stderr"
    variable: str = "D"  # what the power is taken of: D, or LR for tokens_min(LR)

    def predict(self, size: float | np.ndarray) -> float | np.ndarray:
        return self.coefficient * np.asarray(size, dtype=float) ** self.exponent


@dataclass(frozen=True)
class SizeRow:
    """Per dataset size: the edge both ways, the optimum and the safe LR. None where undefined."""

    size: float
    index: int  # row (lr on x) or column (lr on y) of the study grid
    lr_first_diverging: float | None
    lr_last_converging: float | None
    lr_opt: float | None
    eval_loss_opt: float | None
    lr_safe: float | None
    censored: str | None  # None, "below grid" (nothing converged) or "above grid" (nothing diverged)
    opt_at_edge: str | None  # None, "lowest LR" or "highest LR": the optimum may lie beyond the grid
    islands: bool  # converged cells above the first diverging LR
    n_converged: int
    low_lr_failures: int  # non-converged cells below the lowest converged LR (not the edge)


@dataclass(frozen=True)
class LrRow:
    """Per LR: the smallest dataset on which it converges, both ways. None where undefined (censored)."""

    lr: float
    index: int  # column (lr on x) or row (lr on y) of the study grid
    tokens_min: float | None  # smallest converged size
    tokens_all: float | None  # smallest size from which every larger size converges
    censored: str | None  # None, "above grid" (no size converges) or "below grid" (the smallest one does)
    islands: bool  # a failing size above tokens_min


@dataclass(frozen=True)
class LeaveOut:
    size: float
    lr_opt: float
    predicted: float
    within: bool


@dataclass(frozen=True)
class TenX:
    """LR_crit(10 D) / LR_crit(D) = 10^b with its CI, and whether it reaches 2.

    The verdict follows the 95% CI of the exponent b alone: "yes" when all of it lies above log10 2 (the
    ratio's CI above 2x), "no" when all of it lies below, "inconclusive" otherwise (``answer`` "can't tell").
    The fit's R², exponent and number of sizes are kept so that every printed answer shows what it rests on.
    """

    ratio: float | None
    ci_low: float | None  # 95% CI of the ratio, 10^[b_lo, b_hi]
    ci_high: float | None
    verdict: str  # "yes", "no" or "inconclusive"
    reason: str
    exponent: float | None = None  # b of the first-diverging LR_crit fit
    exponent_ci_low: float | None = None
    exponent_ci_high: float | None = None
    tested_exponent: float = math.log10(TARGET_RATIO)  # b at which 10x data gives exactly 2x LR
    r2: float | None = None
    n: int | None = None  # sizes fitted
    answer: str = "can't tell"  # "yes", "no" or "can't tell": the verdict as printed


@dataclass
class RulesResult:
    study: str
    lr_axis: str
    lr_on: str  # "x" or "y": where the LR axis lies in the study grid
    lr_range: tuple[float, float]
    size_range: tuple[float, float]
    resolution: tuple[int, int]  # (nx, ny) of the study
    criterion: str
    sizes: list[SizeRow]
    crit_fit: PowerLaw | None  # first diverging LR (primary)
    crit_last_fit: PowerLaw | None  # last converging LR
    opt_fit: PowerLaw | None
    leave_out: list[LeaveOut]
    leave_out_fraction: float | None
    ten_x: TenX
    notes: list[str] = field(default_factory=list)
    size_unit: str = "tokens"  # what D counts: tokens, supervised (targets) or conversations
    budget_unit: str = "tokens"  # what the study's budgets (its tokens axis) count
    lrs: list[LrRow] = field(default_factory=list)
    tokens_min_fit: PowerLaw | None = None  # smallest converged size per LR (primary)
    tokens_all_fit: PowerLaw | None = None  # smallest size from which all larger ones converge
    view: GridView | None = field(default=None, repr=False, compare=False)  # for plot_rules; not serialised

    @property
    def safe_fit(self) -> PowerLaw | None:
        """LR_safe = 0.5 * LR_crit as a fitted rule: same exponent, half the coefficient."""
        if self.crit_fit is None:
            return None
        return replace(self.crit_fit, coefficient=SAFE_FACTOR * self.crit_fit.coefficient,
                       method=f"{SAFE_FACTOR} x the first-diverging fit")

    @property
    def censored_sizes(self) -> list[float]:
        return [r.size for r in self.sizes if r.censored]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become None."""
        d = {k: v for k, v in asdict(self).items() if k != "view"}
        d["safe_fit"] = None if self.safe_fit is None else asdict(self.safe_fit)
        d["censored_sizes"] = self.censored_sizes
        return json_safe(d)


# ----------------------------------------------------------------------------- fitting


def fit_power_law(sizes: np.ndarray, lrs: np.ndarray) -> PowerLaw | None:
    """LR = a * D^b by OLS in log10-log10; None with fewer than 2 distinct sizes."""
    x = np.log10(np.asarray(sizes, dtype=float))
    y = np.log10(np.asarray(lrs, dtype=float))
    n = x.size
    if n < 2 or np.unique(x).size < 2:
        return None
    fit = ols(x, y)
    if n > 2:
        half = t_quantile(0.975, n - 2) * fit.stderr
        lo, hi = fit.slope - half, fit.slope + half
    else:
        lo = hi = math.nan
    return PowerLaw(coefficient=10.0**fit.intercept, exponent=fit.slope, stderr=fit.stderr, ci_low=lo, ci_high=hi,
                    n=int(n), r2=fit.r2, sizes=tuple(float(v) for v in np.asarray(sizes, dtype=float)))


def ten_x_verdict(fit: PowerLaw | None) -> TenX:
    """Does 10x more data allow 2x more LR? Yes or no only when the exponent's 95% CI lies entirely on one side
    of log10 2; "inconclusive" (can't tell) when it contains log10 2 or there is no CI."""
    if fit is None:
        return TenX(None, None, None, "inconclusive", "fewer than 2 uncensored sizes to fit LR_crit")
    ratio = 10.0**fit.exponent
    known = dict(exponent=fit.exponent, r2=fit.r2 if math.isfinite(fit.r2) else None, n=fit.n)
    if not (math.isfinite(fit.ci_low) and math.isfinite(fit.ci_high)):
        return TenX(ratio, None, None, "inconclusive", f"no CI from {fit.n} sizes; need at least 3", **known)
    lo, hi = 10.0**fit.ci_low, 10.0**fit.ci_high
    known.update(exponent_ci_low=fit.ci_low, exponent_ci_high=fit.ci_high)
    if fit.ci_low > math.log10(TARGET_RATIO):
        return TenX(ratio, lo, hi, "yes", f"the 95% CI lies above {TARGET_RATIO:g}x", answer="yes", **known)
    if fit.ci_high < math.log10(TARGET_RATIO):
        return TenX(ratio, lo, hi, "no", f"the 95% CI lies below {TARGET_RATIO:g}x", answer="no", **known)
    return TenX(ratio, lo, hi, "inconclusive", f"the 95% CI contains {TARGET_RATIO:g}x", **known)


def leave_one_size_out(rows: list[SizeRow]) -> tuple[list[LeaveOut], float | None]:
    """Refit LR_opt without each size (all rows of that size) and check the prediction is within 2x."""
    usable = [r for r in rows if r.lr_opt is not None and r.opt_at_edge is None]
    out = []
    for size in sorted({r.size for r in usable}):
        rest = [r for r in usable if r.size != size]
        fit = fit_power_law(np.array([r.size for r in rest]), np.array([r.lr_opt for r in rest]))
        if fit is None:
            continue
        predicted = float(fit.predict(size))
        for lr_opt in (float(r.lr_opt) for r in usable if r.size == size and r.lr_opt is not None):
            ok = abs(math.log(predicted / lr_opt)) <= math.log(WITHIN) + 1e-12
            out.append(LeaveOut(size=size, lr_opt=lr_opt, predicted=predicted, within=ok))
    return out, (sum(lo.within for lo in out) / len(out) if out else None)


# ----------------------------------------------------------------------------- the study


def _is_lr_axis(name: str) -> bool:
    return name == "lr" or name.endswith("_lr")


def _size_row(index: int, size: float, lrs: np.ndarray, conv: np.ndarray, evals: np.ndarray) -> SizeRow:
    conv_idx = np.flatnonzero(conv)
    n_conv = int(conv_idx.size)
    if n_conv == 0:
        return SizeRow(size, index, None, None, None, None, None, "below grid", None, False, 0, 0)
    first_conv, last_conv = int(conv_idx[0]), int(conv_idx[-1])
    low_failures = first_conv  # every cell below the lowest converged LR failed
    fail_above = np.flatnonzero(~conv[first_conv:]) + first_conv
    first_div = int(fail_above[0]) if fail_above.size else None
    ev = np.where(conv & np.isfinite(evals), evals, np.inf)
    opt = int(np.argmin(ev)) if np.isfinite(ev).any() else None
    lr_div = None if first_div is None else float(lrs[first_div])
    return SizeRow(
        size=size,
        index=index,
        lr_first_diverging=lr_div,
        lr_last_converging=float(lrs[last_conv]),
        lr_opt=None if opt is None else float(lrs[opt]),
        eval_loss_opt=None if opt is None else float(evals[opt]),
        lr_safe=None if lr_div is None else SAFE_FACTOR * lr_div,
        censored="above grid" if first_div is None else None,
        opt_at_edge=None if opt is None or 0 < opt < len(lrs) - 1 else ("lowest LR" if opt == 0 else "highest LR"),
        islands=first_div is not None and last_conv > first_div,
        n_converged=n_conv,
        low_lr_failures=low_failures,
    )


def _lr_row(index: int, lr: float, sizes: np.ndarray, conv: np.ndarray) -> LrRow:
    """One LR's column (sizes ascending): where convergence starts, and where it starts for good."""
    conv_idx = np.flatnonzero(conv)
    if conv_idx.size == 0:
        return LrRow(lr, index, None, None, "above grid", False)
    failing = np.flatnonzero(~conv)
    first = int(conv_idx[0])
    last_fail = int(failing[-1]) if failing.size else -1
    tokens_all = float(sizes[last_fail + 1]) if last_fail + 1 < len(sizes) else None
    return LrRow(lr=lr, index=index, tokens_min=float(sizes[first]), tokens_all=tokens_all,
                 censored="below grid" if first == 0 else None, islands=last_fail > first)


def _tokens_fit(rows: list[LrRow], attr: str, smallest: float) -> PowerLaw | None:
    """D = a * LR^c over the LRs whose ``attr`` lies inside the size grid (above its smallest size, where the true
    value may lie anywhere below, and not missing, where no size is enough)."""
    use = [r for r in rows if getattr(r, attr) is not None and getattr(r, attr) > smallest]
    fit = fit_power_law(np.array([r.lr for r in use]), np.array([getattr(r, attr) for r in use]))
    if fit is None:
        return None
    return replace(fit, variable="LR", method="OLS of log10 D on log10 LR; exponent CI = c +- t(0.975, n-2) * stderr")


def _lr_on(view: StudyView) -> str:
    """"x" or "y": which axis of the study is the learning rate (the other must be ``tokens``)."""
    x, y = view.x, view.y
    if _is_lr_axis(x.name) and y.name == SIZE_AXIS:
        return "x"
    if _is_lr_axis(y.name) and x.name == SIZE_AXIS:
        return "y"
    raise ConfigError(f"{view.directory}: rules of thumb need a learning-rate axis (lr or *_lr) and "
                      f"`tokens`, this study sweeps {x.name} (x) and {y.name} (y); run a study with "
                      "--x lr:MIN:MAX --y tokens:MIN:MAX")


def _notes(rows: list[SizeRow], lr_spec: AxisSpec, evaluated: bool = True) -> list[str]:
    """Sentences on what the fits leave out: censored sizes, islands, low-LR failures, optima at the edge."""
    notes = []
    cens = [r for r in rows if r.censored]
    if cens:
        notes.append(f"{len(cens)} of {len(rows)} sizes are censored (critical LR outside the grid "
                     f"[{lr_spec.lo:.3g}, {lr_spec.hi:.3g}]: "
                     + ", ".join(f"D={format_count(r.size)} {r.censored}" for r in cens)
                     + ") and excluded from the critical-LR fits.")
    isl = [r for r in rows if r.islands]
    if isl:
        notes.append(f"{count_of(len(isl), 'size has', 'sizes have')} islands of convergence above the first "
                     "diverging LR (first diverging < last converging), as expected near a fractal edge.")
    low = sum(r.low_lr_failures for r in rows)
    if low:
        notes.append(f"{count_of(low, 'cell')} below a size's lowest converged LR did not converge; they are not "
                     "the divergence edge and are ignored for LR_crit.")
    edge_opt = [r for r in rows if r.opt_at_edge]
    if edge_opt:
        notes.append(f"{count_of(len(edge_opt), 'size has', 'sizes have')} their optimal LR at the edge of the LR grid "
                     "(the optimum may "
                     "lie beyond it); they are left out of the LR_opt fit and the leave-one-size-out check.")
    no_opt = sum(r.lr_opt is None for r in rows)
    if not evaluated:
        notes.append("the study took no eval loss (--eval-tokens 0), so no size has an optimal LR.")
    elif no_opt:
        notes.append(f"{count_of(no_opt, 'size has', 'sizes have')} no converged cell with a finite eval loss "
                     "and no optimal LR.")
    return notes


def rules_of_thumb(view: StudyView, size_unit: str | None = None,
                   classes: np.ndarray | None = None) -> RulesResult:
    """Critical, safe and optimal LR per dataset size and their power laws, from a finished, classified study.
    D counts `size_unit` (tokens, supervised targets or conversations; default: what the study's budgets count);
    a size whose every cell repeats a smaller one's experiment (analysis/repeats.py) is that size again, and
    counted once. classes: a converged grid (ny, nx) to use instead of the stored classes."""
    check_unit(size_unit or view.config.budget_unit)
    size_unit = size_unit or view.config.budget_unit
    lr_on = _lr_on(view)
    x, y = view.x, view.y
    conv = study_classes(view) if classes is None else classes  # (ny, nx); refuses pending or unclassified
    evals = view.grid_arrays("eval_loss")
    xs, ys = x.values(view.nx), y.values(view.ny)
    repeats = view.grid.repeats
    if lr_on == "y":  # make rows = sizes, columns = LRs
        conv, evals, repeats = conv.T, evals.T, repeats.T
        lrs, sizes, lr_spec = ys, xs, y
    else:
        lrs, sizes, lr_spec = xs, ys, x
    sized = view.sized
    kept = [k for k in range(len(sizes)) if not repeats[k].all()]
    budgets = _budgets(view, lr_on)
    sizes = np.array([float(sized.size(budgets[k], size_unit)) for k in range(len(sizes))])
    rows = [_size_row(k, float(sizes[k]), lrs, conv[k], evals[k]) for k in kept]

    edge = [r for r in rows if r.censored is None]
    crit = fit_power_law(np.array([r.size for r in edge]), np.array([r.lr_first_diverging for r in edge]))
    crit_last = fit_power_law(np.array([r.size for r in edge]), np.array([r.lr_last_converging for r in edge]))
    with_opt = [r for r in rows if r.lr_opt is not None and r.opt_at_edge is None]
    opt = fit_power_law(np.array([r.size for r in with_opt]), np.array([r.lr_opt for r in with_opt]))
    leave, fraction = leave_one_size_out(rows)
    lr_rows = [_lr_row(k, float(lrs[k]), sizes, conv[:, k]) for k in range(len(lrs))]
    return RulesResult(
        study=str(view.directory),
        lr_axis=lr_spec.name,
        lr_on=lr_on,
        lr_range=(lr_spec.lo, lr_spec.hi),
        size_range=(float(sizes[kept].min()), float(sizes[kept].max())),
        resolution=(view.nx, view.ny),
        criterion=view.criterion_name,
        sizes=rows,
        crit_fit=crit,
        crit_last_fit=crit_last,
        opt_fit=opt,
        leave_out=leave,
        leave_out_fraction=fraction,
        ten_x=ten_x_verdict(crit),
        notes=_repeat_note(budgets, sized, kept, lr_on) + _notes(rows, lr_spec, evaluated=view.config.eval_tokens > 0),
        size_unit=size_unit,
        budget_unit=view.config.budget_unit,
        lrs=lr_rows,
        tokens_min_fit=_tokens_fit(lr_rows, "tokens_min", float(sizes.min())),
        tokens_all_fit=_tokens_fit(lr_rows, "tokens_all", float(sizes.min())),
        view=view.grid,
    )


def _budgets(view: StudyView, lr_on: str) -> list[int]:
    """Each size row's budget in tokens (the tokens axis's values, as the cells hold them)."""
    along = "j" if lr_on == "x" else "i"
    by_index: dict[int, int] = {}
    for c in view.cells:
        by_index.setdefault(getattr(c, along), int(c.hparams["tokens"]))
    return [by_index[k] for k in range(len(by_index))]


def _repeat_note(budgets: list[int], sized, kept: list[int], lr_on: str) -> list[str]:
    """Which size rows were left out as repeats of a smaller one, in tokens."""
    along = 1 if lr_on == "x" else 0  # where a cell's (i, j) holds its size row
    repeated = {key[along]: cell[along] for key, cell in sized.same_as.items()}
    same = [f"{budgets[k]} = {budgets[repeated[k]]}" for k in range(len(budgets)) if k not in kept]
    if not same:
        return []
    one = len(same) == 1
    return [f"{count_of(len(same), 'size repeats', 'sizes repeat')} a smaller size's experiment (the tokens "
            f"between hold no supervised token) and {'is' if one else 'are'} counted once: {sized.unit} "
            f"{', '.join(same)}."]
