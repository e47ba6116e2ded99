"""Zoom into a study's convergence boundary: pick a window, re-sweep it at the same resolution, repeat.

Where to zoom (``pick_window``, the window's density, edges and ties) is analysis.window; reading a zoom
chain back (``zoom_levels``, ``dimension_report``) is analysis.chain. This module trains the children.

Folders: a child of the study in ``DIR`` lives in ``DIR/zoom-<level>-<hash>`` (hash: 8 hex of the
window), nested for deeper levels (``DIR/zoom-1-ab12cd34/zoom-2-...``). The same window always maps
to the same folder, so re-running a zoom resumes the unfinished child with ``run_study``; a different
window of the same parent gets its own folder. Each child is registered in its parent
(``store.add_child``, after it has been trained) and records its own level and window in its extra
``zoom_of``; levels are absolute (zooming from a level-1 study makes level-2 children).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from vmap_sweep.analysis.chain import auto_window, finished_classes
from vmap_sweep.analysis.window import DEFAULT_FRACTION, axis_window, check_fraction, check_window, child_name
from vmap_sweep.errors import ConfigError
from vmap_sweep.run.pipeline import Backend, Progress, check_data_unchanged, check_origin_unchanged, run_study
from vmap_sweep.store import extras
from vmap_sweep.store.db import Labeller
from vmap_sweep.store.study import Study
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.plan import build_grid


def child_config(cfg: StudyConfig, window: Sequence[float]) -> StudyConfig:
    """The parent's config with x/y replaced by the window (same resolution and everything else)."""
    x0, x1, y0, y1 = check_window(window)
    try:
        grid = build_grid(cfg).window(x0, x1, y0, y1)
    except ConfigError as e:
        raise ConfigError(f"--window {x0:g} {x1:g} {y0:g} {y1:g}: {e}") from None
    return cfg.with_overrides(x=str(grid.x), y=str(grid.y))


def window_line(level: int, cfg: StudyConfig, *, picked: bool, fraction: float) -> str:
    """"level 1: window lr 0.00123 … 0.0456 × tokens 512 … 1024 (auto: ...)": what a zoom level re-sweeps."""
    x0, x1, y0, y1 = axis_window(cfg)
    x, y = (spec.name for spec in cfg.axes)
    how = (f"auto: the densest part of the parent's boundary, 1/{1 / fraction:g} of each axis" if picked
           else "given by --window")
    return f"level {level}: window {x} {x0:.4g} … {x1:.4g} × {y} {y0:.4g} … {y1:.4g} ({how})"


def zoom_study(parent_dir: str | os.PathLike, backend: Backend, window: Sequence[float] | None = None, depth: int = 1,
               fraction: float = DEFAULT_FRACTION, *, models_per_batch: int | str = 8, progress: Progress | None = None,
               labeller: Labeller | None = None, share: bool = True) -> list[Path]:
    """Zoom ``depth`` levels down from a finished study; returns the child study folders, top first.

    Level 1 uses ``window`` (real units) or, when None, the auto-picked one; deeper levels are always
    auto-picked in their parent. Re-running with the same arguments resumes (nothing done is re-trained).
    Errors in the arguments or the top parent raise before anything is written; a deeper level that can't
    be zoomed (say its boundary touches only its edge cells) raises after the levels above it are done and
    recorded. One backend (the caller's) trains every level: children differ from their parent only in x/y,
    which no backend reads, so the model and data load once.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"--depth {depth!r}: give a whole number of levels >= 1")
    fraction = check_fraction(fraction)
    given = check_window(window) if window is not None else None
    made: list[Path] = []
    current = Path(parent_dir)
    for k in range(depth):
        with Study.open(current) as parent:
            if parent.settings is not None:  # a child's cells compare with its parent's: the same arithmetic
                parent.settings.check_trainable_here(parent.store.path)
            check_data_unchanged(parent.store, parent.config.data)  # ... and the same data
            check_origin_unchanged(parent.store, parent.config)  # ... and base model
            level = parent.level + 1
            if k == 0 and given is not None:
                finished_classes(parent.store)
                child_cfg = child_config(parent.config, given)
            else:
                child_cfg = child_config(parent.config, auto_window(parent.store, fraction))
            win = axis_window(child_cfg)
            if progress is not None:  # which window each level re-sweeps, before its training starts
                progress.note(window_line(level, child_cfg, picked=k > 0 or given is None, fraction=fraction))
            name = child_name(level, win)
            child_dir = current / name
            # the child's classes follow the parent's criterion: levels of one chain compare
            child = run_study(child_cfg, child_dir, backend, models_per_batch=models_per_batch, progress=progress,
                              labeller=labeller, criterion=parent.criterion, share=share)
            with child:
                extras.put_zoom_of(child, {"level": level, "window": list(win), "parent": "..",
                                           "fraction": fraction if k or given is None else None})
            parent.store.add_child(win, name, level)
        made.append(child_dir)
        current = child_dir
    return made
