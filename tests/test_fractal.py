"""Boundary rule, box counting (calibrated on shapes of known dimension), uncertainty exponent, pooling."""

import json
import math

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from shapes import (
    KOCH_D,
    disk_mask,
    disk_placed,
    inward_koch_island,
    koch_island,
    koch_mask,
    koch_snowflake,
    noise_mask,
    polygon_mask,
    sierpinski_mask,
)

from vmap_sweep.analysis import fractal
from vmap_sweep.analysis.fractal import (
    FractalResult,
    boundary_mask,
    box_counting,
    fractal_dimension,
    pooled_dimension,
    uncertainty_exponent,
)
from vmap_sweep.errors import ConfigError

TRUE = {"disk": 1.0, "koch": math.log(4) / math.log(3), "sierpinski": math.log(3) / math.log(2), "noise": 2.0}


# ----------------------------------------------------------------------------- boundary rule


def test_boundary_is_2x2_block_rule_not_xor_erosion():
    # vertical edge between columns 1 and 2 of a 4x4 grid
    grid = np.zeros((4, 4), dtype=bool)
    grid[:, 2:] = True
    b = boundary_mask(grid)
    assert b.shape == (3, 3)
    assert b.tolist() == [[False, True, False]] * 3  # only the block straddling the edge

    # dilation xor erosion (3x3 cross) marks both sides of the edge: two columns of a 4x4 array
    pad = np.pad(grid, 1, mode="edge")
    shifts = [pad[1:-1, 1:-1], pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]
    xor_erosion = np.logical_or.reduce(shifts) ^ np.logical_and.reduce(shifts)
    assert xor_erosion[:, 1:3].all() and xor_erosion.sum() == 8
    assert b.sum() == 3


def test_boundary_single_cell_checkerboard_uniform():
    one = np.zeros((3, 3), dtype=bool)
    one[1, 1] = True
    assert boundary_mask(one).all()  # every 2x2 block holds the centre
    corner = np.zeros((3, 3), dtype=bool)
    corner[0, 0] = True
    assert boundary_mask(corner).tolist() == [[True, False], [False, False]]
    checker = (np.indices((5, 6)).sum(axis=0) % 2).astype(bool)
    assert boundary_mask(checker).all()
    assert not boundary_mask(np.ones((5, 6), dtype=bool)).any()
    with pytest.raises(ConfigError):
        boundary_mask(np.zeros((3, 3)))  # not boolean


# ----------------------------------------------------------------------------- box counting mechanics


def _naive_weighted(occ: np.ndarray, size: int, oy: int, ox: int, cut: bool) -> float:
    """Boxes [k*size - oy, (k+1)*size - oy) per axis; each occupied box weighs its area inside the frame over
    size^2 when ``cut`` (a boundary that reaches every side of the frame), else 1."""
    h, w = occ.shape
    total = 0.0
    for y0 in range(-oy, h, size):
        for x0 in range(-ox, w, size):
            ya, yb, xa, xb = max(y0, 0), min(y0 + size, h), max(x0, 0), min(x0 + size, w)
            if occ[ya:yb, xa:xb].any():
                total += (yb - ya) * (xb - xa) / size**2 if cut else 1.0
    return total


def test_box_sizes_four_per_octave():
    assert fractal.box_sizes(16).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 16]
    assert fractal.box_sizes(1).tolist() == [1]


def test_counts_match_naive_loops_with_and_without_frame_cuts():
    rng = np.random.default_rng(3)
    touching = rng.random((45, 36)) < 0.05
    touching[0, 5] = touching[-1, 7] = touching[9, 0] = touching[11, -1] = True  # reaches all four sides
    island = np.zeros((45, 36), dtype=bool)
    island[5:40, 4:30] = rng.random((35, 26)) < 0.05
    for occ, cut in ((touching, True), (island, False)):
        integral = fractal._integral(occ)
        sides = (bool(occ[0].any()), bool(occ[-1].any()), bool(occ[:, 0].any()), bool(occ[:, -1].any()))
        for size, oy, ox in [(1, 0, 0), (3, 0, 0), (4, 1, 3), (7, 6, 0), (13, 5, 11), (32, 31, 2)]:
            got = fractal._lattice_count(integral, size, oy, ox, sides)
            assert got == pytest.approx(_naive_weighted(occ, size, oy, ox, cut))
        r = box_counting(occ, n_offsets=1)
        naive = [_naive_weighted(occ, int(s), 0, 0, cut) for s in r.box_sizes]
        assert r.aligned_counts.tolist() == pytest.approx(naive)


def test_a_full_plane_and_a_straight_window_read_exactly():
    # every box weighs its area share, so the full plane counts h*w/s^2 on every lattice: slope exactly 2
    full = box_counting(np.ones((99, 61), dtype=bool), n_offsets=8)
    assert full.box_counts == pytest.approx(99 * 61 / full.box_sizes.astype(float) ** 2)
    assert full.dimension == pytest.approx(2.0, abs=1e-4) and full.small_box_offset == pytest.approx(0.0, abs=1e-3)
    # a horizontal line across the frame: w/s boxes, not ceil(w/s)
    line = np.zeros((64, 200), dtype=bool)
    line[30] = True
    r = box_counting(line, n_offsets=8)
    assert r.box_counts == pytest.approx(200 / r.box_sizes.astype(float))
    assert r.dimension == pytest.approx(1.0, abs=1e-4)


def test_an_island_is_not_cut_by_the_frame():
    # a square two pixels from the frame: boxes that overhang the frame count whole
    grid = np.zeros((130, 130), dtype=bool)
    grid[3:127, 3:127] = True
    r = fractal_dimension(grid, n_offsets=4)
    assert r.extent == (125, 125) and r.dimension == pytest.approx(1.0, abs=0.02)
    assert r.ci_low <= 1.0 <= r.ci_high
    # the same boundary read as a window (cut on all sides) loses the overhanging boxes' weight
    cut = box_counting(boundary_mask(grid)[2:-2, 2:-2], n_offsets=4)
    assert cut.dimension > r.dimension + 0.05


def test_a_point_is_too_small_to_measure():
    grid = np.zeros((100, 37), dtype=bool)
    grid[99, 36] = True
    assert np.argwhere(boundary_mask(grid)).tolist() == [[98, 35]]
    with pytest.raises(ConfigError, match="too small"):
        fractal_dimension(grid)


def test_sierpinski_aligned_counts_are_powers_of_three():
    r = box_counting(sierpinski_mask(256), n_offsets=1)  # the set itself, not its boundary
    powers = r.box_sizes & (r.box_sizes - 1) == 0
    assert r.aligned_counts[powers].tolist() == [3 ** (8 - k) for k in range(9)]


def test_result_fields_windows_and_local_slopes():
    r = fractal_dimension(koch_mask(256), n_offsets=8, seed=1)
    assert isinstance(r, FractalResult)
    assert r.resolution == (256, 256) and r.extent == (229, 201)
    assert r.fit_range == (2, 38) and r.windows[:, 0].min() == 2 and r.windows[:, 1].max() == 38
    assert (r.windows[:, 1] >= 4 * r.windows[:, 0]).all()  # every window spans two octaves
    assert r.dimension == pytest.approx(float(np.median(r.window_dimensions)))
    assert r.octaves == pytest.approx(math.log2(38 / 2)) and r.warnings == ()
    assert r.stderr == pytest.approx(math.sqrt(r.window_sd**2 + r.lattice_sd**2 + r.model_sd**2 + r.curvature_sd**2
                                               + fractal.END_EFFECT_SD**2))
    assert r.curvature_sd == pytest.approx(fractal.CURVATURE_SHARE * abs(r.local_slope_drift))
    assert r.too_small is None and "256x256 over 4.2 octaves" in r.measured_on
    assert r.ci_high - r.dimension == pytest.approx(1.959963984540054 * r.stderr)
    assert r.ci_low < r.dimension < r.ci_high
    # local slope at size s: over sizes two steps (half an octave) each side
    i = int(np.flatnonzero(r.box_sizes == 8)[0])
    expected = -np.log2(r.box_counts[i + 2] / r.box_counts[i - 2]) / np.log2(r.box_sizes[i + 2] / r.box_sizes[i - 2])
    assert r.local_slopes[i] == pytest.approx(expected)
    assert np.isnan(r.local_slopes[:2]).all() and np.isnan(r.local_slopes[-2:]).all()
    assert r.local_slope_range[0] <= r.dimension + 0.1 and r.local_slope_range[1] >= r.dimension - 0.1
    assert json.loads(json.dumps(r.to_dict()))["fit_range"] == [2, 38]
    assert fractal_dimension(koch_mask(256), n_offsets=8, seed=1).dimension == r.dimension  # seeded

    custom = fractal_dimension(koch_mask(256), fit_range=(4, 32), n_offsets=1)
    assert custom.fit_range == (4, 32) and custom.windows.tolist() == [[4, 32]] and custom.window_sd == 0
    with pytest.raises(ConfigError, match="fit_range"):
        fractal_dimension(koch_mask(256), fit_range=(32, 32))
    with pytest.raises(ConfigError, match="fit_range"):
        fractal_dimension(koch_mask(256), fit_range=(17, 18))


def test_small_box_offset_corrects_a_fractal_not_a_smooth_edge():
    koch = fractal_dimension(koch_mask(512), n_offsets=4)
    assert koch.small_box_offset > 0.05 and koch.model_sd > 0
    assert koch.ci_low <= TRUE["koch"] <= koch.ci_high
    disk = fractal_dimension(disk_mask(512), n_offsets=4)
    assert disk.small_box_offset < 0.05 and abs(disk.dimension - 1.0) < 0.01
    # without the offset (forced to 0) the Koch slope over the same windows reads low
    x = np.log2(koch.box_sizes.astype(float))
    keep = (koch.box_sizes >= 2) & (koch.box_sizes <= koch.fit_range[1])
    uncorrected = -np.polyfit(x[keep], np.log2(koch.box_counts[keep]), 1)[0]
    assert uncorrected < koch.dimension - 0.01


def test_coarse_grids_warn_and_tiny_ones_refuse():
    r = fractal_dimension(disk_mask(32))
    assert r.octaves < 2 and len(r.windows) == 1
    assert any("under 2" in w for w in r.warnings)
    assert 0.8 < r.dimension < 1.2 and r.ci_low <= 1.0 <= r.ci_high
    grid = np.zeros((8, 8), dtype=bool)
    grid[:, :3] = True
    line = fractal_dimension(grid)  # a 7-pixel edge: the fallback window from size 1 up to 6
    assert line.fit_range == (1, 6) and line.dimension == pytest.approx(1.0, abs=1e-4)
    corner = np.zeros((4, 4), dtype=bool)  # a 3-pixel edge, as on a 4x4 study: sizes 1 and 2
    corner[:, :2] = True
    assert fractal_dimension(corner).fit_range == (1, 2)
    with pytest.raises(ConfigError, match="too small"):
        fractal_dimension(np.array([[True, False, False], [True, False, False], [True, True, False]]))


# ----------------------------------------------------------------------------- shape generators


def test_polygon_raster_matches_matplotlib_and_koch_area():
    rng = np.random.default_rng(0)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 17))
    poly = np.stack(
        [0.5 + 0.4 * rng.uniform(0.3, 1, 17) * np.cos(angles), 0.5 + 0.4 * rng.uniform(0.3, 1, 17) * np.sin(angles)],
        axis=1,
    )
    mine = polygon_mask(poly, (48, 64), (0.0, 1.0, 0.0, 1.0))
    yy, xx = np.mgrid[:48, :64]
    centres = np.stack([(xx.ravel() + 0.5) / 64, (yy.ravel() + 0.5) / 48], axis=1)
    ref = MplPath(poly).contains_points(centres).reshape(48, 64)
    assert (mine != ref).sum() <= 2  # points exactly on an edge may differ
    assert mine.sum() > 300

    tri = koch_snowflake(0)
    x, y = tri[:, 0], tri[:, 1]
    tri_area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    assert koch_mask(512).mean() == pytest.approx(1.6 * tri_area, rel=0.01)  # snowflake = 8/5 triangle


# ----------------------------------------------------------------------------- input errors


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros(10, dtype=bool), "not 2-D"),
        (np.zeros((0, 0), dtype=bool), "smaller than 2x2"),
        (np.zeros((1, 9)), "smaller than 2x2"),
        (np.ones((16, 16), dtype=bool), "every cell is converged"),
        (np.ones((16, 16)), "every cell is not converged"),
        (np.array([[-1.0, np.nan], [1.0, 2.0]]), "non-finite"),
        (np.array([["converged", "diverged"], ["diverged", "diverged"]]), "converged_mask"),
    ],
)
def test_bad_arrays_raise_config_error(array, match):
    with pytest.raises(ConfigError, match=match) as info:
        fractal_dimension(array)
    assert "\n" not in str(info.value)
    if match != "non-finite":
        with pytest.raises(ConfigError):
            uncertainty_exponent(array)


def test_signed_score_equals_its_mask():
    score = np.random.default_rng(5).normal(size=(64, 64)).cumsum(axis=1)
    a = fractal_dimension(score, n_offsets=4)
    b = fractal_dimension(score < 0, n_offsets=4)
    assert a.dimension == b.dimension and a.box_counts.tolist() == b.box_counts.tolist()


# ----------------------------------------------------------------------------- uncertainty exponent


def test_uncertainty_exponent_disk_and_noise_within_015():
    # tolerance +-0.15: f(eps) is measured on few pairs near the edge and the pair count shrinks with eps
    disk = uncertainty_exponent(disk_mask(512))
    assert disk.phi == pytest.approx(1.0, abs=0.15) and disk.dimension == pytest.approx(1.0, abs=0.15)
    noise = uncertainty_exponent(noise_mask(512))
    assert noise.dimension == pytest.approx(2.0, abs=0.15)
    assert disk.eps.tolist() == [1, 2, 4, 8, 16, 32] and disk.stderr < 0.05
    assert disk.resolution == (512, 512)


def test_uncertainty_exponent_fractions_and_eps_list():
    grid = np.zeros((8, 8), dtype=bool)
    grid[:, 4:] = True  # vertical edge: only horizontal pairs across it differ
    r = uncertainty_exponent(grid, eps_list=[1, 2])
    assert r.fractions.tolist() == pytest.approx([8 / (8 * 7 + 7 * 8), 16 / (8 * 6 + 6 * 8)])
    with pytest.raises(ConfigError, match="eps_list"):
        uncertainty_exponent(grid, eps_list=[1])
    with pytest.raises(ConfigError, match="eps_list"):
        uncertainty_exponent(grid, eps_list=[1, 8])


# ----------------------------------------------------------------------------- pooling zoom levels


def test_pooled_levels_are_weighted_by_their_uncertainty():
    sizes = np.array([2, 4, 8, 16, 32])
    exact = [((sizes, 2.0 ** (a - 1.3 * np.log2(sizes))), 4.0**-k) for k, a in enumerate([10, 3, 7])]
    with pytest.raises(ConfigError, match="stderr"):  # exact power laws: no uncertainty to weight by
        pooled_dimension(exact)
    wobble = np.array([0.01, -0.01, 0.0, 0.01, -0.01])
    levels = [((sizes, 2.0 ** (a - d * np.log2(sizes) + wobble)), 4.0**-k)
              for k, (a, d) in enumerate([(10, 1.2), (3, 1.3), (7, 1.25)])]
    p = pooled_dimension(levels)
    d, se = p.level_slopes, p.level_stderrs
    w = 1 / se**2
    assert p.dimension == pytest.approx(float((w * d).sum() / w.sum()))
    assert p.birge_ratio > 1  # 1.2 vs 1.3 lies far outside slopes this clean
    assert p.stderr == pytest.approx(max(math.sqrt(1 / w.sum()) * p.birge_ratio, se.min()))
    assert p.ci_low == pytest.approx(p.dimension - 1.959963984540054 * p.stderr)
    assert p.n_points == 15 and p.size_range == pytest.approx((2 / 16, 32))
    with pytest.raises(ConfigError, match="levels"):
        pooled_dimension([])
    with pytest.raises(ConfigError, match="levels\\[0\\]"):
        pooled_dimension([((sizes, -sizes), 1.0)])


def test_pooled_never_narrower_than_the_best_level():
    a = fractal_dimension(koch_mask(256), n_offsets=4)
    b = fractal_dimension(koch_mask(256, window=(0.1, 0.9, 0.1, 0.9)), n_offsets=4)
    p = pooled_dimension([(a, 1.0), (b, 0.8)])
    assert p.stderr >= min(a.stderr, b.stderr) - 1e-12
    assert min(a.dimension, b.dimension) <= p.dimension <= max(a.dimension, b.dimension)


def test_pooled_koch_zoom_levels():
    # three levels at 512^2, each a window 1/4 per axis of its parent, centred on the snowflake's tip
    tip = koch_snowflake(0)[0]
    levels = []
    for level in range(3):
        half = 0.5 / 4**level
        window = (tip[0] - half, tip[0] + half, tip[1] - half, tip[1] + half)
        levels.append((fractal_dimension(koch_mask(512, window=window), n_offsets=8), 4.0**-level))
    p = pooled_dimension(levels)
    assert p.ci_low <= TRUE["koch"] <= p.ci_high
    assert abs(p.dimension - TRUE["koch"]) < 0.02
    assert p.size_range[0] == pytest.approx(2 / 16)


# ----------------------------------------------------------------------------- curvature, octaves, resolution


def test_the_interval_carries_the_bend_of_touching_arcs():
    # the Koch curve with its bumps turned inward: its arcs touch, the local slopes climb through the fit range
    # and every window reads high together; the curvature term and the full correction widen the interval
    r = fractal_dimension(inward_koch_island(512, 0.8, angle=0.3))
    assert r.dimension - KOCH_D > 0.05 and r.local_slope_drift > 0.05
    assert r.curvature_sd == pytest.approx(fractal.CURVATURE_SHARE * r.local_slope_drift)
    assert r.ci_low <= KOCH_D <= r.ci_high
    without = math.sqrt(r.stderr**2 - r.curvature_sd**2)
    assert r.dimension - 1.959963984540054 * without > KOCH_D  # the curvature term is what covers it
    # a smooth edge does not bend: no curvature to carry
    disk = fractal_dimension(disk_placed(512, 0.7))
    assert abs(disk.local_slope_drift) < 0.02 and disk.curvature_sd < 0.01


def test_the_small_box_correction_counts_in_full_and_applies_only_with_three_octaves():
    fine = fractal_dimension(koch_island(512, 0.8, angle=0.3))
    assert fine.octaves >= fractal.CORRECTION_OCTAVES and fine.small_box_offset > 0.05
    x = np.log2(fine.box_sizes.astype(float))
    keep = (fine.box_sizes >= fine.fit_range[0]) & (fine.box_sizes <= fine.fit_range[1])
    plain = -np.polyfit(x[keep], np.log2(fine.box_counts[keep]), 1)[0]
    assert fine.model_sd == pytest.approx(abs(fine.dimension - plain), abs=0.01)  # in full, not half
    coarse = fractal_dimension(koch_island(64, 0.8, angle=0.3))
    assert coarse.octaves < fractal.CORRECTION_OCTAVES
    assert coarse.small_box_offset == 0.0 and "not applied" in coarse.method
    assert coarse.model_sd > 0  # fitted to size the uncertainty all the same
    assert coarse.ci_low <= KOCH_D <= coarse.ci_high


@pytest.mark.parametrize("n, small", [(32, True), (64, True), (256, False)])
def test_maps_too_small_to_measure_say_so(n, small):
    r = fractal_dimension(disk_placed(n, 0.8))
    assert (r.too_small is not None) == small
    if small:
        assert f"at {n}x{n}" in r.too_small and "too small a map" in r.too_small and "128x128" in r.too_small


def test_pooling_tests_whether_the_levels_share_one_dimension():
    disk = fractal_dimension(disk_placed(256, 0.8))
    agree = pooled_dimension([(disk, 1.0), (fractal_dimension(disk_placed(256, 0.5)), 0.125)])
    assert agree.agreement_p > fractal.AGREE_P
    apart = pooled_dimension([(disk, 1.0), (fractal_dimension(noise_mask(256, seed=3)), 0.125)])
    assert apart.agreement_p < 1e-6
