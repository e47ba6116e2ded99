"""StudyStore: creation, refusals that change nothing, exact round trips, atomic batches, crash safety, merge."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import STORE_CONFIG, Rec, bits, new_store, rec_for, snapshot, store_grid

from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.store.db import DB_NAME, StudyStore, canonical_json, config_hash
from vmap_sweep.store.merge import merge_studies
from vmap_sweep.study.plan import plan_batches, shard

ROOT = Path(__file__).resolve().parents[1]
# ------------------------------------------------------------------ create / open
def test_create_writes_meta_and_pending_cells(tmp_path):
    cells = store_grid().cells()
    with new_store(tmp_path) as s:
        assert s.pending() == cells and s.cells() == cells
        assert s.done_count() == 0 and s.cell_count() == 12 and (s.nx, s.ny) == (4, 3)
        assert s.config == STORE_CONFIG and s.config_hash == config_hash(STORE_CONFIG)
    con = sqlite3.connect(tmp_path / "study" / DB_NAME)
    meta = dict(con.execute("SELECT key, value FROM meta"))
    assert meta["schema_version"] == "1" and meta["app"] == "vmap-sweep" and meta["created"]
    assert meta["config"] == '{"grid":{"res":[4,3],"x":"lr:1e-5:1e-2:log","y":"tokens:1000:8000:log"},' \
                             '"model":{"depth":1},"seed":0}'
    assert meta["config_hash"] == hashlib.sha256(meta["config"].encode()).hexdigest()
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT count(*) FROM cells WHERE status='pending'").fetchone()[0] == 12
    con.close()


def test_reopen_same_config_resumes(tmp_path):
    with new_store(tmp_path) as s:
        s.record_batch([(c, rec_for(c.i, c.j)) for c in store_grid().cells()[:4]], batch_index=0)
    # key order of the config does not matter (canonical JSON)
    reordered = {"model": {"depth": 1}, "seed": 0, "grid": dict(reversed(list(STORE_CONFIG["grid"].items())))}
    with StudyStore.create_or_open(tmp_path / "study", reordered, store_grid().cells()) as s:
        assert s.done_count() == 4 and s.pending() == store_grid().cells()[4:]


def test_different_config_refused_and_nothing_changes(tmp_path):
    with new_store(tmp_path) as s:
        s.record_batch([((0, 0), rec_for(0, 0))])
    before = snapshot(tmp_path / "study", mtimes=True)
    other = {**STORE_CONFIG, "seed": 1, "grid": {**STORE_CONFIG["grid"], "x": "lr:1e-5:1e-1:log"}}
    with pytest.raises(StoreError) as e:
        StudyStore.create_or_open(tmp_path / "study", other, store_grid().cells())
    msg = str(e.value)
    assert "seed: 0 -> 1" in msg and 'grid.x: "lr:1e-5:1e-2:log" -> "lr:1e-5:1e-1:log"' in msg
    assert "--out" in msg and "\n" not in msg
    assert snapshot(tmp_path / "study", mtimes=True) == before
    with StudyStore.open(tmp_path / "study") as s:
        assert s.done_count() == 1 and s.config == STORE_CONFIG


def test_non_sqlite_file_refused_unchanged(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    (d / DB_NAME).write_bytes(b"hello, this is not a database" * 10)
    before = snapshot(d, mtimes=True)
    with pytest.raises(StoreError, match="is not a vmap-sweep study database"):
        StudyStore.create_or_open(d, STORE_CONFIG, store_grid().cells())
    with pytest.raises(StoreError, match="is not a vmap-sweep study database"):
        StudyStore.open(d)
    assert snapshot(d, mtimes=True) == before


def test_foreign_sqlite_refused_unchanged(tmp_path):
    d = tmp_path / "study"
    d.mkdir()
    con = sqlite3.connect(d / DB_NAME)
    con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('owner', 'someone else')")
    con.commit()
    con.close()
    before = snapshot(d, mtimes=True)
    with pytest.raises(StoreError, match="is not a vmap-sweep study database"):
        StudyStore.create_or_open(d, STORE_CONFIG, store_grid().cells())
    assert snapshot(d, mtimes=True) == before


def test_other_schema_version_refused(tmp_path):
    new_store(tmp_path).close()
    con = sqlite3.connect(tmp_path / "study" / DB_NAME)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="schema version 99"):
        StudyStore.open(tmp_path / "study")


def test_unwritable_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="can't create the study folder"):
        StudyStore.create_or_open(blocker / "study", STORE_CONFIG, store_grid().cells())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / DB_NAME).mkdir()
    with pytest.raises(StoreError, match="is not a file"):
        StudyStore.create_or_open(tmp_path / "d", STORE_CONFIG, store_grid().cells())
    with pytest.raises(StoreError, match="no study.db"):
        StudyStore.open(tmp_path / "nowhere")


def test_changed_cells_with_same_config_refused(tmp_path):
    new_store(tmp_path).close()
    with pytest.raises(StoreError, match="cells differ"):
        StudyStore.create_or_open(tmp_path / "study", STORE_CONFIG, store_grid().cells()[:5])
    with pytest.raises(ConfigError, match="repeats"):
        StudyStore.create_or_open(tmp_path / "x", STORE_CONFIG, store_grid().cells()[:2] * 2)
    with pytest.raises(ConfigError, match="JSON"):
        StudyStore.create_or_open(tmp_path / "y", {"a": object()}, store_grid().cells())


# ------------------------------------------------------------------ records
def test_record_roundtrip_exact(tmp_path):
    cells = store_grid().cells()
    with new_store(tmp_path) as s:
        s.record_batch([(c, rec_for(c.i, c.j)) for c in cells[:6]], batch_index=0, shard="1/2")
        s.record_batch([((c.i, c.j), rec_for(c.i, c.j)) for c in cells[6:10]], batch_index=1)
    with StudyStore.open(tmp_path / "study") as s:
        assert s.done_count() == 10 and s.pending() == cells[10:]
        traj = s.trajectories()
        assert set(traj) == {(c.i, c.j) for c in cells[:10]}
        for c in cells[:10]:
            r = rec_for(c.i, c.j)
            np.testing.assert_array_equal(bits(traj[(c.i, c.j)]), bits(r.losses))
            np.testing.assert_array_equal(bits(s.trajectories("grad_norms")[(c.i, c.j)]), bits(r.grad_norms))
            np.testing.assert_array_equal(bits(s.trajectories("lrs")[(c.i, c.j)]), bits(r.lrs))
        final = s.grid_arrays("final_loss")
        assert final.shape == (3, 4)
        for c in cells:
            if c in cells[:10]:
                r = rec_for(c.i, c.j)
                assert bits(final[c.j, c.i]) == bits(r.losses[-1])  # last loss, nan kept as nan
                assert s.grid_arrays("initial_loss")[c.j, c.i] == r.initial_loss
                ev = s.grid_arrays("eval_loss")[c.j, c.i]
                assert (np.isnan(ev) if r.eval_loss is None else ev == r.eval_loss)
                assert s.grid_arrays("unstable")[c.j, c.i] == float(r.unstable)
            else:
                assert np.isnan(final[c.j, c.i])  # pending
        np.testing.assert_array_equal(s.grid_arrays("x")[0], store_grid().xs)  # x known even when pending
        rows = {(r["i"], r["j"]): r for r in s.rows()}
        assert rows[(0, 0)]["shard"] == "1/2" and rows[(0, 0)]["batch_index"] == 0
        assert rows[(2, 1)]["batch_index"] == 1 and rows[(2, 1)]["status"] == "done"
        assert rows[(3, 2)]["status"] == "pending" and rows[(3, 2)]["steps"] is None
        assert rows[(0, 0)]["unstable"] is True and rows[(0, 0)]["unstable_step"] == 2
        with pytest.raises(ConfigError, match="unknown field"):
            s.grid_arrays("hparams")


def test_nan_payloads_canonicalised(tmp_path):
    weird = np.array([0x7FF8000000000001, 0xFFF8000000000000], dtype=np.uint64).view(np.float64)
    with new_store(tmp_path) as s:
        s.record_batch([((0, 0), Rec(losses=list(weird)))])
        got = s.trajectories()[(0, 0)]
    assert list(bits(got)) == [bits(np.nan)] * 2


def test_record_batch_atomic(tmp_path):
    cells = store_grid().cells()
    with new_store(tmp_path) as s:
        s.record_batch([(cells[0], Rec())])
        before = s.rows(arrays=True)
        # second cell of this batch is already done: nothing of the batch is written
        with pytest.raises(StoreError, match=r"cell \(0, 0\) is already done"):
            s.record_batch([(cells[1], Rec()), (cells[0], Rec()), (cells[2], Rec())])
        with pytest.raises(StoreError, match="already done"):
            s.record_batch([(cells[3], Rec()), (cells[3], Rec())])  # same cell twice in one batch
        with pytest.raises(StoreError, match="not in this study"):
            s.record_batch([(cells[4], Rec()), ((9, 9), Rec())])
        with pytest.raises(AttributeError):
            s.record_batch([(cells[5], Rec()), (cells[6], object())])  # not a record
        after = s.rows(arrays=True)
        assert [r["status"] for r in after] == [r["status"] for r in before]
        assert s.done_count() == 1 and s.pending() == cells[1:]


def test_labels_counts_and_arrays(tmp_path):
    cells = store_grid().cells()
    with new_store(tmp_path) as s:
        s.record_batch([(c, rec_for(c.i, c.j)) for c in cells[:5]])
        labels = {(0, 0): ("not_converged", 3.0), (1, 0): ("converged", -2.5), (2, 0): ("converged", -1.0)}
        s.relabel(lambda rows: labels, {"criterion": "ratio"})
        assert s.label_counts() == {"converged": 2, "not_converged": 1, "unlabelled": 2}
        lab = s.labels_array()
        assert lab.shape == (3, 4) and lab[0, 0] == "not_converged" and lab[0, 1] == "converged" and lab[2, 3] == ""
        assert s.grid_arrays("score")[0, 1] == -2.5 and np.isnan(s.grid_arrays("score")[0, 3])
        # only done cells take a class: a pending one in the mapping stays unlabelled
        s.relabel(lambda rows: {(3, 0): ("marginal", 0.0), (3, 2): ("converged", -1.0)}, {"criterion": "ratio"})
        assert s.labels_array()[0, 3] == "marginal" and s.labels_array()[2, 3] == ""
        assert s.label_counts()["unlabelled"] == 1


def test_children_and_extras(tmp_path):
    with new_store(tmp_path) as s:
        c = s.add_child((1e-4, 1e-3, 2000, 4000), "zoom/1", 1)
        assert c.window == (1e-4, 1e-3, 2000.0, 4000.0) and c.level == 1
        s.add_child((1e-4, 1e-3, 2000, 4000), "zoom/1", 1)  # idempotent
        with pytest.raises(StoreError, match="already holds window"):
            s.add_child((1e-4, 2e-3, 2000, 4000), "zoom/1", 1)
        s.add_child((2e-4, 1e-3, 2000, 3000), "zoom/2", 2)
        s.put_extra("eval", {"hellaswag": [0.25, 0.5], "n": 3})
        s.put_extra("note", "text")
    with StudyStore.open(tmp_path / "study") as s:
        assert [(c.child_dir, c.level) for c in s.children()] == [("zoom/1", 1), ("zoom/2", 2)]
        assert s.get_extra("eval") == {"hellaswag": [0.25, 0.5], "n": 3} and s.get_extra("note") == "text"
        assert s.get_extra("missing", 7) == 7


# ------------------------------------------------------------------ crash safety
CHILD = textwrap.dedent("""
    import os, signal, sys
    from vmap_sweep.study.axes import parse_axis_spec
    from vmap_sweep.study.grid import Grid
    from vmap_sweep.study.plan import plan_batches
    from vmap_sweep.store.db import StudyStore
    sys.path.insert(0, {tests!r})
    from helpers import STORE_CONFIG, rec_for, store_grid
    mode = sys.argv[1]
    batches = plan_batches(store_grid().cells(), 3, lambda c: 3)
    store = StudyStore.create_or_open(sys.argv[2], STORE_CONFIG, store_grid().cells())
    if mode == "mid":
        calls = []
        orig = StudyStore._require
        def boom(self, conn, i, j, want):
            calls.append(1)
            if len(calls) == 3 * 2 + 2:  # second cell of the third batch: its first UPDATE is written
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(self, conn, i, j, want)
        StudyStore._require = boom
    for b in batches:
        store.record_batch([(c, rec_for(c.i, c.j)) for c in b.cells], batch_index=b.index)
        if mode == "after" and b.index == 1:
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("mode", ["after", "mid"])
def test_sigkill_keeps_committed_batches(tmp_path, mode):
    d = tmp_path / "study"
    script = CHILD.format(tests=str(ROOT / "tests"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-c", script, mode, str(d)], env=env, capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()
    batches = plan_batches(store_grid().cells(), 3, lambda c: 3)
    committed = [c for b in batches[:2] for c in b.cells]
    with StudyStore.create_or_open(d, STORE_CONFIG, store_grid().cells()) as s:
        assert s.integrity_check() == "ok"
        assert s.done_count() == 6
        done = {k for k in s.trajectories()}
        assert done == {(c.i, c.j) for c in committed}
        assert s.pending() == [c for c in store_grid().cells() if (c.i, c.j) not in done]
        rows = {(r["i"], r["j"]): r for r in s.rows()}
        assert {rows[(c.i, c.j)]["batch_index"] for c in committed} == {0, 1}
        # resume: the rest can be recorded
        for b in batches[2:]:
            s.record_batch([(c, rec_for(c.i, c.j)) for c in b.cells], batch_index=b.index)
        assert s.done_count() == 12


# ------------------------------------------------------------------ merge
def run_shard(tmp_path: Path, k: int, n: int, config=STORE_CONFIG, tweak=None) -> Path:
    batches = plan_batches(store_grid().cells(), 2, lambda c: 3)
    d = tmp_path / f"shard{k}of{n}"
    with StudyStore.create_or_open(d, config, store_grid().cells()) as s:
        for b in shard(batches, k, n):
            recs = [(c, rec_for(c.i, c.j) if tweak is None else tweak(c)) for c in b.cells]
            s.record_batch(recs, batch_index=b.index, shard=f"{k}/{n}")
    return d


def test_merge_union_of_shards(tmp_path):
    dirs = [run_shard(tmp_path, k, 3) for k in (1, 2, 3)]
    with StudyStore.open(dirs[0]) as s0:
        s0.put_extra("eval", {"a": 1})
        s0.add_child((1e-4, 1e-3, 2000, 4000), "zoom/1", 1)
    StudyStore.create_or_open(dirs[0] / "zoom/1", STORE_CONFIG, store_grid().cells()).close()  # the child's own study
    with merge_studies(dirs, tmp_path / "merged") as m:
        assert m.done_count() == 12 and m.pending() == [] and m.config == STORE_CONFIG
        assert m.get_extra("eval") == {"a": 1} and [c.child_dir for c in m.children()] == ["zoom/1"]
        traj = m.trajectories()
        for c in store_grid().cells():
            np.testing.assert_array_equal(bits(traj[(c.i, c.j)]), bits(rec_for(c.i, c.j).losses))
        assert {r["shard"] for r in m.rows()} == {"1/3", "2/3", "3/3"}
    with StudyStore.open(tmp_path / "merged" / "zoom/1") as child:  # the child came along with its row
        assert child.config == STORE_CONFIG
    # merging again into the same folder (e.g. after more shards finished) is a no-op, not an error
    with merge_studies(dirs, tmp_path / "merged") as m:
        assert m.done_count() == 12
    # partial merge (asked for): only the cells of the given shards
    with merge_studies(dirs[:1], tmp_path / "partial", partial=True) as m:
        with StudyStore.open(dirs[0]) as s0:
            assert m.done_count() == s0.done_count() > 0


def test_merge_refuses_other_config_and_conflicts(tmp_path):
    a = run_shard(tmp_path, 1, 2)
    other = run_shard(tmp_path / "o", 2, 2, config={**STORE_CONFIG, "seed": 5})
    with pytest.raises(StoreError) as e:
        merge_studies([a, other], tmp_path / "m1")
    assert str(other) in str(e.value) and "seed: 0 -> 5" in str(e.value)
    assert not (tmp_path / "m1").exists()
    # the same cells done twice with equal results merge fine (a repeated shard: --partial); different results
    # are refused
    same = run_shard(tmp_path / "s", 1, 2)
    with merge_studies([a, same], tmp_path / "m2", partial=True) as m:
        assert m.done_count() == 6
    diff = run_shard(tmp_path / "d", 1, 2, tweak=lambda c: replace(rec_for(c.i, c.j), initial_loss=1.0))
    with pytest.raises(StoreError, match="different results"):
        merge_studies([a, diff], tmp_path / "m3", partial=True)
    with pytest.raises(ConfigError, match="one of the shards"):
        merge_studies([a], a)
    with pytest.raises(ConfigError):
        merge_studies([], tmp_path / "m4")


def test_merge_refuses_an_incomplete_or_repeated_set_of_shards(tmp_path):
    dirs = [run_shard(tmp_path, k, 4) for k in (1, 2, 3, 4)]
    refused = [([dirs[0]], "shards 2/4, 3/4, 4/4 are missing"),
               (dirs[:3], "shard 4/4 is missing (the study was split into 4 parts)")]
    for given, needle in refused:
        with pytest.raises(StoreError, match="--partial") as e:
            merge_studies(given, tmp_path / "m")
        assert needle in str(e.value) and "\n" not in str(e.value)
        assert not (tmp_path / "m").exists()  # refused before anything is written
    for given in ([*dirs, dirs[1]], [*dirs, tmp_path / "." / dirs[1].name]):  # --partial or not
        for partial in (False, True):
            with pytest.raises(ConfigError, match=f"{given[-1]} is given twice; give each shard folder once$"):
                merge_studies(given, tmp_path / "m", partial=partial)
            assert not (tmp_path / "m").exists()
    # two folders of one part (a copy of shard 2, say): refused, naming both
    twin = run_shard(tmp_path / "copy", 2, 4)
    with pytest.raises(StoreError, match="shard 2/4 is in both") as e:
        merge_studies([*dirs, twin], tmp_path / "m")
    assert str(dirs[1]) in str(e.value) and str(twin) in str(e.value)
    # shards of two different splits
    with pytest.raises(StoreError, match="splits into 3 and 4 parts"):
        merge_studies([*dirs, run_shard(tmp_path, 1, 3)], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    # the folder name alone counts too: a shard-K-of-N folder that finished nothing yet is still that part
    empty = tmp_path / "named" / "shard-4-of-4"
    StudyStore.create_or_open(empty, STORE_CONFIG, store_grid().cells()).close()
    with merge_studies([*dirs[:3], empty], tmp_path / "m") as m:
        assert 0 < m.done_count() < 12
    # --partial merges what there is; a later merge into the same folder counts the parts it already holds
    with merge_studies(dirs[:2], tmp_path / "p", partial=True) as m:
        assert m.done_count() < 12
    with merge_studies(dirs[2:], tmp_path / "p") as m:
        assert m.done_count() == 12
    # studies not made by --shard have no parts to count: merged as before
    whole = new_store(tmp_path, "whole")
    whole.close()
    with merge_studies([whole.directory], tmp_path / "w") as m:
        assert m.done_count() == 0


# ------------------------------------------------------------------ a study's folder
def test_a_folder_of_other_files_is_refused_before_anything_is_written(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    before = snapshot(folder)
    with pytest.raises(StoreError) as e:
        new_store(tmp_path, "mine")
    assert str(e.value) == f"{folder} is not empty and holds no study; choose an empty or new folder"
    assert snapshot(folder) == before and not (folder / DB_NAME).exists()
    # an empty existing folder, a new folder and a study folder (resume) are fine
    (tmp_path / "empty").mkdir()
    for name in ("empty", "new", "empty", "new"):
        with new_store(tmp_path, name) as s:
            assert s.cell_count() == 12
    # a zoom child's folder inside a study folder is new (then a study): the study's own files don't matter
    child = tmp_path / "new" / "zoom-1"
    for _ in range(2):
        StudyStore.create_or_open(child, STORE_CONFIG, store_grid().cells()).close()
    assert (child / DB_NAME).is_file()




OLDER_CONFIG = {**STORE_CONFIG, "batch_size": 8}  # rows per step, under its older key
TODAYS_CONFIG = {**STORE_CONFIG, "rows_per_step": 8}


def _older_study(tmp_path: Path) -> tuple[Path, dict]:
    """A study as vmap-sweep wrote it before the trainer's flag and the class were named apart, and rows per step
    from the batch_size axis: the flag in columns `diverged` and `diverged_step`, the class "not converged" stored
    as "diverged", rows per step under the config key `batch_size`. Returns its folder and the rows as today's
    names read them."""
    cells = store_grid().cells()
    with new_store(tmp_path) as s:
        s.record_batch([(c, rec_for(c.i, c.j)) for c in cells[:6]])
        s.relabel(lambda rows: {(0, 0): ("not_converged", 3.0), (1, 0): ("converged", -2.5),
                                (2, 0): ("marginal", 0.5)}, {"criterion": "ratio"})
        expected = {(r["i"], r["j"]): r for r in s.rows(arrays=True)}
    path = tmp_path / "study" / DB_NAME
    con = sqlite3.connect(path)
    con.execute("ALTER TABLE cells RENAME COLUMN unstable TO diverged")
    con.execute("ALTER TABLE cells RENAME COLUMN unstable_step TO diverged_step")
    text = canonical_json(OLDER_CONFIG)
    con.executemany("UPDATE meta SET value = ? WHERE key = ?",
                    [(text, "config"), (config_hash(OLDER_CONFIG), "config_hash")])
    con.execute("UPDATE cells SET label='diverged' WHERE label='not_converged'")
    con.commit()
    con.close()
    return tmp_path / "study", expected


def _columns_and_labels(path: Path) -> tuple[set, set]:
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    columns = {r[1] for r in con.execute("PRAGMA table_info(cells)")}
    labels = {r[0] for r in con.execute("SELECT label FROM cells WHERE label IS NOT NULL")}
    con.close()
    return columns, labels


def _assert_reads_as_today(store: StudyStore, expected: dict) -> None:
    got = {(r["i"], r["j"]): r for r in store.rows(arrays=True)}
    assert got.keys() == expected.keys()
    assert store.config == TODAYS_CONFIG and store.config_hash == config_hash(TODAYS_CONFIG)
    for key, r in expected.items():
        assert got[key]["unstable"] == r["unstable"] and got[key]["label"] == r["label"], key
        assert got[key]["unstable_step"] == r["unstable_step"], key
        assert np.array_equal(bits(got[key]["trajectory"]), bits(r["trajectory"]))
    assert store.labels_array()[0, 0] == "not_converged"
    assert store.label_counts() == {"converged": 1, "not_converged": 1, "marginal": 1, "unlabelled": 3}
    flags = store.grid_arrays("unstable")
    assert all(flags[j, i] == float(r["unstable"]) if r["status"] == "done" else np.isnan(flags[j, i])
               for (i, j), r in expected.items())
    assert any(r["unstable"] for r in expected.values())  # the older column's flags, not only zeros


def test_an_older_study_on_a_read_only_path_reads_with_todays_names(tmp_path, monkeypatch):
    from vmap_sweep.store import db

    folder, expected = _older_study(tmp_path)
    before = (folder / DB_NAME).read_bytes()
    monkeypatch.setattr(db, "_writable", lambda path: False)
    with StudyStore.open(folder) as store:
        assert store.read_only
        _assert_reads_as_today(store, expected)
    assert (folder / DB_NAME).read_bytes() == before  # read as it is: nothing written
    columns, labels = _columns_and_labels(folder / DB_NAME)
    assert "diverged" in columns and "unstable" not in columns and labels == {"diverged", "converged", "marginal"}
    assert "diverged_step" in columns and "unstable_step" not in columns


def test_an_older_threshold_criterion_reads_under_todays_option_name(tmp_path):
    from vmap_sweep.store.extras import CRITERION, criterion

    with new_store(tmp_path) as s:
        s.put_extra(CRITERION, {"criterion": "threshold", "converged_below": 3.0, "diverged_above": 9.0})
        today = {"criterion": "threshold", "converged_below": 3.0, "not_converged_above": 9.0}
        assert criterion(s) == today
        # every reader of the extras sees today's name: shards stored under either name merge as one
        assert s.extras()[CRITERION] == today and s.get_extra(CRITERION) == today


def test_an_older_study_resumes_under_todays_config_keys(tmp_path):
    folder, _ = _older_study(tmp_path)
    cells = store_grid().cells()
    with StudyStore.create_or_open(folder, TODAYS_CONFIG, cells) as store:
        assert store.config == TODAYS_CONFIG and store.config_hash == config_hash(TODAYS_CONFIG)


def test_an_older_writable_study_is_migrated_when_opened_and_trains_on(tmp_path):
    folder, expected = _older_study(tmp_path)
    with StudyStore.open(folder) as store:
        _assert_reads_as_today(store, expected)
    columns, labels = _columns_and_labels(folder / DB_NAME)
    assert "unstable" in columns and "diverged" not in columns
    assert "unstable_step" in columns and "diverged_step" not in columns
    assert labels == {"not_converged", "converged", "marginal"}
    cells = store_grid().cells()
    with pytest.raises(StoreError, match="rows_per_step: 8 -> 4"):  # the config was migrated, not replaced
        StudyStore.create_or_open(folder, {**STORE_CONFIG, "rows_per_step": 4}, cells)
    with StudyStore.create_or_open(folder, TODAYS_CONFIG, cells) as store:  # a resume writes today's names
        store.record_batch([(cells[6], rec_for(cells[6].i, cells[6].j))])
        assert store.done_count() == 7


def test_cells_read_their_hyperparameters_as_stored_whether_or_not_the_text_is_the_stores(tmp_path):
    """Rows whose text is the one the store writes are read without parsing it: the same objects, keys in the same
    order, values of the same types as json.loads gives; a row written otherwise (the same values) is parsed; and
    no two cells share an object that changing one would change in the other."""
    import json

    from helpers import STUDY_STORE_CONFIG

    with new_store(tmp_path, config=STUDY_STORE_CONFIG) as s:
        path = s.path
    with sqlite3.connect(path) as conn:  # one row as another writer might put the same values
        text = conn.execute("SELECT hparams FROM cells WHERE i=2 AND j=1").fetchone()[0]
        spaced = json.dumps(dict(reversed(json.loads(text).items())), indent=1)
        conn.execute("UPDATE cells SET hparams=? WHERE i=2 AND j=1", (spaced,))
    with StudyStore.open(path.parent) as s:
        assert s._grid_rows.parsed is not None  # the rows of the store's own text are read from its template
        cells = s.cells()
        raw = s._conn.execute("SELECT hparams FROM cells ORDER BY j, i").fetchall()
    for c, (text,) in zip(cells, raw, strict=True):
        want = json.loads(text)
        assert c.hparams == want and list(c.hparams) == list(want)
        assert [type(v) for v in c.hparams.values()] == [type(v) for v in want.values()]
    assert list(cells[1 * 4 + 2].hparams) == list(reversed(list(cells[0].hparams)))  # the spaced row, as written
    cells[0].hparams["lr"] = -1.0
    assert all(c.hparams["lr"] > 0 for c in cells[1:])
