"""Rules of thumb: on synthetic finished studies whose edge follows a known power law (no training)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from vmap_sweep.analysis.rules import fit_power_law, rules_of_thumb
from vmap_sweep.analysis.stats import t_quantile
from vmap_sweep.analysis.study import reclassify
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.plots import plot_rules
from vmap_sweep.present.prose import power_law_formula, rules_sentences, ten_x_sentence
from vmap_sweep.present.tables import fit_rows, rules_rows, rules_table, tokens_rows
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.grid import Grid
from vmap_sweep.study.plan import build_grid

LR_AXIS = "lr:1e-6:1e-1:log"
SIZE_AXIS = "tokens:1e3:1e6:log"


@dataclass
class Rec:
    """Duck-typed CellRecord: a converging (loss halves) or diverging (loss grows) trajectory."""

    initial_loss: float = 3.0
    steps: int = 4
    losses: list[float] = field(default_factory=list)
    base_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=lambda: [1.0] * 5)
    lrs: list[float] = field(default_factory=lambda: [1e-4] * 5)
    steps_done: int = 4
    unstable: bool = False
    unstable_step: int | None = None
    eval_loss: float | None = None
    wall_time: float = 0.0


def law(a: float, b: float, d0: float = 1e3) -> Callable[[float], float]:
    """LR(D) = a * (D / d0)^b."""
    return lambda d: a * (d / d0) ** b


def converging(ok: bool, eval_loss: float) -> Rec:
    if ok:
        losses = [3.0, 2.2, 1.8, 1.5, 1.4]
    else:
        losses = [3.0, 6.0, 12.0, float("nan"), float("nan")]
    return Rec(losses=losses, base_losses=[3.0] * 5, eval_loss=eval_loss if ok else 50.0)


def build_study(
    directory: Path,
    crit: Callable[[float], float],
    opt: Callable[[float], float] | None = None,
    nx: int = 48,
    ny: int = 8,
    x: str = LR_AXIS,
    y: str = SIZE_AXIS,
    override: Callable[[int, int], bool | None] | None = None,
    finish: bool = True,
) -> StudyStore:
    """A finished, classified study: converged iff lr < crit(D) (unless ``override(k_lr, k_size)`` says
    otherwise); eval loss = 2 + log10(lr / opt(D))^2, lowest at opt(D). Works with LR on x or on y."""
    opt = opt or (lambda d: crit(d) / 4)
    # as stored, unchecked: some of these axis pairs are measured here although `run` would not train them
    cfg = StudyConfig.from_dict({"model": "tiny", "data": "synthetic", "x": x, "y": y, "resolution": f"{nx}x{ny}"},
                                check=False)
    grid = Grid(parse_axis_spec(x), parse_axis_spec(y), nx, ny)
    store = StudyStore.create_or_open(directory, cfg.to_dict(), grid.cells())
    lr_on_x = grid.x.name != "tokens"
    results = []
    for c in grid.cells():
        lr, d = (c.x, c.y) if lr_on_x else (c.y, c.x)
        k_lr, k_size = (c.i, c.j) if lr_on_x else (c.j, c.i)
        ok = lr < crit(d)
        if override is not None and override(k_lr, k_size) is not None:
            ok = bool(override(k_lr, k_size))
        results.append((c, converging(ok, 2.0 + math.log10(lr / opt(d)) ** 2)))
    if not finish:
        results = results[: len(results) // 2]
    store.record_batch(results, batch_index=0)
    reclassify(store)
    return store


def lr_grid(nx: int = 48) -> np.ndarray:
    return parse_axis_spec(LR_AXIS).values(nx)


def sizes(ny: int = 8) -> np.ndarray:
    return parse_axis_spec(SIZE_AXIS).values(ny)


# ----------------------------------------------------------------------------- Student t


@pytest.mark.parametrize("dof, t", [(1, 12.7062), (2, 4.3027), (5, 2.5706), (10, 2.2281), (30, 2.0423),
                                    (1000, 1.9623)])
def test_t_quantile_matches_tables(dof, t):
    assert t_quantile(0.975, dof) == pytest.approx(t, abs=1e-4)


def test_exact_power_law_fit_and_two_point_fit_has_no_ci():
    d = np.array([1e3, 1e4, 1e5, 1e6])
    fit = fit_power_law(d, 2e-5 * (d / 1e3) ** 0.4)
    assert fit.exponent == pytest.approx(0.4) and fit.predict(1e3) == pytest.approx(2e-5)
    assert fit.ci_low == pytest.approx(0.4) and fit.ci_high == pytest.approx(0.4) and fit.r2 == pytest.approx(1)
    two = fit_power_law(d[:2], np.array([1e-4, 3e-4]))
    assert two.n == 2 and math.isnan(two.ci_low) and math.isnan(two.stderr)
    assert fit_power_law(d[:1], np.array([1e-4])) is None
    assert fit_power_law(np.array([1e3, 1e3]), np.array([1e-4, 2e-4])) is None


# ----------------------------------------------------------------------------- a clean law


@pytest.fixture
def clean(tmp_path):
    store = build_study(tmp_path / "clean", law(3e-5, 0.5))
    yield store
    store.close()


def test_recovers_the_exponent_and_edges_of_a_clean_law(clean):
    r = rules_of_thumb(StudyView.load(clean))
    crit, lrs = law(3e-5, 0.5), lr_grid()
    assert (r.lr_axis, r.lr_on, r.resolution) == ("lr", "x", (48, 8))
    assert len(r.sizes) == 8 and not r.censored_sizes
    for row, d in zip(r.sizes, sizes(), strict=True):
        above = lrs[lrs >= crit(d)]
        below = lrs[lrs < crit(d)]
        assert row.size == d
        assert row.lr_first_diverging == above[0]  # smallest LR not converged
        assert row.lr_last_converging == below[-1]  # largest LR converged: the neighbour, no islands
        assert row.lr_safe == 0.5 * above[0] and not row.islands and row.low_lr_failures == 0
        assert row.lr_opt == lrs[np.argmin(np.abs(np.log(lrs / (crit(d) / 4))))]
    for fit in (r.crit_fit, r.crit_last_fit, r.opt_fit):
        # grid quantisation biases a fit by a few hundredths at most; the CI may not cover it (it is not noise)
        assert fit.n == 8 and abs(fit.exponent - 0.5) < 0.05 and fit.ci_low <= fit.exponent <= fit.ci_high
        assert fit.ci_high - fit.ci_low < 0.1
    assert r.crit_fit.predict(1e4) == pytest.approx(crit(1e4), rel=0.3)
    assert r.safe_fit.exponent == r.crit_fit.exponent
    assert r.safe_fit.coefficient == pytest.approx(0.5 * r.crit_fit.coefficient)
    assert r.leave_out_fraction == 1.0 and len(r.leave_out) == 8
    # 10^0.5 = 3.2x: 10x more data clearly allows 2x more LR
    assert r.ten_x.verdict == "yes" and r.ten_x.ratio == pytest.approx(10**r.crit_fit.exponent)
    assert 2.0 <= r.ten_x.ci_low < r.ten_x.ratio < r.ten_x.ci_high


def test_ten_x_verdict_no_and_inconclusive(tmp_path):
    with build_study(tmp_path / "flat", law(1e-3, 0.1)) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert abs(r.crit_fit.exponent - 0.1) < 0.05 and r.ten_x.verdict == "no" and r.ten_x.ci_high < 2
    # few sizes and a noisy edge around b = 0.3 (10^0.3 = 2x): the CI straddles 2
    noise = [1.0, 3.0, 0.35, 2.5]
    idx = {float(d): k for k, d in enumerate(parse_axis_spec(SIZE_AXIS).values(4))}
    with build_study(tmp_path / "noisy", lambda d: 1e-4 * (d / 1e3) ** 0.3 * noise[idx[d]], ny=4) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert r.crit_fit.n == 4 and r.ten_x.verdict == "inconclusive" and r.ten_x.ci_low < 2 < r.ten_x.ci_high
    with build_study(tmp_path / "two", law(1e-4, 0.5), ny=2) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert r.crit_fit.n == 2 and r.ten_x.verdict == "inconclusive" and r.ten_x.ci_low is None


def test_island_hole_and_low_lr_failure(tmp_path):
    crit, lrs = law(3e-5, 0.5), lr_grid()
    edge = [int(np.searchsorted(lrs, crit(d))) for d in sizes()]  # first non-converged index per size

    def override(k_lr: int, k_size: int) -> bool | None:
        if k_size == 2 and k_lr == edge[2] + 3:
            return True  # island of convergence above the edge
        if k_size == 5 and k_lr == edge[5] - 4:
            return False  # a hole below the edge
        if k_size == 6 and k_lr == 0:
            return False  # too small an LR to learn: not the divergence edge
        return None

    with build_study(tmp_path / "islands", crit, override=override) as store:
        r = rules_of_thumb(StudyView.load(store))
    island, hole, low = r.sizes[2], r.sizes[5], r.sizes[6]
    assert island.lr_first_diverging == lrs[edge[2]] and island.lr_last_converging == lrs[edge[2] + 3]
    assert island.islands and island.lr_last_converging > island.lr_first_diverging
    assert hole.lr_first_diverging == lrs[edge[5] - 4] and hole.lr_last_converging == lrs[edge[5] - 1]
    assert hole.islands
    assert low.lr_first_diverging == lrs[edge[6]] and low.low_lr_failures == 1 and not low.islands
    assert sum(row.islands for row in r.sizes) == 2
    assert any("islands" in n for n in r.notes) and any("lowest converged" in n for n in r.notes)


def test_censored_sizes_are_reported_and_left_out_of_the_fits(tmp_path):
    # LR_crit(1e3) = 3e-7 < grid min 1e-6; LR_crit(1e6) = 0.3 > grid max 0.1
    with build_study(tmp_path / "cens", law(3e-7, 2.0), opt=law(1e-6, 0.5)) as store:
        r = rules_of_thumb(StudyView.load(store))
    first, last = r.sizes[0], r.sizes[-1]
    assert first.censored == "below grid" and first.n_converged == 0
    assert first.lr_first_diverging is None and first.lr_opt is None and first.lr_safe is None
    assert last.censored == "above grid" and last.lr_first_diverging is None
    assert last.lr_last_converging == lr_grid()[-1] and last.lr_opt is not None
    assert r.censored_sizes == [first.size, last.size]
    assert r.crit_fit.n == 6 and first.size not in r.crit_fit.sizes and last.size not in r.crit_fit.sizes
    assert r.crit_last_fit.n == 6 and abs(r.crit_fit.exponent - 2.0) < 0.05
    assert r.opt_fit.n == 7 and last.size in r.opt_fit.sizes  # an all-converged size still has an optimum
    assert any("censored" in n and "excluded" in n for n in r.notes)
    header, rows = rules_rows(r)
    assert "censored (below grid)" in rows[0][-1] and "censored (above grid)" in rows[-1][-1]


def test_optimum_at_the_grid_edge_is_flagged_and_left_out_of_the_opt_fit(tmp_path):
    # LR_opt(D) = 1e-7 * D/1e3 lies at or below the grid's lowest LR (1e-6) for the three smallest sizes
    with build_study(tmp_path / "edge", law(1e-3, 0.2), opt=law(1e-7, 1.0)) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert [row.opt_at_edge for row in r.sizes] == ["lowest LR"] * 3 + [None] * 5
    assert all(row.lr_opt == lr_grid()[0] for row in r.sizes[:3])
    assert r.opt_fit.n == 5 and r.sizes[0].size not in r.opt_fit.sizes and abs(r.opt_fit.exponent - 1) < 0.05
    assert len(r.leave_out) == 5 and r.leave_out_fraction == 1.0
    assert any("edge of the LR grid" in n for n in r.notes)
    assert "optimum at lowest LR" in rules_rows(r)[1][0][-1]


def test_leave_one_size_out_fails_where_the_optimum_is_off_the_law(tmp_path):
    opt, shifted = law(1e-5, 0.5), {1: 10.0, 5: 0.1}
    idx = {float(d): k for k, d in enumerate(sizes())}
    with build_study(tmp_path / "noisy", law(3e-3, 0.2),
                     opt=lambda d: opt(d) * shifted.get(idx[d], 1.0)) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert len(r.leave_out) == 8
    within = {lo.size: lo.within for lo in r.leave_out}
    assert not within[sizes()[1]] and not within[sizes()[5]]
    assert r.leave_out_fraction == pytest.approx(sum(within.values()) / 8) and r.leave_out_fraction <= 0.75


def test_lr_on_y_and_a_group_lr_axis_give_the_same_rules(tmp_path, clean):
    ref = rules_of_thumb(StudyView.load(clean))
    with build_study(tmp_path / "t", law(3e-5, 0.5), x=SIZE_AXIS, y="matrix_lr:1e-6:1e-1:log", nx=8, ny=48) as s:
        r = rules_of_thumb(StudyView.load(s))
    assert (r.lr_axis, r.lr_on, r.resolution) == ("matrix_lr", "y", (8, 48))
    strip = ("index",)
    for a, b in zip(ref.sizes, r.sizes, strict=True):
        assert {k: v for k, v in vars(a).items() if k not in strip} == {k: v for k, v in vars(b).items()
                                                                     if k not in strip}
    assert r.crit_fit.exponent == pytest.approx(ref.crit_fit.exponent)
    assert r.opt_fit.coefficient == pytest.approx(ref.opt_fit.coefficient)


@pytest.mark.parametrize("x, y", [("weight_decay:0:0.1:lin", SIZE_AXIS), (LR_AXIS, "warmup_ratio:0:0.5:lin"),
                                  (LR_AXIS, "matrix_lr:1e-6:1e-1:log")])
def test_other_axis_pairs_are_refused_naming_the_axes(tmp_path, x, y):
    fixed = {} if "tokens" in x + y else {"tokens": 1000}
    cfg = StudyConfig.from_dict({"model": "tiny", "data": "synthetic", "x": x, "y": y, "resolution": "3",
                                 "fixed": fixed}, check=False)  # as stored: a study of no learning rate too
    grid = build_grid(cfg)
    with StudyStore.create_or_open(tmp_path / "s", cfg.to_dict(), grid.cells()) as store:
        with pytest.raises(ConfigError) as e:
            rules_of_thumb(StudyView.load(store))
    msg = str(e.value)
    assert parse_axis_spec(x).name in msg and parse_axis_spec(y).name in msg and "\n" not in msg


def test_unfinished_study_is_refused(tmp_path):
    with build_study(tmp_path / "half", law(3e-5, 0.5), nx=6, ny=4, finish=False) as store:
        with pytest.raises(ConfigError, match="pending"):
            rules_of_thumb(StudyView.load(store))


def test_to_dict_is_strict_json_and_table_prints(clean, tmp_path):
    r = rules_of_thumb(StudyView.load(clean))
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert "view" not in d and d["crit_fit"]["exponent"] == pytest.approx(r.crit_fit.exponent)
    assert d["safe_fit"]["coefficient"] == pytest.approx(0.5 * r.crit_fit.coefficient)
    assert d["ten_x"]["verdict"] == "yes" and len(d["sizes"]) == 8 and d["leave_out_fraction"] == 1.0
    console = Console(record=True, width=200)
    console.print(rules_table(r))
    text = console.export_text()
    assert f"{r.sizes[3].lr_first_diverging:.3g}" in text and f"{r.sizes[3].size:,.0f}" in text
    _, fitted = fit_rows(r)
    assert fitted[0][1] == power_law_formula(r.crit_fit) and len(fitted) == 6
    assert fitted[4][:2] == ["tokens_min(LR)", power_law_formula(r.tokens_min_fit, "D")]
    # a path opens and closes the store itself
    assert rules_of_thumb(StudyView.load(clean.directory)).crit_fit == r.crit_fit


def test_plot_writes_png_and_svg(clean, tmp_path):
    r = rules_of_thumb(StudyView.load(clean))
    png = plot_rules(r, tmp_path / "p" / "rules.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    svg = plot_rules(r, tmp_path / "rules.svg")
    text = svg.read_text()
    assert "<svg" in text
    r.view = None  # without the study's view: points and lines only
    assert plot_rules(r, tmp_path / "bare.png").stat().st_size > 5_000
    with pytest.raises(ConfigError, match="format"):
        plot_rules(r, tmp_path / "rules.gif")


def test_ten_x_answer_follows_the_exponent_interval_and_shows_it():
    """Yes or no only when the exponent's whole 95% CI lies on one side of log10 2 (10x data, 2x LR); otherwise
    "can't tell", with the interval and the fit's R² printed, however close the point estimate is to 2x."""
    import math

    from vmap_sweep.analysis.rules import PowerLaw, ten_x_verdict

    def fit(b, lo, hi, r2, n=6):
        return PowerLaw(coefficient=1e-6, exponent=b, stderr=0.1, ci_low=lo, ci_high=hi, n=n, r2=r2,
                        sizes=tuple(range(1, n + 1)))

    tested = math.log10(2)
    loose = ten_x_verdict(fit(0.5, 0.05, 0.95, 0.44))  # 3.2x by the point estimate, but R² 0.44 and wide
    assert loose.verdict == "inconclusive" and loose.answer == "can't tell"
    assert ten_x_sentence(loose) == ("10x more data allows 2x more LR: can't tell (LR_crit(10D) / LR_crit(D) = "
                                     "3.16x, 95% CI [1.12, 8.91]x contains 2x; exponent 0.500, 95% CI [0.050, 0.950] "
                                     "vs log10 2 = 0.301; R² 0.44, 6 sizes).")
    yes = ten_x_verdict(fit(0.5, tested + 1e-6, 0.7, 0.44))
    assert yes.verdict == yes.answer == "yes" and "lies entirely above 2x" in ten_x_sentence(yes)
    assert "R² 0.44, 6 sizes" in ten_x_sentence(yes)
    assert ten_x_verdict(fit(0.5, tested, 0.7, 0.9)).answer == "can't tell"  # touching 2x is not above it
    no = ten_x_verdict(fit(0.1, -0.1, tested - 1e-6, 0.8))
    assert no.verdict == no.answer == "no" and "lies entirely below 2x" in ten_x_sentence(no)
    two = ten_x_verdict(fit(0.5, math.nan, math.nan, 1.0, n=2))
    assert two.answer == "can't tell" and "no CI from 2 sizes" in ten_x_sentence(two)
    assert ten_x_sentence(ten_x_verdict(None)) == ("10x more data allows 2x more LR: can't tell "
                                                   "(fewer than 2 uncensored sizes to fit LR_crit).")


def test_summary_prints_the_ten_x_answer_with_its_interval(clean):
    r = rules_of_thumb(StudyView.load(clean))
    line = rules_sentences(r)[-1 - len(r.notes)]
    assert line == ten_x_sentence(r.ten_x)
    assert line.startswith("10x more data allows 2x more LR: yes (LR_crit(10D) / LR_crit(D) = ")
    assert f"R² {r.crit_fit.r2:.2f}, 8 sizes" in line
    d = r.to_dict()["ten_x"]
    assert d["verdict"] == "yes" and d["answer"] == "yes" and d["r2"] == pytest.approx(r.crit_fit.r2)
    assert d["exponent_ci_low"] == pytest.approx(r.crit_fit.ci_low) and d["n"] == 8


# ----------------------------------------------------------------------------- repeated experiments
def _with_sizes(store: StudyStore, supervised: Callable[[int], int]) -> list[int]:
    """Record each budget's supervised targets (conversations: one per 10 of them); returns the budgets."""
    from vmap_sweep.store import extras
    from vmap_sweep.study.sizes import DatasetSize

    budgets = sorted({int(c.hparams["tokens"]) for c in store.cells()})
    extras.put_dataset_sizes(store, {n: DatasetSize(n, supervised(n), supervised(n) // 10) for n in budgets})
    return budgets


def test_sizes_that_repeat_a_smaller_one_are_fitted_once_and_named(tmp_path):
    store = build_study(tmp_path / "rep", law(3e-5, 0.5))
    budgets = _with_sizes(store, lambda n: 1000 if n < 10_000 else n)  # the three smallest: one experiment
    r = rules_of_thumb(StudyView.load(store))
    assert [row.size for row in r.sizes] == [float(n) for n in budgets[:1] + budgets[3:]]
    assert r.crit_fit.n == len(budgets) - 2
    assert f"tokens {budgets[1]} = {budgets[0]}, {budgets[2]} = {budgets[0]}" in " ".join(r.notes)
    # the rows kept are the study's own: the same fit as a study without those two rows would give
    kept = np.array([row.size for row in r.sizes])
    edge = np.array([row.lr_first_diverging for row in r.sizes])
    assert r.crit_fit.exponent == pytest.approx(fit_power_law(kept, edge).exponent)


def test_size_unit_counts_d_in_supervised_tokens_or_conversations(tmp_path):
    store = build_study(tmp_path / "unit", law(3e-5, 0.5))
    budgets = _with_sizes(store, lambda n: n // 4 + 10)
    view = StudyView.load(store)
    by_tokens, by_supervised = rules_of_thumb(view), rules_of_thumb(view, "supervised")
    assert [row.size for row in by_supervised.sizes] == [float(n // 4 + 10) for n in budgets]
    edges = [row.lr_first_diverging for row in by_tokens.sizes]
    assert [row.lr_first_diverging for row in by_supervised.sizes] == edges
    assert rules_of_thumb(StudyView.load(store), "conversations").sizes[-1].size == float((budgets[-1] // 4 + 10) // 10)
    assert rules_rows(by_supervised)[0][0] == "D (supervised)"
    with pytest.raises(ConfigError, match="size unit 'rows': use one of tokens, supervised, conversations"):
        rules_of_thumb(StudyView.load(store), "rows")


def test_a_study_without_recorded_sizes_is_counted_in_tokens_only(clean):
    assert "repeat" not in " ".join(rules_of_thumb(StudyView.load(clean)).notes)
    with pytest.raises(ConfigError, match="recorded its dataset sizes in tokens only; use --size-unit tokens"):
        rules_of_thumb(StudyView.load(clean), "supervised")


# ----------------------------------------------------------------------------- tokens_min(LR), the converse


def expected_tokens_min(lrs: np.ndarray, ds: np.ndarray, crit) -> list[float | None]:
    """The smallest grid size with lr < crit(D), straight from the law; None where no size converges."""
    return [next((float(d) for d in ds if lr < crit(d)), None) for lr in lrs]


def test_tokens_min_per_lr_and_its_fit_invert_a_known_law(tmp_path):
    # LR_crit = 1e-5 (D/1e3)^0.5, so D_min = 1e3 (LR/1e-5)^2: exponent 2 = 1 / 0.5
    crit, x, y = law(1e-5, 0.5), "lr:1e-6:1e-3:log", "tokens:1e3:1e6:log"
    with build_study(tmp_path / "inv", crit, nx=16, ny=64, x=x, y=y) as store:
        r = rules_of_thumb(StudyView.load(store))
    lrs, ds = parse_axis_spec(x).values(16), parse_axis_spec(y).values(64)
    want = expected_tokens_min(lrs, ds, crit)
    assert [row.lr for row in r.lrs] == list(lrs)
    for row, w in zip(r.lrs, want, strict=True):
        if w is None:
            assert row.censored == "above grid" and row.tokens_min is None
        elif w == ds[0]:
            assert row.censored == "below grid" and row.tokens_min == ds[0]
        else:
            assert row.censored is None and row.tokens_min == w and row.tokens_all == w and not row.islands
    inside = [(row.lr, row.tokens_min) for row in r.lrs if row.censored is None]
    assert len(inside) == 7 and r.tokens_min_fit.n == 7
    assert r.tokens_min_fit == r.tokens_all_fit  # no islands: both answers agree
    ref = fit_power_law(np.array([a for a, _ in inside]), np.array([b for _, b in inside]))
    assert r.tokens_min_fit.exponent == pytest.approx(ref.exponent) and r.tokens_min_fit.variable == "LR"
    assert abs(r.tokens_min_fit.exponent - 2.0) < 0.1 and r.tokens_min_fit.ci_low < 2.0 < r.tokens_min_fit.ci_high
    assert r.tokens_min_fit.predict(1e-4) == pytest.approx(1e3 * (1e-4 / 1e-5) ** 2, rel=0.3)
    formula = power_law_formula(r.tokens_min_fit, "D")
    assert formula.startswith("D = ") and "* LR^" in formula
    assert any(line.startswith("Minimum viable dataset tokens_min ≈") for line in rules_sentences(r))
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["tokens_min_fit"]["exponent"] == pytest.approx(r.tokens_min_fit.exponent) and len(d["lrs"]) == 16


def test_tokens_min_with_an_island_below_the_last_failure(tmp_path):
    crit, x, y = law(1e-5, 0.5), "lr:1e-6:1e-3:log", "tokens:1e3:1e6:log"
    lrs, ds = parse_axis_spec(x).values(16), parse_axis_spec(y).values(64)
    want = expected_tokens_min(lrs, ds, crit)
    k = next(k for k, w in enumerate(want) if w is not None and w != ds[0])
    first = list(ds).index(want[k])

    def override(k_lr: int, k_size: int) -> bool | None:
        if k_lr == k and k_size == first - 3:
            return True  # converges on a smaller dataset, then fails on the next two
        if k_lr == k and k_size == first + 2:
            return False  # a hole above: all-converge starts after it
        return None

    with build_study(tmp_path / "isl", crit, nx=16, ny=64, x=x, y=y, override=override) as store:
        r = rules_of_thumb(StudyView.load(store))
    row = r.lrs[k]
    assert row.tokens_min == ds[first - 3] and row.tokens_all == ds[first + 3] and row.islands
    assert r.tokens_min_fit.exponent != r.tokens_all_fit.exponent
    header, rows = tokens_rows(r)
    assert any(cells[-1] == "islands" for cells in rows) and "censored" in rows[-1][-1]


def test_tokens_min_on_two_grid_sizes_says_the_fit_says_little(tmp_path):
    x, y = "lr:1e-6:1e-3:log", "tokens:1e3:1e6:log"
    with build_study(tmp_path / "coarse", law(1e-5, 0.5), nx=16, ny=3, x=x, y=y) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert {row.tokens_min for row in r.lrs if row.censored is None} == {parse_axis_spec(y).values(3)[1],
                                                                        parse_axis_spec(y).values(3)[2]}
    assert any("only 2 distinct grid size(s)" in line for line in rules_sentences(r))


def test_tokens_all_is_fitted_where_small_datasets_converge_at_every_lr(tmp_path):
    # the two smallest sizes converge at every LR (too few steps to fail): tokens_min is censored below the grid
    # everywhere, tokens_all still follows the law D = 1e3 (LR/1e-5)^2
    crit, x, y = law(1e-5, 0.5), "lr:1e-6:1e-3:log", "tokens:1e3:1e6:log"
    with build_study(tmp_path / "clean", crit, nx=16, ny=64, x=x, y=y) as store:
        clean = rules_of_thumb(StudyView.load(store))
    with build_study(tmp_path / "small", crit, nx=16, ny=64, x=x, y=y,
                     override=lambda k_lr, k_size: True if k_size < 2 else None) as store:
        r = rules_of_thumb(StudyView.load(store))
    assert r.tokens_min_fit is None and all(row.tokens_min == r.size_range[0] for row in r.lrs)
    assert r.tokens_all_fit.exponent == pytest.approx(clean.tokens_min_fit.exponent)
    assert any(line.startswith("Every dataset from tokens_all ≈") for line in rules_sentences(r))


def test_counts_read_in_the_right_number():
    from vmap_sweep.analysis.fmt import count_of

    assert count_of(1, "size") == "1 size" and count_of(2, "size") == "2 sizes" and count_of(0, "LR") == "0 LRs"
    assert count_of(1, "size has", "sizes have") == "1 size has"


def test_the_second_dimension_is_printed_as_a_named_cross_check():
    from vmap_sweep.present.tables import fractal_lines

    box = {"dimension": 1.3, "ci_low": 1.2, "ci_high": 1.4, "stderr": 0.05, "fit_range": [2, 8], "octaves": 2.0,
           "resolution": [32, 32], "box_sizes": [2, 4, 8], "box_counts": [40.0, 15.0, 6.0],
           "uncertainty_dimension": 1.45, "uncertainty_stderr": 0.02}
    last = str(fractal_lines(box)[-1])
    assert last == ("cross-check (not the estimate above): uncertainty exponent 2 - φ = 1.450 ± 0.020 (φ the slope of "
                    "the share of cells ε apart in different classes against ε; fit standard error, no calibrated "
                    "interval)")


def test_the_rules_picture_keeps_its_legend_off_the_map(clean, tmp_path):
    import matplotlib.pyplot as plt

    captured = {}
    real = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return real(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        plot_rules(rules_of_thumb(StudyView.load(clean)), tmp_path / "rules.png")
    fig = captured["fig"]
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0 + 1  # under the axes


def test_the_study_view_reads_a_store_once_as_the_measures_need_it(tmp_path):
    """The view holds the validated config, the parsed axes and their values, the grid's arrays and labels, the
    criterion and the rows: a measure given the view reads what it would have read from the store."""
    from vmap_sweep.analysis.classify import study_classes

    with build_study(tmp_path / "s", law(3e-5, 0.5), nx=12, ny=4, x=SIZE_AXIS, y=LR_AXIS) as store:
        view = StudyView.load(store)
        assert view.config == StudyConfig.from_dict(store.config) and view.raw_config == store.config
        assert (view.x, view.y) == (parse_axis_spec(SIZE_AXIS), parse_axis_spec(LR_AXIS))
        assert (view.nx, view.ny) == (12, 4) and view.directory == store.directory
        np.testing.assert_array_equal(view.xs, parse_axis_spec(SIZE_AXIS).values(12))
        np.testing.assert_array_equal(view.ys, parse_axis_spec(LR_AXIS).values(4))
        np.testing.assert_array_equal(view.labels, store.labels_array())
        np.testing.assert_array_equal(study_classes(view), study_classes(store))
        np.testing.assert_array_equal(view.grid.converged, study_classes(store))
        for name in ("score", "eval_loss", "final_loss"):
            np.testing.assert_array_equal(view.grid_arrays(name), store.grid_arrays(name))
        assert not view.unstable.any() and view.criterion == {"criterion": "ratio"}
        assert [(r["i"], r["j"]) for r in view.rows] == [(r["i"], r["j"]) for r in store.rows()]
        assert view.sized.sizes is None and view.sized.same_as == {} and view.refine is None and view.level == 0
    # a path reads the same study as its open store
    again = StudyView.load(tmp_path / "s")
    assert again.config == view.config and (again.labels == view.labels).all()


def test_a_store_without_axes_is_refused_rather_than_read_as_the_default_grid(tmp_path):
    from helpers import new_store

    from vmap_sweep.errors import StoreError

    with new_store(tmp_path) as store, pytest.raises(StoreError, match="no x or y axis"):
        StudyView.load(store)


def test_the_note_on_repeated_sizes_counts_them_in_words():
    from types import SimpleNamespace

    from vmap_sweep.analysis.rules import _repeat_note

    budgets = [256, 280, 306, 512]  # LR on x: a cell's size row is its j
    one = SimpleNamespace(unit="tokens", same_as={(0, 1): (0, 0)})
    assert _repeat_note(budgets, one, [0, 2, 3], "x") == [
        "1 size repeats a smaller size's experiment (the tokens between hold no supervised token) and is counted "
        "once: tokens 280 = 256."]
    two = SimpleNamespace(unit="tokens", same_as={(0, 1): (0, 0), (0, 2): (0, 0)})
    assert _repeat_note(budgets, two, [0, 3], "x")[0].startswith("2 sizes repeat a smaller size's experiment")
    assert "and are counted once: tokens 280 = 256, 306 = 256." in _repeat_note(budgets, two, [0, 3], "x")[0]
    assert _repeat_note(budgets, SimpleNamespace(unit="tokens", same_as={}), [0, 1, 2, 3], "x") == []
