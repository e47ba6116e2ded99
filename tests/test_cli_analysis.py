"""The analysis commands end to end on one real tiny study: zoom, zoom-dimension, animate, rules, report,
and the options that need an optional extra or a GPU (clear error, exit 2)."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import boundary_pixels, cli, ok
from PIL import Image

from vmap_sweep.store.db import StudyStore

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
    assert Image.open(gif).n_frames == 2


def test_zoom_needs_exactly_one_of_auto_and_window(study):
    result = cli("zoom", study)
    assert result.exit_code == 2 and "give --auto or --window" in result.stderr


def test_rules_and_report(study, tmp_path):
    rules = json.loads(ok("rules", study, "--json", "--plot", tmp_path / "rules.png").stdout)
    assert (tmp_path / "rules.png").stat().st_size > 0
    assert len(rules["sizes"]) == 6  # one row per dataset size of the 6x6 grid
    html = tmp_path / "r.html"
    ok("report", study, "-o", html, "--format", "html")
    text = html.read_text()
    dimension = json.loads(ok("fractal", study, "--json").stdout)["dimension"]
    assert "data:image/png;base64" in text and f"D = {dimension:.3f}" in text


def test_backend_and_bench_errors_are_one_line(study, tmp_path):
    result = cli(*TINY, "--out", tmp_path / "s", "--backend", "carrier-pigeon")
    assert result.exit_code == 2 and "--backend" in result.stderr
    result = cli(*TINY, "--out", tmp_path / "s", "--workers", "2")
    assert result.exit_code == 2 and "--backend ray" in result.stderr
    import torch

    if not torch.cuda.is_available():
        result = cli("bench", "--depth", "1")
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


def test_a_study_from_before_the_compile_setting_resumes_as_eager(study, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(study, old)
    with StudyStore.open(old) as store:
        runtime = store.get_extra("runtime")
        del runtime["compile"]  # what studies stored before the setting existed
        store.put_extra("runtime", runtime)
    ok(*TINY, "--out", old)


def test_a_study_of_another_arithmetic_is_read_but_never_trained_into(study, tmp_path):
    """Code of one numerics version reads, analyses and exports a study of another, but adds no cell to it (no
    resume, no zoom child): it names the release that trains it, exits 2 and changes nothing."""
    import shutil

    from vmap_sweep.study.settings import NUMERICS

    newer = (NUMERICS + 1, f"numerics {NUMERICS + 1}")
    for stored, release in ((3, "vmap-sweep<0.2"), (None, "vmap-sweep<0.2"), newer):
        old = tmp_path / f"old-{stored}"
        shutil.copytree(study, old)
        with StudyStore.open(old) as store:
            runtime = store.get_extra("runtime")
            if stored is None:
                del runtime["numerics"]  # what studies stored before the version was recorded: the first one
            else:
                runtime["numerics"] = stored
            store.put_extra("runtime", runtime)
        before, zooms = (old / "study.db").read_bytes(), sorted(old.glob("zoom-*"))
        for args in ((*TINY, "--out", old), ("run", "--out", old, "--device", "cpu", "--quiet"),
                     ("zoom", old, "--auto", "--device", "cpu", "--quiet")):
            result = cli(*args)
            assert result.exit_code == 2, (args, result.stdout, result.stderr)
            assert f"numerics version {stored or 1}" in result.stderr and release in result.stderr, result.stderr
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

    progress = RichProgress(Console(file=open(os.devnull, "w")))  # noqa: SIM115
    progress.start(total=12, done=0, batches=3)
    for index in (0, 2):
        progress.batch_started(Batch(index, (), 5), 4)
    assert progress.bar.tasks[0].description == "2 batches running (1, 3)"
    progress.batch_done(Batch(0, (), 5), [], 1.0)
    assert progress.bar.tasks[0].description.startswith("batch 3/3")
    progress.finish()
