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
from vmap_sweep.analysis.plots import axis_label
from vmap_sweep.analysis.repeats import sized_cells
from vmap_sweep.analysis.view import grid_view
from vmap_sweep.data.stream import TokenStream
from vmap_sweep.data.synthetic import synthetic_docqa
from vmap_sweep.model.tokenizer import ByteTokenizer
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
    cfg = preset("tiny").with_overrides(packing=False, seq_len=256, batch_size=1, resolution="2", x="lr:1e-3:3e-2:log",
                                        y=y, eval_tokens=512, budget_unit=unit)
    cfg.validate()
    return run_local(cfg, tmp_path / name)


def test_a_supervised_study_trains_each_cell_as_the_token_budget_of_its_prefix(tmp_path):
    with _study(tmp_path, "answers", "supervised", "tokens:3:40:log") as answers:
        sized = sized_cells(answers)
        positions = {n: s.tokens for n, s in sized.sizes.items()}
        assert sorted(positions) == [3, 40] and all(sized.sizes[n].supervised == n for n in positions)
        lo, hi = positions[3], positions[40]
        rows = {(r["i"], r["j"]): r for r in answers.rows(arrays=True)}
        view = grid_view(answers)
        export = export_study(answers, "csv", tmp_path / "answers.csv")
    assert view.budget_unit == "supervised"
    assert axis_label(view.y_name, view.optimizer, view.budget_unit) == "dataset size (supervised tokens)"
    with open(export) as f:
        exported = list(csv.DictReader(f))
    assert {r["budget_unit"] for r in exported} == {"supervised"}
    assert {float(r["y"]): int(r["stream_tokens"]) for r in exported} == {3.0: lo, 40.0: hi}
    # the same cells planned in tokens, at the positions those answer budgets take: bitwise the same records
    with _study(tmp_path, "tokens", "tokens", f"tokens:{lo}:{hi}:log") as tokens:
        for r in tokens.rows(arrays=True):
            a = rows[(r["i"], r["j"])]
            assert r["steps"] == a["steps"]
            for field in ("trajectory", "base_losses", "grad_norms"):
                assert np.array_equal(bits(r[field]), bits(a[field])), field
