"""Export a study as one row per cell: csv, parquet or npz. Floats read back bit-for-bit.

csv writes floats with ``repr`` (shortest round-tripping text; ``nan``/``inf``/``-inf`` parse back with
``float``); missing ints and labels are empty. parquet keeps float64 and nulls natively. npz holds only
plain arrays (loads with ``allow_pickle=False``): missing ints are -1, missing strings ''.
The file is written to a temporary name beside ``path`` and renamed, so a crash leaves no half file.

The format is the file's suffix (.csv, .parquet, .npz); a format given as well must agree with it. Without a path
the export is ``STUDY/cells.FORMAT``, inside the study folder, so two studies never share one export file. An
existing file is replaced only if it is a previous export of the same format (a csv with the export's header, a
parquet or npz holding the export's config); anything else there is refused.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from vmap_sweep.analysis.repeats import sized_cells
from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import DB_NAME, StudyStore, check_output

FORMATS = ("csv", "parquet", "npz")
DEFAULT_NAME = "cells"  # the export of STUDY without a path: STUDY/cells.FORMAT
INT_COLUMNS = ("i", "j", "steps", "steps_done", "diverged", "diverged_step", "supervised_tokens", "conversations",
               "stream_tokens")
FLOAT_COLUMNS = ("x", "y", "score", "initial_loss", "final_loss", "eval_loss", "wall_time")
STR_COLUMNS = ("status", "label", "hparams", "same_data_as", "budget_unit")
# per-step arrays added by --trajectories: the training losses and the base model's losses on the same tokens,
# so the ratio criterion can be recomputed from an export, and the gradient norms and learning rates of each step,
# so the early-warning features can
ARRAY_COLUMNS = ("trajectory", "base_losses", "grad_norms", "lrs")
COLUMNS = ("i", "j", "x", "y", "status", "label", "score", "initial_loss", "final_loss", "eval_loss",
           "steps", "steps_done", "diverged", "diverged_step", "wall_time", "hparams",
           # the cell's dataset counted in supervised tokens and conversations (empty for a study that recorded its
           # sizes in tokens only), and "i,j" of the cell whose experiment it repeats (analysis/repeats.py)
           "supervised_tokens", "conversations", "same_data_as",
           # what the cell's budget (hparams "tokens", the tokens axis) counts, and the stream positions it trains on
           "budget_unit", "stream_tokens")


EXPORT_HEADER = "i,j,x,y,status,label,score,"  # how every version's csv export begins


def _records(store: StudyStore, trajectories: bool) -> list[dict[str, Any]]:
    rows = store.rows(arrays=trajectories)
    sized = sized_cells(store)
    inferred = _inferred(store)
    for r in rows:
        size = None if sized.sizes is None else sized.sizes[int(r["hparams"]["tokens"])]
        r["supervised_tokens"] = None if size is None else size.supervised
        r["conversations"] = None if size is None else size.conversations
        r["budget_unit"] = sized.unit
        r["stream_tokens"] = int(r["hparams"]["tokens"]) if size is None else size.tokens
        same = sized.same_as.get((r["i"], r["j"]))
        r["same_data_as"] = None if same is None else f"{same[0]},{same[1]}"
        r["hparams"] = json.dumps(r["hparams"], sort_keys=True)
        r["diverged"] = None if r["diverged"] is None else int(r["diverged"])
        if trajectories and r["status"] != "done":
            for c in ARRAY_COLUMNS:
                r[c] = None
        if inferred is not None and r["status"] != "done":  # a refinement level: its untrained cells' classes
            r["status"], r["label"] = "inferred", str(inferred[r["j"], r["i"]])
    return rows


def _inferred(store: StudyStore):
    """A refinement level's labels with its inferred cells filled in (None for any other study)."""
    from vmap_sweep.run.refine import level_info, study_map

    return None if level_info(store) is None else study_map(store).labels


def _write_csv(rows: list[dict[str, Any]], cols: list[str], f: IO[str], config: str) -> None:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        out = []
        for c in cols:
            v = r[c]
            if c in ARRAY_COLUMNS:
                out.append("" if v is None else " ".join(repr(float(t)) for t in v))
            elif v is None:
                out.append("")
            elif c in FLOAT_COLUMNS:
                out.append(repr(float(v)))
            else:
                out.append(str(v))
        w.writerow(out)


def _write_parquet(rows: list[dict[str, Any]], cols: list[str], f: IO[bytes], config: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {**{c: pa.int64() for c in INT_COLUMNS}, **{c: pa.float64() for c in FLOAT_COLUMNS},
             **{c: pa.string() for c in STR_COLUMNS}, **{c: pa.list_(pa.float64()) for c in ARRAY_COLUMNS}}
    arrays = []
    for c in cols:
        vals = [r[c] for r in rows]
        if c in ARRAY_COLUMNS:
            vals = [None if v is None else np.asarray(v, dtype=np.float64) for v in vals]
        arrays.append(pa.array(vals, type=types[c]))
    table = pa.table(arrays, names=cols).replace_schema_metadata({"vmap_sweep_config": config})
    pq.write_table(table, f)


def _write_npz(rows: list[dict[str, Any]], cols: list[str], f: IO[bytes], config: str) -> None:
    data: dict[str, np.ndarray] = {}
    for c in cols:
        vals = [r[c] for r in rows]
        if c in ARRAY_COLUMNS:
            lengths = np.array([0 if v is None else len(v) for v in vals], dtype=np.int64)
            mat = np.full((len(vals), int(lengths.max(initial=0))), np.nan)
            for k, v in enumerate(vals):
                if v is not None:
                    mat[k, :len(v)] = v
            data[c], data[f"{c}_lengths"] = mat, lengths
        elif c in INT_COLUMNS:
            data[c] = np.array([-1 if v is None else v for v in vals], dtype=np.int64)
        elif c in FLOAT_COLUMNS:
            data[c] = np.array(vals, dtype=np.float64)
        else:
            data[c] = np.array(["" if v is None else v for v in vals], dtype=str)
    data["config"] = np.array(config, dtype=str)
    np.savez_compressed(f, **data)


_WRITERS: dict[str, tuple[str, Callable[..., None]]] = {
    "csv": ("w", _write_csv), "parquet": ("wb", _write_parquet), "npz": ("wb", _write_npz)}


def default_path(store: StudyStore, fmt: str | None = None) -> Path:
    """Where an export goes when no path is given: ``STUDY/cells.FORMAT`` (csv unless told)."""
    return Path(store.directory) / f"{DEFAULT_NAME}.{(fmt or 'csv').lower()}"


def export_format(fmt: str | None, path: Path) -> str:
    """The format of an export to ``path``: its suffix; ``fmt`` (e.g. --format) if given must agree with it."""
    if fmt is not None:
        fmt = str(fmt).lower()
        if fmt not in FORMATS:
            raise ConfigError(f"export format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        if fmt is None:
            raise ConfigError(f"export path {path}: can't tell the format from its name; end it in .csv, .parquet "
                              f"or .npz (e.g. {path.stem}.csv)")
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
            return header.startswith(EXPORT_HEADER)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            return b"vmap_sweep_config" in meta
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
        return {"config.npy", "i.npy", "j.npy"} <= names
    except Exception:  # unreadable, not text, not parquet, not a zip: not an export
        return False


def export_study(store: StudyStore, fmt: str | None, path: str | os.PathLike | None,
                 trajectories: bool = False) -> Path:
    """Write every cell of ``store`` to ``path`` (default ``STUDY/cells.FORMAT``) in the format its suffix names
    (``fmt``, if given, must agree); with ``trajectories`` add per-step losses, base losses, gradient norms and
    learning rates. Only a file that is an earlier export in the same format is replaced."""
    if fmt is not None and str(fmt).lower() not in FORMATS:
        raise ConfigError(f"export format {str(fmt).lower()!r} is unknown; use one of {', '.join(FORMATS)}")
    path = check_output(default_path(store, fmt) if path is None else path)
    if path.is_dir():
        raise ConfigError(f"export path {path} is a folder; give a file name like {path / DEFAULT_NAME}."
                          f"{(fmt or 'csv').lower()}")
    if path.resolve().parent == Path(store.directory).resolve() and path.name.startswith(DB_NAME):
        raise ConfigError(f"export path {path} would replace the study's database; give another file name")
    fmt = export_format(fmt, path)
    if (path.exists() or path.is_symlink()) and not (path.is_file() and _is_export(path, fmt)):
        raise ConfigError(f"export path {path} exists and is not an earlier {fmt} export; choose a new file name "
                          "or remove that file")
    cols = list(COLUMNS) + (list(ARRAY_COLUMNS) if trajectories else [])
    rows = _records(store, trajectories)
    mode, writer = _WRITERS[fmt]
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode, **({"newline": "", "encoding": "utf-8"} if mode == "w" else {})) as f:
            writer(rows, cols, f, store.config_json)
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
