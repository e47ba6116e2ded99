"""Pictures of a study: heatmaps over the two axes in real units with the boundary, loss trajectories, the
box-counting fits, the LR rules of thumb, and the report's zoom and out-of-distribution figures. Every drawing
of the analysis layer is here (the zoom animation replays these heatmaps); the modules that compute what is
drawn import no matplotlib."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import FuncNorm, ListedColormap, Normalize, TwoSlopeNorm  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator  # noqa: E402

from vmap_sweep.analysis.early_warning import FEATURES  # noqa: E402
from vmap_sweep.analysis.fractal import FractalResult  # noqa: E402
from vmap_sweep.analysis.rules import SIZE_AXIS  # noqa: E402
from vmap_sweep.analysis.view import GridView  # noqa: E402
from vmap_sweep.errors import ConfigError  # noqa: E402
from vmap_sweep.present.prose import joint_formula  # noqa: E402
from vmap_sweep.store.db import check_output  # noqa: E402
from vmap_sweep.study.axes import AXES  # noqa: E402
from vmap_sweep.study.criterion import CONVERGED, DISPLAY, MARGINAL, NOT_CONVERGED, NOT_CONVERGED_ABOVE  # noqa: E402

if TYPE_CHECKING:
    from vmap_sweep.analysis.compare import CompareResult
    from vmap_sweep.analysis.early_warning import WarningResult
    from vmap_sweep.analysis.rules import RulesResult
    from vmap_sweep.analysis.rules_joint import JointResult

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def picture_file(path) -> Path:
    """A picture's path, its format from the suffix: any other suffix is a one-line error, before any work."""
    path = check_output(path)
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise ConfigError(f"{path}: unknown picture format {path.suffix!r}; use a file ending in "
                          f"{', '.join(PICTURE_SUFFIXES)}")
    return path


def _edges(values: np.ndarray, log: bool) -> np.ndarray:
    """Cell edges halfway between centres (geometrically on a log axis), so each cell sits on its value."""
    v = np.log(values) if log else np.asarray(values, dtype=float)
    if len(v) == 1:
        mid = np.array([v[0] - 0.5, v[0] + 0.5])
    else:
        inner = (v[1:] + v[:-1]) / 2
        mid = np.concatenate([[2 * v[0] - inner[0]], inner, [2 * v[-1] - inner[-1]]])
    return np.exp(mid) if log else mid


_AXIS_LABELS = {
    "tokens": "dataset size (tokens)",
    "batch_size": "batch size (tokens per step)",
    "warmup_ratio": "warmup (fraction of the run's steps)",
    "weight_decay": "weight decay (decoupled)",
}
_LR_LABELS = {"adamw": "learning rate (AdamW lr)", "nanochat": "learning rate (lr: Muon + AdamW base)"}


SIZE_UNIT_NAMES = {"tokens": "tokens", "supervised": "supervised tokens", "conversations": "conversations"}


def axis_label(name: str, optimizer: str = "", budget_unit: str = "tokens") -> str:
    """An axis name as a reader needs it: what it is and its unit, e.g. ``dataset size (tokens)`` or, for a study
    that counts its budgets in answer tokens, ``dataset size (supervised tokens)``."""
    if name == "tokens":
        return f"dataset size ({SIZE_UNIT_NAMES[budget_unit]})"
    if name == "lr":
        return _LR_LABELS.get(optimizer, "learning rate (lr)")
    if name in _AXIS_LABELS:
        return _AXIS_LABELS[name]
    if name in AXES:  # the registry's description up to its first detail, then the axis name
        return f"{AXES[name].description.split(';')[0].split(' (')[0]} ({name})"
    return name


def value_text(name: str, value: float, budget_unit: str = "tokens") -> str:
    """One axis value in words, e.g. ``dataset size = 2048 tokens`` or ``lr = 0.001``."""
    if name == "tokens":
        return f"dataset size = {value:.0f} {SIZE_UNIT_NAMES[budget_unit]}"
    if name == "batch_size":
        return f"batch size = {value:.0f} tokens per step"
    if name in _AXIS_LABELS:
        return f"{_AXIS_LABELS[name].split(' (')[0]} = {value:.4g}"
    return f"{name} = {value:.3g}"


def _short_log_axis(axis, values: np.ndarray) -> None:
    """A log axis spanning under 2 decades: ticks at 1, 2, 5 × 10^k written plainly (e.g. 500, 0.002),
    instead of crowded minor labels like 2×10^-3 4×10^-3 6×10^-3."""
    e = _edges(np.asarray(values, dtype=float), True)
    if len(values) > 1 and e[0] > 0 and np.log10(e[-1] / e[0]) < 0.7:
        # a deep zoom's window: 1, 2, 5 x 10^k may not fall inside at all; a few evenly spaced plain values do
        axis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.4g}"))
        axis.set_minor_locator(NullLocator())
    elif len(values) > 1 and e[0] > 0 and np.log10(e[-1] / e[0]) < 2.0:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def legend_outside(ax, ncol: int = 2) -> None:
    """The legend under the axes (below the axis label), never over the cells: a map's every cell is data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=ncol, fontsize=7, frameon=False)


def _axes(ax, view: GridView) -> None:
    ax.set_xlabel(axis_label(view.x_name, view.optimizer, view.budget_unit))
    ax.set_ylabel(axis_label(view.y_name, view.optimizer, view.budget_unit))
    if view.x_log:
        ax.set_xscale("log")
        _short_log_axis(ax.xaxis, view.xs)
    if view.y_log:
        ax.set_yscale("log")
        _short_log_axis(ax.yaxis, view.ys)


BOUNDARY_LABEL = "convergence boundary"


def _boundary(ax, view: GridView) -> bool:
    """The line between converged cells and the rest, with a legend entry; False where there is none."""
    # pending cells (no score yet) are left out: a boundary only runs between classified cells
    mask = np.ma.masked_where(np.isnan(view.scores), view.converged.astype(float))
    if mask.count() == 0 or mask.min() == mask.max() or min(mask.shape) < 2:
        return False
    ax.contour(view.xs, view.ys, mask, levels=[0.5], colors="black", linewidths=0.8)
    ax.plot([], [], color="black", lw=0.8, label=BOUNDARY_LABEL)  # a contour has no legend entry of its own
    legend_outside(ax)
    return True


REPEATS_LABEL = "same data as a smaller size (no supervised token between)"


def _repeats(ax, view: GridView) -> bool:
    """Hatch the cells that repeat a smaller budget's experiment: one experiment drawn at several sizes."""
    if view.repeats is None or not view.repeats.any():
        return False
    ax.pcolor(_edges(view.xs, view.x_log), _edges(view.ys, view.y_log),
              np.ma.masked_array(np.ones(view.repeats.shape), mask=~view.repeats),
              facecolor="none", edgecolor="none", hatch="////", linewidth=0)
    ax.add_patch(Rectangle((0, 0), 0, 0, facecolor="none", edgecolor="0.3", hatch="////", label=REPEATS_LABEL))
    return True


def _heatmap(view: GridView, values: np.ndarray, label: str, cmap, norm=None, boundary: bool = True,
             title: str | None = None):
    """One per-cell array over the two axes; ``label`` names the colourbar, ``title`` (default: the label)
    says what is drawn under the study's title."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2), constrained_layout=True)
    mesh = ax.pcolormesh(
        _edges(view.xs, view.x_log), _edges(view.ys, view.y_log), np.ma.masked_invalid(values), cmap=cmap, norm=norm
    )
    fig.colorbar(mesh, ax=ax, label=label)
    marked = _repeats(ax, view)
    if not (boundary and _boundary(ax, view)) and marked:
        legend_outside(ax)
    _axes(ax, view)
    what = label if title is None else title
    ax.set_title(f"{view.title}\n{what}" if view.title else what, fontsize=9)
    return fig


def score_norm(scores: np.ndarray):
    """Diverging colours centred on 0: converged (negative) blue, not converged red, on a symmetric-log scale."""
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return None
    lo, hi = min(finite.min(), -1e-9), max(finite.max(), 1e-9)
    return TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)


def signed_log(scores: np.ndarray) -> np.ndarray:
    """sign(s) * log1p(|s|): the ratio score spans many decades; this keeps both sides readable."""
    return np.sign(scores) * np.log1p(np.abs(scores))


RATIO_SCORE_LABEL = "sign(s)·log(1+|s|)   (← converged | not converged →)"
RATIO_SCORE_TITLE = ("score s: < 0 converged (s = −Σ loss ratio), > 0 not converged (s = Σ 1/ratio),\n"
                     "ratio = training loss ÷ base model's loss on the same batch; shown as sign·log(1+|s|)")
CLASS_COLOURS = {CONVERGED: "tab:blue", MARGINAL: "orange", NOT_CONVERGED: "tab:red"}
_SEGMENT = 64  # colours per class in the threshold map


def _thresholds(view: GridView) -> tuple[float, float]:
    criterion = view.criterion
    return float(criterion["converged_below"]), float(criterion.get("not_converged_above", NOT_CONVERGED_ABOVE))


def _is_threshold(view: GridView) -> bool:
    return (view.criterion or {}).get("criterion") == "threshold"


def threshold_colours() -> ListedColormap:
    """Three bands over score -1..2: blues (converged, darker = lower loss), yellows (marginal), reds
    (not converged, darker = higher loss)."""
    t = np.linspace(0, 1, _SEGMENT)
    return ListedColormap(np.vstack([plt.get_cmap("Blues")(0.95 - 0.55 * t), plt.get_cmap("YlOrBr")(0.1 + 0.25 * t),
                                     plt.get_cmap("Reds")(0.5 + 0.45 * t)]), name="threshold_classes")


def threshold_values(view: GridView) -> np.ndarray:
    """The threshold score (-1..2), kept inside its class's band (by the stored label) so that every cell's
    colour says its class: converged in [-1, 0), marginal in [0, 1), not converged in [1, 2]."""
    s = np.array(view.scores, dtype=float)
    labels = view.labels
    if labels is None:
        return s
    eps = 1.0 / (2 * _SEGMENT)
    out = np.full_like(s, np.nan)
    for label, lo, hi in ((CONVERGED, -1.0, -eps), (MARGINAL, 0.0, 1 - eps), (NOT_CONVERGED, 1.0 + eps, 2.0)):
        sel = (labels == label) & ~np.isnan(s)
        out[sel] = np.clip(s[sel], lo, hi)
    return out


def score_figure(view: GridView):
    """The convergence map: the score by the study's criterion, with the boundary. The ratio criterion draws
    sign·log(1+|s|) blue (converged) to red (not converged); the threshold criterion three colour bands, one
    per class, so marginal cells are told from not converged ones."""
    if not _is_threshold(view):
        s = signed_log(view.scores)
        return _heatmap(view, s, RATIO_SCORE_LABEL, "coolwarm", score_norm(s), title=RATIO_SCORE_TITLE)
    c, d = _thresholds(view)
    fig = _heatmap(view, threshold_values(view), "class (ticks: final-loss thresholds)", threshold_colours(),
                   Normalize(-1.0, 2.0),
                   title=f"class by final training loss: converged < {c:g} ≤ marginal ≤ {d:g} < not converged "
                         f"(or non-finite)\nshade: score log(final/{c:g}) / log({d:g}/{c:g})")
    bar = fig.axes[-1]
    bar.set_yticks([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0],
                   ["", DISPLAY[CONVERGED], f"{c:g}", DISPLAY[MARGINAL], f"{d:g}", DISPLAY[NOT_CONVERGED], ""])
    return fig


def ratio_norm(ratios: np.ndarray):
    """Colours centred on a ratio of 1 on a log scale: below 1 blue, above red (each side its own range)."""
    finite = ratios[np.isfinite(ratios) & (ratios > 0)]
    if finite.size == 0:
        return None
    lo, hi = min(float(finite.min()), 1 / 1.01), max(float(finite.max()), 1.01)
    a, b = -np.log(lo), np.log(hi)

    def forward(x):
        lx = np.log(np.maximum(x, 1e-300))
        return np.where(lx < 0, lx / a, lx / b)

    def inverse(y):
        return np.exp(np.where(y < 0, y * a, y * b))

    return FuncNorm((forward, inverse), vmin=lo, vmax=hi)


_RATIO_TICKS = (1e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2, 3, 5, 10, 20, 50, 100,
                1e3, 1e4)
RELATIVE_FINAL_TITLE = "final loss ÷ base model's loss on the same batch"


def final_loss_figure(view: GridView):
    """Final training loss relative to the base model's loss on the same (last) batch: how much each
    fine-tune improved on that batch, not how hard the batch was. Raw final loss when no base loss is stored."""
    rel = view.relative_final_loss()
    if rel is None:
        return _heatmap(view, view.final_loss, "final training loss", "magma_r",
                        title="final training loss (no base-model loss stored to compare with)")
    fig = _heatmap(view, rel, "final loss ÷ base loss   (< 1: better than the base model)", "coolwarm",
                   ratio_norm(rel), title=RELATIVE_FINAL_TITLE)
    norm = fig.axes[0].collections[0].norm
    if isinstance(norm, FuncNorm):  # ticks at 1 and round ratios on either side, none crowding another
        ticks: list[float] = []
        for t in sorted(_RATIO_TICKS, key=lambda t: abs(np.log(t))):
            if norm.vmin <= t <= norm.vmax and all(abs(float(norm(t)) - float(norm(u))) >= 0.07 for u in ticks):
                ticks.append(t)
        ticks.sort()
        fig.axes[-1].set_yticks(ticks, [f"{t:g}" for t in ticks])
    return fig


def eval_loss_figure(view: GridView):
    return _heatmap(view, view.eval_loss, "held-out eval loss", "magma_r",
                    title="held-out eval loss after fine-tuning (same eval tokens for every cell)")


def _reference(view: GridView, i: int, j: int, n: int) -> np.ndarray | None:
    """What the ratio criterion divides cell (i, j)'s n losses by: the base model's losses on the same
    batches, else its loss before any update; None when neither is stored."""
    base = None if view.base_trajectories is None else view.base_trajectories.get((i, j))
    if base is not None and len(base) == n:
        return np.asarray(base, dtype=float)
    if view.initial_loss is not None and np.isfinite(view.initial_loss[j, i]) and view.initial_loss[j, i] > 0:
        return np.full(n, float(view.initial_loss[j, i]))
    return None


def _label_of(view: GridView, i: int, j: int) -> str:
    if view.labels is not None and view.labels[j, i]:
        return str(view.labels[j, i])
    return CONVERGED if view.converged[j, i] else NOT_CONVERGED


def plot_trajectories(
    view: GridView, trajectories: dict[tuple[int, int], np.ndarray], rows: Sequence[int], max_lines: int = 12
):
    """Per-step losses of the cells in the chosen rows (a sample of columns), coloured by class (blue
    converged, gold dash-dot marginal, red not converged; darker = larger x), against the reference the criterion uses:
    ratio criterion: loss ÷ base model's loss on the same batch, with the line at 1; threshold criterion:
    the training loss with both thresholds and the base model's loss on the same batches."""
    threshold = _is_threshold(view)
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 2.9 * len(rows)), squeeze=False, constrained_layout=True)
    shades = {CONVERGED: ("Blues", 0.45, 0.95), MARGINAL: ("YlOrBr", 0.35, 0.55), NOT_CONVERGED: ("Reds", 0.55, 0.95)}
    for ax, j in zip(axes[:, 0], rows, strict=True):
        cols = np.unique(np.linspace(0, len(view.xs) - 1, min(max_lines, len(view.xs))).astype(int))
        base_row = None
        for i in cols:
            traj = trajectories.get((int(i), int(j)))
            if traj is None or len(traj) == 0:
                continue
            traj = np.asarray(traj, dtype=float)
            label = _label_of(view, int(i), int(j))
            ref = _reference(view, int(i), int(j), len(traj))
            if threshold:
                y = traj
                base = None if view.base_trajectories is None else view.base_trajectories.get((int(i), int(j)))
                if base is not None and (base_row is None or len(base) > len(base_row)):
                    base_row = np.asarray(base, dtype=float)
            elif ref is None:
                continue  # no reference stored: the criterion's ratio can't be drawn
            else:
                with np.errstate(invalid="ignore", divide="ignore"):
                    y = traj / ref
            lo, hi = shades.get(label, ("Greys", 0.45, 0.95))[1:]
            shade = plt.get_cmap(shades.get(label, ("Greys",))[0])(lo + (hi - lo) * i / max(1, len(view.xs) - 1))
            ax.plot(np.arange(len(y)), y, color=shade, lw=1.1, ls="-." if label == MARGINAL else "-",
                    label=f"{value_text(view.x_name, view.xs[i], view.budget_unit)}: {DISPLAY.get(label, label)}")
        drew = bool(ax.lines)
        if threshold:
            c, d = _thresholds(view)
            ax.axhline(c, color=CLASS_COLOURS[CONVERGED], ls="--", lw=1, label=f"converged below {c:g}")
            ax.axhline(d, color=CLASS_COLOURS[NOT_CONVERGED], ls="--", lw=1, label=f"not converged above {d:g}")
            if base_row is not None:
                ax.plot(np.arange(len(base_row)), base_row, color="black", ls=":", lw=1.2,
                        label="base model's loss on the same batch")
            ax.set_ylabel("training loss")
        else:
            ax.axhline(1.0, color="black", ls="--", lw=1, label="base model's loss (ratio 1)")
            ax.set_ylabel("training loss ÷ base model's\nloss on the same batch")
        ax.set_yscale("log")
        row = value_text(view.y_name, view.ys[j], view.budget_unit)
        if drew:
            ax.set_title(row, fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        else:  # a row of a study still running
            ax.set_title(f"{row}: no cell trained yet", fontsize=9)
    for ax in axes[:, 0]:  # steps are whole: a one-step run must not read -0.04, -0.02, 0.00, ...
        # the trajectories' points (the thresholds' horizontal lines span the axes, not steps)
        longest = max((len(line.get_xdata()) for line in ax.lines if line.get_transform() == ax.transData),
                      default=0)
        if longest <= 1:
            ax.set_xlim(-0.5, 0.5)
            ax.set_xticks([0])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("optimizer step")
    if threshold:
        fig.suptitle("training loss per step; class by the final loss against the thresholds", fontsize=9)
    else:
        fig.suptitle("converged iff the mean ratio over the last 20 steps is < 1 (below the dashed line)", fontsize=9)
    return fig


STABILITY_LABEL = "stability boundary (stopped as unstable beyond)"
TRAINABILITY_LABEL = "trainability boundary (converged within)"


def stability_figure(view: GridView):
    """Stability and trainability apart: cells the trainer stopped as unstable (non-finite or runaway loss), cells
    that stayed stable but did not converge (at a low LR, too small a step to beat the reference), and converged
    cells; each boundary drawn on its own, so an untrained cell is not read as a not converged one."""
    pending = np.isnan(view.scores)
    unstable = view.unstable if view.unstable is not None else ~view.converged & ~pending
    values = np.where(view.converged, 0.0, np.where(unstable, 2.0, 1.0))
    values[pending] = np.nan
    colours = ListedColormap(["#3b6fb6", "#d9d9d9", "#c0392b"])
    fig = _heatmap(view, values, "", colours, Normalize(-0.5, 2.5), boundary=False,
                   title="stability and trainability: converged, stable but untrained, stopped as unstable")
    ax, bar = fig.axes[0], fig.axes[-1]
    bar.set_yticks([0, 1, 2], ["converged", "stable,\nnot trained", "unstable"])
    for mask, style, label in ((~unstable, "-", STABILITY_LABEL), (view.converged, "--", TRAINABILITY_LABEL)):
        drawn = np.ma.masked_where(pending, mask.astype(float))
        if drawn.count() and drawn.min() != drawn.max() and min(drawn.shape) >= 2:
            ax.contour(view.xs, view.ys, drawn, levels=[0.5], colors="black", linewidths=0.9, linestyles=style)
            ax.plot([], [], color="black", lw=0.9, linestyle=style, label=label)
    if ax.get_legend_handles_labels()[0]:
        legend_outside(ax)
    return fig


def plot_figures(
    view: GridView,
    trajectories: dict[tuple[int, int], np.ndarray] | None = None,
    rows: Sequence[int] = (),
) -> dict:
    """The pictures of `save_plots` as matplotlib figures, by file stem (the caller closes them); no eval-loss map
    for a study that took no eval loss (--eval-tokens 0)."""
    figures = {"score": score_figure(view), "stability": stability_figure(view),
               "final_loss": final_loss_figure(view)}
    if np.isfinite(view.eval_loss).any():
        figures["eval_loss"] = eval_loss_figure(view)
    if trajectories is not None and rows:
        figures["trajectories"] = plot_trajectories(view, trajectories, rows)
    return figures


def save_plots(
    view: GridView,
    out_dir: Path,
    formats: Sequence[str] = ("png",),
    trajectories: dict[tuple[int, int], np.ndarray] | None = None,
    rows: Sequence[int] = (),
) -> list[Path]:
    """Score heatmap with the boundary, final loss relative to the base model's and eval-loss heatmaps, and
    trajectories of `rows`."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir}: a file, not a folder; give --out a folder for the pictures")
    for name in ("score", "stability", "final_loss", "eval_loss", "trajectories"):
        for fmt in formats:  # all of them before any picture is drawn
            check_output(out_dir / f"{name}.{fmt}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in plot_figures(view, trajectories, rows).items():
        for fmt in formats:
            path = check_output(out_dir / f"{name}.{fmt}")
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    check_output(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- box counting


def box_counts_figure(box: FractalResult):
    """Left: box counts against box size (log-log), the points in the fit range filled, those left out hollow
    grey, and the fitted model A (s + delta)^-D over the fit range. Right: the local slope (over one octave)
    against box size with the estimate and its interval: a flat stretch is a scaling range, a drift says the
    resolution does not settle the dimension."""
    sizes, counts = np.asarray(box.box_sizes, float), np.asarray(box.box_counts, float)
    fig, (ax, ax_slope) = plt.subplots(1, 2, figsize=(10.5, 4.2), constrained_layout=True)
    lo, hi = box.fit_range
    inside = (sizes >= lo) & (sizes <= hi)
    ax.loglog(sizes[inside], counts[inside], "o", color="C0", label=f"box counts (fitted: s = {lo}…{hi})")
    if (~inside).any():
        ax.loglog(sizes[~inside], counts[~inside], "o", mfc="none", mec="grey", color="grey",
                  label="box counts left out of the fit")
    fit_s, _ = box.fit_sizes()
    # a map too small for a number gets none here either: its slopes are drawn, no fit is claimed
    estimate = "slope (too small a map for a dimension)" if box.too_small else "D"
    ax.loglog(fit_s, box.fitted_counts(fit_s), "-", color="C1",
              label=f"fit: {estimate} = {box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}]")
    ax.set_xlabel("box size s (cells)")
    ax.set_ylabel("boxes N(s) holding boundary")
    ax.set_title(f"box counting at {box.resolution[0]}×{box.resolution[1]}"
                 + (": too small a map to measure a dimension" if box.too_small else ""))
    ax.legend(fontsize=8)

    local = np.asarray(box.local_slopes, dtype=float)
    known = np.isfinite(local)
    ax_slope.semilogx(sizes[known], local[known], "o-", ms=3, color="C0", label="local slope (one octave)")
    ax_slope.axvspan(lo, hi, color="C0", alpha=0.08, label=f"fit range {lo}…{hi}")
    ax_slope.axhspan(box.ci_low, box.ci_high, color="C1", alpha=0.2, label="95% CI")
    ax_slope.axhline(box.dimension, color="C1", lw=1, label=f"{estimate} = {box.dimension:.3f}")
    ax_slope.set_xlabel("box size s (cells)")
    ax_slope.set_ylabel("local slope −dlog N / dlog s")
    ax_slope.set_title("local slope: flat where the boundary scales")
    ax_slope.legend(fontsize=8)
    return fig


def plot_box_counts(box: FractalResult, path: Path) -> Path:
    """`box_counts_figure` saved to ``path``."""
    return _save(box_counts_figure(box), Path(path))


def plot_zoom_box_counts(curves: Sequence[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Path:
    """Box counts of several zoom levels against box size in top-level cells (log-log): one
    ``(label, sizes, counts)`` curve per level."""
    fig, ax = plt.subplots(figsize=(5.8, 4.2), constrained_layout=True)
    for label, sizes, counts in curves:
        ax.loglog(np.asarray(sizes, dtype=float), np.asarray(counts, dtype=float), "o-", ms=4, label=label)
    ax.set_xlabel("box size (top-level cells)")
    ax.set_ylabel("boxes N(s) holding boundary")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- out-of-distribution skill


def plot_ood(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], path: Path) -> Path:
    """Accuracy against distance to the boundary: one ``(label, distances, accuracies)`` series per task."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    for label, xs, ys in series:
        ax.plot(xs, ys, "o", ms=4, alpha=0.75, label=label)
    ax.set_xlabel("distance to the convergence boundary (grid cells)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------- rules of thumb


def _size_major_view(result: RulesResult) -> GridView | None:
    """The study's view with dataset size on x and LR on y (transposed when the study has LR on x)."""
    v = result.view
    if v is None or result.lr_on == "y":
        return v
    return v.transposed()


def _span(rng: tuple[float, float], values: np.ndarray | None, log: bool) -> tuple[float, float]:
    """Plot limits: the heatmap's cell edges if drawn (positive: the axes are log), else the range +-10%."""
    lo, hi = rng[0] / 1.1, rng[1] * 1.1
    if values is not None and len(values) > 1:
        e = _edges(np.asarray(values, dtype=float), log)
        lo, hi = (float(e[0]) if e[0] > 0 else lo), float(e[-1])
    return lo, hi


def _rules_points(ax, result: RulesResult) -> None:
    """Per-size edges and optima, and the censored sizes at the grid's edge."""
    rows = result.sizes

    def pts(attr: str) -> tuple[list[float], list[float]]:
        sel = [r for r in rows if getattr(r, attr) is not None]
        return [r.size for r in sel], [getattr(r, attr) for r in sel]

    ax.plot(*pts("lr_first_diverging"), "v", color="crimson", mec="white", ms=7, label="first diverging LR")
    ax.plot(*pts("lr_last_converging"), "^", color="navy", mec="white", ms=7, label="last converging LR")
    ax.plot(*pts("lr_opt"), "*", color="gold", mec="black", ms=11, label="optimal LR (lowest eval loss)")
    tmin = [r for r in result.lrs if r.censored is None]
    if tmin:
        ax.plot([r.tokens_min for r in tmin], [r.lr for r in tmin], ">", color="darkorange", mec="white", ms=6,
                label="tokens_min (smallest converging D per LR)")
    cens = [r for r in rows if r.censored]
    if cens:
        lo, hi = result.lr_range
        ax.plot([r.size for r in cens], [hi if r.censored == "above grid" else lo for r in cens], "x",
                color="grey", ms=8, label="censored (edge outside grid)")


def _rules_fits(ax, result: RulesResult) -> None:
    d = np.geomspace(*result.size_range, 100)
    for fit, style, color, name in ((result.crit_fit, "-", "crimson", "LR_crit fit"),
                                    (result.crit_last_fit, "--", "navy", "last-converging fit"),
                                    (result.safe_fit, "-.", "green", "safe = 0.5 LR_crit"),
                                    (result.opt_fit, ":", "black", "LR_opt fit")):
        if fit is not None:
            ax.plot(d, fit.predict(d), style, color=color, lw=1.6,
                    label=f"{name}: {fit.coefficient:.2g}·D^{fit.exponent:.2f}")
    fit = result.tokens_min_fit
    if fit is not None:  # D = a LR^c, drawn over the LRs it was fitted on
        lr = np.geomspace(min(fit.sizes), max(fit.sizes), 100)
        ax.plot(fit.predict(lr), lr, linestyle=(0, (5, 1, 1, 1)), color="darkorange", lw=1.6,
                label=f"tokens_min fit: {fit.coefficient:.2g}·LR^{fit.exponent:.2f}")


def plot_rules(result: RulesResult, path: str | os.PathLike) -> Path:
    """LR vs dataset size (log-log): per-size edges and optima, fitted lines and the safe line, over the
    score heatmap with its boundary when the result carries the study's view. Format from the suffix."""
    path = picture_file(path)
    # the map's columns are token budgets: under another unit the points stand alone
    view = _size_major_view(result) if result.size_unit == result.budget_unit else None
    if view is not None:
        fig = score_figure(view)
        ax = fig.axes[0]
    else:
        fig, ax = plt.subplots(figsize=(6.4, 5.2), constrained_layout=True)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"dataset size D ({SIZE_UNIT_NAMES[result.size_unit]})")
    ax.set_ylabel(axis_label(result.lr_axis, "" if view is None else view.optimizer))
    _rules_points(ax, result)
    _rules_fits(ax, result)
    ax.set_xlim(*_span(result.size_range, None if view is None else view.xs, view is None or view.x_log))
    ax.set_ylim(*_span(result.lr_range, None if view is None else view.ys, view is None or view.y_log))
    ax.set_xscale("log")
    ax.set_yscale("log")
    if view is not None:  # set_xscale reset the map's tidy ticks
        _short_log_axis(ax.xaxis, view.xs)
        _short_log_axis(ax.yaxis, view.ys)
    ax.set_title((f"{view.title}\n" if view is not None and view.title else "") + "LR rules of thumb")
    legend_outside(ax)
    return _save(fig, path)


# ----------------------------------------------------------------------------- two studies compared

_COMPARE_CLASSES = ("not converged in both", "converged in both", "converged in A only", "converged in B only")
_COMPARE_COLOURS = ("#d9d9d9", "#9ecae1", "#d7301f", "#1a9850")


def compare_figure(result: CompareResult):
    """Left: the difference map (cells by class in A and B) with both boundaries; right, when the axes are an LR
    and tokens: LR_crit of both against dataset size."""
    va, vb = result.views
    codes = va.converged.astype(int) + 2 * vb.converged.astype(int)  # 0 none, 1 A, 2 B, 3 both
    category = np.choose(codes, [0, 2, 3, 1])
    right = bool(result.crit)
    fig, axes = plt.subplots(1, 2 if right else 1, figsize=(11.5 if right else 6.4, 5.0), constrained_layout=True,
                             squeeze=False)
    ax = axes[0, 0]
    ax.pcolormesh(_edges(va.xs, va.x_log), _edges(va.ys, va.y_log), category,
                  cmap=ListedColormap(_COMPARE_COLOURS), vmin=-0.5, vmax=3.5)
    for view, style, name in ((va, "-", "A"), (vb, "--", "B")):
        if view.converged.any() and not view.converged.all():
            ax.contour(va.xs, va.ys, view.converged.astype(float), levels=[0.5], colors="black",
                       linewidths=1.0, linestyles=style)
            ax.plot([], [], "k" + style, lw=1.0, label=f"boundary of {name}")
    for colour, name in zip(_COMPARE_COLOURS, _COMPARE_CLASSES, strict=True):
        ax.plot([], [], "s", color=colour, ms=9, label=name)
    _axes(ax, va)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside lower center", ncol=len(labels), frameon=False)
    ax.set_title(f"{result.changed} of {codes.size} cells changed class; converged: A "
                 f"{result.converged_share_a:.0%}, B {result.converged_share_b:.0%}", fontsize=9)
    if right:
        ax = axes[0, 1]
        for attr, marker, colour, name in (("lr_crit_a", "o-", "#d7301f", "A"), ("lr_crit_b", "s--", "#1a9850", "B")):
            pts = [(r.size, getattr(r, attr)) for r in result.crit if getattr(r, attr) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker, color=colour, ms=5, label=f"LR_crit of {name}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis_label(SIZE_AXIS, budget_unit=result.size_unit))
        ax.set_ylabel(f"first diverging {axis_label('lr', va.optimizer)}")
        ax.legend(fontsize=8)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title("critical LR per dataset size", fontsize=9)
    delta = "" if result.delta_d is None else (f"; ΔD = D_B − D_A = {result.delta_d:+.3f} "
                                               f"[{result.delta_d_ci[0]:+.3f}, {result.delta_d_ci[1]:+.3f}]")
    fig.suptitle(f"A: {result.a}   B: {result.b}{delta}", fontsize=9)
    return fig


def plot_compare(result: CompareResult, path: str | os.PathLike) -> Path:
    """The comparison figure; format from the suffix."""
    path = picture_file(path)
    if result.views is None:
        raise ConfigError(f"--plot {path}: the difference map matches cells, and grids of different resolutions "
                          "have none in common; compare without --plot")
    return _save(compare_figure(result), path)


# ----------------------------------------------------------------------------- early warning signs

DISTANCE_BINS = (-np.inf, -4.0, -2.0, 0.0, 2.0, 4.0, np.inf)  # grid cells to the boundary; negative = converged


def _median_curve(arrays: Sequence[np.ndarray], min_cells: int = 3) -> np.ndarray:
    """Median over cells at each step, over the cells that reached it (NaN/inf count as the worst value); NaN
    where fewer than ``min_cells`` reached the step."""
    width = max((len(a) for a in arrays), default=0)
    mat = np.full((len(arrays), width), np.nan)
    for r, a in enumerate(arrays):
        mat[r, :len(a)] = np.where(np.isfinite(a), a, np.inf)
    out = np.full(width, np.nan)
    for s in range(width):
        col = mat[:, s][~np.isnan(mat[:, s])]
        if len(col) >= min_cells:
            out[s] = np.median(col)
    return out


def early_warning_figure(result: WarningResult):
    """Median loss ratio and gradient norm per step, one line per band of signed distance to the boundary, and
    each feature's ROC AUC against k with its 95% interval."""
    from matplotlib import colormaps

    curves = result.curves
    dist = np.asarray(curves["distance"], dtype=float)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    colours = colormaps["coolwarm"](np.linspace(0, 1, len(DISTANCE_BINS) - 1))
    for b, (lo, hi) in enumerate(zip(DISTANCE_BINS[:-1], DISTANCE_BINS[1:], strict=True)):
        members = np.flatnonzero((dist > lo) & (dist <= hi))
        if not len(members):
            continue
        name = (f"d ≤ {hi:g}" if not np.isfinite(lo) else f"d > {lo:g}" if not np.isfinite(hi)
                else f"{lo:g} < d ≤ {hi:g}") + f" ({len(members)} cells)"
        for ax, key in ((axes[0], "ratio"), (axes[1], "grad_norm")):
            med = _median_curve([curves[key][m] for m in members])
            steps = np.arange(1, len(med) + 1)
            ax.plot(steps, np.where(np.isfinite(med), med, np.nan), color=colours[b], lw=1.8, label=name)
    for ax, ylabel in ((axes[0], "training loss / base model's loss (median)"),
                       (axes[1], "gradient norm (median)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].axhline(1.0, color="black", lw=0.8, ls=":")
    axes[0].legend(fontsize=7, title="signed distance d to the boundary\n(grid cells; < 0 converged)",
                   title_fontsize=7)
    axes[0].set_title("loss ratio by distance to the boundary", fontsize=9)
    axes[1].set_title("gradient norm by distance to the boundary", fontsize=9)
    ax = axes[2]
    for n, feature in enumerate(FEATURES):
        pts = [a for a in result.aucs if a.feature == feature and a.auc is not None]
        if not pts:
            continue
        ks = np.array([a.k for a in pts], dtype=float) * (1 + 0.04 * (n - 2))  # side by side, not on top
        auc = np.array([a.auc for a in pts])
        err = np.array([[a.auc - (a.ci_low if a.ci_low is not None else a.auc) for a in pts],
                        [(a.ci_high if a.ci_high is not None else a.auc) - a.auc for a in pts]])
        ax.errorbar(ks, auc, yerr=err, marker="o", ms=4, capsize=2, lw=1.2, label=feature)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    if result.earliest is not None:
        ax.axvline(result.earliest.k, color="black", lw=0.8, ls="--",
                   label=f"earliest {result.precision:.0%}-precision rule (k = {result.earliest.k})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("steps seen k")
    ax.set_ylabel("ROC AUC for 'will not converge' (95% CI)")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize=7, loc="best", framealpha=0.9)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("how early the first k steps tell", fontsize=9)
    fig.suptitle(f"early warning signs: {result.study} ({result.n_cells} cells, {result.n_failed} not converged)",
                 fontsize=10)
    return fig


def plot_early_warning(result: WarningResult, path: str | os.PathLike) -> Path:
    """The early-warning figure; format from the suffix."""
    path = picture_file(path)
    return _save(early_warning_figure(result), path)


# ----------------------------------------------------------------------------- LR_crit across model sizes


def plot_joint_rules(result: JointResult, path: str | os.PathLike) -> Path:
    """LR_crit against dataset size, one colour per model size, with the joint fit drawn at each model's size;
    right: the same points with the dataset-size dependence divided out, against model size."""
    from matplotlib import colormaps

    path = picture_file(path)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11.5, 4.8), constrained_layout=True)
    order = sorted(result.studies, key=lambda s: s.params)
    colours = colormaps["viridis"](np.linspace(0.05, 0.85, len(order)))
    f = result.fit
    for s, colour in zip(order, colours, strict=True):
        if not s.sizes:
            continue
        ax.plot(s.sizes, s.lr_crit, "o", color=colour, mec="white", label=f"P = {s.params:.3g} ({s.study})")
        if f is not None:
            d = np.geomspace(min(s.sizes), max(s.sizes), 50)
            ax.plot(d, f.predict(d, s.params), "-", color=colour, lw=1.4)
            scaled = np.asarray(s.lr_crit) / np.asarray(s.sizes) ** f.size_exponent.value
            ax2.plot([s.params] * len(s.sizes), scaled, "o", color=colour, mec="white")
    for a in (ax, ax2):
        a.set_xscale("log")
        a.set_yscale("log")
        a.grid(True, which="major", alpha=0.3)
    ax.set_xlabel(axis_label(SIZE_AXIS))
    ax.set_ylabel(f"critical {result.lr_axis} (first diverging)")
    ax.legend(fontsize=7)
    if f is not None:
        p = np.geomspace(min(s.params for s in order) / 1.5, max(s.params for s in order) * 1.5, 50)
        ax2.plot(p, f.predict(1.0, 1.0) * p ** f.params_exponent.value, "k-", lw=1.2,
                 label=f"P^{f.params_exponent.value:.2f}")
        ax2.legend(fontsize=8)
        ax.set_title(f"joint fit: {joint_formula(f)} (R² {f.r2:.2f})", fontsize=9)
        ax2.set_ylabel(f"LR_crit / D^{f.size_exponent.value:.2f}")
    ax2.set_xlabel("model size P (parameters)")
    ax2.set_title("dataset-size dependence divided out", fontsize=9)
    return _save(fig, path)


# ----------------------------------------------------------------------------- a refined study's finest level
REFINED_CLASSES = ("converged, trained", "converged, inferred", "not converged, trained", "not converged, inferred")


def refined_figure(refined):
    """A refined study's level (analysis/refined.py, RefinedMap): trained cells in full colour, inferred ones (the
    class of their uniform coarse neighbourhood) in a light tint of it, and the boundary."""
    from vmap_sweep.analysis.classify import converged_mask

    converged = converged_mask(refined.map.labels)
    inferred = refined.map.inferred
    values = np.where(converged, np.where(inferred, 1.0, 0.0), np.where(inferred, 3.0, 2.0))
    colours = ListedColormap(["#3b6fb6", "#b7cde9", "#c0392b", "#f1c0b9"])
    fig, ax = plt.subplots(figsize=(6.4, 5.2), constrained_layout=True)
    mesh = ax.pcolormesh(_edges(refined.xs, refined.x_log), _edges(refined.ys, refined.y_log), values, cmap=colours,
                         norm=Normalize(-0.5, 3.5))
    bar = fig.colorbar(mesh, ax=ax)
    bar.set_ticks([0, 1, 2, 3], labels=[c.replace(", ", ",\n") for c in REFINED_CLASSES])
    if converged.any() and not converged.all():
        ax.contour(refined.xs, refined.ys, converged.astype(float), levels=[0.5], colors="black", linewidths=0.6)
    view = GridView(xs=refined.xs, ys=refined.ys, x_name=refined.x_name, y_name=refined.y_name, x_log=refined.x_log,
                    y_log=refined.y_log, scores=values, converged=converged, final_loss=values, eval_loss=values)
    _axes(ax, view)
    ny, nx = converged.shape
    title = (f"refinement level {refined.level}: {nx}×{ny} cells, {int((~inferred).sum()):,} trained, "
             f"{int(inferred.sum()):,} inferred (light)")
    repeats = int(refined.entry.get("repeat_lines") or 0)
    if repeats and "tokens" in (refined.x_name, refined.y_name):  # where the tokens axis ran out of new data
        title += f"\n{repeats} dataset sizes repeat a smaller one's data: there it was refined along the LR only"
    ax.set_title(title, fontsize=9)
    return fig


def plot_refined(refined, path: Path) -> Path:
    return _save(refined_figure(refined), Path(path))
