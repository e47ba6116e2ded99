"""The analysis commands end to end on one real tiny study: zoom, zoom-dimension, animate, rules, report,
and the options that need an optional extra or a GPU (clear error, exit 2)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli_helpers import boundary_pixels, cli, ok
from PIL import Image

from vmap_sweep.present.animate import frame_count
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec

TINY = ["run", "--preset", "tiny", "--resolution", "6", "--y", "tokens:256:2048:log", "--eval-tokens", "512",
        "--models-per-batch", "6", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis") / "study"
    ok(*TINY, "--out", out)
    return out


def test_zoom_then_dimension_then_animation(study):
    result = ok("zoom", study, "--auto", "--depth", "1", "--models-per-batch", "6", "--device", "cpu", "--quiet")
    child = study / result.stdout.strip().splitlines()[-1].split(study.name + "/")[-1]
    assert (child / "study.db").exists()
    with StudyStore.open(child) as store:  # it says which window it chose, the one the child sweeps
        x, y = (parse_axis_spec(store.config[side]) for side in ("x", "y"))
    assert (f"note: level 1: window lr {x.lo:.4g} … {x.hi:.4g} × tokens {y.lo:.4g} … {y.hi:.4g} (auto: the densest "
            "part of the parent's boundary, 1/8 of each axis)") in result.stderr, result.stderr
    with StudyStore.open(study) as store:
        assert [c.level for c in store.children()] == [1]
    report = json.loads(ok("zoom-dimension", study, "--json").stdout)
    assert [lv["level"] for lv in report["levels"]] == [0, 1]
    top = json.loads(ok("fractal", study, "--json").stdout)
    assert report["levels"][0]["dimension"] == top["dimension"]  # level 0 is the study itself
    for lv in report["levels"]:  # each level counted its own folder's boundary
        if lv["dimension"] is not None:
            assert lv["box_counts"][0] == pytest.approx(boundary_pixels(lv["dir"]))
    measured = [lv["level"] for lv in report["levels"] if lv["dimension"] is not None]
    pooled = report["pooled"]
    assert measured[:1] == [0]  # the study itself has both classes
    if pooled["dimension"] is None:
        assert pooled["error"]
    else:  # pooled over exactly the measured levels
        assert pooled["levels"] == measured
    assert "level 0" in ok("zoom-dimension", study).stdout
    gif = study / "zoom.gif"
    assert ok("animate", study).stdout.strip().endswith("zoom.gif")
    assert Image.open(gif).n_frames == frame_count(2)  # two levels, with the zoom between them


def test_zoom_needs_exactly_one_of_auto_and_window(study):
    result = cli("zoom", study)
    assert result.exit_code == 2 and "give --auto or --window" in result.stderr
    both = cli("zoom", study, "--auto", "--window", "1e-3", "1e-2", "300", "1000")
    assert both.exit_code == 2 and both.stderr.strip() == (
        "error: zoom: --auto picks the window itself; give --auto or --window X0 X1 Y0 Y1, not both")


def test_rules_and_report(study, tmp_path):
    rules = json.loads(ok("rules", study, "--json", "--plot", tmp_path / "rules.png").stdout)
    assert (tmp_path / "rules.png").stat().st_size > 0
    assert len(rules["sizes"]) == 6  # one row per dataset size of the 6x6 grid
    html = tmp_path / "r.html"
    ok("report", study, "-o", html, "--format", "html")
    text = html.read_text()
    box = json.loads(ok("fractal", study, "--json").stdout)
    assert "data:image/png;base64" in text and "No dimension: " in text and box["too_small"] in text
    assert f"D = {box['dimension']:.3f}" not in text  # a 6x6 map is too small for a number


def test_backend_and_bench_errors_are_one_line(study, tmp_path):
    result = cli(*TINY, "--out", tmp_path / "s", "--backend", "carrier-pigeon")
    assert result.exit_code == 2 and "--backend" in result.stderr
    result = cli(*TINY, "--out", tmp_path / "s", "--workers", "2")
    assert result.exit_code == 2 and "--backend ray" in result.stderr
    import torch

    if not torch.cuda.is_available():
        result = cli("bench", "--depth", "1", "--device", "cuda")
        assert result.exit_code == 2 and "no CUDA device" in result.stderr


def test_resume_with_other_run_settings_is_refused_and_changes_nothing(study):
    before = (study / "study.db").read_bytes()
    result = cli(*TINY, "--out", study, "--micro-batch-size", "2")
    assert result.exit_code == 2 and "micro_batch_size: None -> 2" in result.stderr
    assert (study / "study.db").read_bytes() == before


def test_compile_setting_is_a_run_setting(study, tmp_path, monkeypatch):
    before = (study / "study.db").read_bytes()
    monkeypatch.setenv("VMAP_SWEEP_COMPILE", "1")
    result = cli(*TINY, "--out", study)
    assert result.exit_code == 2 and "compile: '0' -> '1'" in result.stderr
    monkeypatch.setenv("VMAP_SWEEP_COMPILE", "yes")
    result = cli(*TINY, "--out", tmp_path / "new")
    assert result.exit_code == 2 and "VMAP_SWEEP_COMPILE='yes'" in result.stderr and not (tmp_path / "new").exists()
    assert (study / "study.db").read_bytes() == before


def test_stored_run_settings_without_a_field_are_refused_as_edited(study, tmp_path):
    import shutil

    edited = tmp_path / "edited"
    shutil.copytree(study, edited)
    with StudyStore.open(edited) as store:
        runtime = store.get_extra("runtime")
        del runtime["compile"]  # every version records it: a database without it was edited
        store.put_extra("runtime", runtime)
    before = (edited / "study.db").read_bytes()
    result = cli(*TINY, "--out", edited)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "'runtime' holds no 'compile'" in result.stderr and "was edited" in result.stderr, result.stderr
    assert (edited / "study.db").read_bytes() == before


def test_a_study_of_another_arithmetic_is_read_but_never_trained_into(study, tmp_path):
    """Code of one numerics version reads, analyses and exports a study of another, but adds no cell to it (no
    resume, no zoom child): it names the release that trains it, exits 2 and changes nothing."""
    import shutil

    from vmap_sweep.study.settings import NUMERICS

    for stored in (NUMERICS - 1, NUMERICS + 1):
        old = tmp_path / f"old-{stored}"
        shutil.copytree(study, old)
        with StudyStore.open(old) as store:
            runtime = store.get_extra("runtime")
            runtime["numerics"] = stored
            store.put_extra("runtime", runtime)
        before, zooms = (old / "study.db").read_bytes(), sorted(old.glob("zoom-*"))
        for args in ((*TINY, "--out", old), ("run", "--out", old, "--device", "cpu", "--quiet"),
                     ("zoom", old, "--auto", "--device", "cpu", "--quiet")):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.stdout, result.stderr)
            assert f"numerics version {stored}" in result.stderr, result.stderr
            assert f"the vmap-sweep release with numerics {stored}" in result.stderr, result.stderr
            assert (old / "study.db").read_bytes() == before and sorted(old.glob("zoom-*")) == zooms
        assert "converged" in ok("status", old).stdout
        ok("export", old, "-o", tmp_path / f"old-{stored}.csv")
        ok("fractal", old, "--json")


def test_compile_is_automatic_for_large_models_on_gpus_only(monkeypatch):
    import torch

    from vmap_sweep.model.gpt import GPT, GPTConfig
    from vmap_sweep.run.policy import compile_on

    monkeypatch.delenv("VMAP_SWEEP_COMPILE", raising=False)
    small = GPT(GPTConfig.from_depth(2, vocab_size=256)).to("meta")
    large = GPT(GPTConfig.from_depth(12)).to("meta")  # 135M parameters
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [compile_on(d, m) for d in (cpu, gpu) for m in (small, large)] == [False, False, False, True]
    monkeypatch.setenv("VMAP_SWEEP_COMPILE", "0")
    assert not compile_on(gpu, large)
    monkeypatch.setenv("VMAP_SWEEP_COMPILE", "1")
    assert compile_on(cpu, small)
    assert not compile_on(gpu, large, "0") and compile_on(cpu, small, "1")  # a study's stored setting wins


@pytest.mark.parametrize("args, needle", [
    (["--set", "warmup_ratio=5"], "--set warmup_ratio"),
    (["--x", "lr:1e-3:1e-2", "--set", "weight_decay=-1"], "--set weight_decay"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--y", "tokens:10:100:log"], "hold no supervised"),
])
def test_bad_values_are_one_line_and_leave_no_study(tmp_path, args, needle):
    out = tmp_path / "s"
    result = cli(*TINY, "--out", out, *args)
    assert result.exit_code == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_progress_shows_every_batch_in_flight():
    from rich.console import Console

    from vmap_sweep.cli.render import RichProgress
    from vmap_sweep.study.plan import Batch

    progress = RichProgress(Console(file=open(os.devnull, "w"), force_terminal=True))  # noqa: SIM115
    progress.start(total=12, done=0, batches=3)
    for index in (0, 2):
        progress.batch_started(Batch(index, (), 5), 4)
    assert progress.bar.tasks[0].description == "2 batches running (1, 3)"
    progress.batch_done(Batch(0, (), 5), [], 1.0)
    assert progress.bar.tasks[0].description.startswith("batch 3/3")
    progress.finish()


# ------------------------------------------------------------------------------------------------ messages a
# researcher reads without the source: each number or verdict checked against what it claims


def test_zoom_dimension_without_a_zoom_says_so_and_how_to_make_one(study, tmp_path):
    import shutil
    import sqlite3

    solo = tmp_path / "solo"  # the study as it is before any zoom (another test may have zoomed the fixture)
    shutil.copytree(study, solo, ignore=shutil.ignore_patterns("zoom-*", "*.gif"))
    with sqlite3.connect(solo / "study.db") as conn:
        conn.execute("DELETE FROM children")
    conn.close()
    report = json.loads(ok("zoom-dimension", solo, "--json").stdout)
    assert [lv["level"] for lv in report["levels"]] == [0]
    text = ok("zoom-dimension", solo).stdout
    level = report["levels"][0]
    assert level["too_small"] and f"level 0: no dimension, {' '.join(level['too_small'].split())}" in " ".join(
        text.split())
    assert "no zoom level below this study" in text and f"vmap-sweep zoom {solo} --auto" in " ".join(text.split())
    assert "pooled over" not in text and "n/a" not in text


def test_zoom_dimension_lines_pool_only_two_or_more_levels():
    from dataclasses import replace

    from vmap_sweep.analysis.chain import ChainDimensions, LevelDimension, PooledDimension
    from vmap_sweep.present.tables import zoom_dimension_lines

    level = LevelDimension(0, Path("s"), (1e-5, 1e-3, 1e4, 1e6), 1.0, 1.0, 1.0, (256, 256), dimension=1.14,
                           ci_low=0.96, ci_high=1.37, octaves=4.2)
    pooled = PooledDimension("pooled", dimension=1.23, stderr=0.04, ci_low=1.1516, ci_high=1.3084, levels=(0, 1))

    def lines(levels, pooled):
        return zoom_dimension_lines(ChainDimensions(tuple(levels), pooled))

    two = lines([level, replace(level, level=1, scale=0.125)], pooled)
    assert two == ["level 0: D = 1.140, 95% CI [0.960, 1.370] at 256×256 over 4.2 octaves, cell scale 1",
                   "level 1: D = 1.140, 95% CI [0.960, 1.370] at 256×256 over 4.2 octaves, cell scale 0.125",
                   "pooled over levels 0, 1: D = 1.230, 95% CI [1.152, 1.308] (± 1.96 × the pooled standard "
                   "uncertainty 0.040: levels weighted by their own, never below the best level's)"]
    coarse = replace(level, warnings=("the fit spans 1.6 octaves",))
    assert lines([coarse, level], pooled)[0].endswith("cell scale 1; warning: the fit spans 1.6 octaves")
    assert 1.23 + 1.96 * 0.04 == pytest.approx(1.3084)  # the CI the line says it is
    no_se = lines([level, level], replace(pooled, stderr=None, ci_low=None, ci_high=None))
    assert no_se[-1] == "pooled over levels 0, 1: D = 1.230, no CI (too few box counts for a standard error)"
    apart = lines([level, level], PooledDimension("levels_disagree", agreement_p=0.001,
                                                  error="the levels disagree (p = 0.001)"))
    assert apart[-1] == "not pooled: the levels disagree (p = 0.001)"
    small = replace(level, too_small="too small a map to measure a dimension")
    assert lines([small, level], pooled)[0] == (
        "level 0: no dimension, too small a map to measure a dimension; cell scale 1")
    unmeasured = LevelDimension(1, Path("s/zoom-1"), (1e-5, 1e-4, 1e4, 1e5), 0.5, 0.5, 0.5, (256, 256),
                                error="one class only")
    assert lines([level, unmeasured], pooled)[1] == "level 1: not measurable (one class only)"
    one = lines([level], replace(pooled, stderr=None, levels=(0,)))
    assert len(one) == 2 and "nothing to pool" in one[1] and "`vmap-sweep zoom s --auto`" in one[1]


def test_fractal_names_the_ci_and_its_terms_and_what_the_grid_resolves(study):
    box = json.loads(ok("fractal", study, "--json").stdout)
    text = " ".join(ok("fractal", study).stdout.split())
    # a 6x6 study is too small a map for a number: it says so, and shows what it counted
    assert box["too_small"] and f"no box-counting dimension: {' '.join(box['too_small'].split())}" in text
    assert f"{box['dimension']:.3f}," not in text
    lo, hi = box["fit_range"]
    assert f"fit over box sizes {lo}–{hi} ({box['octaves']:.1f} octaves" in text
    for warning in box["warnings"]:
        assert f"warning: {' '.join(warning.split())}" in text


def test_fractal_lines_warn_and_handle_two_box_sizes():
    from vmap_sweep.present.tables import fractal_lines

    box = {"dimension": 1.128, "stderr": 0.02, "ci_low": 1.128 - 1.96 * 0.02, "ci_high": 1.128 + 1.96 * 0.02,
           "fit_range": [2, 6], "resolution": [32, 32], "box_sizes": [1, 2], "box_counts": [3.0, 1.0],
           "octaves": 1.58, "windows": [[2, 6]], "local_slope_range": [0.9, 1.3],
           "warnings": ["the fit spans 1.6 octaves of box size (under 2)"]}
    lines = [line.plain for line in fractal_lines(box)]
    assert lines[0] == ("box-counting dimension 1.128, 95% CI [1.089, 1.167] at 32×32 over 1.6 octaves (± 1.96 × "
                        "standard uncertainty 0.020)")
    assert lines[1] == ("fit over box sizes 2–6 (1.6 octaves, 1 fit window) at 32×32; local slopes 0.90–1.30 "
                        "inside the fit")
    assert lines[2] == "warning: the fit spans 1.6 octaves of box size (under 2)"
    first = fractal_lines({**box, "stderr": float("nan")})[0].plain
    assert "nan" not in first and "no standard uncertainty from 2 box sizes" in first
    terms = fractal_lines({**box, "window_sd": 0.001, "lattice_sd": 0.002, "model_sd": 0.003, "curvature_sd": 0.004})
    assert ("fit-window spread 0.001, lattice placement 0.002, small-box correction 0.003, curvature 0.004, "
            "end effects") in terms[0].plain
    small = [line.plain for line in fractal_lines({**box, "too_small": "too small a map to measure a dimension"})]
    assert small[0] == "no box-counting dimension: too small a map to measure a dimension"
    assert not any("1.128" in line for line in small)  # no number printed, the grid and box counts still are
    assert small[1].startswith("fit over box sizes 2–6")


def _bench_result(tflops: float, peak: float):
    from vmap_sweep.run.bench import BenchResult

    return BenchResult(depth=1, n_embd=64, params=1000, models=2, tokens_per_step=64, micro_batch_size=None,
                       trainable=("all",), optimizer_state_dtype="float32", compile=False,
                       checkpoint_activations=False, checkpoint_blocks=None, steps=1, baseline_cell_s=1.0,
                       stacked_cell_s=0.5, speedup=2.0, baseline_step_s=1.0, stacked_step_s=1.0,
                       stacked_tflops=2 * tflops, baseline_tflops=tflops, peak_memory_gb=peak, baseline_variants={})


def test_bench_on_a_cpu_prints_no_memory_number_and_a_nonzero_rate(monkeypatch):
    import vmap_sweep.run.bench as bench_module

    monkeypatch.setattr(bench_module, "bench", lambda *a, **k: _bench_result(1.23e-3, float("nan")))
    text = ok("bench", "--device", "cpu", "--depth", "1").stdout
    assert "GFLOP/s" in text and "1.23" in text and "2.46" in text and "0.0 " not in text
    assert "peak memory not measured (only a CUDA device reports it)" in " ".join(text.split())
    assert "nan" not in text
    from rich.console import Console

    from vmap_sweep.cli.render import bench_lines

    console = Console(record=True, width=200)
    for item in bench_lines(_bench_result(212.34, 37.26)):
        console.print(item)
    text = console.export_text()
    assert "TFLOP/s" in text and "212.3" in text and "424.7" in text
    assert "peak GPU memory of the stacked run 37.3 GB" in text


def test_bench_measures_peak_memory_on_cuda_only_and_the_rate_from_the_time(monkeypatch):
    import math

    import vmap_sweep.run.bench as bench_module
    from vmap_sweep.model.gpt import GPTConfig

    monkeypatch.setattr(bench_module, "time_stacked", lambda model, k, cfg, steps, dev: 2.0 * steps)
    monkeypatch.setattr(bench_module, "best_baseline", lambda *a, **k: (4.0, {"eager": 4.0}))
    r = bench_module.bench(1, 2, tokens_per_step=64, seq_len=32, vocab=256, steps=2, device="cpu")
    flops = GPTConfig.from_depth(1, vocab_size=256, sequence_len=32).flops_per_token(32) * 64
    assert math.isnan(r.peak_memory_gb)  # no allocator to ask on a CPU: not a measured zero
    assert r.stacked_tflops == pytest.approx(2 * flops / 2.0 / 1e12) and r.stacked_tflops > 0
    assert r.baseline_tflops == pytest.approx(flops * 2 / 4.0 / 1e12)
