"""The `vmap-sweep` command line: parses, calls, prints. Every user error is one line and exit code 2."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.errors import ConfigError, VmapSweepError
from vmap_sweep.eval import DEFAULT_TASKS

app = typer.Typer(
    help="Train many fine-tunes of one LLM at once and map where fine-tuning converges and where it diverges.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, emoji=False)  # ':x:' in a user's spec is not an emoji
out_console = Console()


def user_errors(fn):
    """Turn the errors a user can cause into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VmapSweepError as e:
            _error(str(e))
        except OSError as e:
            if e.filename is None:  # not about a path the user gave
                raise
            where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
            _error(f"{where}: {e.strerror or e}; choose another path")

    return wrapper


def _error(message: str):
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2) from None


def _say(text: str) -> None:
    """Text with paths in it: never wrapped (scripts read it) and never parsed as rich markup."""
    out_console.print(text, soft_wrap=True, markup=False, highlight=False)


def _fixed(settings: list[str] | None) -> dict:
    """--set KEY=VALUE pairs -> fixed hyperparameters, validated against the axis registry."""
    from vmap_sweep.study.axes import AXES

    fixed = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or key not in AXES:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE with KEY one of {', '.join(AXES)}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {value!r} is not a number") from None
        fixed[key] = int(number) if AXES[key].kind == "int" else number
    return fixed


# ------------------------------------------------------------------------------------------------ run
Preset = Annotated[str, typer.Option(help="Starting configuration: d20-docvqa (the flagship study) or tiny.")]


def _study_config(preset, model, data, x, y, resolution, optimizer, schedule, batch_size, seq_len, seed, settings,
                  trainable, eval_tokens, optimizer_state=None, checkpoint_activations=None):
    from vmap_sweep.study.config import preset as get_preset

    base = get_preset(preset)
    fixed = {**base.fixed, **_fixed(settings)}
    cfg = base.with_overrides(
        model=model, data=data, x=x, y=y, resolution=resolution, optimizer=optimizer, schedule=schedule,
        batch_size=batch_size, seq_len=seq_len, seed=seed, eval_tokens=eval_tokens,
        trainable=tuple(trainable.split(",")) if trainable else None, fixed=fixed, optimizer_state=optimizer_state,
        checkpoint_activations=checkpoint_activations or None,
    )
    cfg.validate()
    return cfg


def _models_per_batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--models-per-batch {text!r}: give a positive integer or 'auto'") from None
    if k < 1:
        raise ConfigError(f"--models-per-batch {k}: give a positive integer or 'auto'")
    return k


@app.command()
@user_errors
def run(
    preset: Preset = "d20-docvqa",
    out: Annotated[Path | None, typer.Option(help="Study folder (created, or resumed if it exists).")] = None,
    model: Annotated[str | None, typer.Option(help="'tiny', a checkpoint folder or a Hub repo id.")] = None,
    data: Annotated[str | None, typer.Option(help="'synthetic', a .jsonl/.parquet file or a Hub dataset.")] = None,
    x: Annotated[str | None, typer.Option(help="AXIS:MIN:MAX[:log|lin] (see `vmap-sweep axes`).")] = None,
    y: Annotated[str | None, typer.Option(help="AXIS:MIN:MAX[:log|lin].")] = None,
    resolution: Annotated[str | None, typer.Option(help="N or NxM cells.")] = None,
    models_per_batch: Annotated[str, typer.Option(help="Models trained at once, or 'auto' to probe memory.")] = "8",
    optimizer: Annotated[str | None, typer.Option(help="adamw, or nanochat (Muon + AdamW).")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant, linear (to zero) or cosine.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Rows per optimizer step.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per row.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per forward/backward.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data order.")] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="Held-out tokens for the eval loss.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fix a hyperparameter: KEY=VALUE.")] = None,
    trainable: Annotated[str | None, typer.Option(help="Groups to train, e.g. attn,mlp,unembedding.")] = None,
    optimizer_state: Annotated[str | None, typer.Option(help="float32, or bfloat16 (half the memory).")] = None,
    checkpoint_activations: Annotated[bool, typer.Option(help="Recompute activations: less memory.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    shard: Annotated[str | None, typer.Option(help="K/N: run only the K-th of N parts of the plan.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and an estimate of its time; train nothing.")] = False,
    quiet: Annotated[bool, typer.Option(help="Log lines instead of a progress bar.")] = False,
    deterministic: Annotated[bool, typer.Option(help="Bitwise-reproducible kernels (slower on GPU).")] = False,
    wandb: Annotated[bool, typer.Option(help="Log progress to Weights & Biases (WANDB_MODE=offline works).")] = False,
    backend: Annotated[str, typer.Option(help="local (this process) or ray (one worker per GPU).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster to join ('auto': `ray start`'s).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers (default: one per GPU, or per CPU without).")] = None,
):
    """Run (or resume) a study: every cell of the grid fine-tuned, stored batch by batch."""
    cfg = _study_config(preset, model, data, x, y, resolution, optimizer, schedule, batch_size, seq_len, seed,
                        set_, trainable, eval_tokens, optimizer_state, checkpoint_activations)
    k = _models_per_batch(models_per_batch)
    out = out or Path("studies") / preset
    shard_spec = None
    if shard:
        from vmap_sweep.study.plan import parse_shard

        shard_spec = parse_shard(shard)
        out = out / f"shard-{shard_spec[0]}-of-{shard_spec[1]}"
    backend_factory = _backend(backend, address, workers, device)
    from vmap_sweep.train.trainer import check_micro_batch_size

    check_micro_batch_size(micro_batch_size, cfg.batch_size)
    if dry_run:
        _dry_run(cfg, 8 if k == "auto" else k, device)
        return
    _run(cfg, out, k, device, micro_batch_size, shard_spec, deterministic, quiet, wandb, backend_factory)


def _backend(backend: str, address: str | None, workers: int | None, device: str):
    """None for this process; a RayBackend factory for --backend ray (Ray is an optional extra)."""
    if backend == "local":
        if address or workers:
            raise ConfigError("--address/--workers work with --backend ray; add --backend ray")
        return None
    if backend != "ray":
        raise ConfigError(f"--backend {backend!r}: choose local or ray")
    from functools import partial

    from vmap_sweep.run.ray_backend import RayBackend, import_ray

    import_ray()  # the install hint before any work
    return partial(RayBackend, address=address, num_workers=workers, gpus_per_worker=0 if device == "cpu" else None)


def _run(cfg, out, k, device, micro_batch_size, shard_spec, deterministic, quiet, wandb, backend_factory=None):
    from vmap_sweep.cli.render import RichProgress, WandbProgress, summary_table
    from vmap_sweep.run.pipeline import run_study

    progress = RichProgress(console, quiet=quiet)
    if wandb:
        progress = WandbProgress(progress, cfg, name=Path(out).name)
    store = run_study(cfg, out, k, device, micro_batch_size, shard_spec, deterministic, progress,
                      backend_factory=backend_factory)
    with store:
        out_console.print(summary_table(store, progress))
        _say(f"study stored in {out}")


def _dry_run(cfg, k, device):

    from vmap_sweep.run.pipeline import describe_plan, resolve_device

    dev = resolve_device(device)
    if cfg.model == "tiny":
        from vmap_sweep.train.tiny import TINY_CONFIG as model_config
    else:
        from vmap_sweep.model.checkpoint import load_model

        model_config = load_model(cfg.model).config
    s = describe_plan(cfg, k, model_config, dev)
    table = Table(title="plan", show_header=False)
    for key, value in [
        ("model / data", f"{cfg.model} / {cfg.data}"),
        ("grid", f"{cfg.x} × {cfg.y} at {cfg.resolution}"),
        ("cells", s["cells"]), ("batches", f"{s['batches']} of up to {k} models"),
        ("steps per cell", f"{s['steps_range'][0]} … {s['steps_range'][1]}"),
        ("model-steps", f"{s['model_steps']:,} ({s['padded_model_steps']:,} masked)"),
        ("FLOPs", f"{s['flops']:.3g}"),
        ("estimate", f"{_duration(s['seconds_estimate'])} on {s['device']} "
                     f"(matmul {s['matmul_tflops']:.2f} TFLOP/s measured, {s['efficiency']:.0%} of it assumed)"),
    ]:
        table.add_row(str(key), escape(str(value)))
    out_console.print(table)


def _duration(seconds: float) -> str:
    """Seconds, minutes or hours, so a small plan's estimate is not printed as 0.00 h."""
    if seconds < 90:
        return f"{seconds:.2g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


# ------------------------------------------------------------------------------------------------ demo
@app.command()
@user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Study folder.")] = Path("demo-study"),
    resolution: Annotated[str, typer.Option(help="N or NxM cells.")] = "32",
    quiet: Annotated[bool, typer.Option(help="Log lines instead of a progress bar.")] = False,
):
    """The tiny preset end to end, offline on a CPU: train, classify, plot, measure the boundary."""
    from vmap_sweep.study.axes import parse_resolution
    from vmap_sweep.study.config import preset as get_preset

    cfg = get_preset("tiny").with_overrides(resolution=resolution)
    cfg.validate()
    if min(parse_resolution(resolution)) < 4:  # found out before training, not after it
        raise ConfigError(f"--resolution {resolution!r}: the demo measures the boundary's dimension, which needs "
                          "at least 4x4 cells; use e.g. 32")
    _run(cfg, out, 32, "cpu", None, None, False, quiet, False)
    _plot(out, ["png"], None)
    _print_fractal(out, json_out=False, plot_file=out / "plots" / "box_counting.png", save_json=out / "fractal.json")


# ------------------------------------------------------------------------------------------------ status
@app.command()
@user_errors
def status(study: Annotated[Path, typer.Argument(help="Study folder.")]):
    """Progress and results so far of a running or stopped study."""
    from vmap_sweep.cli.render import status_table
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        out_console.print(status_table(store))


# ------------------------------------------------------------------------------------------------ classify
@app.command()
@user_errors
def classify(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    criterion: Annotated[str, typer.Option(help="ratio (Sohl-Dickstein) or threshold.")] = "ratio",
    converged_below: Annotated[float | None, typer.Option(help="threshold: converged if final loss < this.")] = None,
    diverged_above: Annotated[float, typer.Option(help="threshold: diverged if final loss > this.")] = 10.0,
):
    """Recompute every cell's class and score from its stored trajectory (no re-training); zoom studies below
    it follow, and cells trained later (resume, zoom) are labelled by the same criterion."""
    from vmap_sweep.analysis.study import reclassify_with_zooms

    if criterion == "threshold" and converged_below is None:
        raise ConfigError("--criterion threshold needs --converged-below LOSS (e.g. the initial loss)")
    if criterion != "threshold" and converged_below is not None:
        raise ConfigError("--converged-below works with --criterion threshold; add it, or drop the option")
    counts, zooms = reclassify_with_zooms(study, criterion, converged_below=converged_below,
                                          diverged_above=diverged_above)
    _say(f"{criterion}: " + ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
         + (f"; its {zooms} zoom studies too" if zooms else ""))


# ------------------------------------------------------------------------------------------------ plot
@app.command()
@user_errors
def plot(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    format: Annotated[str, typer.Option(help="Comma-separated: png, svg, pdf.")] = "png",
    rows: Annotated[str | None, typer.Option(help="Rows (y indices) whose trajectories to draw, e.g. 0,15,31.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the pictures (default STUDY/plots).")] = None,
):
    """Score heatmap with the boundary, final- and eval-loss heatmaps, loss trajectories."""
    formats = [f.strip() for f in format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise ConfigError(f"--format {format!r}: choose from png, svg, pdf")
    try:
        row_list = [int(r) for r in rows.split(",")] if rows else None
    except ValueError:
        raise ConfigError(f"--rows {rows!r}: give comma-separated row indices, e.g. 0,15,31") from None
    for path in _plot(study, formats, row_list, out):
        _say(str(path))


def _plot(study: Path, formats, rows, out: Path | None = None):
    from vmap_sweep.analysis.plots import save_plots
    from vmap_sweep.analysis.study import grid_view
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        view = grid_view(store)
        ny = len(view.ys)
        if rows is None:
            rows = sorted({0, ny // 2, ny - 1})
        bad = [r for r in rows if not 0 <= r < ny]
        if bad:
            raise ConfigError(f"--rows {bad}: rows run from 0 to {ny - 1}")
        return save_plots(view, out or study / "plots", formats, store.trajectories(), rows)


# ------------------------------------------------------------------------------------------------ export
@app.command()
@user_errors
def export(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    format: Annotated[str, typer.Option(help="csv, parquet or npz.")] = "csv",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write (default study.FORMAT).")] = None,
    trajectories: Annotated[bool, typer.Option(help="Add each cell's per-step losses.")] = False,
):
    """One row per cell: i, j, x, y, status, label, initial_loss, final_loss, eval_loss, steps."""
    from vmap_sweep.analysis.export import export_study
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        path = export_study(store, format, output or Path(f"study.{format.lower()}"), trajectories=trajectories)
    _say(str(path))


# ------------------------------------------------------------------------------------------------ merge
@app.command()
@user_errors
def merge(
    shards: Annotated[list[Path], typer.Argument(help="Shard study folders (from --shard K/N).")],
    out: Annotated[Path, typer.Option(help="Folder of the merged study.")],
):
    """Combine shards of one study (same config) into one study."""
    from vmap_sweep.store.db import merge_studies

    store = merge_studies(shards, out)
    with store:
        _say(f"merged {len(shards)} shards: {store.done_count()}/{store.cell_count()} cells in {out}")


# ------------------------------------------------------------------------------------------------ fractal
@app.command()
@user_errors
def fractal(
    source: Annotated[Path, typer.Argument(help="A study folder, or a 2-D .npy (bool: True = converged; "
                                                "float: negative = converged).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Draw log N against log s with the fit.")] = None,
):
    """Box-counting dimension of the convergence boundary, with its CI, fit range and box counts."""
    _print_fractal(source, json_out, plot_file)


def _print_fractal(source: Path, json_out: bool, plot_file: Path | None, save_json: Path | None = None):
    from vmap_sweep.analysis.study import fractal_report

    report = fractal_report(source, plot_file)
    if save_json is not None:
        save_json.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    if json_out:
        out_console.print_json(json.dumps(json_safe(report), allow_nan=False))
        return
    box = report
    out_console.print(
        f"box-counting dimension {box['dimension']:.3f} ± {box['stderr']:.3f} (stderr), "
        f"95% CI [{box['ci_low']:.3f}, {box['ci_high']:.3f}], fit over box sizes "
        f"{box['fit_range'][0]}–{box['fit_range'][1]} at {box['resolution'][0]}×{box['resolution'][1]}"
    )
    out_console.print("box sizes:  " + " ".join(f"{s:>7d}" for s in box["box_sizes"]))
    out_console.print("box counts: " + " ".join(f"{c:>7.1f}" for c in box["box_counts"]))
    if "uncertainty_dimension" in box:
        note = f" ({box['uncertainty_note']})" if "uncertainty_note" in box else ""
        out_console.print(f"uncertainty-exponent dimension {box['uncertainty_dimension']:.3f} "
                          f"± {box['uncertainty_stderr']:.3f}{note}")
    if plot_file is not None:
        _say(f"plot: {plot_file}")


# ------------------------------------------------------------------------------------------------ zoom
@app.command()
@user_errors
def zoom(
    study: Annotated[Path, typer.Argument(help="A finished, classified study folder.")],
    auto: Annotated[bool, typer.Option("--auto", help="Pick the window of highest boundary density.")] = False,
    window: Annotated[tuple[float, float, float, float] | None,
                      typer.Option(help="X0 X1 Y0 Y1 in real units (first level).")] = None,
    depth: Annotated[int, typer.Option(help="Levels to zoom down, each inside the last.")] = 1,
    fraction: Annotated[float, typer.Option(help="Window per axis, a fraction (log space on log axes).")] = 1 / 8,
    models_per_batch: Annotated[str, typer.Option(help="Models trained at once, or 'auto'.")] = "8",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per forward/backward.")] = None,
    deterministic: Annotated[bool, typer.Option(help="Bitwise-reproducible kernels.")] = False,
    quiet: Annotated[bool, typer.Option(help="Log lines instead of a progress bar.")] = False,
):
    """Run child studies over a window of the boundary, same resolution, DEPTH levels down (resumable)."""
    from vmap_sweep.cli.render import RichProgress
    from vmap_sweep.run.zoom import zoom_study

    if auto == (window is not None):
        raise ConfigError("zoom: give --auto or --window X0 X1 Y0 Y1")
    children = zoom_study(study, window, depth, fraction, _models_per_batch(models_per_batch), device,
                          RichProgress(console, quiet=quiet), micro_batch_size=micro_batch_size,
                          deterministic=deterministic)
    for child in children:
        _say(str(child))


@app.command("zoom-dimension")
@user_errors
def zoom_dimension(
    study: Annotated[Path, typer.Argument(help="The top study of a zoom sequence.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Box-counting dimension per zoom level, and pooled over all levels (more decades of scale)."""
    from vmap_sweep.run.zoom import dimension_report

    report = dimension_report(study)
    if json_out:
        out_console.print_json(json.dumps(json_safe(report), allow_nan=False))
        return
    def num(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for level in report["levels"]:
        if level.get("dimension") is None:
            _say(f"level {level['level']}: not measurable ({level.get('error')})")
        else:
            _say(f"level {level['level']}: D = {num(level['dimension'])} [{num(level['ci_low'])}, "
                 f"{num(level['ci_high'])}], cell scale {level['scale']:.3g}")
    pooled = report["pooled"]
    if pooled.get("dimension") is None:
        _say(f"pooled: not measurable ({pooled.get('error')})")
    else:
        _say(f"pooled over levels: D = {num(pooled['dimension'])} ± {num(pooled['stderr'])} "
             f"[{num(pooled['ci_low'])}, {num(pooled['ci_high'])}]")


@app.command()
@user_errors
def animate(
    study: Annotated[Path, typer.Argument(help="The top study of a zoom sequence.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="GIF file (default STUDY/zoom.gif).")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second.")] = 2.0,
):
    """The zoom sequence, parent to deepest child, as a GIF (and MP4 where ffmpeg exists)."""
    from vmap_sweep.analysis.animate import animate as render

    _say(str(render(study, output or study / "zoom.gif", fps)))


# ------------------------------------------------------------------------------------------------ rules, report
@app.command()
@user_errors
def rules(
    study: Annotated[Path, typer.Argument(help="Study folder (an LR axis x tokens, finished and classified).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Draw LR vs dataset size (.png/.svg/.pdf).")] = None,
):
    """Rules of thumb: critical, safe and optimal LR per dataset size and their power laws."""
    from vmap_sweep.analysis.rules import fit_table, plot_rules, rules_of_thumb, rules_table

    result = rules_of_thumb(study)
    if plot_file is not None:
        plot_rules(result, plot_file)
    if json_out:
        out_console.print_json(json.dumps(result.to_dict(), allow_nan=False))
        return
    out_console.print(rules_table(result))
    out_console.print(fit_table(result))
    for line in result.summary():
        _say(line)
    if plot_file is not None:
        _say(f"plot: {plot_file}")


@app.command()
@user_errors
def report(
    study: Annotated[Path, typer.Argument(help="Study folder (finished and classified).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default STUDY/report.FORMAT.")] = None,
    format: Annotated[str, typer.Option(help="md (pictures in a folder beside it) or html (one file).")] = "md",
):
    """One report: config, maps, fractal dimension, zoom levels, rules of thumb, OOD correlation."""
    from vmap_sweep.analysis.report import write_report

    _say(str(write_report(study, output or study / f"report.{format}", format)))


# ------------------------------------------------------------------------------------------------ eval
@app.command("eval")
@user_errors
def eval_(
    study: Annotated[Path, typer.Argument(help="A finished, classified study folder.")],
    cells: Annotated[str, typer.Option(help="An evenly spaced NxM subset; only converged cells are used.")] = "10x10",
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval tasks.")] = ",".join(DEFAULT_TASKS),
    limit: Annotated[int | None, typer.Option(help="Examples per task.")] = 100,
    include_path: Annotated[Path | None, typer.Option(help="Folder of custom lm-eval task YAMLs.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    models_per_batch: Annotated[int, typer.Option(help="Models re-trained at once.")] = 8,
    deterministic: Annotated[bool, typer.Option(help="Bitwise-reproducible kernels.")] = False,
    rtol: Annotated[float, typer.Option(help="Largest relative difference a re-trained trajectory may have.")] = 1e-6,
):
    """Re-train a subset of converged cells, score them with lm-evaluation-harness, correlate with the
    distance to the boundary (Spearman, bootstrap CI); results stored in the study."""
    from vmap_sweep.eval.ood import run_ood_eval

    def progress(retrained, accuracy):
        cell = retrained.cell
        _say(f"cell ({cell.i}, {cell.j}): " + ", ".join(f"{t} {a:.3f}" for t, a in accuracy.items()))

    result = run_ood_eval(study, cells, [t.strip() for t in tasks.split(",") if t.strip()], limit, device,
                          include_path, models_per_batch, rtol=rtol, deterministic=deterministic, progress=progress)
    for task, s in result["spearman"].items():
        if s["rho"] is None:
            _say(f"{task}: Spearman undefined (n = {s['n']})")
        else:
            _say(f"{task}: Spearman rho {s['rho']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}], n = {s['n']}")


# ------------------------------------------------------------------------------------------------ bench
@app.command()
@user_errors
def bench(
    depth: Annotated[int, typer.Option(help="Model depth (nanochat's from_depth; 20 = d20).")] = 20,
    models_per_batch: Annotated[int, typer.Option(help="Models stacked.")] = 4,
    tokens_per_step: Annotated[int, typer.Option(help="Tokens per optimizer step.")] = 8192,
    seq_len: Annotated[int, typer.Option(help="Tokens per row.")] = 1024,
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per forward/backward.")] = None,
    steps: Annotated[int, typer.Option(help="Steps per cell.")] = 5,
    compile: Annotated[bool | None, typer.Option(help="torch.compile the stacked step (default: on CUDA).")] = None,
    checkpoint_activations: Annotated[bool, typer.Option(help="Recompute activations: less memory.")] = False,
    optimizer_state: Annotated[str, typer.Option(help="float32, or bfloat16 (half the memory).")] = "float32",
    device: Annotated[str, typer.Option(help="cuda (cpu works, slowly).")] = "cuda",
):
    """Stacked training against the best one-at-a-time loop, side by side, on random-init weights."""
    import torch

    from vmap_sweep.run.bench import bench as run_bench

    for name, value in (("--depth", depth), ("--models-per-batch", models_per_batch),
                        ("--tokens-per-step", tokens_per_step), ("--seq-len", seq_len), ("--steps", steps)):
        if value < 1:
            raise ConfigError(f"{name} {value}: give a positive integer")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cuda", "cpu"):
        raise ConfigError(f"--device {device!r}: choose cuda (or cuda:N) or cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench: no CUDA device here; run it on a GPU machine or pass --device cpu")
    if tokens_per_step % seq_len:
        raise ConfigError(f"--tokens-per-step {tokens_per_step} must be a multiple of --seq-len {seq_len}")
    from vmap_sweep.train.trainer import check_micro_batch_size

    check_micro_batch_size(micro_batch_size, tokens_per_step // seq_len, "{rows} rows per step")
    if optimizer_state not in ("float32", "bfloat16"):
        raise ConfigError(f"--optimizer-state {optimizer_state!r}: choose float32 or bfloat16")
    r = run_bench(depth, models_per_batch, tokens_per_step, seq_len, micro_batch_size=micro_batch_size,
                  steps=steps, device=device, optimizer_state_dtype=optimizer_state,
                  compile=kind == "cuda" if compile is None else compile,
                  checkpoint_activations=checkpoint_activations)
    table = Table(title=f"depth {depth}, {models_per_batch} stacked, {tokens_per_step} tokens/step, "
                        f"cells of {steps} steps")
    for col in ("", "s/cell", "s/step", "TFLOP/s"):
        table.add_column(col)
    table.add_row("one at a time (best)", f"{r.baseline_cell_s:.3f}", f"{r.baseline_step_s:.4f}",
                  f"{r.baseline_tflops:.1f}")
    table.add_row(f"{models_per_batch} stacked", f"{r.stacked_cell_s:.3f}", f"{r.stacked_step_s:.4f}",
                  f"{r.stacked_tflops:.1f}")
    out_console.print(table)
    _say(f"cells per hour, stacked / one at a time: {r.speedup:.2f}x; peak memory {r.peak_memory_gb:.1f} GB")


# ------------------------------------------------------------------------------------------------ axes
@app.command()
def axes():
    """The hyperparameters a study can sweep, and what each means."""
    from vmap_sweep.study.axes import axes_help

    out_console.print(axes_help(), highlight=False)


def main() -> None:  # pragma: no cover - the console script calls app() directly
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(app())
