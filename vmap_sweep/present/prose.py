"""The findings of each analysis in sentences, and its fitted laws as formulas, for the CLI, the report and W&B.

The result types of analysis/ hold numbers; what they read as lives here. Text tables are in tables.py.
The CLI imports this module at start (through tables.py), before any analysis runs: the analysis modules whose
constants a sentence uses (they load scipy) are imported when the function is called.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from vmap_sweep.analysis.fmt import count_of, format_ci, format_or_dash

if TYPE_CHECKING:
    from vmap_sweep.analysis.compare import CompareResult, Dimension
    from vmap_sweep.analysis.early_warning import ThresholdRule, WarningResult
    from vmap_sweep.analysis.rules import PowerLaw, RulesResult, TenX
    from vmap_sweep.analysis.rules_joint import JointFit, JointResult


# ----------------------------------------------------------------------------- rules of thumb


def power_law_formula(fit: PowerLaw, name: str = "LR") -> str:
    """"LR = a * D^b"; a tokens_min fit, named "D", reads "D = a * LR^c"."""
    return f"{name} = {fit.coefficient:.3g} * {fit.variable}^{fit.exponent:.3f}"


def ten_x_sentence(ten_x: TenX) -> str:
    """Whether 10x more data allows 2x more LR, with the interval and fit the answer rests on."""
    from vmap_sweep.analysis.rules import TARGET_RATIO

    head = f"10x more data allows {TARGET_RATIO:g}x more LR: {ten_x.answer}"
    if ten_x.ratio is None:
        return f"{head} ({ten_x.reason})."
    fit = f"R² {format_or_dash(ten_x.r2, '.2f')}, {count_of(ten_x.n, 'size')}"
    if ten_x.ci_low is None:
        return f"{head} (LR_crit(10D) / LR_crit(D) = {ten_x.ratio:.2f}x, but {ten_x.reason}; {fit})."
    interval = f"95% CI [{ten_x.ci_low:.2f}, {ten_x.ci_high:.2f}]x"
    b_ci = format_ci(ten_x.exponent_ci_low, ten_x.exponent_ci_high, ".3f")
    exponent = f"exponent {ten_x.exponent:.3f}, 95% CI {b_ci} vs log10 {TARGET_RATIO:g} = {ten_x.tested_exponent:.3f}"
    if ten_x.verdict == "inconclusive":
        return (f"{head} (LR_crit(10D) / LR_crit(D) = {ten_x.ratio:.2f}x, {interval} contains "
                f"{TARGET_RATIO:g}x; {exponent}; {fit}).")
    side = "above" if ten_x.verdict == "yes" else "below"
    return (f"{head} (LR_crit(10D) / LR_crit(D) = {ten_x.ratio:.2f}x, {interval} lies entirely {side} "
            f"{TARGET_RATIO:g}x; {exponent}; {fit}).")


def rules_sentences(result: RulesResult) -> list[str]:
    """The fitted rules, the leave-one-size-out check and the 10x answer, then the result's notes."""
    from vmap_sweep.analysis.rules import SAFE_FACTOR, WITHIN

    lines = []
    if result.crit_fit is not None:
        f = result.crit_fit
        lines.append(f"Critical LR (first diverging) ≈ {f.coefficient:.3g}·D^{f.exponent:.3f} "
                     f"(exponent 95% CI {format_ci(f.ci_low, f.ci_high, '.3f')}, {count_of(f.n, 'size')}); "
                     f"safe LR ≈ {SAFE_FACTOR * f.coefficient:.3g}·D^{f.exponent:.3f}.")
    if result.opt_fit is not None:
        f = result.opt_fit
        lines.append(f"Optimal LR ≈ {f.coefficient:.3g}·D^{f.exponent:.3f} "
                     f"(exponent 95% CI {format_ci(f.ci_low, f.ci_high, '.3f')}, {count_of(f.n, 'size')}).")
    if result.leave_out_fraction is not None:
        hits = sum(lo.within for lo in result.leave_out)
        lines.append(f"Leave-one-size-out: the refitted LR_opt rule predicts {hits} of {len(result.leave_out)} "
                     f"sizes within {WITHIN:g}x ({result.leave_out_fraction:.0%}).")
    if result.tokens_min_fit is not None:
        f = result.tokens_min_fit
        lines.append(f"Minimum viable dataset tokens_min ≈ {f.coefficient:.3g}·LR^{f.exponent:.3f} "
                     f"(exponent 95% CI {format_ci(f.ci_low, f.ci_high, '.3f')}, {count_of(f.n, 'LR')}).")
        distinct = len({r.tokens_min for r in result.lrs if r.censored is None})
        if distinct < 3:  # a flat fit through one or two grid sizes is the grid speaking, not a law
            lines.append(f"tokens_min takes only {distinct} distinct grid size(s) over the {f.n} LRs it is "
                         "fitted on: the fit and its interval say little; a finer tokens axis would.")
    if result.tokens_all_fit is not None:
        f = result.tokens_all_fit
        lines.append(f"Every dataset from tokens_all ≈ {f.coefficient:.3g}·LR^{f.exponent:.3f} up converges "
                     f"(exponent 95% CI {format_ci(f.ci_low, f.ci_high, '.3f')}, {count_of(f.n, 'LR')}).")
    lines.append(ten_x_sentence(result.ten_x))
    return lines + result.notes


# ----------------------------------------------------------------------------- the joint rule across studies


def joint_formula(fit: JointFit) -> str:
    """"LR_crit = a * D^b * P^c"."""
    return (f"LR_crit = {fit.coefficient:.3g} * D^{fit.size_exponent.value:.3f} "
            f"* P^{fit.params_exponent.value:.3f}")


def joint_rules_sentences(result: JointResult) -> list[str]:
    """The joint fit and both exponents with their intervals (or why there is none), then the notes."""
    if result.fit is None:
        return [f"Not enough uncensored points for a joint fit ({sum(len(s.sizes) for s in result.studies)} "
                "points; need at least 4)."] + result.notes
    f = result.fit
    b, c = f.size_exponent, f.params_exponent
    return [f"Joint fit over {len(result.studies)} studies, {f.n} points: {joint_formula(f)} (R² {f.r2:.3f}).",
            f"Dataset-size exponent b = {b.value:.3f}, 95% CI {format_ci(b.ci_low, b.ci_high, '.3f')}; "
            f"model-size exponent c = {c.value:.3f}, 95% CI {format_ci(c.ci_low, c.ci_high, '.3f')} "
            f"(10x the parameters multiplies LR_crit by {10 ** c.value:.3g}, 95% CI "
            f"{format_ci(10 ** c.ci_low, 10 ** c.ci_high, '.3g')})."] + result.notes


# ----------------------------------------------------------------------------- two studies compared


def _dimension(d: Dimension) -> str:
    where = "" if d.grid is None else f" at {d.grid[0]}x{d.grid[1]} over {d.octaves:.1f} octaves"
    return f"{d.dimension:.3f} [{d.ci_low:.3f}, {d.ci_high:.3f}]{where}"


def compare_sentences(result: CompareResult) -> list[str]:
    """What differs, the converged shares and cells that changed class, ΔD with its interval and the LR_crit
    ratio, then the notes."""
    r = result
    n = r.resolution[0] * r.resolution[1]
    share = f"Converged share: A {r.converged_share_a:.1%}, B {r.converged_share_b:.1%}"
    if r.changed is None:
        rb = r.resolution_b or r.resolution
        share += (f" (A {r.resolution[0]}x{r.resolution[1]}, B {rb[0]}x{rb[1]} cells: grids of different "
                  "resolutions, no cell compared)")
    else:
        share += f" ({r.changed} of {n} cells changed class: {r.gained} converge only in B, {r.lost} only in A)"
    lines = [f"B differs from A in: {r.differs or 'nothing but the folder'}.", share + "."]
    if r.delta_d is None:
        why = "; ".join(f"{k}: {d.reason}" for k, d in (("A", r.dimension_a), ("B", r.dimension_b)) if d.reason)
        lines.append(f"ΔD not measured ({why}).")
    else:
        lo, hi = r.delta_d_ci
        lines.append(f"Boundary dimension: A {_dimension(r.dimension_a)}, B {_dimension(r.dimension_b)}; "
                     f"ΔD = D_B - D_A = {r.delta_d:+.3f}, 95% CI [{lo:+.3f}, {hi:+.3f}]"
                     + (" (contains 0: no shift shown)." if lo <= 0 <= hi else "."))
    ratios = [c.ratio for c in r.crit if c.ratio is not None]
    if ratios:
        g = math.exp(float(np.mean(np.log(ratios))))
        lines.append(f"LR_crit(B) / LR_crit(A): geometric mean {g:.3g}x over {len(ratios)} dataset sizes "
                     f"(range {min(ratios):.3g}x to {max(ratios):.3g}x).")
    return lines + r.notes


# ----------------------------------------------------------------------------- early warning signs


def threshold_rule_sentence(rule: ThresholdRule) -> str:
    """What the rule flags after k steps, and its precision and recall."""
    return (f"{rule.feature} >= {rule.threshold:.4g} after {rule.k} steps flags {rule.flagged} cells, "
            f"precision {rule.precision:.1%}, recall {rule.recall:.1%}")


def early_warning_sentences(result: WarningResult) -> list[str]:
    """The cells counted, the earliest rule that warns (or that none does), then the notes."""
    marginal = f", {result.n_marginal} of them marginal" if result.n_marginal else ""
    lines = [f"{result.n_cells} cells, {result.n_failed} not converged{marginal} ({result.criterion} criterion); ROC "
             "AUC of each feature for 'will not converge', 95% bootstrap CI over cells."]
    if result.earliest is None:
        lines.append(f"No threshold rule on one feature reaches {result.precision:.0%} precision with "
                     f"{result.min_recall:.0%} recall at any k in {result.ks}.")
    else:
        lines.append(f"Earliest warning: k = {result.earliest.k} steps, {threshold_rule_sentence(result.earliest)} "
                     f"(in-sample; the rule needs >= {result.precision:.0%} precision and >= "
                     f"{result.min_recall:.0%} recall).")
    return lines + result.notes
