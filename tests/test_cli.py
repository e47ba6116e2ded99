"""The `vmap-sweep` CLI end to end on the tiny preset: grid, presets, plan, progress, status, classify, plot,
export, shards and merge, demo, fractal, and the rule for bad input (one line, exit code 2, study untouched).

Studies are tiny (4x4 cells, 1-4 steps, 512 eval tokens) and shared between tests where they are only read.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_helpers import boundary_pixels, cli, ok
from helpers import bits, snapshot

from vmap_sweep.run.estimate import flops_per_model_step
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec
from vmap_sweep.study.config import preset
from vmap_sweep.study.criterion import DISPLAY
from vmap_sweep.study.plan import build_grid, shard_cells

REPO = Path(__file__).resolve().parents[1]
# --no-share: every cell its own model, so that batches are rows of learning rates (sharing has tests of its own)
TINY = ["run", "--preset", "tiny", "--resolution", "4", "--y", "tokens:256:1024:log", "--eval-tokens", "512",
        "--models-per-batch", "4", "--device", "cpu", "--no-share"]
RESULT_FIELDS = ("steps", "steps_done", "initial_loss", "final_loss", "eval_loss", "unstable", "unstable_step")
ARRAY_FIELDS = ("trajectory", "base_losses", "grad_norms", "lrs")
PLOTS = ("score", "stability", "final_loss", "eval_loss", "trajectories")
MAGIC = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}


def one_line_error(result, *needles: str) -> str:
    """Exit code 2 (not 1: no exception escaped), exactly one line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def assert_same_results(a: StudyStore, b: StudyStore) -> None:
    """Every cell's results bit for bit: per-step arrays and scalar losses."""
    ra, rb = a.rows(arrays=True), b.rows(arrays=True)
    assert [(r["i"], r["j"], r["status"]) for r in ra] == [(r["i"], r["j"], r["status"]) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for f in ARRAY_FIELDS:
            assert len(x[f]) > 0 and np.array_equal(bits(x[f]), bits(y[f])), (x["i"], x["j"], f)
        for f in RESULT_FIELDS:
            if f in ("initial_loss", "final_loss", "eval_loss"):
                assert np.array_equal(bits(x[f]), bits(y[f])), (x["i"], x["j"], f)
            else:
                assert x[f] == y[f], (x["i"], x["j"], f)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 4x4 study (LR x tokens, 4 batches of one row each), run once with --quiet; read-only."""
    out = tmp_path_factory.mktemp("base") / "study"
    result = ok(*TINY, "--quiet", "--out", out)
    return out, result


# ------------------------------------------------------------------------------------------------ 1, 2 grid and presets
def test_grid_spec_and_preset_overrides_are_stored(tmp_path):
    out = tmp_path / "s"
    ok("run", "--preset", "tiny", "--x", "lr:1e-3:1e-1:lin", "--y", "tokens:256:512", "--resolution", "3x2",
       "--eval-tokens", "256", "--seed", "5", "--models-per-batch", "8", "--device", "cpu", "--quiet", "--out", out,
       "--batch-size", "2")  # rows per step's older option name, still taken
    tiny = preset("tiny")
    with StudyStore.open(out) as store:
        cfg = store.config
        assert (store.nx, store.ny) == (3, 2)  # NxM: N along x, M along y
        assert cfg["resolution"] == "3x2" and cfg["seed"] == 5 and cfg["eval_tokens"] == 256
        assert cfg["rows_per_step"] == 2 and "batch_size" not in cfg
        assert parse_axis_spec(cfg["x"]) == parse_axis_spec("lr:1e-3:1e-1:lin")
        assert parse_axis_spec(cfg["y"]).scale == "log"  # the tokens axis' default scale
        for key in ("model", "data", "seq_len", "optimizer", "schedule"):
            assert cfg[key] == getattr(tiny, key), key  # what no option overrode comes from the preset
        xs = store.grid_arrays("x")[0]
        ys = store.grid_arrays("y")[:, 0]
    np.testing.assert_array_equal(xs, np.linspace(1e-3, 1e-1, 3))
    np.testing.assert_array_equal(ys, [256.0, 512.0])


def test_base_study_has_the_preset_and_a_square_resolution(base):
    with StudyStore.open(base[0]) as store:
        assert (store.nx, store.ny) == (4, 4)
        assert store.config["x"] == preset("tiny").x and store.config["resolution"] == "4"
        np.testing.assert_allclose(store.grid_arrays("x")[0], np.geomspace(1e-4, 1, 4))


# ------------------------------------------------------------------------------------------------ 10 bad input
BAD_OPTIONS = [
    (["--x", "lr:1e-1:1e-3"], "min"),
    (["--x", "lr:0:1e-3:log"], "log axis needs bounds > 0"),
    (["--x", "weight_decay:0:1e-1:log"], "log axis needs bounds > 0"),
    (["--resolution", "1"], ">= 2"),
    (["--resolution", "4x1"], ">= 2"),
    (["--resolution", "four"], "malformed"),
    (["--x", "depth:1:2"], "unknown axis 'depth'"),
    (["--x", "lr:1:2:cubic"], "unknown scale"),
    (["--y", "lr:1e-3:1e-1"], "both sweep 'lr'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "nope=1"], "--set"),
    (["--models-per-batch", "0"], "--models-per-batch"),
    (["--shard", "3/2"], "shard 3/2"),
    (["--shard", "5/5"], "--shard 5/5: that part holds no cells"),  # 4 rows dealt into 5 parts
    (["--micro-batch-size", "3"], "--micro-batch-size 3: give a divisor of the batch size"),
    (["--micro-batch-size", "3", "--dry-run"], "--micro-batch-size 3"),
    (["--resolution", "100000"], "at most 2048 per side"),
    (["--x", "lr:x:y"], "'lr:x:y'"),  # printed as typed, not as rich's :x: emoji
    # resuming with a different config is refused, naming what differs
    (["--seed", "7"], "seed: 42 -> 7"),
    (["--resolution", "5"], 'resolution: "4" -> "5"'),
    (["--x", "lr:1e-4:1e-1"], "x: "),
]


@pytest.mark.parametrize("extra,needle", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_on_an_existing_study_change_nothing(base, extra, needle):
    before = snapshot(base[0])
    one_line_error(cli(*TINY, "--quiet", "--out", base[0], *extra), needle)
    assert snapshot(base[0]) == before


def test_a_resolution_spelled_otherwise_is_the_same_grid(base):
    before = snapshot(base[0])
    result = ok("run", "--out", base[0], "--resolution", "4x4", "--dry-run")  # the study's "4"
    assert "every one of the plan's 16 cells is stored; nothing to train" in result.stdout.replace("\n", "")
    assert snapshot(base[0]) == before


def _foreign_db(path: Path, kind: str) -> None:
    if kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(8192))
        return
    conn = sqlite3.connect(path)
    if kind == "other-app":
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        conn.execute("INSERT INTO notes (body) VALUES ('hello')")
    else:  # a meta table, but another app's
        conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT INTO meta VALUES ('app', 'something-else')")
    conn.commit()
    conn.close()


@pytest.mark.parametrize("kind", ["random", "other-app", "other-meta"])
def test_corrupt_or_foreign_database_is_refused_untouched(tmp_path, kind):
    folder = tmp_path / "s"
    folder.mkdir()
    _foreign_db(folder / "study.db", kind)
    before = snapshot(folder)
    one_line_error(cli(*TINY, "--quiet", "--out", folder), "not a vmap-sweep study database")
    for args in (["status", folder], ["classify", folder], ["plot", folder], ["fractal", folder],
                 ["export", folder, "-o", tmp_path / "x.csv"], ["merge", folder, "--out", tmp_path / "m"]):
        one_line_error(cli(*args), "not a vmap-sweep study database")
    assert snapshot(folder) == before
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "m" / "study.db").exists()


def test_unwritable_out_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    one_line_error(cli(*TINY, "--out", blocker / "study"), "can't create the study folder")
    one_line_error(cli(*TINY, "--out", blocker), f"{blocker}: a file, not a folder; give --out a new or empty folder")
    (tmp_path / "s" / "study.db").mkdir(parents=True)
    one_line_error(cli(*TINY, "--out", tmp_path / "s"), "is not a file")
    assert blocker.read_text() == "not a folder"


BAD_DATA = {"not-json": b"this is not json\n", "no-messages": json.dumps({"text": "hello"}).encode() + b"\n",
            "not-utf8": b"\xff\xfe\x00bin\n"}


@pytest.mark.parametrize("kind", list(BAD_DATA))
def test_malformed_data_file_on_a_new_folder_leaves_nothing(tmp_path, kind):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(BAD_DATA[kind])
    out = tmp_path / "new"
    one_line_error(cli(*TINY, "--data", bad, "--out", out), str(bad))
    # no half-made study whose config would refuse the corrected command as "a different config"
    assert not out.exists()


def test_malformed_data_file_on_an_existing_study_leaves_it_as_it_was(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(BAD_DATA["not-json"])
    cfg = preset("tiny").with_overrides(resolution="4", y="tokens:256:1024:log", eval_tokens=512, data=str(bad))
    out = tmp_path / "s"
    StudyStore.create_or_open(out, cfg.to_dict(), build_grid(cfg).cells()).close()
    before = snapshot(out)
    one_line_error(cli(*TINY, "--data", bad, "--out", out), f"{bad}:1: invalid JSON")
    assert snapshot(out) == before


def test_a_data_file_that_changed_is_refused_on_resume(tmp_path):
    from vmap_sweep.data.synthetic import synthetic_docqa

    data = tmp_path / "docs.jsonl"
    lines = [json.dumps(c) + "\n" for c in synthetic_docqa(61, seed=0)]
    data.write_text("".join(lines[:60]))
    args = [*TINY[:3], "--resolution", "2", "--y", "tokens:256:512", "--eval-tokens", "512", "--device", "cpu",
            "--quiet", "--data", data, "--out", tmp_path / "s"]
    ok(*args)
    original, before = data.read_bytes(), snapshot(tmp_path / "s")
    data.write_bytes(original + lines[60].encode())  # same name, one more conversation
    one_line_error(cli(*args), f"{data}: its contents changed", "restore that file")
    assert snapshot(tmp_path / "s") == before
    data.write_bytes(original)
    ok(*args)  # the contents it started with resume it
    with StudyStore.open(tmp_path / "s") as store:
        x, y = parse_axis_spec(store.config["x"]), parse_axis_spec(store.config["y"])
    window = [x.lo * 1.5, x.hi / 1.5, y.lo * 1.1, y.hi / 1.1]
    data.write_bytes(original + lines[60].encode())
    one_line_error(cli("zoom", tmp_path / "s", "--window", *window, "--device", "cpu"), "its contents changed")
    assert snapshot(tmp_path / "s") == before
    data.write_bytes(original)
    # shards trained on different contents under one name do not merge
    shard_args = [*args[:-1], tmp_path / "sharded"]
    ok(*shard_args, "--shard", "1/2")
    data.write_bytes(original + lines[60].encode())
    ok(*shard_args, "--shard", "2/2")
    one_line_error(cli("merge", tmp_path / "sharded" / "shard-1-of-2", tmp_path / "sharded" / "shard-2-of-2",
                       "--out", tmp_path / "merged"), "'data_sha256' differs")
    assert not (tmp_path / "merged").exists()


def test_brackets_in_paths_are_printed_as_they_are(base, tmp_path):
    """rich would read `[old]` as markup (and `[/x]` as a closing tag: a crash), so names must be escaped."""
    bad = tmp_path / "[old]" / "[" / "x]" / "bad.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(BAD_DATA["not-json"])
    one_line_error(cli(*TINY, "--data", bad, "--out", tmp_path / "new"), f"{bad}:1:")
    study = tmp_path / "[run]"
    shutil.copytree(base[0], study)
    assert "[run]" in ok("status", study).stdout
    assert ok("plot", study, "--format", "svg").stdout.split() == [str(study / "plots" / f"{n}.svg") for n in PLOTS]


def test_bad_input_in_a_real_process_is_one_line_and_exit_2(tmp_path):
    """Outside CliRunner too: nothing but the error line reaches stderr (no warning, no traceback)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "from vmap_sweep.cli import app; app()", *TINY,
                           "--x", "lr:1:0.1", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------------------ 3 plan
def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path):
    from vmap_sweep.train.tiny import TINY_CONFIG

    out = tmp_path / "never"
    result = ok(*TINY, "--dry-run", "--out", out)
    text = re.sub(r"[│┃|]", " ", result.stdout)
    assert re.search(r"cells\s+16\s", text) and re.search(r"batches\s+4 of up to 4 models", text)
    # tokens 256, 406, 645, 1024 at 256 tokens per step -> 1, 2, 3, 4 steps per row of 4 cells
    assert re.search(r"model-steps\s+40 \(0 masked\); every cell alone: 40", text)
    # the model-steps, and each cell's eval pass: 512 held-out tokens, a forward (a third of a step) per 256
    flops = flops_per_model_step(TINY_CONFIG, 64, 4 * 64) * (40 + 16 * 512 / 256 / 3)
    assert re.search(rf"FLOPs\s+{re.escape(f'{flops:.3g}')}\s", text)
    m = re.search(r"estimate\s+([\d.e+-]+) (s|min|h) on cpu", text)
    assert m and float(m.group(1)) > 0, text
    assert re.search(r"repeated data\s+none: every budget adds supervised tokens", text)
    assert not out.exists()
    # 280, 306 and 335 tokens hold no answer token past the first 256's: 4 LRs x 3 sizes repeat it
    repeats = re.sub(r"[\s│┃|]+", " ", ok(*TINY, "--dry-run", "--y", "tokens:256:335:log").stdout)
    assert "12 cells repeat a smaller budget's experiment" in repeats and "budgets 280, 306, 335 = 256;" in repeats
    # the dry run checks the data as the run does: a missing file, and budgets with nothing to learn from
    missing = cli(*TINY, "--dry-run", "--data", tmp_path / "mine.jsonl")
    assert missing.exit_code == 2 and "mine.jsonl" in missing.stderr
    small = cli(*TINY, "--dry-run", "--y", "tokens:20:1024:log")
    assert small.exit_code == 2 and "hold no supervised (assistant) token; start the tokens range at" in small.stderr


def test_a_run_records_each_budget_counted_in_supervised_tokens_and_conversations(base):
    from vmap_sweep.model.tokenizer import ByteTokenizer
    from vmap_sweep.run.worker import training_stream
    from vmap_sweep.store import extras
    from vmap_sweep.train.tiny import TINY_CONFIG

    with StudyStore.open(base[0]) as store:
        recorded = extras.dataset_sizes(store)
        budgets = sorted({int(c.hparams["tokens"]) for c in store.cells()})
    stream = training_stream(preset("tiny"), TINY_CONFIG.sequence_len, ByteTokenizer())
    assert sorted(recorded) == budgets
    assert recorded == stream.budgets(budgets).sizes
    assert all(0 < recorded[n].supervised < n for n in budgets)


def test_batches_are_rows_of_learning_rates(base):
    with StudyStore.open(base[0]) as store:
        rows = store.rows()
    batches: dict[int, list[dict]] = {}
    for r in rows:
        batches.setdefault(r["batch_index"], []).append(r)
    assert sorted(batches) == [0, 1, 2, 3]
    for cells in batches.values():
        assert len({c["y"] for c in cells}) == 1  # one tokens value (and step count) per batch
        assert sorted(c["i"] for c in cells) == [0, 1, 2, 3]  # the whole row of LRs


# ------------------------------------------------------------------------------------------------ 5 progress, status
def test_quiet_logs_one_line_per_batch_and_a_summary(base):
    out, result = base
    logs = re.findall(r"batch (\d+)/4: (\d+) cells in [\d.]+s, (\d+)/16 done, (\d+) not converged", result.stderr)
    assert [(b, n, d) for b, n, d, _ in logs] == [("1", "4", "4"), ("2", "4", "8"), ("3", "4", "12"),
                                                  ("4", "4", "16")], result.stderr
    with StudyStore.open(out) as store:
        counts = store.label_counts()
    # the log's not-converged count is the class stored with the results, as in the summary table
    assert int(logs[-1][3]) == counts.get("not_converged", 0) > 0
    assert re.search(r"cells done\s*│\s*16/16", result.stdout)
    for label, n in counts.items():
        assert re.search(rf"{DISPLAY.get(label, label)}\s*│\s*{n}\s", result.stdout)
    assert re.search(r"trained this run\s*│\s*16 cells", result.stdout)


def test_status_of_a_finished_study(base):
    before = snapshot(base[0])
    text = ok("status", base[0]).stdout
    assert re.search(r"cells done\s*│\s*16/16", text) and "tiny / synthetic" in text
    assert "last batch stored" in text
    one_line_error(cli("status", base[0].parent / "nowhere"), "no study.db")
    assert snapshot(base[0]) == before


# ------------------------------------------------------------------------------------------------ 6 classify
def test_classify_recomputes_labels_from_trajectories(base, tmp_path):
    study = tmp_path / "copy"
    shutil.copytree(base[0], study)
    with StudyStore.open(study) as store:
        original = store.rows(arrays=True)
    before = snapshot(study)
    one_line_error(cli("classify", study, "--criterion", "threshold"), "--converged-below")
    one_line_error(cli("classify", study, "--criterion", "nope"), "nope")
    assert snapshot(study) == before

    finals = np.array([r["final_loss"] for r in original])
    below = float(np.median(finals))
    above = float(np.sort(finals)[-3])
    text = ok("classify", study, "--criterion", "threshold", "--converged-below", below,
              "--not-converged-above", above).stdout
    with StudyStore.open(study) as store:
        after = store.rows(arrays=True)
        counts = store.label_counts()
    for r, a in zip(original, after, strict=True):
        expect = "not_converged" if r["unstable"] or r["final_loss"] > above else (
            "converged" if r["final_loss"] < below else "marginal")
        assert a["label"] == expect, (r["i"], r["j"], r["final_loss"])
        for f in ARRAY_FIELDS:  # no re-training: the results are untouched
            assert np.array_equal(bits(a[f]), bits(r[f]))
        assert a["finished_at"] == r["finished_at"] and a["wall_time"] == r["wall_time"]
    assert [r["label"] for r in after] != [r["label"] for r in original]
    assert text.strip() == "threshold: " + ", ".join(f"{n} {DISPLAY[lab]}" for lab, n in sorted(counts.items()))

    ok("classify", study, "--criterion", "ratio")
    with StudyStore.open(study) as store:
        again = store.rows()
    assert [r["label"] for r in again] == [r["label"] for r in original]
    assert np.array_equal(bits([r["score"] for r in again]), bits([r["score"] for r in original]))

    ok("plot", study)  # default place: STUDY/plots
    assert all((study / "plots" / f"{name}.png").stat().st_size > 0 for name in PLOTS)


# ------------------------------------------------------------------------------------------------ 7 plot
def test_plot_writes_every_picture_in_every_format(base, tmp_path):
    before = snapshot(base[0])
    out = tmp_path / "pics"
    printed = ok("plot", base[0], "--format", "svg,pdf", "--rows", "0,3", "--out", out).stdout.split()
    assert sorted(printed) == sorted(str(out / f"{n}.{f}") for n in PLOTS for f in ("svg", "pdf"))
    for name in PLOTS:
        for fmt in ("svg", "pdf"):
            assert (out / f"{name}.{fmt}").read_bytes().startswith(MAGIC[fmt]), (name, fmt)
        assert not (out / f"{name}.png").exists()
    ok("plot", base[0], "--out", tmp_path / "png")
    assert all((tmp_path / "png" / f"{n}.png").read_bytes().startswith(MAGIC["png"]) for n in PLOTS)
    for rows, needle in (("9", "rows run from 0 to 3"), ("-1", "rows run from 0 to 3"), ("a,b", "--rows")):
        one_line_error(cli("plot", base[0], "--rows", rows, "--out", tmp_path / "bad"), needle)
    one_line_error(cli("plot", base[0], "--format", "gif", "--out", tmp_path / "bad"), "--format")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "a-file").write_text("x")  # an --out that can't be a folder: a path error, not a traceback
    one_line_error(cli("plot", base[0], "--out", tmp_path / "a-file"), str(tmp_path / "a-file"),
                   "a file, not a folder; give --out a folder for the pictures")
    assert (tmp_path / "a-file").read_text() == "x"
    assert snapshot(base[0]) == before


def test_a_study_without_eval_pass_trains_the_same_cells_and_draws_no_eval_map(base, tmp_path):
    """--eval-tokens 0: every record is the evaluated study's, bit for bit, without an eval loss; classes never read
    it, so the labels are the same too."""
    out = tmp_path / "no-eval"
    ok(*[a if a != "512" else "0" for a in TINY], "--quiet", "--out", out)
    with StudyStore.open(base[0]) as a, StudyStore.open(out) as b:
        evaluated, plain = a.rows(arrays=True), b.rows(arrays=True)
        assert b.config["eval_tokens"] == 0
    assert len(plain) == len(evaluated) == 16
    for x, y in zip(evaluated, plain, strict=True):
        assert x["eval_loss"] == x["eval_loss"] and y["eval_loss"] != y["eval_loss"]
        assert x["label"] == y["label"]
        for f in (*RESULT_FIELDS, *ARRAY_FIELDS):
            if f != "eval_loss":
                assert np.array_equal(bits(x[f]), bits(y[f])), (x["i"], x["j"], f)
    printed = ok("plot", out, "--out", tmp_path / "pics").stdout.split()
    assert sorted(printed) == sorted(str(tmp_path / "pics" / f"{n}.png") for n in PLOTS if n != "eval_loss")
    assert "the study took no eval loss (--eval-tokens 0)" in ok("rules", out).stdout


def test_refused_output_paths_and_options_leave_the_study_as_it_was(base, tmp_path):
    before = snapshot(base[0])
    one_line_error(cli("export", base[0], "-o", base[0] / "study.db"), "may not replace a study's own file")
    one_line_error(cli("fractal", base[0], "--plot", tmp_path / "x.jpg2"), "unknown picture format '.jpg2'")
    one_line_error(cli("rules", base[0], "--plot", tmp_path / "x.jpg2"), "unknown picture format '.jpg2'")
    one_line_error(cli("classify", base[0], "--converged-below", "5"), "--criterion threshold")
    one_line_error(cli("classify", base[0], "--criterion", "nope"), "--criterion 'nope': unknown")
    one_line_error(cli("classify", base[0], "--not-converged-above", "5"), "--not-converged-above (or "
                   "--diverged-above) works with --criterion threshold")
    one_line_error(cli("classify", base[0], "--criterion", "Threshold", "--converged-below", "2"),
                   "--criterion 'Threshold': unknown")
    one_line_error(cli("classify", base[0], "--criterion", "threshold", "--converged-below", "12"),
                   "the default --not-converged-above 10.0: must be finite and above --converged-below 12.0")
    one_line_error(cli("classify", base[0], "--criterion", "threshold", "--converged-below", "-1"),
                   "--converged-below -1.0: must be a finite positive loss")
    one_line_error(cli("classify", base[0], "--criterion", "threshold", "--converged-below", "2",
                       "--not-converged-above", "1"),
                   "--not-converged-above 1.0: must be finite and above --converged-below 2.0")
    (tmp_path / "a.txt").write_text("x")
    one_line_error(cli("status", tmp_path / "a.txt"), "a file, not a study folder")
    assert snapshot(base[0]) == before
    assert not (tmp_path / "x.jpg2").exists()


BAD_BENCH = [(["--depth", "0"], "--depth 0"), (["--steps", "0"], "--steps 0"), (["--seq-len", "0"], "--seq-len 0"),
             (["--models-per-batch", "0"], "--models-per-batch 0"), (["--device", "tpu"], "--device 'tpu'"),
             (["--micro-batch-size", "3"], "--micro-batch-size 3: give a divisor of the 2 rows")]


@pytest.mark.parametrize("extra,needle", BAD_BENCH, ids=[" ".join(a) for a, _ in BAD_BENCH])
def test_bad_bench_options_are_one_line(extra, needle):
    small = ["bench", "--device", "cpu", "--depth", "1", "--tokens-per-step", "64", "--seq-len", "32", "--steps", "1"]
    one_line_error(cli(*small, *extra), needle)


# ------------------------------------------------------------------------------------------------ 8 export
def test_export_reads_back_exactly(base, tmp_path):
    with StudyStore.open(base[0]) as store:
        rows = store.rows(arrays=True)
        axes = [parse_axis_spec(store.config[side]).name for side in ("x", "y")]
    floats = ("initial_loss", "final_loss", "eval_loss", "score")

    def check(got: dict, trajectories: list) -> None:
        assert list(got["i"]) == [r["i"] for r in rows] and list(got["j"]) == [r["j"] for r in rows]
        for f in floats:
            assert np.array_equal(bits(got[f]), bits([r[f] for r in rows])), f
        for name in axes:  # the axes' columns are named after them and hold what each cell trained with
            assert [float(v) for v in got[name]] == [float(r["hparams"][name]) for r in rows], name
        assert list(got["label"]) == [r["label"] for r in rows]
        for r, t in zip(rows, trajectories, strict=True):
            assert np.array_equal(bits(t), bits(r["trajectory"]))

    path = tmp_path / "s.csv"
    assert ok("export", base[0], "--format", "csv", "-o", path, "--trajectories").stdout.strip() == str(path)
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    got = {c: [r[c] for r in table] for c in table[0]}
    got["i"], got["j"] = [int(v) for v in got["i"]], [int(v) for v in got["j"]]
    check({**got, **{f: [float(v) for v in got[f]] for f in floats}},
          [[float(t) for t in v.split()] for v in got["trajectory"]])

    path = tmp_path / "s.parquet"
    ok("export", base[0], "--format", "parquet", "-o", path, "--trajectories")
    got = pq.read_table(path).to_pydict()
    check(got, got["trajectory"])

    path = tmp_path / "s.npz"
    ok("export", base[0], "--format", "npz", "-o", path, "--trajectories")
    with np.load(path, allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    check(got, [t[:n] for t, n in zip(got["trajectory"], got["trajectory_lengths"], strict=True)])

    ok("export", base[0], "--format", "csv", "-o", tmp_path / "short.csv")
    assert "trajectory" not in (tmp_path / "short.csv").read_text().splitlines()[0]
    one_line_error(cli("export", base[0], "--format", "xls", "-o", tmp_path / "s.xls"), "xls")


# ------------------------------------------------------------------------------------------------ 9 shard and merge
def test_shards_run_their_own_part_and_merge_into_the_whole(base, tmp_path):
    root = tmp_path / "sharded"
    ok(*TINY, "--quiet", "--shard", "1/2", "--out", root)
    # with the progress bar, and another batch size: the parts must not depend on how a shard batches
    ok(*TINY, "--shard", "2/2", "--models-per-batch", "3", "--out", root)
    cfg = preset("tiny").with_overrides(resolution="4", y="tokens:256:1024:log", eval_tokens=512)
    seen: set[tuple[int, int]] = set()
    for k in (1, 2):
        expected = {c.key for c in shard_cells(cfg, build_grid(cfg), k, 2)}
        with StudyStore.open(root / f"shard-{k}-of-2") as store:
            done = {(r["i"], r["j"]) for r in store.rows() if r["status"] == "done"}
            assert {r["shard"] for r in store.rows() if r["status"] == "done"} == {f"{k}/2"}
            assert store.cell_count() == 16
        assert done == expected and 0 < len(done) < 16 and not done & seen
        seen |= done
    assert len(seen) == 16

    # a shard is a study with pending cells: its pictures leave those blank
    assert ok("plot", root / "shard-1-of-2").stdout.split() == [str(root / "shard-1-of-2" / "plots" / f"{n}.png")
                                                               for n in PLOTS]
    merged = tmp_path / "merged"
    text = ok("merge", root / "shard-1-of-2", root / "shard-2-of-2", "--out", merged).stdout
    assert "16/16" in text
    with StudyStore.open(merged) as m, StudyStore.open(base[0]) as b:
        assert m.done_count() == 16 and m.config_hash == b.config_hash
        assert_same_results(m, b)
    one_line_error(cli("merge", root / "shard-1-of-2", base[0].parent / "nowhere", "--out", tmp_path / "m2"),
                   "no study.db")
    # shards classified differently would mix two criteria's classes in one study
    ok("classify", root / "shard-1-of-2", "--criterion", "threshold", "--converged-below", "3")
    one_line_error(cli("merge", root / "shard-1-of-2", root / "shard-2-of-2", "--out", tmp_path / "m3"),
                   "is classified by", "same criterion")
    assert not (tmp_path / "m3").exists()
    ok("classify", root / "shard-2-of-2", "--criterion", "threshold", "--converged-below", "3")
    before = snapshot(merged)  # classified by ratio: shards of another criterion don't merge into it
    one_line_error(cli("merge", root / "shard-1-of-2", root / "shard-2-of-2", "--out", merged), "is classified by")
    assert snapshot(merged) == before


# ------------------------------------------------------------------------------------------------ 10 demo
def test_demo_ends_with_heatmaps_fractal_json_and_the_dimension(tmp_path):
    out = tmp_path / "demo"
    text = ok("demo", "--out", out, "--resolution", "4", "--quiet").stdout
    for name in (*PLOTS, "box_counting"):
        assert (out / "plots" / f"{name}.png").read_bytes().startswith(MAGIC["png"]), name
    report = json.loads((out / "fractal.json").read_text(), parse_constant=_no_nan)
    flat = " ".join(text.split())
    assert report["too_small"] and "no box-counting dimension: the boundary spans" in flat and "too small a map" in flat
    assert not re.search(r"box-counting dimension \d", text)  # a 4x4 map prints no number
    with StudyStore.open(out) as store:
        assert store.done_count() == 16 and store.config["model"] == "tiny"
    # too small to measure a boundary: refused before any training, not after it
    one_line_error(cli("demo", "--out", tmp_path / "small", "--resolution", "3x8"), "at least 4x4")
    assert not (tmp_path / "small").exists()


# ------------------------------------------------------------------------------------------------ 11 fractal
def _no_nan(name: str):
    raise AssertionError(f"{name} in JSON output: not valid JSON")


FRACTAL_KEYS = ("dimension", "stderr", "ci_low", "ci_high", "box_sizes", "box_counts")


def test_fractal_of_a_study(base, tmp_path):
    from vmap_sweep.analysis.study import fractal_report

    report = json.loads(ok("fractal", base[0], "--json").stdout, parse_constant=_no_nan)
    assert set(FRACTAL_KEYS) <= set(report)
    assert report["dimension"] == fractal_report(base[0]).to_dict()["dimension"]
    assert report["resolution"] == [4, 4]
    # the study's own boundary was counted: at box size 1 the count is its boundary pixels
    assert report["box_sizes"][0] == 1 and report["box_counts"][0] == pytest.approx(boundary_pixels(base[0]))


def _mask() -> np.ndarray:
    """A wavy boundary on 32x32: left of it converged."""
    jj, ii = np.mgrid[0:32, 0:32]
    return ii < 12 + 6 * np.sin(jj / 3.0)


def test_fractal_of_arrays(tmp_path):
    np.save(tmp_path / "mask.npy", _mask())
    np.save(tmp_path / "score.npy", np.where(_mask(), -0.5, 2.0))
    plot = tmp_path / "fit" / "box.png"
    a = json.loads(ok("fractal", tmp_path / "mask.npy", "--json", "--plot", plot).stdout, parse_constant=_no_nan)
    b = json.loads(ok("fractal", tmp_path / "score.npy", "--json").stdout, parse_constant=_no_nan)
    assert set(FRACTAL_KEYS) <= set(a)
    assert a == b  # a signed score and its mask are the same classes
    assert a["ci_low"] <= a["dimension"] <= a["ci_high"] and 0.8 < a["dimension"] < 1.5
    assert len(a["box_sizes"]) == len(a["box_counts"]) >= 3
    assert plot.read_bytes().startswith(MAGIC["png"])
    text = " ".join(ok("fractal", tmp_path / "mask.npy").stdout.split())
    assert a["too_small"] and "no box-counting dimension: " in text and f"{a['dimension']:.3f}" not in text
    # at 128x128 the same kind of edge spans three octaves: a number, with its grid and octaves
    jj, ii = np.mgrid[0:128, 0:128]
    np.save(tmp_path / "wide.npy", ii < 48 + 24 * np.sin(jj / 12.0))
    wide = json.loads(ok("fractal", tmp_path / "wide.npy", "--json").stdout)
    text = " ".join(ok("fractal", tmp_path / "wide.npy").stdout.split())
    assert wide["too_small"] is None
    assert f"box-counting dimension {wide['dimension']:.3f}" in text and " at 128×128 over " in text


@pytest.mark.parametrize("kind", ["3d", "empty", "one-class", "garbage.npy", "text.txt", "missing.npy"])
def test_fractal_refuses_bad_arrays(tmp_path, kind):
    path = tmp_path / (kind if "." in kind else f"{kind}.npy")
    if kind == "3d":
        np.save(path, np.zeros((4, 4, 4), dtype=bool))
    elif kind == "empty":
        np.save(path, np.zeros((0, 0), dtype=bool))
    elif kind == "one-class":
        np.save(path, np.ones((16, 16), dtype=bool))
    elif kind != "missing.npy":
        path.write_bytes(b"hello, not an array")
    line = one_line_error(cli("fractal", path, "--plot", tmp_path / "p.png"), path.name)
    assert "allow_pickle" not in line  # numpy's advice would run what the file holds
    if kind == "garbage.npy":
        assert "not a numpy array file (it is text, or holds pickled objects, which are never loaded)" in line
    assert not (tmp_path / "p.png").exists()


def test_a_mask_file_has_no_stability_map(tmp_path):
    np.save(tmp_path / "mask.npy", _mask())
    one_line_error(cli("fractal", tmp_path / "mask.npy", "--map", "stability"), "--map stability: a .npy file "
                   "holds one mask, not a study's stability map")


def test_export_names_its_file_after_the_format(base, tmp_path):
    study = tmp_path / "study"  # a copy: the default output is inside the study folder
    shutil.copytree(base[0], study)
    for fmt, magic in (("npz", b"PK"), ("parquet", b"PAR1"), ("csv", b"i,j,"), ("json", b"{")):
        assert ok("export", study, "--format", fmt).stdout.strip() == str(study / f"cells.{fmt}")
        assert (study / f"cells.{fmt}").read_bytes().startswith(magic)


def test_an_uncertainty_dimension_outside_the_plane_is_flagged(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from shapes import disk_mask

    from vmap_sweep.analysis import study as study_module

    np.save(tmp_path / "mask.npy", disk_mask(32))
    assert "outside [0, 2]" not in ok("fractal", tmp_path / "mask.npy").stdout
    # a 6x6 study measured 2.178 (2 - phi from three distances): a number no boundary in the plane can have
    monkeypatch.setattr(study_module, "uncertainty_exponent", lambda mask: SimpleNamespace(dimension=2.178,
                                                                                            stderr=0.432))
    assert "2.178 ± 0.432 (" in (out := " ".join(ok("fractal", tmp_path / "mask.npy").stdout.split()))
    assert "(outside [0, 2], no dimension of a boundary in the plane" in out


# ------------------------------------------------------------------------------------------------ 12 axes, --version
def test_axes_shows_each_axis_type_and_default_scale():
    text = ok("axes").stdout
    assert "[float, log]" in text and "lr" in text  # printed as text, not eaten as rich markup


def test_version_prints_the_installed_version():
    from importlib.metadata import version

    assert ok("--version").stdout.strip() == f"vmap-sweep {version('vmap-sweep')}"


def test_shared_trajectories_store_what_every_cell_alone_stores(tmp_path):
    """At a constant LR each learning rate's dataset sizes are read out of one trajectory (budgets below one step,
    ending inside a step and on one); killed after its first batch and resumed from its folder alone, the study
    holds what training every cell alone gives, bit for bit. --dry-run shows the saving."""
    from helpers import StopsAfterOneBatch, bits, run_local

    from vmap_sweep.study.config import preset
    from vmap_sweep.study.settings import RunSettings

    args = ["run", "--preset", "tiny", "--resolution", "4", "--y", "tokens:170:1024:log", "--eval-tokens", "512",
            "--models-per-batch", "2", "--device", "cpu", "--quiet"]
    text = re.sub(r"[│┃|]", " ", ok(*args, "--dry-run").stdout)
    assert re.search(r"trunks\s+4 trained, read out at 16 cells", text), text
    assert re.search(r"model-steps\s+16 \(0 masked\); every cell alone: 40", text), text
    alone = tmp_path / "alone"
    ok(*args, "--no-share", "--out", alone)

    cfg = preset("tiny").with_overrides(resolution="4", y="tokens:170:1024:log", eval_tokens=512)
    shared = tmp_path / "shared"
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, shared, 2, StopsAfterOneBatch(cfg, RunSettings()))
    with StudyStore.open(shared) as store:
        assert store.done_count() == 8  # one batch: two trunks, four cells each
    ok("run", "--out", shared, "--device", "cpu", "--quiet")
    with StudyStore.open(alone) as a, StudyStore.open(shared) as b:
        want, got = a.rows(arrays=True), b.rows(arrays=True)
    assert len(got) == 16 and all(r["status"] == "done" for r in got)
    for w, g in zip(want, got, strict=True):
        for key in (*RESULT_FIELDS, "trajectory", "base_losses", "grad_norms", "lrs", "label", "score"):
            exact = w[key] is None or isinstance(w[key], str | int)
            same = w[key] == g[key] if exact else np.array_equal(bits(w[key]), bits(g[key]))
            assert same, (w["i"], w["j"], key, w[key], g[key])


# ------------------------------------------------------------------------------------------------ no silent surprises
def test_export_format_follows_the_file_name_and_the_default_is_in_the_study(base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study"
    shutil.copytree(base[0], study)
    # the format is the suffix; without -o the file is STUDY/cells.FORMAT, never ./study.csv shared by all studies
    for fmt, magic in (("npz", b"PK"), ("parquet", b"PAR1"), ("csv", b"i,j,"), ("json", b"{")):
        assert ok("export", study, "-o", tmp_path / f"c.{fmt}").stdout.strip() == str(tmp_path / f"c.{fmt}")
        assert (tmp_path / f"c.{fmt}").read_bytes().startswith(magic)
        assert ok("export", study, "--format", fmt).stdout.strip() == str(study / f"cells.{fmt}")
        assert (study / f"cells.{fmt}").read_bytes().startswith(magic)
    assert ok("export", study).stdout.strip() == str(study / "cells.csv")
    assert not list(tmp_path.glob("study.*"))
    # a --format that contradicts the name, a name without a format, and someone else's file are refused untouched
    (tmp_path / "theirs.csv").write_text("name,age\nann,3\n")
    before = snapshot(tmp_path)
    one_line_error(cli("export", study, "-o", tmp_path / "c.parquet", "--format", "csv"),
                   "--format csv contradicts", "name it c.csv or leave out --format")
    one_line_error(cli("export", study, "-o", tmp_path / "x.csv", "--format", "parquet"), "--format parquet")
    one_line_error(cli("export", study, "-o", tmp_path / "x.txt"), "can't tell the format",
                   ".csv, .parquet, .npz or .json")
    one_line_error(cli("export", study, "-o", tmp_path / "theirs.csv"),
                   "exists and is not an earlier csv export", "choose a new file name")
    assert snapshot(tmp_path) == before and not (tmp_path / "x.csv").exists()


def test_merge_refuses_a_missing_or_repeated_shard_unless_partial(base, tmp_path):
    # a finished study copied under a shard's name is that part of a split into 2
    one = tmp_path / "a" / "shard-1-of-2"
    shutil.copytree(base[0], one)
    twin = tmp_path / "b" / "shard-1-of-2"
    shutil.copytree(base[0], twin)
    out = tmp_path / "merged"
    assert one_line_error(cli("merge", one, "--out", out)) == (
        "error: merge: shard 2/2 is missing (the study was split into 2 parts); give every shard-K-of-2 folder, "
        "or add --partial to merge only these")
    for partial in ([], ["--partial"]):  # one folder is never two shards
        assert one_line_error(cli("merge", one, one, "--out", out, *partial)) == (
            f"error: merge: {one} is given twice; give each shard folder once")
    one_line_error(cli("merge", one, twin, "--out", out), "shard 1/2 is in both", str(one), str(twin))
    assert not out.exists()
    assert "16/16" in ok("merge", one, "--out", out, "--partial").stdout
    assert "16/16" in ok("merge", one, twin, "--out", tmp_path / "m2", "--partial").stdout


def test_run_refuses_a_folder_of_other_files_but_resumes_starts_and_zooms(base, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("my work")
    before = snapshot(mine)
    assert one_line_error(cli(*TINY, "--quiet", "--out", mine)) == (
        f"error: {mine} is not empty and holds no study; choose an empty or new folder")
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    # an empty existing folder starts a study; a study folder resumes (nothing left to train)
    (tmp_path / "empty").mkdir()
    ok(*TINY, "--quiet", "--out", tmp_path / "empty")
    study = tmp_path / "study"
    shutil.copytree(base[0], study)
    ok(*TINY, "--quiet", "--out", study)
    ok("run", "--out", study, "--device", "cpu", "--quiet")
    # a zoom child goes into a new folder inside the study folder, beside the study's own files
    ok("export", study)
    with StudyStore.open(study) as store:
        x, y = parse_axis_spec(store.config["x"]), parse_axis_spec(store.config["y"])
    window = [x.lo * 1.5, x.hi / 1.5, y.lo * 1.1, y.hi / 1.1]
    ok("zoom", study, "--window", *window, "--device", "cpu", "--quiet", "--models-per-batch", "4")
    with StudyStore.open(study) as store:
        (child,) = store.children()
    with StudyStore.open(study / child.child_dir) as c:
        assert c.done_count() == c.cell_count()
