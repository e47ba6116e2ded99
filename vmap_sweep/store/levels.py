"""A refined study's stored levels (run/refine.py writes them): where each level's study lives, and the class map
it holds, trained and inferred cells apart. Analysis reads them from here, below the code that trains them."""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore, holds_schema
from vmap_sweep.study import criterion as criterion_rules

MAX_LEVELS = 6  # each level doubles both axes: 6 take a 128² study past 8000²
REFINE = "refine"  # the refined study's {"margin", "levels": [per level: where, size, cells and cost]}
REFINING = "refining"  # the task a refining process names in the study's lock (StudyStore.claim_writer)
REFINE_LEVEL = "refine_level"  # a level study's own {"level", "margin", "criterion", "labels", "inferred", ...}


def level_dir(top: Path, level: int) -> Path:
    return Path(top) / f"refine-{level}"


def encode_codes(codes: np.ndarray) -> dict:
    """A small-int map as stored in an extra: shape and zlib-compressed int8 bytes, base64."""
    a = np.ascontiguousarray(codes, dtype=np.int8)
    return {"shape": list(a.shape), "int8_zlib_b64": base64.b64encode(zlib.compress(a.tobytes(), 9)).decode()}


def decode_codes(stored: Mapping, where: Path) -> np.ndarray:
    try:
        raw = zlib.decompress(base64.b64decode(stored["int8_zlib_b64"]))
        return np.frombuffer(raw, dtype=np.int8).astype(np.int64).reshape(tuple(stored["shape"]))
    except (KeyError, TypeError, ValueError, zlib.error):
        raise StoreError(f"{where}: its refinement map can't be read; the database was edited or damaged") from None


@dataclass(frozen=True)
class LevelMap:
    """A level's classes: labels (str, every cell), inferred (bool: the label was inferred, not trained)."""

    labels: np.ndarray
    inferred: np.ndarray


def level_info(store: StudyStore) -> dict | None:
    info = store.get_extra(REFINE_LEVEL)
    return info if isinstance(info, dict) else None


def refinement_level(store: StudyStore) -> tuple[int, bool] | None:
    """(level, finished) where `store` is a level of a refined study, else None: by its own record, which refine
    writes as it begins a level, or by its place (refine-L in a study's folder), for a level begun before that."""
    info = level_info(store)
    if info is not None and isinstance(info.get("level"), int):
        return info["level"], bool(info.get("complete"))
    name = store.directory.name.removeprefix("refine-")
    if name.isdigit() and level_dir(store.directory.parent, int(name)) == store.directory \
            and holds_schema(store.directory.parent):
        return int(name), False
    return None


def refuse_training_a_level(store: StudyStore) -> None:
    """A level's cells are trained by `refine` alone: only those that can lie on the boundary, the rest inferred."""
    found = refinement_level(store)
    if found is not None:
        raise level_refusal(store.directory, *found, store.cell_count() - store.done_count())


def level_refusal(folder: Path, level: int, finished: bool, inferred: int) -> ConfigError:
    """Why `run` does not train level `level` in `folder` (finished: its `inferred` cells are the refinement's)."""
    top = folder.parent
    why = (f"it is finished, and its {inferred:,} other cells are inferred from the coarser level; `vmap-sweep "
           f"fractal {top}` reads it" if finished else f"`vmap-sweep refine {top} --levels {level}` finishes it")
    return ConfigError(f"{folder} is level {level} of the refined study {top}: refine trains only the cells that "
                       f"can lie on the boundary; {why}")


def study_map(store: StudyStore) -> LevelMap:
    """A finished study's or refinement level's classes: stored labels, and a level's inferred ones."""
    labels = store.labels_array()
    inferred = np.zeros(labels.shape, dtype=bool)
    info = level_info(store)
    if info is not None:
        if not info.get("complete"):
            raise ConfigError(f"{store.directory}: this refinement level is unfinished; run `vmap-sweep refine` on "
                              "its study again (it resumes)")
        codes = decode_codes(info["inferred"], store.path)
        if codes.shape != labels.shape:
            raise StoreError(f"{store.path}: its refinement map is {codes.shape}, its grid {labels.shape}; "
                             "the database was edited or damaged")
        names = list(info["labels"])
        inferred = (codes >= 0) & (labels == "")  # a cell trained since (say by `run` on the level) is trained
        labels = labels.copy()
        labels[inferred] = np.array(names, dtype=str)[codes[inferred]]
    missing = int((labels == "").sum())
    if missing:
        raise ConfigError(f"{store.directory}: {missing} cells are pending or unclassified; finish the run (same "
                          f"command resumes it) or run `vmap-sweep classify {store.directory}` before refining it")
    return LevelMap(labels, inferred)


def levels_criterion(top: Path) -> dict | None:
    """The criterion a study's refinement levels follow, None where no level is there (none was refined, or the
    study was copied without them): the refine record's, else the lowest level's own (the smallest grid, the
    quickest to open)."""
    there = [level for level in range(1, MAX_LEVELS + 1) if holds_schema(level_dir(top, level))]
    if not there:
        return None
    with StudyStore.open(top) as store:
        record = store.get_extra(REFINE)
        top_criterion = extras.criterion(store)
    if isinstance(record, dict) and record.get("criterion") is not None:
        if not criterion_rules.is_stored_form(record["criterion"]):
            raise StoreError(f"{store.path}: its refine record names the criterion {record['criterion']!r:.80}, "
                             "not one vmap-sweep stores; the database was edited")
        return dict(record["criterion"])
    with StudyStore.open(level_dir(top, there[0])) as store:
        # a level just begun has no criterion yet: it follows the study's
        return extras.criterion(store) if extras.has_criterion(store) else top_criterion


def label_codes(labels: np.ndarray, names: list[str]) -> np.ndarray:
    """Each label's index in `names`."""
    index = {n: k for k, n in enumerate(names)}
    return np.vectorize(index.__getitem__, otypes=[np.int64])(labels)
