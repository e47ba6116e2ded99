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
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402

from vmap_sweep.analysis.classify import CONVERGED, DIVERGED, MARGINAL  # noqa: E402
from vmap_sweep.analysis.fractal import FractalResult  # noqa: E402
from vmap_sweep.analysis.rules import SIZE_AXIS  # noqa: E402
from vmap_sweep.analysis.view import GridView  # noqa: E402
from vmap_sweep.errors import ConfigError  # noqa: E402
from vmap_sweep.study.axes import AXES  # noqa: E402

if TYPE_CHECKING:
    from vmap_sweep.analysis.rules import RulesResult

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def picture_file(path) -> Path:
    """A picture's path, its format from the suffix: any other suffix is a one-line error, before any work."""
    path = Path(path)
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


def axis_label(name: str, optimizer: str = "") -> str:
    """An axis name as a reader needs it: what it is and its unit, e.g. ``dataset size (tokens)``."""
    if name == "lr":
        return _LR_LABELS.get(optimizer, "learning rate (lr)")
    if name in _AXIS_LABELS:
        return _AXIS_LABELS[name]
    if name in AXES:  # the registry's description up to its first detail, then the axis name
        return f"{AXES[name].description.split(';')[0].split(' (')[0]} ({name})"
    return name


def value_text(name: str, value: float) -> str:
    """One axis value in words, e.g. ``dataset size = 2048 tokens`` or ``lr = 0.001``."""
    if name == "tokens":
        return f"dataset size = {value:.0f} tokens"
    if name == "batch_size":
        return f"batch size = {value:.0f} tokens per step"
    if name in _AXIS_LABELS:
        return f"{_AXIS_LABELS[name].split(' (')[0]} = {value:.4g}"
    return f"{name} = {value:.3g}"


def _short_log_axis(axis, values: np.ndarray) -> None:
    """A log axis spanning under 2 decades: ticks at 1, 2, 5 × 10^k written plainly (e.g. 500, 0.002),
    instead of crowded minor labels like 2×10^-3 4×10^-3 6×10^-3."""
    e = _edges(np.asarray(values, dtype=float), True)
    if len(values) > 1 and e[0] > 0 and np.log10(e[-1] / e[0]) < 2.0:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _axes(ax, view: GridView) -> None:
    ax.set_xlabel(axis_label(view.x_name, view.optimizer))
    ax.set_ylabel(axis_label(view.y_name, view.optimizer))
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
    ax.legend(loc="best", fontsize=7, framealpha=0.85)
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
    if boundary:
        _boundary(ax, view)
    _axes(ax, view)
    what = label if title is None else title
    ax.set_title(f"{view.title}\n{what}" if view.title else what, fontsize=9)
    return fig


def score_norm(scores: np.ndarray):
    """Diverging colours centred on 0: converged (negative) blue, diverged red, on a symmetric-log scale."""
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return None
    lo, hi = min(finite.min(), -1e-9), max(finite.max(), 1e-9)
    return TwoSlopeNorm(vcenter=0.0, vmin=lo, vmax=hi)


def signed_log(scores: np.ndarray) -> np.ndarray:
    """sign(s) * log1p(|s|): the ratio score spans many decades; this keeps both sides readable."""
    return np.sign(scores) * np.log1p(np.abs(scores))


RATIO_SCORE_LABEL = "sign(s)·log(1+|s|)   (← converged | diverged →)"
RATIO_SCORE_TITLE = ("score s: < 0 converged (s = −Σ loss ratio), > 0 diverged (s = Σ 1/ratio),\n"
                     "ratio = training loss ÷ base model's loss on the same batch; shown as sign·log(1+|s|)")
CLASS_COLOURS = {CONVERGED: "tab:blue", MARGINAL: "orange", DIVERGED: "tab:red"}
_SEGMENT = 64  # colours per class in the threshold map


def _thresholds(view: GridView) -> tuple[float, float]:
    return float(view.criterion["converged_below"]), float(view.criterion.get("diverged_above", 10.0))


def _is_threshold(view: GridView) -> bool:
    return (view.criterion or {}).get("criterion") == "threshold"


def threshold_colours() -> ListedColormap:
    """Three bands over score -1..2: blues (converged, darker = lower loss), yellows (marginal), reds
    (diverged, darker = higher loss)."""
    t = np.linspace(0, 1, _SEGMENT)
    return ListedColormap(np.vstack([plt.get_cmap("Blues")(0.95 - 0.55 * t), plt.get_cmap("YlOrBr")(0.1 + 0.25 * t),
                                     plt.get_cmap("Reds")(0.5 + 0.45 * t)]), name="threshold_classes")


def threshold_values(view: GridView) -> np.ndarray:
    """The threshold score (-1..2), kept inside its class's band (by the stored label) so that every cell's
    colour says its class: converged in [-1, 0), marginal in [0, 1), diverged in [1, 2]."""
    s = np.array(view.scores, dtype=float)
    labels = view.labels
    if labels is None:
        return s
    eps = 1.0 / (2 * _SEGMENT)
    out = np.full_like(s, np.nan)
    for label, lo, hi in ((CONVERGED, -1.0, -eps), (MARGINAL, 0.0, 1 - eps), (DIVERGED, 1.0 + eps, 2.0)):
        sel = (labels == label) & ~np.isnan(s)
        out[sel] = np.clip(s[sel], lo, hi)
    return out


def score_figure(view: GridView):
    """The convergence map: the score by the study's criterion, with the boundary. The ratio criterion draws
    sign·log(1+|s|) blue (converged) to red (diverged); the threshold criterion three colour bands, one per
    class, so marginal cells are told from diverged ones."""
    if not _is_threshold(view):
        s = signed_log(view.scores)
        return _heatmap(view, s, RATIO_SCORE_LABEL, "coolwarm", score_norm(s), title=RATIO_SCORE_TITLE)
    c, d = _thresholds(view)
    fig = _heatmap(view, threshold_values(view), "class (ticks: final-loss thresholds)", threshold_colours(),
                   Normalize(-1.0, 2.0),
                   title=f"class by final training loss: converged < {c:g} ≤ marginal ≤ {d:g} < diverged "
                         f"(or non-finite)\nshade: score log(final/{c:g}) / log({d:g}/{c:g})")
    bar = fig.axes[-1]
    bar.set_yticks([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0],
                   ["", CONVERGED, f"{c:g}", MARGINAL, f"{d:g}", DIVERGED, ""])
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
    return CONVERGED if view.converged[j, i] else DIVERGED


def plot_trajectories(
    view: GridView, trajectories: dict[tuple[int, int], np.ndarray], rows: Sequence[int], max_lines: int = 12
):
    """Per-step losses of the cells in the chosen rows (a sample of columns), coloured by class (blue
    converged, gold dash-dot marginal, red diverged; darker = larger x), against the reference the criterion uses:
    ratio criterion: loss ÷ base model's loss on the same batch, with the line at 1; threshold criterion:
    the training loss with both thresholds and the base model's loss on the same batches."""
    threshold = _is_threshold(view)
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 2.9 * len(rows)), squeeze=False, constrained_layout=True)
    shades = {CONVERGED: ("Blues", 0.45, 0.95), MARGINAL: ("YlOrBr", 0.35, 0.55), DIVERGED: ("Reds", 0.55, 0.95)}
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
                    label=f"{value_text(view.x_name, view.xs[i])}: {label}")
        drew = bool(ax.lines)
        if threshold:
            c, d = _thresholds(view)
            ax.axhline(c, color=CLASS_COLOURS[CONVERGED], ls="--", lw=1, label=f"converged below {c:g}")
            ax.axhline(d, color=CLASS_COLOURS[DIVERGED], ls="--", lw=1, label=f"diverged above {d:g}")
            if base_row is not None:
                ax.plot(np.arange(len(base_row)), base_row, color="black", ls=":", lw=1.2,
                        label="base model's loss on the same batch")
            ax.set_ylabel("training loss")
        else:
            ax.axhline(1.0, color="black", ls="--", lw=1, label="base model's loss (ratio 1)")
            ax.set_ylabel("training loss ÷ base model's\nloss on the same batch")
        ax.set_yscale("log")
        row = value_text(view.y_name, view.ys[j])
        if drew:
            ax.set_title(row, fontsize=9)
            ax.legend(fontsize=6, ncol=2)
        else:  # a row of a study still running
            ax.set_title(f"{row}: no cell trained yet", fontsize=9)
    axes[-1, 0].set_xlabel("optimizer step")
    if threshold:
        fig.suptitle("training loss per step; class by the final loss against the thresholds", fontsize=9)
    else:
        fig.suptitle("converged iff the mean ratio over the last 20 steps is < 1 (below the dashed line)", fontsize=9)
    return fig


def plot_figures(
    view: GridView,
    trajectories: dict[tuple[int, int], np.ndarray] | None = None,
    rows: Sequence[int] = (),
) -> dict:
    """The pictures of `save_plots` as matplotlib figures, by file stem (the caller closes them)."""
    figures = {"score": score_figure(view), "final_loss": final_loss_figure(view), "eval_loss": eval_loss_figure(view)}
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
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in plot_figures(view, trajectories, rows).items():
        for fmt in formats:
            path = out_dir / f"{name}.{fmt}"
            fig.savefig(path, dpi=120)
            written.append(path)
        plt.close(fig)
    return written


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- box counting


def box_counts_figure(box: FractalResult):
    """Box counts against box size (log-log): the points in the fit range filled, those left out hollow grey,
    and the fitted line over the fit range."""
    sizes, counts = np.asarray(box.box_sizes, float), np.asarray(box.box_counts, float)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), constrained_layout=True)
    lo, hi = box.fit_range
    inside = (sizes >= lo) & (sizes <= hi)
    ax.loglog(sizes[inside], counts[inside], "o", color="C0", label=f"box counts (fitted: s = {lo}…{hi})")
    if (~inside).any():
        ax.loglog(sizes[~inside], counts[~inside], "o", mfc="none", mec="grey", color="grey",
                  label="box counts left out of the fit")
    fit_s, _ = box.fit_sizes()
    ax.loglog(fit_s, 2.0 ** (box.intercept - box.dimension * np.log2(fit_s)), "-", color="C1",
              label=f"fit: D = {box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}]")
    ax.set_xlabel("box size s (cells)")
    ax.set_ylabel("boxes N(s) holding boundary")
    ax.set_title(f"box counting at {box.resolution[0]}×{box.resolution[1]}")
    ax.legend(fontsize=8)
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


def plot_rules(result: RulesResult, path: str | os.PathLike) -> Path:
    """LR vs dataset size (log-log): per-size edges and optima, fitted lines and the safe line, over the
    score heatmap with its boundary when the result carries the study's view. Format from the suffix."""
    path = picture_file(path)
    view = _size_major_view(result)
    if view is not None:
        fig = score_figure(view)
        ax = fig.axes[0]
    else:
        fig, ax = plt.subplots(figsize=(6.4, 5.2), constrained_layout=True)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"dataset size D ({SIZE_AXIS})")
    ax.set_ylabel(axis_label(result.lr_axis, "" if view is None else view.optimizer))
    _rules_points(ax, result)
    _rules_fits(ax, result)
    ax.set_xlim(*_span(result.size_range, None if view is None else view.xs, view is None or view.x_log))
    ax.set_ylim(*_span(result.lr_range, None if view is None else view.ys, view is None or view.y_log))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title((f"{view.title}\n" if view is not None and view.title else "") + "LR rules of thumb")
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return _save(fig, path)
