"""What `run` shows while it trains: log lines when the output is not a terminal, an ETA weighted by
model-steps, a resume hint on Ctrl-C, the diverged count of a resumed study, a finished study's one line."""

import io
import re

import pytest
from cli_helpers import cli, ok
from rich.console import Console

from vmap_sweep.cli import render
from vmap_sweep.cli.render import RichProgress
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.plan import Batch

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d "  # ISO, seconds
TINY = ("--preset", "tiny", "--resolution", "4", "--y", "tokens:256:1024:log", "--eval-tokens", "512",
        "--models-per-batch", "4", "--device", "cpu", "--no-share")


def _run(path, *extra):
    return ok("run", *TINY, *extra, "--out", path)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(STAMP, line)]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_not_a_terminal_logs_timestamped_lines_with_an_eta(tmp_path):
    result = _run(tmp_path / "s")  # CliRunner's output is not a terminal: no bar, one line per batch
    lines = _lines(result.stderr)
    assert len(lines) == 5, result.stderr  # the plan, then 4 batches
    assert re.fullmatch(STAMP + r"training 16 cells \(\d+ model-steps\) in 4 batches, ETA after the first batch",
                        lines[0]), lines[0]
    for i, line in enumerate(lines[1:], 1):
        assert re.fullmatch(STAMP + rf"batch {i}/4: 4 cells in .*, {4 * i}/16 done, \d+ diverged, .* cells/min, "
                            r"ETA [\d.]+ (s|min|h)", line), line
    assert lines[-1].endswith("ETA 0 s")
    assert "━" not in result.stderr  # no bar drawn into the log


def test_a_terminal_gets_the_bar_and_quiet_still_logs():
    tty = RichProgress(Console(file=io.StringIO(), force_terminal=True))
    assert not tty.quiet
    assert RichProgress(Console(file=io.StringIO(), force_terminal=True), quiet=True).quiet
    assert RichProgress(Console(file=io.StringIO(), force_terminal=False)).quiet


def test_eta_is_weighted_by_model_steps(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(render.time, "perf_counter", clock)
    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=60), quiet=True)
    small, big = Batch(0, (), 2, lanes=((),) * 4), Batch(1, (), 64, lanes=((),) * 4)  # 8 and 256 model-steps
    progress.start(8, 0, 2, model_steps=small.model_steps + big.model_steps)
    assert progress.eta_seconds() is None
    clock.now += 10
    progress.batch_done(small, ["converged"] * 4, 10.0)
    # 8 model-steps in 10 s: the 256 left take 320 s, not the 10 s one more batch (or 4 more cells) would
    assert progress.eta_seconds() == pytest.approx(320)
    clock.now += 20
    assert progress.eta_seconds() == pytest.approx(300)  # counts down between batches (the live bar)
    clock.now += 300
    progress.batch_done(big, ["diverged"] * 4, 320.0)
    assert progress.eta_seconds() == 0
    lines = out.getvalue().splitlines()  # never wrapped, though longer than the console
    assert len(lines) == 3 and all(re.match(STAMP, line) for line in lines), lines
    assert lines[1].endswith("4/8 done, 0 diverged, 24.0 cells/min, ETA 5.3 min"), lines[1]
    assert lines[2].endswith("8/8 done, 4 diverged, 1.5 cells/min, ETA 0 s"), lines[2]


def test_the_bar_shows_the_weighted_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(render.time, "perf_counter", clock)
    out = io.StringIO()
    progress = RichProgress(Console(file=out, force_terminal=True, width=200))
    progress.start(8, 0, 2, model_steps=8 + 256)
    clock.now += 10
    progress.batch_done(Batch(0, (), 2, lanes=((),) * 4), ["converged"] * 4, 10.0)
    progress.bar.refresh()
    progress.finish()
    assert "ETA 5.3 min" in out.getvalue()


def test_ctrl_c_says_how_to_resume_and_the_diverged_count_goes_on(tmp_path, monkeypatch):
    out = tmp_path / "s"
    real = RichProgress.batch_done

    def interrupt_after_two(self, batch, labels, elapsed):
        real(self, batch, labels, elapsed)
        if self.trained == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(RichProgress, "batch_done", interrupt_after_two)
    result = cli("run", *TINY, "--out", out)
    assert result.exit_code == 130, (result.stderr, result.exception)
    assert "Traceback" not in result.output and "Aborted" not in result.output
    assert f"interrupted: 8 of 16 cells are stored in {out}; `vmap-sweep run --out {out} --device cpu` resumes it" \
        in result.stderr.replace("\n", ""), result.stderr
    with StudyStore.open(out) as store:
        diverged = store.label_counts().get("diverged", 0)
    monkeypatch.setattr(RichProgress, "batch_done", real)

    result = ok("run", "--out", out, "--device", "cpu")  # the hint's command
    lines = _lines(result.stderr)
    assert re.search(rf"resuming: 8/16 cells already stored, {diverged} diverged; training 8 cells", lines[0])
    with StudyStore.open(out) as store:
        total = store.label_counts().get("diverged", 0)
    assert f"16/16 done, {total} diverged" in lines[-1], lines[-1]  # stored before the stop, and since


def test_a_finished_study_prints_one_line_not_an_empty_bar(tmp_path):
    out = tmp_path / "s"
    _run(out)
    result = ok("run", "--out", out, "--device", "cpu")
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].endswith(f"all 16 cells are already stored in {out}"), result.stderr
    assert "cells done" in result.stdout  # the summary table stays


def test_interrupted_line_names_the_options_a_resume_repeats(tmp_path):
    from vmap_sweep.study.settings import RunSettings

    settings = RunSettings(device="cuda", micro_batch_size=2, deterministic=True)
    line = render.interrupted_line(tmp_path / "shard-1-of-3", 5, 9, (1, 3), settings)
    assert line.endswith(f"`vmap-sweep run --out {tmp_path} --shard 1/3 --micro-batch-size 2 --deterministic` "
                         "resumes it")
    assert "before" in render.interrupted_line(tmp_path, None, None)
