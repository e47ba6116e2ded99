"""A stored study's dataset sizes in each unit, and the cells that repeat a smaller budget's experiment.

A budget of N tokens is the first N positions of the study's token stream; what it teaches is its supervised
(assistant) targets. Budgets that add no supervised target to a smaller one of the same trajectory are one
experiment (study/plan.py, `same_experiments`): the rules of thumb count them as one size and the maps mark them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vmap_sweep.errors import ConfigError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import at_positions, same_experiments
from vmap_sweep.study.sizes import SIZE_UNITS, DatasetSize


@dataclass(frozen=True)
class SizedCells:
    sizes: dict[int, DatasetSize] | None  # by budget; None: a study that recorded its sizes in tokens only
    same_as: dict[tuple[int, int], tuple[int, int]]  # (i, j) -> the cell whose experiment it repeats
    unit: str = "tokens"  # what the study's budgets count

    def size(self, budget: int, unit: str) -> int:
        """A budget counted in `unit` (tokens, supervised or conversations)."""
        if self.sizes is None and unit == "tokens":  # a study of this age counts its budgets in tokens
            return int(budget)
        if self.sizes is None:
            raise ConfigError(f"this study recorded its dataset sizes in tokens only; use --size-unit tokens, "
                              f"or resume it once with this vmap-sweep to record the {unit} count")
        return self.sizes[int(budget)].count(unit)


def check_unit(unit: str) -> str:
    if unit not in SIZE_UNITS:
        raise ConfigError(f"size unit {unit!r}: use one of {', '.join(SIZE_UNITS)}")
    return unit


def sized_cells(store: StudyStore, cfg: StudyConfig, cells: Sequence[Cell]) -> SizedCells:
    """The study's sizes as its data filled them, and its repeated experiments (none known without sizes);
    `cfg` and `cells`: the store's validated config and its cells (analysis/view.py reads them once)."""
    sizes = extras.dataset_sizes(store)
    if sizes is None:
        return SizedCells(None, {})  # a study of this age counts its budgets in tokens
    # trajectories are shared and repeated in stream positions, whatever unit the budgets count
    cells = at_positions(cells, {n: s.tokens for n, s in sizes.items()})
    supervised = {s.tokens: s.supervised for s in sizes.values()}
    same = same_experiments(cells, supervised, cfg.schedule, cfg.tokens_per_step())
    return SizedCells(sizes, {key: cell.key for key, cell in same.items()}, cfg.budget_unit)
