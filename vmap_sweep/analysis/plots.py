"""Pictures of a study: heatmaps over the two axes in real units, the boundary, loss trajectories."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from vmap_sweep.errors import ConfigError  # noqa: E402

PICTURE_SUFFIXES = (".png", ".svg", ".pdf")


def picture_file(path) -> Path:
    """A picture's path, its format from the suffix: any other suffix is a one-line error, before any work."""
    path = Path(path)
    if path.suffix.lower() not in PICTURE_SUFFIXES:
        raise ConfigError(f"{path}: unknown picture format {path.suffix!r}; use a file ending in "
                          f"{', '.join(PICTURE_SUFFIXES)}")
    return path


@dataclass
class GridView:
    """What the plots need of a study: axis values and per-cell arrays of shape (ny, nx)."""

    xs: np.ndarray
    ys: np.ndarray
    x_name: str
    y_name: str
    x_log: bool
    y_log: bool
    scores: np.ndarray
    converged: np.ndarray  # bool; False also where pending
    final_loss: np.ndarray
    eval_loss: np.ndarray
    title: str = ""


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
