"""A study planned in answer tokens or conversations (run --budget-unit): each budget is the shortest prefix of the
stream holding that many, trained exactly as the token budget of that prefix; maps, rules and exports name the
unit."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from helpers import bits, run_local
from test_repeats import brute_force, docqa_like_stream

from vmap_sweep.analysis.export import export_study
from vmap_sweep.analysis.view import StudyView, grid_view
from vmap_sweep.data.stream import TokenStream
from vmap_sweep.data.synthetic import synthetic_docqa
from vmap_sweep.model.tokenizer import ByteTokenizer
from vmap_sweep.present.plots import axis_label
from vmap_sweep.study.config import preset


@pytest.mark.parametrize("n", [1, 5, 12, 13, 100, 359, 360, 361, 1000])
def test_a_budget_of_n_answer_tokens_is_the_shortest_prefix_holding_n(n):
    stream = docqa_like_stream()  # 30 conversations of 40 tokens, 12 of them answer: 360 answer targets
    (p,) = stream.positions([n], "supervised").values()
    assert brute_force(stream, p)[0] == n and brute_force(stream, p - 1)[0] == n - 1
    assert stream.budgets([n], "supervised").sizes[n].supervised == n


@pytest.mark.parametrize("c", [1, 2, 30, 31, 75])
def test_a_budget_of_c_conversations_ends_where_the_c_th_does(c):
    stream = docqa_like_stream()
    (p,) = stream.positions([c], "conversations").values()
    assert p == 40 * c  # whole conversations, a second epoch included
    assert stream.budgets([c], "conversations").sizes[c].conversations == c
    assert brute_force(stream, p)[0] == 12 * c


def test_under_rows_a_conversation_budget_is_whole_rows():
    s = TokenStream.build(synthetic_docqa(20, seed=0), ByteTokenizer(), seed=0, row_len=256)
    assert s.positions([1, 7, 25], "conversations") == {1: 256, 7: 7 * 256, 25: 25 * 256}


def _study(tmp_path, name: str, unit: str, y: str):
    cfg = preset("tiny").with_overrides(packing=False, seq_len=256, rows_per_step=1, resolution="2",
                                        x="lr:1e-3:3e-2:log", y=y, eval_tokens=512, budget_unit=unit)
    cfg.validate()
    return run_local(cfg, tmp_path / name)


def test_a_supervised_study_trains_each_cell_as_the_token_budget_of_its_prefix(tmp_path):
    with _study(tmp_path, "answers", "supervised", "tokens:3:40:log") as answers:
        sized = StudyView.load(answers).sized
        positions = {n: s.tokens for n, s in sized.sizes.items()}
        assert sorted(positions) == [3, 40] and all(sized.sizes[n].supervised == n for n in positions)
        lo, hi = positions[3], positions[40]
        rows = {(r["i"], r["j"]): r for r in answers.rows(arrays=True)}
        view = grid_view(answers)
        export = export_study(StudyView.load(answers), "csv", tmp_path / "answers.csv")
    assert view.budget_unit == "supervised"
    assert axis_label(view.y_name, view.optimizer, view.budget_unit) == "dataset size (supervised tokens)"
    with open(export) as f:
        exported = list(csv.DictReader(f))
    assert {r["budget_unit"] for r in exported} == {"supervised"}
    assert {float(r["tokens"]): int(r["stream_tokens"]) for r in exported} == {3.0: lo, 40.0: hi}
    # the same cells planned in tokens, at the positions those answer budgets take: bitwise the same records
    with _study(tmp_path, "tokens", "tokens", f"tokens:{lo}:{hi}:log") as tokens:
        for r in tokens.rows(arrays=True):
            a = rows[(r["i"], r["j"])]
            assert r["steps"] == a["steps"]
            for field in ("trajectory", "base_losses", "grad_norms"):
                assert np.array_equal(bits(r[field]), bits(a[field])), field


def test_rules_count_d_in_the_study_unit_by_default_and_convert_on_request(tmp_path):
    from test_rules import converging

    from vmap_sweep.analysis.rules import rules_of_thumb
    from vmap_sweep.analysis.study import reclassify
    from vmap_sweep.store import extras
    from vmap_sweep.store.db import StudyStore
    from vmap_sweep.study.axes import parse_axis_spec
    from vmap_sweep.study.config import StudyConfig
    from vmap_sweep.study.grid import Grid
    from vmap_sweep.study.sizes import DatasetSize

    x, y = "lr:1e-6:1e-1:log", "tokens:100:800:log"
    cfg = StudyConfig(model="tiny", data="synthetic", x=x, y=y, resolution="16x4", budget_unit="supervised")
    grid = Grid(parse_axis_spec(x), parse_axis_spec(y), 16, 4)
    store = StudyStore.create_or_open(tmp_path / "s", cfg.to_dict(), grid.cells())
    budgets = sorted({int(c.hparams["tokens"]) for c in grid.cells()})
    extras.put_dataset_sizes(store, {n: DatasetSize(20 * n, n, n // 10) for n in budgets})
    store.record_batch([(c, converging(c.x < 1e-3 * (c.y / 100) ** 0.5, 2.0)) for c in grid.cells()], batch_index=0)
    reclassify(store)
    with store:
        answers, tokens = rules_of_thumb(StudyView.load(store)), rules_of_thumb(StudyView.load(store), "tokens")
        sized = StudyView.load(store).sized
    assert answers.size_unit == answers.budget_unit == "supervised"
    assert [r.size for r in answers.sizes] == budgets
    assert [r.size for r in tokens.sizes] == [20 * n for n in budgets]  # the positions, as recorded
    assert sized.size(budgets[0], "conversations") == budgets[0] // 10
    # the stored sizes keep their positions: a study in answer tokens reads back what it recorded
    assert {n: s.tokens for n, s in sized.sizes.items()} == {n: 20 * n for n in budgets}


def test_dry_run_shows_rows_padding_and_answer_tokens_per_step(tmp_path):
    from cli_helpers import ok

    out = ok("run", "--preset", "tiny", "--no-packing", "--seq-len", "256", "--rows-per-step", "2", "--budget-unit",
             "supervised", "--y", "tokens:8:64:log", "--resolution", "4", "--dry-run", "--device", "cpu",
             "--out", tmp_path / "s").output
    assert "supervised (answer) tokens" in out and "4,000 rows" in out and "26.6% of positions" in out
    assert "per step on average" in out
    packed = ok("run", "--preset", "tiny", "--resolution", "4", "--dry-run", "--device", "cpu",
                "--out", tmp_path / "p").output
    assert "trained without their conversation's" in packed


def test_shards_of_a_study_in_answer_tokens_deal_its_grid_cells_by_their_positions():
    from vmap_sweep.study.plan import build_grid, cell_steps, plan_study, shard_cells

    cfg = preset("tiny").with_overrides(packing=False, seq_len=256, rows_per_step=1, resolution="4",
                                        y="tokens:8:64:log", budget_unit="supervised")
    grid = build_grid(cfg)
    positions = {int(c.hparams["tokens"]): 256 * int(c.hparams["tokens"]) for c in grid.cells()}  # 1 answer/row
    parts = [shard_cells(cfg, grid, k, 2, positions) for k in (1, 2)]
    assert sorted(c.key for p in parts for c in p) == sorted(c.key for c in grid.cells())
    assert all(c in grid.cells() for p in parts for c in p)  # as the grid holds them, budgets in answer tokens
    batches = plan_study(cfg, parts[0], 4, True, positions)
    steps = cell_steps(cfg)
    assert all(n == steps(c) == -(-c.hparams["tokens"] // 256) for b in batches
               for c, n in zip(b.cells, b.cell_steps, strict=True))
