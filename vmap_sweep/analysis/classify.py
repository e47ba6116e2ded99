"""Classes of a stored study: its rows classed by a criterion (study/criterion.py), and the boolean maps a boundary
is measured on (trainability: converged or not; stability: stopped as unstable or not)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import live_run
from vmap_sweep.store.levels import refinement_level
from vmap_sweep.study.criterion import CONVERGED, LABELS, classify


def converged_mask(labels: ArrayLike) -> np.ndarray:
    """Boolean array, True where the label is "converged" (marginal counts as not converged)."""
    arr = np.asarray(labels)
    if arr.size and not np.isin(arr, LABELS).all():
        bad = sorted({str(x) for x in arr.reshape(-1) if str(x) not in LABELS})[:3]
        raise ConfigError(f"labels: unknown values {bad}; expected {', '.join(LABELS)}")
    return arr == CONVERGED


def study_classes(store) -> np.ndarray:
    """Boolean (ny, nx) grid of a stored study, True = converged; every cell must be done and classified."""
    labels = store.labels_array()
    if (labels == "").any():
        pending = int(np.isnan(store.grid_arrays("unstable")).sum())
        if pending:
            raise ConfigError(_pending(store, pending))
        raise ConfigError(f"{store.directory}: {int((labels == '').sum())} cells are unclassified; "
                          f"`vmap-sweep classify {store.directory}` classifies them")
    return converged_mask(labels)


def _pending(store, pending: int) -> str:
    """Why a study with pending cells has no map yet, and the command that trains them: a refinement level's is
    the refinement's, any other study's its run."""
    found = refinement_level(store)
    if found is not None and found[1]:
        return (f"{store.directory} is level {found[0]} of the refined study {store.directory.parent}: "
                f"{pending} of its cells are inferred, not trained; give {store.directory.parent} with --level "
                f"{found[0]}")
    if live_run(store.directory) is not None:  # the command that trains them is running: resuming it is refused
        resume = (f"they are being trained now (`vmap-sweep status {store.directory}` shows the run); wait for "
                  "it to finish")
    elif found is not None:
        resume = f"`vmap-sweep refine {store.directory.parent} --levels {found[0]}` finishes it"
    else:
        resume = f"`vmap-sweep run --out {store.directory}` resumes its run"
    return f"{store.directory}: {pending} cells are pending; {resume}"


MAPS = ("trainability", "stability")  # what a boundary separates: converged from not, stable from unstable


def stability_mask(store) -> np.ndarray:
    """Boolean (ny, nx) grid of a stored study, True = stable: the trainer never stopped it for a non-finite or
    runaway loss (> divergence_ratio x the base model's), gradient or weights. A stable cell may still be
    untrained (at a low LR its loss never drops below the reference): that is the trainability map's business."""
    unstable = store.grid_arrays("unstable")
    missing = int(np.isnan(unstable).sum())
    if missing:
        raise ConfigError(_pending(store, missing))
    return unstable == 0


def map_mask(store, kind: str) -> np.ndarray:
    """The study's boolean grid for one map: trainability (converged) or stability (never stopped as unstable)."""
    if kind not in MAPS:
        raise ConfigError(f"--map {kind!r}: choose {' or '.join(MAPS)}")
    return study_classes(store) if kind == "trainability" else stability_mask(store)


def classify_rows(rows: list[dict], criterion: str = "ratio", **kw) -> dict[tuple[int, int], tuple[str, float]]:
    """(label, score) of every done cell of `rows` (StudyStore.rows(arrays=True))."""
    done = [r for r in rows if r["status"] == "done"]
    if not done:
        return {}
    labels, scores = classify(
        [r["trajectory"] for r in done],
        [r["initial_loss"] if np.isfinite(r["initial_loss"]) else 1.0 for r in done],
        criterion=criterion,
        unstable=[bool(r["unstable"]) for r in done],
        references=[r["base_losses"] for r in done] if criterion == "ratio" else None,
        steps_done=[int(r["steps_done"]) for r in done] if criterion == "last20" else None,
        **kw,
    )
    return {(r["i"], r["j"]): (str(lab), float(s)) for r, lab, s in zip(done, labels, scores, strict=True)}
