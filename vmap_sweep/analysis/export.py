"""Export a study as one row per cell: csv, parquet, npz or json. Floats read back bit-for-bit.

Columns: the cell's indices ``i``, ``j``; one column per hyperparameter, named after it (the two swept axes
first, x then y, then the fixed ones), holding the value the cell trained with; then status, class, stability
and the results (``COLUMNS``). csv writes floats with ``repr`` (shortest round-tripping text;
``nan``/``inf``/``-inf`` parse back with ``float``); missing ints and labels are empty. parquet keeps float64
and nulls natively. npz holds only plain arrays (loads with ``allow_pickle=False``): missing ints are -1,
missing strings ''. json is one object ``{"config", "columns", "cells": [{column: value}]}``: missing values
are null and non-finite floats the strings "nan", "inf", "-inf" (JSON has no such numbers; ``float`` reads them).
The file is written to a temporary name beside ``path`` and renamed, so a crash leaves no half file.

The format is the file's suffix (.csv, .parquet, .npz, .json); a format given as well must agree with it. Without a path
the export is ``STUDY/cells.FORMAT``, inside the study folder, so two studies never share one export file. An
existing file is replaced only if it is a previous export of the same format (a csv with the export's header, a
parquet or npz holding the export's config, a json object with its config, columns and cells); anything else there is
refused.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import DB_NAME, check_output

FORMATS = ("csv", "parquet", "npz", "json")
DEFAULT_NAME = "cells"  # the export of STUDY without a path: STUDY/cells.FORMAT
INT_COLUMNS = ("i", "j", "steps", "steps_done", "unstable", "unstable_step", "supervised_tokens", "conversations",
               "stream_tokens")
FLOAT_COLUMNS = ("score", "initial_loss", "final_loss", "eval_loss", "wall_time")
STR_COLUMNS = ("status", "label", "stability", "same_data_as", "budget_unit")
# per-step arrays added by --trajectories: the training losses and the base model's losses on the same tokens,
# so the ratio criterion can be recomputed from an export, and the gradient norms and learning rates of each step,
# so the early-warning features can
ARRAY_COLUMNS = ("trajectory", "base_losses", "grad_norms", "lrs")
# after i, j and the hyperparameter columns (hparam_columns); stability: "stable", or "unstable" where the trainer
# stopped the cell for a non-finite or runaway loss (the stability map), empty while pending
COLUMNS = ("status", "label", "stability", "score", "initial_loss", "final_loss", "eval_loss",
           "steps", "steps_done", "unstable", "unstable_step", "wall_time",
           # the cell's dataset counted in supervised tokens and conversations (empty for a study that recorded its
           # sizes in tokens only), and "i,j" of the cell whose experiment it repeats (analysis/repeats.py)
           "supervised_tokens", "conversations", "same_data_as",
           # what the cell's budget (hparams "tokens", the tokens axis) counts, and the stream positions it trains on
           "budget_unit", "stream_tokens")


# how a csv export's header begins: this version's (with the study's hyperparameter columns between) and the
# earlier one's with x, y and the hyperparameters as one JSON string, so either is replaced as an earlier export
EXPORT_HEADER = "i,j,"
EXPORT_HEADER_FIELDS = ("status", "label", "stability", "score")
EXPORT_HEADER_V1 = "i,j,x,y,status,label,score,"


def hparam_columns(view: StudyView) -> list[str]:
    """The hyperparameter columns: the swept axes (x, then y), then every fixed hyperparameter, sorted."""
    names = [view.x.name, view.y.name]
    rest = sorted({k for r in view.all_rows() for k in r["hparams"]} - set(names))
    return [*names, *rest]


def _records(view: StudyView, trajectories: bool) -> list[dict[str, Any]]:
    # copies: the view's rows stay as the store gave them
    rows = [{k: v for k, v in r.items() if trajectories or k not in ARRAY_COLUMNS} for r in view.all_rows()]
    sized = view.sized
    inferred = _inferred(view)
    for r in rows:
        size = None if sized.sizes is None else sized.sizes[int(r["hparams"]["tokens"])]
        r["supervised_tokens"] = None if size is None else size.supervised
        r["conversations"] = None if size is None else size.conversations
        r["budget_unit"] = sized.unit
        r["stream_tokens"] = int(r["hparams"]["tokens"]) if size is None else size.tokens
        same = sized.same_as.get((r["i"], r["j"]))
        r["same_data_as"] = None if same is None else f"{same[0]},{same[1]}"
        for name, value in r["hparams"].items():
            r[name] = value  # hyperparameter names (study.axes.AXES) never clash with COLUMNS
        r["unstable"] = None if r["unstable"] is None else int(r["unstable"])
        r["stability"] = None if r["unstable"] is None else ("unstable" if r["unstable"] else "stable")
        if trajectories and r["status"] != "done":
            for c in ARRAY_COLUMNS:
                r[c] = None
        if inferred is not None and r["status"] != "done":  # a refinement level: its untrained cells' classes
            r["status"], r["label"] = "inferred", str(inferred[r["j"], r["i"]])
    return rows


def _inferred(view: StudyView):
    """A finished refinement level's labels with its inferred cells filled in (None for any other study, and for
    a level begun and not finished: its cells not trained yet are pending)."""
    from vmap_sweep.store.levels import level_info, study_map

    info = level_info(view)
    return study_map(view).labels if info is not None and info.get("complete") else None


def _kinds(rows: list[dict[str, Any]], cols: list[str]) -> dict[str, str]:
    """Each column's type: int, float, str or array; a hyperparameter column is int where all its values are."""
    kinds = {**{c: "int" for c in INT_COLUMNS}, **{c: "float" for c in FLOAT_COLUMNS},
             **{c: "str" for c in STR_COLUMNS}, **{c: "array" for c in ARRAY_COLUMNS}}
    for c in cols:
        if c not in kinds:
            values = [r.get(c) for r in rows if r.get(c) is not None]
            whole = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values)
            kinds[c] = "int" if whole else "float"
    return kinds


def _write_csv(rows: list[dict[str, Any]], cols: list[str], kinds: dict[str, str], f: IO[str], config: str) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        out = []
        for c in cols:
            v = r.get(c)
            if kinds[c] == "array":
                out.append("" if v is None else " ".join(repr(float(t)) for t in v))
            elif v is None:
                out.append("")
            elif kinds[c] == "float":
                out.append(repr(float(v)))
            else:
                out.append(str(v))
        w.writerow(out)


def _write_parquet(rows: list[dict[str, Any]], cols: list[str], kinds: dict[str, str], f: IO[bytes],
                   config: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "array": pa.list_(pa.float64())}
    arrays = []
    for c in cols:
        vals = [r.get(c) for r in rows]
        if kinds[c] == "array":
            vals = [None if v is None else np.asarray(v, dtype=np.float64) for v in vals]
        elif kinds[c] == "float":
            vals = [None if v is None else float(v) for v in vals]
        arrays.append(pa.array(vals, type=types[kinds[c]]))
    table = pa.table(arrays, names=cols).replace_schema_metadata({"vmap_sweep_config": config})
    pq.write_table(table, f)


def _write_npz(rows: list[dict[str, Any]], cols: list[str], kinds: dict[str, str], f: IO[bytes],
               config: str) -> None:
    data: dict[str, np.ndarray] = {}
    for c in cols:
        vals = [r.get(c) for r in rows]
        if kinds[c] == "array":
            lengths = np.array([0 if v is None else len(v) for v in vals], dtype=np.int64)
            mat = np.full((len(vals), int(lengths.max(initial=0))), np.nan)
            for k, v in enumerate(vals):
                if v is not None:
                    mat[k, :len(v)] = v
            data[c], data[f"{c}_lengths"] = mat, lengths
        elif kinds[c] == "int":
            data[c] = np.array([-1 if v is None else v for v in vals], dtype=np.int64)
        elif kinds[c] == "float":
            data[c] = np.array([np.nan if v is None else v for v in vals], dtype=np.float64)
        else:
            data[c] = np.array(["" if v is None else v for v in vals], dtype=str)
    data["config"] = np.array(config, dtype=str)
    np.savez_compressed(f, **data)


def _json_value(v: Any, kind: str) -> Any:
    if v is None:
        return None
    if kind == "array":
        return [_json_value(t, "float") for t in v]
    if kind == "float":
        v = float(v)
        return v if math.isfinite(v) else repr(v)  # 'nan', 'inf', '-inf': float() reads them back
    if kind == "int":
        return int(v)
    return v


def _write_json(rows: list[dict[str, Any]], cols: list[str], kinds: dict[str, str], f: IO[str], config: str) -> None:
    cells = [{c: _json_value(r.get(c), kinds[c]) for c in cols} for r in rows]
    json.dump({"config": json.loads(config), "columns": cols, "cells": cells}, f, allow_nan=False)
    f.write("\n")


_WRITERS: dict[str, tuple[str, Callable[..., None]]] = {
    "csv": ("w", _write_csv), "parquet": ("wb", _write_parquet), "npz": ("wb", _write_npz),
    "json": ("w", _write_json)}


def default_path(view: StudyView, fmt: str | None = None) -> Path:
    """Where an export goes when no path is given: ``STUDY/cells.FORMAT`` (csv unless told)."""
    return Path(view.directory) / f"{DEFAULT_NAME}.{(fmt or 'csv').lower()}"


def export_format(fmt: str | None, path: Path) -> str:
    """The format of an export to ``path``: its suffix; ``fmt`` (e.g. --format) if given must agree with it."""
    if fmt is not None:
        fmt = str(fmt).lower()
        if fmt not in FORMATS:
            raise ConfigError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        if fmt is None:
            raise ConfigError(f"export path {path}: can't tell the format from its name; end it in .csv, .parquet, "
                              f".npz or .json (e.g. {path.stem}.csv)")
        raise ConfigError(f"export path {path}: a {fmt} export's name ends in .{fmt}; name it {path.stem}.{fmt}")
    if fmt is not None and fmt != suffix:
        raise ConfigError(f"export: --format {fmt} contradicts {path} (a .{suffix} name); "
                          f"name it {path.stem}.{fmt} or leave out --format")
    return suffix


def _is_export(path: Path, fmt: str) -> bool:
    """Whether the file at ``path`` is an earlier export in ``fmt`` (so replacing it loses nothing of the user's)."""
    try:
        if fmt == "csv":
            with open(path, encoding="utf-8", newline="") as f:
                header = f.readline().rstrip("\r\n")
            if header.startswith(EXPORT_HEADER_V1):
                return True
            fields = header.split(",")
            at = fields.index("status") if "status" in fields else -1
            return header.startswith(EXPORT_HEADER) and at > 1 and tuple(fields[at:at + 4]) == EXPORT_HEADER_FIELDS
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            return b"vmap_sweep_config" in meta
        if fmt == "json":
            with open(path, encoding="utf-8") as f:
                head = json.load(f)
            return isinstance(head, dict) and {"config", "columns", "cells"} <= set(head)
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
        return {"config.npy", "i.npy", "j.npy"} <= names
    except Exception:  # unreadable, not text, not parquet, not a zip: not an export
        return False


def export_study(view: StudyView, fmt: str | None, path: str | os.PathLike | None,
                 trajectories: bool = False) -> Path:
    """Write every cell of the study ``view`` to ``path`` (default ``STUDY/cells.FORMAT``) in the format its suffix
    names (``fmt``, if given, must agree); with ``trajectories`` add per-step losses, base losses, gradient norms
    and learning rates. Only a file that is an earlier export in the same format is replaced."""
    if fmt is not None and str(fmt).lower() not in FORMATS:
        raise ConfigError(f"export format {str(fmt).lower()!r} is unknown; use one of {', '.join(FORMATS)}")
    path = check_output(default_path(view, fmt) if path is None else path)
    if path.is_dir():
        raise ConfigError(f"export path {path} is a folder; give a file name like {path / DEFAULT_NAME}."
                          f"{(fmt or 'csv').lower()}")
    if path.resolve().parent == Path(view.directory).resolve() and path.name.startswith(DB_NAME):
        raise ConfigError(f"export path {path} would replace the study's database; give another file name")
    fmt = export_format(fmt, path)
    if (path.exists() or path.is_symlink()) and not (path.is_file() and _is_export(path, fmt)):
        raise ConfigError(f"export path {path} exists and is not an earlier {fmt} export; choose a new file name "
                          "or remove that file")
    rows = _records(view, trajectories)
    cols = ["i", "j", *hparam_columns(view), *COLUMNS, *(ARRAY_COLUMNS if trajectories else ())]
    kinds = _kinds(rows, cols)
    mode, writer = _WRITERS[fmt]
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, **({"newline": "", "encoding": "utf-8"} if mode == "w" else {})) as f:
            writer(rows, cols, kinds, f, view.config_json)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an export is meant to be shared
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise ConfigError(f"export path {path}: can't write ({e.strerror or e}); "
                          "choose a writable file path") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path
