"""An animation of a zoom, parent to deepest child: each level's score heatmap in real units, then the
same map with the next level's window drawn on it, then ``STEPS`` in-between frames that narrow the view
from the level's whole map to that window (geometrically on a log axis), so the move reads as a zoom;
the deepest level ends it. ``frame_count(levels)`` frames in all.

Frames are drawn by the plots module's own convergence map (``plots.score_figure``, so a frame looks
exactly like ``vmap-sweep plot``'s score.png) and rendered to pixels; a full-figure image
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
from vmap_sweep.analysis.view import grid_view
from vmap_sweep.analysis.window import Window
from vmap_sweep.errors import ConfigError
from vmap_sweep.present.plots import legend_outside, score_figure

DPI = 100  # frame pixels = the heatmap's figsize x DPI; every frame has the same size


STEPS = 4  # in-between frames from a level's whole map to the next level's window


def frame_count(levels: int) -> int:
    """Frames of a zoom of ``levels`` levels: each level but the deepest shows its map, its map with the
    next window, and ``STEPS`` in-between frames; the deepest level one frame."""
    return 1 + (levels - 1) * (2 + STEPS)


def _pixels(fig) -> np.ndarray:
    fig.set_dpi(DPI)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba()).copy()


def _between(a: tuple[float, float], b: tuple[float, float], t: float, log: bool) -> tuple[float, float]:
    """Limits a fraction t of the way from a to b (geometric on a log axis)."""
    if log and min(a + b) > 0:
        return tuple(float(np.exp((1 - t) * np.log(p) + t * np.log(q))) for p, q in zip(a, b, strict=True))
    return tuple((1 - t) * p + t * q for p, q in zip(a, b, strict=True))


def _frames(folder: Path, level: int, deepest: int, window: Window, next_window: Window | None) -> list[np.ndarray]:
    """RGBA pixels of one level: its score heatmap; with a next level also the map with that level's window
    as a dashed rectangle and the in-between frames zooming into it."""
    view = grid_view(folder)
    x0, x1, y0, y1 = window
    view.title = (f"zoom level {level}/{deepest}: {view.x_name} {x0:.4g}–{x1:.4g}, "
                  f"{view.y_name} {y0:.4g}–{y1:.4g}")
    fig = score_figure(view)
    try:
        frames = [_pixels(fig)]
        if next_window is None:
            return frames
        ax = fig.axes[0]
        a0, a1, b0, b1 = next_window
        ax.add_patch(Rectangle((a0, b0), a1 - a0, b1 - b0, fill=False, edgecolor="black",
                               linewidth=1.8, linestyle="--", zorder=5, label=f"zoom level {level + 1} window"))
        legend_outside(ax)  # under the map: a fixed place that covers no cell while zooming
        frames.append(_pixels(fig))
        xlim, ylim = ax.get_xlim(), ax.get_ylim()
        x_log, y_log = ax.get_xscale() == "log", ax.get_yscale() == "log"
        title = ax.get_title()
        for k in range(1, STEPS + 1):
            t = k / (STEPS + 1)
            ax.set_xlim(*_between(xlim, (a0, a1), t, x_log))
            ax.set_ylim(*_between(ylim, (b0, b1), t, y_log))
            ax.set_title(title.replace(f"zoom level {level}/{deepest}:",
                                       f"zooming from level {level} into level {level + 1}/{deepest}:", 1),
                         fontsize=9)
            frames.append(_pixels(fig))
        return frames
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
    """GIF of the zoom from ``parent_dir`` to its deepest child (``frame_count(levels)`` frames: each level,
    its next window, and in-between frames zooming into it); returns its path.

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
    frames = [frame for k, (level, folder, window) in enumerate(levels)
              for frame in _frames(folder, level, deepest, window, levels[k + 1][2] if k + 1 < len(levels) else None)]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"-o {out}: can't create its folder ({e.strerror or e}); choose a writable path") from None
    _write(frames, out, PillowWriter(fps=fps))
    if shutil.which("ffmpeg"):
        _write(frames, out.with_suffix(".mp4"), FFMpegWriter(fps=fps))
    return out
