"""A study as the pictures and the rules of thumb see it: axis values in real units and per-cell arrays."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmap_sweep.analysis.classify import DIVERGED, converged_mask
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec


@dataclass
class GridView:
    """Axis values and per-cell arrays of shape (ny, nx)."""

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

    def transposed(self) -> GridView:
        """The same study with x and y swapped."""
        return GridView(xs=self.ys, ys=self.xs, x_name=self.y_name, y_name=self.x_name, x_log=self.y_log,
                        y_log=self.x_log, scores=self.scores.T, converged=self.converged.T,
                        final_loss=self.final_loss.T, eval_loss=self.eval_loss.T, title=self.title)


def grid_view(store: StudyStore) -> GridView:
    """Axis values and per-cell arrays of a study, for the plots."""
    cfg = store.config
    x, y = parse_axis_spec(cfg["x"]), parse_axis_spec(cfg["y"])
    labels = store.labels_array()
    return GridView(
        xs=x.values(store.nx),
        ys=y.values(store.ny),
        x_name=x.name,
        y_name=y.name,
        x_log=x.scale == "log",
        y_log=y.scale == "log",
        scores=store.grid_arrays("score"),
        converged=converged_mask(np.where(labels == "", DIVERGED, labels)),  # a pending cell: not converged
        final_loss=store.grid_arrays("final_loss"),
        eval_loss=store.grid_arrays("eval_loss"),
        title=f"{cfg.get('model')} on {cfg.get('data')}",
    )
