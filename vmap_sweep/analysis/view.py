"""A study as the pictures and the rules of thumb see it: axis values in real units and per-cell arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from vmap_sweep.analysis.classify import converged_mask
from vmap_sweep.analysis.repeats import sized_cells
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.criterion import NOT_CONVERGED


def _swap(cells: dict[tuple[int, int], np.ndarray] | None) -> dict[tuple[int, int], np.ndarray] | None:
    return None if cells is None else {(j, i): v for (i, j), v in cells.items()}


def _t(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else a.T


@dataclass
class GridView:
    """Axis values and per-cell arrays of shape (ny, nx).

    The optional fields say what the pictures need to be read without the source: the stored labels
    (three classes under the threshold criterion), the criterion the classes and scores follow, and the
    base model's losses on the same batches (the reference the ratio criterion divides by).
    """

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
    labels: np.ndarray | None = None  # str; "" where pending or unlabelled
    criterion: dict = field(default_factory=lambda: {"criterion": "ratio"})
    base_loss: np.ndarray | None = None  # the base model's loss on each cell's last batch; NaN where none
    initial_loss: np.ndarray | None = None  # the base model's loss before any update (the scalar fallback)
    base_trajectories: dict[tuple[int, int], np.ndarray] | None = None  # per-step base losses, keyed (i, j)
    optimizer: str = ""
    budget_unit: str = "tokens"  # what the tokens axis counts (study/config.py)
    repeats: np.ndarray | None = None  # bool: the cell repeats a smaller budget's experiment (analysis/repeats.py)
    unstable: np.ndarray | None = None  # bool: the trainer stopped the cell (non-finite or runaway loss); False pending

    def transposed(self) -> GridView:
        """The same study with x and y swapped."""
        return GridView(xs=self.ys, ys=self.xs, x_name=self.y_name, y_name=self.x_name, x_log=self.y_log,
                        y_log=self.x_log, scores=self.scores.T, converged=self.converged.T,
                        final_loss=self.final_loss.T, eval_loss=self.eval_loss.T, title=self.title,
                        labels=_t(self.labels), criterion=dict(self.criterion), base_loss=_t(self.base_loss),
                        initial_loss=_t(self.initial_loss), base_trajectories=_swap(self.base_trajectories),
                        optimizer=self.optimizer, budget_unit=self.budget_unit, repeats=_t(self.repeats),
                        unstable=_t(self.unstable))

    def relative_final_loss(self) -> np.ndarray | None:
        """final loss / the base model's loss on the same (last) batch; None when no base loss is stored."""
        if self.base_loss is None or not np.isfinite(self.base_loss).any():
            return None
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.final_loss / np.where(self.base_loss > 0, self.base_loss, np.nan)


def _last(cells: dict[tuple[int, int], np.ndarray], ny: int, nx: int) -> np.ndarray:
    out = np.full((ny, nx), np.nan)
    for (i, j), a in cells.items():
        if len(a):
            out[j, i] = float(a[-1])
    return out


def grid_view(store: StudyStore) -> GridView:
    """Axis values and per-cell arrays of a study, for the plots."""
    cfg = store.config
    x, y = parse_axis_spec(cfg["x"]), parse_axis_spec(cfg["y"])
    labels = store.labels_array()
    base = store.trajectories("base_losses")
    repeats = np.zeros((store.ny, store.nx), dtype=bool)
    for i, j in sized_cells(store).same_as:
        repeats[j, i] = True
    return GridView(
        xs=x.values(store.nx, int(cfg.get("seq_len", 1))),  # batch_size: whole rows
        ys=y.values(store.ny, int(cfg.get("seq_len", 1))),
        x_name=x.name,
        y_name=y.name,
        x_log=x.scale == "log",
        y_log=y.scale == "log",
        scores=store.grid_arrays("score"),
        converged=converged_mask(np.where(labels == "", NOT_CONVERGED, labels)),  # a pending cell: not converged
        final_loss=store.grid_arrays("final_loss"),
        eval_loss=store.grid_arrays("eval_loss"),
        title=f"{cfg.get('model')} on {cfg.get('data')}",
        labels=labels,
        criterion=extras.criterion(store),
        base_loss=_last(base, store.ny, store.nx),
        initial_loss=store.grid_arrays("initial_loss"),
        base_trajectories=base,
        optimizer=str(cfg.get("optimizer") or ""),
        budget_unit=str(cfg.get("budget_unit", "tokens")),
        repeats=repeats,
        unstable=store.grid_arrays("unstable") == 1,
    )
