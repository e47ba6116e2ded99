"""A study as every analysis sees it, read once from its store: the validated config, its parsed axes, the grid's
labels, criterion, dataset sizes and per-cell arrays.

`StudyView.load` is the one place analysis opens a store; measures take the view and never parse config strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmap_sweep.analysis.classify import converged_mask, map_mask
from vmap_sweep.analysis.repeats import SizedCells, sized_cells
from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore
from vmap_sweep.store.levels import REFINE
from vmap_sweep.study.axes import AxisSpec
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.criterion import NOT_CONVERGED
from vmap_sweep.study.grid import Cell


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


GRID_FIELDS = ("score", "final_loss", "eval_loss", "initial_loss", "unstable")  # the per-cell numbers kept


@dataclass
class StudyView:
    """One stored study, read once. Arrays are (ny, nx); `rows` are the cells as the store lists them, with their
    per-step arrays, where the view was loaded with them (`all_rows`). It answers `directory`, `path`, `get_extra`,
    `labels_array` and `grid_arrays` as a store does, so the criterion's functions (analysis/classify.py) and a
    level's map (store/levels.py) read it as a store."""

    folder: Path
    path: Path  # the study's database file
    config: StudyConfig
    raw_config: dict  # the stored config as written (exports and diffs show it as it is)
    config_json: str
    x: AxisSpec
    y: AxisSpec
    nx: int
    ny: int
    criterion: dict
    sized: SizedCells
    cells: list[Cell]
    rows: list[dict[str, Any]] | None  # None: loaded without them, as the maps need none (a 1017² level's take 40 s)
    arrays: dict[str, np.ndarray]  # GRID_FIELDS by name
    labels: np.ndarray  # str; "" where pending or unlabelled
    grid: GridView
    level: int = 0
    study_id: str | None = None  # tells apart two studies of one config (None: made before it was recorded)
    created: str = ""
    refine: dict | None = None  # the finished refinement levels' record, where the study was refined
    extras: dict = field(default_factory=dict)
    # a refined study read at a level (analysis/refined.py, `finest_view`): the level, and which cells' classes
    # were inferred from their neighbourhood (they have no trajectory)
    refinement_level: int = 0
    inferred: np.ndarray | None = None

    @classmethod
    def load(cls, source: StudyStore | str | os.PathLike, rows: bool = True) -> StudyView:
        """The view of a study folder or of an open store (left open); rows=False: without `rows`."""
        if not isinstance(source, StudyStore):
            with StudyStore.open(source) as store:
                return cls.load(store, rows)
        store = source
        config = stored_config(store)
        x, y = config.axes
        arrays = {f: store.grid_arrays(f) for f in GRID_FIELDS}
        labels = store.labels_array()
        cells = store.cells()
        sized = sized_cells(store, config, cells)
        record = store.get_extra(REFINE)
        return cls(
            folder=Path(store.directory), path=Path(store.path), config=config, raw_config=dict(store.config),
            config_json=store.config_json,
            x=x, y=y, nx=store.nx, ny=store.ny, criterion=extras.criterion(store), sized=sized, cells=cells,
            rows=store.rows(arrays=True) if rows else None, arrays=arrays, labels=labels,
            grid=_grid(store, config, x, y, arrays, labels, sized), level=extras.level(store),
            study_id=store.study_id, created=store.created,
            refine=record if isinstance(record, dict) and record.get("levels") else None, extras=store.extras())

    @property
    def directory(self) -> Path:
        return self.folder

    @property
    def criterion_name(self) -> str:
        return str(self.criterion["criterion"])

    @property
    def xs(self) -> np.ndarray:
        return self.grid.xs

    @property
    def ys(self) -> np.ndarray:
        return self.grid.ys

    @property
    def unstable(self) -> np.ndarray:
        """bool (ny, nx): the trainer stopped the cell; False where pending."""
        return self.arrays["unstable"] == 1

    def get_extra(self, key: str, default: Any = None) -> Any:
        return self.extras.get(key, default)

    def labels_array(self) -> np.ndarray:
        return self.labels

    def grid_arrays(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def all_rows(self) -> list[dict[str, Any]]:
        """`rows`: as loaded, or read now from the study's file where the view was loaded without them."""
        if self.rows is None:
            with StudyStore.open(self.path) as store:
                self.rows = store.rows(arrays=True)
        return self.rows

    def done_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.all_rows() if r["status"] == "done"]


def stored_config(store: StudyStore) -> StudyConfig:
    """The config a study was made with, as a StudyConfig, unchecked (StudyConfig.from_dict)."""
    try:
        missing = [k for k in ("x", "y") if not isinstance(store.config.get(k), str)]
        if missing:  # the defaults would stand in for them, and the study would read as another grid
            raise ValueError(f"no {' or '.join(missing)} axis")
        return StudyConfig.from_dict(store.config, check=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{store.path}: its stored config can't be read ({e}); it was not made by this "
                         "vmap-sweep, or was edited") from None


def _grid(store: StudyStore, cfg: StudyConfig, x: AxisSpec, y: AxisSpec, arrays: dict[str, np.ndarray],
          labels: np.ndarray, sized: SizedCells) -> GridView:
    base = store.trajectories("base_losses")
    repeats = np.zeros((store.ny, store.nx), dtype=bool)
    for i, j in sized.same_as:
        repeats[j, i] = True
    return GridView(
        xs=x.values(store.nx, cfg.seq_len),  # batch_size: whole rows
        ys=y.values(store.ny, cfg.seq_len),
        x_name=x.name,
        y_name=y.name,
        x_log=x.scale == "log",
        y_log=y.scale == "log",
        scores=arrays["score"],
        converged=converged_mask(np.where(labels == "", NOT_CONVERGED, labels)),  # a pending cell: not converged
        final_loss=arrays["final_loss"],
        eval_loss=arrays["eval_loss"],
        title=f"{cfg.model} on {cfg.data}",
        labels=labels,
        criterion=extras.criterion(store),
        base_loss=_last(base, store.ny, store.nx),
        initial_loss=arrays["initial_loss"],
        base_trajectories=base,
        optimizer=str(cfg.optimizer or ""),
        budget_unit=cfg.budget_unit,
        repeats=repeats,
        unstable=arrays["unstable"] == 1,
    )


def grid_view(source: StudyStore | str | os.PathLike) -> GridView:
    """Axis values and per-cell arrays of a study, for the plots."""
    return StudyView.load(source, rows=False).grid


def load_class_grid(source: Path, kind: str = "trainability") -> np.ndarray:
    """A study folder's map (`kind`: trainability, True = converged; stability, True = never stopped as unstable),
    or a 2-D .npy (bool mask, True = converged; or a signed score, negative = converged)."""
    if source.is_dir():
        with StudyStore.open(source) as store:
            return map_mask(store, kind)
    if source.suffix != ".npy":
        raise ConfigError(f"{source}: not a study folder or a .npy file; pass one of those")
    if kind != "trainability":  # a .npy holds one mask, read as converged or not
        raise ConfigError(f"--map {kind}: a .npy file holds one mask, not a study's {kind} map; give a study "
                          "folder, or leave --map out")
    if source.exists() and not source.is_file():
        raise ConfigError(f"{source}: not a regular file (a named pipe, device or socket); give a .npy file")
    if not source.is_file():
        raise ConfigError(f"{source}: no such file")
    try:
        return np.load(source, allow_pickle=False)
    except (ValueError, OSError) as e:
        if "pickle" in str(e):  # numpy's own hint (allow_pickle=True) would execute what the file holds
            e = "it is text, or holds pickled objects, which are never loaded"
        raise ConfigError(f"{source}: not a numpy array file ({e}); save the mask with numpy.save") from None
