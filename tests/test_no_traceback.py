"""No command ever answers with a traceback: every command on every class of hostile study, stored value and
pair of studies answers with its output (exit 0) or one `error:` line (exit 2).

The studies hold made-up results (no training); `run` is asked for a dry run, so that a resume's checks are
made without loading the tiny model for every case.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from cli_helpers import cli
from test_storage_errors import _log_of, make_study, sql

from vmap_sweep.store.db import canonical_json


def extra(key: str, value) -> str:
    return f"INSERT OR REPLACE INTO extra VALUES ('{key}', '{canonical_json({'v': value})}')"


# (id, statements that damage a finished study)
STUDIES = [
    ("finished", []),
    ("runtime-not-object", [extra("runtime", "cpu")]),
    ("runtime-device-number", [extra("runtime", {"device": 5, "numerics": 4})]),
    ("runtime-micro-batch-string", [extra("runtime", {"device": "cpu", "micro_batch_size": "8"})]),
    ("criterion-list", [extra("criterion", [1, 2])]),
    ("criterion-unknown", [extra("criterion", {"criterion": "vibes"})]),
    ("criterion-threshold-string", [extra("criterion", {"criterion": "threshold", "converged_below": "low"})]),
    ("sizes-garbage", [extra("dataset_sizes", {"x": "y"})]),
    ("zoom-of-level-string", [extra("zoom_of", {"level": "deep", "window": [1, 2, 3, 4]})]),
    ("provenance-list", [extra("provenance", [1])]),
    ("run-options-garbage", [extra("run_options", {"models_per_batch": {"a": 1}, "share": "no"})]),
    ("ood-number", [extra("ood", 5)]),
    ("data-digest-number", [extra("data_sha256", 12)]),
    ("negative-steps", ["UPDATE cells SET steps=-1 WHERE i=0 AND j=0"]),
    ("unknown-label", ["UPDATE cells SET label='?' WHERE i=1 AND j=1"]),
    ("half-pending", ["UPDATE cells SET status='pending', label=NULL WHERE j >= 2"]),
    ("child-missing", ["INSERT INTO children VALUES ('zoom-1-x', 0.001, 0.01, 300, 600, 1, '2026-01-01')"]),
]


def commands(study: Path, other: Path, out: Path) -> list[list]:
    return [["status", study], ["export", study, "-o", out / "x.csv"], ["export", study, "-o", out / "x.npz"],
            ["plot", study, "--out", out / "plots"], ["fractal", study], ["fractal", study, "--map", "stability"],
            ["rules", study], ["rules", study, "--size-unit", "supervised"], ["early-warning", study],
            ["compare", study, other], ["compare", other, study], ["report", study, "-o", out / "r.md"],
            ["classify", study], ["zoom-dimension", study], ["animate", study, "-o", out / "z.gif"],
            ["run", "--out", study, "--dry-run"], ["merge", study, "--out", out / "merged", "--partial"]]


def answered(result, args) -> None:
    """Exit 0, or 2 with one error line; never an exception that escaped."""
    assert "Traceback" not in result.output, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
    if result.exit_code == 2:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("finished") / "study")


@pytest.mark.parametrize("statements", [c[1] for c in STUDIES], ids=[c[0] for c in STUDIES])
def test_every_command_answers_every_stored_study(finished, tmp_path, statements):
    study = Path(shutil.copytree(finished, tmp_path / "study"))
    other = Path(shutil.copytree(finished, tmp_path / "other"))
    if statements:
        sql(study, *statements)
    out = tmp_path / "out"
    for args in commands(study, other, out):
        answered(cli(*args), args)


def test_every_command_answers_a_study_beside_a_stray_log(finished, tmp_path):
    study = Path(shutil.copytree(finished, tmp_path / "study"))
    stranger = make_study(tmp_path / "stranger", range(1))
    (study / "study.db-wal").write_bytes(_log_of(stranger, "UPDATE cells SET label='not_converged' WHERE j=0"))
    for args in commands(study, stranger, tmp_path / "out"):
        answered(cli(*args), args)


def test_every_command_answers_paths_that_are_not_studies(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("hello")
    (tmp_path / "notdb").mkdir()
    (tmp_path / "notdb" / "study.db").write_text("not sqlite")
    (tmp_path / "dbdir").mkdir()
    (tmp_path / "dbdir" / "study.db").mkdir()
    import os

    os.mkfifo(tmp_path / "fifo.npy")
    for path in ("missing", "empty", "file.txt", "notdb", "dbdir", "fifo.npy"):
        target = tmp_path / path
        for args in commands(target, target, tmp_path / "out"):
            if args[0] != "run":  # there a new study of the default preset (from the Hub), not a hostile path
                answered(cli(*args), args)


def test_json_output_never_fails_on_what_a_study_holds(finished, tmp_path):
    study = Path(shutil.copytree(finished, tmp_path / "study"))
    for args in (["fractal", study, "--json"], ["rules", study, "--json"], ["compare", study, study, "--json"],
                 ["early-warning", study, "--json"], ["zoom-dimension", study, "--json"]):
        result = cli(*args)
        answered(result, args)
        if result.exit_code == 0:
            json.loads(result.stdout)


def test_nothing_is_left_open(finished, tmp_path):
    """After all of the above in one process, a study's folder holds no log (every connection was closed)."""
    study = Path(shutil.copytree(finished, tmp_path / "study"))
    for args in commands(study, study, tmp_path / "out"):
        cli(*args)
    assert not (study / "study.db-wal").exists() or not (study / "study.db-wal").stat().st_size
    sqlite3.connect(study / "study.db").close()


def test_rules_params_on_one_study_is_refused_not_ignored(finished):
    result = cli("rules", finished, "--params", "1e6")
    answered(result, "rules --params")
    assert result.exit_code == 2 and "--params 1e6" in result.stderr and "joint fit" in result.stderr


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to a device"])
def test_a_study_db_that_is_not_a_file_is_named_so(tmp_path, kind):
    import os

    (tmp_path / "s").mkdir()
    make = {"fifo": os.mkfifo, "folder": os.mkdir, "link to a device": lambda p: os.symlink("/dev/zero", p)}[kind]
    make(tmp_path / "s" / "study.db")
    paths = [tmp_path / "s"] + ([tmp_path / "s" / "study.db"] if kind != "folder" else [])
    for args in (["status", p] for p in paths):
        result = cli(*args)
        answered(result, args)
        assert result.exit_code == 2 and "not a regular file" in result.stderr and "no study.db" not in result.stderr


# The CLI in a child process, interrupted (SIGINT, as Ctrl-C sends it) at moments of its start.
@pytest.mark.parametrize("delay", [0.15, 0.5, 1.5, 4.0])
def test_ctrl_c_in_the_first_seconds_is_one_line_and_no_traceback(tmp_path, delay):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", "from vmap_sweep.cli import app; app()", "run", "--preset", "tiny",
                              "--resolution", "4", "--out", str(tmp_path / "s"), "--quiet"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=300)
    assert "Traceback" not in err and "Traceback" not in out, err
    if child.returncode != 0:  # a machine fast enough may have finished the 16 cells
        assert child.returncode == 130, (child.returncode, err)
        assert "interrupted" in err.strip().splitlines()[-1], err


def test_ctrl_c_before_a_command_runs_ends_at_once_and_inside_one_is_the_command_s(tmp_path):
    """Deterministic: the signal sent by the process to itself, before and after a command's code starts (typer
    evaluates the commands' annotations before any runs: a Ctrl-C there used to escape as a traceback)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    before = "import os, signal; import vmap_sweep.cli as c; os.kill(os.getpid(), signal.SIGINT); print('went on')"
    proc = subprocess.run([sys.executable, "-c", before], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and "went on" not in proc.stdout
    assert proc.stderr == "error: interrupted (Ctrl-C) while vmap-sweep was loading; nothing stored changed\n"
    inside = ("import os, signal; import vmap_sweep.cli as c; c.command_started()\n"
              "try:\n    os.kill(os.getpid(), signal.SIGINT)\nexcept KeyboardInterrupt:\n"
              "    print('the command handles it')")
    proc = subprocess.run([sys.executable, "-c", inside], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "the command handles it\n", (proc.stdout, proc.stderr)


def test_bench_checks_memory_before_allocating_and_runs_where_there_is_no_gpu(monkeypatch):
    """The default d20 x 4 models needs ~36 GB before any activation: refused in one line where that much is not
    free (here: a machine said to have 8 GiB), before a tensor is allocated. Its default device is one that
    exists: without a GPU, a small bench runs on the CPU."""
    import torch

    import vmap_sweep.run.bench as bench_module
    from vmap_sweep.model.gpt import GPTConfig

    monkeypatch.setattr(bench_module, "free_memory", lambda device: 8 << 30)
    allocated = []
    monkeypatch.setattr(bench_module.GPT, "init_weights", lambda self, seed: allocated.append(seed))
    result = cli("bench", "--device", "cpu")
    answered(result, "bench")
    assert result.exit_code == 2 and "need at least 3" in result.stderr and "8.0 GiB free" in result.stderr
    assert not allocated
    with torch.device("meta"):
        params = sum(p.numel() for p in bench_module.GPT(GPTConfig.from_depth(20)).parameters())
    assert bench_module.memory_floor(params, 4) > 32 << 30
    monkeypatch.undo()
    asked = {}

    def fake_bench(*args, device, **kwargs):
        asked["device"] = device
        raise bench_module.ConfigError("stopped before the benchmark")

    monkeypatch.setattr(bench_module, "bench", fake_bench)
    assert cli("bench", "--depth", "1").exit_code == 2
    assert asked["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(("argv", "says"), [
    (["refine", "STUDY", "--levels", "abc"], "Invalid value for '--levels'"),
    (["fractal", "STUDY", "--no-such-flag"], "No such option: --no-such-flag"),
    (["refine"], "Missing argument 'study'"),
    (["refine", "STUDY", "--levels"], "Option '--levels' requires an argument; see `vmap-sweep refine --help`"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_what_the_parser_refuses_is_one_error_line(finished, monkeypatch, capsys, argv, says):
    """The console entry point (what `vmap-sweep` runs): a value the parser can't take is one line naming it and
    where the command's options are listed, exit 2, the study unchanged."""
    from helpers import snapshot

    from vmap_sweep.cli import main

    before = snapshot(finished)
    monkeypatch.setattr("sys.argv", ["vmap-sweep", *(str(finished) if a == "STUDY" else a for a in argv)])
    with pytest.raises(SystemExit) as ended:
        main()
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: ") and says in err, err
    assert len(err.strip().splitlines()) == 1 and "--help`" in err
    assert snapshot(finished) == before


def test_the_entry_point_runs_a_command_and_shows_help_for_none(finished, monkeypatch, capsys):
    from vmap_sweep.cli import main

    monkeypatch.setattr("sys.argv", ["vmap-sweep", "status", str(finished)])
    with pytest.raises(SystemExit) as ended:
        main()
    assert ended.value.code == 0 and "study" in capsys.readouterr().out
    monkeypatch.setattr("sys.argv", ["vmap-sweep"])
    with pytest.raises(SystemExit) as ended:
        main()
    out = capsys.readouterr()
    assert ended.value.code == 2 and "Usage:" in out.out and "refine" in out.out and "error" not in out.err


def test_an_empty_device_is_refused_not_taken_as_the_study_s(finished):
    for args in (["refine", str(finished), "--dry-run"], ["run", "--out", str(finished), "--dry-run"]):
        out = cli(*args, "--device", "")
        assert out.exit_code == 2 and "--device '': choose auto, cpu or cuda" in out.output, out.output


def test_version_of_a_source_tree_never_installed_is_said_not_a_traceback(monkeypatch):
    import importlib.metadata as metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    out = cli("--version")
    assert out.exit_code == 0 and "Traceback" not in out.output
    assert "vmap-sweep (not installed: `pip install -e .` in its folder records a version)" in out.output
