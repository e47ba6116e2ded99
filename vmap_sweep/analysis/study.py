"""Analysis of a stored study: classes recomputed from its trajectories, the class grid, the boundary's dimension."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmap_sweep.analysis.chain import zoom_tree
from vmap_sweep.analysis.classify import classify_rows
from vmap_sweep.analysis.fractal import FractalResult, fractal_dimension, uncertainty_exponent
from vmap_sweep.analysis.refined import (
    RefinementGain,
    begun_level,
    finished_level_of,
    is_refined,
    refine_record,
    refined_fractal_measure,
)
from vmap_sweep.analysis.view import load_class_grid
from vmap_sweep.errors import ConfigError
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore, holds_schema, study_dir
from vmap_sweep.store.levels import REFINE, REFINING, level_info, levels_criterion
from vmap_sweep.study.criterion import DEFAULT, as_options, check, newer_form


def reclassify(store: StudyStore, criterion: str = "ratio", **kw) -> dict[str, int]:
    """Store new classes for every done cell (no re-training); returns the count per class."""
    checked = check(criterion, **kw)
    kw = {k: v for k, v in checked.items() if k != "criterion"}
    # read, classified and written in one transaction: a run that commits meanwhile waits, and its later
    # batches are labelled by the new criterion; a refinement that began first is waited for
    labels = store.relabel(lambda rows: classify_rows(rows, criterion, **kw), checked,
                           check=lambda: _not_while_refining(store, checked))
    counts: dict[str, int] = {}
    for label, _ in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return counts


def reclassify_with_zooms(study: Path, criterion: str = "ratio", **kw) -> tuple[dict[str, int], int]:
    """reclassify a study and every zoom study below it, so that a chain's levels share one criterion (their
    dimensions are pooled); returns the study's count per class and how many zoom studies followed. Every
    folder is found and opened before any is written: a missing one changes nothing."""
    checked = check(criterion, **kw)
    study = study_dir(study)
    gone = _check_levels_follow(study, checked)
    folders = zoom_tree(study)
    if gone:  # the record of levels that are not there (a copy without them): the study is a plain one again
        with StudyStore.open(study) as store:
            store.put_extra(REFINE, {})
    counts = []
    for folder in folders:
        with StudyStore.open(folder) as store:
            counts.append(reclassify(store, criterion, **kw))
    return counts[0], len(folders) - 1


def _not_while_refining(store: StudyStore, criterion: dict) -> None:
    """Refused while a refinement holds the study under another criterion: its levels follow the one it began
    with. Checked inside the relabelling transaction, so that a refinement reads the criterion either before the
    lock is seen here or after this classify has committed."""
    live = store.live_run()
    if live is not None and live.get("task") == REFINING and extras.criterion(store) != criterion:
        raise ConfigError(f"{store.directory} is being refined by {live['holder']}: its levels follow the criterion "
                          "it began with; classify it once the refinement has finished")


def _check_levels_follow(study: Path, criterion: dict) -> bool:
    """A refined study keeps the criterion its levels were refined under: their inferred cells took its classes,
    and which cells were trained followed from them, so under another criterion the levels would not hold. A
    level is not classified on its own, for the same reason. Returns whether the study's record of its levels is
    to be dropped: none of them is there (a copy without them) and the criterion changes."""
    with StudyStore.open(study) as store:
        info = level_info(store)
        record = refine_record(store)
        zoom = extras.zoom_of(store)
        if info is not None:
            raise ConfigError(f"{study} is level {info.get('level')} of a refined study: its classes follow the "
                              f"criterion that study was refined under, and it is not classified on its own "
                              f"(`vmap-sweep classify {study.parent}` classifies the study)")
    if zoom is not None and holds_schema(study.parent):
        top = _zoom_top(study)
        raise ConfigError(f"{study} is zoom level {zoom.get('level')} of {top}: the levels of a zoom share one "
                          f"criterion, since their dimensions are pooled; `vmap-sweep classify {top}` classifies "
                          "every level")
    levels = levels_criterion(study)
    if levels is None:
        return record is not None and criterion != newer_form(record.get("criterion") or DEFAULT)
    if newer_form(levels) != criterion:
        raise ConfigError(f"{study} was refined under `{as_options(levels)}`: its levels' inferred cells follow that "
                          f"criterion; classify it with those options, or copy the study folder without its "
                          f"refine-* folders to classify the copy (and refine it anew)")
    return False


def _zoom_top(study: Path) -> Path:
    """The study a zoom chain starts from: up through the parents of zoom levels."""
    while holds_schema(study.parent):
        with StudyStore.open(study) as store:
            if extras.zoom_of(store) is None:
                break
        study = study.parent
    return study


@dataclass
class FractalReport:
    """One map's boundary measured: the box count (its dimension, interval, fit range and counts), the
    uncertainty-exponent estimate beside it, and for a refined study what refining bought."""

    box: FractalResult
    map: str = "trainability"
    uncertainty: tuple[float, float] | None = None  # (dimension, stderr); None: too small a grid for it
    refined: RefinementGain | None = None

    def to_dict(self) -> dict:
        """What `fractal --json` prints."""
        out = {**self.box.to_dict(), "map": self.map}
        if self.uncertainty is not None:
            dimension, stderr = self.uncertainty
            out |= {"uncertainty_dimension": dimension, "uncertainty_stderr": stderr}
            if not 0.0 <= dimension <= 2.0:  # 2 - phi: on a small grid phi can fall outside [0, 2]
                out["uncertainty_note"] = "outside [0, 2], no dimension of a boundary in the plane: too few scales"
        if self.refined is not None:
            out["refined"] = self.refined.to_dict()
        return out


def fractal_report(source: Path, kind: str = "trainability", level: int | None = None) -> FractalReport:
    """Box-counting dimension of one map's boundary (`kind`) with CI, fit range and counts, and the
    uncertainty-exponent estimate. A refined study's trainability map is measured on its finest level (or
    `level`), with level 0 beside it (analysis/refined.py)."""
    as_level = finished_level_of(Path(source)) if Path(source).is_dir() else None
    if as_level is not None and kind == "trainability" and level is None:  # a level's folder: that level
        return fractal_report(as_level[0], kind, as_level[1])
    refined = is_refined(Path(source))
    if kind == "trainability" and refined and level != 0:
        box, gain = refined_fractal_measure(study_dir(source), level)
        return FractalReport(box, refined=gain)
    if level not in (None, 0) or (level == 0 and not refined):
        if not refined and level:
            begun = begun_level(study_dir(source), level)
            if begun:
                raise ConfigError(begun)
        raise ConfigError(f"{source}: --level measures a level of a refined study's trainability map; this is "
                          + ("the stability map" if refined else "not a refined study (`vmap-sweep refine` makes one)"))
    grid = load_class_grid(Path(source), kind)
    try:
        box = fractal_dimension(grid)
    except ConfigError as e:
        if kind == "stability" and Path(source).is_dir():
            e = str(e).replace("is converged", "is stable").replace("is not converged", "was stopped as unstable")
        raise ConfigError(f"{source}: {e}") from None  # name the file: a script may measure many
    mask = grid if grid.dtype == bool else np.asarray(grid) < 0
    try:
        unc = uncertainty_exponent(mask)
        uncertainty = (float(unc.dimension), float(unc.stderr))
    except ConfigError:
        uncertainty = None  # too small a grid for a second estimate; the box count stands alone
    return FractalReport(box, kind, uncertainty)
