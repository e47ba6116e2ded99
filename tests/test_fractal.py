"""Boundary rule, box counting (calibrated on shapes of known dimension), uncertainty exponent, pooling."""

import math
import re

import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from shapes import calibrate, disk_mask, koch_mask, koch_snowflake, noise_mask, polygon_mask, sierpinski_mask

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


@pytest.fixture(scope="module")
def calibration() -> dict:
    return calibrate((128, 1024))


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


def _naive_counts(occ: np.ndarray, size: int) -> int:
    h, w = occ.shape
    pad = np.zeros((-(-h // size) * size, -(-w // size) * size), dtype=bool)
    pad[:h, :w] = occ
    return int(pad.reshape(pad.shape[0] // size, size, pad.shape[1] // size, size).any(axis=(1, 3)).sum())


def _naive_periodic(occ: np.ndarray, size: int, oy: int, ox: int) -> int:
    h, w = occ.shape
    pad = np.zeros((-(-h // size) * size, -(-w // size) * size), dtype=bool)
    pad[:h, :w] = occ
    pad = np.roll(pad, (-oy, -ox), axis=(0, 1))
    return int(pad.reshape(pad.shape[0] // size, size, pad.shape[1] // size, size).any(axis=(1, 3)).sum())


def test_counts_match_naive_pad_and_reshape_on_odd_grid():
    occ = np.random.default_rng(3).random((99, 36)) < 0.02
    r = box_counting(occ, n_offsets=1)
    assert r.box_sizes.tolist() == [1, 2, 4, 8, 16, 32, 64, 128]
    assert r.aligned_counts.tolist() == [_naive_counts(occ, int(s)) for s in r.box_sizes]
    integral = fractal._integral(occ)
    for size, oy, ox in [(4, 1, 3), (8, 7, 0), (16, 5, 11), (32, 31, 2)]:
        assert fractal._count(integral, size, oy, ox) == _naive_periodic(occ, size, oy, ox)


def test_last_row_and_column_are_counted():
    # 100 x 37 class grid whose only boundary pixel is the bottom-right one of the (99, 36) boundary
    grid = np.zeros((100, 37), dtype=bool)
    grid[99, 36] = True
    assert np.argwhere(boundary_mask(grid)).tolist() == [[98, 35]]
    r = fractal_dimension(grid)
    assert r.resolution == (100, 37)
    assert np.all(r.aligned_counts == 1) and np.allclose(r.box_counts, 1.0)
    assert r.dimension == pytest.approx(0.0, abs=1e-12)  # a point
    # a boundary line in the last column alone: one box per box-row at every lattice offset
    line = np.zeros((100, 37), dtype=bool)
    line[:, 36] = True
    r = fractal_dimension(line)
    expected = [math.ceil(99 / s) for s in r.box_sizes]
    assert r.aligned_counts.tolist() == expected and np.allclose(r.box_counts, expected)


def test_full_plane_counts_every_partial_box():
    r = box_counting(np.ones((99, 36), dtype=bool), n_offsets=8)
    expected = [math.ceil(99 / s) * math.ceil(36 / s) for s in r.box_sizes]
    assert r.aligned_counts.tolist() == expected
    assert np.allclose(r.box_counts, expected)  # periodic offsets keep the box count fixed


def test_sierpinski_aligned_counts_are_powers_of_three():
    r = box_counting(sierpinski_mask(256), n_offsets=1)  # the set itself, not its boundary
    assert r.aligned_counts.tolist() == [3 ** (8 - k) for k in range(9)]
    assert r.dimension == pytest.approx(math.log2(3), abs=1e-9)


def test_result_fields_fit_range_and_local_slopes():
    r = fractal_dimension(koch_mask(256), n_offsets=8, seed=1)
    assert isinstance(r, FractalResult)
    assert r.fit_range == (2, 64) and r.resolution == (256, 256)
    assert r.local_slopes == pytest.approx(-np.diff(np.log2(r.box_counts)))
    sizes, counts = r.fit_sizes()
    assert sizes.tolist() == [2, 4, 8, 16, 32, 64]
    slope, intercept = np.polyfit(np.log2(sizes), np.log2(counts), 1)
    assert r.dimension == pytest.approx(-slope) and r.intercept == pytest.approx(intercept)
    assert 0 < r.stderr < 0.1 and r.ci_low <= r.dimension <= r.ci_high
    assert "sizes 2..64" in r.method and r.n_offsets == 8
    assert r.to_dict()["fit_range"] == [2, 64]
    same = fractal_dimension(koch_mask(256), n_offsets=8, seed=1)
    assert same.dimension == r.dimension  # seeded: reproducible

    custom = fractal_dimension(koch_mask(256), fit_range=(4, 32), n_offsets=1)
    assert custom.fit_range == (4, 32)
    assert custom.ci_high - custom.dimension == pytest.approx(1.959963984540054 * custom.stderr)
    with pytest.raises(ConfigError, match="fit_range"):
        fractal_dimension(koch_mask(256), fit_range=(3, 32))
    with pytest.raises(ConfigError, match="fit_range"):
        fractal_dimension(koch_mask(256), fit_range=(32, 32))


def test_small_grids_use_size_one_or_refuse():
    grid = np.zeros((8, 8), dtype=bool)
    grid[:, :3] = True
    r = fractal_dimension(grid)
    assert r.fit_range == (1, 2) and math.isnan(r.stderr)  # two sizes: no residual dof
    with pytest.raises(ConfigError, match="too small"):
        fractal_dimension(np.array([[True, False, False], [True, False, False], [True, True, False]]))


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("shape", sorted(TRUE))
def test_calibration_at_1024_within_005(calibration, shape):
    got = calibration[shape][1024]
    assert got["dimension"] == pytest.approx(TRUE[shape], abs=0.05)
    assert got["fit_range"] == (2, 256)
    lo, hi = got["ci"]
    assert lo <= hi and lo - 1e-9 <= got["dimension"] <= hi + 1e-9


def test_docstring_bias_table_matches_measurement(calibration):
    rows = re.findall(r"^(.+?)\s{2,}([\d.]+)\s+([\d.]+) \(([\d.]+)\)\s+([\d.]+) \(([\d.]+)\)$", fractal.__doc__, re.M)
    names = {
        "filled disk edge": "disk",
        "Koch snowflake edge": "koch",
        "Sierpinski triangle": "sierpinski",
        "coin-flip noise": "noise",
    }
    assert len(rows) == 4
    for name, true, m128, a128, m1024, a1024 in rows:
        key = names[name.strip()]
        assert float(true) == pytest.approx(TRUE[key], abs=5e-4)
        assert calibration[key][128]["dimension"] == pytest.approx(float(m128), abs=1.5e-3)
        assert calibration[key][128]["aligned"] == pytest.approx(float(a128), abs=1.5e-3)
        assert calibration[key][1024]["dimension"] == pytest.approx(float(m1024), abs=1.5e-3)
        assert calibration[key][1024]["aligned"] == pytest.approx(float(a1024), abs=1.5e-3)


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
        (np.ones((16, 16)), "every cell is diverged"),
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


def test_pooled_fixed_effects_recovers_shared_slope():
    sizes = np.array([2, 4, 8, 16, 32])
    levels = [((sizes, 2.0 ** (a - 1.3 * np.log2(sizes * 4.0**-k))), 4.0**-k) for k, a in enumerate([10, 3, 7])]
    p = pooled_dimension(levels)
    assert p.dimension == pytest.approx(1.3) and p.stderr == pytest.approx(0.0, abs=1e-9)
    assert p.intercepts == pytest.approx([10, 3, 7]) and p.level_slopes == pytest.approx([1.3] * 3)
    assert p.n_points == 15 and p.size_range == pytest.approx((2 / 16, 32))
    # the per-level intercepts absorb any shift of a level's sizes: the slope does not move
    shifted = pooled_dimension([(c, 1.0) for c, _ in levels])
    assert shifted.dimension == pytest.approx(1.3)
    with pytest.raises(ConfigError, match="levels"):
        pooled_dimension([])
    with pytest.raises(ConfigError, match="levels\\[0\\]"):
        pooled_dimension([((sizes, -sizes), 1.0)])


def test_pooled_koch_zoom_levels():
    # three levels at 512^2, each a window 1/4 per axis of its parent, centred on the snowflake's tip
    tip = koch_snowflake(0)[0]
    levels = []
    for level in range(3):
        half = 0.5 / 4**level
        window = (tip[0] - half, tip[0] + half, tip[1] - half, tip[1] + half)
        levels.append((fractal_dimension(koch_mask(512, window=window)), 4.0**-level))
    p = pooled_dimension(levels)
    assert p.dimension == pytest.approx(TRUE["koch"], abs=0.05)
    assert p.ci_low < p.dimension < p.ci_high and p.n_points == 3 * 7  # sizes 2..128 per level
    assert p.size_range == pytest.approx((2 / 16, 128))
