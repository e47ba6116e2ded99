"""compare A B: on synthetic finished studies whose boundaries are known (no training)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from cli_helpers import cli, ok
from test_rules import build_study, law

from vmap_sweep.analysis.compare import Dimension, compare_studies, delta_dimension
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.plots import plot_compare
from vmap_sweep.present.prose import compare_sentences
from vmap_sweep.study.axes import parse_axis_spec

X, Y = "lr:1e-6:1e-1:log", "tokens:1e3:1e6:log"


def grid(n: int = 32):
    lrs, ds = parse_axis_spec(X).values(n), parse_axis_spec(Y).values(n)
    return np.meshgrid(lrs, ds)  # (ny, nx): lr varies along x


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A: converged iff lr < 3e-5 (D/1e3)^0.5; B: the edge 4x higher, so cells between the two converge in B only."""
    root = tmp_path_factory.mktemp("cmp")
    crit = law(3e-5, 0.5)
    build_study(root / "a", crit, nx=32, ny=32, x=X, y=Y).close()
    build_study(root / "b", lambda d: 4 * crit(d), nx=32, ny=32, x=X, y=Y).close()
    return root / "a", root / "b", crit


def test_difference_shares_and_crit_ratio_follow_the_two_laws(pair):
    a, b, crit = pair
    r = compare_studies(StudyView.load(a), StudyView.load(b))
    lr, d = grid()
    conv_a, conv_b = lr < crit(d), lr < 4 * crit(d)
    assert r.gained == int((conv_b & ~conv_a).sum()) > 0 and r.lost == 0 and r.changed == r.gained
    assert r.converged_share_a == pytest.approx(conv_a.mean()) and r.converged_share_b == pytest.approx(conv_b.mean())
    lrs = parse_axis_spec(X).values(32)
    for row, size in zip(r.crit, parse_axis_spec(Y).values(32), strict=True):
        want_a, want_b = lrs[lrs >= crit(size)][0], lrs[lrs >= 4 * crit(size)][0]
        assert (row.size, row.lr_crit_a, row.lr_crit_b) == (size, want_a, want_b)
        assert row.ratio == pytest.approx(want_b / want_a) and 4 / 1.5 < row.ratio < 4 * 1.5  # one LR step
    # a 32x32 map is too small for a dimension: no ΔD, and the summary says why
    assert r.dimension_a.dimension is None and "too small a map" in r.dimension_a.reason
    lines = compare_sentences(r)
    assert r.dimension_a.grid == (32, 32) and r.delta_d is None and "ΔD not measured" in lines[2]
    assert "converge only in B" in lines[1] and "geometric mean" in lines[-1]
    d = json.loads(json.dumps(r.to_dict(), allow_nan=False))
    assert d["changed"] == r.gained and "views" not in d and len(d["crit"]) == 32


def test_delta_d_interval_adds_half_widths_in_quadrature():
    delta, ci = delta_dimension(Dimension(1.2, 1.1, 1.3), Dimension(1.5, 1.45, 1.65))
    half = math.hypot(0.1, 0.1)
    assert delta == pytest.approx(0.3) and ci == pytest.approx((0.3 - half, 0.3 + half))
    assert delta_dimension(Dimension(None, None, None, "one class"), Dimension(1.5, 1.4, 1.6)) == (None, None)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """96x96 (2.7 octaves: large enough to measure): the line of ``pair`` and coin-flip classes; and the line at
    64x64 (too small)."""
    root = tmp_path_factory.mktemp("wide")
    crit = law(3e-5, 0.5)
    coin = np.random.default_rng(0).random((96, 96)) < 0.5  # the boundary fills the plane, D ~ 2
    build_study(root / "line", crit, nx=96, ny=96, x=X, y=Y).close()
    build_study(root / "noise", crit, nx=96, ny=96, x=X, y=Y,
                override=lambda k_lr, k_size: bool(coin[k_size, k_lr])).close()
    build_study(root / "line64", crit, nx=64, ny=64, x=X, y=Y).close()
    return root


def test_a_noisy_boundary_has_a_larger_dimension(wide):
    r = compare_studies(StudyView.load(wide / "line"), StudyView.load(wide / "noise"))
    assert r.dimension_a.dimension == pytest.approx(1.0, abs=0.15)  # a straight line in log-log
    assert r.dimension_b.dimension > 1.7 and 0.6 < r.delta_d < 1.1 and r.delta_d_ci[0] > 0
    dimension = compare_sentences(r)[2]
    assert "contains 0" not in dimension and "at 96x96 over 2.7 octaves" in dimension


def test_same_study_changes_nothing(wide):
    r = compare_studies(StudyView.load(wide / "line"), StudyView.load(wide / "line"))
    assert r.changed == 0 and r.delta_d == 0.0 and all(row.ratio == 1.0 for row in r.crit if row.ratio)
    assert r.delta_d_ci[0] < 0 < r.delta_d_ci[1] and "contains 0" in compare_sentences(r)[2]


def test_different_resolutions_are_compared_only_when_asked_and_then_without_cells(wide, tmp_path):
    with pytest.raises(ConfigError, match="a dimension moves with the grid") as e:
        compare_studies(StudyView.load(wide / "line"), StudyView.load(wide / "line64"))
    assert "--across-resolutions" in str(e.value) and "\n" not in str(e.value)
    r = compare_studies(StudyView.load(wide / "line"), StudyView.load(wide / "line64"), across_resolutions=True)
    assert r.gained is None and r.changed is None and r.crit == [] and r.views is None
    assert r.dimension_a.grid == (96, 96) and r.dimension_b.grid == (64, 64)
    assert r.dimension_b.dimension is None and "too small a map" in r.dimension_b.reason and r.delta_d is None
    text = " ".join(compare_sentences(r))
    assert "grids of different resolutions, no cell compared" in text and "part of ΔD is the grid's" in text
    out = " ".join(ok("compare", wide / "line", wide / "line64", "--across-resolutions").stdout.split())
    assert "no cell compared" in out
    refused = cli("compare", wide / "line", wide / "line64")
    assert refused.exit_code == 2 and "--across-resolutions" in refused.stderr
    one = cli("compare", wide / "line", wide / "line64", "--across-resolutions", "--plot", tmp_path / "c.png")
    assert one.exit_code == 2 and "compare without --plot" in one.stderr and not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("x, y, nx, needle", [("lr:1e-6:1e-2:log", Y, 32, "same axes and ranges"),
                                              (X, Y, 16, "same resolution")])
def test_grids_that_differ_are_refused_in_one_line(pair, tmp_path, x, y, nx, needle):
    a, _, crit = pair
    build_study(tmp_path / "other", crit, nx=nx, ny=32, x=x, y=y).close()
    with pytest.raises(ConfigError, match=needle) as e:
        compare_studies(StudyView.load(a), StudyView.load(tmp_path / "other"))
    assert "\n" not in str(e.value)
    result = cli("compare", a, tmp_path / "other")
    assert result.exit_code == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_cli_prints_the_findings_and_draws_the_figure(pair, tmp_path):
    a, b, _ = pair
    out = ok("compare", a, b, "--plot", tmp_path / "cmp.png").stdout
    assert "Converged share: A" in out and "LR_crit A" in out and f"plot: {tmp_path / 'cmp.png'}" in out
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    d = json.loads(ok("compare", a, b, "--json").stdout)
    assert d["lost"] == 0 and d["gained"] > 0
    assert cli("compare", a, b, "--plot", tmp_path / "cmp.gif").exit_code == 2
    r = compare_studies(StudyView.load(a), StudyView.load(b))
    assert plot_compare(r, tmp_path / "cmp.svg").read_text().startswith("<?xml")


def test_report_compare_section(tmp_path):
    from vmap_sweep.present.report import write_report

    crit = law(3e-5, 0.5)  # a small pair: the report draws every section of A
    build_study(tmp_path / "a", crit, nx=12, ny=8, x=X, y=Y).close()
    build_study(tmp_path / "b", lambda d: 4 * crit(d), nx=12, ny=8, x=X, y=Y).close()
    r = compare_studies(StudyView.load(tmp_path / "a"), StudyView.load(tmp_path / "b"))
    text = write_report(tmp_path / "a", tmp_path / "r.md", "md", compare=tmp_path / "b").read_text()
    assert "## Compared with another study" in text and compare_sentences(r)[1] in text
    assert (tmp_path / "r_files" / "compare.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ hostile pairs
def _with_sizes(folder, repeated: int):
    """Record dataset sizes in which size row `repeated` holds no supervised token more than the row below it:
    rules count it as a repeat (what two seeds of one grid do, at different rows)."""
    from vmap_sweep.store import extras
    from vmap_sweep.store.db import StudyStore
    from vmap_sweep.study.sizes import DatasetSize

    with StudyStore.open(folder) as store:
        budgets = sorted({int(c.hparams["tokens"]) for c in store.cells()})
        sup = {n: 10 * (k + 1) for k, n in enumerate(budgets)}
        sup[budgets[repeated]] = sup[budgets[repeated - 1]]
        extras.put_dataset_sizes(store, {n: DatasetSize(n, sup[n], 1 + k) for k, n in enumerate(budgets)})


def test_two_seeds_that_repeat_different_sizes_compare_size_by_size(pair, tmp_path):
    """Two seeds of one grid leave out different repeated sizes: compared size by size (was a zip traceback), the
    sizes one of them left out named, and report --compare works too."""
    import shutil

    a, b = (shutil.copytree(p, tmp_path / p.name) for p in pair[:2])
    _with_sizes(a, 3)
    _with_sizes(b, 5)
    r = compare_studies(StudyView.load(a), StudyView.load(b))
    sizes = parse_axis_spec(Y).values(32)
    assert [row.size for row in r.crit] == list(sizes)  # every size, the ones either left out too
    only = {row.size for row in r.crit if row.ratio is None and (row.lr_crit_a is None) != (row.lr_crit_b is None)}
    assert only == {float(sizes[3]), float(sizes[5])}
    assert any("measured only in A" in n for n in r.notes) and any("measured only in B" in n for n in r.notes)
    result = ok("compare", a, b)
    assert "measured only in" in result.stdout
    ok("report", a, "--compare", b, "-o", tmp_path / "r.md")


def test_compare_says_what_really_differs(pair, tmp_path):
    import shutil

    a, b = pair[:2]
    view = StudyView.load(a)
    assert compare_studies(view, view).differs.startswith("nothing: A and B are the same study")
    copy = shutil.copytree(a, tmp_path / "copy")
    assert compare_studies(view, StudyView.load(copy)).differs == "nothing but the folder: B is a copy of A"
    assert "the same settings, stored as other text" not in ok("compare", a, a).stdout
    again = tmp_path / "again"
    build_study(again, law(3e-5, 0.5), nx=32, ny=32, x=X, y=Y).close()
    assert compare_studies(view, StudyView.load(again)).differs.startswith(
        "nothing in the config: the same settings, run twice")
    from vmap_sweep.store.db import StudyStore

    # a record that differs deep inside names the entry, however long the record is before it
    with StudyStore.open(again) as store:
        store.put_extra("provenance", {"a" * 80: 1, "model": {"sha256": "1" * 64}, "vmap_sweep": "0.2.0"})
    with StudyStore.open(copy) as store:
        store.put_extra("provenance", {"a" * 80: 1, "model": {"sha256": "1" * 64}, "vmap_sweep": "0.1.0"})
    differs = compare_studies(StudyView.load(copy), StudyView.load(again)).differs
    assert 'provenance.vmap_sweep: "0.1.0" -> "0.2.0"' in differs and "sha256" not in differs, differs
    # a study classified by the default criterion and one never classified class their cells alike
    with StudyStore.open(again) as store:
        store.put_extra("provenance", {"a" * 80: 1, "model": {"sha256": "1" * 64}, "vmap_sweep": "0.1.0"})
        store.put_extra("criterion", None)
    with StudyStore.open(copy) as store:
        store.put_extra("criterion", {"criterion": "ratio"})
    differs = compare_studies(StudyView.load(copy), StudyView.load(again)).differs
    assert differs == "nothing in the config: the same settings, run twice", differs


def test_studies_of_different_criteria_are_compared_only_when_asked(pair, tmp_path):
    import shutil

    a = pair[0]
    b = shutil.copytree(pair[1], tmp_path / "b")
    ok("classify", b, "--criterion", "threshold", "--converged-below", "2.5")
    for args in (["compare", a, b], ["report", a, "--compare", b, "-o", tmp_path / "r.md"]):
        result = cli(*args)
        assert result.exit_code == 2 and "criterion=ratio" in result.stderr and "criterion=threshold" in result.stderr
        assert "--mixed-criteria" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.md").exists()
    mixed = compare_studies(StudyView.load(a), StudyView.load(b), mixed_criteria=True)
    assert any("changes of class mix the criterion's" in n for n in mixed.notes)
    ok("compare", a, b, "--mixed-criteria")
