"""The pictures say what they show: axis labels with units, the score's definition per criterion, three
classes under the threshold criterion, the boundary's legend entry, the final loss relative to the base
model's, trajectories against the classifier's reference, and the box counts left out of the fit."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from vmap_sweep.analysis.fractal import FractalResult  # noqa: E402
from vmap_sweep.analysis.view import GridView  # noqa: E402
from vmap_sweep.present import plots  # noqa: E402

NX, NY = 4, 3


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def make_view(criterion: dict | None = None) -> GridView:
    """Columns 0-1 converged, 2 marginal (threshold) or diverged, 3 diverged; every cell 3 steps."""
    xs, ys = np.geomspace(1e-4, 1e-1, NX), np.geomspace(256, 2048, NY)
    ratio = criterion is None or criterion["criterion"] == "ratio"
    labels = np.array([["converged", "converged", "not_converged" if ratio else "marginal", "not_converged"]] * NY)
    scores = np.array([[-3.0, -2.5, 2.0, 5.0]] * NY) if ratio else np.array([[-0.4, -0.1, 0.5, 1.3]] * NY)
    final = np.array([[2.0, 2.5, 4.0, 20.0]] * NY) + np.arange(NY)[:, None]
    base_traj, traj = {}, {}
    for j in range(NY):
        for i in range(NX):
            base_traj[(i, j)] = np.array([3.0, 3.5, 4.0 + j])
            traj[(i, j)] = np.array([3.0, 3.0 + i, final[j, i]])
    base_last = np.array([[base_traj[(i, j)][-1] for i in range(NX)] for j in range(NY)])
    view = GridView(xs=xs, ys=ys, x_name="lr", y_name="tokens", x_log=True, y_log=True, scores=scores,
                    converged=labels == "converged", final_loss=final, eval_loss=final / 2, title="tiny on synthetic",
                    labels=labels, criterion=criterion or {"criterion": "ratio"}, base_loss=base_last,
                    initial_loss=np.full((NY, NX), 3.0), base_trajectories=base_traj, optimizer="adamw")
    view.test_trajectories = traj  # the training losses, for the trajectory plots
    return view


THRESHOLD = {"criterion": "threshold", "converged_below": 3.0, "not_converged_above": 10.0}


def test_axes_name_their_quantity_and_unit_on_log_scales():
    ax = plots.score_figure(make_view()).axes[0]
    assert ax.get_xlabel() == "learning rate (AdamW lr)"
    assert ax.get_ylabel() == "dataset size (tokens)"
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert plots.axis_label("lr", "nanochat").startswith("learning rate")
    assert plots.axis_label("embedding_lr") == "learning rate of the token embedding (embedding_lr)"
    assert plots.value_text("tokens", 2048.0) == "dataset size = 2048 tokens"


def test_ratio_score_map_defines_the_score_and_has_a_boundary_entry():
    fig = plots.score_figure(make_view())
    ax, bar = fig.axes[0], fig.axes[-1]
    title = ax.get_title()
    assert "−Σ loss ratio" in title and "Σ 1/ratio" in title and "base model's loss on the same batch" in title
    assert "sign(s)·log(1+|s|)" in bar.get_ylabel()
    assert plots.BOUNDARY_LABEL in _legend_texts(ax)
    drawn = np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(NY, NX)
    np.testing.assert_allclose(drawn, plots.signed_log(make_view().scores))


def test_threshold_map_tells_marginal_from_diverged():
    view = make_view(THRESHOLD)
    fig = plots.score_figure(view)
    ax, bar = fig.axes[0], fig.axes[-1]
    mesh = ax.collections[0]
    drawn = np.ma.filled(mesh.get_array(), np.nan).reshape(NY, NX)
    colours = [tuple(mesh.cmap(mesh.norm(v))) for v in drawn[0]]
    # each class in its own band: converged < 0 <= marginal < 1 <= diverged
    assert drawn[0, 0] < 0 and drawn[0, 1] < 0 and 0 <= drawn[0, 2] < 1 and drawn[0, 3] >= 1
    red = [c[0] - c[2] for c in colours]  # red minus blue
    assert red[0] < 0 and red[1] < 0 and red[2] > 0 and red[3] > 0
    assert colours[2][1] > colours[3][1] + 0.2  # marginal yellow, diverged red: the green channel tells them
    ticks = [t.get_text() for t in bar.get_yticklabels()]
    assert {"converged", "marginal", "not converged", "3", "10"} <= set(ticks)
    assert "converged < 3 ≤ marginal ≤ 10 < not converged" in ax.get_title()
    assert plots.BOUNDARY_LABEL in _legend_texts(ax)


def test_a_label_decides_the_band_even_at_a_band_edge():
    view = make_view(THRESHOLD)
    view.scores[0, 2] = 1.0  # final == not_converged_above: marginal, not diverged
    view.scores[0, 3] = 2.0
    values = plots.threshold_values(view)
    assert 0 <= values[0, 2] < 1 and values[0, 3] == 2.0


def test_final_loss_map_is_relative_to_the_base_model_on_the_same_batch():
    view = make_view()
    ax = plots.final_loss_figure(view).axes[0]
    assert "final loss ÷ base model's loss on the same batch" in ax.get_title()
    drawn = np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(NY, NX)
    np.testing.assert_allclose(drawn, view.final_loss / view.base_loss)
    # a cell: final 4.0 + 1 on row 1, base loss on its last batch 4.0 + 1
    assert drawn[1, 2] == pytest.approx(5.0 / 5.0)
    assert plots.BOUNDARY_LABEL in _legend_texts(ax)
    norm = ax.collections[0].norm
    assert float(norm(1.0)) == pytest.approx(0.5)  # 1 (as good as the base model) sits in the middle


def test_final_loss_map_without_base_losses_says_so():
    view = make_view()
    view.base_loss = np.full((NY, NX), np.nan)
    ax = plots.final_loss_figure(view).axes[0]
    assert "no base-model loss" in ax.get_title()
    np.testing.assert_allclose(np.ma.filled(ax.collections[0].get_array(), np.nan).reshape(NY, NX), view.final_loss)


def test_eval_loss_map_is_kept():
    ax = plots.eval_loss_figure(make_view()).axes[0]
    assert "eval loss" in ax.get_title()


def test_ratio_trajectories_divide_by_the_base_loss_and_colour_by_class():
    view = make_view()
    fig = plots.plot_trajectories(view, view.test_trajectories, rows=[1])
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    ref = lines["base model's loss (ratio 1)"]
    assert set(ref.get_ydata()) == {1.0}
    conv = lines[f"{plots.value_text('lr', view.xs[0])}: converged"]
    div = lines[f"{plots.value_text('lr', view.xs[3])}: not converged"]
    np.testing.assert_allclose(conv.get_ydata(), view.test_trajectories[(0, 1)] / view.base_trajectories[(0, 1)])
    np.testing.assert_allclose(div.get_ydata(), view.test_trajectories[(3, 1)] / view.base_trajectories[(3, 1)])
    c, d = to_rgba(conv.get_color()), to_rgba(div.get_color())
    assert c[2] > c[0] and d[0] > d[2]  # converged blue, diverged red
    texts = _legend_texts(ax)
    assert "base model's loss (ratio 1)" in texts and any(t.endswith(": not converged") for t in texts)
    assert "loss ÷ base model's" in ax.get_ylabel()
    assert ax.get_title() == "dataset size = 724 tokens"


def test_threshold_trajectories_show_both_thresholds_and_the_base_losses():
    view = make_view(THRESHOLD)
    ax = plots.plot_trajectories(view, view.test_trajectories, rows=[0]).axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    assert set(lines["converged below 3"].get_ydata()) == {3.0}
    assert set(lines["not converged above 10"].get_ydata()) == {10.0}
    np.testing.assert_allclose(lines["base model's loss on the same batch"].get_ydata(), view.base_trajectories[(0, 0)])
    marginal = lines[f"{plots.value_text('lr', view.xs[2])}: marginal"]
    diverged = lines[f"{plots.value_text('lr', view.xs[3])}: not converged"]
    assert marginal.get_linestyle() != diverged.get_linestyle()
    np.testing.assert_allclose(marginal.get_ydata(), view.test_trajectories[(2, 0)])  # raw loss, as classified


def test_box_counts_mark_the_points_left_out_of_the_fit():
    sizes = np.array([1, 2, 4, 8, 16])
    counts = np.array([100.0, 50.0, 25.0, 12.0, 4.0])
    box = FractalResult(dimension=1.0, stderr=0.01, ci_low=0.98, ci_high=1.02, box_sizes=sizes, box_counts=counts,
                        fit_range=(2, 8), local_slopes=np.ones(5), resolution=(32, 32), method="test",
                        aligned_counts=counts.astype(int), intercept=np.log2(100.0))
    ax = plots.box_counts_figure(box).axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    fitted = lines["box counts (fitted: s = 2…8)"]
    left = lines["box counts left out of the fit"]
    np.testing.assert_array_equal(fitted.get_xdata(), [2, 4, 8])
    np.testing.assert_array_equal(left.get_xdata(), [1, 16])
    np.testing.assert_array_equal(left.get_ydata(), [100.0, 4.0])
    assert left.get_markerfacecolor() == "none"
    assert "box counts left out of the fit" in _legend_texts(ax)


def test_box_count_figure_shows_the_local_slopes_beside_the_fit():
    sizes = np.array([1, 2, 4, 8, 16, 32])
    slopes = np.array([np.nan, 1.1, 1.2, 1.3, 1.25, np.nan])
    box = FractalResult(dimension=1.25, stderr=0.02, ci_low=1.21, ci_high=1.29, box_sizes=sizes,
                        box_counts=2.0 ** (10 - 1.25 * np.log2(sizes)), fit_range=(2, 16), local_slopes=slopes,
                        resolution=(64, 64), method="test", aligned_counts=sizes * 0.0, intercept=10.0)
    fig = plots.box_counts_figure(box)
    assert len(fig.axes) == 2
    panel = fig.axes[1]
    curve = {ln.get_label(): ln for ln in panel.lines}["local slope (one octave)"]
    np.testing.assert_array_equal(curve.get_xdata(), [2, 4, 8, 16])  # sizes without a local slope are left out
    np.testing.assert_allclose(curve.get_ydata(), [1.1, 1.2, 1.3, 1.25])
    assert {"95% CI", "D = 1.250", "fit range 2…16"} <= set(_legend_texts(panel))
    fitted = {ln.get_label(): ln for ln in fig.axes[0].lines}["fit: D = 1.250 [1.210, 1.290]"]
    np.testing.assert_allclose(fitted.get_ydata(), 2.0 ** (10 - 1.25 * np.log2([2, 4, 8, 16])))


def test_a_map_too_small_for_a_dimension_shows_its_slopes_and_claims_no_dimension():
    from dataclasses import replace

    sizes = np.array([1, 2, 4, 8])
    box = FractalResult(dimension=1.289, stderr=0.29, ci_low=0.722, ci_high=1.856, box_sizes=sizes,
                        box_counts=2.0 ** (6 - 1.289 * np.log2(sizes)), fit_range=(1, 8), local_slopes=sizes * 1.0,
                        resolution=(9, 9), method="test", aligned_counts=sizes * 0.0, intercept=6.0,
                        too_small="the boundary spans box sizes 1-8 at 9x9: too small a map to measure a dimension")
    fig = plots.box_counts_figure(box)
    texts = [*_legend_texts(fig.axes[0]), *_legend_texts(fig.axes[1]), fig.axes[0].get_title()]
    assert not any("D =" in t for t in texts), texts
    assert "fit: slope (too small a map for a dimension) = 1.289 [0.722, 1.856]" in texts
    assert "too small a map to measure a dimension" in fig.axes[0].get_title()
    measured = plots.box_counts_figure(replace(box, too_small=None))
    assert "fit: D = 1.289 [0.722, 1.856]" in _legend_texts(measured.axes[0])


def test_transposed_view_keeps_the_reference_per_cell():
    view = make_view(THRESHOLD)
    t = view.transposed()
    assert t.criterion == THRESHOLD and t.labels.shape == (NX, NY) and t.x_name == "tokens"
    np.testing.assert_array_equal(t.base_trajectories[(1, 3)], view.base_trajectories[(3, 1)])
    np.testing.assert_allclose(t.relative_final_loss(), view.relative_final_loss().T)


def test_save_plots_writes_every_picture(tmp_path):
    view = make_view()
    written = plots.save_plots(view, tmp_path, ("png",), view.test_trajectories, [0, 2])
    assert sorted(p.name for p in written) == ["eval_loss.png", "final_loss.png", "score.png", "stability.png",
                                               "trajectories.png"]
    assert all(p.stat().st_size > 0 for p in written)


# ------------------------------------------------------------------ legends beside the data, ticks that read
def _legend_clear_of_cells(fig, ax) -> bool:
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    cells = ax.get_window_extent()
    return legend.y1 <= cells.y0 + 1  # wholly under the axes: no cell under the legend


@pytest.mark.parametrize("criterion", [None, THRESHOLD])
def test_a_map_legend_sits_under_the_axes_not_over_a_row_of_cells(criterion):
    view = make_view(criterion)
    fig = plots.score_figure(view)
    ax = fig.axes[0]
    assert plots.BOUNDARY_LABEL in _legend_texts(ax)
    assert _legend_clear_of_cells(fig, ax)


def test_a_one_step_trajectory_panel_has_whole_steps():
    view = make_view()
    one = {k: v[:1] for k, v in view.test_trajectories.items()}
    view.base_trajectories = {k: v[:1] for k, v in view.base_trajectories.items()}
    fig = plots.plot_trajectories(view, one, rows=[1])
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if fig.axes[0].get_xlim()[0] <= t <= fig.axes[0].get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_deep_zoom_window_gets_plain_ticks_inside_it():
    """A window of 7,341 ... 7,834 tokens holds no 1, 2 or 5 x 10^k: its ticks are plain values inside it."""
    view = make_view()
    view.ys = np.geomspace(7341, 7834, NY)
    fig = plots.score_figure(view)
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi and t.get_text()]
    assert len(labels) >= 2 and all("10^" not in s and "times" not in s for s in labels), labels
