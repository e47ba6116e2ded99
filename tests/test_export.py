"""Export: every format reads back bit-for-bit (nan, inf, -0.0 included), one column per hyperparameter named after
it, the stability column, pending cells and errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import STUDY_STORE_CONFIG, bits, new_store, rec_for, store_grid

from vmap_sweep.analysis.export import ARRAY_COLUMNS, COLUMNS, export_study
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import StudyStore

FLOATS = ("score", "initial_loss", "final_loss", "eval_loss", "wall_time")
HPARAMS = ["lr", "tokens"]  # the helpers' grid: lr x tokens, nothing fixed
HEADER = ["i", "j", *HPARAMS, *COLUMNS]


@pytest.fixture
def store(tmp_path) -> StudyStore:
    s = new_store(tmp_path, config=STUDY_STORE_CONFIG)
    cells = store_grid().cells()
    s.record_batch([(c, rec_for(c.i, c.j)) for c in cells[:7]], batch_index=0)
    s.record_batch([((3, 1), rec_for(3, 1).__class__(losses=[1e-310, -0.0, float("-inf")]))], batch_index=1)
    s.relabel(lambda rows: {(0, 0): ("not_converged", float("inf")), (1, 0): ("converged", -1.0 / 3)},
              {"criterion": "ratio"})
    yield s
    s.close()


def expected(store: StudyStore) -> list[dict]:
    return store.rows(arrays=True)


def check_rows(store: StudyStore, got: dict[str, list], trajectories: list | None) -> None:
    exp = expected(store)
    assert list(got["i"]) == [r["i"] for r in exp] and list(got["j"]) == [r["j"] for r in exp]
    for c in FLOATS:
        np.testing.assert_array_equal(bits(got[c]), bits([r[c] for r in exp]), err_msg=c)
    assert list(got["status"]) == [r["status"] for r in exp]
    assert [lab or None for lab in got["label"]] == [r["label"] for r in exp]
    for name in HPARAMS:  # one column per hyperparameter, the value each cell trained with
        assert [float(v) for v in got[name]] == [float(r["hparams"][name]) for r in exp], name
    assert [s or None for s in got["stability"]] == [
        None if r["unstable"] is None else "unstable" if r["unstable"] else "stable" for r in exp]
    if trajectories is not None:
        for r, t in zip(exp, trajectories, strict=True):
            if r["status"] == "done":
                np.testing.assert_array_equal(bits(t), bits(r["trajectory"]))
            else:
                assert t is None or len(t) == 0


def test_values_cover_special_floats(store):
    finals = store.grid_arrays("final_loss")
    assert np.isnan(finals).sum() > 0 and np.isneginf(finals[1, 3])
    assert np.isinf(store.grid_arrays("score")[0, 0])


@pytest.mark.parametrize("traj", [False, True])
def test_csv_roundtrip(store, tmp_path, traj):
    path = export_study(StudyView.load(store), "csv", tmp_path / "out.csv", trajectories=traj)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == HEADER + (list(ARRAY_COLUMNS) if traj else [])
    assert [r["tokens"] for r in rows][:4] == ["1000"] * 4  # a whole-number hyperparameter is written as one
    got = {c: [r[c] for r in rows] for c in rows[0]}
    got["i"] = [int(v) for v in got["i"]]
    got["j"] = [int(v) for v in got["j"]]
    for c in FLOATS:
        got[c] = [float(v) for v in got[c]]
    steps = [int(v) if v else None for v in got["steps"]]
    assert steps == [r["steps"] for r in expected(store)]
    trajs = [np.array([float(t) for t in v.split()]) if v else None for v in got["trajectory"]] if traj else None
    check_rows(store, got, trajs)
    if traj:  # the base model's per-step losses, gradient norms and LRs come along, bit for bit
        for field in ("base_losses", "grad_norms", "lrs"):
            stored = store.trajectories(field)
            for i, j, v in zip(got["i"], got["j"], got[field], strict=True):
                want = stored.get((i, j), np.array([]))
                np.testing.assert_array_equal(bits([float(t) for t in v.split()]), bits(want))


@pytest.mark.parametrize("traj", [False, True])
def test_parquet_roundtrip(store, tmp_path, traj):
    path = export_study(StudyView.load(store), "parquet", tmp_path / "out.parquet", trajectories=traj)
    table = pq.read_table(path)
    assert table.column_names == HEADER + (list(ARRAY_COLUMNS) if traj else [])
    assert table.schema.field("lr").type == "double" and table.schema.field("tokens").type == "int64"
    assert table.schema.field("final_loss").type == "double"
    assert json.loads(table.schema.metadata[b"vmap_sweep_config"]) == STUDY_STORE_CONFIG
    got = table.to_pydict()
    got = {c: [math.nan if v is None and c in FLOATS else v for v in vs] for c, vs in got.items()}
    assert got["steps"] == [r["steps"] for r in expected(store)]
    if traj:
        assert table.schema.field("trajectory").type.value_type == pa.float64()
        for field in ("grad_norms", "lrs"):
            stored = store.trajectories(field)
            for i, j, v in zip(got["i"], got["j"], got[field], strict=True):
                np.testing.assert_array_equal(bits([] if v is None else v), bits(stored.get((i, j), [])))
    check_rows(store, got, got["trajectory"] if traj else None)


@pytest.mark.parametrize("traj", [False, True])
def test_npz_roundtrip(store, tmp_path, traj):
    path = export_study(StudyView.load(store), "npz", tmp_path / "out.npz", trajectories=traj)
    with np.load(path, allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert json.loads(str(got["config"])) == STUDY_STORE_CONFIG
    assert got["steps"].dtype == np.int64 and got["tokens"].dtype == np.int64 and got["lr"].dtype == np.float64
    assert list(got["steps"]) == [-1 if r["steps"] is None else r["steps"] for r in expected(store)]
    trajs = None
    if traj:
        mat, lengths = got["trajectory"], got["trajectory_lengths"]
        assert mat.dtype == np.float64 and mat.ndim == 2 and mat.shape[0] == len(lengths)
        assert np.isnan(mat[lengths == 0]).all() if mat.shape[1] else True
        trajs = [mat[k, :n] for k, n in enumerate(lengths)]
        stored = store.trajectories("grad_norms")
        for k, (i, j) in enumerate(zip(got["i"], got["j"], strict=True)):
            n = got["grad_norms_lengths"][k]
            np.testing.assert_array_equal(bits(got["grad_norms"][k, :n]), bits(stored.get((i, j), [])))
    check_rows(store, {k: list(v) for k, v in got.items() if v.ndim}, trajs)


@pytest.mark.parametrize("traj", [False, True])
def test_json_roundtrip(store, tmp_path, traj):
    path = export_study(StudyView.load(store), "json", tmp_path / "out.json", trajectories=traj)
    doc = json.loads(path.read_text())  # strict JSON: no NaN or Infinity literals
    assert doc["config"] == STUDY_STORE_CONFIG
    assert doc["columns"] == HEADER + (list(ARRAY_COLUMNS) if traj else [])
    cells = doc["cells"]
    assert all(list(c) == doc["columns"] for c in cells)

    def num(v):
        return math.nan if v is None else float(v)  # "nan", "inf", "-inf" read back with float

    got = {c: [cell[c] for cell in cells] for c in doc["columns"]}
    for c in FLOATS:
        got[c] = [num(v) for v in got[c]]
    assert got["steps"] == [r["steps"] for r in expected(store)]
    trajs = [None if v is None else [num(t) for t in v] for v in got["trajectory"]] if traj else None
    check_rows(store, got, trajs)
    assert "Infinity" not in path.read_text() and "NaN" not in path.read_text()


def test_columns_follow_the_study_axes_in_order(tmp_path):
    """x is tokens and y lr here: the columns are named after them in that order, a fixed one after them."""
    from vmap_sweep.study.axes import parse_axis_spec
    from vmap_sweep.study.grid import Grid

    grid = Grid(parse_axis_spec("tokens:1000:8000"), parse_axis_spec("lr:1e-5:1e-2"), 3, 2, {"weight_decay": 0.1})
    config = {"model": "tiny", "data": "synthetic", "x": "tokens:1000:8000", "y": "lr:1e-5:1e-2", "resolution": "3x2",
              "fixed": {"weight_decay": 0.1}}
    with StudyStore.create_or_open(tmp_path / "s", config, grid.cells()) as s:
        for fmt in ("csv", "json"):
            path = export_study(StudyView.load(s), fmt, tmp_path / f"c.{fmt}")
            head = (path.read_text().splitlines()[0].split(",") if fmt == "csv"
                    else json.loads(path.read_text())["columns"])
            assert head[:5] == ["i", "j", "tokens", "lr", "weight_decay"] and "x" not in head and "y" not in head
            assert "hparams" not in head and "stability" in head


def test_export_errors_and_no_partial_file(store, tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        export_study(StudyView.load(store), "xlsx", tmp_path / "out.xlsx")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="can't write"):
        export_study(StudyView.load(store), "csv", blocker / "out.csv")
    with pytest.raises(ConfigError, match="is a folder"):
        export_study(StudyView.load(store), "csv", tmp_path)
    # an existing export is replaced whole; no temporary files are left behind
    out = tmp_path / "sub" / "out.csv"
    export_study(StudyView.load(store), "CSV", out)
    export_study(StudyView.load(store), "csv", out, trajectories=True)
    assert [p.name for p in out.parent.iterdir()] == ["out.csv"]
    assert "trajectory" in out.read_text().splitlines()[0]


def test_pending_study_exports(tmp_path: Path):
    with new_store(tmp_path, "empty", STUDY_STORE_CONFIG) as s:
        for fmt in ("csv", "parquet", "npz", "json"):
            export_study(StudyView.load(s), fmt, tmp_path / f"e.{fmt}", trajectories=True)
        with np.load(tmp_path / "e.npz", allow_pickle=False) as z:
            assert z["trajectory"].shape == (12, 0) and (z["status"] == "pending").all()


# ------------------------------------------------------------------ the file's name says its format
MAGIC = {"csv": b"i,j,", "parquet": b"PAR1", "npz": b"PK", "json": b'{"config"'}


def test_the_format_follows_the_suffix_and_a_contradiction_is_refused(store, tmp_path):
    for fmt in ("csv", "parquet", "npz", "json"):
        for name in (f"a.{fmt}", f"B.{fmt.upper()}"):
            path = export_study(StudyView.load(store), None, tmp_path / name)
            assert path == tmp_path / name and path.read_bytes().startswith(MAGIC[fmt]), name
    refused = [("csv", "x.parquet", "--format csv contradicts"), ("parquet", "x.csv", "--format parquet contradicts"),
               ("npz", "x.csv", "name it x.npz or leave out --format"), (None, "x.txt", "can't tell the format"),
               (None, "x", "end it in .csv, .parquet, .npz or .json (e.g. x.csv)"), ("csv", "x.txt", "name it x.csv")]
    for fmt, name, needle in refused:
        with pytest.raises(ConfigError) as e:
            export_study(StudyView.load(store), fmt, tmp_path / "new" / name)
        assert needle in str(e.value) and "\n" not in str(e.value), (fmt, name)
    assert not (tmp_path / "new").exists()  # refused before anything is written


def test_default_export_is_inside_the_study_folder(store, tmp_path):
    assert export_study(StudyView.load(store), None, None) == store.directory / "cells.csv"
    assert export_study(StudyView.load(store), "parquet", None) == store.directory / "cells.parquet"
    assert (store.directory / "cells.parquet").read_bytes().startswith(b"PAR1")
    # two studies never share a default file
    with new_store(tmp_path, "second", STUDY_STORE_CONFIG) as other:
        assert export_study(StudyView.load(other), None, None) == tmp_path / "second" / "cells.csv"
    assert (store.directory / "cells.csv").read_text() != (tmp_path / "second" / "cells.csv").read_text()


def test_only_an_earlier_export_of_the_same_format_is_replaced(store, tmp_path):
    theirs = {"notes.csv": b"name,age\nann,3\n", "real.parquet": None, "cells.npz": b"PK\x03\x04 not ours",
              "notes.json": b'{"cells": []}', "i.csv": b"i,j,status,label\n",
              "old.parquet": None}
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "real.parquet")  # someone's parquet file
    export_study(StudyView.load(store), "csv", tmp_path / "csv-in.csv")
    (tmp_path / "old.parquet").write_bytes((tmp_path / "csv-in.csv").read_bytes())  # csv under a .parquet name
    for name, data in theirs.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        before = (tmp_path / name).read_bytes()
        for traj in (False, True):
            with pytest.raises(ConfigError, match="exists and is not an earlier .* export; choose a new file name"):
                export_study(StudyView.load(store), None, tmp_path / name, trajectories=traj)
        assert (tmp_path / name).read_bytes() == before, name
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(ConfigError, match="is a folder"):
        export_study(StudyView.load(store), None, tmp_path / "folder.csv")
    # an earlier export (with or without trajectories) is replaced, in each format
    made = []
    for fmt in ("csv", "parquet", "npz", "json"):
        path = tmp_path / "mine" / f"e.{fmt}"
        export_study(StudyView.load(store), fmt, path)
        export_study(StudyView.load(store), None, path, trajectories=True)
        export_study(StudyView.load(store), fmt, path)
        made.append(path.name)
        assert sorted(p.name for p in path.parent.iterdir()) == sorted(made)  # no temporary files left


def test_a_csv_export_written_before_gradient_columns_is_still_replaced(store, tmp_path):
    old = tmp_path / "old.csv"
    old.write_text("i,j,x,y,status,label,score,initial_loss,final_loss,eval_loss,steps,steps_done,diverged,"
                   "unstable_step,wall_time,hparams,trajectory,base_losses\n")  # an earlier version's header
    export_study(StudyView.load(store), "csv", old, trajectories=True)
    assert old.read_text().splitlines()[0].endswith("trajectory,base_losses,grad_norms,lrs")


def test_a_view_loaded_without_rows_reads_them_when_asked(tmp_path):
    """The maps load a view without its rows (a 1017² level's take tens of seconds); an analysis that needs them
    reads them then, the same rows, and exports the same file."""
    with new_store(tmp_path, config=STUDY_STORE_CONFIG) as store:
        store.record_batch([(c, rec_for(c.i, c.j)) for c in store_grid().cells()[:5]], batch_index=0)
    lean, whole = StudyView.load(store.directory, rows=False), StudyView.load(store.directory)
    assert lean.rows is None and len(whole.rows) == store.nx * store.ny
    a = export_study(lean, "json", tmp_path / "lean.json", trajectories=True)
    b = export_study(whole, "json", tmp_path / "whole.json", trajectories=True)
    assert a.read_bytes() == b.read_bytes()
    assert [r["i"] for r in lean.rows] == [r["i"] for r in whole.rows]
