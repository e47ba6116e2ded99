"""Weights & Biases for the CLI: a run per command, its config, every batch of a training run, and a study's
results as W&B shows them (maps as images, the dimension with its interval, the rules table, one table row
per cell, loss trajectories as line plots).

W&B is optional: app.py imports this module only for a command given --wandb, and `wandb` itself is imported
when a run starts. The project is --wandb-project, else $WANDB_PROJECT (wandb reads it), else "vmap-sweep";
the entity is $WANDB_ENTITY (wandb reads it). WANDB_MODE=offline writes everything under $WANDB_DIR/wandb for
a later `wandb sync`.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from vmap_sweep.errors import ConfigError, VmapSweepError
from vmap_sweep.run.pipeline import Progress as ProgressHooks

DEFAULT_PROJECT = "vmap-sweep"


def _wandb():
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb needs Weights & Biases: pip install 'vmap-sweep[wandb]'") from None
    return wandb


@contextmanager
def wandb_run(name: str, config: dict, project: str | None = None, job_type: str = "run") -> Iterator[Any]:
    """A W&B run around one command, finished with the command's exit code (1 on an error, 130 on Ctrl-C).
    A run that cannot start (not logged in, a bad WANDB_* setting) is one ConfigError, before any work."""
    wandb = _wandb()
    if project is None and not os.environ.get("WANDB_PROJECT"):
        project = DEFAULT_PROJECT  # wandb's own default would be "uncategorized"
    try:
        run = wandb.init(project=project, name=name, job_type=job_type, config=config)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--wandb: Weights & Biases did not start ({reason}); run `wandb login`, "
                          "or set WANDB_MODE=offline") from None
    try:
        yield run
    except BaseException as e:
        code = getattr(e, "exit_code", None)  # typer.Exit carries the command's own code
        run.finish(exit_code=code if isinstance(code, int) else 130 if isinstance(e, KeyboardInterrupt) else 1)
        raise
    run.finish()


class WandbProgress(ProgressHooks):
    """Forwards to the progress shown in the terminal and logs every batch: cells done in the study, the class of
    each cell this run trained (class/...), cells per minute; the run's totals as its summary (a resumed
    study's earlier cells count in cells_done, not in the classes). The caller finishes the run."""

    def __init__(self, inner, run):
        self.inner, self.run = inner, run
        self.labels: dict[str, int] = {}

    def start(self, total, done, batches, *, model_steps=0, labels=None, work=None):
        self.inner.start(total, done, batches, model_steps=model_steps, labels=labels, work=work)
        self.run.summary.update({"cells": total, "cells_stored_before": done})

    def batch_started(self, batch, todo):
        self.inner.batch_started(batch, todo)

    def batch_done(self, batch, labels, elapsed):
        self.inner.batch_done(batch, labels, elapsed)
        for label in labels:
            label = label or "unclassified"
            self.labels[label] = self.labels.get(label, 0) + 1
        self.run.log({"cells_done": self.inner.done, "not_converged": self.inner.not_converged,
                      "cells_per_minute": self.inner.cells_per_minute(), "batch_seconds": elapsed,
                      "batch_models": len(labels), "batch_steps": batch.steps,
                      **{f"class/{label}": n for label, n in self.labels.items()}})

    def finish(self):
        self.inner.finish()
        self.run.summary.update({"cells_done": self.inner.done, "cells_trained": self.inner.trained,
                                 "cells_per_minute": self.inner.cells_per_minute(),
                                 **{f"class/{label}": n for label, n in self.labels.items()}})

    @property
    def trained(self):
        return self.inner.trained

    def cells_per_minute(self):
        return self.inner.cells_per_minute()


# ------------------------------------------------------------------------------------------------ a study's results
def _plain(value: Any) -> Any:
    """A table value W&B stores as JSON: NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def cells_table(store) -> Any:
    """One row per cell: its indices, every hyperparameter it was trained with (lr, tokens, ...), status, class,
    score, steps, losses, whether it was stopped as unstable and at which step."""
    wandb = _wandb()
    rows = store.rows()
    hparams = sorted({k for r in rows for k in r["hparams"]})
    fields = ["status", "label", "score", "steps_done", "initial_loss", "final_loss", "eval_loss", "unstable",
              "unstable_step"]
    columns = ["i", "j", *hparams, *("class" if f == "label" else f for f in fields)]
    data = [[r["i"], r["j"], *(_plain(r["hparams"].get(h)) for h in hparams), *(_plain(r.get(f)) for f in fields)]
            for r in rows]
    return wandb.Table(columns=columns, data=data)


def trajectory_plots(view, trajectories: dict, rows: Sequence[int], max_lines: int = 12) -> dict[str, Any]:
    """Per row (y index) of `rows`, the training loss per step of up to `max_lines` evenly spaced cells as one
    W&B line plot, each line named by its x value and class; non-finite losses (a divergence) end a line."""
    from vmap_sweep.present.plots import value_text

    wandb = _wandb()
    plots = {}
    for j in rows:
        xs, ys, keys = [], [], []
        for i in np.unique(np.linspace(0, len(view.xs) - 1, min(max_lines, len(view.xs))).astype(int)):
            loss = np.asarray(trajectories.get((int(i), int(j)), []), dtype=float)
            not_finite = np.flatnonzero(~np.isfinite(loss))
            end = int(not_finite[0]) if not_finite.size else len(loss)
            if end == 0:
                continue
            xs.append(list(range(end)))
            ys.append(loss[:end].tolist())
            where = value_text(view.x_name, view.xs[i], view.budget_unit)
            keys.append(f"{where}: {view.labels[j, i] or 'unclassified'}")
        if keys:
            title = f"training loss per step at {value_text(view.y_name, view.ys[j], view.budget_unit)}"
            plots[f"trajectories/row_{j}"] = wandb.plot.line_series(xs=xs, ys=ys, keys=keys, title=title,
                                                                    xname="optimizer step")
    return plots


def log_maps(run, store, rows: Sequence[int] | None = None) -> None:
    """`plot`'s pictures as images (maps/score, maps/stability, maps/final_loss, maps/eval_loss,
    maps/trajectories), the cells table (cells_table) and the trajectories of `rows` (default: first, middle and
    last) as line plots."""
    import matplotlib.pyplot as plt

    from vmap_sweep.analysis.view import grid_view
    from vmap_sweep.present.plots import plot_figures

    wandb = _wandb()
    if rows is None:
        rows = sorted({0, store.ny // 2, store.ny - 1})
    view, trajectories = grid_view(store), store.trajectories()
    figures = plot_figures(view, trajectories, rows)
    try:
        images = {f"maps/{name}": wandb.Image(fig) for name, fig in figures.items()}
    finally:
        for fig in figures.values():
            plt.close(fig)
    run.log({**images, "cells_table": cells_table(store), **trajectory_plots(view, trajectories, rows)})


def log_dimension(run, report: dict, picture: Path | None = None) -> None:
    """The box-counting dimension and its 95% interval, logged (fractal/...) and in the summary, with the box
    counts as a table and their log-log fit as an image when `picture` was drawn."""
    wandb = _wandb()
    table = wandb.Table(columns=["box_size", "box_count"],
                        data=[[int(s), float(c)] for s, c in zip(report["box_sizes"], report["box_counts"],
                                                                 strict=True)])
    extra = {"fractal/box_counts": table}
    if picture is not None and Path(picture).is_file():
        extra["fractal/plot"] = wandb.Image(str(picture))
    where = {"fractal/fit_range": list(report["fit_range"]), "fractal/resolution": list(report["resolution"])}
    if report.get("too_small"):  # no number where `fractal` prints none: the counts, and why
        run.log(extra)
        run.summary.update({**where, "fractal/skipped": report["too_small"]})
        return
    values = {f"fractal/{k}": _plain(report[k]) for k in ("dimension", "ci_low", "ci_high", "stderr") if k in report}
    run.log({**values, **extra})
    run.summary.update({**values, **where})


def log_rules(run, result, picture: Path | None = None) -> None:
    """The rules of thumb: one row per dataset size with its numbers (rules/sizes: sortable, plottable in W&B), the
    fitted power laws (rules/fits: coefficient, exponent and its 95% CI), the sentences (summary rules/summary)
    and the plot as an image when `picture` was drawn."""
    from vmap_sweep.present.prose import rules_sentences

    wandb = _wandb()
    sizes = [asdict(r) for r in result.sizes]
    fits = [(name, fit) for name, fit in (("crit", result.crit_fit), ("crit_last", result.crit_last_fit),
                                           ("safe", result.safe_fit), ("opt", result.opt_fit)) if fit is not None]
    fit_columns = ["rule", "coefficient", "exponent", "ci_low", "ci_high", "n", "r2"]
    logged = {"rules/fits": wandb.Table(columns=fit_columns, data=[
        [name, *(_plain(getattr(fit, c)) for c in fit_columns[1:])] for name, fit in fits])}
    if sizes:
        logged["rules/sizes"] = wandb.Table(columns=list(sizes[0]),
                                            data=[[_plain(v) for v in row.values()] for row in sizes])
    if picture is not None and Path(picture).is_file():
        logged["rules/plot"] = wandb.Image(str(picture))
    run.log(logged)
    run.summary["rules/summary"] = "\n".join(rules_sentences(result))
    for name, fit in fits:
        run.summary.update({f"rules/{name}_exponent": _plain(fit.exponent),
                            f"rules/{name}_coefficient": _plain(fit.coefficient)})


def log_study(run, store) -> None:
    """Everything at the end of `run`: maps, cells, trajectories, the dimension, the rules. A result the study
    cannot give (one class, no boundary; no LR x dataset-size grid) is skipped, its reason in the summary
    (e.g. fractal/skipped)."""
    from vmap_sweep.analysis.rules import rules_of_thumb
    from vmap_sweep.analysis.study import fractal_report
    from vmap_sweep.analysis.view import StudyView
    from vmap_sweep.present.plots import plot_box_counts, plot_rules

    log_maps(run, store)
    with tempfile.TemporaryDirectory() as tmp:
        box, rules_plot = Path(tmp) / "box_counting.png", Path(tmp) / "rules.png"
        try:
            measured = fractal_report(store.directory)
            plot_box_counts(measured.box, box)
            log_dimension(run, measured.to_dict(), box)
        except VmapSweepError as e:
            run.summary["fractal/skipped"] = str(e)
        try:
            result = rules_of_thumb(StudyView.load(store))
            plot_rules(result, rules_plot)
            log_rules(run, result, rules_plot)
        except VmapSweepError as e:
            run.summary["rules/skipped"] = str(e)
