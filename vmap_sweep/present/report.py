"""One self-contained report of a finished study, in Markdown or HTML, to paste into a paper draft.

Sections: the study's configuration, the convergence map (score with boundary, final and eval loss,
trajectories), the boundary's box-counting dimension (and zoom levels when the study has children), the
rules of thumb (when the axes are an LR and ``tokens``) and the out-of-distribution correlation (when the
store holds an ``ood`` extra). Every figure has a short caption saying what it shows.

Pictures: HTML embeds them as base64 ``data:image/png`` URIs, so the report is one file. Markdown writes
them as PNG files into ``<report stem>_files/`` next to the report and links them relatively: most
Markdown renderers (GitHub among them) drop data URIs, and a paper's LaTeX needs files anyway.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.fmt import format_ci, format_count
from vmap_sweep.analysis.rules import SAFE_FACTOR, rules_of_thumb
from vmap_sweep.analysis.study import fractal_report
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError, VmapSweepError
from vmap_sweep.present.prose import compare_sentences, rules_sentences
from vmap_sweep.present.provenance import provenance_rows
from vmap_sweep.present.tables import compare_crit_rows, fit_rows, rules_rows
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore, check_output
from vmap_sweep.study.config import tokens_per_step
from vmap_sweep.study.criterion import DISPLAY

if TYPE_CHECKING:
    from vmap_sweep.analysis.chain import ChainDimensions

FORMATS = ("md", "html")
MAX_TABLE_ROWS = 16  # per-size rules rows shown in the report (a 128-row table does not belong in a draft)


# ----------------------------------------------------------------------------- a tiny document model


@dataclass
class _Figure:
    name: str
    png: bytes
    caption: str
    number: int = 0


@dataclass
class _Doc:
    """Headings, paragraphs, tables and figures, rendered to Markdown or HTML at the end."""

    title: str
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: int = 0

    def h(self, text: str, level: int = 2) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def bullets(self, items: Sequence[str]) -> None:
        if items:
            self.blocks.append(("ul", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", ([str(h) for h in header], [[_cell(v) for v in r] for r in rows])))

    def figure(self, name: str, path: Path, caption: str) -> None:
        self.figures += 1
        self.blocks.append(("fig", _Figure(name, Path(path).read_bytes(), caption, self.figures)))

    # ---------------------------------------------------------------- Markdown
    def markdown(self, out_file: Path) -> str:
        assets = out_file.parent / f"{out_file.stem}_files"
        lines = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "h":
                level, text = value
                lines += [f"{'#' * level} {text}", ""]
            elif kind == "p":
                lines += [value, ""]
            elif kind == "ul":
                lines += [f"- {item}" for item in value] + [""]
            elif kind == "table":
                header, rows = value
                lines.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
                lines.append("|" + "|".join("---" for _ in header) + "|")
                lines += ["| " + " | ".join(_md_escape(c) for c in r) + " |" for r in rows]
                lines.append("")
            elif kind == "fig":
                assets.mkdir(parents=True, exist_ok=True)
                check_output(assets / f"{value.name}.png").write_bytes(value.png)
                lines += [f"![Figure {value.number}: {value.name}]({assets.name}/{value.name}.png)", "",
                          f"*Figure {value.number}.* {value.caption}", ""]
        return "\n".join(lines)

    # ---------------------------------------------------------------- HTML
    def html(self) -> str:
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"]
        for kind, value in self.blocks:
            if kind == "h":
                level, text = value
                body.append(f"<h{level}>{e(text)}</h{level}>")
            elif kind == "p":
                body.append(f"<p>{e(value)}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in value) + "</ul>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{e(h)}</th>" for h in header)
                rows_html = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>")
            elif kind == "fig":
                data = base64.b64encode(value.png).decode("ascii")
                body.append(f'<figure><img alt="{e(value.name)}" src="data:image/png;base64,{data}">'
                            f"<figcaption><b>Figure {value.number}.</b> {e(value.caption)}</figcaption></figure>")
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(self.title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n"
        )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse;margin:0.8rem 0;font-size:0.9rem}"
    "th,td{border:1px solid #bbb;padding:0.2rem 0.5rem;text-align:right}th{background:#eee}"
    "td:first-child,th:first-child{text-align:left}"
    "figure{margin:1.2rem 0}img{max-width:100%}figcaption{font-size:0.9rem;color:#333}"
)


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float | np.floating):
        return "—" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, list | tuple):
        return ", ".join(_cell(x) for x in v)
    return str(v)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


# ----------------------------------------------------------------------------- sections


def _batch_text(cfg: dict, tokens_step: int | None) -> str:
    """Rows × tokens per row, or, where the study sweeps batch_size, the axis that sets each cell's tokens per step."""
    swept = [side for side in ("x", "y") if str(cfg.get(side, "")).startswith("batch_size:")]
    if swept:
        return f"swept on the {swept[0]} axis (batch_size, tokens per step), rows of {cfg.get('seq_len')} tokens"
    return (f"{cfg.get('rows_per_step')} rows × {cfg.get('seq_len')} tokens"
            + (f" = {tokens_step} tokens per step" if tokens_step else ""))


def _config_section(doc: _Doc, store: StudyStore) -> None:
    cfg = store.config
    doc.h("Study")
    counts = store.label_counts()
    tokens_step = None
    if isinstance(cfg.get("rows_per_step"), int) and isinstance(cfg.get("seq_len"), int):
        tokens_step = tokens_per_step(cfg["rows_per_step"], cfg["seq_len"])
    crit = extras.criterion(store)
    options = ", ".join(f"{k}={v}" for k, v in crit.items() if k != "criterion")
    rows = [
        ("model", cfg.get("model")),
        ("data", cfg.get("data")),
        ("x axis", cfg.get("x")),
        ("y axis", cfg.get("y")),
        ("resolution", f"{store.nx} × {store.ny} = {store.cell_count()} fine-tunes"),
        ("optimizer / schedule", f"{cfg.get('optimizer')} / {cfg.get('schedule')}"),
        ("batch", _batch_text(cfg, tokens_step)),
        ("trainable groups", ", ".join(cfg.get("trainable") or []) or "—"),
        ("fixed hyperparameters", ", ".join(f"{k}={v}" for k, v in sorted((cfg.get("fixed") or {}).items())) or "—"),
        ("seed", cfg.get("seed")),
        ("held-out eval tokens", cfg.get("eval_tokens")),
        ("convergence criterion", str(crit.get("criterion")) + (f" ({options})" if options else "")),
        ("cells done", f"{store.done_count()} of {store.cell_count()}"),
        ("classes", ", ".join(f"{n} {DISPLAY.get(label, label)}" for label, n in counts.items())),
        ("created", store.created),
        *provenance_rows(store),
    ]
    doc.table(["setting", "value"], rows)
    doc.p(
        "Every cell is one fine-tune of the same base model; cells with the same dataset size see the same "
        "batches in the same order. A run is converged when the mean of its last min(20, steps) loss ratios "
        "(training loss over the base model's loss on the same batch) is below 1 (the \"ratio\" criterion); "
        "classes are recomputed from stored trajectories, never by re-training."
        if crit.get("criterion", "ratio") == "ratio" else
        "Every cell is one fine-tune of the same base model; a run is converged when its final training loss "
        "is below the threshold above and not converged when non-finite or above the upper threshold."
    )


def _maps_section(doc: _Doc, store: StudyStore, study: StudyView, tmp: Path) -> None:
    from vmap_sweep.present.plots import save_plots

    view = study.grid
    ny = len(view.ys)
    rows = sorted({0, ny // 2, ny - 1})
    paths = {p.stem: p for p in save_plots(view, tmp / "maps", ("png",), store.trajectories(), rows)}
    n_conv, n = int(view.converged.sum()), view.converged.size
    cfg = store.config
    doc.h("Convergence map")
    doc.p(f"{n_conv} of {n} fine-tunes converged ({n_conv / n:.0%}).")
    axes = f"{view.x_name} (x) and {view.y_name} (y)"
    if extras.criterion(store)["criterion"] == "ratio":
        score = "the score (−Σ loss ratio when converged, Σ 1/ratio otherwise) as sign·log(1+|s|)"
    else:  # threshold: marginal cells lie between the two thresholds, with scores between 0 and 1
        score = ("the score log(final loss / lower threshold) / log(upper / lower threshold), negative when "
                 "converged, between 0 and 1 when marginal, as sign·log(1+|s|)")
    doc.figure("score", paths["score"],
               f"Convergence map of {store.nx}×{store.ny} fine-tunes over {axes}. Blue: converged, red: not converged"
               f"{'' if extras.criterion(store)['criterion'] == 'ratio' else ', pale yellow: marginal'}; colour "
               f"is {score}. The black line is the boundary between converged cells and the rest.")
    doc.figure("final_loss", paths["final_loss"],
               f"Final loss ÷ the base model's loss on the same batch, for each fine-tune over {axes} (its last "
               "batch, after its last update; < 1: better than the base model on those tokens); black line: the "
               "convergence boundary.")
    if "eval_loss" in paths:
        doc.figure("eval_loss", paths["eval_loss"],
                   f"Held-out eval loss after fine-tuning ({cfg.get('eval_tokens')} tokens) over {axes}; "
                   "black line: the convergence boundary.")
    if "trajectories" in paths:
        which = ", ".join(format_count(view.ys[j]) for j in rows)
        doc.figure("trajectories", paths["trajectories"],
                   f"Training loss per step for {view.y_name} = {which} (one panel each), a sample of "
                   f"{view.x_name} values coloured by class (blue converged, red not converged); under the ratio "
                   "criterion as loss ÷ the base model's loss on the same batch, with the line at 1 it is judged "
                   "against.")


def _fractal_section(doc: _Doc, study_dir: Path, tmp: Path) -> dict | None:
    from vmap_sweep.present.plots import plot_box_counts

    doc.h("Fractal dimension of the boundary")
    plot = tmp / "box_counting.png"
    try:
        measured = fractal_report(study_dir)
        plot_box_counts(measured.box, plot)
        box = measured.to_dict()
    except VmapSweepError as e:
        doc.p(f"Not measurable on this study: {e}")
        return None
    res = f"{box['resolution'][0]}×{box['resolution'][1]}"
    # analysis.fractal.box_counting: CI = ± 1.96 × the standard uncertainty, a root sum of squares of its terms
    basis = ("± 1.96 standard uncertainties: the spread of the slope over the admissible fit windows, over "
             "box-lattice placements, the small-box correction in full, the curvature of the counts (the drift of "
             "the local slopes across the fit) and an end-effect term")
    slope_se = _f(box.get("stderr"))
    se_text = ("standard uncertainty " + _fmt(slope_se) if slope_se is not None and math.isfinite(slope_se)
               else "no standard uncertainty from 2 box sizes")
    if box.get("too_small"):
        doc.p(f"No dimension: {box['too_small']}. Box sizes {' '.join(str(v) for v in box['box_sizes'])}; counts "
              f"{' '.join(f'{c:.1f}' for c in box['box_counts'])}.")
        if plot.is_file():
            doc.figure("box_counting", plot, f"Box counting at {res}: number of boxes N(s) holding boundary against "
                       "box size s (log-log); too few octaves of box size for a dimension.")
        return None
    doc.p(f"Box-counting dimension D = {box['dimension']:.3f}, 95% CI {format_ci(box['ci_low'], box['ci_high'])} "
          f"({basis}; {se_text}), fit over box sizes {box['fit_range'][0]}–{box['fit_range'][1]} "
          f"at {res} over {box['octaves']:.1f} octaves. A smooth edge has D = 1 and noise D = 2; a fit spanning "
          "under two octaves of box size cannot separate a fractal from a wiggly smooth edge, and zoom levels add "
          "octaves of scale.")
    for warning in box.get("warnings") or []:
        doc.p(f"Warning: {warning}.")
    rows = [("dimension", f"{box['dimension']:.3f}"),
            ("95% CI (± 1.96 standard uncertainties)", format_ci(box["ci_low"], box["ci_high"])),
            ("standard uncertainty", _fmt(box["stderr"])),
            ("fit range (box sizes)", f"{box['fit_range'][0]}–{box['fit_range'][1]}"), ("resolution", res),
            ("box sizes", " ".join(str(s) for s in box["box_sizes"])),
            ("box counts", " ".join(f"{c:.1f}" for c in box["box_counts"]))]
    if "uncertainty_dimension" in box:
        note = f" ({box['uncertainty_note']})" if "uncertainty_note" in box else ""
        rows.append(("cross-check: uncertainty-exponent dimension 2 − φ (φ: slope of the share of cells ε apart "
                     "that differ in class against ε; fit standard error, no calibrated interval)",
                     f"{box['uncertainty_dimension']:.3f} ± {_fmt(box['uncertainty_stderr'])}{note}"))
    doc.table(["quantity", "value"], rows)
    doc.p(f"Method: {box['method']}.")
    if plot.is_file():
        doc.figure("box_counting", plot,
                   f"Box counting: number of boxes N(s) holding boundary against box size s (log-log) at {res}; "
                   f"the slope of the fitted line over sizes {box['fit_range'][0]}–{box['fit_range'][1]} gives "
                   f"D = {box['dimension']:.3f} {format_ci(box['ci_low'], box['ci_high'])}.")
    return box


def _zoom_section(doc: _Doc, store: StudyStore, study_dir: Path, tmp: Path) -> None:
    """Per-level and pooled dimensions (analysis.chain.dimension_report), when the study has zooms."""
    children = store.children()
    if not children:
        return
    doc.h("Zoom levels")
    try:  # imported only for a study with zooms; without the zoom analysis the rest of the report stands
        from vmap_sweep.analysis.chain import dimension_report
    except ImportError:
        doc.p(f"The study has {len(children)} zoom windows, but this vmap-sweep has no zoom analysis "
              "(vmap_sweep.analysis.chain.dimension_report); their dimensions are not reported here.")
        return
    try:
        rep = dimension_report(study_dir)
    except VmapSweepError as e:
        doc.p(f"Zoom levels not measurable: {e}")
        return
    n = len(children)
    doc.p(f"The study has {n} zoom window{'s' if n != 1 else ''}: each zoom re-sweeps a window of its parent's "
          "boundary at the same resolution. The box-counting dimension per level, and pooled over the levels "
          "(levels weighted by their uncertainties), is:")
    _zoom_tables(doc, rep, tmp)


def _zoom_tables(doc: _Doc, rep: ChainDimensions, tmp: Path) -> None:
    """The levels' dimensions as a table, the pooled one as a sentence, the box counts as a plot."""
    from vmap_sweep.present.plots import plot_zoom_box_counts

    rows = []
    for lv in rep.levels:
        x0, x1, y0, y1 = lv.window
        where = f"{format_count(x0)}–{format_count(x1)} × {format_count(y0)}–{format_count(y1)}"
        fr = lv.fit_range
        if lv.too_small:  # no number for a map too small to measure, as `fractal` prints none
            rows.append([lv.level, where, _fmt(lv.scale, ".3g"), "—", "—", "—",
                         f"{fr[0]}–{fr[1]}" if fr else "—", lv.too_small])
            continue
        rows.append([lv.level, where, _fmt(lv.scale, ".3g"), _fmt(lv.dimension), _fmt(lv.stderr),
                     format_ci(lv.ci_low, lv.ci_high), f"{fr[0]}–{fr[1]}" if fr else "—", lv.error or ""])
    doc.table(["level", "window (x × y)", "cell scale", "D", "stderr", "95% CI", "fit range", "note"], rows)
    pooled = rep.pooled
    if pooled.dimension is None:
        doc.p(f"Pooled dimension: not measurable ({pooled.error}).")
    else:
        sr = pooled.size_range or (math.nan, math.nan)
        doc.p(f"Pooled over levels {', '.join(str(v) for v in pooled.levels)}: "
              f"D = {_fmt(pooled.dimension)} ± {_fmt(pooled.stderr)}, 95% CI "
              f"{format_ci(pooled.ci_low, pooled.ci_high)}, {pooled.n_points} box counts "
              f"spanning box sizes {_fmt(sr[0], '.3g')}–{_fmt(sr[1], '.3g')} top-level cells.")
    curves = [lv for lv in rep.levels if lv.box_sizes and lv.box_counts and lv.scale]
    if curves:
        path = plot_zoom_box_counts(
            [(f"level {lv.level}: D = {_fmt(lv.dimension)}", np.asarray(lv.box_sizes, dtype=float) * lv.scale,
              lv.box_counts) for lv in curves],
            tmp / "zoom_box_counting.png")
        doc.figure("zoom_box_counting", path,
                   "Box counts of the boundary at each zoom level against box size in top-level cells (log-log): "
                   "deeper levels extend the curve to smaller scales; a common slope means one dimension "
                   f"across scales (pooled D = {_fmt(pooled.dimension)}).")


def _rules_section(doc: _Doc, study: StudyView, tmp: Path):
    from vmap_sweep.present.plots import plot_rules

    doc.h("Rules of thumb")
    try:
        r = rules_of_thumb(study)
    except ConfigError as e:
        doc.p(f"Not applicable to this study: {e}")
        return None
    doc.bullets(rules_sentences(r))
    header, rows = fit_rows(r)
    doc.table(header, rows)
    header, rows = rules_rows(r)
    if len(rows) > MAX_TABLE_ROWS:
        keep = np.unique(np.linspace(0, len(rows) - 1, MAX_TABLE_ROWS).round().astype(int))
        doc.p(f"Per-size values at {len(keep)} of {len(rows)} dataset sizes, evenly spaced "
              "(all sizes: `vmap-sweep rules STUDY --json`):")
        rows = [rows[k] for k in keep]
    doc.table(header, rows)
    doc.p(f"Per dataset size D: the first diverging LR is the smallest non-converged LR above the lowest "
          f"converged one; the last converging LR is the largest converged LR (they differ where islands of "
          f"convergence lie beyond the first failure); the optimal LR has the lowest held-out eval loss among "
          f"converged cells (one at the edge of the LR grid is left out of the LR_opt fit); safe LR = "
          f"{SAFE_FACTOR} × first diverging LR. Fits are least squares in log-log; "
          f"exponent CIs use Student's t with n − 2 degrees of freedom. Sizes whose edge lies outside the LR "
          f"grid are censored and left out of the critical-LR fits.")
    path = plot_rules(r, tmp / "rules.png")
    fits = []
    if r.crit_fit is not None:
        fits.append(f"LR_crit ≈ {r.crit_fit.coefficient:.3g}·D^{r.crit_fit.exponent:.3f}")
    if r.opt_fit is not None:
        fits.append(f"LR_opt ≈ {r.opt_fit.coefficient:.3g}·D^{r.opt_fit.exponent:.3f}")
    doc.figure("rules", path,
               "Learning rate against dataset size (log-log) over the score map: first diverging (▽) and last "
               "converging (△) LR and the optimal LR (★) per size, with power-law fits"
               + (f" ({'; '.join(fits)})" if fits else "")
               + f"; dash-dot: the safe rule {SAFE_FACTOR}·LR_crit. Censored sizes are marked ×.")
    return r


def _compare_section(doc: _Doc, study: StudyView, other: Path, tmp: Path, mixed_criteria: bool = False) -> None:
    from vmap_sweep.analysis.compare import compare_studies
    from vmap_sweep.present.plots import plot_compare

    doc.h("Compared with another study")
    # grids that can't be compared: one clear error, no report
    r = compare_studies(study, StudyView.load(other), mixed_criteria=mixed_criteria)
    doc.p(f"A is this study, B is {other}.")
    doc.bullets(compare_sentences(r))
    if r.crit:
        header, rows = compare_crit_rows(r)
        doc.table(header, rows)
    path = plot_compare(r, tmp / "compare.png")
    doc.figure("compare", path,
               "Left: each cell by its class in A and in B (red: converges in A only, green: in B only), with the "
               "boundary of A (solid) and of B (dashed). Right, where the axes are an LR and tokens: the first "
               "diverging LR per dataset size in both. ΔD's interval adds the two dimensions' CI half-widths in "
               "quadrature.")


def _ood_section(doc: _Doc, ood: Any, tmp: Path, criterion: dict | None = None) -> None:
    from vmap_sweep.present.plots import plot_ood

    doc.h("Out-of-distribution skill")
    measured_by = ood.get("criterion") if isinstance(ood, dict) else None  # results stored without it don't say
    if criterion is not None and measured_by is not None and measured_by != criterion:
        doc.p(f"These results were computed when the study was classified by {measured_by}; it is now classified "
              f"by {criterion}, so their cells and distances are to another boundary. Run `vmap-sweep eval` "
              "again for the current classes.")
    try:
        spearman = dict(ood.get("spearman") or {})
        cells = list(ood.get("cells") or [])
        rows = [(task, _fmt(_f(s["rho"])), format_ci(_f(s.get("ci_low")), _f(s.get("ci_high"))), s.get("n"))
                for task, s in sorted(spearman.items())]
        points: dict[str, tuple[list[float], list[float]]] = {}
        no_distance = 0
        for c in cells:
            if c["distance"] is None:  # a study of one class has no boundary to be near
                no_distance += 1
                continue
            for task, acc in (c.get("accuracy") or {}).items():
                xs, ys = points.setdefault(str(task), ([], []))
                xs.append(float(c["distance"]))
                ys.append(float(acc))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        doc.p(f"The study's \"ood\" result could not be read ({type(e).__name__}: {e}); expected "
              '{"cells": [{"i", "j", "distance", "accuracy": {task: acc}}], "spearman": {task: {"rho", '
              '"ci_low", "ci_high", "n"}}}.')
        return
    limit, samples = ood.get("limit"), ood.get("samples")  # results stored before per-task counts had one limit
    counts = (f" ({', '.join(f'{task} {n} examples' for task, n in samples.items())})" if samples
              else f" (up to {limit} examples each)" if limit else "")
    doc.p(f"Does distance to the convergence boundary predict out-of-distribution skill? {len(cells)} fine-tunes "
          f"were evaluated on {len(spearman) or len(points)} tasks" + counts
          + "; Spearman's rank correlation between distance and accuracy per task, with its 95% CI:")
    if no_distance:
        doc.p(f"{no_distance} evaluated cells have no distance (the study has one class only) and are left out.")
    doc.table(["task", "Spearman ρ", "95% CI", "n"], rows)
    if points:
        series = []
        for task, (xs, ys) in sorted(points.items()):
            rho = spearman.get(task, {}).get("rho")
            series.append((task + (f" (ρ = {float(rho):.2f})" if rho is not None else ""), xs, ys))
        path = plot_ood(series, tmp / "ood.png")
        doc.figure("ood", path,
                   "Accuracy on each out-of-distribution task against the fine-tune's distance to the convergence "
                   "boundary; one point per evaluated cell and task, ρ = Spearman's rank correlation.")


def _f(v: Any) -> float | None:
    return None if v is None else float(v)


# ----------------------------------------------------------------------------- entry point


def write_report(study_dir: str | os.PathLike, out_file: str | os.PathLike, fmt: str = "md",
                 compare: str | os.PathLike | None = None, mixed_criteria: bool = False) -> Path:
    """Write the report of the finished study in ``study_dir`` to ``out_file`` ("md" or "html"); with ``compare``
    (a study over the same grid) a section comparing the two (of another criterion only with ``mixed_criteria``)."""
    if fmt not in FORMATS:
        raise ConfigError(f"report format {fmt!r}: choose md or html")
    study_dir, out_file = Path(study_dir), check_output(out_file)
    if out_file.exists() and out_file.is_dir():
        raise ConfigError(f"{out_file} is a folder; give a file name for the report, e.g. report.{fmt}")
    with StudyStore.open(study_dir) as store:
        study_classes(store)  # every cell done and classified, else one clear error
        study = StudyView.load(store)  # what the measures read, read once
        cfg = store.config
        doc = _Doc(title=f"Where fine-tuning converges: {cfg.get('model')} on {cfg.get('data')}")
        doc.p(f"Report of the vmap-sweep study in {study_dir} "
              f"(generated {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}).")
        with tempfile.TemporaryDirectory(prefix="vmap-sweep-report-") as tmp_name:
            tmp = Path(tmp_name)
            _config_section(doc, store)
            _maps_section(doc, store, study, tmp)
            _fractal_section(doc, study_dir, tmp)
            _zoom_section(doc, store, study_dir, tmp)
            _rules_section(doc, study, tmp)
            if compare is not None:
                _compare_section(doc, study, Path(compare), tmp, mixed_criteria)
            ood = extras.ood(store)
            if ood is not None:
                _ood_section(doc, ood, tmp, extras.criterion(store))
            text = doc.markdown(out_file) if fmt == "md" else doc.html()
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(text, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{out_file}: can't write the report ({e.strerror or e}); choose a writable path") from None
    return out_file
