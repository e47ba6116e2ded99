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
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from vmap_sweep.analysis.fractal import FractalResult  # noqa: E402
from vmap_sweep.analysis.rules import SIZE_AXIS  # noqa: E402
from vmap_sweep.analysis.view import GridView  # noqa: E402
from vmap_sweep.errors import ConfigError  # noqa: E402

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


def _axes(ax, view: GridView) -> None:
    ax.set_xlabel(view.x_name)
    ax.set_ylabel(view.y_name)
    if view.x_log:
        ax.set_xscale("log")
    if view.y_log:
        ax.set_yscale("log")


def _boundary(ax, view: GridView) -> None:
    # pending cells (no score yet) are left out: a boundary only runs between classified cells
    mask = np.ma.masked_where(np.isnan(view.scores), view.converged.astype(float))
    if mask.count() == 0 or mask.min() == mask.max() or min(mask.shape) < 2:
        return
    ax.contour(view.xs, view.ys, mask, levels=[0.5], colors="black", linewidths=0.8)


def _heatmap(view: GridView, values: np.ndarray, label: str, cmap: str, norm=None, boundary: bool = True):
    fig, ax = plt.subplots(figsize=(6.4, 5.2), constrained_layout=True)
    mesh = ax.pcolormesh(
        _edges(view.xs, view.x_log), _edges(view.ys, view.y_log), np.ma.masked_invalid(values), cmap=cmap, norm=norm
    )
    fig.colorbar(mesh, ax=ax, label=label)
    if boundary:
        _boundary(ax, view)
    _axes(ax, view)
    ax.set_title(f"{view.title}\n{label}" if view.title else label)
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


def plot_trajectories(
    view: GridView, trajectories: dict[tuple[int, int], np.ndarray], rows: Sequence[int], max_lines: int = 12
):
    """Training loss per step of the cells in the chosen rows (a sample of columns), coloured by x."""
    fig, axes = plt.subplots(len(rows), 1, figsize=(6.4, 2.6 * len(rows)), squeeze=False, constrained_layout=True)
    cmap = plt.get_cmap("viridis")
    for ax, j in zip(axes[:, 0], rows, strict=True):
        cols = np.unique(np.linspace(0, len(view.xs) - 1, min(max_lines, len(view.xs))).astype(int))
        for i in cols:
            traj = trajectories.get((int(i), int(j)))
            if traj is None or len(traj) == 0:
                continue
            ax.plot(np.arange(len(traj)), traj, color=cmap(i / max(1, len(view.xs) - 1)), lw=1,
                    label=f"{view.x_name}={view.xs[i]:.3g}")
        ax.set_yscale("log")
        ax.set_ylabel("training loss")
        if ax.lines:
            ax.set_title(f"{view.y_name} = {view.ys[j]:.4g}")
            ax.legend(fontsize=6, ncol=2)
        else:  # a row of a study still running
            ax.set_title(f"{view.y_name} = {view.ys[j]:.4g}: no cell trained yet")
    axes[-1, 0].set_xlabel("step")
    return fig


def save_plots(
    view: GridView,
    out_dir: Path,
    formats: Sequence[str] = ("png",),
    trajectories: dict[tuple[int, int], np.ndarray] | None = None,
    rows: Sequence[int] = (),
) -> list[Path]:
    """Score heatmap with the boundary, final- and eval-loss heatmaps, and trajectories of `rows`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    s = signed_log(view.scores)
    figures = {
        "score": _heatmap(view, s, "score (sign·log1p|s|; < 0 converged)", "coolwarm", score_norm(s)),
        "final_loss": _heatmap(view, view.final_loss, "final training loss", "magma_r"),
        "eval_loss": _heatmap(view, view.eval_loss, "held-out eval loss", "magma_r"),
    }
    if trajectories is not None and rows:
        figures["trajectories"] = plot_trajectories(view, trajectories, rows)
    written = []
    for name, fig in figures.items():
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


def plot_box_counts(box: FractalResult, path: Path) -> Path:
    """Box counts against box size (log-log) with the fitted line over the fit range."""
    sizes, counts = np.asarray(box.box_sizes, float), np.asarray(box.box_counts, float)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), constrained_layout=True)
    ax.loglog(sizes, counts, "o", label="box counts")
    fit_s, _ = box.fit_sizes()
    ax.loglog(fit_s, 2.0 ** (box.intercept - box.dimension * np.log2(fit_s)), "-",
              label=f"fit: D = {box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}]")
    ax.set_xlabel("box size s (cells)")
    ax.set_ylabel("boxes N(s) holding boundary")
    ax.set_title(f"box counting at {box.resolution[0]}×{box.resolution[1]}")
    ax.legend()
    return _save(fig, Path(path))


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
        s = signed_log(view.scores)
        fig = _heatmap(view, s, "score (sign·log1p|s|; < 0 converged)", "coolwarm", score_norm(s))
        ax = fig.axes[0]
    else:
        fig, ax = plt.subplots(figsize=(6.4, 5.2), constrained_layout=True)
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(f"dataset size D ({SIZE_AXIS})")
    ax.set_ylabel(result.lr_axis)
    _rules_points(ax, result)
    _rules_fits(ax, result)
    ax.set_xlim(*_span(result.size_range, None if view is None else view.xs, view is None or view.x_log))
    ax.set_ylim(*_span(result.lr_range, None if view is None else view.ys, view is None or view.y_log))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title((f"{view.title}\n" if view is not None and view.title else "") + "LR rules of thumb")
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return _save(fig, path)
