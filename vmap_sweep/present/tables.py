"""Analysis results as text: the lines and tables `fractal`, `zoom-dimension`, `rules`, `compare` and
`early-warning` print (cli/render.py shows them, or the result's JSON); the findings in sentences are prose.py's."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from vmap_sweep.analysis.fmt import format_ci, format_count, format_or_dash
from vmap_sweep.present.prose import (
    compare_sentences,
    early_warning_sentences,
    joint_rules_sentences,
    power_law_formula,
    rules_sentences,
)

if TYPE_CHECKING:
    from vmap_sweep.analysis.chain import BegunZoom, ChainDimensions
    from vmap_sweep.analysis.compare import CompareResult
    from vmap_sweep.analysis.early_warning import WarningResult
    from vmap_sweep.analysis.rules import RulesResult
    from vmap_sweep.analysis.rules_joint import JointResult

_highlighter = Console()  # only its markup and number highlighting: a sentence reads as the terminal shows it


def _prose(text: str) -> Text:
    """A sentence of numbers, not a path: wrapped to the terminal and highlighted, as rich prints a string."""
    return _highlighter.render_str(text)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# the second estimate `fractal` prints: a different method on the same map, to be read beside D, never instead
UNCERTAINTY_WHAT = "φ the slope of the share of cells ε apart in different classes against ε"


def fractal_lines(report: dict) -> list[Text]:
    """The box-counting dimension with its CI and what the interval is made of, what the grid can resolve (fit
    windows, octaves, local slopes, warnings), the box sizes and counts, and the uncertainty-exponent dimension
    where the source had one."""
    box = report
    stderr = box.get("stderr")
    if stderr is not None and stderr == stderr:  # analysis.fractal.box_counting: CI = ± 1.96 stderr
        parts = [(box.get("window_sd"), "fit-window spread"), (box.get("lattice_sd"), "lattice placement"),
                 (box.get("model_sd"), "small-box correction"), (box.get("curvature_sd"), "curvature")]
        terms = ", ".join(f"{name} {value:.3f}" for value, name in parts if value is not None and value == value)
        basis = f"± 1.96 × standard uncertainty {stderr:.3f}" + (f": {terms}, end effects" if terms else "")
    else:
        basis = "no standard uncertainty from 2 box sizes"
    lo, hi = box["fit_range"]
    windows = len(box.get("windows") or []) or 1
    resolve = (f"fit over box sizes {lo}–{hi} ({box.get('octaves', math.log2(hi / lo)):.1f} octaves, "
               f"{windows} fit window{'s' if windows > 1 else ''}) at {box['resolution'][0]}×{box['resolution'][1]}")
    slope_range = box.get("local_slope_range")
    if slope_range and all(v is not None and v == v for v in slope_range):
        resolve += f"; local slopes {slope_range[0]:.2f}–{slope_range[1]:.2f} inside the fit"
    which = {"stability": " of the stability boundary (stopped as unstable vs not)"}.get(box.get("map"), "")
    grid = f"{box['resolution'][0]}×{box['resolution'][1]}"
    if box.get("too_small"):
        head = f"no box-counting dimension{which}: {box['too_small']}"
    else:
        head = (f"box-counting dimension{which} {box['dimension']:.3f}, 95% CI [{box['ci_low']:.3f}, "
                f"{box['ci_high']:.3f}] at {grid} over {box.get('octaves', math.log2(hi / lo)):.1f} octaves ({basis})")
    lines = [
        head,
        resolve,
        *(f"warning: {w}" for w in box.get("warnings") or []),
        "box sizes:  " + " ".join(f"{s:>7d}" for s in box["box_sizes"]),
        "box counts: " + " ".join(f"{c:>7.1f}" for c in box["box_counts"]),
    ]
    if "uncertainty_dimension" in box:
        note = f" ({box['uncertainty_note']})" if "uncertainty_note" in box else ""
        lines.append(f"cross-check (not the estimate above): uncertainty exponent 2 - φ = "
                     f"{box['uncertainty_dimension']:.3f} ± {box['uncertainty_stderr']:.3f} ({UNCERTAINTY_WHAT}; fit "
                     f"standard error, no calibrated interval){note}")
    if "refined" in box:
        lines += refined_lines(box)
    return [_prose(line) for line in lines]


def finish_zoom_command(begun: BegunZoom) -> str:
    """The command that finishes a zoom begun and not finished: its parent, its window with each bound exactly as
    stored (the window names the folder) and the run settings it was trained with."""
    window = " ".join(repr(float(v)) for v in begun.window)
    options = begun.settings.resume_options() if begun.settings is not None else ""
    return f"vmap-sweep zoom {begun.folder.parent} --window {window}{options}"


def zoom_dimension_lines(report: ChainDimensions) -> list[str]:
    """One line per zoom level, then the dimension pooled over all levels; a study with no zoom below it says
    so and how to make one, rather than 'pooling' its one level."""
    lines = []
    for level in report.levels:
        if level.dimension is None:
            lines.append(f"level {level.level}: not measurable ({level.error})")
        elif level.too_small:
            lines.append(f"level {level.level}: no dimension, {level.too_small}; cell scale {level.scale:.3g}")
        else:
            grid = "×".join(str(v) for v in level.resolution)
            lines.append(f"level {level.level}: D = {_num(level.dimension)}, 95% CI [{_num(level.ci_low)}, "
                         f"{_num(level.ci_high)}] at {grid} over {level.octaves:.1f} octaves, cell scale "
                         f"{level.scale:.3g}" + "".join(f"; warning: {w}" for w in level.warnings))
    for begun in report.begun:
        lines.append(f"a zoom level below {begun.folder.parent} was begun and not finished ({begun.folder.name}): "
                     f"`{finish_zoom_command(begun)}` finishes it")
    if len(report.levels) < 2 and report.begun:
        return lines
    if len(report.levels) < 2:
        top = report.levels[0].folder if report.levels else "DIR"
        lines.append(f"no zoom level below this study, so there is nothing to pool over: `vmap-sweep zoom {top} "
                     "--auto` re-sweeps a window of the boundary at the same resolution, then zoom-dimension "
                     "measures each level and their pooled dimension")
        return lines
    pooled = report.pooled
    if pooled.disagree:
        lines.append(f"not pooled: {pooled.error}")
    elif pooled.dimension is None:
        lines.append(f"pooled: not measurable ({pooled.error})")
    elif pooled.stderr is None or pooled.ci_low is None:
        lines.append(f"pooled over levels {', '.join(str(v) for v in pooled.levels)}: "
                     f"D = {_num(pooled.dimension)}, no CI (too few box counts for a standard error)")
    else:  # analysis.fractal.pooled_dimension: inverse-variance mean of the levels, CI = ± 1.96 pooled stderr
        lines.append(f"pooled over levels {', '.join(str(v) for v in pooled.levels)}: "
                     f"D = {_num(pooled.dimension)}, 95% CI [{_num(pooled.ci_low)}, {_num(pooled.ci_high)}] "
                     f"(± 1.96 × the pooled standard uncertainty {_num(pooled.stderr)}: levels weighted by "
                     "their own, never below the best level's)")
    return lines


def _string_table(title: str, header_rows: tuple[list[str], list[list[str]]], numbers_right: bool = True) -> Table:
    """A table of strings; with numbers_right every column but a note is right-aligned."""
    header, rows = header_rows
    table = Table(title=title)
    for h in header:
        table.add_column(h, justify="left" if h == "note" or not numbers_right else "right")
    for r in rows:
        table.add_row(*r)
    return table


def rules_rows(result: RulesResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-size table, as strings, for rich, Markdown or HTML."""
    header = [f"D ({result.size_unit})", "first diverging LR", "last converging LR", "safe LR", "optimal LR",
              "eval loss at opt", "note"]
    rows = []
    for r in result.sizes:
        notes = []
        if r.censored:
            notes.append(f"censored ({r.censored})")
        if r.islands:
            notes.append("islands")
        if r.opt_at_edge:
            notes.append(f"optimum at {r.opt_at_edge}")
        if r.low_lr_failures:
            notes.append(f"{r.low_lr_failures} low-LR failures")
        lrs = (r.lr_first_diverging, r.lr_last_converging, r.lr_safe, r.lr_opt)
        rows.append([format_count(r.size), *map(format_or_dash, lrs), format_or_dash(r.eval_loss_opt, ".4f"),
                     ", ".join(notes)])
    return header, rows


def fit_rows(result: RulesResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the fitted rules."""
    header = ["rule", "fit", "exponent 95% CI", "sizes", "R²"]
    rows = []
    for name, fit in (("LR_crit (first diverging)", result.crit_fit),
                      ("LR_crit (last converging)", result.crit_last_fit),
                      ("LR_safe = 0.5 LR_crit", result.safe_fit), ("LR_opt", result.opt_fit),
                      ("tokens_min(LR)", result.tokens_min_fit), ("tokens_all(LR)", result.tokens_all_fit)):
        if fit is None:
            rows.append([name, "not enough LRs" if name.startswith("tokens") else "not enough sizes", "", "", ""])
        else:
            formula = power_law_formula(fit, "D") if fit.variable == "LR" else power_law_formula(fit)
            rows.append([name, formula, format_ci(fit.ci_low, fit.ci_high, ".3f"), str(fit.n),
                         format_or_dash(fit.r2, ".3f")])
    return header, rows


def tokens_rows(result: RulesResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-LR minimum-dataset table; only LRs whose tokens_min lies inside the grid,
    plus a count of the censored ones in the last row."""
    header = [f"{result.lr_axis}", f"tokens_min (smallest converging D, in {result.size_unit})",
              "all D above converge from", "note"]
    smallest = result.size_range[0]
    inside = [r for r in result.lrs if r.censored is None or (r.tokens_all or 0) > smallest]
    rows = [[format_or_dash(r.lr), "below grid" if r.censored == "below grid" else _count(r.tokens_min),
             _count(r.tokens_all), "islands" if r.islands else ""] for r in inside]
    every = sum(r.tokens_all == smallest for r in result.lrs)
    none = sum(r.censored == "above grid" for r in result.lrs)
    if every or none:
        rows.append(["…", "", "", f"{every} LRs converge at every size, {none} at none (censored)"])
    return header, rows


def _count(v: float | None) -> str:
    return "—" if v is None else format_count(v)


def rules_table(result: RulesResult) -> Table:
    """The per-size values (the CLI prints it, then ``fit_table``)."""
    return _string_table(f"rules of thumb: {result.lr_axis} vs dataset size ({result.criterion} criterion)",
                         rules_rows(result))


def fit_table(result: RulesResult) -> Table:
    """The fitted power laws, one row per rule."""
    return _string_table(f"fitted rules (D in {result.size_unit})", fit_rows(result), numbers_right=False)


def tokens_table(result: RulesResult) -> Table:
    """The converse per LR: the smallest dataset on which it converges."""
    return _string_table(f"minimum viable dataset per {result.lr_axis} ({result.size_unit})", tokens_rows(result))


def rules_lines(result: RulesResult) -> list[RenderableType]:
    """The per-size and per-LR tables and the fits, then the findings in sentences."""
    return [rules_table(result), tokens_table(result), fit_table(result), *rules_sentences(result)]


def compare_crit_rows(result: CompareResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per dataset size, LR_crit of A and of B and B / A; "censored" where either has none."""
    header = [f"D ({result.size_unit})", "LR_crit A", "LR_crit B", "B / A"]
    return header, [[f"{r.size:,.0f}", _or_censored(r.lr_crit_a), _or_censored(r.lr_crit_b), _or_censored(r.ratio)]
                    for r in result.crit]


def _or_censored(v: float | None) -> str:
    return "censored" if v is None else f"{v:.3g}"


def compare_lines(result: CompareResult) -> list[RenderableType]:
    """The findings in sentences, then LR_crit of both per dataset size where the axes have one."""
    lines: list[RenderableType] = [_prose(line) for line in compare_sentences(result)]
    if result.crit:
        header, rows = compare_crit_rows(result)
        table = Table(title="critical LR (first diverging) per dataset size")
        for h in header:
            table.add_column(h, justify="right")
        for r in rows:
            table.add_row(*r)
        lines.append(table)
    return lines


def early_warning_rows(result: WarningResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): one row per feature, one column per k, AUC [95% CI]; last, the cells (failing) per k."""
    from vmap_sweep.analysis.early_warning import FEATURES  # here, not at the top: the CLI loads tables before scipy

    header = ["feature", *[f"k = {k}" for k in result.ks]]
    by = {(a.feature, a.k): a for a in result.aucs}
    rows = []
    for f in FEATURES:
        cells = []
        for k in result.ks:
            a = by.get((f, k))
            cells.append("—" if a is None or a.auc is None else
                         f"{a.auc:.2f} [{_or_dash(a.ci_low)}, {_or_dash(a.ci_high)}]")
        rows.append([f, *cells])
    n_row = ["cells (failing)"]
    for k in result.ks:
        a = by.get((FEATURES[0], k))
        n_row.append("—" if a is None else f"{a.n} ({a.n_failed})")
    return header, [*rows, n_row]


def _or_dash(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def early_warning_lines(result: WarningResult) -> list[RenderableType]:
    """AUC per feature and k, then the findings in sentences."""
    header, rows = early_warning_rows(result)
    table = Table(title="ROC AUC for 'will not converge' after k steps [95% bootstrap CI]")
    for h in header:
        table.add_column(h, justify="left" if h == "feature" else "right")
    for r in rows:
        table.add_row(*r)
    return [table, *[_prose(line) for line in early_warning_sentences(result)]]


def joint_study_rows(result: JointResult) -> tuple[list[str], list[list[str]]]:
    """(header, rows): per study, its model size, the sizes fitted and its own LR_crit(D) fit."""
    header = ["study", "parameters", "sizes fitted", "own fit", "D exponent 95% CI"]
    rows = []
    for s in result.studies:
        f = s.own_fit
        rows.append([s.study, format_count(s.params), str(len(s.sizes)),
                     "—" if f is None else power_law_formula(f, "LR_crit"),
                     "—" if f is None else format_ci(f.ci_low, f.ci_high, ".3f")])
    return header, rows


def joint_rules_lines(result: JointResult) -> list[RenderableType]:
    """Each study's points and own fit, then the joint fit in sentences."""
    header, rows = joint_study_rows(result)
    table = Table(title=f"critical {result.lr_axis} (first diverging) per study")
    for h in header:
        table.add_column(h)
    for r in rows:
        table.add_row(*r)
    return [table, *[_prose(line) for line in joint_rules_sentences(result)]]


def _level0_line(c: dict, r: dict) -> str:
    at = f"level 0 at {c['resolution'][0]}×{c['resolution'][1]}"
    if c.get("too_small"):
        return f"{at}: no dimension, too small a map to measure"
    line = (f"{at}: D = {c['dimension']:.3f}, 95% CI [{c['ci_low']:.3f}, {c['ci_high']:.3f}] "
            f"over {c['octaves']:.1f} octaves")
    if r["octaves_gained"] is None:  # the refined level itself is too small for a number
        return line
    return (line + f"; refinement gained {r['octaves_gained']:.1f} octaves"
            + (f" and an interval {r['interval_narrowing']:.2f}× as narrow" if r["interval_narrowing"] else ""))


def refined_lines(report: dict) -> list[str]:
    """What `fractal` adds for a refined study: which level, how much was inferred, what refinement bought."""
    r = report["refined"]
    c = r["coarse"]
    lines = [f"refined study: measured on level {r['level']} ({r['folder']}), {r['trained_cells']:,} of "
             f"{r['cells']:,} cells stored (trained, or copied from the experiment they repeat), "
             f"{100 * r['inferred_share']:.1f}% inferred from uniform neighbourhoods",
             _level0_line(c, r)]
    if r.get("tokens_note"):
        lines.append(f"note: {r['tokens_note']}")
    return lines
