"""What `run` shows while it trains: log lines when the output is not a terminal, an ETA weighted by
model-steps, a resume hint on Ctrl-C, the diverged count of a resumed study, a finished study's one line."""

import io
import os
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
        assert re.fullmatch(STAMP + rf"batch {i}/4: 4 cells in .*, {4 * i}/16 done, \d+ not converged, .* cells/min, "
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
    progress.batch_done(big, ["not_converged"] * 4, 320.0)
    assert progress.eta_seconds() == 0
    lines = out.getvalue().splitlines()  # never wrapped, though longer than the console
    assert len(lines) == 3 and all(re.match(STAMP, line) for line in lines), lines
    assert lines[1].endswith("4/8 done, 0 not converged, 24.0 cells/min, ETA 5.3 min"), lines[1]
    assert lines[2].endswith("8/8 done, 4 not converged, 1.5 cells/min, ETA 0 s"), lines[2]


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
        diverged = store.label_counts().get("not_converged", 0)
    monkeypatch.setattr(RichProgress, "batch_done", real)
    for measure in ("fractal", "rules"):  # what has no map yet names the command that finishes it
        refused = cli(measure, out)
        assert refused.exit_code == 2, refused.output
        assert f"8 cells are pending; `vmap-sweep run --out {out}` resumes its run" in refused.output.replace("\n", "")
    with StudyStore.open(out) as holder:  # while a run trains it, resuming is refused: the message says to wait
        holder.claim_writer()
        training = cli("rules", out)
    assert training.exit_code == 2 and training.stderr.replace("\n", "").endswith(
        f"8 cells are pending; they are being trained now (`vmap-sweep status {out}` shows the run); wait for it "
        "to finish"), training.stderr

    result = ok("run", "--out", out, "--device", "cpu")  # the hint's command
    lines = _lines(result.stderr)
    assert re.search(rf"resuming: 8/16 cells already stored, {diverged} not converged; training 8 cells", lines[0])
    with StudyStore.open(out) as store:
        total = store.label_counts().get("not_converged", 0)
    assert f"16/16 done, {total} not converged" in lines[-1], lines[-1]  # stored before the stop, and since


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


# ------------------------------------------------------------------ an ETA that learns from finished batches
def _costs(batches, per_token=0.01, per_cell=2.0, startup=30.0):
    """What each batch takes on a machine where a token costs per_token, a cell's read-out and eval per_cell, and
    the first batch also pays for start-up."""
    return [per_token * w + per_cell * c + (startup if k == 0 else 0.0) for k, (w, c) in enumerate(batches)]


def test_the_eta_learns_what_a_token_and_a_cell_cost_and_leaves_start_up_out():
    from vmap_sweep.run.eta import EtaModel, Work

    batches = [(1000, 32), (1000, 32), (4000, 32), (8000, 16), (16000, 8), (200, 32)]
    seconds = _costs(batches)
    eta = EtaModel([Work(w, c) for w, c in batches])
    for k in range(3):
        eta.observe(Work(*batches[k]), seconds[k])
    truth = sum(seconds[3:])
    assert eta.seconds_left() == pytest.approx(truth, rel=1e-6)
    assert eta.coefficients() == pytest.approx((0.01, 2.0))
    # the estimate it replaces (work done / time since the start, model-steps alone) misses by 3x here
    old = sum(w for w, _ in batches[3:]) * sum(seconds[:3]) / sum(w for w, _ in batches[:3])
    assert old / truth > 3


def test_before_two_later_batches_the_eta_is_the_work_rate_and_proportional_batches_stay_so():
    from vmap_sweep.run.eta import EtaModel, Work

    eta = EtaModel([Work(100, 4)] * 4)
    assert eta.seconds_left() is None
    eta.observe(Work(100, 4), 50.0)  # only the first: its rate, start-up and all
    assert eta.seconds_left() == pytest.approx(150.0)
    eta.observe(Work(100, 4), 10.0)  # a later one replaces it
    assert eta.seconds_left() == pytest.approx(20.0)
    eta.observe(Work(100, 4), 12.0)  # same shape as the last: no split into token and cell costs, the mean rate
    assert eta.seconds_left() == pytest.approx(11.0)
    eta.observe(Work(100, 4), 12.0)
    assert eta.seconds_left() == 0


def test_the_run_log_eta_follows_the_learnt_costs(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(render.time, "perf_counter", clock)
    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=200), quiet=True)
    shapes = [(2, 16), (2, 16), (8, 16), (32, 4), (64, 2)]  # (steps, models): short budgets in many cells first
    plan = [Batch(k, (), steps, lanes=((),) * models) for k, (steps, models) in enumerate(shapes)]
    from vmap_sweep.run.eta import batch_work

    work = [batch_work(b, len(b.lanes)) for b in plan]
    seconds = _costs([(w.tokens, w.cells) for w in work], per_token=0.5, per_cell=3.0, startup=40.0)
    progress.start(sum(len(b.lanes) for b in plan), 0, len(plan), model_steps=sum(b.model_steps for b in plan),
                   work=work)
    for k, b in enumerate(plan[:3]):
        clock.now += seconds[k]
        progress.batch_done(b, ["converged"] * len(b.lanes), seconds[k])
    assert progress.eta_seconds() == pytest.approx(sum(seconds[3:]))
    assert out.getvalue().splitlines()[-1].endswith(f"ETA {render.duration(sum(seconds[3:]))}")


# ------------------------------------------------------------------ status shows a live run
def test_status_shows_the_run_in_progress_with_its_batch_and_eta(tmp_path, monkeypatch):
    out = tmp_path / "s"
    real = RichProgress.batch_done
    seen = []

    def status_after_two(self, batch, labels, elapsed):
        real(self, batch, labels, elapsed)
        if self.trained == 8:  # while the run holds the study: another command reads it
            seen.append(ok("status", out).stdout)

    monkeypatch.setattr(RichProgress, "batch_done", status_after_two)
    _run(out)
    text = " ".join(seen[0].replace("│", " ").split())
    assert re.search(rf"training now pid {os.getpid()} on \S+ since [\dT:+-]+: between batches \(of 4\), "
                     r"8/16 cells stored, ETA [\d.]+ (s|min|h) \(as of [\dT:+-]+\)", text), seen[0]
    after = " ".join(ok("status", out).stdout.replace("│", " ").split())
    assert "training now no (no process holds the study's lock)" in after


def test_a_published_batch_in_flight_and_a_second_trainer_is_told_the_holder_only(tmp_path):
    from helpers import new_store

    from vmap_sweep.errors import StoreError
    from vmap_sweep.store.db import live_run

    with new_store(tmp_path) as store:
        assert live_run(store.directory) is None
        store.claim_writer()
        store.publish_progress({"batch": [3], "batches": 5, "done": 7, "total": 12, "eta_seconds": 95.0,
                                "updated": "2026-12-06T08:00:00+00:00"})
        live = live_run(store.directory)
        assert live["holder"].startswith(f"pid {os.getpid()} on ") and live["done"] == 7
        assert render.live_run_line(live).endswith(": batch 3/5, 7/12 cells stored, ETA 1.6 min "
                                                   "(as of 2026-12-06T08:00:00+00:00)")
        with StudyStore.open(store.directory) as second, pytest.raises(StoreError) as e:
            second.claim_writer()
        assert "\n" not in str(e.value) and "eta_seconds" not in str(e.value)
        assert f"is being trained by pid {os.getpid()} on " in str(e.value)
    assert live_run(tmp_path / "study") is None  # closed: the lock is free, whatever the file still says
