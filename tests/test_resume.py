"""A run killed with SIGKILL mid-study restarts with the same command and ends exactly where an uninterrupted
run ends: no cell lost, none trained twice, every result bit for bit the same.

Real processes (the CLI in a subprocess) because SIGKILL can't be caught: whatever the store had not
committed is lost, and the next run must cope with that.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import cli
from helpers import bits

from vmap_sweep.store.db import StudyStore

REPO = Path(__file__).resolve().parents[1]
# 8 batches of 2 models, 8 to 32 steps: long enough to kill between the first commit and the last.
ARGS = ["run", "--preset", "tiny", "--resolution", "4", "--y", "tokens:2048:8192:log", "--eval-tokens", "256",
        "--models-per-batch", "2", "--device", "cpu", "--quiet"]
CELLS = 16
FIELDS = ("steps", "steps_done", "initial_loss", "final_loss", "eval_loss", "unstable", "unstable_step", "label",
          "score", "batch_index")
ARRAYS = ("trajectory", "base_losses", "grad_norms", "lrs")


@pytest.fixture(scope="module", autouse=True)
def pretrained(shared_model_cache):
    """Pretrain the tiny model here once, so the two subprocesses don't race to build it."""
    from vmap_sweep.train.tiny import tiny_base_model

    tiny_base_model()
    return shared_model_cache


def start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", "from vmap_sweep.cli import app; app()", *ARGS, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return stdout, stderr


def done_cells(db: Path) -> int:
    """Committed cells, read beside the writer (WAL lets a reader in); 0 before the schema exists."""
    try:
        conn = sqlite3.connect(db, timeout=1.0)
        try:
            return conn.execute("SELECT count(*) FROM cells WHERE status='done'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def wait_for_a_commit(proc: subprocess.Popen, out: Path) -> None:
    """Until the running study in `out` has stored its first batch."""
    deadline = time.monotonic() + 240
    while done_cells(out / "study.db") < 1:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no batch committed in time"
        time.sleep(0.02)


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    reference = start(tmp_path / "reference")
    victim = start(tmp_path / "killed")
    db = tmp_path / "killed" / "study.db"
    wait_for_a_commit(victim, tmp_path / "killed")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    ref_out, _ = finish(reference)
    assert re.search(rf"trained this run\s*│\s*{CELLS} cells", ref_out)

    # the stopped study: status reads it (and the committed batches survived the kill)
    status = cli("status", tmp_path / "killed")
    assert status.exit_code == 0, status.stderr
    m = re.search(r"cells done\s*│\s*(\d+)/16", status.stdout)
    assert m, status.stdout
    stored = int(m.group(1))
    assert 0 < stored < CELLS, "the kill was meant to land mid-study"

    # a different config is refused, naming what differs, and leaves the study as it was
    before = db.read_bytes()
    refused = cli(*ARGS, "--seed", "7", "--out", tmp_path / "killed")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "seed: 42 -> 7" in refused.stderr
    assert db.read_bytes() == before

    # the same command continues: only the missing cells are trained (a cell trained twice would be refused
    # by the store, failing the run), then the study equals the uninterrupted one bit for bit
    out, err = finish(start(tmp_path / "killed"))
    assert f"resuming: {stored}/{CELLS} cells already stored" in err
    assert re.search(rf"trained this run\s*│\s*{CELLS - stored} cells", out), out
    with StudyStore.open(tmp_path / "killed") as resumed, StudyStore.open(tmp_path / "reference") as ref:
        assert resumed.done_count() == ref.done_count() == CELLS and not resumed.pending()
        assert resumed.integrity_check() == "ok"
        a, b = resumed.rows(arrays=True), ref.rows(arrays=True)
    for x, y in zip(a, b, strict=True):
        assert (x["i"], x["j"], x["hparams"]) == (y["i"], y["j"], y["hparams"])
        for f in ARRAYS:
            assert len(x[f]) > 0 and np.array_equal(bits(x[f]), bits(y[f])), (x["i"], x["j"], f)
        for f in FIELDS:
            if isinstance(x[f], float):
                assert np.array_equal(bits(x[f]), bits(y[f])), (x["i"], x["j"], f)
            else:
                assert x[f] == y[f], (x["i"], x["j"], f)


def test_rerunning_a_finished_study_trains_nothing(tmp_path):
    out = tmp_path / "s"
    args = [*ARGS[:3], "--resolution", "2", *ARGS[5:], "--out", str(out)]
    first = cli(*args)
    assert first.exit_code == 0, first.stderr
    with StudyStore.open(out) as store:
        rows = store.rows(arrays=True)
    again = cli(*args)
    assert again.exit_code == 0, again.stderr
    assert "all 4 cells are already stored" in again.stderr and "trained this run" not in again.stdout
    assert "batch " not in again.stderr  # no batch ran
    with StudyStore.open(out) as store:
        assert [(r["finished_at"], bits(r["trajectory"]).tolist()) for r in store.rows(arrays=True)] == \
            [(r["finished_at"], bits(r["trajectory"]).tolist()) for r in rows]


def test_a_second_run_on_a_study_in_use_is_refused_at_once(tmp_path):
    """Two trainers of one study: the second is refused before it trains anything, naming the first, whose run
    finishes untouched; a process killed while training leaves no lock behind."""
    out = tmp_path / "study"
    first = start(out)
    deadline = time.monotonic() + 240
    while not (out / "study.lock").exists() or not (out / "study.lock").read_text():
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "the first run never started training"
        time.sleep(0.02)
    t = time.monotonic()
    second = cli(*ARGS, "--out", out)
    assert second.exit_code == 2 and time.monotonic() - t < 30, second.stderr
    assert f"is being trained by pid {first.pid}" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    also = cli("run", "--out", out, "--device", "cpu", "--quiet")  # resuming from the folder alone: refused too
    assert also.exit_code == 2 and "is being trained by" in also.stderr
    out_text, _ = finish(first)
    assert re.search(rf"trained this run\s*│\s*{CELLS} cells", out_text)  # nothing was lost to the refusals

    victim = start(tmp_path / "killed")
    wait_for_a_commit(victim, tmp_path / "killed")
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    resumed = cli(*ARGS, "--out", tmp_path / "killed")
    assert resumed.exit_code == 0, resumed.stderr  # the OS released the dead process's lock


def test_a_run_whose_database_vanishes_stops_with_an_error(tmp_path):
    """study.db deleted while run trains: the run stops at its next commit, exit 2, saying what happened, instead
    of training on into an unlinked file and reporting success."""
    out = tmp_path / "study"
    proc = start(out)
    wait_for_a_commit(proc, out)
    for name in ("study.db", "study.db-wal", "study.db-shm"):
        (out / name).unlink(missing_ok=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    assert "was deleted or replaced while this process had it open" in stderr
    assert "study stored in" not in stdout


def test_classify_during_a_run_is_followed_by_every_cell_after_it(tmp_path):
    """classify --criterion threshold while run trains: the cells stored before it are relabelled, and every
    batch committed after it is labelled by threshold too, so the finished study follows one criterion."""
    from vmap_sweep.analysis.classify import classify_rows
    from vmap_sweep.store.extras import criterion

    out = tmp_path / "study"
    proc = start(out)
    wait_for_a_commit(proc, out)
    result = cli("classify", out, "--criterion", "threshold", "--converged-below", "3")
    assert result.exit_code == 0, result.stderr
    finish(proc)
    with StudyStore.open(out) as store:
        assert criterion(store) == {"criterion": "threshold", "converged_below": 3.0, "not_converged_above": 10.0}
        stored = {(r["i"], r["j"]): r["label"] for r in store.rows() if r["status"] == "done"}
        again = classify_rows(store.rows(arrays=True), "threshold", converged_below=3.0, not_converged_above=10.0)
    assert len(stored) == CELLS and stored == {key: label for key, (label, _) in again.items()}
