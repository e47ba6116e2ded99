"""A study's config -> its grid -> cells -> batches of stacked models, a cost summary, and deterministic shards;
and the checks the grid passes once its data is known (`preflight`).

Models of one batch step together, so a batch runs as many steps as its longest cell; shorter cells
are masked (wasted compute). Batches are therefore built from cells with equal step counts first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import parse_resolution
from vmap_sweep.study.config import MAX_STEPS_PER_CELL, StudyConfig
from vmap_sweep.study.grid import Cell, Grid
from vmap_sweep.study.schedule import lr_multiplier
from vmap_sweep.study.sizes import Budgets


def steps_for(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps of a budget of `tokens` tokens: ceil(tokens / tokens_per_step)."""
    if tokens < 1 or tokens_per_step < 1:
        raise ConfigError(f"token budget {tokens} and tokens per step {tokens_per_step} must both be >= 1")
    return -(-tokens // tokens_per_step)


def build_grid(cfg: StudyConfig) -> Grid:
    nx, ny = parse_resolution(cfg.resolution)
    return Grid(*cfg.axes, nx, ny, dict(cfg.fixed), cfg.seq_len)


def cell_steps(cfg: StudyConfig) -> Callable[[Cell], int]:
    """A cell's optimizer steps under its tokens per step (its batch_size where that is swept)."""
    return lambda c: steps_for(int(c.hparams["tokens"]), cfg.tokens_per_step(c.hparams))


@dataclass(frozen=True)
class Batch:
    """Cells trained together. ``index`` is global (stable across shards); ``steps`` = max of its cells.

    ``lanes``: the cells grouped by the stacked model that trains them. A lane of one cell is that cell's own
    fine-tune; a lane of several is a trunk (see `trunks`): one trajectory read out at each member's budget.
    Empty: one lane per cell."""

    index: int
    cells: tuple[Cell, ...]
    steps: int
    cell_steps: tuple[int, ...] = field(default=())
    lanes: tuple[tuple[Cell, ...], ...] = field(default=())

    @property
    def stacked(self) -> tuple[tuple[Cell, ...], ...]:
        """The lanes, one per stacked model."""
        return self.lanes or tuple((c,) for c in self.cells)

    @property
    def model_steps(self) -> int:
        """Model-steps this batch runs (every model runs ``steps``, finished ones masked)."""
        return self.steps * len(self.stacked)

    @property
    def padded_model_steps(self) -> int:
        if not self.cell_steps:
            return 0
        if not self.lanes:
            return self.model_steps - sum(self.cell_steps)
        steps = {c.key: n for c, n in zip(self.cells, self.cell_steps, strict=True)}
        return self.model_steps - sum(max(steps[c.key] for c in lane) for lane in self.lanes)


def plan_batches(cells: Sequence[Cell], models_per_batch: int,
                 steps_of: Callable[[Cell], int]) -> list[Batch]:
    """Group cells by step count (first-appearance order), chunk each group into full batches, then
    pack the leftovers (sorted by steps, so neighbours waste least) into the last batches."""
    return plan_lanes([(c,) for c in cells], models_per_batch, steps_of)


def plan_lanes(lanes: Sequence[tuple[Cell, ...]], models_per_batch: int,
               steps_of: Callable[[Cell], int]) -> list[Batch]:
    """plan_batches for lanes of cells (trunks): a lane's steps are its longest cell's. The models of a stack share
    one input tensor, so a batch holds one batch size: the lanes of each swept batch_size are packed apart."""
    if isinstance(models_per_batch, bool) or not isinstance(models_per_batch, int) or models_per_batch < 1:
        raise ConfigError(f"models per batch {models_per_batch!r}: use an integer >= 1")
    by_size: dict[int | None, list[tuple[Cell, ...]]] = {}
    for lane in lanes:
        by_size.setdefault(lane[0].hparams.get("batch_size"), []).append(lane)
    batches = [b for same in by_size.values() for b in _pack_lanes(same, models_per_batch, steps_of)]
    return [replace(b, index=n) for n, b in enumerate(batches)]


def _pack_lanes(lanes: Sequence[tuple[Cell, ...]], models_per_batch: int,
                steps_of: Callable[[Cell], int]) -> list[Batch]:
    """Lanes of one batch size grouped by step count, each group chunked into full batches, the leftovers packed."""
    groups: dict[int, list[tuple[tuple[Cell, ...], int]]] = {}
    for lane in lanes:
        for c in lane:
            s = steps_of(c)
            if isinstance(s, bool) or int(s) != s or s < 0:
                raise ConfigError(f"cell ({c.i}, {c.j}): step count {s!r} is not an integer >= 0")
        steps = max(int(steps_of(c)) for c in lane)
        groups.setdefault(steps, []).append((lane, steps))

    chunks: list[list[tuple[tuple[Cell, ...], int]]] = []
    leftovers: list[tuple[tuple[Cell, ...], int]] = []
    for members in groups.values():
        full = len(members) - len(members) % models_per_batch
        chunks += [members[k:k + models_per_batch] for k in range(0, full, models_per_batch)]
        leftovers += members[full:]
    # Stable sort: lanes of one step count stay in grid order; descending so the biggest leftovers lead.
    leftovers.sort(key=lambda ls: -ls[1])
    chunks += [leftovers[k:k + models_per_batch] for k in range(0, len(leftovers), models_per_batch)]

    batches = []
    for n, chunk in enumerate(chunks):
        cells = tuple(c for lane, _ in chunk for c in lane)
        shared = any(len(lane) > 1 for lane, _ in chunk)
        batches.append(Batch(n, cells, max(s for _, s in chunk), tuple(int(steps_of(c)) for c in cells),
                             tuple(lane for lane, _ in chunk) if shared else ()))
    return batches


def trunks(cells: Sequence[Cell], schedule: str, tokens_per_step: int) -> list[tuple[Cell, ...]]:
    """Cells grouped into trunks: a trunk's cells differ only in `tokens`, and each one's learning-rate
    multipliers agree, step for step, with the longest one's. A dataset of N tokens is the first N tokens of
    one order, so such a cell's training is the trunk's up to its own budget (its last step may be partial):
    the trunk trains once and is read out at each budget. Under a constant LR a whole column of the grid is
    one trunk; under a decay the multipliers part after the first step and every cell is its own trunk.
    Trunks come in grid order of their first cell; a trunk's cells in grid order. tokens_per_step: the study's,
    for cells that do not sweep their own batch_size (a trunk holds one: those differ in more than `tokens`)."""
    groups: dict[Any, list[int]] = {}  # cells by their hyperparameters but `tokens`, as indices into `cells`
    for n, c in enumerate(cells):
        groups.setdefault(_all_but_tokens(c.hparams), []).append(n)
    steps = [steps_for(int(c.hparams["tokens"]), int(c.hparams.get("batch_size", tokens_per_step))) for c in cells]
    # A cell's multipliers follow from its step count and warmup alone, so a group's lanes follow from the
    # sequence of those: every column of a grid has the same one, and its lanes are found once, not per column.
    kind = [(steps[n], float(c.hparams.get("warmup_ratio", 0.0))) for n, c in enumerate(cells)]
    mult = _multipliers(set(kind), schedule)
    layouts: dict[tuple, list[int]] = {}
    out: list[list[int]] = []
    for members in groups.values():
        members = sorted(members, key=lambda n: -steps[n])  # stable: longest first, then grid order
        kinds = tuple(kind[n] for n in members)
        if kinds not in layouts:
            layouts[kinds] = _lanes_of(kinds, mult)
        lanes: list[list[int]] = [[] for _ in range(max(layouts[kinds]) + 1)]
        for n, lane in zip(members, layouts[kinds], strict=True):
            lanes[lane].append(n)
        out += lanes
    return [tuple(sorted((cells[n] for n in lane), key=lambda c: (c.j, c.i))) for lane in sorted(out, key=min)]


def _all_but_tokens(hparams: Mapping[str, Any]) -> Any:
    """A key that tells cells apart by every hyperparameter but `tokens`: values of another type (1 and 1.0, True
    and 1) stay apart, as in their JSON."""
    try:
        return tuple(sorted((k, type(v), v) for k, v in hparams.items() if k != "tokens"))
    except TypeError:  # an unhashable value (a list): its JSON text
        return json.dumps({k: v for k, v in hparams.items() if k != "tokens"}, sort_keys=True)


def same_experiments(cells: Sequence[Cell], supervised: Mapping[int, int], schedule: str,
                     tokens_per_step: int) -> dict[tuple[int, int], Cell]:
    """Each cell that repeats another cell's experiment -> the cell it repeats (the smallest budget of its kind).

    Two cells of one trunk (`trunks`: they differ only in their budget and their LR multipliers agree step for
    step) whose budgets hold as many supervised targets (`supervised`, by budget) learn from the very same
    tokens: the positions between the two budgets carry no loss, a step without a supervised token changes
    nothing, so both end with the same weights, losses and eval loss. They are one experiment at two sizes."""
    repeats: dict[tuple[int, int], Cell] = {}
    for lane in trunks(cells, schedule, tokens_per_step):
        first: dict[int, Cell] = {}
        for c in sorted(lane, key=lambda c: int(c.hparams["tokens"])):
            held = int(supervised[int(c.hparams["tokens"])])
            if held in first:
                repeats[c.key] = first[held]
            else:
                first[held] = c
    return repeats


def _lanes_of(kinds: Sequence[tuple[int, float]], mult: Mapping[tuple[int, float], list[float]]) -> list[int]:
    """The lane of each cell of a group, given as its (steps, warmup), longest first: the first lane whose first
    cell's multipliers agree with the cell's over the cell's steps, else a lane of its own."""
    firsts: list[tuple[int, float]] = []
    found: dict[tuple[int, float], int] = {}  # cells of one kind agree: the first of them decides the lane
    out = []
    for k in kinds:
        if k not in found:
            n = k[0]
            lane = next((m for m, first in enumerate(firsts) if mult[k][:n] == mult[first][:n]), None)
            if lane is None:
                lane = len(firsts)
                firsts.append(k)
            found[k] = lane
        out.append(found[k])
    return out


def _multipliers(kinds: set[tuple[int, float]], schedule: str) -> dict[tuple[int, float], list[float]]:
    """The learning-rate multiplier at each step of a cell of each kind (steps, warmup), as the trainer computes
    them."""
    if not kinds:
        return {}
    kinds = sorted(kinds)
    totals = torch.tensor([n for n, _ in kinds], dtype=torch.float64)
    warmup = torch.tensor([w for _, w in kinds], dtype=torch.float64)
    per_step = [lr_multiplier(s, totals, warmup, schedule).tolist() for s in range(int(totals.max()))]
    return {k: [per_step[s][m] for s in range(k[0])] for m, k in enumerate(kinds)}


def plan_summary(batches: Sequence[Batch], flops_per_model_step: float) -> dict[str, float | int]:
    """Totals for a plan. ``model_steps`` counts what runs (masked steps included);
    ``padded_model_steps`` is the masked part; ``flops`` = model_steps x flops_per_model_step."""
    model_steps = sum(b.model_steps for b in batches)
    padded = sum(b.padded_model_steps for b in batches)
    return {
        "cells": sum(len(b.cells) for b in batches),
        "batches": len(batches),
        "model_steps": model_steps,
        "useful_model_steps": model_steps - padded,
        "padded_model_steps": padded,
        "flops": float(model_steps) * float(flops_per_model_step),
    }


def shard_folder_name(k: int, n: int) -> str:
    """The folder a run with --shard K/N trains in, inside its --out."""
    return f"shard-{k}-of-{n}"


def shard_of_folder(name: str) -> tuple[int, int] | None:
    """(K, N) of a shard's folder name (shard_folder_name), else None."""
    m = re.fullmatch(r"shard-(\d+)-of-(\d+)", name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def shard_of_label(label: str | None) -> tuple[int, int] | None:
    """(K, N) of the shard a stored cell is tagged with ("K/N"), else None (no tag, or one this tool never wrote)."""
    m = re.fullmatch(r"(\d+)/(\d+)", str(label or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/4"`` -> (2, 4): the second of four parts."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"shard {text!r} is malformed; write K/N, e.g. --shard 2/4")
    k, n = int(m.group(1)), int(m.group(2))
    _check_shard(k, n)
    return k, n


def _check_shard(k: int, n: int) -> None:
    if n < 1 or not 1 <= k <= n:
        raise ConfigError(f"shard {k}/{n}: need 1 <= K <= N; e.g. --shard 1/{max(n, 1)}")


def shard(batches: Sequence[Batch], k: int, n: int) -> list[Batch]:
    """The k-th (1-based) of n parts, balanced by model-steps: batches by cost, largest first, each to
    the least-loaded part (ties -> lowest part). Deterministic; returned in batch-index order."""
    _check_shard(k, n)
    loads = [0] * n
    owner: dict[int, int] = {}
    for b in sorted(batches, key=lambda b: (-b.model_steps, b.index)):
        p = min(range(n), key=lambda q: (loads[q], q))
        owner[b.index] = p
        loads[p] += b.model_steps
    return sorted((b for b in batches if owner[b.index] == k - 1), key=lambda b: b.index)


def at_positions(cells: Sequence[Cell], positions: Mapping[int, int] | None) -> list[Cell]:
    """The cells with their budget (`tokens`, counted in the study's budget unit) as the stream positions it trains
    on, as the planner and the trainer take it; the same cells where `positions` is None (a budget in tokens)."""
    if positions is None:
        return list(cells)
    out = []
    for c in cells:
        budget = int(c.hparams["tokens"])
        at = int(positions[budget])
        out.append(c if at == budget else replace(c, hparams={**c.hparams, "tokens": at}))
    return out


def plan_study(cfg: StudyConfig, cells: Sequence[Cell], models_per_batch: int, share: bool = True,
               positions: Mapping[int, int] | None = None) -> list[Batch]:
    """The batches that train `cells`: trunks of shared trajectories (`trunks`) stacked `models_per_batch` at
    a time, or with share False every cell alone (the same results, for more work). positions: each budget's
    stream positions (`at_positions`), for a study that counts its budgets in another unit than tokens."""
    cells = at_positions(cells, positions)
    if not share:
        return plan_batches(cells, models_per_batch, cell_steps(cfg))
    return plan_lanes(trunks(cells, cfg.schedule, cfg.tokens_per_step()), models_per_batch, cell_steps(cfg))


def sharing_summary(batches: Sequence[Batch]) -> dict[str, float]:
    """What sharing saves: trunks (stacked models), read-outs (cells), the model-steps of training every cell
    alone against those of the trunks, and the model-steps the read-outs add: a cell that branches off its
    trunk takes its own last step and a final-loss forward (a third of a step)."""
    branches = sum(len(lane) - 1 for b in batches for lane in b.stacked)
    return {"trunks": sum(len(b.stacked) for b in batches), "read_outs": sum(len(b.cells) for b in batches),
            "cell_model_steps": sum(sum(b.cell_steps) for b in batches),
            "trunk_model_steps": sum(b.model_steps - b.padded_model_steps for b in batches),
            "read_out_model_steps": branches * 4 / 3}


def shard_cells(cfg: StudyConfig, grid: Grid, k: int, n: int,
                positions: Mapping[int, int] | None = None) -> list[Cell]:
    """The cells of shard k of n, whatever each shard's --models-per-batch: shards are dealt whole trunks
    (`trunks`) of equal step count, about a grid row's worth of cells at a time, balanced by their steps, so the
    parts never depend on how a shard batches them and no trunk's steps are taken in two shards."""
    lanes = trunks(at_positions(grid.cells(), positions), cfg.schedule, cfg.tokens_per_step())
    per_unit = max(1, grid.nx // max(len(lane) for lane in lanes))
    units = plan_lanes(lanes, per_unit, cell_steps(cfg))
    by_key = {c.key: c for c in grid.cells()}  # as the grid holds them: the caller plans them with `positions`
    return [by_key[c.key] for unit in shard(units, k, n) for c in unit.cells]


# -- checked against the data ------------------------------------------------------------------------------------


class BudgetSource(Protocol):
    """What knows the data's budgets: a Backend, or the TokenStream a dry run builds."""

    def budgets(self, budgets: list[int], unit: str = "tokens") -> Budgets: ...


@dataclass(frozen=True)
class Preflight:
    """A study's grid checked against its data: what each budget holds, as stream positions, and the cells to
    plan (a shard's, or the given ones)."""

    budgets: Budgets
    positions: dict[int, int]
    cells: list[Cell]
    shard_name: str | None

    def batches(self, cfg: StudyConfig, models_per_batch: int, share: bool) -> list[Batch]:
        return plan_study(cfg, self.cells, models_per_batch, share, self.positions)


def preflight(cfg: StudyConfig, grid: Grid, data: BudgetSource, shard: tuple[int, int] | None = None,
              only: list[Cell] | None = None) -> Preflight:
    """The checks a study passes once its data is known, before any cell trains; a run and its --dry-run make
    these same ones: every budget holds a supervised token, none takes more steps than a cell may, the shard
    holds cells."""
    budgets = data.budgets(sorted({int(c.hparams["tokens"]) for c in grid.cells()}), cfg.budget_unit)
    check_smallest_budget(cfg, grid, budgets.first_supervised)
    positions = budget_positions(cfg, budgets)
    cells, shard_name = _cells_of_shard(cfg, grid, shard, positions) if only is None else (list(only), None)
    return Preflight(budgets, positions, cells, shard_name)


def budget_positions(cfg: StudyConfig, budgets: Budgets) -> dict[int, int]:
    """Each budget as the stream positions it trains on (itself, in tokens), refused past the steps a cell may
    take (a budget in answer tokens or conversations is known in positions only once the data is)."""
    positions = {n: size.tokens for n, size in budgets.sizes.items()}
    longest = max(positions.values())
    per_step = cfg.tokens_per_step()
    if cfg.budget_unit != "tokens" and longest / per_step > MAX_STEPS_PER_CELL:
        n = max(positions, key=positions.get)
        raise ConfigError(f"a budget of {n} {cfg.budget_unit} is {longest:,} tokens of {cfg.data}, more than the "
                          f"{MAX_STEPS_PER_CELL:,} steps of {per_step} tokens a cell may take; use a smaller budget")
    return positions


def _cells_of_shard(cfg: StudyConfig, grid: Grid, shard: tuple[int, int] | None,
                    positions: dict[int, int] | None = None) -> tuple[list[Cell], str | None]:
    if shard is None:
        return grid.cells(), None
    cells, name = shard_cells(cfg, grid, *shard, positions), f"{shard[0]}/{shard[1]}"
    if not cells:
        raise ConfigError(f"--shard {name}: that part holds no cells (the grid has {len(grid.cells())}, "
                          "dealt in whole rows); split it into fewer parts")
    return cells, name


def check_smallest_budget(cfg: StudyConfig, grid: Grid, first: int | None) -> None:
    """A cell whose budget holds no supervised token would have nothing to learn from: refuse the grid.
    first: the smallest budget that holds one (None: the data holds none)."""
    smallest = min(int(c.hparams["tokens"]) for c in grid.cells())
    if first is None or smallest < first:
        where = f"start the tokens range at {first} or more" if first else "it holds no assistant turn"
        raise ConfigError(f"tokens={smallest}: the first {smallest} tokens of {cfg.data} hold no supervised "
                          f"(assistant) token; {where}")
