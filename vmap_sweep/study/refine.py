"""Nested grids for refining a study's boundary: which cells of a finer level must be trained, which can be inferred.

Level 0 is a study's own grid; level L halves both spacings of level L-1, so an axis of n points has
(n - 1) * 2 + 1 at the next level (128 -> 255 -> 509 -> 1017) and cell (p, q) of level L-1 is cell (2p, 2q) of
level L: every earlier cell stays a cell. A new cell of level L lies inside (or on an edge of) one square of level
L-1's cells. Its *neighbourhood* is that square's corners grown by `margin` coarse cells on each side. Where the
neighbourhood holds more than one class the new cell is a target (trained); where it holds one, the new cell takes
that class and is *inferred*.

Why a margin of one coarse cell by default: the square's own corners only see a boundary that crosses the square
between them. A boundary that dips into the square and leaves it by the same side (a bay or a tongue narrower than
the coarse spacing), or one that runs just outside the corners, leaves all four corners one class; the ring of
coarse cells around the square sees it if it crosses that ring. Inferred classes of level L-1 feed level L, so a
missed crossing would stay missed at every finer level; the ring costs about 3x the trained cells of margin 0 along a
smooth boundary (a band of 4 coarse cells instead of 2) and is measured against the full grid in
benchmarks/RESULTS.md. What no margin can see is an island of the other class that lies wholly between coarse
cells: that is what the benchmark's share of wrongly inferred cells measures.

*Tracing* follows the boundary at the finer level instead of guarding a band around it: after a level's targets are
trained, every cell still inferred that touches a 2 x 2 block of the finer map holding more than one class is
trained too, in rounds, until no such cell is left. A crossing the coarse neighbourhood missed shows up as a mixed
block next to a trained cell, and the rounds walk along it. With margin 0 it trains about half of margin 1's cells
for a similar share of wrongly inferred ones, but each round waits for the one before it and trains its cells'
trunks again: fewer read-outs, more trunk steps (both measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmap_sweep.errors import ConfigError

DEFAULT_MARGIN = 1
UNKNOWN = -1  # a class code: not known (a target still to train)


def level_points(n: int, level: int) -> int:
    """Points along an axis of `n` points after `level` halvings of its spacing."""
    if n < 2 or level < 0:
        raise ConfigError(f"refine: an axis of {n} points can't be refined {level} levels; need >= 2 points")
    return (n - 1) * 2 ** level + 1


@dataclass(frozen=True)
class LevelPlan:
    """One level's cells, shape (ny, nx) of the finer grid.

    codes: the class code of every cell known without training at this level: the coarse level's codes at even
    positions (trained or inferred there), inferred codes at new cells with a uniform neighbourhood, UNKNOWN at the
    targets. coarse: True at the cells of the coarser level. targets: the new cells to train."""

    codes: np.ndarray
    coarse: np.ndarray
    targets: np.ndarray

    @property
    def inferred_new(self) -> np.ndarray:
        return ~self.coarse & ~self.targets


def _neighbourhood_1d(a: np.ndarray, margin: int, axis: int, reduce) -> np.ndarray:
    """`reduce` (np.minimum or np.maximum) of `a` over each finer position's coarse neighbourhood along `axis`: an
    even position 2p sees coarse p - margin .. p + margin, an odd one 2p + 1 sees p - margin .. p + 1 + margin,
    clipped to the grid (edge padding repeats a value the clipped window holds, so it changes no min or max)."""
    n = a.shape[axis]
    pad = [(0, 0)] * a.ndim
    pad[axis] = (margin + 1, margin + 1)
    padded = np.pad(a, pad, mode="edge")

    def take(start: int, count: int) -> np.ndarray:
        return np.take(padded, np.arange(start, start + count), axis=axis)

    off = margin + 1  # padded index of coarse 0
    even = take(off - margin, n)
    for k in range(-margin + 1, margin + 1):
        even = reduce(even, take(off + k, n))
    odd = take(off - margin, n - 1)
    for k in range(-margin + 1, margin + 2):
        odd = reduce(odd, take(off + k, n - 1))
    shape = list(a.shape)
    shape[axis] = 2 * n - 1
    out = np.empty(shape, dtype=a.dtype)
    idx = [slice(None)] * a.ndim
    idx[axis] = slice(0, None, 2)
    out[tuple(idx)] = even
    idx[axis] = slice(1, None, 2)
    out[tuple(idx)] = odd
    return out


def plan_level(coarse_codes: np.ndarray, margin: int = DEFAULT_MARGIN) -> LevelPlan:
    """The next level of a map of class codes (ints >= 0, every cell known): the cells to train and the rest."""
    codes = np.asarray(coarse_codes)
    if codes.ndim != 2 or min(codes.shape) < 2:
        raise ConfigError(f"refine: a map of shape {codes.shape} can't be refined; it needs 2 x 2 cells or more")
    if (codes < 0).any():
        raise ConfigError("refine: the coarser level has cells of unknown class; finish (and classify) it first")
    if isinstance(margin, bool) or not isinstance(margin, int | np.integer) or margin < 0:
        raise ConfigError(f"--margin {margin!r}: give a whole number of coarse cells >= 0")
    margin = min(int(margin), max(codes.shape))  # wider sees the whole map, as this does
    lo = _neighbourhood_1d(_neighbourhood_1d(codes, margin, 0, np.minimum), margin, 1, np.minimum)
    hi = _neighbourhood_1d(_neighbourhood_1d(codes, margin, 0, np.maximum), margin, 1, np.maximum)
    ny, nx = lo.shape
    coarse = np.zeros((ny, nx), dtype=bool)
    coarse[::2, ::2] = True
    targets = (lo != hi) & ~coarse
    fine = np.where(targets, UNKNOWN, lo)
    fine[::2, ::2] = codes
    return LevelPlan(fine.astype(np.int64), coarse, targets)


def neighbourhood_mixed(coarse_codes: np.ndarray, fi: int, fj: int, margin: int) -> bool:
    """Whether the coarse neighbourhood of finer cell (fi, fj) (x, y indices) holds more than one class: the
    definition `plan_level` implements, written out cell by cell (for tests and checks)."""
    ny, nx = coarse_codes.shape
    j0, j1 = max(fj // 2 - margin, 0), min((fj + 1) // 2 + margin, ny - 1)
    i0, i1 = max(fi // 2 - margin, 0), min((fi + 1) // 2 + margin, nx - 1)
    return len(np.unique(coarse_codes[j0:j1 + 1, i0:i1 + 1])) > 1


def trace_targets(codes: np.ndarray, known: np.ndarray) -> np.ndarray:
    """The cells of a finer map (class codes, every cell's known or inferred) to train in the next round of
    tracing: those not known from training (`known` False) that are a corner of a 2 x 2 block holding more than
    one class."""
    a, b, c, d = codes[:-1, :-1], codes[:-1, 1:], codes[1:, :-1], codes[1:, 1:]
    mixed = np.minimum(np.minimum(a, b), np.minimum(c, d)) != np.maximum(np.maximum(a, b), np.maximum(c, d))
    touched = np.zeros(codes.shape, dtype=bool)
    touched[:-1, :-1] |= mixed
    touched[:-1, 1:] |= mixed
    touched[1:, :-1] |= mixed
    touched[1:, 1:] |= mixed
    return touched & ~known


def simulate(truth: np.ndarray, levels: int, margin: int = DEFAULT_MARGIN, trace: bool = False) -> list[dict]:
    """Refinement run against a known finest map `truth` (class codes, shape ((ny-1)*2^levels+1, ...)): level 0
    is truth's every 2^levels-th cell, and each target's class is read from truth. Returns per level the cells
    trained there (with `trace`, the targets and every round's; `rounds`: the cells each trains, the targets first),
    inferred, and the finest codes with a mask of the inferred cells (to compare with truth).
    What refinement would train on a boundary of that shape: the cost projection and the honesty check."""
    truth = np.asarray(truth)
    step = 2 ** levels
    if (truth.shape[0] - 1) % step or (truth.shape[1] - 1) % step:
        raise ConfigError(f"refine: a {truth.shape[1]}x{truth.shape[0]} map is not a level-{levels} grid "
                          "((n - 1) divisible by 2^levels)")
    codes = truth[::step, ::step].copy()
    inferred = np.zeros(codes.shape, dtype=bool)
    out = [{"level": 0, "shape": codes.shape, "trained": int(codes.size), "inferred": 0, "targets": None}]
    for level in range(1, levels + 1):
        plan = plan_level(codes, margin)
        s = 2 ** (levels - level)
        at = truth[::s, ::s]
        codes = np.where(plan.targets, at, plan.codes)
        grown = np.zeros(codes.shape, dtype=bool)
        grown[::2, ::2] = inferred
        inferred = grown | plan.inferred_new
        trained, rounds = plan.targets.copy(), [plan.targets]
        while trace:
            more = trace_targets(codes, ~inferred)
            if not more.any():
                break
            codes, inferred, trained = np.where(more, at, codes), inferred & ~more, trained | more
            rounds.append(more)
        out.append({"level": level, "shape": codes.shape, "trained": int(trained.sum()),
                    "inferred": int(inferred.sum()), "targets": trained, "rounds": rounds, "codes": codes.copy(),
                    "inferred_mask": inferred.copy()})
    return out
