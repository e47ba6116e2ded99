"""Repeated experiments: budgets that add no supervised token to a smaller one are one experiment.

The stream's counts (supervised targets, conversations) against brute force; `same_experiments` on known
streams; and the invariant the rules and maps rely on: a cell found to repeat another gives bitwise the same
record, trained alone or read out of a shared trajectory.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import VOCAB, bits, tiny_model

from vmap_sweep.analysis.view import StudyView
from vmap_sweep.data.stream import TokenStream
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import same_experiments, trunks
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer

B, T = 4, 16  # 64 tokens per step
CONVERSATION, ANSWER = 40, 12  # each conversation: 28 prompt tokens, then 12 supervised answer tokens


def docqa_like_stream(conversations: int = 30) -> TokenStream:
    """Conversations of a long unsupervised prompt and a short supervised answer, as DocVQA's are."""
    gen = torch.Generator().manual_seed(0)
    n = conversations * CONVERSATION
    ids = torch.randint(0, VOCAB, (n,), generator=gen)
    for k in range(1, n):  # a learnable pattern
        if k % 3:
            ids[k] = (ids[k - 1] * 3 + 1) % VOCAB
    mask = (torch.arange(n) % CONVERSATION) >= CONVERSATION - ANSWER
    return TokenStream(ids, mask, tuple(range(conversations)), seed=0, lengths=(CONVERSATION,) * conversations)


def brute_force(stream: TokenStream, budget: int) -> tuple[int, int]:
    targets = stream.window(0, budget)[1]
    ends = np.cumsum(stream.lengths)
    held = set()
    for k in torch.nonzero(targets != -1).flatten().tolist():
        epoch, position = divmod(k + 1, stream.num_tokens)  # target k is token k+1
        held.add((epoch, int(np.searchsorted(ends, position, side="right"))))
    return int((targets != -1).sum()), len(held)


@pytest.mark.parametrize("budget", [1, 27, 28, 39, 40, 66, 67, 500, 1199, 1200, 1201, 1227, 3000])
def test_a_budget_counts_its_supervised_targets_and_conversations(budget):
    stream = docqa_like_stream()
    size = stream.budgets([budget]).sizes[budget]
    assert (size.supervised, size.conversations) == brute_force(stream, budget)
    assert size.tokens == budget


def test_the_first_supervised_budget_is_the_first_answer_token():
    stream = docqa_like_stream()
    budgets = stream.budgets([10, 28, 29])
    # target 27 is token 28, the first answer token: budgets of 28 positions hold it, 27 do not
    assert budgets.first_supervised == 28
    assert budgets.sizes[28].supervised == 1 and budgets.sizes[10].supervised == 0


# Answers are targets 27..38 of each 40: budgets 39..67 hold the same 12, 79..107 the same 24.
BUDGETS = [39, 40, 50, 64, 66, 79, 100, 107, 130]
LRS = [3e-3, 3e-2, 30.0]  # the last one diverges
REPEATS = {40: 39, 50: 39, 64: 39, 66: 39, 100: 79, 107: 79}


def _cells() -> list[Cell]:
    return [Cell(i, j, lr, n, {"lr": lr, "tokens": n}) for j, n in enumerate(BUDGETS) for i, lr in enumerate(LRS)]


def _supervised(stream: TokenStream) -> dict[int, int]:
    return {n: s.supervised for n, s in stream.budgets(BUDGETS).sizes.items()}


def test_same_experiments_under_a_constant_lr_are_the_budgets_with_no_answer_between():
    cells = _cells()
    same = same_experiments(cells, _supervised(docqa_like_stream()), "constant", B * T)
    found = {int(c.hparams["tokens"]): int(same[c.key].hparams["tokens"]) for c in cells if c.key in same}
    assert found == REPEATS
    assert all(same[c.key].hparams["lr"] == c.hparams["lr"] for c in cells if c.key in same)  # never across LRs


def test_under_a_decay_only_budgets_of_as_many_steps_repeat():
    # a decay's multipliers depend on the cell's step count: 64 (one step) and 66 (two) are different runs
    cells = _cells()
    same = same_experiments(cells, _supervised(docqa_like_stream()), "cosine", B * T)
    found = {int(c.hparams["tokens"]): int(same[c.key].hparams["tokens"]) for c in cells if c.key in same}
    assert found == {40: 39, 50: 39, 64: 39, 100: 79, 107: 79}


def _same_experiment(got, want) -> None:
    for field in ("losses", "base_losses", "grad_norms", "lrs", "initial_loss", "eval_loss"):
        a, b = getattr(got, field), getattr(want, field)
        assert np.array_equal(bits(a), bits(b)), (field, a, b)
    for field in ("steps_done", "unstable", "unstable_step"):
        assert getattr(got, field) == getattr(want, field), field


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_repeated_experiment_gives_its_cells_the_very_same_record(schedule):
    base, stream = tiny_model(), docqa_like_stream()
    cfg = TrainConfig(optimizer="adamw", schedule=schedule, rows_per_step=B, seq_len=T, divergence_ratio=3.0)
    evals = [stream.batch(20, B, T)]
    cells = _cells()
    same = same_experiments(cells, _supervised(stream), schedule, B * T)
    assert len(same) >= 5 * len(LRS)
    # every cell its own model (what --no-share trains), and the trunks read out at each budget
    alone = dict(zip([c.key for c in cells], TrunkTrainer.separate(base, [c.hparams for c in cells], cfg, "cpu")
                     .run(stream, evals), strict=True))
    lanes = trunks(cells, schedule, B * T)
    records = TrunkTrainer(base, [[c.hparams for c in lane] for lane in lanes], cfg).run(stream, evals)
    shared = dict(zip([c.key for lane in lanes for c in lane], records, strict=True))
    for c in cells:
        if c.key in same:
            _same_experiment(alone[c.key], alone[same[c.key].key])
            _same_experiment(shared[c.key], alone[same[c.key].key])
    # and cells with more answer tokens are other experiments
    assert alone[(0, BUDGETS.index(79))].losses != alone[(0, BUDGETS.index(39))].losses


# ----------------------------------------------------------------------------- a stored study's repeats
def _stored_study(tmp_path):
    """A finished 2 x 3 study whose middle size adds no supervised token to the smallest."""
    from helpers import rec_for

    from vmap_sweep.store import extras
    from vmap_sweep.store.db import StudyStore
    from vmap_sweep.study.config import StudyConfig
    from vmap_sweep.study.plan import build_grid
    from vmap_sweep.study.sizes import DatasetSize

    cfg = StudyConfig(model="tiny", data="synthetic", x="lr:1e-4:1e-2:log", y="tokens:256:1024:log",
                      resolution="2x3", rows_per_step=4, seq_len=64)
    cells = build_grid(cfg).cells()
    store = StudyStore.create_or_open(tmp_path / "study", cfg.to_dict(), cells)
    store.record_batch([(c, rec_for(c.i, c.j)) for c in cells], batch_index=0)
    budgets = sorted({int(c.hparams["tokens"]) for c in cells})
    extras.put_dataset_sizes(store, {n: DatasetSize(n, s, c) for n, s, c in zip(budgets, (12, 12, 40), (1, 1, 3),
                                                                                     strict=True)})
    return store, budgets


def test_exports_carry_each_cells_sizes_and_the_cell_it_repeats(tmp_path):
    import csv

    from vmap_sweep.analysis.export import export_study

    store, budgets = _stored_study(tmp_path)
    with open(export_study(StudyView.load(store), None, tmp_path / "cells.csv"), newline="") as f:
        rows = {(int(r["i"]), int(r["j"])): r for r in csv.DictReader(f)}
    assert [rows[(1, j)]["supervised_tokens"] for j in range(3)] == ["12", "12", "40"]
    assert [rows[(1, j)]["conversations"] for j in range(3)] == ["1", "1", "3"]
    assert [rows[(i, 1)]["same_data_as"] for i in range(2)] == ["0,0", "1,0"]  # same LR, the smaller budget
    assert rows[(0, 0)]["same_data_as"] == rows[(0, 2)]["same_data_as"] == ""


def test_maps_hatch_the_repeated_cells_and_say_so(tmp_path):
    from vmap_sweep.analysis.view import grid_view
    from vmap_sweep.present import plots

    store, _ = _stored_study(tmp_path)
    view = grid_view(store)
    assert view.repeats.tolist() == [[False, False], [True, True], [False, False]]
    ax = plots.score_figure(view).axes[0]
    assert plots.REPEATS_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    hatched = [c for c in ax.collections if c.get_hatch()]
    assert len(hatched) == 1 and len(hatched[0].get_paths()) == 2  # the two cells of the middle row
