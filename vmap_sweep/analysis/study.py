"""Analysis of a stored study: classes from trajectories, arrays for plots, the boundary's dimension."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmap_sweep.analysis.classify import (
    CRITERION_EXTRA,
    DIVERGED,
    checked_criterion,
    classify_grid,
    converged_mask,
)
from vmap_sweep.analysis.fractal import fractal_dimension, uncertainty_exponent
from vmap_sweep.analysis.plots import GridView
from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.axes import parse_axis_spec


def classify_cells(store: StudyStore, criterion: str = "ratio", **kw) -> dict[tuple[int, int], tuple[str, float]]:
    """(label, score) of every done cell, recomputed from its stored trajectory."""
    done = [r for r in store.rows(arrays=True) if r["status"] == "done"]
    if not done:
        return {}
    labels, scores = classify_grid(
        [r["trajectory"] for r in done],
        [r["initial_loss"] if np.isfinite(r["initial_loss"]) else 1.0 for r in done],
        criterion=criterion,
        diverged=[bool(r["diverged"]) for r in done],
        references=[r["base_losses"] for r in done] if criterion == "ratio" else None,
        **kw,
    )
    return {(r["i"], r["j"]): (str(lab), float(s)) for r, lab, s in zip(done, labels, scores, strict=True)}


def reclassify(store: StudyStore, criterion: str = "ratio", **kw) -> dict[str, int]:
    """Store new classes for every done cell (no re-training); returns the count per class."""
    checked = checked_criterion(criterion, **kw)
    kw = {k: v for k, v in checked.items() if k != "criterion"}
    labels = classify_cells(store, criterion, **kw)
    store.set_labels(labels)
    store.put_extra(CRITERION_EXTRA, checked)
    counts: dict[str, int] = {}
    for label, _ in labels.values():
        counts[label] = counts.get(label, 0) + 1
    return counts


def reclassify_with_zooms(study: Path, criterion: str = "ratio", **kw) -> tuple[dict[str, int], int]:
    """reclassify a study and every zoom study below it, so that a chain's levels share one criterion (their
    dimensions are pooled); returns the study's count per class and how many zoom studies followed. Every
    folder is found and opened before any is written: a missing one changes nothing."""
    checked_criterion(criterion, **kw)
    folders, seen = [Path(study)], {Path(study).resolve()}
    for folder in folders:  # grows as children are found
        with StudyStore.open(folder) as store:
            for c in store.children():
                child = folder / c.child_dir
                if child.resolve() in seen:
                    raise ConfigError(f"{folder}: zoom child {c.child_dir!r} leads back up the tree; remove it")
                seen.add(child.resolve())
                folders.append(child)
    counts = []
    for folder in folders:
        with StudyStore.open(folder) as store:
            counts.append(reclassify(store, criterion, **kw))
    return counts[0], len(folders) - 1


def grid_view(store: StudyStore) -> GridView:
    """Axis values and per-cell arrays of a study, for the plots."""
    cfg = store.config
    x, y = parse_axis_spec(cfg["x"]), parse_axis_spec(cfg["y"])
    labels = store.labels_array()
    return GridView(
        xs=x.values(store.nx),
        ys=y.values(store.ny),
        x_name=x.name,
        y_name=y.name,
        x_log=x.scale == "log",
        y_log=y.scale == "log",
        scores=store.grid_arrays("score"),
        converged=converged_mask(np.where(labels == "", DIVERGED, labels)),  # a pending cell: not converged
        final_loss=store.grid_arrays("final_loss"),
        eval_loss=store.grid_arrays("eval_loss"),
        title=f"{cfg.get('model')} on {cfg.get('data')}",
    )


def study_classes(store: StudyStore) -> np.ndarray:
    """Boolean (ny, nx) grid, True = converged; every cell must be done and classified."""
    labels = store.labels_array()
    missing = int((labels == "").sum())
    if missing:
        raise ConfigError(f"{store.directory}: {missing} cells are pending or unclassified; finish the run "
                          f"(same command resumes it) or run `vmap-sweep classify {store.directory}`")
    return converged_mask(labels)


def load_class_grid(source: Path) -> np.ndarray:
    """A study folder, or a 2-D .npy (bool mask, True = converged; or a signed score, negative = converged)."""
    if source.is_dir():
        with StudyStore.open(source) as store:
            return study_classes(store)
    if source.suffix != ".npy":
        raise ConfigError(f"{source}: not a study folder or a .npy file; pass one of those")
    if not source.is_file():
        raise ConfigError(f"{source}: no such file")
    try:
        return np.load(source, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{source}: can't read it as a numpy array ({e})") from None


def fractal_report(source: Path, plot_file: Path | None = None) -> dict:
    """Box-counting dimension with CI, fit range and counts, and the uncertainty-exponent estimate."""
    if plot_file is not None:
        from vmap_sweep.analysis.plots import picture_file

        plot_file = picture_file(plot_file)
    grid = load_class_grid(Path(source))
    try:
        box = fractal_dimension(grid)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None  # name the file: a script may measure many
    report = box.to_dict()
    mask = grid if grid.dtype == bool else np.asarray(grid) < 0
    try:
        unc = uncertainty_exponent(mask)
        report["uncertainty_dimension"] = float(unc.dimension)
        report["uncertainty_stderr"] = float(unc.stderr)
        if not 0.0 <= unc.dimension <= 2.0:  # 2 - phi: on a small grid phi can fall outside [0, 2]
            report["uncertainty_note"] = "outside [0, 2], no dimension of a boundary in the plane: too few scales"
    except ConfigError:
        pass  # too small a grid for a second estimate; the box count stands alone
    if plot_file is not None:
        plot_box_counts(box, Path(plot_file))
    return report


def plot_box_counts(box, path: Path) -> Path:
    import matplotlib.pyplot as plt

    sizes, counts = np.asarray(box.box_sizes, float), np.asarray(box.box_counts, float)
    fig, ax = plt.subplots(figsize=(5.5, 4.2), constrained_layout=True)
    ax.loglog(sizes, counts, "o", label="box counts")
    fit_s, _ = box.fit_sizes()
    ax.loglog(fit_s, 2.0 ** (box.intercept - box.dimension * np.log2(fit_s)), "-",
              label=f"fit: D = {box.dimension:.3f} [{box.ci_low:.3f}, {box.ci_high:.3f}]")
    ax.set_xlabel("box size s (cells)")
    ax.set_ylabel("boxes N(s) holding boundary")
    ax.set_title(f"box counting at {box.resolution[0]}×{box.resolution[1]}")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
