"""Progress of a running study: a rich bar (or log lines), optional Weights & Biases, summary tables."""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from vmap_sweep.errors import ConfigError
from vmap_sweep.run.pipeline import Progress as ProgressHooks
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.plan import Batch
from vmap_sweep.train.trainer import CellRecord


class RichProgress(ProgressHooks):
    """Cells done/total, cells per minute, ETA, the current batch and how many diverged so far."""

    def __init__(self, console: Console, quiet: bool = False):
        self.console, self.quiet = console, quiet
        self.diverged = self.done = self.trained = 0
        self.total = self.batches = 0
        self.started = time.perf_counter()
        self.bar: Progress | None = None
        self.running: dict[int, str] = {}  # batches in flight: several at once with one Ray worker per GPU

    def start(self, total: int, done: int, batches: int) -> None:
        # one progress may serve several studies in a row (zoom levels): counts are per study
        self.total, self.done, self.batches = total, done, batches
        self.diverged = self.trained = 0
        self.started = time.perf_counter()
        if done:
            self._log(f"resuming: {done}/{total} cells already stored")
        if not self.quiet:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("cells · {task.fields[rate]:.1f}/min · {task.fields[diverged]} diverged"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("starting", total=total, completed=done, rate=0.0, diverged=0)

    def cells_per_minute(self) -> float:
        return 60 * self.trained / max(time.perf_counter() - self.started, 1e-9)

    def batch_started(self, batch: Batch, todo: int) -> None:
        self.running[batch.index] = f"batch {batch.index + 1}/{self.batches} ({todo} models × {batch.steps} steps)"
        self._describe()

    def _describe(self) -> None:
        if self.bar is None or not self.running:
            return
        if len(self.running) == 1:
            text = next(iter(self.running.values()))
        else:
            text = f"{len(self.running)} batches running ({', '.join(str(i + 1) for i in sorted(self.running))})"
        self.bar.update(self.task, description=text)

    def batch_done(self, batch: Batch, records: list[CellRecord], elapsed: float) -> None:
        self.running.pop(batch.index, None)
        self._describe()
        self.done += len(records)
        self.trained += len(records)
        self.diverged += sum(_diverged(r) for r in records)
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=self.cells_per_minute(), diverged=self.diverged)
        else:
            self._log(f"batch {batch.index + 1}/{self.batches}: {len(records)} cells in {elapsed:.1f}s, "
                      f"{self.done}/{self.total} done, {self.diverged} diverged, "
                      f"{self.cells_per_minute():.1f} cells/min")

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _log(self, text: str) -> None:
        self.console.print(text, highlight=False)


def _diverged(rec: CellRecord) -> bool:
    """The class stored with the record (what the summary table counts), else the trainer's own verdict."""
    label = getattr(rec, "label", None)
    return label == "diverged" if label is not None else bool(rec.diverged)


class WandbProgress(ProgressHooks):
    """Forwards to another progress and logs every batch to Weights & Biases (WANDB_MODE=offline works): cells
    done in the study, the class of each cell this run trained (class/...), cells per minute; the run's totals
    as its summary (a resumed study's earlier cells count in cells_done, not in the classes)."""

    def __init__(self, inner: RichProgress, cfg, name: str | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs Weights & Biases: pip install 'vmap-sweep[wandb]'") from None
        try:
            self.run = wandb.init(project="vmap-sweep", name=name, config=cfg.to_dict())
        except Exception as e:  # not logged in, a bad WANDB_* setting: before any work, one line
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"--wandb: Weights & Biases did not start ({reason}); run `wandb login`, "
                              "or set WANDB_MODE=offline") from None
        self.inner = inner
        self.labels: dict[str, int] = {}

    def start(self, total, done, batches):
        self.inner.start(total, done, batches)
        self.run.summary.update({"cells": total, "cells_stored_before": done})

    def batch_started(self, batch, todo):
        self.inner.batch_started(batch, todo)

    def batch_done(self, batch, records, elapsed):
        self.inner.batch_done(batch, records, elapsed)
        for rec in records:
            label = getattr(rec, "label", None) or "unclassified"
            self.labels[label] = self.labels.get(label, 0) + 1
        self.run.log({"cells_done": self.inner.done, "diverged": self.inner.diverged,
                      "cells_per_minute": self.inner.cells_per_minute(), "batch_seconds": elapsed,
                      "batch_models": len(records), "batch_steps": batch.steps,
                      **{f"class/{label}": n for label, n in self.labels.items()}})

    def finish(self):
        self.inner.finish()
        self.run.summary.update({"cells_done": self.inner.done, "cells_trained": self.inner.trained,
                                 "cells_per_minute": self.inner.cells_per_minute(),
                                 **{f"class/{label}": n for label, n in self.labels.items()}})
        self.run.finish()

    @property
    def trained(self):
        return self.inner.trained

    def cells_per_minute(self):
        return self.inner.cells_per_minute()


def _counts_rows(store: StudyStore) -> list[tuple[str, str]]:
    rows = [("cells done", f"{store.done_count()}/{store.cell_count()}")]
    for label, n in sorted(store.label_counts().items()):
        rows.append((f"  {label}", str(n)))
    return rows


def summary_table(store: StudyStore, progress=None) -> Table:
    table = Table(title=f"study {escape(str(store.directory))}", show_header=False)
    for key, value in _counts_rows(store):
        table.add_row(key, value)
    if progress is not None and getattr(progress, "trained", 0):
        table.add_row("trained this run", f"{progress.trained} cells, {progress.cells_per_minute():.1f} cells/min")
    return table


def status_table(store: StudyStore) -> Table:
    cfg = store.config
    table = Table(title=f"study {escape(str(store.directory))}", show_header=False)
    table.add_row("model / data", escape(f"{cfg.get('model')} / {cfg.get('data')}"))
    table.add_row("grid", escape(f"{cfg.get('x')} × {cfg.get('y')} at {store.nx}×{store.ny}"))
    table.add_row("config hash", store.config_hash[:16])
    for key, value in _counts_rows(store):
        table.add_row(key, value)
    rows = [r for r in store.rows() if r["status"] == "done"]
    if rows:
        last = max(r["finished_at"] for r in rows)
        table.add_row("last batch stored", last)
        table.add_row("training time so far", f"{sum(r['wall_time'] or 0 for r in rows) / 60:.1f} min")
    children = store.children()
    if children:
        table.add_row("zoom children", escape(", ".join(c.child_dir for c in children)))
    return table
