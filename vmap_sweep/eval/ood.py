"""Does distance to the boundary predict out-of-distribution skill?

A subset of a study's converged cells (an even lattice over the grid, or evenly spread quantiles of their
distance to the boundary) is re-trained (the same stacked trainer, data order and seeds; each re-trained loss
trajectory is checked against the stored one, so the models evaluated are the models the study measured), each
model is evaluated with lm-evaluation-harness (examples per task: DEFAULT_LIMITS, or the user's), and the Spearman
correlation between accuracy and the cell's distance to the boundary (grid steps) is stored with a bootstrap CI
in the study under the extra key "ood".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import distance_transform_edt

from vmap_sweep.analysis.classify import study_classes
from vmap_sweep.analysis.stats import spearman
from vmap_sweep.errors import ConfigError
from vmap_sweep.eval import DEFAULT_LIMITS, DEFAULT_TASKS
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import Tokenizer
from vmap_sweep.run.policy import resolve_device
from vmap_sweep.run.worker import Worker
from vmap_sweep.store import extras
from vmap_sweep.store.db import StudyStore
from vmap_sweep.store.study import Study
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.train.trunk import TrunkTrainer

RTOL = 1e-6  # largest relative difference between a re-trained and a stored trajectory that is accepted
PICKS = ("lattice", "boundary-quantiles")  # how the evaluated cells are chosen (--pick)


# ------------------------------------------------------------------------------------------ cell selection


def parse_cells(spec: str) -> tuple[int, int]:
    """--cells as (n_x, n_y), how many cells to take along x and y: "10x10" -> (10, 10), "8" -> (8, 8)."""
    parts = str(spec).lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise ConfigError(f"--cells {spec!r}: expected NXxNY with positive integers, e.g. 10x10")
    return sizes  # type: ignore[return-value]


def lattice(n: int, size: int) -> list[int]:
    """At most ``n`` evenly spaced indices in [0, size), ends included."""
    if n >= size:
        return list(range(size))
    if n == 1:
        return [(size - 1) // 2]
    return sorted({int(round(v)) for v in np.linspace(0, size - 1, n)})


def select_cells(store: StudyStore, n_x: int, n_y: int) -> list[Cell]:
    """The converged cells of an evenly spaced n_x x n_y sub-lattice of the grid, row-major (j, i).

    A lattice (not "n converged cells") keeps the sample evenly spread over both axes; diverged models are
    not worth evaluating, so those lattice points are dropped.
    """
    converged = study_classes(store)
    keep = {(i, j) for j in lattice(n_y, store.ny) for i in lattice(n_x, store.nx) if converged[j, i]}
    cells = [c for c in store.cells() if c.key in keep]
    if not cells:
        raise ConfigError(f"{store.directory}: no converged cell on the {n_x}x{n_y} lattice; "
                          "choose a denser --cells or a study with converged cells")
    return cells


# ------------------------------------------------------------------------------------------ distance


def signed_distance(converged: np.ndarray) -> np.ndarray:
    """(ny, nx) signed Euclidean distance in grid steps to the boundary: for a converged cell the distance to the
    nearest diverged (not converged) cell, positive; for any other cell minus the distance to the nearest
    converged cell (scipy.ndimage.distance_transform_edt of the mask and of its complement). A cell beside the
    boundary is at 1 or -1; a grid of one class has no boundary: +-inf everywhere."""
    mask = np.asarray(converged, dtype=bool)
    if mask.ndim != 2:
        raise ConfigError(f"distance_to_boundary: expected a 2-D class grid, got shape {mask.shape}")
    if mask.all() or not mask.any():
        return np.where(mask, np.inf, -np.inf)
    return distance_transform_edt(mask) - distance_transform_edt(~mask)


def distance_to_boundary(converged: np.ndarray) -> np.ndarray:
    """(ny, nx) Euclidean distance in grid steps from each cell to the nearest cell of the other class
    (1 for a cell beside the boundary); inf everywhere when the grid holds one class only."""
    return np.abs(signed_distance(converged))


def pick_by_distance(converged: np.ndarray, n: int) -> list[tuple[int, int]]:
    """At most ``n`` converged cells (i, j) at evenly spaced quantiles of their distance to the boundary: the
    converged cells sorted by distance (ties row-major), the ones at ranks round(k (m - 1) / (n - 1)), k = 0..n-1,
    of m; so the nearest and the farthest are always taken, and the picks' distances follow the distribution of
    all converged cells' (each picked distance is the quantile k / (n - 1) of it). Returned row-major."""
    d = signed_distance(converged)
    cells = sorted(((float(d[j, i]), j, i) for j, i in zip(*np.nonzero(converged), strict=True)))
    if not cells:
        return []
    ranks = sorted({int(round(r)) for r in np.linspace(0, len(cells) - 1, min(n, len(cells)))})
    return sorted(((cells[r][2], cells[r][1]) for r in ranks), key=lambda c: (c[1], c[0]))


def boundary_quantile_cells(store: StudyStore, n: int) -> list[Cell]:
    """`pick_by_distance` of a study's converged cells, as its cells (row-major)."""
    keep = set(pick_by_distance(study_classes(store), n))
    if not keep:
        raise ConfigError(f"{store.directory}: no converged cell to evaluate; choose a study with converged cells")
    return [c for c in store.cells() if c.key in keep]


def parse_count(spec: str) -> int:
    """--cells for --pick boundary-quantiles: "N" cells, or "NxM" = N·M cells."""
    if "x" in str(spec).lower():
        n_x, n_y = parse_cells(spec)
        return n_x * n_y
    try:
        n = int(spec)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--cells {spec!r}: give how many cells, e.g. 100 (or NxM for N·M)")
    return n


# ------------------------------------------------------------------------------------------ re-training


@dataclass
class RetrainedCell:
    cell: Cell
    model: GPT
    tokenizer: Tokenizer
    max_rel_diff: float  # between the re-trained and the stored loss trajectory; 0.0 = bitwise equal


def trajectory_difference(new: Sequence[float], stored: np.ndarray) -> float:
    """Max relative difference of two loss trajectories (inf for different lengths or NaN patterns)."""
    a, b = np.asarray(new, dtype=np.float64), np.asarray(stored, dtype=np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return math.inf
    if np.array_equal(a, b, equal_nan=True):
        return 0.0
    fin = np.isfinite(a) & np.isfinite(b)
    if not np.array_equal(a[~fin], b[~fin], equal_nan=True):
        return math.inf
    return float(np.max(np.abs(a[fin] - b[fin]) / np.maximum(np.abs(b[fin]), 1e-30)))


def plan_retraining(cells: Sequence[Cell], solo: set[tuple[int, int]], models_per_batch: int) -> list[list[Cell]]:
    """Stacks to re-train, each a list of cells in order; a cell may appear twice in one stack.

    On a GPU a stack of one model runs other kernels than a stack of several (it reproduced a stored
    trajectory only to ~2e-3 where stacks of 2, 3, 8 and 16 were bitwise equal, H100, tiny model). So a cell
    that was trained alone (``solo``: its original batch held one cell) is re-trained alone, and any other
    stack of one gets a copy of its cell as companion (companions change no result).
    """
    alone = [c for c in cells if c.key in solo]
    rest: dict[int | None, list[Cell]] = {}  # a stack holds one batch size: a study may sweep it
    for c in cells:
        if c.key not in solo:
            rest.setdefault(c.hparams.get("batch_size"), []).append(c)
    stacks = [same[k : k + models_per_batch] for same in rest.values() for k in range(0, len(same), models_per_batch)]
    stacks = [s * 2 if len(s) == 1 else s for s in stacks]
    return [[c] for c in alone] + stacks


def solo_cells(store: StudyStore) -> set[tuple[int, int]]:
    """Done cells whose batch (by stored batch_index) held only them."""
    by_batch: dict[int, list[tuple[int, int]]] = {}
    for r in store.rows():
        if r["status"] == "done" and r["batch_index"] is not None:
            by_batch.setdefault(int(r["batch_index"]), []).append((r["i"], r["j"]))
    return {keys[0] for keys in by_batch.values() if len(keys) == 1}


def retrain_cells(
    study_dir: str | Path,
    cells: Sequence[Cell],
    device: str = "auto",
    models_per_batch: int = 8,
    rtol: float = RTOL,
    deterministic: bool = False,
) -> Iterator[RetrainedCell]:
    """Re-train ``cells`` of a study, up to ``models_per_batch`` stacked at a time, and yield each fine-tuned
    model (in the order of `plan_retraining`: cells trained alone first, then ``cells``' order, batch size by
    batch size).

    A generator: only one stack of models is alive at once (a hundred d20 copies do not fit anywhere).
    A cell's result does not depend on its batch companions, so the re-trained trajectory must equal the
    stored one: bitwise on a CPU, and on an H100 too (tiny model) once a stack holds 2 or more models;
    ``rtol`` admits rounding. A larger difference raises a ConfigError before that stack's models are yielded.
    """
    if models_per_batch < 1:
        raise ConfigError(f"--models-per-batch must be at least 1, got {models_per_batch}")
    with Study.open(study_dir) as study:
        cfg, stored, solo = study.config, study.store.trajectories(), solo_cells(study.store)
        # re-train as the study was trained: micro-batching sets the order of the gradient sums, compiled
        # kernels round differently from eager ones, and only this version's arithmetic is at hand
        trained = study.settings or RunSettings()
    trained.check_trainable_here(study_dir)
    missing = [c.key for c in cells if c.key not in stored]
    if missing:
        raise ConfigError(f"{study_dir}: cells {missing[:3]} are not done; finish the study before evaluating it")
    dev = resolve_device(device)
    worker = Worker(cfg, dev, replace(trained, device=dev.type, deterministic=deterministic))
    data = worker.data
    for stack in plan_retraining(cells, solo, models_per_batch):
        trainer = TrunkTrainer.separate(data.model, [c.hparams for c in stack], worker.train_cfg, dev)
        records = trainer.run(data.stream)
        diffs = [trajectory_difference(r.losses, stored[c.key]) for c, r in zip(stack, records, strict=True)]
        worst = int(np.argmax(diffs))
        if diffs[worst] > rtol:
            c = stack[worst]
            raise ConfigError(
                f"{study_dir}: re-training cell ({c.i}, {c.j}) on {dev} does not reproduce its stored trajectory "
                f"(max relative difference {diffs[worst]:.3g} > {rtol:g}); evaluate on the device type the "
                "study was trained on, or raise --rtol if the difference is float rounding")
        seen = set()
        for index, (cell, diff) in enumerate(zip(stack, diffs, strict=True)):
            if cell.key in seen:  # the companion copy of a stack of one
                continue
            seen.add(cell.key)
            model = GPT(data.model.config)
            model.load_state_dict(trainer.state_dict_of(index))
            yield RetrainedCell(cell, model.to(dev).eval(), data.tokenizer, diff)
        del trainer


# ------------------------------------------------------------------------------------------ evaluation


Limits = dict[str, int | None]  # examples per task; None: all of them


def parse_limits(spec: str | int | Mapping[str, int | None] | None, tasks: Sequence[str]) -> Limits:
    """Examples per task. None: DEFAULT_LIMITS (all examples of a task it does not name). A number
    (or "all"): every task. "hellaswag=200,piqa=100": those tasks, the others DEFAULT_LIMITS'; "100,piqa=50": every
    task 100 but piqa. A mapping: its tasks, the others DEFAULT_LIMITS'."""
    limits: Limits = {t: DEFAULT_LIMITS.get(t) for t in tasks}
    if spec is None:
        return limits
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, int):
        items = [(None, spec)]
    else:  # "N", "TASK=N" or both, comma-separated; a task without "=" is none: the number is for all
        items = []
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            task, sep, value = part.partition("=")
            items.append((task.strip(), value) if sep else (None, part))
    for task, value in items:
        if task is not None and task not in limits:
            raise ConfigError(f"--limit {spec!r}: {task!r} is not one of the tasks ({', '.join(tasks)}); "
                              "write TASK=N for a task in --tasks")
        n = _limit_value(value, spec)
        limits.update({task: n} if task is not None else dict.fromkeys(limits, n))
    return limits


def _limit_value(value, spec) -> int | None:
    if value is None or str(value).strip().lower() == "all":
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"--limit {spec!r}: {value!r} is not a positive number of examples; write N, all, or "
                          "TASK=N,TASK=N")
    return n


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """lm-eval's TaskManager knowing ``tasks``; custom task YAMLs come from ``include_path``. Indexing the
    ~10k built-in task files takes seconds, so a manager over ``include_path`` alone is tried first."""
    from vmap_sweep.eval.adapter import require_lm_eval

    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path}: no such folder; pass a folder of task YAML files")
        try:
            local = TaskManager(include_path=str(include_path), include_defaults=False)
            if set(tasks) <= set(local.all_tasks):
                return local
        except TypeError:  # lm-eval versions without include_defaults
            pass
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown lm-eval task(s) {', '.join(unknown)}; see `lm-eval ls tasks`, or put a task "
                          "YAML in a folder and pass it with --include-path")
    return manager


def check_tasks_load(tasks: Sequence[str], manager) -> None:
    """Build the tasks once, which loads their data (from the Hub or its cache, or local files): a task that
    can't load fails here, before any model is re-trained, not after the first one."""
    from lm_eval.tasks import get_task_dict

    load = getattr(manager, "load", None) or (lambda names: get_task_dict(names, manager))  # older lm-eval
    try:
        load(list(tasks))
    except Exception as e:  # datasets and the Hub raise many types (connection, offline mode, missing files)
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"lm-eval task(s) {', '.join(tasks)}: can't load their data ({type(e).__name__}: "
                          f"{reason}); connect to the Hub once to cache them, or pass local tasks with "
                          "--include-path") from None


def evaluate_model(model: GPT, tokenizer: Tokenizer, tasks: Sequence[str], limits: Limits, manager,
                   device: str | torch.device = "cpu", batch_size: int = 16) -> tuple[dict[str, float], dict[str, int]]:
    """Accuracy ("acc") of one model on each task over its first ``limits[task]`` examples, and how many examples
    lm-eval scored per task. lm-eval takes one limit per call: one call per distinct limit."""
    import lm_eval

    from vmap_sweep.eval.adapter import VmapSweepLM

    lm = VmapSweepLM(model, tokenizer, device=device, batch_size=batch_size)
    results, samples = {}, {}
    for limit in dict.fromkeys(limits[t] for t in tasks):
        out = lm_eval.simple_evaluate(model=lm, tasks=[t for t in tasks if limits[t] == limit], task_manager=manager,
                                      limit=limit, bootstrap_iters=0, log_samples=False)
        results.update(out["results"])
        samples.update({t: int(n["effective"]) for t, n in (out.get("n-samples") or {}).items()})
    acc = {}
    for task in tasks:
        metrics = results.get(task, {})
        if "acc,none" not in metrics:
            raise ConfigError(f"lm-eval task {task!r} reports no accuracy (metrics: {', '.join(metrics) or 'none'}); "
                              "choose multiple-choice tasks with an `acc` metric")
        acc[task] = float(metrics["acc,none"])
    return acc, samples


def evaluate_cells(retrained: Iterator[RetrainedCell], distance: np.ndarray, tasks: Sequence[str],
                   limits: Limits, manager, device: str | torch.device = "cpu", batch_size: int = 16,
                   progress: Callable[[RetrainedCell, dict[str, float]], None] | None = None) -> list[dict]:
    """One row per re-trained cell: where it is, its distance to the boundary, its accuracy per task and how many
    examples of each task were scored."""
    rows = []
    for r in retrained:
        acc, samples = evaluate_model(r.model, r.tokenizer, tasks, limits, manager, device, batch_size)
        d = float(distance[r.cell.j, r.cell.i])
        rows.append({"i": r.cell.i, "j": r.cell.j, "x": r.cell.x, "y": r.cell.y,
                     # None (JSON has no inf) when the study has one class only: no boundary to be near
                     "distance": d if math.isfinite(d) else None, "accuracy": acc,
                     "max_rel_diff": r.max_rel_diff, "samples": samples})
        if progress is not None:
            progress(r, acc)
    return rows


def run_ood_eval(
    study_dir: str | Path,
    cells: str = "10x10",
    tasks: Sequence[str] = DEFAULT_TASKS,
    limit: str | int | Mapping[str, int | None] | None = None,
    device: str = "auto",
    include_path: str | Path | None = None,
    models_per_batch: int = 8,
    batch_size: int = 64,
    rtol: float = RTOL,
    deterministic: bool = False,
    seed: int = 0,
    progress: Callable[[RetrainedCell, dict[str, float]], None] | None = None,
    pick: str = "lattice",
    chosen: Callable[[list[dict]], None] | None = None,
) -> dict:
    """Select, re-train, evaluate and correlate; stores and returns the "ood" extra of the study.

    ``cells``: an NxM lattice (``pick`` "lattice"), or how many cells ("boundary-quantiles", `pick_by_distance`).
    ``limit``: examples per task, as `parse_limits` reads it (None: DEFAULT_LIMITS). ``deterministic`` should match
    the study's own run (--deterministic) for GPU re-training to reproduce it; ``seed`` seeds the bootstrap of
    the Spearman CI. ``chosen`` hears the chosen cells (i, j, x, y, distance) before any re-training.
    """
    from vmap_sweep.eval.adapter import require_lm_eval

    require_lm_eval()  # before any training: a missing extra should cost nothing
    tasks = list(dict.fromkeys(tasks))
    if not tasks:
        raise ConfigError("--tasks is empty; name one or more lm-eval tasks, e.g. hellaswag,arc_challenge")
    limits = parse_limits(limit, tasks)
    if pick not in PICKS:
        raise ConfigError(f"--pick {pick!r}: choose {' or '.join(PICKS)}")
    if not rtol >= 0:
        raise ConfigError(f"--rtol {rtol}: give a relative difference >= 0, e.g. 1e-6")
    if models_per_batch < 1:
        raise ConfigError(f"--models-per-batch {models_per_batch}: give a positive integer")
    with StudyStore.open(study_dir) as store:
        distance = distance_to_boundary(study_classes(store))
        selected = (boundary_quantile_cells(store, parse_count(cells)) if pick == "boundary-quantiles"
                    else select_cells(store, *parse_cells(cells)))
        criterion = extras.criterion(store)  # the classes the distances are measured to
    manager = task_manager(tasks, include_path)
    check_tasks_load(tasks, manager)
    if chosen is not None:
        chosen([{"i": c.i, "j": c.j, "x": c.x, "y": c.y, "distance": float(distance[c.j, c.i])} for c in selected])
    dev = resolve_device(device)
    retrained = retrain_cells(study_dir, selected, str(dev), models_per_batch, rtol, deterministic)
    rows = evaluate_cells(retrained, distance, tasks, limits, manager, dev, batch_size, progress)
    rows.sort(key=lambda r: (r["j"], r["i"]))
    result = {
        "tasks": tasks,
        "limits": limits,
        "samples": rows[0]["samples"] if rows else {},  # the same tasks and limits for every cell
        "pick": pick,
        "cells": [{k: v for k, v in r.items() if k not in ("max_rel_diff", "samples")} for r in rows],
        "spearman": {t: spearman([math.nan if r["distance"] is None else r["distance"] for r in rows],
                                 [r["accuracy"][t] for r in rows],
                                 seed=seed).to_dict() for t in tasks},
        "retrain_max_rel_diff": max((r["max_rel_diff"] for r in rows), default=0.0),
        "device": str(dev),
        "criterion": criterion,
    }
    with StudyStore.open(study_dir) as store:
        extras.put_ood(store, result)
    return result
