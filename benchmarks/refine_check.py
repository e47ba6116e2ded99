"""A refined study against the full grid trained directly: what refinement trains, what it infers wrongly, and the
dimension of both maps.

    vmap-sweep run --preset tiny --resolution 17 --device cpu --out coarse17
    vmap-sweep run --preset tiny --resolution 65 --device cpu --out full65
    vmap-sweep refine coarse17 --levels 2
    PYTHONPATH=. python benchmarks/refine_check.py coarse17 full65

Checks, and prints: every cell the refined study stores (trained, copied from a coarser level, or a repeat) bit for
bit the full grid's; the share of inferred cells whose class differs from the full grid's; the refined map equal to
`simulate` run on the full grid's map (the rule, applied to the truth, trains exactly those cells); the cells trained
per level; the box-counting dimension with its interval of the refined map, the full map and the coarse map; the
model-steps and read-outs of the refinement against the full study's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vmap_sweep.analysis.classify import converged_mask
from vmap_sweep.analysis.fractal import fractal_dimension
from vmap_sweep.analysis.refined import refined_map
from vmap_sweep.run.refine import study_map
from vmap_sweep.store.db import RESULT_COLUMNS, StudyStore
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.plan import plan_study
from vmap_sweep.study.refine import simulate


def _done(folder: Path) -> dict:
    with StudyStore.open(folder) as store:
        return {(r["i"], r["j"]): r for r in store.rows(arrays=True, done_only=True)}


def _same(a: dict, b: dict) -> bool:
    """a (a refined level's cell) bitwise b (the full grid's); its eval loss too where it has one (a level takes no
    eval pass unless refined with --eval)."""
    for col in (*RESULT_COLUMNS, "label", "score"):
        x, y = a[col], b[col]
        if isinstance(x, np.ndarray):
            if x.tobytes() != y.tobytes():
                return False
        elif col == "eval_loss" and x != x:
            continue
        elif not (x == y or (x != x and y != y)):
            return False
    return True


def _dim(mask: np.ndarray) -> dict:
    box = fractal_dimension(mask)
    return {"resolution": f"{mask.shape[1]}x{mask.shape[0]}", "dimension": round(box.dimension, 3),
            "ci": [round(box.ci_low, 3), round(box.ci_high, 3)], "octaves": round(box.octaves, 2)}


def check(coarse: Path, full: Path) -> dict:
    refined = refined_map(coarse)
    with StudyStore.open(full) as store:
        truth_labels = study_map(store).labels
        cfg = StudyConfig.from_dict(store.config)
        full_steps = sum(b.model_steps for b in plan_study(cfg, store.cells(), 8))
    if truth_labels.shape != refined.map.labels.shape:
        sys.exit(f"{full} is {truth_labels.shape[1]}x{truth_labels.shape[0]}, the refined study's finest level "
                 f"{refined.map.labels.shape[1]}x{refined.map.labels.shape[0]}: refine to that size")
    stored, direct = _done(refined.folder), _done(full)
    unequal = [k for k, row in stored.items() if not _same(row, direct[k])]
    inferred = refined.map.inferred
    wrong = (converged_mask(refined.map.labels) != converged_mask(truth_labels)) & inferred
    names = sorted(set(truth_labels.reshape(-1).tolist()) | set(refined.map.labels.reshape(-1).tolist()))
    codes = np.vectorize(names.index)(truth_labels)
    margin, trace = _rule(coarse)
    sim = simulate(codes, refined.level, margin, trace)
    sim_labels = np.array(names)[sim[-1]["codes"]]
    with StudyStore.open(coarse) as store:
        coarse_mask = converged_mask(study_map(store).labels)
    levels = refined.levels
    margins = {}
    for m, t in ((0, False), (0, True), (1, False), (2, False)):  # each rule applied to the full grid's map
        run = simulate(codes, refined.level, m, t)
        bad = (run[-1]["codes"] != codes) & run[-1]["inferred_mask"]
        margins[f"{m} traced" if t else str(m)] = {"trained_per_level": [e["trained"] for e in run[1:]],
                                                   "inferred": run[-1]["inferred"], "inferred_wrong": int(bad.sum())}
    return {
        "margins_simulated": margins,
        "cells": int(inferred.size), "stored": len(stored), "stored_unequal_to_full": len(unequal),
        "stored_with_eval_loss": sum(row["eval_loss"] is not None and row["eval_loss"] == row["eval_loss"]
                                     for row in stored.values()),
        "inferred": int(inferred.sum()), "inferred_wrong": int(wrong.sum()),
        "inferred_wrong_share": float(wrong.sum() / max(inferred.sum(), 1)),
        "simulation_matches": bool(np.array_equal(sim_labels, refined.map.labels)),
        "levels": [{k: e[k] for k in ("level", "nx", "ny", "targets", "trained", "repeats", "inferred", "trunks",
                                      "model_steps", "seconds")} for e in levels],
        "refine_model_steps": sum(e["model_steps"] for e in levels),
        "refine_trained": sum(e["trained"] for e in levels),
        "full_model_steps": full_steps,
        "dimension": {"refined": _dim(converged_mask(refined.map.labels)), "full": _dim(converged_mask(truth_labels)),
                      "coarse": _dim(coarse_mask)},
    }


def _rule(coarse: Path) -> tuple[int, bool]:
    """The margin the study was refined with, and whether it traced."""
    from vmap_sweep.run.refine import REFINE

    with StudyStore.open(coarse) as store:
        record = store.get_extra(REFINE)
    return int(record["margin"]), bool(record.get("trace", False))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("refined", type=Path, help="the refined study's folder (its level 0)")
    p.add_argument("full", type=Path, help="the full grid at the refined study's finest resolution")
    a = p.parse_args()
    print(json.dumps(check(a.refined, a.full), indent=2))


if __name__ == "__main__":
    main()
