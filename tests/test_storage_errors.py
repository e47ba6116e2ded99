"""A study's storage failing or tampered with: a full disk, read-only media, damaged pages, edited tables, rows
and config, and zoom-child paths that lead out of the study. Each is one line that names what happened and the
fix, exit code 2, and the study's files byte for byte as they were; "not SQLite" only for a file that is not.

The studies here hold made-up results (no training), so that each case costs a few SQLite statements.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import cli, ok
from helpers import Rec, snapshot

from vmap_sweep.errors import StoreError
from vmap_sweep.store import db
from vmap_sweep.store.db import StudyStore, config_diff
from vmap_sweep.store.study import Study
from vmap_sweep.study.config import preset
from vmap_sweep.study.criterion import label as label_record
from vmap_sweep.study.plan import build_grid

REPO = Path(__file__).resolve().parents[1]
CONFIG = preset("tiny").with_overrides(resolution="4", y="tokens:256:1024:log", eval_tokens=512)
STEPS = 200  # long enough trajectories that a batch of them needs new database pages


def record(i: int, j: int) -> Rec:
    """Converges left of a staircase boundary, diverges right of it."""
    steps = np.arange(STEPS)
    if i + j % 2 < 2:
        return Rec(initial_loss=5.0, losses=list(4.0 - steps / STEPS - i / 10), base_losses=[5.0] * STEPS,
                   grad_norms=[1.0] * STEPS, lrs=[1e-3] * STEPS, steps=STEPS, steps_done=STEPS, eval_loss=3.0 + i)
    return Rec(initial_loss=5.0, losses=list(5.0 + steps), base_losses=[5.0] * STEPS, grad_norms=[9.0] * STEPS,
               lrs=[1e-1] * STEPS, steps=STEPS, steps_done=STEPS, unstable=True, unstable_step=3, eval_loss=60.0)


def make_study(folder: Path, rows: range = range(4)) -> Path:
    """A classified study of CONFIG whose cells of the given rows j are done."""
    cells = build_grid(CONFIG).cells()
    with Study.create(folder, CONFIG, cells) as study:
        study.store.record_batch([(c, record(c.i, c.j)) for c in cells if c.j in rows], batch_index=0,
                                 labeller=label_record)
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("made") / "study")


@pytest.fixture
def study(made, tmp_path) -> Path:
    """A fresh copy of the finished study, to damage."""
    return Path(shutil.copytree(made, tmp_path / "study"))


def sql(folder: Path, *statements: str) -> None:
    """Edit a study's database behind vmap-sweep's back, as a user with the sqlite3 shell would."""
    conn = sqlite3.connect(folder / "study.db")
    for s in statements:
        conn.execute(s)
    conn.commit()
    conn.close()


def one_line_error(result, *needles: str) -> str:
    """Exit code 2, one line on stderr, no traceback, never the advice to remove a readable study."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "not SQLite" not in lines[0] and "remove it" not in lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def refused_unchanged(folder: Path, commands: list[list], *needles: str) -> None:
    before = snapshot(folder)
    for args in commands:
        one_line_error(cli(*args), *needles)
    assert snapshot(folder) == before


# ------------------------------------------------------------------------------------------------ the config's hash
EDITS = {"config": "UPDATE meta SET value=replace(value, '\"seed\":42', '\"seed\":7') WHERE key='config'",
         "config_hash": "UPDATE meta SET value='0' || substr(value, 2) WHERE key='config_hash'"}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_config_or_hash_is_refused_by_every_command(study, tmp_path, edit):
    sql(study, EDITS[edit])
    refused_unchanged(study, [["run", "--out", study], ["rules", study], ["zoom", study, "--auto"], ["status", study],
                              ["export", study, "-o", tmp_path / "x.csv"], ["classify", study]],
                      str(study), "does not match its stored hash", "restore study.db from a backup")


def test_a_config_that_differs_only_in_how_it_is_stored_still_names_the_difference(tmp_path):
    assert config_diff({"a": 1, "b": {"c": 2}}, {"a": 1.0, "b": {"c": 2}}) == "a: 1 -> 1.0"
    assert config_diff({"a": 1}, {"a": 1}) != ""  # two texts, one content: still says what it compared
    # an empty mapping beside one that lists its entries: the entries are the difference
    assert config_diff({"f": {}}, {"f": {"t": 5}}) == 'f.t: "<missing>" -> 5'
    assert config_diff({"f": {"t": 5}}, {"f": {}}) == 'f.t: 5 -> "<missing>"'
    assert config_diff({"f": {}}, {"g": 1}) == 'f: {} -> "<missing>"; g: "<missing>" -> 1'
    cells = build_grid(CONFIG).cells()
    StudyStore.create_or_open(tmp_path / "s", {"lr": 1}, cells).close()
    with pytest.raises(StoreError, match=r"different config \(lr: 1 -> 1\.0\)"):
        StudyStore.create_or_open(tmp_path / "s", {"lr": 1.0}, cells)


# ------------------------------------------------------------------------------------------------ damage, named
BAD_CONFIG = '{"seed": 4'
DAMAGE = {
    "dropped column": (["ALTER TABLE cells DROP COLUMN lrs"], "its table 'cells' lacks column lrs"),
    "dropped table": (["DROP TABLE children"], "its table 'children' is missing"),
    "dropped meta": (["DROP TABLE meta"], "its meta table is missing or not vmap-sweep's"),
    # with its hash made to match, so that the JSON itself is what is wrong
    "config not JSON": ([f"UPDATE meta SET value='{BAD_CONFIG}' WHERE key='config'",
                         f"UPDATE meta SET value='{hashlib.sha256(BAD_CONFIG.encode()).hexdigest()}' "
                         "WHERE key='config_hash'"], "its stored config is not valid JSON"),
    "hparams not JSON": (["UPDATE cells SET hparams='{\"lr\": ' WHERE i=1 AND j=2"],
                         "cell (1, 2)'s hparams is not valid JSON"),
    "5-byte trajectory": (["UPDATE cells SET trajectory=x'0102030405' WHERE i=3 AND j=0"],
                          "cell (3, 0)'s trajectory is 5 bytes, not whole float64 values"),
    "text for a loss": (["UPDATE cells SET final_loss='low' WHERE i=0 AND j=1"], "cell (0, 1)'s final_loss is 'low'"),
    "edited nx": (["UPDATE meta SET value='5' WHERE key='nx'"], "its grid size nx=5, ny=4 does not match its 16 cells"),
    "extra not JSON": (["INSERT OR REPLACE INTO extra VALUES ('criterion', '[')"],
                       "extra 'criterion' is not valid JSON"),
    # rows whose values are of the right type but not what any run stores, each named by its cell
    "negative steps": (["UPDATE cells SET steps=-5 WHERE i=1 AND j=1"], "cell (1, 1) has -5 steps"),
    "more steps done than taken": (["UPDATE cells SET steps_done=steps+7 WHERE i=2 AND j=3"],
                                   "cell (2, 3) has 207 steps done of its 200"),
    "a billion steps": (["UPDATE cells SET steps=1000000000 WHERE i=0 AND j=0"], "cell (0, 0) has 1000000000 steps"),
    "hparams off the coordinates": (["UPDATE cells SET hparams=json_set(hparams, '$.lr', 0.5) WHERE i=2 AND j=1"],
                                    "cell (2, 1) has hyperparameters that disagree with its coordinates"),
    "another cell's hparams": (["UPDATE cells SET hparams=(SELECT hparams FROM cells WHERE i=0 AND j=0) "
                                "WHERE i=3 AND j=2"], "cell (3, 2) has hyperparameters that disagree"),
    "moved cell": (["UPDATE cells SET x=x*2 WHERE i=1 AND j=0"], "cell (1, 0) sits at"),
    "negative loss": (["UPDATE cells SET final_loss=-3 WHERE i=3 AND j=2"],
                      "cell (3, 2) has final_loss -3.0, below 0"),
    "unknown label": (["UPDATE cells SET label='convergedd' WHERE i=0 AND j=3"],
                      "cell (0, 3) is labelled 'convergedd'"),
    "unstable not a flag": (["UPDATE cells SET unstable=7 WHERE i=1 AND j=2"], "cell (1, 2) has unstable=7"),
    "stopped past its steps": (["UPDATE cells SET unstable_step=100000 WHERE i=3 AND j=3"],
                               "cell (3, 3) stopped at step 100000, outside its 200 steps"),
    "more losses than steps": (["UPDATE cells SET trajectory=zeroblob(8000) WHERE i=0 AND j=2"],
                               "cell (0, 2) holds 1000 losses for its 200 steps"),
    "no loss though done": (["UPDATE cells SET trajectory=x'' WHERE i=1 AND j=1"], "cell (1, 1) holds no loss"),
    "base losses cut short": (["UPDATE cells SET base_losses=substr(base_losses, 1, 80) WHERE i=2 AND j=2"],
                              "cell (2, 2) holds 10 base-model losses for its 200 losses"),
    "initial loss zero": (["UPDATE cells SET initial_loss=0 WHERE i=3 AND j=1"], "cell (3, 1) has initial_loss 0"),
}


# damage found when a study is opened: every command refuses it; in a row: every command that reads that row
WHOLE_STUDY = {"dropped column", "dropped table", "dropped meta", "config not JSON", "edited nx", "text for a loss",
               "negative steps", "more steps done than taken", "a billion steps", "hparams off the coordinates",
               "another cell's hparams",
               "moved cell", "negative loss", "unknown label", "unstable not a flag", "stopped past its steps",
               "more losses than steps", "no loss though done", "base losses cut short", "initial loss zero"}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_rows_and_tables_are_named_as_what_they_are(study, tmp_path, damage):
    statements, needle = DAMAGE[damage]
    sql(study, *statements)
    if damage == "extra not JSON":  # read by what follows the criterion
        commands = [["rules", study]]
    else:
        commands = [["export", study, "--trajectories", "-o", tmp_path / "x.csv"], ["classify", study]]
    if damage in WHOLE_STUDY:
        commands += [["status", study], ["rules", study], ["run", "--out", study], ["fractal", study],
                     ["plot", study, "--out", tmp_path / "plots"]]
    refused_unchanged(study, commands, str(study), needle, "restore study.db from a backup")
    assert not (tmp_path / "x.csv").exists()


def test_hparams_written_in_another_json_layout_are_the_same_hparams(study):
    """A row is checked against the text the store writes, and where that differs, against its JSON's values."""
    from vmap_sweep.store.db import StudyStore

    sql(study, "UPDATE cells SET hparams=replace(replace(hparams, ',', ', '), ':', ': ') WHERE i=1 AND j=1")
    with StudyStore.open(study) as store:
        assert store.nx * store.ny == len(store.rows())


def _cells_root_page(folder: Path) -> tuple[int, int]:
    """(page size, number of the first page of the cells table)."""
    conn = sqlite3.connect(folder / "study.db")
    try:
        return (conn.execute("PRAGMA page_size").fetchone()[0],
                conn.execute("SELECT rootpage FROM sqlite_master WHERE name='cells'").fetchone()[0])
    finally:
        conn.close()


def test_a_damaged_page_is_named_damaged_not_foreign(study, tmp_path):
    size, page = _cells_root_page(study)
    raw = bytearray((study / "study.db").read_bytes())
    assert raw.startswith(b"SQLite format 3\x00") and len(raw) >= page * size
    raw[(page - 1) * size:page * size] = b"\xa5" * size  # the cells table's first page: garbage
    (study / "study.db").write_bytes(bytes(raw))
    refused_unchanged(study, [["export", study, "--trajectories", "-o", tmp_path / "x.csv"]],
                      str(study), "is damaged", "malformed", "restore study.db from a backup")


def test_not_sqlite_is_said_only_of_a_file_that_is_not(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "study.db").write_bytes(b"PK\x03\x04" + bytes(8188))
    result = cli("status", tmp_path / "s")
    assert result.exit_code == 2 and "not a vmap-sweep study database (not SQLite)" in result.stderr


# ------------------------------------------------------------------------------------------------ disk full
def test_a_full_disk_is_named_and_the_write_is_all_or_nothing(tmp_path, monkeypatch):
    """SQLite told it may not grow the file (max_page_count: what a full disk looks like to it): a merge that
    adds cells to an earlier merge is refused as a full disk, and that study keeps what it held."""
    a, b = make_study(tmp_path / "a", range(2)), make_study(tmp_path / "b", range(2, 4))
    merged = tmp_path / "merged"
    ok("merge", a, "--out", merged, "--partial")
    connect = db._connect

    def full_disk(path, read_only=False):
        conn = connect(path, read_only)
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count={max(pages, 1)}")
        return conn

    monkeypatch.setattr(db, "_connect", full_disk)
    refused_unchanged(merged, [["merge", b, "--out", merged, "--partial"]],
                      str(merged), "the disk is full", "nothing of this write was stored", "free space")
    monkeypatch.undo()
    with StudyStore.open(merged) as store:
        assert store.done_count() == 8 and store.integrity_check() == "ok"


def test_an_io_error_on_a_full_disk_is_named_a_full_disk(tmp_path, monkeypatch):
    """Where the write-ahead log or its shared memory can't grow, SQLite says "disk I/O error": with no space left
    that is the full disk it is; with space, an I/O error."""
    error = sqlite3.OperationalError("disk I/O error")
    error.sqlite_errorcode = 4874  # SQLITE_IOERR_SHMSIZE
    free = {"bytes": 10 << 30}
    monkeypatch.setattr(db.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"]))
    assert "the disk reported an I/O error" in str(db.storage_error(tmp_path / "study.db", error))
    free["bytes"] = 4096
    assert "the disk is full (disk I/O error)" in str(db.storage_error(tmp_path / "study.db", error))


# ------------------------------------------------------------------------------------------------ read-only
def test_a_read_only_study_is_read_and_only_writers_refuse(study, tmp_path, monkeypatch):
    """As on read-only media (or a folder the user may not write): readers work, writers say it is read-only.
    (os.access decides; the database is then opened with SQLite's read-only mode, so nothing can be written.)"""
    monkeypatch.setattr(db, "_writable", lambda path: False)
    before = (study / "study.db").read_bytes()
    for args in (["status", study], ["export", study, "-o", tmp_path / "x.csv"], ["fractal", study],
                 ["rules", study], ["plot", study, "--out", tmp_path / "plots"], ["zoom-dimension", study]):
        ok(*args)
    other = shutil.copytree(study, tmp_path / "other")
    for args in (["classify", study], ["run", "--out", study], ["merge", other, "--out", study, "--partial"]):
        one_line_error(cli(*args), str(study), "the study is read-only", "make the folder and study.db writable")
    # SQLite's read-only mode may leave an empty write-ahead log beside it where the folder itself is writable
    assert (study / "study.db").read_bytes() == before and not any(p.read_bytes() for p in study.glob("*-wal"))
    with StudyStore.open(study) as store, pytest.raises(StoreError, match="read-only"):
        store.claim_writer()


def test_a_read_only_folder_really_is_read_and_refused_for_writing(made):
    """The same on a folder whose permissions forbid writing, in a real process (as an unprivileged user where the
    tests run as root, since root may write anywhere)."""
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: can't drop the right to write")
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    top = Path(tempfile.mkdtemp(prefix="vmap-sweep-ro-"))
    try:
        os.chmod(top, 0o755)
        folder = Path(shutil.copytree(made, top / "study"))
        before = snapshot(folder)
        logged = _with_a_commit_only_in_its_log(made, top / "logged")
        for p in (folder / "study.db", folder, *logged.iterdir(), logged):
            os.chmod(p, 0o555 if p.is_dir() else 0o444)
        env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(top)}
        cmd = [*as_user, sys.executable, "-c", "from vmap_sweep.cli import app; app()"]
        status = subprocess.run([*cmd, "status", str(folder)], capture_output=True, text=True, env=env, timeout=120)
        assert status.returncode == 0 and "16" in status.stdout, status.stderr
        classify = subprocess.run([*cmd, "classify", str(folder)], capture_output=True, text=True, env=env,
                                  timeout=120)
        assert classify.returncode == 2 and "read-only" in classify.stderr, classify.stderr
        assert len(classify.stderr.strip().splitlines()) == 1 and "not SQLite" not in classify.stderr
        assert snapshot(folder) == before
        # a log SQLite can't read without writing: refused, rather than read as if it held nothing
        status = subprocess.run([*cmd, "status", str(logged)], capture_output=True, text=True, env=env, timeout=120)
        assert status.returncode == 2 and "study.db-wal beside it holds commits not yet in study.db" in status.stderr
    finally:
        for p in top.rglob("*"):
            os.chmod(p, 0o755)
        shutil.rmtree(top, ignore_errors=True)


def _with_a_commit_only_in_its_log(study: Path, folder: Path) -> Path:
    """A copy of `study` as a crash leaves it: a commit in study.db-wal not yet folded into study.db, no -shm."""
    work = Path(shutil.copytree(study, folder.with_name(folder.name + "-work")))
    conn = sqlite3.connect(work / "study.db")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("UPDATE cells SET label='not_converged' WHERE i=0 AND j=0")
    conn.commit()
    folder.mkdir()
    for name in ("study.db", "study.db-wal"):
        shutil.copy(work / name, folder / name)
    conn.close()
    assert (folder / "study.db-wal").stat().st_size > 0
    return folder


# ------------------------------------------------------------------------------------------------ paths from the db
@pytest.mark.parametrize("child", ["../victim", "ABSOLUTE", "zoom-1-x/../../victim"])
def test_a_zoom_child_outside_the_study_is_refused_by_everything_that_follows_children(tmp_path, child):
    """A children row leading to a sibling study: classify (in its own process), merge, zoom-dimension and report
    refuse it, and neither study nor anything outside them changes."""
    study = make_study(tmp_path / "study")
    victim = make_study(tmp_path / "victim")
    child = str(victim) if child == "ABSOLUTE" else child
    sql(study, f"INSERT INTO children VALUES ('{child}', 0.1, 0.2, 300, 400, 1, '2026-01-01T00:00:00+00:00')")
    before, theirs = snapshot(study), snapshot(victim)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", "from vmap_sweep.cli import app; app()", "classify", str(study),
                           "--criterion", "threshold", "--converged-below", "4.5"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "leads outside the study folder" in proc.stderr and repr(child) in proc.stderr
    for args in (["merge", study, "--out", tmp_path / "merged", "--partial"], ["zoom-dimension", study],
                 ["report", study, "-o", tmp_path / "report.md"]):
        one_line_error(cli(*args), "leads outside the study folder", "remove that row")
    assert snapshot(study) == before and snapshot(victim) == theirs
    assert not (tmp_path / "merged" / "study.db").exists() and not (tmp_path / "report.md").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study", "victim"]


# ---------------------------------------------------------------------------------------------- the study's own log
def _log_of(folder: Path, statement: str) -> bytes:
    """The write-ahead log a crash would leave after `statement` committed in `folder`'s study (folder unchanged)."""
    work = Path(tempfile.mkdtemp(prefix="vmap-sweep-log-"))
    try:
        copy = Path(shutil.copytree(folder, work / "s"))
        conn = sqlite3.connect(copy / "study.db")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(statement)
        conn.commit()
        log = (copy / "study.db-wal").read_bytes()
        conn.close()
        return log
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_another_studys_log_beside_a_restored_study_is_refused_not_replayed(tmp_path):
    """The data loss this guards against: a finished study restored from a backup into a folder where another study
    of the same config crashed; SQLite replays that study's log over it on the first read (`status`), and the
    finished study becomes the other one. Refused, naming the log, with both files as they were; without the log,
    the study reads whole."""
    finished = make_study(tmp_path / "finished")
    other = make_study(tmp_path / "other", range(1))
    (finished / "study.db-wal").write_bytes(_log_of(other, "UPDATE cells SET label='not_converged' WHERE j=0"))
    before = snapshot(finished)
    for args in (["status", finished], ["export", finished, "-o", tmp_path / "x.csv"], ["run", "--out", finished],
                 ["classify", finished]):
        one_line_error(cli(*args), str(finished / "study.db-wal"), "not this study's own write-ahead log",
                       "finished cell", "move study.db-wal")
    assert snapshot(finished) == before
    (finished / "study.db-wal").unlink()
    with StudyStore.open(finished) as store:
        assert store.done_count() == 16


def test_an_older_log_of_the_same_study_is_refused(tmp_path):
    """A log left by a crash of this same study, beside a later backup of it: replaying it would put back pages
    older than the results the backup holds."""
    half = make_study(tmp_path / "half", range(2))
    older = _log_of(half, "UPDATE cells SET label='not_converged' WHERE j<2")
    finished = Path(shutil.copytree(half, tmp_path / "finished"))
    with StudyStore.open(finished) as store:
        cells = store.pending()
        store.record_batch([(c, record(c.i, c.j)) for c in cells], labeller=label_record)
    (finished / "study.db-wal").write_bytes(older)
    before = snapshot(finished)
    one_line_error(cli("status", finished), "study.db-wal", "not this study's own write-ahead log")
    assert snapshot(finished) == before


def test_the_studys_own_log_after_a_crash_is_replayed(made, tmp_path):
    """What the log is for: a commit a crash left only in the log is read (and kept) by the next command."""
    logged = _with_a_commit_only_in_its_log(made, tmp_path / "logged")
    ok("status", logged)
    with StudyStore.open(logged) as store:
        assert store.labels_array()[0, 0] == "not_converged" and store.done_count() == 16


@pytest.mark.parametrize("kind", ["rollback journal", "fifo log", "link log", "folder log"])
def test_a_journal_that_a_study_never_writes_is_refused(study, tmp_path, kind):
    if kind == "rollback journal":
        (study / "study.db-journal").write_bytes(b"\xd9\xd5\x05\xf9\x20\xa1\x63\xd7" + bytes(504))
        needles = ["study.db-journal", "rollback journal", "not this study's own"]
    elif kind == "fifo log":
        os.mkfifo(study / "study.db-wal")  # opened, it would block every command forever
        needles = ["study.db-wal", "not a plain file"]
    elif kind == "link log":
        other = make_study(tmp_path / "other", range(1))
        (tmp_path / "log").write_bytes(_log_of(other, "UPDATE cells SET label='x' WHERE j=0"))
        os.symlink(tmp_path / "log", study / "study.db-wal")
        needles = ["study.db-wal", "not a plain file"]
    else:
        (study / "study.db-wal").mkdir()
        needles = ["study.db-wal", "not a plain file"]
    refused_unchanged(study, [["status", study], ["rules", study], ["run", "--out", study]], *needles)


# ------------------------------------------------------------------------------------------------ the lock
def test_the_lock_holds_by_the_database_file_wherever_it_is_reached_from(study, tmp_path):
    """A folder whose study.db is a symbolic link into a study being trained is that study: a second trainer there
    waits for the same lock. A hard link (a second name the lock can't see) is refused for training."""
    alias = tmp_path / "alias"
    alias.mkdir()
    os.symlink(study / "study.db", alias / "study.db")
    with StudyStore.open(study) as trainer:
        trainer.claim_writer()
        with StudyStore.open(alias) as second, pytest.raises(StoreError, match="is being trained by pid"):
            second.claim_writer()
        one_line_error(cli("run", "--out", alias), str(alias), str(study / "study.db"), "is being trained by pid")
    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(study / "study.db", hard / "study.db")
    with StudyStore.open(hard) as store, pytest.raises(StoreError, match="has 2 hard links"):
        store.claim_writer()


# ------------------------------------------------------------------------------------------------ outputs
@pytest.mark.parametrize("link", ["symbolic", "hard"])
@pytest.mark.parametrize("target", ["study.db", "study.db-wal"])
def test_no_output_replaces_a_file_of_the_study(made, tmp_path, link, target):
    """An output path that is a link to the study's database or its log (or names them) is refused by every
    command that writes a file, before any work, and the study reads as it did."""
    study = Path(shutil.copytree(made, tmp_path / "study"))
    if target == "study.db-wal":
        study = _with_a_commit_only_in_its_log(made, tmp_path / "logged")
    out = tmp_path / "out"
    out.mkdir()
    make = os.symlink if link == "symbolic" else os.link
    names = {"fractal.png": ["fractal", study, "--plot"], "report.md": ["report", study, "-o"],
             "cells.csv": ["export", study, "-o"], "rules.png": ["rules", study, "--plot"],
             "compare.png": ["compare", study, study, "--plot"], "fractal.json": None}
    for name in names:
        make(study / target, out / name)
    plots = tmp_path / "plots"
    plots.mkdir()
    make(study / target, plots / "score.png")
    ok("status", study)  # the study's own log is folded into study.db by the first read: the links stay
    before = snapshot(study)
    for name, args in names.items():
        if args is not None:
            one_line_error(cli(*args, out / name), str(out / name), "may not replace a study's own file")
    one_line_error(cli("plot", study, "--out", plots), "score.png", "may not replace a study's own file")
    one_line_error(cli("fractal", study, "--plot", study / target), "may not replace a study's own file")
    for name in ("study.db-shm", "study.lock", "study.db-journal"):  # by name alone, whether the file exists or not
        one_line_error(cli("export", study, "-o", study / name, "--format", "csv"), "may not replace a study's own")
    assert snapshot(study) == before
    ok("status", study)


def test_a_log_another_process_has_open_is_that_process_s_and_is_read(study):
    """A log held open by a live connection of another process (a sqlite3 shell, another command) is that
    connection's: read, not refused, even where it holds what a restored backup's stray log would."""
    code = ("import sqlite3, sys, time\n"
            "conn = sqlite3.connect(sys.argv[1]); conn.execute('PRAGMA wal_autocheckpoint=0')\n"
            "conn.execute(\"UPDATE cells SET status='pending' WHERE i=1 AND j=1\"); conn.commit()\n"
            "print('ready', flush=True); sys.stdin.read(); conn.close()\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(study / "study.db")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert (study / "study.db-wal").stat().st_size > 32
        ok("status", study)
        with StudyStore.open(study) as store:
            assert store.done_count() == 15
    finally:
        child.communicate("", timeout=60)
