"""`vmap-sweep run --out DIR` alone resumes the study in DIR: its config, run settings and batching come from the
study, and an option given that differs from the study's is refused, naming it."""

from __future__ import annotations

import re
import sqlite3

import numpy as np
from cli_helpers import cli, ok
from helpers import bits, snapshot

from vmap_sweep.store.db import RESULT_COLUMNS, StudyStore

# every one of these differs from the tiny preset's or the command line's default
STARTED = ["run", "--preset", "tiny", "--resolution", "4x2", "--y", "tokens:256:512:log", "--eval-tokens", "256",
           "--seed", "3", "--models-per-batch", "4", "--micro-batch-size", "2", "--no-share", "--device", "cpu",
           "--quiet"]
ROW_LOST = 1  # the row of cells a crash lost (the second of two batches)


def results(folder) -> dict:
    with StudyStore.open(folder) as store:
        return {(r["i"], r["j"]): r for r in store.rows(arrays=True)}


def lose_a_row(folder) -> None:
    """The study as a run killed before its last batch committed leaves it."""
    conn = sqlite3.connect(folder / "study.db")
    nulls = ", ".join(f"{c}=NULL" for c in RESULT_COLUMNS)
    conn.execute(f"UPDATE cells SET status='pending', {nulls}, label=NULL, score=NULL, batch_index=NULL, "
                 f"finished_at=NULL, wall_time=NULL WHERE j={ROW_LOST}")
    conn.commit()
    conn.close()


def test_run_with_only_the_folder_resumes_with_the_studys_own_options(tmp_path):
    out = tmp_path / "study"
    ok(*STARTED, "--out", out)
    whole = results(out)
    lose_a_row(out)
    assert sum(r["status"] == "pending" for r in results(out).values()) == 4

    ok("run", "--out", out, "--quiet")
    resumed = results(out)
    assert resumed.keys() == whole.keys()
    for key, r in resumed.items():
        assert r["status"] == "done" and r["label"] == whole[key]["label"], key
        assert r["batch_index"] == whole[key]["batch_index"], key  # batched as the study was: 4 models a batch
        for f in ("trajectory", "base_losses", "grad_norms", "lrs", "final_loss", "eval_loss"):
            assert np.array_equal(bits(r[f]), bits(whole[key][f])), (key, f)  # with its micro-batches: same bits

    before = snapshot(out)
    for extra, needle in ((["--seed", "4"], "seed: 3 -> 4"), (["--resolution", "4"], 'resolution: "4x2" -> "4"'),
                          (["--micro-batch-size", "1"], "micro_batch_size: 2 -> 1"),
                          (["--preset", "tiny"], 'resolution: "4x2" -> "32"')):
        result = cli("run", "--out", out, *extra)
        assert result.exit_code == 2 and needle in result.stderr, (extra, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_a_dry_run_on_a_study_plans_only_what_is_left(tmp_path):
    out = tmp_path / "study"
    ok(*STARTED, "--out", out)
    finished = ok("run", "--out", out, "--dry-run")
    assert f"{out}: every one of the plan's 8 cells is stored; nothing to train" in finished.stdout.replace("\n", "")
    lose_a_row(out)
    before = snapshot(out)
    text = re.sub(r"[\s│┃|]+", " ", ok("run", "--out", out, "--dry-run").stdout)
    # the lost row is one batch of 4 models (one row of learning rates): that batch, not the study's two
    assert "cells 4 to train (4 of the plan's 8 are stored)" in text and "batches 1 of up to 4 models" in text, text
    assert snapshot(out) == before
