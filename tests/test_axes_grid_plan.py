"""Axis specs, grids and batch plans: parsing, errors, orderings and the invariants the runner relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import AXES, AxisSpec, axes_help, check_axis_pair, parse_axis_spec, parse_resolution
from vmap_sweep.study.config import preset
from vmap_sweep.study.grid import Grid
from vmap_sweep.study.plan import Batch, parse_shard, plan_batches, plan_summary, shard

EXPECTED_AXES = {"lr", "matrix_lr", "embedding_lr", "unembedding_lr", "attn_lr", "mlp_lr", "tokens",
                 "batch_size", "warmup_ratio", "weight_decay"}


def steps_for(tokens_per_step: int):
    return lambda c: math.ceil(c.hparams["tokens"] / tokens_per_step)


# ------------------------------------------------------------------ axes
def test_registry_documents_every_axis():
    assert set(AXES) == EXPECTED_AXES
    help_text = axes_help()
    for a in AXES.values():
        assert a.description and a.name in help_text and a.description in help_text
    assert AXES["tokens"].kind == "int" and AXES["warmup_ratio"].default_scale == "lin"


def test_parse_spec_default_and_explicit_scale():
    s = parse_axis_spec("lr:1e-6:1e-3")
    assert (s.name, s.lo, s.hi, s.scale) == ("lr", 1e-6, 1e-3, "log")
    assert parse_axis_spec("warmup_ratio:0:0.5").scale == "lin"
    assert parse_axis_spec("lr:1e-6:1e-3:LIN").scale == "lin"
    assert parse_axis_spec(str(s)) == s  # str() is a parseable spec


def test_values_log_lin_endpoints_exact():
    v = parse_axis_spec("lr:1e-6:1e-3:log").values(4)
    assert v.dtype == np.float64 and v[0] == 1e-6 and v[-1] == 1e-3
    np.testing.assert_allclose(v, [1e-6, 1e-5, 1e-4, 1e-3], rtol=1e-12)
    w = parse_axis_spec("warmup_ratio:0:1").values(5)
    np.testing.assert_array_equal(w, [0, 0.25, 0.5, 0.75, 1.0])


def test_int_axis_rounds_and_keeps_duplicates():
    v = parse_axis_spec("tokens:1:10").values(64)
    assert len(v) == 64 and v.dtype == np.float64
    assert np.all(v == np.rint(v)) and v[0] == 1 and v[-1] == 10
    assert len(np.unique(v)) < 64  # duplicates exist and are kept as distinct cells
    g = Grid(parse_axis_spec("lr:1e-5:1e-3"), parse_axis_spec("tokens:1:10"), 2, 64)
    cells = g.cells()
    assert len(cells) == 128 and all(isinstance(c.hparams["tokens"], int) for c in cells)


@pytest.mark.parametrize("spec, needle", [
    ("lrr:1e-6:1e-3", "known axes: lr, matrix_lr"),
    ("lr:1e-6", "NAME:MIN:MAX"),
    ("lr::1e-3", "NAME:MIN:MAX"),
    ("lr:1e-6:1e-3:log:x", "NAME:MIN:MAX"),
    ("lr:1e-3:1e-6", "min"),
    ("lr:1e-3:1e-3", "min"),
    ("lr:0:1e-3:log", "log axis needs bounds > 0"),
    ("lr:-1:1e-3:lin", "must be > 0"),
    ("weight_decay:0:0.1:log", "log axis"),
    ("weight_decay:-0.1:0.1:lin", "negative"),
    ("warmup_ratio:0:1.5", "[0, 1]"),
    ("lr:abc:1e-3", "not a number"),
    ("lr:nan:1e-3", "not a finite number"),
    ("lr:1e-6:inf", "not a finite number"),
    ("lr:1e-6:1e-3:cubic", "scale"),
])
def test_bad_specs_raise_one_line_config_error(spec, needle):
    with pytest.raises(ConfigError) as e:
        parse_axis_spec(spec)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and spec.split(":")[0] in msg


def test_weight_decay_lin_from_zero_is_fine():
    assert parse_axis_spec("weight_decay:0:0.1:lin").values(3)[0] == 0.0


def test_same_axis_on_x_and_y():
    a, b = parse_axis_spec("lr:1e-6:1e-3"), parse_axis_spec("lr:1e-5:1e-2")
    with pytest.raises(ConfigError, match="same axis"):
        check_axis_pair(a, b)
    with pytest.raises(ConfigError, match="same axis"):
        Grid(a, b, 4, 4)


@pytest.mark.parametrize("text, expected", [("128", (128, 128)), ("128x64", (128, 64)), ("128×64", (128, 64)),
                                            (" 2 x 3 ", (2, 3)), (16, (16, 16))])
def test_parse_resolution(text, expected):
    assert parse_resolution(text) == expected


@pytest.mark.parametrize("text", ["1", "128x1", "0x4", "abc", "12x", "x12", "1.5", "-4", ""])
def test_parse_resolution_errors(text):
    with pytest.raises(ConfigError):
        parse_resolution(text)


# ------------------------------------------------------------------ grid
def make_grid(nx=4, ny=3, **base) -> Grid:
    return Grid(parse_axis_spec("lr:1e-5:1e-2"), parse_axis_spec("tokens:1000:100000"), nx, ny, base)


def test_cells_row_major_and_array_convention():
    g = make_grid(4, 3, warmup_ratio=0.1)
    cells = g.cells()
    assert [(c.j, c.i) for c in cells] == [(j, i) for j in range(3) for i in range(4)]
    xs, ys = g.xs, g.ys
    arr_x = np.full(g.shape, np.nan)
    arr_y = np.full(g.shape, np.nan)
    for c in cells:
        assert c.x == xs[c.i] and c.y == ys[c.j]
        assert c.hparams == {"warmup_ratio": 0.1, "lr": c.x, "tokens": int(c.y)}
        arr_x[c.j, c.i], arr_y[c.j, c.i] = c.x, c.y
    assert g.shape == (3, 4)
    mx, my = np.meshgrid(xs, ys)  # (ny, nx) with [j, i]
    np.testing.assert_array_equal(arr_x, mx)
    np.testing.assert_array_equal(arr_y, my)
    assert g.cell(2, 1) == cells[1 * 4 + 2]


def test_grid_validation():
    with pytest.raises(ConfigError, match="resolution"):
        make_grid(1, 4)
    with pytest.raises(ConfigError, match="unknown fixed"):
        make_grid(lerning_rate=1.0)
    with pytest.raises(ConfigError, match="both swept and fixed"):
        make_grid(lr=1e-3)
    with pytest.raises(ConfigError):
        make_grid().cell(4, 0)


def test_window_child_grid():
    g = make_grid(8, 8, weight_decay=0.0)
    child = g.window(1e-4, 1e-3, 2000, 50000)
    assert (child.nx, child.ny, child.base) == (8, 8, {"weight_decay": 0.0})
    assert (child.x.name, child.x.lo, child.x.hi, child.x.scale) == ("lr", 1e-4, 1e-3, "log")
    assert (child.y.lo, child.y.hi) == (2000, 50000)
    assert child.xs[0] == 1e-4 and child.xs[-1] == 1e-3
    # a window from stored cell coordinates (the full range) is inside
    full = g.window(g.xs[0], g.xs[-1], g.ys[0], g.ys[-1])
    assert full.cells() == g.cells()


@pytest.mark.parametrize("window", [(1e-3, 1e-4, 2000, 5000), (1e-6, 1e-3, 2000, 5000),
                                    (1e-4, 1e-1, 2000, 5000), (1e-4, 1e-3, 500, 5000),
                                    (1e-4, 1e-3, 5000, 5000)])
def test_window_errors(window):
    with pytest.raises(ConfigError, match="zoom window"):
        make_grid().window(*window)


# ------------------------------------------------------------------ plan
def test_plan_groups_rows_by_steps_and_packs_leftovers_last():
    g = make_grid(8, 5)  # 8 LRs per token budget; 5 budgets -> 5 distinct step counts
    cells = g.cells()
    steps_of = steps_for(512)
    batches = plan_batches(cells, 3, steps_of)
    # every cell exactly once
    seen = [(c.i, c.j) for b in batches for c in b.cells]
    assert sorted(seen) == sorted((c.i, c.j) for c in cells)
    assert [b.index for b in batches] == list(range(len(batches)))
    # 5 groups of 8 -> 2 full batches each (10 uniform), then 10 leftovers packed into 4 batches
    uniform = [b for b in batches if len({steps_of(c) for c in b.cells}) == 1 and len(b.cells) == 3]
    assert len(uniform) >= 10 and batches[:10] == uniform[:10]
    for b in batches[:10]:
        assert len({c.j for c in b.cells}) == 1  # a row of LRs at a time
    for b in batches:
        assert b.steps == max(steps_of(c) for c in b.cells)
        assert b.cell_steps == tuple(steps_of(c) for c in b.cells)
        assert len(b.cells) <= 3
    assert plan_batches(cells, 3, steps_of) == batches  # deterministic


def test_plan_no_padding_when_groups_divide():
    g = make_grid(8, 4)
    batches = plan_batches(g.cells(), 4, steps_for(1000))
    s = plan_summary(batches, flops_per_model_step=2.0)
    expected_steps = sum(math.ceil(c.hparams["tokens"] / 1000) for c in g.cells())
    assert s == {"cells": 32, "batches": 8, "model_steps": expected_steps, "useful_model_steps": expected_steps,
                 "padded_model_steps": 0, "flops": 2.0 * expected_steps}


def test_plan_summary_counts_padding():
    g = make_grid(2, 2)
    steps = {(0, 0): 2, (1, 0): 2, (0, 1): 10, (1, 1): 10}
    batches = plan_batches(g.cells(), 3, lambda c: steps[(c.i, c.j)])
    # groups of 2 never fill 3 -> one leftover batch of the three largest-first, then one more
    assert [(len(b.cells), b.steps) for b in batches] == [(3, 10), (1, 2)]
    s = plan_summary(batches, 1.0)
    assert s["model_steps"] == 3 * 10 + 2 and s["padded_model_steps"] == 8 and s["useful_model_steps"] == 24


def test_plan_validation():
    cells = make_grid().cells()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError):
            plan_batches(cells, bad, lambda c: 1)
    with pytest.raises(ConfigError, match="step count"):
        plan_batches(cells, 2, lambda c: -1)


def test_shards_partition_balanced_and_deterministic():
    g = make_grid(16, 6)
    batches = plan_batches(g.cells(), 4, steps_for(256))
    n = 4
    parts = [shard(batches, k, n) for k in range(1, n + 1)]
    idx = [b.index for p in parts for b in p]
    assert sorted(idx) == list(range(len(batches)))  # disjoint and complete
    for p in parts:
        assert [b.index for b in p] == sorted(b.index for b in p)
    loads = [sum(b.model_steps for b in p) for p in parts]
    assert max(loads) - min(loads) <= max(b.model_steps for b in batches)
    assert [shard(batches, k, n) for k in range(1, n + 1)] == parts
    assert shard(batches, 1, 1) == batches


def test_parse_shard_and_bounds():
    assert parse_shard("2/4") == (2, 4) and parse_shard(" 1 / 1 ") == (1, 1)
    for bad in ("0/4", "5/4", "2/0", "2", "a/b", "-1/4"):
        with pytest.raises(ConfigError, match="shard"):
            parse_shard(bad)
    with pytest.raises(ConfigError):
        shard([Batch(0, (), 0)], 3, 2)


def test_axis_spec_direct_construction_validates():
    with pytest.raises(ConfigError, match="unknown axis"):
        AxisSpec("foo", 1.0, 2.0, "log")
    with pytest.raises(ConfigError, match="not a finite number"):
        AxisSpec("lr", "1e-3", 1.0, "log")  # type: ignore[arg-type]


@pytest.mark.parametrize("rows, seq_len", [(10**12, 1024), (1 << 15, 1 << 10)])
def test_a_step_of_more_tokens_than_any_study_uses_is_refused_before_allocation(rows, seq_len):
    with pytest.raises(ConfigError, match=r"tokens per step, more than 16,777,216; use fewer rows or shorter ones"):
        preset("tiny").with_overrides(rows_per_step=rows, seq_len=seq_len).validate()
    preset("tiny").with_overrides(rows_per_step=1 << 14, seq_len=1 << 10).validate()  # exactly the bound
