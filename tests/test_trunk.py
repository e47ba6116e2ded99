"""Shared trajectories: every cell read out of a trunk is bitwise the cell trained alone (CPU, float32)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import RandomStream, bits, tiny_model, train_one_by_one

from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import trunks
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer

B, T = 4, 16  # 64 tokens per step
# below one step, partial, whole steps, the longest partial: every kind of read-out
BUDGETS = [10, 40, 64, 100, 128, 200, 300]
LRS = [3e-3, 3e-2, 30.0]  # the last one diverges at step 1


def _cells(lrs, budgets, **fixed) -> list[Cell]:
    return [Cell(i, j, lr, n, {"lr": lr, "tokens": n, **fixed}) for j, n in enumerate(budgets)
            for i, lr in enumerate(lrs)]


def _alone(base, cell: Cell, cfg, stream, eval_batches):
    return train_one_by_one(base, stream, cell.hparams, cfg, eval_batches)


def _same(got, want) -> None:
    for field in ("losses", "base_losses", "grad_norms", "lrs", "initial_loss", "eval_loss"):
        a, b = getattr(got, field), getattr(want, field)
        assert np.array_equal(bits(a), bits(b)), (field, a, b)
    for field in ("steps", "steps_done", "unstable", "unstable_step"):
        assert getattr(got, field) == getattr(want, field), field


def _read_out(base, lanes: list[tuple[Cell, ...]], cfg, stream, eval_batches, k: int) -> dict:
    """Every cell of `lanes`, trained as trunks `k` lanes at a time."""
    got = {}
    for start in range(0, len(lanes), k):
        chunk = lanes[start:start + k]
        records = TrunkTrainer(base, [[c.hparams for c in lane] for lane in chunk], cfg).run(stream, eval_batches)
        for cell, rec in zip([c for lane in chunk for c in lane], records, strict=True):
            got[cell.key] = rec
    return got


def _constant(optimizer: str) -> TrainConfig:
    return TrainConfig(optimizer=optimizer, schedule="constant", rows_per_step=B, seq_len=T, divergence_ratio=3.0,
                       muon_ns_dtype="float32")


@functools.cache
def _trained_alone(optimizer: str) -> dict:
    base, stream = tiny_model(), RandomStream()
    return {c.key: _alone(base, c, _constant(optimizer), stream, [stream.batch(1000, B, T)])
            for c in _cells(LRS, BUDGETS)}


@pytest.mark.parametrize(("optimizer", "k"), [("adamw", 1), ("adamw", 3), ("nanochat", 3)])
def test_every_read_out_equals_the_cell_trained_alone(optimizer, k):
    base, stream = tiny_model(), RandomStream()
    cells = _cells(LRS, BUDGETS)
    lanes = trunks(cells, "constant", B * T)
    assert len(lanes) == len(LRS)  # a constant LR: each learning rate's column is one trunk
    got = _read_out(base, lanes, _constant(optimizer), stream, [stream.batch(1000, B, T)], k)
    want = _trained_alone(optimizer)
    for cell in cells:
        _same(got[cell.key], want[cell.key])
    unstable = [c.hparams["tokens"] for c in cells if want[c.key].unstable]
    # the diverging trunk decided the cells past its divergence, a branch ending there diverged on its own
    assert unstable == [100, 128, 200, 300], unstable


@pytest.mark.parametrize("optimizer", ["adamw", "nanochat"])
def test_lanes_of_one_cell_equal_the_cell_trained_alone(optimizer):
    """A study without shared trajectories runs the same loop, one lane per cell: every budget (inside step 0,
    partial, whole steps) and a diverging learning rate in one stack, each record the one training it alone gives,
    final and eval losses included (read out for several lanes in one pass, or one lane at a time)."""
    base, stream = tiny_model(), RandomStream()
    cells = _cells(LRS, BUDGETS)
    records = TrunkTrainer.separate(base, [c.hparams for c in cells], _constant(optimizer)).run(
        stream, [stream.batch(1000, B, T)])
    want = _trained_alone(optimizer)
    for cell, rec in zip(cells, records, strict=True):
        _same(rec, want[cell.key])
    assert sum(r.unstable for r in records) == 4 and sum(r.eval_loss is not None for r in records) == len(cells)
    # most lanes ending at one step: their final and eval losses are one pass of the whole stack
    together = [c for c in cells if c.hparams["tokens"] in (128, 300)]
    records = TrunkTrainer.separate(base, [c.hparams for c in together], _constant(optimizer)).run(
        stream, [stream.batch(1000, B, T)])
    for cell, rec in zip(together, records, strict=True):
        _same(rec, want[cell.key])


def test_a_decaying_schedule_shares_only_what_its_multipliers_allow():
    """Linear decay: cells of one step count share all but their partial last steps; the rest stand alone."""
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(schedule="linear", rows_per_step=B, seq_len=T)
    cells = _cells([1e-2], [70, 100, 128, 150, 200])
    lanes = trunks(cells, "linear", B * T)
    assert sorted(len(lane) for lane in lanes) == [1, 1, 3]  # 70, 100 and 128 tokens all take 2 steps
    got = _read_out(base, lanes, cfg, stream, None, 2)
    for cell in cells:
        _same(got[cell.key], _alone(base, cell, cfg, stream, None))


def test_a_last_step_without_supervised_tokens_ends_where_the_trunk_is():
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(schedule="constant", rows_per_step=B, seq_len=T)
    # a budget whose last step's only position has no supervised target
    tokens = next(s * B * T + 1 for s in range(1, 50) if stream.batch(s, B, T)[1][0, 0] == -1)
    cells = _cells([1e-2], [tokens, tokens + 3 * B * T])
    got = _read_out(base, trunks(cells, "constant", B * T), cfg, stream, [stream.batch(999, B, T)], 1)
    want = _alone(base, cells[0], cfg, stream, [stream.batch(999, B, T)])
    assert want.steps_done == want.steps - 1  # the case at hand: its last step took no update
    _same(got[cells[0].key], want)


def test_cells_that_do_not_share_their_schedule_are_refused():
    base = tiny_model()
    cfg = TrainConfig(schedule="linear", rows_per_step=B, seq_len=T)
    with pytest.raises(ValueError, match="does not share its trunk's learning rates"):
        TrunkTrainer(base, [[{"lr": 1e-2, "tokens": 128}, {"lr": 1e-2, "tokens": 640}]], cfg)
    with pytest.raises(ValueError, match="differ in more than"):
        TrunkTrainer(base, [[{"lr": 1e-2, "tokens": 64}, {"lr": 2e-2, "tokens": 640}]],
                     TrainConfig(rows_per_step=B, seq_len=T))


def test_a_trunk_leaves_its_base_model_untouched_and_reads_out_in_lane_order():
    base, stream = tiny_model(), RandomStream()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    lanes = [[{"lr": 1e-2, "tokens": n} for n in (300, 10, 150)]]
    records = TrunkTrainer(base, lanes, TrainConfig(rows_per_step=B, seq_len=T)).run(stream)
    assert [r.steps for r in records] == [5, 1, 3]
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())


def test_budgets_that_learn_from_the_same_tokens_share_one_branch(monkeypatch):
    """Two budgets ending in one step, the tokens between them all unsupervised: the same experiment, computed
    once, and each equal to its cell trained alone."""
    base, stream = tiny_model(), RandomStream()
    cfg = TrainConfig(schedule="constant", rows_per_step=B, seq_len=T)
    step = 2
    targets = stream.batch(step, B, T)[1].flatten()
    offset = next(k for k in range(1, B * T - 1) if targets[k] == -1 and targets[:k].ne(-1).any())
    tokens = [step * B * T + offset, step * B * T + offset + 1, 5 * B * T]  # the 2nd adds one unsupervised target
    cells = _cells([1e-2], tokens)
    calls = []
    real = TrunkTrainer._branch_gradient
    monkeypatch.setattr(TrunkTrainer, "_branch_gradient", lambda self, *a: calls.append(a[-1]) or real(self, *a))
    got = _read_out(base, trunks(cells, "constant", B * T), cfg, stream, [stream.batch(999, B, T)], 1)
    assert len(calls) == 1  # one branch for the two budgets
    for cell in cells:
        _same(got[cell.key], _alone(base, cell, cfg, stream, [stream.batch(999, B, T)]))
