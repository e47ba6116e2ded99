"""Refine a finished study's boundary: nested grids, each halving both spacings, trained only where it can matter.

Level L of the study in DIR is a study of its own in DIR/refine-L (its config: the study's, at the finer
resolution, and without eval pass unless the refinement asks for one: a level exists to find its cells' classes,
which no criterion reads off the eval loss). Its store holds, done: the cells of level L-1 that were trained
(copied, bit for bit: a nested grid's cell has the same hyperparameters at every level), the new cells whose
coarse neighbourhood holds more than one class (trained here, study/refine.py says which), and the new cells that
repeat one of those's experiment (the same supervised tokens: copied from it, bitwise what training them would
give). Every other cell stays pending in that store and takes the class of its uniform neighbourhood: the
level's `refine_level` extra holds those inferred classes, which are never stored as trained. The study in DIR
records each finished level and what it cost (`refine` extra).

Pricing is the engine's: the trained cells are planned as any run's (study/plan.py), so a new learning rate is a
trunk trained as far as its largest needed budget, new budgets of a learning rate are read out of its trunk, and
batches commit atomically through run_study. One writer: the refining process holds DIR's lock (and each level's,
while it trains). A killed refinement resumes with the same command: a level's targets follow from the level below
it, which is finished, so they are the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vmap_sweep.errors import ConfigError, StoreError, VmapSweepError
from vmap_sweep.run.pipeline import (
    Backend,
    Progress,
    check_data_unchanged,
    check_origin_unchanged,
    run_study,
)
from vmap_sweep.store import extras
from vmap_sweep.store.db import Labeller, StudyStore, holds_schema, study_dir
from vmap_sweep.store.levels import (  # noqa: F401 - read by the CLI and tests from here too
    MAX_LEVELS,
    REFINE,
    REFINE_LEVEL,
    REFINING,
    LevelMap,
    decode_codes,
    encode_codes,
    label_codes,
    level_dir,
    level_info,
    study_map,
)
from vmap_sweep.store.study import Study
from vmap_sweep.study.axes import parse_resolution
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.criterion import as_options
from vmap_sweep.study.grid import Cell, Grid
from vmap_sweep.study.plan import BudgetSource, build_grid, cell_steps, plan_study, same_experiments
from vmap_sweep.study.refine import DEFAULT_MARGIN, UNKNOWN, LevelPlan, level_points, plan_level, trace_targets
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.train.trainer import CellRecord

TRACE_ROUNDS = "refine_rounds"  # a level's tracing rounds: each one's cells, recorded before they train
_COPY_CHUNK = 2048  # cells per copying transaction


def level_config(cfg: StudyConfig, level: int, evaluate: bool = False) -> StudyConfig:
    """Level `level`'s study: `cfg` at the level's resolution; evaluate False: no eval pass (--eval-tokens 0)."""
    nx, ny = parse_resolution(cfg.resolution)
    fx, fy = level_points(nx, level), level_points(ny, level)
    return cfg.with_overrides(resolution=str(fx) if fx == fy else f"{fx}x{fy}",
                              eval_tokens=cfg.eval_tokens if evaluate else 0)


# ------------------------------------------------------------------------------------------------ one level
@dataclass
class LevelWork:
    """What level L needs: the plan of its classes, the cells to train, to copy (coarse trained cells, repeats)."""

    level: int
    config: StudyConfig
    grid: Grid
    plan: LevelPlan
    names: list[str]
    train: list[Cell]  # targets, and the cells whose experiment a target repeats when those are not yet trained
    copies: dict[tuple[int, int], tuple[int, int]]  # a target repeating another cell -> that cell (same store)
    from_coarse: dict[tuple[int, int], tuple[int, int]]  # a cell of this level -> its trained cell one level down
    repeat_rows: int  # rows (or columns) along the tokens axis that repeat a smaller budget everywhere

    @property
    def trained_off_boundary(self) -> int:
        """Trained cells that are no target: the experiment a target repeats, in a cell of a uniform neighbourhood."""
        return sum(1 for c in self.train if not self.plan.targets[c.j, c.i])

    @property
    def inferred_new(self) -> int:
        """New cells left to inference: neither a target nor trained as the experiment a target repeats."""
        trained = np.zeros(self.plan.targets.shape, dtype=bool)
        for c in self.train:
            trained[c.j, c.i] = True
        return int((self.plan.inferred_new & ~trained).sum())


def level_work(cfg: StudyConfig, level: int, coarse: LevelMap, coarse_trained: np.ndarray,
               supervised: Callable[[list[int]], Mapping[int, int]], margin: int,
               evaluate: bool = False) -> LevelWork:
    """The cells level `level` trains, infers and copies, given level-1's map (`coarse`) and which of its cells were
    trained (`coarse_trained`, bool). supervised(budgets) -> supervised tokens of each budget; evaluate: the
    level's cells take an eval loss."""
    names = sorted(set(coarse.labels.reshape(-1).tolist()))
    plan = plan_level(label_codes(coarse.labels, names), margin)
    fine_cfg = level_config(cfg, level, evaluate)
    grid = build_grid(fine_cfg)
    if (grid.ny, grid.nx) != plan.codes.shape:
        raise ConfigError(f"refine: level {level} has {grid.nx}x{grid.ny} cells, its plan {plan.codes.shape}")
    _check_nested(build_grid(level_config(cfg, level - 1)), grid)
    targets = {(int(i), int(j)) for j, i in zip(*np.nonzero(plan.targets), strict=True)}
    trained_below = {(2 * int(i), 2 * int(j)) for j, i in zip(*np.nonzero(coarse_trained), strict=True)}
    repeats, repeat_rows = _repeats(fine_cfg, grid, targets, supervised)
    train: set[tuple[int, int]] = set()
    copies: dict[tuple[int, int], tuple[int, int]] = {}
    for key in sorted(targets):
        rep = repeats.get(key, key)
        if rep != key:
            copies[key] = rep
        if rep not in trained_below:
            train.add(rep)
    cells = [grid.cell(i, j) for i, j in sorted(train, key=lambda k: (k[1], k[0]))]
    from_coarse = {k: (k[0] // 2, k[1] // 2) for k in trained_below}
    return LevelWork(level, fine_cfg, grid, plan, names, cells, copies, from_coarse, repeat_rows)


def _check_nested(coarse: Grid, fine: Grid) -> None:
    """Every cell of the coarser grid is bitwise the finer grid's cell (2p, 2q): the reason its result is reused."""
    xs, ys, fxs, fys = coarse.xs, coarse.ys, fine.xs, fine.ys
    if not (np.array_equal(xs, fxs[::2]) and np.array_equal(ys, fys[::2])):
        bad = "x" if not np.array_equal(xs, fxs[::2]) else "y"
        raise ConfigError(f"refine: the {bad} values of the {fine.nx}x{fine.ny} grid at the coarse points differ "
                          f"from the {coarse.nx}x{coarse.ny} grid's in their last digits, so its cells can't be "
                          "reused; refine a study whose range gives nested values (e.g. one of the presets' ranges)")


def _repeats(cfg: StudyConfig, grid: Grid, targets: set[tuple[int, int]],
             supervised: Callable[[list[int]], Mapping[int, int]]) -> tuple[dict, int]:
    """Each target that repeats another cell's experiment -> that cell (study/plan.py `same_experiments`, over the
    whole line of cells that differ from it only in their budget); and how many grid lines along the tokens axis
    repeat a smaller budget's experiment for every learning rate (where the tokens axis has run out of new data)."""
    axis = "y" if grid.y.name == "tokens" else "x" if grid.x.name == "tokens" else None
    if axis is None:
        return {}, 0
    budgets = sorted({int(v) for v in (grid.ys if axis == "y" else grid.xs)})
    held = supervised(budgets)
    tps = cfg.tokens_per_step()
    lines = sorted({i if axis == "y" else j for i, j in targets})
    out: dict[tuple[int, int], tuple[int, int]] = {}
    n = grid.ny if axis == "y" else grid.nx
    # along one line only the budget changes; which budgets repeat depends on nothing else but the step counts and
    # LR multipliers, i.e. on the line's batch size and warmup (the same for every line that sweeps neither)
    known: dict[tuple, dict[int, int]] = {}
    def key(line: int, k: int) -> tuple[int, int]:
        return (line, k) if axis == "y" else (k, line)

    for line in lines:
        first = grid.cell(*key(line, 0))
        kind = (first.hparams.get("batch_size"), first.hparams.get("warmup_ratio"))
        if kind not in known:
            cells = [grid.cell(*key(line, k)) for k in range(n)]
            same = same_experiments(cells, held, cfg.schedule, tps)
            pos = {c.key: k for k, c in enumerate(cells)}
            known[kind] = {pos[cell]: pos[rep.key] for cell, rep in same.items()}
        for k, rep in known[kind].items():
            if key(line, k) in targets:
                out[key(line, k)] = key(line, rep)
    # lines that repeat along tokens: one line of cells (the first learning rate) tells, under any schedule
    probe = [grid.cell(0, k) if axis == "y" else grid.cell(k, 0) for k in range(n)]
    return out, len(same_experiments(probe, held, cfg.schedule, tps))


# ------------------------------------------------------------------------------------------------ refining
def _record(row: dict) -> CellRecord:
    """A stored cell's result as the record that stored it (record_batch reads it back bit for bit), but for its
    wall time."""
    def opt(v: float) -> float | None:
        return None if not np.isfinite(v) else float(v)

    return CellRecord(initial_loss=float(row["initial_loss"]), steps=int(row["steps"]),
                      losses=row["trajectory"].tolist(), base_losses=row["base_losses"].tolist(),
                      grad_norms=row["grad_norms"].tolist(), lrs=row["lrs"].tolist(),
                      steps_done=int(row["steps_done"]), unstable=bool(row["unstable"]),
                      unstable_step=row["unstable_step"], eval_loss=opt(row["eval_loss"]),
                      wall_time=0.0)  # a copy trains nothing: a level's training time is its own


def _copy(store: StudyStore, sources: Mapping[tuple[int, int], dict], origin: Mapping[tuple[int, int], str],
          labeller: Labeller | None, steps: Mapping[tuple[int, int], int] | None = None) -> int:
    """Store each pending cell of `sources` (key -> a done row of another cell, same experiment) in chunks, each one
    transaction; `origin`: what the copy records as where it was trained; `steps`: a repeat's own planned step count
    (its record is its experiment's in everything else: the steps past the last supervised token change nothing).
    Returns the cells copied."""
    pending = {c.key for c in store.pending()}
    todo = [k for k in sorted(sources, key=lambda k: (k[1], k[0])) if k in pending]
    for start in range(0, len(todo), _COPY_CHUNK):
        chunk = todo[start:start + _COPY_CHUNK]
        by_origin: dict[str, list[tuple[tuple[int, int], CellRecord]]] = {}
        for k in chunk:
            rec = _record(sources[k])
            if steps is not None:
                rec.steps = int(steps[k])
            by_origin.setdefault(origin[k], []).append((k, rec))
        for where, items in by_origin.items():
            store.record_batch(items, batch_index=None, shard=where, labeller=labeller)
    return len(todo)


def _origin(row: dict, level: int) -> str:
    shard = row.get("shard")
    return shard if isinstance(shard, str) and shard.startswith(("level ", "repeat ")) else f"level {level}"


def refine_study(top: str | Path, backend: Backend, levels: int, *, margin: int = DEFAULT_MARGIN,
                 models_per_batch: int | str = 8, progress: Progress | None = None, labeller: Labeller | None = None,
                 share: bool = True, note: Callable[[str], None] | None = None, trace: bool = False,
                 evaluate: bool = False) -> list[dict]:
    """Refine the finished study in `top` to `levels` levels (resuming any begun); returns each level's cost.
    trace: after each level's targets, train in rounds the inferred cells next to a mixed 2 x 2 block of the finer
    map (study/refine.py). evaluate: take each trained cell's eval loss too (an eval pass per cell)."""
    top = study_dir(top)
    levels = check_levels(levels)
    note = note or (lambda _: None)
    with Study.open(top) as study:
        # before the lock: a refused command leaves the study as it was
        record = _checked_record(top, study, margin, trace, evaluate, backend.settings)
        study.store.claim_writer(REFINING)  # one refinement (or run, or zoom) of this study at a time
        if study.settings is not None:
            study.settings.check_trainable_here(study.store.path)
        check_origin_unchanged(study.store, study.config)
        # read once a classify under way has committed; one that begins later sees the lock and waits for the levels
        cfg, criterion = study.config, extras.criterion(study.store, settled=True)
        done_levels = {int(e["level"]): e for e in record.get("levels", [])}
        on_disk = _on_disk(top, record)
        coarse = study_map(study.store)
        trained = np.ones(coarse.labels.shape, dtype=bool)
        rows_below = {(r["i"], r["j"]): r for r in study.store.rows(arrays=True, done_only=True)}
        for level in range(1, levels + 1):
            folder = level_dir(top, level)
            if level in on_disk:
                with _finished_level(top, level, criterion) as lv:
                    coarse = study_map(lv.store)
                    rows_below = {(r["i"], r["j"]): r for r in lv.store.rows(arrays=True, done_only=True)}
                    trained = ~coarse.inferred
                continue
            work = level_work(cfg, level, coarse, trained, lambda b: _supervised(backend, b), margin, evaluate)
            batches = plan_study(work.config, work.train, 8 if models_per_batch == "auto" else int(models_per_batch),
                                 share) if work.train else []
            off = work.trained_off_boundary
            off = f", {off:,} of them off it as the experiment a target repeats" if off else ""
            note(f"level {level}: {work.grid.nx}x{work.grid.ny}, {int(work.plan.targets.sum()):,} new cells on the "
                 f"boundary ({len(work.train):,} to train{off}, {len(work.copies):,} repeat an experiment), "
                 f"{work.inferred_new:,} inferred")
            start = time.perf_counter()
            lv_study = Study.create(folder, work.config, work.grid.cells())
            lv_study.close()
            with _writable_level(folder, criterion) as store:
                if level_info(store) is None:  # begun: a level's record says so before any cell trains
                    store.put_extra(REFINE_LEVEL, {"level": level, "of": "..", "margin": margin, "complete": False})
            store = run_study(work.config, folder, backend, models_per_batch=models_per_batch, progress=progress,
                              labeller=labeller, criterion=criterion, share=share, only=work.train) \
                if work.train else _writable_level(folder, criterion)
            with store:
                sources = {k: rows_below[src] for k, src in work.from_coarse.items()}
                origin = {k: _origin(rows_below[src], level - 1) for k, src in work.from_coarse.items()}
                _copy(store, sources, origin, labeller)
                _copy_repeats(store, work, work.copies, labeller)
            rounds: list[dict] = []
            if trace:
                rounds = _trace(folder, work, backend, models_per_batch, share, progress, labeller, criterion, note)
            seconds = time.perf_counter() - start
            with _writable_level(folder, criterion) as store:
                entry = _finish_level(store, work, batches, seconds, margin, criterion, rounds)
                coarse = study_map(store)
                rows_below = {(r["i"], r["j"]): r for r in store.rows(arrays=True, done_only=True)}
                trained = ~coarse.inferred
            done_levels[level] = entry
            record = {"margin": margin, "trace": trace, "eval": evaluate, "criterion": criterion,
                      "levels": [done_levels[k] for k in sorted(done_levels)]}
            study.store.put_extra(REFINE, record)
        return record.get("levels", [])


_AGAIN = "copy the study folder (without its refine-* folders) to refine it anew"


def _checked_record(top: Path, study: Study, margin: int, trace: bool, evaluate: bool,
                    settings: RunSettings | None = None) -> dict:
    """What a refinement and its dry run both refuse, before anything is written; the study's refine record.
    settings: what the refinement would train with, the study's own (its cells are copied beside the new ones,
    which must be bitwise what its run would have given)."""
    if extras.zoom_of(study.store) is not None or level_info(study.store) is not None:
        raise ConfigError(f"{top}: refine the top study of a folder, not a zoom child or a refinement level")
    if settings is not None and study.settings is not None:
        settings.check_same(study.settings, top)
    widest = max(study.store.nx, study.store.ny) - 1
    if not isinstance(margin, bool) and isinstance(margin, int) and margin > widest:
        raise ConfigError(f"--margin {margin}: at most {widest} for {top}'s {study.store.nx}x{study.store.ny} grid, "
                          "where a margin already sees the whole map from every new cell (and so trains them all: "
                          "for that, sweep the finer resolution directly)")
    record = dict(study.store.get_extra(REFINE) or {})
    _check_rule(top, record, margin, trace)
    _check_levels_eval(top, study.config, evaluate, record)
    check_data_unchanged(study.store, study.config.data)
    return record


def _on_disk(top: Path, record: dict) -> set[int]:
    """The finished levels of a refine record whose study is still there (one whose folder was removed is refined
    again)."""
    return {int(e["level"]) for e in record.get("levels", []) if holds_schema(level_dir(top, int(e["level"])))}


def finished_levels(top: str | Path) -> set[int]:
    """The levels a refinement of `top` would not train again: finished, their studies in place."""
    with StudyStore.open(top) as store:
        record = store.get_extra(REFINE)
    return _on_disk(Path(top), record) if isinstance(record, dict) else set()


def _finished_level(top: Path, level: int, criterion: dict) -> Study:
    """A finished level's study, refused where its classes follow another criterion than the study's."""
    lv = Study.open(level_dir(top, level))
    if (was := lv.criterion) != criterion:
        lv.close()
        raise ConfigError(f"{level_dir(top, level)} was refined under another criterion than {top}'s last "
                          f"`classify`; run `vmap-sweep classify {top} {as_options(was)}` to restore it")
    return lv


def _check_rule(top: Path, record: dict, margin: int, trace: bool) -> None:
    """A refined study goes on under the rule its levels were refined with (a level's targets follow from it)."""
    if record and int(record.get("margin", margin)) != margin:
        raise ConfigError(f"{top} was refined with --margin {record['margin']}; refine it further with that "
                          f"margin, or {_AGAIN}")
    if record and bool(record.get("trace", False)) != trace:
        was = "with --trace" if record.get("trace") else "without --trace"
        raise ConfigError(f"{top} was refined {was}; refine it further the same way, or {_AGAIN}")


def _check_levels_eval(top: Path, cfg: StudyConfig, evaluate: bool, record: dict) -> None:
    """A refinement goes on with or without eval passes as its levels began, finished or not. The refine record
    says how the finished ones did (a record without "eval" was made before levels could go without one: it
    evaluated every level); a level begun but not finished says so in its own config. Only that level's store
    is opened: opening one validates its every cell, which at 1017² takes most of a minute."""
    want = cfg.eval_tokens if evaluate else 0
    finished = {int(e["level"]) for e in record.get("levels", [])}
    recorded = cfg.eval_tokens if record.get("eval", True) else 0
    for level in range(1, MAX_LEVELS + 1):
        if not holds_schema(level_dir(top, level)):
            continue
        if level in finished:
            began = recorded
        else:
            with StudyStore.open(level_dir(top, level)) as store:
                began = store.config.get("eval_tokens")
        if began != want:
            was = "without --eval" if began == 0 else "with --eval"
            raise ConfigError(f"{top} was refined {was} (its level {level} began so); refine it further the same "
                              f"way, or {_AGAIN}")


def _recorded_rounds(store: StudyStore, grid: Grid) -> list[list[tuple[int, int]]]:
    """A level's recorded tracing rounds, checked: lists of (i, j) cells of its grid."""
    value = store.get_extra(TRACE_ROUNDS)
    if value is None:
        return []
    try:
        rounds = [[(int(i), int(j)) for i, j in cells] for cells in value]
        bad = [c for r in rounds for c in r if not (0 <= c[0] < grid.nx and 0 <= c[1] < grid.ny)]
    except (TypeError, ValueError):
        bad = ["not lists of (i, j) cells"]
    if not isinstance(value, list) or bad:
        raise StoreError(f"{store.path}: its {TRACE_ROUNDS} record is damaged ({bad[0] if bad else 'not a list'}); "
                         "remove this level's folder and run the same command again")
    return rounds


def _trace(folder: Path, work: LevelWork, backend: Backend, models_per_batch: int | str, share: bool,
           progress: Progress | None, labeller: Labeller | None, criterion: dict,
           note: Callable[[str], None]) -> list[dict]:
    """Tracing on a level whose targets are stored: rounds, each training (or copying, where it repeats another
    cell's experiment) the inferred cells next to a mixed 2 x 2 block of the level's map, until none is left.
    Each round's cells are recorded in the level's store before they train, so a resumed refinement replays the
    same rounds rather than rounds computed from a half-trained one. Returns each round's cost."""
    with StudyStore.open(folder) as store:
        recorded = _recorded_rounds(store, work.grid)
    k = 8 if models_per_batch == "auto" else int(models_per_batch)
    out: list[dict] = []
    while True:
        if len(out) < len(recorded):
            cells = recorded[len(out)]
        else:
            with StudyStore.open(folder) as store:
                codes, known = _level_codes(store, work)
            more = trace_targets(codes, known)
            cells = [(int(i), int(j)) for j, i in zip(*np.nonzero(more), strict=True)]
            if not cells:
                return out
            recorded.append(sorted(cells, key=lambda c: (c[1], c[0])))
            with _writable_level(folder, criterion) as store:
                store.put_extra(TRACE_ROUNDS, recorded)
            cells = recorded[-1]
        repeats, _ = _repeats(work.config, work.grid, set(cells), lambda b: _supervised(backend, b))
        with StudyStore.open(folder) as store:
            pending = {c.key for c in store.pending()}
        train = sorted({repeats.get(c, c) for c in cells} & pending, key=lambda c: (c[1], c[0]))
        copies = {c: repeats[c] for c in cells if repeats.get(c, c) != c}
        note(f"level {work.level}, tracing round {len(out) + 1}: {len(cells):,} cells next to a mixed block "
             f"({len(train):,} to train, {len(copies):,} repeat an experiment)")
        batches = plan_study(work.config, [work.grid.cell(*c) for c in train], k, share) if train else []
        if train:
            run_study(work.config, folder, backend, models_per_batch=models_per_batch, progress=progress,
                      labeller=labeller, criterion=criterion, share=share,
                      only=[work.grid.cell(*c) for c in train]).close()
        with _writable_level(folder, criterion) as store:
            _copy_repeats(store, work, copies, labeller)
        out.append({"cells": len(cells), "trained": len(train), "repeats": len(copies),
                    "trunks": sum(len(b.stacked) for b in batches), "model_steps": sum(b.model_steps for b in batches)})


def _copy_repeats(store: StudyStore, work: LevelWork, copies: Mapping[tuple[int, int], tuple[int, int]],
                  labeller: Labeller | None) -> None:
    """Store each cell of `copies` (a cell -> the stored cell whose experiment it repeats) as that cell's record
    with its own planned step count."""
    rows = {(r["i"], r["j"]): r for r in store.rows(arrays=True, done_only=True)}
    missing = sorted(k for k, src in copies.items() if src not in rows)
    if missing:
        raise StoreError(f"{store.directory}: cell {missing[0]} repeats a cell that is not stored; run the same "
                         "command again")
    own_steps = cell_steps(work.config)
    _copy(store, {k: rows[src] for k, src in copies.items()}, {k: f"repeat of {src}" for k, src in copies.items()},
          labeller, {k: own_steps(work.grid.cell(*k)) for k in copies})


def _level_codes(store: StudyStore, work: LevelWork) -> tuple[np.ndarray, np.ndarray]:
    """The level's map as class codes (a stored cell's label, else the class the plan infers for it) and which
    cells are stored."""
    stored = store.labels_array()
    known = np.ones(stored.shape, dtype=bool)
    for i, j in (c.key for c in store.pending()):
        known[j, i] = False
    guessed = work.plan.codes
    unknown = ~known & (guessed == UNKNOWN)
    if unknown.any() or (known & (stored == "")).any():
        j, i = np.argwhere(unknown | (known & (stored == "")))[0]
        raise StoreError(f"{store.path}: cell ({i}, {j}) is neither stored with a class nor inferred; run the same "
                         "command again")
    labels = np.where(known, stored, np.array(work.names)[np.maximum(guessed, 0)])
    return np.unique(labels, return_inverse=True)[1].reshape(labels.shape), known


def _writable_level(folder: Path, criterion: dict) -> StudyStore:
    """A level with nothing to train (every target repeats a trained cell): its store, held as its writer."""
    store = StudyStore.open(folder)
    store.claim_writer()
    if not extras.has_criterion(store):
        extras.put_criterion(store, criterion)
    return store


def _supervised(data: BudgetSource, budgets: list[int]) -> dict[int, int]:
    """The supervised tokens each budget (in tokens, the grid's) holds: a backend's or a dry run's stream."""
    return {n: s.supervised for n, s in data.budgets(budgets).sizes.items()}


def _finish_level(store: StudyStore, work: LevelWork, batches: Sequence, seconds: float, margin: int,
                  criterion: dict, rounds: Sequence[dict] = ()) -> dict:
    """Check the level is whole (every cell trained, copied or inferred); store its inferred classes; its cost."""
    pending = {c.key for c in store.pending()}
    codes = np.full(work.plan.codes.shape, UNKNOWN, dtype=np.int64)
    for i, j in pending:
        code = work.plan.codes[j, i]
        if code == UNKNOWN:
            raise StoreError(f"{store.path}: cell ({i}, {j}) lies on the boundary but is not stored; run the same "
                             "command again")
        codes[j, i] = code
    cost = {"level": work.level, "folder": store.directory.name, "nx": work.grid.nx, "ny": work.grid.ny,
            "new_cells": int((~work.plan.coarse).sum()), "targets": int(work.plan.targets.sum()),
            "trained": len(work.train), "off_boundary": work.trained_off_boundary, "repeats": len(work.copies),
            "inferred": len(pending),
            "trunks": sum(len(b.stacked) for b in batches), "model_steps": sum(b.model_steps for b in batches),
            "seconds": round(seconds, 3), "repeat_lines": work.repeat_rows}
    if rounds:  # tracing: its rounds' cells count as trained (or repeats) here, and their trunks and steps too
        for key in ("trained", "repeats", "trunks", "model_steps"):
            cost[key] += sum(r[key] for r in rounds)
        cost["traced"] = [r["cells"] for r in rounds]
    store.put_extra(REFINE_LEVEL, {"level": work.level, "of": "..", "margin": margin, "criterion": criterion,
                                   "labels": work.names, "inferred": encode_codes(codes), "cost": cost,
                                   "complete": True})
    return cost


def check_levels(levels: int) -> int:
    if isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
        raise ConfigError(f"--levels {levels!r}: give a whole number from 1 to {MAX_LEVELS} (each level doubles "
                          "the points per axis)")
    return levels


def _cost(work: LevelWork, k: int, share: bool) -> dict:
    batches = plan_study(work.config, work.train, k, share) if work.train else []
    return {"level": work.level, "nx": work.grid.nx, "ny": work.grid.ny, "new_cells": int((~work.plan.coarse).sum()),
            "targets": int(work.plan.targets.sum()), "trained": len(work.train),
            "off_boundary": work.trained_off_boundary, "repeats": len(work.copies),
            "inferred_new": work.inferred_new, "trunks": sum(len(b.stacked) for b in batches),
            "model_steps": sum(b.model_steps for b in batches), "repeat_lines": work.repeat_rows, "projected": False}


def plan_refinement(top: str | Path, levels: int, supervised: Callable[[list[int]], Mapping[int, int]], *,
                    margin: int = DEFAULT_MARGIN, models_per_batch: int = 8, share: bool = True,
                    growth: float = 2.0, trace: bool = False, evaluate: bool = False,
                    settings: RunSettings | None = None) -> list[dict]:
    """--dry-run: per level the cells, the cells to train, the trunks and model-steps, nothing trained. A level whose
    coarser level is finished (level 0, or a refined one) is planned exactly; the levels after the first unfinished
    one depend on classes not yet known, and are projected: targets x `growth` per level (2^D for a boundary of
    dimension D), trunks doubled (up to the grid's lines), model-steps in proportion to the trunks."""
    top = study_dir(top)
    levels = check_levels(levels)
    out: list[dict] = []
    with Study.open(top) as study:
        cfg, criterion = study.config, study.criterion
        record = _checked_record(top, study, margin, trace, evaluate, settings)
        coarse = study_map(study.store)
    finished = _on_disk(top, record)
    trained = ~coarse.inferred
    for level in range(1, levels + 1):
        if level in finished:
            with _finished_level(top, level, criterion) as lv:
                entry = dict(next(e for e in record["levels"] if int(e["level"]) == level))
                coarse = study_map(lv.store)
                trained = ~coarse.inferred
            out.append({**entry, "done": True, "projected": False})
            continue
        if out and (out[-1]["projected"] or not out[-1].get("done")):
            prev = out[-1]
            nx, ny = level_points(prev["nx"], 1), level_points(prev["ny"], 1)
            lines = nx if build_grid(cfg).x.name != "tokens" else ny
            trunks = min(lines, 2 * prev["trunks"])
            targets = min(int(round(prev["targets"] * growth)), (nx * ny) - prev["nx"] * prev["ny"])
            steps = int(round(prev["model_steps"] * trunks / prev["trunks"])) if prev["trunks"] else 0
            out.append({"level": level, "nx": nx, "ny": ny, "new_cells": nx * ny - prev["nx"] * prev["ny"],
                        "targets": targets, "trained": targets, "repeats": None,
                        "inferred_new": nx * ny - prev["nx"] * prev["ny"] - targets, "trunks": trunks,
                        "model_steps": steps, "projected": True})
            continue
        work = level_work(cfg, level, coarse, trained, supervised, margin, evaluate)
        out.append(_cost(work, models_per_batch, share))
    return out


def dry_run(top: str | Path, levels: int, *, margin: int = DEFAULT_MARGIN, models_per_batch: int = 8,
            share: bool = True, trace: bool = False, evaluate: bool = False,
            settings: RunSettings | None = None) -> tuple[list[dict], float]:
    """--dry-run: plan_refinement with the study's data loaded as a refinement loads it (no weights), and later
    levels projected by the boundary's dimension D (2^D cells per level; 1 where it can't be measured). Returns
    the plan and D."""
    from vmap_sweep.analysis.classify import converged_mask
    from vmap_sweep.analysis.fractal import fractal_dimension
    from vmap_sweep.run.estimate import study_stream

    top = study_dir(top)
    with Study.open(top) as study:
        cfg = study.config
        mask = converged_mask(study_map(study.store).labels)
    try:
        dim = min(max(fractal_dimension(mask).dimension, 1.0), 2.0)
    except VmapSweepError:
        dim = 1.0
    streams = []  # the data loaded once, when a level is planned: not for a command refused first

    def supervised(budgets):
        if not streams:
            streams.append(study_stream(cfg)[1])
        return _supervised(streams[0], budgets)

    plan = plan_refinement(top, levels, supervised, margin=margin,
                           models_per_batch=models_per_batch, share=share, growth=2.0 ** dim, trace=trace,
                           evaluate=evaluate, settings=settings)
    return plan, dim
