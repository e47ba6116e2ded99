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
                          (["--preset", "tiny"], 'resolution: "4x2" -> "32"'),
                          (["--no-packing"], "(packing: true -> false)"),  # as the study means it, not <missing>
                          (["--set", "weight_decay=0.1"], '(fixed.weight_decay: "<missing>" -> 0.1)')):
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


def test_a_shard_resumes_from_its_own_folder_as_that_shard_and_its_parent_is_not_a_study(tmp_path):
    base = tmp_path / "split"
    ok(*STARTED, "--shard", "1/2", "--out", base)
    part = base / "shard-1-of-2"
    whole = results(part)
    mine = {k for k, r in whole.items() if r["status"] == "done"}
    assert 0 < len(mine) < len(whole) and {whole[k]["shard"] for k in mine} == {"1/2"}
    conn = sqlite3.connect(part / "study.db")  # as a run killed before its last batch leaves it
    nulls = ", ".join(f"{c}=NULL" for c in RESULT_COLUMNS)
    lost = sorted(mine)[-1]
    conn.execute(f"UPDATE cells SET status='pending', {nulls}, label=NULL, score=NULL, batch_index=NULL, "
                 f"finished_at=NULL, wall_time=NULL, shard=NULL WHERE i={lost[0]} AND j={lost[1]}")
    conn.commit()
    conn.close()
    ok("run", "--out", part, "--quiet")  # the shard's own part again, not the whole grid
    resumed = results(part)
    assert {k for k, r in resumed.items() if r["status"] == "done"} == mine
    assert {resumed[k]["shard"] for k in mine} == {"1/2"}
    assert np.array_equal(bits(resumed[lost]["trajectory"]), bits(whole[lost]["trajectory"]))
    before = snapshot(tmp_path)
    for args, line in (
            (["run", "--out", base], f"{base} holds the shards shard-1-of-2, not a study of its own; give --shard K/N "
                                     "to run one, or `vmap-sweep merge` them"),
            (["run", "--out", part, "--shard", "2/2"], f"{part} holds shard 1/2 of its study, not 2/2; give --out "
                                                       f"{base} --shard 2/2 for that part"),
            (["status", base], f"{base}: no study.db here, but the shards shard-1-of-2; give one of them, or "
                               "`vmap-sweep merge` them into one study")):
        refused = cli(*args)
        assert refused.exit_code == 2 and refused.stderr == f"error: {line}\n", (args, refused.stderr)
    assert snapshot(tmp_path) == before
    # the part is the study's own record, not its folder's name: a whole study in such a folder stays whole, and
    # so does a merge of the parts
    whole = tmp_path / "mine" / "shard-1-of-2"
    ok(*STARTED, "--out", whole)
    plan = re.sub(r"[\s│┃|]+", " ", ok("run", "--out", whole, "--dry-run").stdout)
    assert "every one of the plan's 8 cells is stored" in plan
    ok(*STARTED, "--shard", "2/2", "--out", base)
    merged = tmp_path / "merged"
    ok("merge", part, base / "shard-2-of-2", "--out", merged)
    assert "every one of the plan's 8 cells is stored" in ok("run", "--out", merged, "--dry-run").stdout
