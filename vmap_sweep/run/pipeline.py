"""Run a study: open (or create) its store, check that it may be resumed here, plan the pending cells into
batches, train them on the backend it is given, store each batch atomically.

A killed run restarts with the same command: the plan is recomputed over the whole grid (so shards and
batch indices are stable), and only the cells the store does not have are trained.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from vmap_sweep.data.sources import data_fingerprint
from vmap_sweep.errors import StoreError
from vmap_sweep.run import provenance
from vmap_sweep.run.eta import EtaModel, Work, batch_work
from vmap_sweep.run.worker import Job
from vmap_sweep.store import extras
from vmap_sweep.store.db import DB_NAME, LOCK_NAME, Labeller, StudyStore
from vmap_sweep.store.levels import refuse_training_a_level
from vmap_sweep.store.study import Study
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import Batch, build_grid, preflight
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.study.sizes import Budgets
from vmap_sweep.train.trainer import CellRecord


class Progress:
    """What the run reports; the CLI renders it (cli/render.py)."""

    def start(self, total: int, done: int, batches: int, *, model_steps: int = 0,
              labels: dict[str, int] | None = None, work: list[Work] | None = None) -> None:
        """total cells of the plan, done of them already stored, in `batches` batches. model_steps: the work
        of the batches still to train (Batch.model_steps); work: each of them as run/eta.py counts it, for an
        ETA; labels: the stored cells per class."""

    def batch_started(self, batch: Batch, todo: int) -> None: ...

    def note(self, text: str) -> None:
        """Something worth a line that stops nothing, e.g. a resume under another vmap-sweep version."""

    def batch_done(self, batch: Batch, labels: list[str | None], elapsed: float) -> None:
        """A batch is stored: the class of each of its cells as stored (None: unclassified)."""

    def finish(self) -> None: ...


class Backend(Protocol):
    """Trains batches of one study's cells: run/worker.LocalBackend, run/ray_backend.RayBackend."""

    settings: RunSettings

    def budgets(self, budgets: list[int], unit: str = "tokens") -> Budgets:
        """What the study's data holds in each budget of `unit` (TokenStream.budgets)."""

    def models_per_batch(self, limit: int) -> int: ...

    def run(self, jobs: list[Job], started: Callable[[Job], None],
            evaluate: bool = True) -> Iterator[tuple[Job, list[CellRecord]]]:
        """(job, records) as each batch finishes; evaluate: take each cell's eval loss."""

    def close(self) -> None: ...


def run_study(cfg: StudyConfig, out: str | Path, backend: Backend, *, models_per_batch: int | str = 8,
              shard: tuple[int, int] | None = None, progress: Progress | None = None,
              labeller: Labeller | None = None, criterion: dict | None = None, share: bool = True,
              only: list[Cell] | None = None) -> StudyStore:
    """Train every pending cell of the study in `out` on `backend` (which the caller owns); returns the store,
    open. This process is the only writer of the store: each finished batch commits in one transaction.

    labeller: classifies each record as it is stored, by the study's criterion at that moment.
    criterion: what a new study's classes follow (a zoom child takes its parent's); default ratio.
    share: read the cells that differ only in their dataset size out of one trajectory (study/plan.py, `trunks`);
    False trains every cell alone, for the same results.
    only: train just these cells of the grid (a refinement level's targets); the others stay pending.
    """
    progress = progress or Progress()
    grid = build_grid(cfg)
    out = Path(out)
    new_dir, new_db = not out.exists(), not (out / DB_NAME).exists()
    # The folder and the config are checked before the backend loads anything.
    study = Study.create(out, cfg, grid.cells())
    claimed = False
    try:
        study.store.claim_writer()
        claimed = True
        if only is None:
            refuse_training_a_level(study.store)
        digest = _check_resumable(study, backend.settings)
        origin = _check_provenance(study, cfg, progress)
        checked = preflight(cfg, grid, backend, shard, only)
        _record_start(study, backend.settings, digest, criterion, budgets=checked.budgets, origin=origin,
                      models_per_batch=models_per_batch, share=share, shard=checked.shard_name)
        k = backend.models_per_batch(grid.nx * grid.ny) if models_per_batch == "auto" else int(models_per_batch)
        _train_and_store(study.store, backend, checked.batches(cfg, k, share), progress, labeller, checked.shard_name,
                         evaluate=cfg.eval_tokens > 0)
        return study.store
    except BaseException as e:
        # A study this run created and an error (bad data, model) stopped before any result: remove it, so
        # the fixed command is not refused as "a different config" by a study that holds nothing.
        # (Only by the process that holds the study: another one's refusal never touches it.)
        discard = claimed and new_db and isinstance(e, Exception) and _holds_nothing(study.store)
        study.close()
        if discard:
            _remove_empty_study(out, new_dir)
        raise
    finally:
        progress.finish()  # also on error: a live progress display would hide the cursor


def _check_resumable(study: Study, settings: RunSettings) -> str | None:
    """Resume only with the settings and data a study was trained with; returns the data's digest."""
    stored = study.settings
    if stored is not None:
        settings.check_same(stored, study.store.path)
    return check_data_unchanged(study.store, study.config.data)


def _check_provenance(study: Study, cfg: StudyConfig, progress: Progress) -> dict:
    """Resume only on the weights and Hub commits a study started with; returns this run's provenance."""
    current, notes = check_origin_unchanged(study.store, cfg)
    for line in notes:
        progress.note(line)
    return current


def check_origin_unchanged(store: StudyStore, cfg: StudyConfig) -> tuple[dict, list[str]]:
    """This run's provenance, refused where the study's weights or Hub commits differ from it (a zoom child
    checks its parent's too); and the version differences that are only shown."""
    current, stored = provenance.collect(cfg), extras.provenance(store)
    return current, [] if stored is None else provenance.check_same(stored, current, store.path)


def check_data_unchanged(store: StudyStore, data: str) -> str | None:
    """A local data file keeps the contents the study started with (shards too: merge compares them).
    Returns the file's digest, for the store once the data has loaded."""
    digest, stored = data_fingerprint(data), extras.data_digest(store)
    if digest is not None and stored is not None and stored != digest:
        raise StoreError(f"{data}: its contents changed since {store.path} was started (sha256 {stored[:12]} -> "
                         f"{digest[:12]}); restore that file, or use a new --out for the new data")
    return digest


def _record_start(study: Study, settings: RunSettings, digest: str | None, criterion: dict | None,
                  *, budgets: Budgets, origin: dict, models_per_batch: int | str, share: bool,
                  shard: str | None) -> None:
    """What the study was started with, written once its model and data have loaded."""
    store = study.store
    if study.settings is None:
        extras.put_run_settings(store, settings)
    if extras.dataset_sizes(store) is None:
        extras.put_dataset_sizes(store, budgets.sizes)
    if not extras.run_options(store):
        extras.put_run_options(store, models_per_batch, share, shard)
    if extras.provenance(store) is None:
        extras.put_provenance(store, origin)
    if digest is not None and study.data_digest is None:
        extras.put_data_digest(store, digest)
    # a given criterion is taken only by a study with no result yet: one study, one criterion
    if criterion is not None and not extras.has_criterion(store) and store.done_count() == 0:
        extras.put_criterion(store, criterion)


def _train_and_store(store: StudyStore, backend: Backend, batches: list[Batch], progress: Progress,
                     labeller: Labeller | None, shard_name: str | None, evaluate: bool) -> None:
    pending = {c.key for c in store.pending()}
    jobs = [(b, [c for c in b.cells if c.key in pending]) for b in batches]
    jobs = [(b, cells) for b, cells in jobs if cells]
    total = sum(len(b.cells) for b in batches)
    work = [batch_work(b, len(cells)) for b, cells in jobs]
    done = total - sum(len(c) for _, c in jobs)
    progress.start(total, done, len(batches), model_steps=sum(b.model_steps for b, _ in jobs),
                   labels=store.label_counts(), work=work)
    started_at: dict[int, float] = {}
    # what `status` shows of this run from another terminal: written into the study's lock file
    live = LiveRun(store, total, done, len(batches), work)

    def started(job: Job) -> None:
        started_at[job[0].index] = time.perf_counter()
        progress.batch_started(job[0], len(job[1]))
        live.batch_started(job[0])

    for (batch, cells), records in backend.run(jobs, started, evaluate):
        labels = store.record_batch(zip(cells, records, strict=True), batch_index=batch.index, shard=shard_name,
                                    labeller=labeller)
        live.batch_done(batch, len(labels))
        progress.batch_done(batch, labels, time.perf_counter() - started_at.get(batch.index, time.perf_counter()))


class LiveRun:
    """This run's progress as `status` shows it: pid, the batch in training, cells stored and the ETA (learnt as
    the progress display learns it), published through the study's lock file at each batch's start and end."""

    def __init__(self, store: StudyStore, total: int, done: int, batches: int, work: list[Work]):
        self.store, self.total, self.done, self.batches = store, total, done, batches
        self.eta, self.last = EtaModel(work), time.perf_counter()
        self.running: list[int] = []
        self._publish()

    def batch_started(self, batch: Batch) -> None:
        self.running.append(batch.index)
        self._publish()

    def batch_done(self, batch: Batch, cells: int) -> None:
        now = time.perf_counter()
        self.eta.observe(batch_work(batch, cells), now - self.last)
        self.last = now
        self.done += cells
        with contextlib.suppress(ValueError):
            self.running.remove(batch.index)
        self._publish()

    def _publish(self) -> None:
        left = self.eta.seconds_left()
        self.store.publish_progress({
            "batch": [i + 1 for i in self.running], "batches": self.batches, "done": self.done, "total": self.total,
            "eta_seconds": None if left is None else round(left, 1),
            "updated": datetime.now(UTC).isoformat(timespec="seconds")})


def _holds_nothing(store: StudyStore) -> bool:
    try:
        return store.done_count() == 0
    except sqlite3.Error:
        return False  # can't tell: keep it


def _remove_empty_study(out: Path, remove_dir: bool) -> None:
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal", LOCK_NAME):
        with contextlib.suppress(OSError):
            (out / name).unlink()
    if remove_dir:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty
