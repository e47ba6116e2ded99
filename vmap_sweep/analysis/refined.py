"""A refined study read back: its levels, the finest level's map (trained and inferred cells), its dimension.

`vmap-sweep refine` (run/refine.py) writes level L of the study in DIR to DIR/refine-L and records the finished
levels in DIR's `refine` extra. Here a refined study is measured on its finest level, beside its own grid, so that
what refinement bought (octaves of box sizes, a narrower interval) is read off one report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vmap_sweep.analysis.classify import converged_mask
from vmap_sweep.analysis.fractal import FractalResult, fractal_dimension
from vmap_sweep.analysis.view import StudyView
from vmap_sweep.errors import ConfigError
from vmap_sweep.store import extras
from vmap_sweep.store.db import DB_NAME, StudyStore, holds_schema, study_dir
from vmap_sweep.store.levels import MAX_LEVELS, REFINE, LevelMap, level_dir, level_info, study_map
from vmap_sweep.study.criterion import as_options, is_stored_form


def refine_record(store: StudyStore) -> dict | None:
    record = store.get_extra(REFINE)
    return record if isinstance(record, dict) and record.get("levels") else None


def is_refined(source: Path) -> bool:
    """A study folder (or its study.db) with at least one finished refinement level."""
    source = study_dir(source)
    if not (source / DB_NAME).is_file():
        return False
    with StudyStore.open(source) as store:
        return refine_record(store) is not None


@dataclass
class RefinedMap:
    level: int
    folder: Path
    view: StudyView  # the level's study
    map: LevelMap
    entry: dict  # the level's cost record
    levels: list[dict]  # every finished level's

    # the level's axes, as the pictures read them
    @property
    def xs(self) -> np.ndarray:
        return self.view.grid.xs

    @property
    def ys(self) -> np.ndarray:
        return self.view.grid.ys

    @property
    def x_name(self) -> str:
        return self.view.x.name

    @property
    def y_name(self) -> str:
        return self.view.y.name

    @property
    def x_log(self) -> bool:
        return self.view.x.scale == "log"

    @property
    def y_log(self) -> bool:
        return self.view.y.scale == "log"


def refined_map(top: Path, level: int | None = None) -> RefinedMap:
    """The map of level `level` (default: the finest finished) of the refined study in `top`."""
    top = study_dir(top)
    with StudyStore.open(top) as store:
        record = refine_record(store)
        criterion = extras.criterion(store)
    begun = begun_level(top, level)
    if record is None:
        raise ConfigError(begun or f"{top}: not refined; `vmap-sweep refine {top} --levels 3` refines it")
    levels = sorted(record["levels"], key=lambda e: int(e["level"]))
    finished = [int(e["level"]) for e in levels]
    want = finished[-1] if level is None else int(level)
    if want not in finished and begun:
        raise ConfigError(begun)
    if want < 0:
        raise ConfigError(f"--level {want}: give 0 (the study's own grid) or a refined level "
                          f"({', '.join(map(str, finished))})")
    if want not in finished:
        adds = (f"`vmap-sweep refine {top} --levels {want}` adds it" if want <= MAX_LEVELS
                else f"a refinement has at most {MAX_LEVELS} levels")
        raise ConfigError(f"{top}: level {want} is not refined (finished levels: "
                          f"{', '.join(map(str, finished))}); {adds}")
    folder = level_dir(top, want)
    if not holds_schema(folder):
        raise ConfigError(f"{top}: level {want} was refined, but its folder {folder.name} is gone; "
                          f"`vmap-sweep refine {top} --levels {want}` trains it again")
    view = StudyView.load(folder, rows=False)  # the map needs none
    info = level_info(view)
    if info is None:
        raise ConfigError(f"{folder}: not a refinement level of {top}")
    if info.get("criterion") != criterion:
        was = info.get("criterion")
        was = as_options(was) if is_stored_form(was) else "--criterion (the one it was refined with)"
        raise ConfigError(f"{folder} was refined under another criterion than {top}'s last `classify`; run "
                          f"`vmap-sweep classify {top} {was}` to restore it, or refine a copy of it anew")
    return RefinedMap(want, folder, view, study_map(view), next(e for e in levels if int(e["level"]) == want), levels)


def finished_level_of(source: Path) -> tuple[Path, int] | None:
    """(its study, the level) where `source` is the folder of a finished refinement level, else None."""
    source = study_dir(source)
    top = source.parent
    if not source.name.startswith("refine-") or not (top / DB_NAME).is_file():
        return None
    with StudyStore.open(top) as store:
        record = refine_record(store)
    for e in (record or {}).get("levels", []):
        if level_dir(top, int(e["level"])).resolve() == source.resolve():
            return top, int(e["level"])
    return None


def begun_level(top: Path, level: int | None) -> str | None:
    """Why level `level` of the study in `top` can't be read, where a refinement began it and has not finished it
    (killed, or still training); None otherwise."""
    if level is None or not 1 <= int(level) <= MAX_LEVELS or not holds_schema(level_dir(top, int(level))):
        return None
    return (f"{top}: level {level} was begun but is not finished; `vmap-sweep refine {top} --levels {level}` "
            "finishes it")


def finest_view(top: Path, level: int | None = None) -> StudyView:
    """A refined study as the analyses that match cells read it: its finest level's study (or `level`'s), every
    cell with its class (trained, copied from the experiment it repeats, or inferred: `inferred` says which)."""
    refined = refined_map(top, level)
    labels = refined.map.labels
    grid = replace(refined.view.grid, labels=labels, converged=converged_mask(labels))
    return replace(refined.view, labels=labels, grid=grid, refinement_level=refined.level,
                   inferred=refined.map.inferred)


def study_view(source: Path) -> StudyView:
    """A study as compare reads it: a refined one at its finest level, a refinement level's folder as that level
    of its study (inferred cells with their inferred class), any other as stored."""
    source = study_dir(source)
    view = StudyView.load(source)  # opened once: a plain study's rows are validated on every open
    if view.refine is not None:
        return finest_view(source)
    info = level_info(view)
    if info is None or not info.get("complete"):
        return view
    return finest_view(source.parent, int(info["level"]))


def tokens_note(refined: RefinedMap) -> str | None:
    """Where the tokens axis ran out of new data at this level: budgets that repeat a smaller one's experiment."""
    lines = int(refined.entry.get("repeat_lines") or 0)
    if not lines or "tokens" not in (refined.x_name, refined.y_name):
        return None
    n = len(refined.ys) if refined.y_name == "tokens" else len(refined.xs)
    return (f"{lines} of the {n} dataset sizes of level {refined.level} repeat a smaller size's experiment (no new "
            "supervised token between them): along tokens this resolution resolves the data's answers, not "
            "training; there refinement went on along the learning rate only")


@dataclass
class RefinementGain:
    """What refining bought, measured on one level beside level 0 (the study's own grid)."""

    level: int
    folder: str
    inferred_share: float
    trained_cells: int  # stored: trained at some level, or a copy of an experiment it repeats
    cells: int
    coarse: FractalResult  # level 0's box count
    levels: list  # the refine record's levels
    tokens_note: str | None
    octaves_gained: float | None = None  # None where either map is too small for a number
    interval_narrowing: float | None = None

    def to_dict(self) -> dict:
        c = self.coarse
        coarse = {"dimension": c.dimension, "ci_low": c.ci_low, "ci_high": c.ci_high, "octaves": c.octaves,
                  "resolution": list(c.resolution), "fit_range": list(c.fit_range), "too_small": c.too_small}
        return {"level": self.level, "folder": self.folder, "inferred_share": self.inferred_share,
                "trained_cells": self.trained_cells, "cells": self.cells, "coarse": coarse,
                "octaves_gained": self.octaves_gained, "interval_narrowing": self.interval_narrowing,
                "levels": self.levels, "tokens_note": self.tokens_note}


def refined_fractal_measure(top: Path, level: int | None = None) -> tuple[FractalResult, RefinementGain]:
    """The box-counting dimension of a refined study's finest (or given) level, and what refining bought beside
    level 0's: the octaves of box size and the narrowing of the interval."""
    refined = refined_map(top, level)
    try:
        box = fractal_dimension(converged_mask(refined.map.labels))
        with StudyStore.open(top) as store:
            coarse = fractal_dimension(converged_mask(study_map(store).labels))
    except ConfigError as e:
        raise ConfigError(f"{top}: {e}") from None
    gain = RefinementGain(refined.level, refined.folder.name, float(refined.map.inferred.mean()),
                          int((~refined.map.inferred).sum()), int(refined.map.inferred.size), coarse,
                          refined.levels, tokens_note(refined))
    width, coarse_width = box.ci_high - box.ci_low, coarse.ci_high - coarse.ci_low
    # a map too small for a number has no octaves to gain from nor an interval to narrow
    if box.too_small is None and coarse.too_small is None:
        gain.octaves_gained = float(box.octaves - coarse.octaves)
        gain.interval_narrowing = float(coarse_width / width) if width > 0 else None
    return box, gain
