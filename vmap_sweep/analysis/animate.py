"""An animation of a zoom: one frame per level, parent to deepest child, each the score heatmap in real
units with the next level's window drawn on it.

Frames are drawn by the plots module's own heatmap (``plots._heatmap``, ``score_norm``, ``signed_log``,
so a frame looks exactly like ``vmap-sweep plot``'s score.png) and rendered to pixels; a full-figure image
replays them through matplotlib.animation's PillowWriter (GIF) and, when ``ffmpeg`` is on PATH,
FFMpegWriter (MP4, same name with .mp4). Files are written under a temporary name and renamed, so an
interrupted run never leaves a half-written animation.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.animation import AbstractMovieWriter, FFMpegWriter, PillowWriter
from matplotlib.patches import Rectangle

from vmap_sweep.analysis.chain import zoom_levels
from vmap_sweep.analysis.plots import _heatmap, score_norm, signed_log
from vmap_sweep.analysis.view import grid_view
from vmap_sweep.analysis.window import Window
from vmap_sweep.errors import ConfigError
from vmap_sweep.store.db import StudyStore

DPI = 100  # frame pixels = the heatmap's figsize x DPI; every frame has the same size


def _frame(folder: Path, level: int, deepest: int, window: Window, next_window: Window | None) -> np.ndarray:
    """RGBA pixels of one level's score heatmap, with the next level's window as a dashed rectangle."""
    with StudyStore.open(folder) as store:
        view = grid_view(store)
    x0, x1, y0, y1 = window
    view.title = (f"zoom level {level}/{deepest}: {view.x_name} {x0:.4g}–{x1:.4g}, "
                  f"{view.y_name} {y0:.4g}–{y1:.4g}")
    s = signed_log(view.scores)
    fig = _heatmap(view, s, "score (sign·log1p|s|; < 0 converged)", "coolwarm", score_norm(s))
    try:
        if next_window is not None:
            a0, a1, b0, b1 = next_window
            fig.axes[0].add_patch(Rectangle((a0, b0), a1 - a0, b1 - b0, fill=False, edgecolor="black",
                                            linewidth=1.8, linestyle="--", zorder=5))
        fig.set_dpi(DPI)
        fig.canvas.draw()
        return np.asarray(fig.canvas.buffer_rgba()).copy()
    finally:
        plt.close(fig)


def _write(frames: list[np.ndarray], path: Path, writer: AbstractMovieWriter) -> None:
    """Replay the rendered frames through one figure of the same pixel size (1 image pixel = 1 output pixel)."""
    h, w = frames[0].shape[:2]
    fig = plt.figure(figsize=(w / DPI, h / DPI), dpi=DPI)
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
        ax.set_axis_off()
        image = ax.imshow(frames[0], interpolation="none")
        with writer.saving(fig, str(partial), DPI):
            for frame in frames:
                image.set_data(frame)
                writer.grab_frame()
        os.replace(partial, path)
    finally:
        plt.close(fig)
        partial.unlink(missing_ok=True)


def animate(parent_dir: str | os.PathLike, out_file: str | os.PathLike, fps: float = 2) -> Path:
    """GIF of the zoom from ``parent_dir`` to its deepest child (one frame per level); returns its path.

    ``out_file`` ends in .gif (or has no suffix: .gif is added). With ffmpeg on PATH an MP4 of the same
    frames is written next to it (same name, .mp4).
    """
    levels = zoom_levels(parent_dir)
    if len(levels) < 2:
        raise ConfigError(f"{parent_dir}: the study has no zoom children to animate; "
                          f"run `vmap-sweep zoom {parent_dir} --auto` first")
    if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and 0 < fps <= 100):
        raise ConfigError(f"--fps {fps!r}: give frames per second in (0, 100], e.g. 2")
    out = Path(out_file)
    if out.suffix.lower() not in ("", ".gif"):
        raise ConfigError(f"-o {out}: the animation is a GIF (plus an MP4 beside it when ffmpeg exists); "
                          "give a file name ending in .gif")
    out = out.with_suffix(".gif")
    deepest = levels[-1][0]
    frames = [_frame(folder, level, deepest, window, levels[k + 1][2] if k + 1 < len(levels) else None)
              for k, (level, folder, window) in enumerate(levels)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"-o {out}: can't create its folder ({e.strerror or e}); choose a writable path") from None
    _write(frames, out, PillowWriter(fps=fps))
    if shutil.which("ffmpeg"):
        _write(frames, out.with_suffix(".mp4"), FFMpegWriter(fps=fps))
    return out
