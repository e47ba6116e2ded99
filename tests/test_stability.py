"""Stability apart from trainability: at a low LR an untrained cell is stable, not unstable."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_helpers import cli, ok
from helpers import Rec

from vmap_sweep.analysis.classify import map_mask, stability_mask, study_classes
from vmap_sweep.analysis.fractal import fractal_dimension
from vmap_sweep.analysis.study import reclassify
from vmap_sweep.analysis.view import grid_view
from vmap_sweep.errors import ConfigError
from vmap_sweep.present import plots
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.plan import build_grid

NX, NY = 12, 12


def kind_of(i: int, j: int) -> str:
    """Low LRs too small a step to learn, a converged band, and beyond a diagonal edge runs stopped as unstable."""
    if i < 3:
        return "untrained"
    return "unstable" if i + j // 2 >= 9 else "converged"


def record(kind: str) -> Rec:
    if kind == "converged":
        return Rec(losses=[3.0, 2.0, 1.5], base_losses=[3.0, 3.0, 3.0], unstable=False)
    if kind == "untrained":  # stable, a little above the base model's loss throughout
        return Rec(losses=[3.1, 3.1, 3.1], base_losses=[3.0, 3.0, 3.0], unstable=False)
    return Rec(losses=[3.0, 40.0], base_losses=[3.0, 3.0], steps_done=2, unstable=True, unstable_step=1)


@pytest.fixture
def study(tmp_path):
    cfg = StudyConfig(model="tiny", data="synthetic", x="lr:1e-4:1:log", y="tokens:256:4096:log",
                      resolution=f"{NX}x{NY}")
    cells = build_grid(cfg).cells()
    with StudyStore.create_or_open(tmp_path / "s", cfg.to_dict(), cells) as store:
        store.record_batch([(c, record(kind_of(c.i, c.j))) for c in cells], batch_index=0)
        reclassify(store)
    return tmp_path / "s"


def test_the_two_maps_tell_an_untrained_cell_from_an_unstable_one(study):
    kinds = np.array([[kind_of(i, j) for i in range(NX)] for j in range(NY)])
    with StudyStore.open(study) as store:
        assert np.array_equal(study_classes(store), kinds == "converged")
        assert np.array_equal(stability_mask(store), kinds != "unstable")  # untrained cells are stable
        assert np.array_equal(map_mask(store, "stability"), stability_mask(store))
        with pytest.raises(ConfigError, match="--map 'both': choose trainability or stability"):
            map_mask(store, "both")


def test_fractal_measures_the_boundary_of_the_map_asked_for(study):
    with StudyStore.open(study) as store:
        stable, trained = stability_mask(store), study_classes(store)
    got = json.loads(ok("fractal", study, "--map", "stability", "--json").stdout)
    assert got["map"] == "stability" and got["dimension"] == pytest.approx(fractal_dimension(stable).dimension)
    default = json.loads(ok("fractal", study, "--json").stdout)
    assert default["dimension"] == pytest.approx(fractal_dimension(trained).dimension)
    assert got["dimension"] != default["dimension"]  # two boundaries, two measurements
    assert "of the stability boundary" in ok("fractal", study, "--map", "stability").stdout
    bad = cli("fractal", study, "--map", "both")
    assert bad.exit_code == 2 and "choose trainability or stability" in bad.stderr


def test_the_stability_map_draws_three_kinds_and_both_boundaries(study):
    with StudyStore.open(study) as store:
        view = grid_view(store)
    ax = plots.stability_figure(view).axes[0]
    drawn = np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(NY, NX)
    kinds = np.array([[kind_of(i, j) for i in range(NX)] for j in range(NY)])
    assert np.array_equal(drawn, np.select([kinds == "converged", kinds == "untrained"], [0.0, 1.0], 2.0))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert plots.STABILITY_LABEL in labels and plots.TRAINABILITY_LABEL in labels
    assert "stability" in plots.plot_figures(view)
