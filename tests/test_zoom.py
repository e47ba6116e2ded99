"""Zooming into a study's boundary: window picking, child studies that resume, the dimension per level, the GIF.

Most tests run the real zoom code (run_study, store, resume) with a formula backend that "trains" a cell by
looking up whether it lies inside a disk in log-log space (fast, known boundary of dimension 1); one test
zooms the embedded tiny model for real at 6x6.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import boundary_pixels, ok
from helpers import StopsAfterOneBatch, run_local, zoom_local
from matplotlib.animation import PillowWriter
from PIL import Image

from vmap_sweep.analysis.chain import dimension_report, zoom_levels
from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.study import reclassify
from vmap_sweep.analysis.window import child_name, pick_window
from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.present import animate as animate_mod
from vmap_sweep.present.animate import animate
from vmap_sweep.run.worker import LocalBackend
from vmap_sweep.store.db import DB_NAME, StudyStore
from vmap_sweep.store.extras import ZOOM_OF
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.config import StudyConfig, preset
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.study.sizes import Budgets, DatasetSize
from vmap_sweep.train.trainer import CellRecord

# ----------------------------------------------------------------------------- helpers

DISK = StudyConfig(model="tiny", data="synthetic", x="lr:1e-4:1:log", y="weight_decay:0.01:100:log",
                   resolution="32", rows_per_step=4, seq_len=64, fixed={"tokens": 512})


def inside_disk(lr: float, wd: float) -> tuple[bool, float]:
    """Converged iff inside a disk of radius 0.3 centred in the (log lr, log wd) square."""
    u, v = (math.log10(lr) + 4) / 4, (math.log10(wd) + 2) / 4
    r2 = (u - 0.5) ** 2 + (v - 0.5) ** 2
    return r2 < 0.09, r2


class FormulaBackend:
    """The runner's backend protocol without a model: each cell's record follows from inside_disk."""

    settings = RunSettings()

    def __init__(self, crash_after: int | None = None, trained: list[int] | None = None):
        self.crash_after, self.trained = crash_after, trained if trained is not None else []

    def budgets(self, budgets: list[int], unit: str = "tokens") -> Budgets:
        return Budgets(1, {n: DatasetSize(n, n, n) for n in budgets})  # every token supervised

    def models_per_batch(self, limit: int) -> int:
        return limit

    def run(self, jobs, started, evaluate=True):
        for n, job in enumerate(jobs):
            if self.crash_after is not None and n >= self.crash_after:
                raise RuntimeError("killed")  # like a SIGKILL between batches
            started(job)
            self.trained.append(len(job[1]))
            records = []
            for c in job[1]:
                conv, r2 = inside_disk(c.hparams["lr"], c.hparams["weight_decay"])
                ratio = 0.5 + r2 if conv else 2.0 + r2
                records.append(CellRecord(initial_loss=1.0, steps=1, losses=[ratio, ratio], base_losses=[1.0, 1.0],
                                          grad_norms=[1.0], lrs=[c.hparams["lr"]], steps_done=1, eval_loss=ratio))
            yield job, records

    def close(self) -> None:
        pass


def formula(trained: list[int] | None = None, crash_after: int | None = None) -> FormulaBackend:
    return FormulaBackend(crash_after, trained)


def disk_parent(folder: Path) -> Path:
    run_local(DISK, folder, 128, formula()).close()
    return folder


def snapshot(folder: Path) -> tuple:
    """Everything a zoom could change in a parent: its tables and its folder's entries."""
    conn = sqlite3.connect(f"file:{folder / DB_NAME}?mode=ro", uri=True)
    try:
        tables = tuple(conn.execute(f"SELECT * FROM {t}").fetchall() for t in ("meta", "cells", "children", "extra"))
    finally:
        conn.close()
    entries = sorted(p.name for p in folder.iterdir() if not p.name.endswith(("-wal", "-shm")))
    return tables, entries


def finished_at(folder: Path) -> list:
    with StudyStore.open(folder) as s:
        return [(r["i"], r["j"], r["finished_at"]) for r in s.rows()]


def children_of(folder: Path) -> list:
    with StudyStore.open(folder) as s:
        return s.children()


def log_width(a: float, b: float) -> float:
    return math.log(b) - math.log(a)


@pytest.fixture(scope="module")
def disk_chain(tmp_path_factory):
    """A 32x32 parent and a depth-2 auto zoom, all with the formula backend."""
    parent = disk_parent(tmp_path_factory.mktemp("disk") / "parent")
    trained: list[int] = []
    dirs = zoom_local(parent, formula(trained), depth=2, models_per_batch=128)
    return parent, dirs, trained


# ----------------------------------------------------------------------------- pick_window


XS = np.geomspace(1e-4, 1.0, 32)
YS = np.linspace(0.0, 1.0, 32)


def test_pick_window_chooses_the_densest_window_with_fraction_of_each_axis():
    conv = np.zeros((32, 32), dtype=bool)
    conv[:, :16] = True  # a straight edge: density ~ 1/4 of a window at best
    rng = np.random.default_rng(0)
    conv[20:28, 4:12] = rng.random((8, 8)) < 0.5  # a noisy patch: boundary nearly everywhere in it
    x0, x1, y0, y1 = pick_window(conv, XS, YS, True, False)
    # the window lies in the patch (cells 4..11 along x, 20..27 along y)
    assert XS[4] <= x0 < x1 <= XS[11] and YS[20] <= y0 < y1 <= YS[27]
    # 1/8 of each axis: in log space on the log x axis, linearly on the lin y axis
    assert log_width(x0, x1) == pytest.approx(log_width(XS[0], XS[-1]) / 8, rel=1e-9)
    assert y1 - y0 == pytest.approx(1 / 8, rel=1e-9)
    # another fraction gives another width; same input, same answer
    w = pick_window(conv, XS, YS, True, False, fraction=0.25)
    assert log_width(w[0], w[1]) == pytest.approx(log_width(XS[0], XS[-1]) / 4, rel=1e-9)
    assert pick_window(conv, XS, YS, True, False) == (x0, x1, y0, y1)


def test_pick_window_stays_away_from_the_edge_cells():
    conv = np.zeros((32, 32), dtype=bool)
    conv[::2, 0] = True  # stripes in the edge column: the densest boundary, but made of edge cells
    conv[-1, 1:] = True  # and along the edge row
    conv[:, 1:20] = True  # and a straight edge between columns 19 and 20
    x0, x1, y0, y1 = pick_window(conv, XS, YS, True, False)
    # over the straight edge's pixel column (the window is 3.875 cells wide), far from the stripes
    assert XS[2] < x0 <= XS[19] * (1 + 1e-12) and XS[20] * (1 - 1e-12) <= x1
    assert YS[1] <= y0 and y1 <= YS[-2]
    # windows never touch the outer cells even where the boundary runs into them
    only_edge = np.ones((32, 32), dtype=bool)
    only_edge[:, 0] = False
    with pytest.raises(ConfigError, match="only the outer edge cells"):
        pick_window(only_edge, XS, YS, True, False)


def test_pick_window_ties_go_to_the_centre():
    conv = np.zeros((32, 32), dtype=bool)
    conv[:, :16] = True  # a vertical edge: every height along it has the same density
    x0, x1, y0, y1 = pick_window(conv, XS, YS, True, False)
    assert (y0 + y1) / 2 == pytest.approx(0.5, abs=1e-12)
    assert math.sqrt(x0 * x1) == pytest.approx(math.sqrt(XS[15] * XS[16]), rel=1e-9)  # centred on the pixel


def test_pick_window_refuses_no_boundary_and_bad_inputs():
    with pytest.raises(ConfigError, match="no boundary"):
        pick_window(np.ones((32, 32), dtype=bool), XS, YS, True, False)
    conv = np.zeros((32, 32), dtype=bool)
    conv[:, :16] = True
    for bad in (0, 1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="--fraction"):
            pick_window(conv, XS, YS, True, False, fraction=bad)
    with pytest.raises(ConfigError, match="shape"):
        pick_window(conv[:, :10], XS, YS, True, False)
    with pytest.raises(ConfigError, match="does not fit"):
        pick_window(conv[:3, :3], XS[:3], YS[:3], True, False)


# ----------------------------------------------------------------------------- zoom (formula backend)


def test_zoom_makes_recorded_nested_children_over_the_picked_windows(disk_chain):
    parent, dirs, trained = disk_chain
    assert len(dirs) == 2 and dirs[0].parent == parent and dirs[1].parent == dirs[0]
    assert sum(trained) == 2 * 32 * 32  # one full child per level, the parent untouched
    with StudyStore.open(parent) as p:
        parent_cfg = StudyConfig.from_dict(p.config)
    prev = parent
    for level, d in enumerate(dirs, start=1):
        with StudyStore.open(prev) as p:
            (child,) = p.children()
            x, y = parse_axis_spec(p.config["x"]), parse_axis_spec(p.config["y"])
            expected = pick_window(study_classes(p), np.geomspace(x.lo, x.hi, 32), np.geomspace(y.lo, y.hi, 32),
                                   True, True)
        assert child.level == level and prev / child.child_dir == d
        assert child.window == pytest.approx(expected, rel=1e-12)
        with StudyStore.open(d) as s:
            cx, cy = parse_axis_spec(s.config["x"]), parse_axis_spec(s.config["y"])
            assert (cx.lo, cx.hi, cy.lo, cy.hi) == child.window
            assert log_width(cx.lo, cx.hi) == pytest.approx(log_width(x.lo, x.hi) / 8, rel=1e-9)
            assert s.done_count() == s.cell_count() == 32 * 32
            assert s.get_extra(ZOOM_OF)["level"] == level
            same = {k: v for k, v in s.config.items() if k not in ("x", "y")}
            assert same == {k: v for k, v in parent_cfg.to_dict().items() if k not in ("x", "y")}
        prev = d
    assert [(lv, d) for lv, d, _ in zoom_levels(parent)] == [(0, parent), (1, dirs[0]), (2, dirs[1])]


def test_dimension_report_per_level_and_pooled(disk_chain):
    parent, dirs, _ = disk_chain
    report = dimension_report(parent)
    levels = report.levels
    assert [lv.level for lv in levels] == [0, 1, 2] and [lv.folder for lv in levels] == [parent, *dirs]
    assert [lv.scale for lv in levels] == pytest.approx([1, 1 / 8, 1 / 64], rel=1e-9)
    for lv in levels:  # a disk's edge, and windows of it, have dimension 1; 32x32 spans under two octaves
        assert lv.measured and lv.error is None and any("under 2" in w for w in lv.warnings), lv
        assert "too small a map" in lv.too_small and "32x32" in lv.too_small, lv
        assert lv.ci_low <= 1.0 <= lv.ci_high, lv  # the numbers stay in the JSON, with their intervals
    pooled = report.pooled  # levels too small to measure are not pooled into a number either
    assert pooled.outcome == "all_too_small" and pooled.dimension is None and pooled.too_small_levels == (0, 1, 2)
    assert "every level is too small" in pooled.error
    json.dumps(report.to_dict(), allow_nan=False)  # --json ready: no NaN


def test_an_unmeasurable_level_says_why_and_its_json_keeps_the_shape(disk_chain, tmp_path):
    parent = tmp_path / "parent"  # a copy: the level reclassified here would change the chain other tests read
    shutil.copytree(disk_chain[0], parent)
    (child,) = [p for p in parent.iterdir() if p.is_dir()]
    with StudyStore.open(child) as store:
        reclassify(store, "threshold", converged_below=1.0)
    report = dimension_report(parent)
    top, level, deepest = report.levels
    assert level.level == 1 and level.folder == child and not level.measured and level.dimension is None
    assert level.error.startswith("classified by {") and "level 0 by {'criterion': 'ratio'}" in level.error
    assert "run `vmap-sweep classify` on the top study" in level.error
    assert level.stderr is None and level.box_sizes == () and level.too_small is None
    assert level.to_dict() == {"level": 1, "dir": str(child), "window": list(level.window), "scale": level.scale,
                               "scale_x": level.scale_x, "scale_y": level.scale_y, "resolution": [32, 32],
                               "dimension": None, "error": level.error}
    assert list(top.to_dict()) == ["level", "dir", "window", "scale", "scale_x", "scale_y", "resolution",
                                   "dimension", "stderr", "ci_low", "ci_high", "fit_range", "octaves", "warnings",
                                   "box_sizes", "box_counts", "too_small", "error"]
    assert report.pooled.too_small_levels == (0, 2)  # the unmeasured level is neither pooled nor "too small"
    assert report.pooled.to_dict() == {"dimension": None, "too_small_levels": [0, 2],
                                       "error": report.pooled.error}
    printed = json.loads(ok("zoom-dimension", parent, "--json").stdout)
    assert printed == report.to_dict() == json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert [lv["dimension"] is None for lv in printed["levels"]] == [False, True, False] and deepest.measured


def test_levels_that_disagree_are_reported_apart_not_pooled():
    from shapes import disk_placed, noise_mask

    from vmap_sweep.analysis.chain import _pooled
    from vmap_sweep.analysis.fractal import fractal_dimension

    disk, wider, noise = (fractal_dimension(m) for m in (disk_placed(256, 0.8), disk_placed(256, 0.5),
                                                          noise_mask(256, seed=1)))
    same = _pooled([(disk, 1.0, 0), (wider, 0.125, 1)])
    assert abs(same.dimension - 1) < 0.02 and same.levels == (0, 1) and same.agreement_p > 0.05
    assert same.outcome == "pooled" and not same.disagree and same.to_dict()["error"] is None
    apart = _pooled([(disk, 1.0, 0), (noise, 0.125, 1)])
    assert apart.dimension is None and apart.disagree and apart.agreement_p < 0.05
    assert f"level 0: {disk.dimension:.3f}" in apart.error and f"level 1: {noise.dimension:.3f}" in apart.error
    assert list(apart.to_dict()) == ["dimension", "disagree", "agreement_p", "birge_ratio", "levels",
                                     "too_small_levels", "error"] and apart.to_dict()["disagree"] is True
    small = fractal_dimension(disk_placed(32, 0.8))
    mixed = _pooled([(disk, 1.0, 0), (small, 0.125, 1)])  # a too-small level is left out of the pool
    assert mixed.levels == (0,) and mixed.too_small_levels == (1,)


def test_rerun_resumes_an_interrupted_child_and_then_trains_nothing(tmp_path):
    parent = disk_parent(tmp_path / "parent")
    before = snapshot(parent)
    with pytest.raises(RuntimeError, match="killed"):
        zoom_local(parent, formula(crash_after=3), depth=2, models_per_batch=100)
    assert snapshot(parent)[0] == before[0]  # the parent database: the child is recorded only once trained
    (partial,) = [p for p in parent.iterdir() if p.is_dir()]
    with StudyStore.open(partial) as s:
        assert s.done_count() == 300
    trained: list[int] = []
    dirs = zoom_local(parent, formula(trained), depth=2, models_per_batch=100)
    assert dirs[0] == partial and sum(trained) == (1024 - 300) + 1024  # the rest of level 1, then level 2
    assert [p for p in parent.iterdir() if p.is_dir()] == [partial]
    stamps = [finished_at(d) for d in dirs]
    children = [children_of(d) for d in (parent, dirs[0])]
    trained.clear()
    assert zoom_local(parent, formula(trained), depth=2, models_per_batch=100) == dirs
    assert sum(trained) == 0 and [finished_at(d) for d in dirs] == stamps
    assert [children_of(d) for d in (parent, dirs[0])] == children


def test_a_given_window_is_used_for_the_first_level_only(tmp_path):
    parent = disk_parent(tmp_path / "parent")
    window = (1e-3, 1e-2, 0.1, 1.0)  # crosses the disk's edge
    dirs = zoom_local(parent, formula(), window=window, depth=2, models_per_batch=256)
    chain = zoom_levels(parent)
    assert chain[1][2] == pytest.approx(window, rel=1e-12)
    with StudyStore.open(dirs[0]) as s:
        assert (s.config["x"], s.config["y"]) == ("lr:0.001:0.01:log", "weight_decay:0.1:1.0:log")
    assert log_width(chain[2][2][0], chain[2][2][1]) == pytest.approx(math.log(10) / 8, rel=1e-9)  # auto, 1/8
    assert chain[2][0] == 2


def test_bad_inputs_raise_and_change_nothing(tmp_path):
    parent = disk_parent(tmp_path / "parent")
    before = snapshot(parent)
    cases = [
        (dict(window=(1e-5, 1e-3, 0.1, 1.0)), ConfigError, "--window .*outside the parent range"),
        (dict(window=(1e-2, 1e-3, 0.1, 1.0)), ConfigError, "--window .*not ordered"),
        (dict(window=(1e-3, 1e-2, 0.1)), ConfigError, "--window"),
        (dict(depth=0), ConfigError, "--depth"),
        (dict(fraction=1.5), ConfigError, "--fraction"),
    ]
    for kwargs, err, msg in cases:
        with pytest.raises(err, match=msg):
            zoom_local(parent, formula(), **kwargs)
        assert snapshot(parent) == before
    # an unfinished parent: refused for an auto and for a given window
    unfinished = tmp_path / "unfinished"
    with pytest.raises(RuntimeError):
        run_local(DISK, unfinished, 100, formula(crash_after=2))
    before = snapshot(unfinished)
    for window in (None, (1e-3, 1e-2, 0.1, 1.0)):
        with pytest.raises(ConfigError, match="200 of 1024 cells are done"):
            zoom_local(unfinished, formula(), window=window)
        assert snapshot(unfinished) == before
    with pytest.raises(StoreError, match="no study.db"):
        zoom_local(tmp_path / "nowhere", formula())


def test_animate_writes_each_level_and_in_between_frames(disk_chain, tmp_path, monkeypatch):
    parent, dirs, _ = disk_chain
    monkeypatch.setattr(animate_mod.shutil, "which", lambda name: None)  # no ffmpeg: GIF only
    gif = animate(parent, tmp_path / "anim" / "zoom.gif", fps=4)
    assert gif == tmp_path / "anim" / "zoom.gif" and os.listdir(gif.parent) == ["zoom.gif"]
    with Image.open(gif) as im:
        # 3 levels: each level, its next window, STEPS in-between frames; the deepest level once
        assert im.n_frames == animate_mod.frame_count(3) == 3 + 2 * (1 + animate_mod.STEPS)
        assert im.info["duration"] == 250
        sizes = set()
        for k in range(im.n_frames):
            im.seek(k)
            sizes.add(im.size)
        assert sizes == {(640, 520)}
    # animating from the middle of the chain: its two levels
    with Image.open(animate(dirs[0], tmp_path / "mid")) as im:
        assert im.n_frames == animate_mod.frame_count(2) and im.format == "GIF"
    with pytest.raises(ConfigError, match="no zoom children"):
        animate(dirs[1], tmp_path / "leaf.gif")

    class FakeFFMpeg(PillowWriter):
        """Stands in for FFMpegWriter (no ffmpeg here): writes how many frames it got."""

        def finish(self):
            Path(self.outfile).write_text(str(len(self._frames)))

    monkeypatch.setattr(animate_mod.shutil, "which", lambda name: "/usr/bin/ffmpeg")
    monkeypatch.setattr(animate_mod, "FFMpegWriter", FakeFFMpeg)
    gif = animate(parent, tmp_path / "with-mp4" / "zoom")
    assert gif.name == "zoom.gif" and (gif.parent / "zoom.mp4").read_text() == str(animate_mod.frame_count(3))
    with pytest.raises(ConfigError, match=".gif"):
        animate(parent, tmp_path / "zoom.png")


# ----------------------------------------------------------------------------- the tiny model, for real


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """The pretrained tiny model: from $VMAP_SWEEP_CACHE when set (shared between runs), else pretrained
    once into a temporary folder (~11 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread
    with pytest.MonkeyPatch.context() as mp:
        if not os.environ.get("VMAP_SWEEP_CACHE"):
            mp.setenv("VMAP_SWEEP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


class Counting(LocalBackend):
    cells = 0

    def run(self, jobs, started, evaluate=True):
        Counting.cells += sum(len(cells) for _, cells in jobs)
        return super().run(jobs, started, evaluate)


def test_zoom_end_to_end_on_the_tiny_model(model_cache, tmp_path):
    cfg = preset("tiny").with_overrides(resolution="6", y="tokens:256:2048:log")
    parent = tmp_path / "parent"
    run_local(cfg, parent, 8).close()
    dirs = zoom_local(parent, depth=2, models_per_batch=8)
    chain = zoom_levels(parent)
    assert [(lv, d) for lv, d, _ in chain] == [(0, parent), (1, dirs[0]), (2, dirs[1])]
    for (_, d, window), prev in zip(chain[1:], (parent, dirs[0]), strict=True):
        with StudyStore.open(d) as s:
            x, y = parse_axis_spec(s.config["x"]), parse_axis_spec(s.config["y"])
            assert (x.lo, x.hi, y.lo, y.hi) == window and s.config["resolution"] == "6"
            assert s.done_count() == s.cell_count() == 36 and (s.labels_array() != "").all()
        assert [c.window for c in children_of(prev)] == [window]
    stamps = [finished_at(d) for d in (parent, *dirs)]
    Counting.cells = 0
    assert zoom_local(parent, Counting(cfg, RunSettings()), depth=2) == dirs
    assert Counting.cells == 0 and [finished_at(d) for d in (parent, *dirs)] == stamps
    report = dimension_report(parent)
    assert len(report.levels) == 3
    for lv, d in zip(report.levels, (parent, *dirs), strict=True):  # 6x6: box sizes 1..4, or a refusal
        assert lv.folder == d
        if lv.dimension is None:
            assert lv.error
        else:  # each level counted its own folder's boundary
            assert math.isfinite(lv.dimension) and lv.box_sizes[0] == 1
            assert lv.box_counts[0] == pytest.approx(boundary_pixels(d))
    measured = tuple(lv.level for lv in report.levels if lv.dimension is not None)
    assert measured[:1] == (0,)  # the parent has both classes
    pooled = report.pooled
    if pooled.dimension is None:
        assert pooled.error
    else:  # pooled over exactly the measured levels
        assert math.isfinite(pooled.dimension) and pooled.levels == measured
    with Image.open(animate(parent, tmp_path / "zoom.gif")) as im:
        assert im.n_frames == animate_mod.frame_count(3)


def _labels_follow_the_criterion(folder) -> dict:
    """Every stored class equals what the study's criterion recomputes from its trajectory."""
    from vmap_sweep.analysis.classify import classify_rows
    from vmap_sweep.store.extras import criterion as study_criterion

    with StudyStore.open(folder) as store:
        criterion = study_criterion(store)
        options = {k: v for k, v in criterion.items() if k != "criterion"}
        again = classify_rows(store.rows(arrays=True), criterion["criterion"], **options)
        stored = {(r["i"], r["j"]): r["label"] for r in store.rows() if r["status"] == "done"}
    assert stored and stored == {key: label for key, (label, _) in again.items()}
    return criterion


THRESHOLD = {"criterion": "threshold", "converged_below": 3.0, "not_converged_above": 10.0}


def test_cells_trained_after_a_classify_follow_its_criterion(model_cache, tmp_path):
    from vmap_sweep.analysis.study import reclassify_with_zooms

    cfg = preset("tiny").with_overrides(resolution="6", y="tokens:256:2048:log")
    parent = tmp_path / "parent"
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, parent, 2, StopsAfterOneBatch(cfg, RunSettings()))
    reclassify_with_zooms(parent, "threshold", converged_below=3.0)
    run_local(cfg, parent, 6).close()  # resumed: the rest is labelled by threshold, not ratio
    assert _labels_follow_the_criterion(parent) == THRESHOLD
    with StudyStore.open(parent) as store:
        assert "marginal" in set(store.labels_array().ravel())  # a class only threshold gives

    (child,) = zoom_local(parent, depth=1, models_per_batch=8)
    assert _labels_follow_the_criterion(child) == THRESHOLD  # a zoom study takes its parent's criterion
    counts, followed = reclassify_with_zooms(parent, "ratio")
    assert followed == 1 and sum(counts.values()) == 36
    assert _labels_follow_the_criterion(child) == {"criterion": "ratio"}  # and follows it on a new classify

    before = snapshot(child)  # `classify LEVEL` is refused, naming the chain's top; nothing changes
    with pytest.raises(ConfigError, match=re.escape(f"{child} is zoom level 1 of {parent}: the levels of a zoom share "
                                                    f"one criterion, since their dimensions are pooled; `vmap-sweep "
                                                    f"classify {parent}` classifies every level")):
        reclassify_with_zooms(child, "threshold", converged_below=3.0)
    assert snapshot(child) == before
    with StudyStore.open(child) as store:  # a level classified on its own is not pooled with the others
        reclassify(store, "threshold", converged_below=3.0)
    level = dimension_report(parent).levels[1]
    assert level.dimension is None and "classified by" in level.error


def test_a_study_with_results_keeps_its_criterion_and_a_failed_classify_changes_nothing(model_cache, tmp_path):
    from vmap_sweep.analysis.study import reclassify_with_zooms
    from vmap_sweep.store.extras import criterion as study_criterion

    cfg = preset("tiny").with_overrides(resolution="6", y="tokens:256:2048:log")
    study = tmp_path / "study"
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, study, 2, StopsAfterOneBatch(cfg, RunSettings()))
    # resumed with a criterion (as a zoom passes its parent's): its stored ratio classes stay the rule
    run_local(cfg, study, 6, criterion=THRESHOLD).close()
    assert _labels_follow_the_criterion(study) == {"criterion": "ratio"}

    with StudyStore.open(study) as store:
        store.add_child((1e-3, 1e-2, 300.0, 600.0), "zoom-gone", 1)
    before = (study / DB_NAME).read_bytes()
    with pytest.raises(StoreError, match="no study.db"):
        reclassify_with_zooms(study, "threshold", converged_below=3.0)
    assert (study / DB_NAME).read_bytes() == before
    with pytest.raises(ConfigError, match="unknown"):
        reclassify_with_zooms(study, "nope")
    with StudyStore.open(study) as store:
        assert study_criterion(store) == {"criterion": "ratio"}


@pytest.mark.parametrize("swap", ["a study made by run", "another level", "another window"])
def test_a_zoom_child_that_is_not_the_recorded_zoom_is_refused(disk_chain, tmp_path, swap):
    """A child folder holding another study (the top study's copy, a deeper level's, or a window the parent did
    not record) is not counted as a level: every command that walks the chain names it and writes nothing."""
    import shutil

    from cli_helpers import cli

    parent, dirs, _ = disk_chain
    top = Path(shutil.copytree(parent, tmp_path / "parent"))
    level1 = top / dirs[0].name
    if swap == "a study made by run":
        shutil.copy(parent / DB_NAME, level1 / DB_NAME)
        needle = "records no zoom of its own"
    elif swap == "another level":
        shutil.copy(level1 / dirs[1].name / DB_NAME, level1 / DB_NAME)
        needle = "it is a level-2 zoom, recorded as level 1"
    else:
        conn = sqlite3.connect(top / DB_NAME)
        conn.execute("UPDATE children SET x0 = x0 * 1.5")
        conn.commit()
        conn.close()
        needle = "recorded as window"
    said = f"zoom child {dirs[0].name!r} holds a study that is not that zoom"
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (["zoom-dimension", top], ["animate", top, "-o", tmp_path / "z.gif"]):
        result = cli(*args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.output)
        assert said in result.stderr and needle in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    # the report stands without the zoom levels, and says why they are not in it
    assert cli("report", top, "-o", tmp_path / "r.md").exit_code == 0
    text = (tmp_path / "r.md").read_text()
    assert "Zoom levels not measurable" in text and said in text and needle in text


def test_ctrl_c_in_a_zoom_says_how_to_resume_it(model_cache, tmp_path, monkeypatch):
    """As a run: one line on what is kept and the command that resumes it, exit 130; that command finishes it."""
    from cli_helpers import cli

    from vmap_sweep.cli.render import RichProgress

    parent = tmp_path / "parent"
    run_local(preset("tiny").with_overrides(resolution="6", y="tokens:256:2048:log"), parent, 8).close()
    real = RichProgress.batch_done

    def interrupt(self, batch, labels, elapsed):
        real(self, batch, labels, elapsed)
        raise KeyboardInterrupt

    monkeypatch.setattr(RichProgress, "batch_done", interrupt)
    out = cli("zoom", str(parent), "--auto", "--depth", "1", "--device", "cpu", "--models-per-batch", "4", "--quiet")
    monkeypatch.setattr(RichProgress, "batch_done", real)
    assert out.exit_code == 130 and "Traceback" not in out.output and "Aborted" not in out.output
    line = out.output.replace("\n", "")
    assert f"interrupted: every finished batch is stored; `vmap-sweep zoom {parent} --auto --depth 1 --device cpu`" \
        in line, line
    # the begun level is named, with the window that finishes it (the parent records a child once it is trained)
    (begun,) = [p for p in parent.iterdir() if p.name.startswith("zoom-")]
    said = ok("zoom-dimension", str(parent)).stdout.replace("\n", "")
    finish = re.search(rf"was begun and not finished \({begun.name}\): `vmap-sweep (zoom {re.escape(str(parent))} "
                       r"--window [^`]+)` finishes it", said)
    assert finish and "no zoom level below" not in said, said
    words = finish.group(1).split()
    window = tuple(float(v) for v in words[words.index("--window") + 1:][:4])  # names that folder: resumes it
    assert child_name(1, window) == begun.name and words[-2:] == ["--device", "cpu"]  # and its run settings
    (parent / "zoom-junk").mkdir()  # a folder of that name that is no study of this tool's: passed over
    (parent / "zoom-junk" / "study.db").write_text("not sqlite")
    assert [b.folder for b in dimension_report(parent).begun] == [begun]
    shutil.rmtree(parent / "zoom-junk")
    status = re.sub(r"[\s│┃|]+", "", ok("status", str(parent)).stdout)  # a table cell wraps a long path anywhere
    assert re.sub(r"\s+", "", f"zoom begun {begun.name}, not finished: `vmap-sweep {finish.group(1)}` finishes it") \
        in status
    resumed = ok(*line.split("`")[1].split()[1:])
    assert dimension_report(parent).begun == ()
    assert zoom_levels(parent)[-1][0] == 1 and str(zoom_levels(parent)[-1][1]) in resumed.output
