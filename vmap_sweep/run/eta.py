"""How long the rest of a run takes, learnt from the batches it has finished.

A batch's time is not proportional to its cells, nor to its model-steps alone: every step of every stacked
model costs in proportion to the tokens it processes (tokens per step differ on a batch-size grid), and every
cell costs a read-out and an eval pass whatever its steps (on a small study that is most of the time). So a
batch is described by two amounts of work, `Work.tokens` (model-steps x tokens per step) and `Work.cells`, and
its time is fitted as a * tokens + b * cells (non-negative least squares) over the batches finished so far.

The first batch is left out of the fit as soon as another one has finished: it also pays for start-up
(allocations, caches, the first kernels), which on a small study is several times a later batch. Times are the
wall-clock intervals between finished batches, so batches trained side by side (one Ray worker per GPU) count
once. While fewer than two later batches are known, or their two amounts are proportional, the estimate is the
plain work rate of the batches used (time per token), as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RECENT = 12  # batches the fit uses, the latest ones: a machine's speed drifts (other jobs, thermal limits)


@dataclass(frozen=True)
class Work:
    tokens: float  # model-steps x tokens per step
    cells: int


def batch_work(batch, cells: int | None = None) -> Work:
    """A plan's batch as work: its model-steps times its tokens per step (a batch holds one batch size; a study
    that sweeps none counts 1 token per step, which the fit absorbs), and its cells (default all of them)."""
    sizes = {c.hparams.get("batch_size") for c in batch.cells if getattr(c, "hparams", None)}
    per_step = float(next(iter(sizes))) if len(sizes) == 1 and None not in sizes else 1.0
    return Work(float(batch.model_steps) * per_step, len(batch.cells) if cells is None else int(cells))


class EtaModel:
    """Seconds left of a run: `observe` each finished batch (its work and the wall-clock seconds since the
    previous one finished, or since the start), then `seconds_left`."""

    def __init__(self, todo: Sequence[Work]):
        self.left = np.array([sum(w.tokens for w in todo), sum(w.cells for w in todo)], dtype=np.float64)
        self.seen: list[tuple[float, float, float]] = []  # (tokens, cells, seconds)

    def observe(self, work: Work, seconds: float) -> None:
        self.seen.append((float(work.tokens), float(work.cells), max(float(seconds), 0.0)))
        self.left = np.maximum(self.left - [work.tokens, work.cells], 0.0)

    def coefficients(self) -> tuple[float, float] | None:
        """(seconds per token, seconds per cell) of the fit, or None before any batch has finished."""
        if not self.seen:
            return None
        used = self.seen[1:] if len(self.seen) >= 2 else self.seen  # the first pays for start-up too
        used = used[-RECENT:]
        a = np.array([(t, c) for t, c, _ in used])
        s = np.array([s for _, _, s in used])
        if len(used) >= 2 and _independent(a):
            from scipy.optimize import nnls

            coef, _ = nnls(a, s)
            if coef.any():
                return float(coef[0]), float(coef[1])
        tokens = a[:, 0].sum()
        if tokens > 0:
            return float(s.sum() / tokens), 0.0
        return 0.0, float(s.sum() / max(a[:, 1].sum(), 1.0))

    def seconds_left(self) -> float | None:
        coef = self.coefficients()
        if coef is None:
            return None
        return float(coef[0] * self.left[0] + coef[1] * self.left[1])


def _independent(a: np.ndarray) -> bool:
    """Whether the batches' tokens and cells vary apart enough to tell their costs apart."""
    scale = np.abs(a).max(axis=0)
    if not (scale > 0).all():
        return False
    s = np.linalg.svd(a / scale, compute_uv=False)
    return bool(s[-1] > 0.05 * s[0])
