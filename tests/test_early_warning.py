"""early-warning: on a synthetic finished study whose early signs are built in, so every AUC is known exactly."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from cli_helpers import cli, ok

from vmap_sweep.analysis.early_warning import (
    CAP,
    Trajectory,
    bootstrap_auc,
    early_warning,
    features_at,
    roc_auc,
    signed_distance,
)
from vmap_sweep.analysis.study import reclassify
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.present.plots import plot_early_warning
from vmap_sweep.present.prose import early_warning_sentences
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.grid import Grid

STEPS, LATE = 32, 16
X, Y = "lr:1e-4:1e-1:log", "tokens:1e3:1e5:log"


@dataclass
class Rec:
    losses: list[float]
    base_losses: list[float]
    grad_norms: list[float]
    lrs: list[float]
    initial_loss: float = 3.0
    steps: int = STEPS
    steps_done: int = STEPS
    unstable: bool = False
    unstable_step: int | None = None
    eval_loss: float | None = 2.0
    wall_time: float = 0.0
    extra: dict = field(default_factory=dict)


def record(lr: float, fails: bool, early: bool) -> Rec:
    """Loss ratio 0.9 for the first 16 steps in every cell. A failing cell's ratio jumps to 10 at step 17 (the
    ratio criterion calls it diverged); an early one's gradient norm doubles at step 2 and stays there, a late
    one's only at step 17. Otherwise the gradient norm is 1e-3 / lr, so that LR x gradient norm tells nothing
    until the gradient grows."""
    base = np.full(STEPS, 3.0)
    ratio = np.full(STEPS, 0.9)
    g = np.full(STEPS, 1e-3 / lr)
    if fails:
        ratio[LATE:] = 10.0
        g[1 if early else LATE:] *= 2.0
    return Rec(losses=list(base * ratio), base_losses=list(base), grad_norms=list(g), lrs=[lr] * STEPS)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """8x8: the 4 highest LRs fail; of those, the cells at even dataset-size rows warn early."""
    cfg = StudyConfig(model="tiny", data="synthetic", x=X, y=Y, resolution="8x8")
    grid = Grid(parse_axis_spec(X), parse_axis_spec(Y), 8, 8)
    out = tmp_path_factory.mktemp("ew") / "study"
    with StudyStore.create_or_open(out, cfg.to_dict(), grid.cells()) as store:
        store.record_batch([(c, record(c.x, c.i >= 4, c.j % 2 == 0)) for c in grid.cells()], batch_index=0)
        reclassify(store)
        assert store.label_counts() == {"converged": 32, "not_converged": 32}
    return out


def auc_of(r, feature, k):
    return next(a for a in r.aucs if a.feature == feature and a.k == k)


def test_aucs_by_k_are_the_ones_built_in(study):
    r = early_warning(StudyView.load(study), n_boot=200)
    assert r.ks == [1, 2, 4, 8, 16] and r.n_cells == 64 and r.n_failed == 32
    for k in r.ks:
        assert auc_of(r, "loss_ratio", k).auc == 0.5  # the loss says nothing before step 17
        assert auc_of(r, "loss_ratio", k).n == 64 and auc_of(r, "loss_ratio", k).n_failed == 32
    assert auc_of(r, "grad_growth", 1).auc == 0.5 and auc_of(r, "lr_grad", 1).auc == 0.5  # nothing has grown yet
    for k in (2, 4, 8, 16):  # half the failing cells doubled their gradient norm: 0.5 * 1 + 0.5 * 0.5
        a = auc_of(r, "grad_growth", k)
        assert a.auc == 0.75 and a.ci_low < 0.75 < a.ci_high
        assert auc_of(r, "grad_spike", k).auc == 0.75 and auc_of(r, "lr_grad", k).auc == pytest.approx(0.75)
    assert auc_of(r, "grad_spike", 1).auc is None  # undefined with one step
    # the earliest rule: gradient growth >= 2 at k = 2 flags the 16 early cells, all failing
    e = r.earliest
    assert (e.k, e.feature, e.threshold, e.flagged, e.precision, e.recall) == (2, "grad_growth", 2.0, 16, 1.0, 0.5)
    assert "Earliest warning: k = 2 steps" in early_warning_sentences(r)[1]


def test_no_rule_catches_more_than_the_early_half(study):
    r = early_warning(StudyView.load(study), ks=[1, 2, 4, 8, 16], min_recall=0.6, n_boot=50)
    assert r.earliest is None and "No threshold rule" in early_warning_sentences(r)[1]
    assert r.rules and max(rule.recall for rule in r.rules) == 0.5


def test_features_of_a_stopped_run_and_of_a_run_too_short():
    t = Trajectory(0, 0, np.array([3.0, 9.0]), np.array([3.0, 3.0]), np.array([1.0, 50.0]), np.array([0.1, 0.1]),
                   steps=32, failed=True)
    assert features_at(t, 4) == dict.fromkeys(features_at(t, 4), CAP)  # stopped before step 4: seen diverging
    f = features_at(t, 2)
    assert f["loss_ratio"] == 3.0 and f["grad_growth"] == 50.0 and f["lr_grad"] == pytest.approx(5.0)
    assert f["ratio_slope"] == pytest.approx(math.log(3.0)) and f["grad_spike"] == 50.0
    assert features_at(t, 32) is None  # nothing left to predict


def test_auc_is_mann_whitney_and_the_bootstrap_is_seeded():
    rng = np.random.default_rng(1)
    s, y = rng.normal(size=200), rng.random(200) < 0.3
    s[y] += 1.0
    from scipy.stats import mannwhitneyu

    u = mannwhitneyu(s[y], s[~y]).statistic
    assert roc_auc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()))
    assert bootstrap_auc(s, y, 300, seed=3) == bootstrap_auc(s, y, 300, seed=3)
    lo, hi = bootstrap_auc(s, y, 300)
    assert lo < roc_auc(s, y) < hi and math.isnan(roc_auc(s, np.zeros(200, bool)))


def test_signed_distance_is_negative_on_the_converged_side():
    conv = np.zeros((3, 6), dtype=bool)
    conv[:, :2] = True
    d = signed_distance(conv)
    assert list(d[1]) == [-2.0, -1.0, 1.0, 2.0, 3.0, 4.0]
    assert np.isnan(signed_distance(np.ones((3, 3), bool))).all()


def test_cli_table_json_and_figure(study, tmp_path):
    out = ok("early-warning", study, "--k", "1,2,8", "--plot", tmp_path / "ew.png").stdout
    assert "grad_growth" in out and "Earliest warning: k = 2 steps" in out and "0.75 [" in out
    assert (tmp_path / "ew.png").read_bytes()[:4] == b"\x89PNG"
    d = json.loads(ok("early-warning", study, "--json").stdout)
    assert d["earliest"]["k"] == 2 and "curves" not in d and len(d["aucs"]) == 5 * 5
    bad = cli("early-warning", study, "--k", "two")
    assert bad.exit_code == 2 and "--k" in bad.stderr


def test_figure_in_svg(study, tmp_path):
    r = early_warning(StudyView.load(study), n_boot=20)
    assert "<svg" in plot_early_warning(r, tmp_path / "ew.svg").read_text()


def test_marginal_cells_are_counted_as_not_converged_and_said_to_be(study, tmp_path):
    import shutil

    copy = shutil.copytree(study, tmp_path / "threshold")
    with StudyStore.open(copy) as store:  # final loss 2.7 (converging cells) falls between the two bounds
        reclassify(store, "threshold", converged_below=2.0, not_converged_above=5.0)
        assert store.label_counts() == {"marginal": 32, "not_converged": 32}
    r = early_warning(StudyView.load(copy), n_boot=20)
    assert (r.n_failed, r.n_marginal) == (64, 32)
    assert early_warning_sentences(r)[0].startswith("64 cells, 64 not converged, 32 of them marginal (threshold "
                                                    "criterion); ")
    plain = early_warning(StudyView.load(study), n_boot=20)
    assert plain.n_marginal == 0 and early_warning_sentences(plain)[0].startswith("64 cells, 32 not converged (")
