"""Cells -> batches of stacked models, a cost summary, and deterministic shards.

Models of one batch step together, so a batch runs as many steps as its longest cell; shorter cells
are masked (wasted compute). Batches are therefore built from cells with equal step counts first.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.grid import Cell


@dataclass(frozen=True)
class Batch:
    """Cells trained together. ``index`` is global (stable across shards); ``steps`` = max of its cells."""

    index: int
    cells: tuple[Cell, ...]
    steps: int
    cell_steps: tuple[int, ...] = field(default=())

    @property
    def model_steps(self) -> int:
        """Model-steps this batch runs (every model runs ``steps``, finished ones masked)."""
        return self.steps * len(self.cells)

    @property
    def padded_model_steps(self) -> int:
        return self.model_steps - sum(self.cell_steps) if self.cell_steps else 0


def plan_batches(cells: Sequence[Cell], models_per_batch: int,
                 steps_of: Callable[[Cell], int]) -> list[Batch]:
    """Group cells by step count (first-appearance order), chunk each group into full batches, then
    pack the leftovers (sorted by steps, so neighbours waste least) into the last batches."""
    if isinstance(models_per_batch, bool) or not isinstance(models_per_batch, int) or models_per_batch < 1:
        raise ConfigError(f"models per batch {models_per_batch!r}: use an integer >= 1")
    groups: dict[int, list[tuple[Cell, int]]] = {}
    for c in cells:
        s = steps_of(c)
        if isinstance(s, bool) or int(s) != s or s < 0:
            raise ConfigError(f"cell ({c.i}, {c.j}): step count {s!r} is not an integer >= 0")
        groups.setdefault(int(s), []).append((c, int(s)))

    chunks: list[list[tuple[Cell, int]]] = []
    leftovers: list[tuple[Cell, int]] = []
    for members in groups.values():
        full = len(members) - len(members) % models_per_batch
        chunks += [members[k:k + models_per_batch] for k in range(0, full, models_per_batch)]
        leftovers += members[full:]
    # Stable sort: cells of one step count stay in grid order; descending so the biggest leftovers lead.
    leftovers.sort(key=lambda cs: -cs[1])
    chunks += [leftovers[k:k + models_per_batch] for k in range(0, len(leftovers), models_per_batch)]

    return [Batch(n, tuple(c for c, _ in ch), max(s for _, s in ch), tuple(s for _, s in ch))
            for n, ch in enumerate(chunks)]


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
