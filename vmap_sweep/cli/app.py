"""The `vmap-sweep` command line: parses, validates, calls the library; what it prints is drawn by
render.py. Every user error is one line and exit code 2."""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Annotated

import typer

from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.cli import command_started, render
from vmap_sweep.cli.render import console  # stderr: errors and the progress of a running study
from vmap_sweep.cli.render import say as _say
from vmap_sweep.errors import ConfigError, VmapSweepError
from vmap_sweep.eval import DEFAULT_LIMITS, DEFAULT_TASKS
from vmap_sweep.present import tables

app = typer.Typer(
    help="Train many fine-tunes of one LLM at once and map where fine-tuning converges and where it diverges.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            _say(f"vmap-sweep {version('vmap-sweep')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            _say("vmap-sweep (not installed: `pip install -e .` in its folder records a version)")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
):
    # Options of vmap-sweep itself, before any command. No docstring: the help text is the Typer's above.
    pass


def user_errors(fn):
    """Turn the errors a user can cause into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        command_started()  # from here a Ctrl-C is the command's to handle
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


def _interrupted(resume: str):
    """A Ctrl-C'ed training command's one line: what it keeps and the command that resumes it; exit 130."""
    console.print(f"interrupted: every finished batch is stored; `{resume}` resumes it", highlight=False,
                  markup=False, soft_wrap=True)
    raise typer.Exit(130) from None


def _error(message: str):
    render.error(message)
    raise typer.Exit(2) from None


def _fixed(settings: list[str] | None) -> dict:
    """--set KEY=VALUE pairs -> fixed hyperparameters, validated against the axis registry."""
    from vmap_sweep.study.axes import AXES
    from vmap_sweep.study.config import fixed_value

    fixed = {}
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or key not in AXES:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE with KEY one of {', '.join(AXES)}")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--set {item!r}: {value!r} is not a number") from None
        fixed[key] = fixed_value(key, number)
    return fixed


# ------------------------------------------------------------------------------------------------ run
Preset = Annotated[str | None, typer.Option(help="Starting configuration: d20-docvqa (the flagship study, the default "
                                                 "for a new study) or tiny. Resuming, the study's own.")]


WandbProject = Annotated[str | None, typer.Option(help="Weights & Biases project (implies --wandb; default "
                                                      "$WANDB_PROJECT, else vmap-sweep; the entity is $WANDB_ENTITY).")]
WandbResults = Annotated[bool, typer.Option("--wandb", help="Log the results to Weights & Biases (WANDB_MODE=offline "
                                                              "works).")]


def _wandb_run(enabled: bool, project: str | None, source: Path, job_type: str, config: dict | None = None):
    """A Weights & Biases run around a command given --wandb or --wandb-project (config: the study's, unless
    given), else nothing (None). wandb is imported only here: it stays optional."""
    if not (enabled or project):
        return contextlib.nullcontext()
    from vmap_sweep.cli.wandb_log import wandb_run

    if config is None and Path(source).is_dir():
        from vmap_sweep.store.db import StudyStore

        with StudyStore.open(source) as store:
            config = {**store.config, "study": str(source)}
    return wandb_run(Path(source).name, config or {"source": str(source)}, project, job_type)


@app.command()
@user_errors
def run(
    preset: Preset = None,
    out: Annotated[Path | None, typer.Option(help="Study folder (created, or resumed if it exists).")] = None,
    model: Annotated[str | None, typer.Option(help="'tiny', a checkpoint folder or a Hub repo id.")] = None,
    data: Annotated[str | None, typer.Option(help="'synthetic', a .jsonl/.parquet file or a Hub dataset.")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer file (tokenizer.json or tokenizer.pkl) for a "
                                                       "model folder saved without one.")] = None,
    model_revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit of --model (default: main, "
                                                            "pinned to its commit when the study starts).")] = None,
    data_revision: Annotated[str | None, typer.Option(help="Hub branch, tag or commit of --data (default: main, "
                                                           "pinned likewise).")] = None,
    model_format: Annotated[str | None, typer.Option(help="native or transformers: the layout to load where --model "
                                                          "holds both (default native).")] = None,
    x: Annotated[str | None, typer.Option(help="AXIS:MIN:MAX[:log|lin] (see `vmap-sweep axes`).")] = None,
    y: Annotated[str | None, typer.Option(help="AXIS:MIN:MAX[:log|lin].")] = None,
    resolution: Annotated[str | None, typer.Option(help="N or NxM cells.")] = None,
    models_per_batch: Annotated[str | None, typer.Option(
        help="Models trained at once, or 'auto' to probe memory (default 8; resuming, the study's).")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adamw, or nanochat (Muon + AdamW).")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant, linear (to zero), cosine, or warmup-cosine (the plan "
                                                       "author's: at least one warmup step).")] = None,
    rows_per_step: Annotated[int | None, typer.Option(
        "--rows-per-step", "--batch-size", help="Rows of --seq-len per optimizer step (sweep tokens per step with "
                                                "--x/--y batch_size:MIN:MAX).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per row.")] = None,
    packing: Annotated[bool | None, typer.Option(
        "--packing/--no-packing", help="Concatenate conversations across rows; the default (--no-packing) is one "
                                       "conversation per row, truncated to --seq-len and padded, as nanochat's SFT. "
                                       "Resuming, the study's.")] = None,
    budget_unit: Annotated[str | None, typer.Option(
        help="What the tokens axis counts: tokens (every position), supervised (answer tokens, as the plan "
             "author's fine-tuning) or conversations.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per forward/backward.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the data order.")] = None,
    eval_tokens: Annotated[int | None, typer.Option(
        help="Held-out tokens for each cell's eval loss; 0 takes none (no criterion reads it).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Fix a hyperparameter: KEY=VALUE.")] = None,
    trainable: Annotated[str | None, typer.Option(help="Groups to train, e.g. attn,mlp,unembedding.")] = None,
    optimizer_state: Annotated[str | None, typer.Option(help="float32, or bfloat16 (half the memory).")] = None,
    checkpoint_activations: Annotated[bool, typer.Option(help="Recompute activations: less memory.")] = False,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default auto; resuming, the study's).")] = None,
    shard: Annotated[str | None, typer.Option(help="K/N: run only the K-th of N parts of the plan.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan and an estimate of its time; train nothing.")] = False,
    share: Annotated[bool | None, typer.Option(help="Read a learning rate's dataset sizes out of one shared trajectory "
                                                    "(same results); --no-share trains every cell alone.")] = None,
    quiet: Annotated[bool, typer.Option(help="Log lines instead of a progress bar.")] = False,
    deterministic: Annotated[bool, typer.Option(help="Bitwise-reproducible kernels (slower on GPU).")] = False,
    wandb: Annotated[bool, typer.Option(help="Log to Weights & Biases: the config, every batch, at the end the maps, "
                                             "dimension, rules and cells (WANDB_MODE=offline works).")] = False,
    wandb_project: WandbProject = None,
    backend: Annotated[str, typer.Option(help="local (this process) or ray (one worker per GPU).")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster to join ('auto': `ray start`'s).")] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers (default: one per GPU, or per CPU without).")] = None,
):
    """Run (or resume) a study: every cell of the grid fine-tuned, stored batch by batch. A study resumes from its
    folder alone (`run --out DIR`): options left out are the study's own; options given must match them."""
    from vmap_sweep.run.resume import RunOptions, StoredRun, refuse_a_level, resolve_run, shard_folder
    from vmap_sweep.study.plan import parse_shard

    given_out = out or Path("studies") / (preset or "d20-docvqa")
    stored = StoredRun.read(given_out, pending=dry_run)
    out, shard_spec = shard_folder(given_out, parse_shard(shard) if shard else None, stored)
    if out != given_out:  # a shard's folder inside the --out given
        stored = StoredRun.read(out, pending=dry_run)
    refuse_a_level(out, stored)
    given = dict(model=model, data=data, x=x, y=y, resolution=resolution, optimizer=optimizer, schedule=schedule,
                 rows_per_step=rows_per_step, seq_len=seq_len, seed=seed, eval_tokens=eval_tokens,
                 trainable=tuple(trainable.split(",")) if trainable else None, optimizer_state=optimizer_state,
                 checkpoint_activations=checkpoint_activations or None, tokenizer=tokenizer,
                 model_revision=model_revision, data_revision=data_revision, model_format=model_format,
                 packing=packing, budget_unit=budget_unit)
    resolved = resolve_run(RunOptions(preset, given, _fixed(set_), models_per_batch, share, device, micro_batch_size,
                                      deterministic), stored, out)
    cfg, k = resolved.config, resolved.models_per_batch
    if (address or workers) and backend != "ray":
        raise ConfigError("--address/--workers work with --backend ray; add --backend ray")
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend {backend!r}: choose local or ray")
    if backend == "ray":
        from vmap_sweep.run.ray_backend import import_ray

        import_ray()  # the install hint before any work
    settings = resolved.run_settings()
    if dry_run:
        from vmap_sweep.run.estimate import dry_run as plan

        k = 8 if k == "auto" else k
        summary = plan(cfg, k, resolved.device, resolved.share, shard_spec, stored and stored.pending)
        if not summary["to_train"]:
            _say(f"{out}: every one of the plan's {summary['cells']:,} cells is stored; nothing to train")
            return
        render.show([render.plan_table(cfg, k, summary)])
        return
    from vmap_sweep.run.provenance import pin_sources

    cfg = pin_sources(cfg, stored and stored.config)  # a Hub model or dataset as the commit it is now, for resumes
    _run(cfg, out, k, settings, shard_spec, quiet, wandb, backend, address, workers, resolved.share, wandb_project)


def _run_settings(cfg, device: str, micro_batch_size: int | None = None, deterministic: bool = False):
    from vmap_sweep.run.policy import resolve_device, run_settings

    return run_settings(resolve_device(device), cfg.cell_rows_per_step(), micro_batch_size, deterministic)


def _open_backend(cfg, settings, backend: str = "local", address: str | None = None, workers: int | None = None):
    """This process, or Ray workers (an optional extra); the caller closes it."""
    if backend == "ray":
        from vmap_sweep.run.ray_backend import RayBackend

        return RayBackend(cfg, settings, address=address, num_workers=workers,
                          gpus_per_worker=0 if settings.device == "cpu" else None)
    from vmap_sweep.run.worker import LocalBackend

    return LocalBackend(cfg, settings)


def _run(cfg, out, k, settings, shard_spec=None, quiet=False, wandb=False, backend="local", address=None,
         workers=None, share=True, wandb_project=None):
    from vmap_sweep.run.pipeline import run_study
    from vmap_sweep.store.db import DB_NAME, StudyStore
    from vmap_sweep.study.criterion import label as label_record

    # on a terminal a live bar; with --quiet or output to a file (nohup, Slurm) one log line per batch
    progress = shown = render.RichProgress(console, quiet=quiet, where=out)
    run_config = {**cfg.to_dict(), "run": {"out": str(out), "models_per_batch": k, "backend": backend,
                                           "share": share, "shard": shard_spec, **settings.to_dict()}}
    with _wandb_run(wandb, wandb_project, out, "run", run_config) as wb:
        if wb is not None:
            from vmap_sweep.cli.wandb_log import WandbProgress, log_study

            progress = WandbProgress(progress, wb)
        try:
            with _open_backend(cfg, settings, backend, address, workers) as b:
                store = run_study(cfg, out, b, models_per_batch=k, shard=shard_spec, progress=progress,
                                  labeller=label_record, share=share)
        except KeyboardInterrupt:  # Ctrl-C: every stored batch stays; one line on how to resume, no traceback
            done = total = None
            if (Path(out) / DB_NAME).is_file():
                with StudyStore.open(out) as stopped:
                    done, total = stopped.done_count(), shown.total or stopped.cell_count()
            console.print(render.interrupted_line(Path(out), done, total, shard_spec, settings), highlight=False,
                          markup=False, soft_wrap=True)
            raise typer.Exit(130) from None
        with store:
            render.show([render.summary_table(store, progress)])
            if wb is not None:
                log_study(wb, store)
            _say(f"study stored in {out}")


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
    if min(parse_resolution(resolution)) < 4:  # found out before training, not after it
        raise ConfigError(f"--resolution {resolution!r}: the demo measures the boundary's dimension, which needs "
                          "at least 4x4 cells; use e.g. 32")
    _run(cfg, out, 32, _run_settings(cfg, "cpu"), quiet=quiet)
    _plot(out, ["png"], None)
    _print_fractal(out, json_out=False, plot_file=out / "plots" / "box_counting.png", save_json=out / "fractal.json")


# ------------------------------------------------------------------------------------------------ status
@app.command()
@user_errors
def status(study: Annotated[Path, typer.Argument(help="Study folder.")]):
    """Progress and results so far of a running or stopped study."""
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        render.show([render.status_table(store)])


# ------------------------------------------------------------------------------------------------ classify
@app.command()
@user_errors
def classify(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    criterion: Annotated[str, typer.Option(
        help="ratio (Sohl-Dickstein), threshold, or last20 (the plan author's: finite, and the mean of the last 20 "
             "losses below the first).")] = "ratio",
    converged_below: Annotated[float | None, typer.Option(help="threshold: converged if final loss < this.")] = None,
    not_converged_above: Annotated[float | None, typer.Option(
        "--not-converged-above", "--diverged-above",
        help="threshold: not converged if final loss > this (default 10).")] = None,
):
    """Recompute every cell's class and score from its stored trajectory (no re-training); zoom studies below
    it follow, and cells trained later (resume, zoom) are labelled by the same criterion."""
    from vmap_sweep.analysis.study import reclassify_with_zooms
    from vmap_sweep.study.criterion import check, check_name

    flags = {"criterion": "--criterion ", "converged_below": "--converged-below ",
             "not_converged_above": "--not-converged-above " if not_converged_above is not None
             else "the default --not-converged-above "}
    check_name(criterion, flags)  # first: the options of an unknown criterion can't be judged
    if criterion == "threshold" and converged_below is None:
        raise ConfigError("--criterion threshold needs --converged-below LOSS (e.g. the initial loss)")
    for flag, value in (("--converged-below", converged_below),
                        ("--not-converged-above (or --diverged-above)", not_converged_above)):
        if criterion != "threshold" and value is not None:
            raise ConfigError(f"{flag} works with --criterion threshold; add it, or drop the option")
    check(criterion, spelling=flags, converged_below=converged_below, not_converged_above=not_converged_above)
    counts, zooms = reclassify_with_zooms(study, criterion, converged_below=converged_below,
                                          not_converged_above=not_converged_above)
    _say(render.classify_line(criterion, counts, zooms))


# ------------------------------------------------------------------------------------------------ plot
@app.command()
@user_errors
def plot(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    format: Annotated[str, typer.Option(help="Comma-separated: png, svg, pdf.")] = "png",
    rows: Annotated[str | None, typer.Option(help="Rows (y indices) whose trajectories to draw, e.g. 0,15,31.")] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the pictures (default STUDY/plots).")] = None,
    wandb: WandbResults = False,
    wandb_project: WandbProject = None,
):
    """Score heatmap with the boundary, final- and eval-loss heatmaps, loss trajectories (with --wandb also the
    table of cells and the trajectories as line plots)."""
    formats = [f.strip() for f in format.split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        raise ConfigError(f"--format {format!r}: choose from png, svg, pdf")
    try:
        row_list = [int(r) for r in rows.split(",")] if rows else None
    except ValueError:
        raise ConfigError(f"--rows {rows!r}: give comma-separated row indices, e.g. 0,15,31") from None
    with _wandb_run(wandb, wandb_project, study, "plot") as wb:
        for path in _plot(study, formats, row_list, out, wb):
            _say(str(path))


def _plot(study: Path, formats, rows, out: Path | None = None, wb=None):
    from vmap_sweep.analysis.refined import refine_record, refined_map
    from vmap_sweep.analysis.view import grid_view
    from vmap_sweep.present.plots import plot_refined, save_plots
    from vmap_sweep.store.db import StudyStore

    with StudyStore.open(study) as store:
        view = grid_view(store)
        ny = len(view.ys)
        if rows is None:
            rows = sorted({0, ny // 2, ny - 1})
        bad = [r for r in rows if not 0 <= r < ny]
        if bad:
            raise ConfigError(f"--rows {bad}: rows run from 0 to {ny - 1}")
        # a refined study: its finest level too, inferred cells drawn apart (read first: a missing level draws nothing)
        refined = refined_map(study) if refine_record(store) is not None else None
        written = save_plots(view, out or study / "plots", formats, store.trajectories(), rows)
        if refined is not None:
            written += [plot_refined(refined, (out or study / "plots") / f"refined.{fmt}") for fmt in formats]
        if wb is not None:
            from vmap_sweep.cli.wandb_log import log_maps

            log_maps(wb, store, rows)
        return written


# ------------------------------------------------------------------------------------------------ export
@app.command()
@user_errors
def export(
    study: Annotated[Path, typer.Argument(help="Study folder.")],
    format: Annotated[str | None, typer.Option(help="csv, parquet, npz or json (default: the output's suffix; csv "
                                                    "without -o). Must agree with the output's suffix.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write, ending in .csv, .parquet, "
                                                ".npz or .json (default STUDY/cells.FORMAT, inside the study folder). "
                                                "Replaces only an earlier export of the same format.")] = None,
    trajectories: Annotated[bool, typer.Option(help="Add each cell's per-step losses, base-model losses, "
                                                          "gradient norms and learning rates.")] = False,
    level: Annotated[int | None, typer.Option(help="A refined study's level: its cells, trained (status done) and "
                                                   "inferred (status inferred, with the inferred label).")] = None,
):
    """One row per cell: i, j, one column per hyperparameter (named after it: lr, tokens, ...), status, label,
    stability, score, losses, steps. The format is the output's suffix; without -o the file is STUDY/cells.csv (or
    cells.parquet, cells.npz, cells.json with --format)."""
    from vmap_sweep.analysis.export import export_study
    from vmap_sweep.analysis.view import StudyView

    if level:
        from vmap_sweep.analysis.refined import refined_map

        study = refined_map(study, level).folder  # checked: a finished level of this study
    path = export_study(StudyView.load(study), format, output, trajectories=trajectories)
    _say(str(path))


# ------------------------------------------------------------------------------------------------ merge
@app.command()
@user_errors
def merge(
    shards: Annotated[list[Path], typer.Argument(help="Shard study folders (from --shard K/N).")],
    out: Annotated[Path, typer.Option(help="Folder of the merged study.")],
    partial: Annotated[bool, typer.Option(help="Merge an incomplete set of shards (not every K of N), or one "
                                               "that repeats a shard.")] = False,
):
    """Combine shards of one study (same config) into one study. Every shard K/N of the split must be given (or be
    in --out from an earlier merge), each once; --partial merges fewer."""
    from vmap_sweep.store.merge import merge_studies

    with merge_studies(shards, out, partial=partial) as store:
        _say(render.merge_line(len(shards), store, out))


# ------------------------------------------------------------------------------------------------ fractal
@app.command()
@user_errors
def fractal(
    source: Annotated[Path, typer.Argument(help="A study folder, or a 2-D .npy (bool: True = converged; "
                                                "float: negative = converged).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Draw log N against log s with the fit, "
                                                                  "beside the local slope against s.")] = None,
    map_: Annotated[str, typer.Option(
        "--map", help="Which boundary of a study: trainability (converged vs not) or stability (stopped as "
                      "unstable vs not: at a low LR an untrained cell is stable).")] = "trainability",
    level: Annotated[int | None, typer.Option(help="A refined study's level to measure (default: its finest; 0: "
                                                   "its own grid).")] = None,
    wandb: WandbResults = False,
    wandb_project: WandbProject = None,
):
    """Box-counting dimension of the convergence boundary, with its CI, fit range and box counts. A refined study
    (`refine`) is measured on its finest level, with the octaves that refinement gained."""
    report = _print_fractal(source, json_out, plot_file, kind=map_, level=level)
    with _wandb_run(wandb, wandb_project, source, "fractal") as wb:
        if wb is not None:
            from vmap_sweep.cli.wandb_log import log_dimension

            log_dimension(wb, report, plot_file)


def _print_fractal(source: Path, json_out: bool, plot_file: Path | None, save_json: Path | None = None,
                   kind: str = "trainability", level: int | None = None) -> dict:
    from vmap_sweep.analysis.study import fractal_report
    from vmap_sweep.present.plots import picture_file

    if plot_file is not None:
        picture_file(plot_file)  # its suffix, and that it is no study's own file, before any work
    result = fractal_report(source, kind, level=level)
    if plot_file is not None:
        from vmap_sweep.present.plots import plot_box_counts

        plot_box_counts(result.box, plot_file)
    report = result.to_dict()
    if save_json is not None:
        from vmap_sweep.store.db import check_output

        check_output(save_json).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False))
    render.emit(report, json_out, tables.fractal_lines, plot_file)
    return report


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
    from vmap_sweep.run.resume import check_models_per_batch
    from vmap_sweep.run.zoom import zoom_study
    from vmap_sweep.store.study import Study
    from vmap_sweep.study.criterion import label as label_record

    if auto and window is not None:
        raise ConfigError("zoom: --auto picks the window itself; give --auto or --window X0 X1 Y0 Y1, not both")
    if not auto and window is None:
        raise ConfigError("zoom: give --auto or --window X0 X1 Y0 Y1")
    k = check_models_per_batch(models_per_batch)
    with Study.open(study) as parent:
        cfg = parent.config  # the model and data every level trains
    settings = _run_settings(cfg, device, micro_batch_size, deterministic)
    try:
        with _open_backend(cfg, settings) as backend:
            children = zoom_study(study, backend, window, depth, fraction, models_per_batch=k,
                                  progress=render.RichProgress(console, quiet=quiet), labeller=label_record)
    except KeyboardInterrupt:  # Ctrl-C: every stored batch stays, as for run
        where = "--auto" if auto else "--window " + " ".join(f"{v:g}" for v in window)
        size = f" --fraction {fraction:g}" if fraction != 1 / 8 else ""
        _interrupted(f"vmap-sweep zoom {study} {where} --depth {depth}{size}{render.settings_options(settings)}")
    for child in children:
        _say(str(child))


@app.command()
@user_errors
def refine(
    study: Annotated[Path, typer.Argument(help="A finished, classified study folder.")],
    levels: Annotated[int, typer.Option(help="Levels of refinement, each halving both spacings "
                                             "(128 -> 255 -> 509 -> 1017 points per axis).")] = 3,
    margin: Annotated[int, typer.Option(help="Coarse cells around a new cell's square that must all share one class "
                                             "for it to be inferred instead of trained.")] = 1,
    trace: Annotated[bool, typer.Option(help="After each level's targets, train in rounds the inferred cells next to "
                                             "a 2x2 block of both classes, until none is left (with --margin 0: "
                                             "about half the cells of --margin 1).")] = False,
    eval_: Annotated[bool, typer.Option("--eval", help="Take each trained cell's eval loss too: an eval pass per "
                                                       "cell, which no criterion reads (default: classes only).")]
    = False,
    models_per_batch: Annotated[str | None, typer.Option(
        help="Models trained at once, or 'auto' (default: the study's).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda (default: the study's).")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Rows per forward/backward.")] = None,
    deterministic: Annotated[bool, typer.Option(help="Bitwise-reproducible kernels.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Print each level's cells, trunks and model-steps; train nothing.")]
    = False,
    quiet: Annotated[bool, typer.Option(help="Log lines instead of a progress bar.")] = False,
):
    """Refine the boundary: nested grids, each level halving both spacings, training only the new cells whose
    coarse neighbourhood holds both classes; the rest are inferred and marked so (resumable, one writer)."""
    from vmap_sweep.run import refine as refining
    from vmap_sweep.run.resume import RunOptions, StoredRun, resolve_run
    from vmap_sweep.study.criterion import label as label_record

    refining.check_levels(levels)
    stored = StoredRun.read(study)
    if stored is None:  # the error that names what is missing
        from vmap_sweep.store.study import Study

        Study.open(study).close()
    resolved = resolve_run(RunOptions(models_per_batch=models_per_batch, device=device,
                                      micro_batch_size=micro_batch_size, deterministic=deterministic), stored, study)
    k, share = resolved.models_per_batch, resolved.share
    settings = resolved.run_settings()  # checked for a dry run too: what the run would refuse, it refuses
    if dry_run:
        plan, dim = refining.dry_run(study, levels, margin=margin, models_per_batch=8 if k == "auto" else k,
                                     share=share, trace=trace, evaluate=eval_, settings=settings)
        for line in render.refine_lines(study, plan, dry_run=True, dimension=dim):
            _say(line)
        if trace:
            _say("with --trace each level then trains rounds along the boundary it found: their cells are known only "
                 "as the level trains, and are not in the counts above")
        return
    progress = render.RichProgress(console, quiet=quiet)
    earlier = refining.finished_levels(study)
    try:
        with _open_backend(resolved.config, settings) as backend:
            done = refining.refine_study(study, backend, levels, margin=margin, models_per_batch=k,
                                         progress=progress, labeller=label_record, share=share, note=progress.note,
                                         trace=trace, evaluate=eval_)
    except KeyboardInterrupt:  # Ctrl-C: every stored batch stays, as for run
        rule = (f" --margin {margin}" if margin != 1 else "") + (" --trace" if trace else "") + \
            (" --eval" if eval_ else "")
        _interrupted(f"vmap-sweep refine {study} --levels {levels}{rule}{render.settings_options(settings)}")
    for line in render.refine_lines(study, [e for e in done if int(e["level"]) <= levels], earlier=earlier):
        _say(line)


@app.command("zoom-dimension")
@user_errors
def zoom_dimension(
    study: Annotated[Path, typer.Argument(help="The top study of a zoom sequence.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
):
    """Box-counting dimension per zoom level, and pooled over all levels (more decades of scale)."""
    from vmap_sweep.analysis.chain import dimension_report

    render.emit(dimension_report(study), json_out, tables.zoom_dimension_lines)


@app.command()
@user_errors
def animate(
    study: Annotated[Path, typer.Argument(help="The top study of a zoom sequence.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="GIF file (default STUDY/zoom.gif).")] = None,
    fps: Annotated[float, typer.Option(help="Frames per second.")] = 2.0,
):
    """The zoom sequence, parent to deepest child, as a GIF (and MP4 where ffmpeg exists)."""
    from vmap_sweep.present.animate import animate as animate_zoom

    _say(str(animate_zoom(study, output or study / "zoom.gif", fps)))


# ------------------------------------------------------------------------------------------------ rules, report
@app.command()
@user_errors
def rules(
    study: Annotated[list[Path], typer.Argument(help="Study folder (an LR axis x tokens, finished and classified); "
                                                     "several: one joint fit over dataset and model size.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Draw LR vs dataset size (.png/.svg/.pdf).")] = None,
    size_unit: Annotated[str | None, typer.Option(
        "--size-unit", help="What a dataset size D counts: tokens (the positions), supervised (the assistant tokens "
                            "it holds, what the model learns from) or conversations; default: what the study's "
                            "budgets count (run --budget-unit).")] = None,
    params: Annotated[str | None, typer.Option(help="Several studies: their models' parameter counts, comma-"
                                                    "separated in the folders' order (default: counted).")] = None,
    wandb: WandbResults = False,
    wandb_project: WandbProject = None,
):
    """Rules of thumb: critical, safe and optimal LR per dataset size and their power laws, and the smallest
    dataset each LR converges on. With several studies of different models: LR_crit = a D^b P^c."""
    from vmap_sweep.analysis.rules import rules_of_thumb
    from vmap_sweep.analysis.view import StudyView
    from vmap_sweep.present.plots import plot_joint_rules, plot_rules

    if len(study) == 1 and params is not None:
        raise ConfigError(f"--params {params}: the parameter count enters only the joint fit over several studies "
                          "(LR_crit = a D^b P^c); one study's rules don't use it: drop --params, or give several "
                          "studies")
    if len(study) == 1:
        result = _shown(lambda: rules_of_thumb(StudyView.load(study[0]), size_unit), plot_rules, tables.rules_lines,
                        json_out, plot_file)
        with _wandb_run(wandb, wandb_project, study[0], "rules") as wb:
            if wb is not None:
                from vmap_sweep.cli.wandb_log import log_rules

                log_rules(wb, result, plot_file)
        return
    from vmap_sweep.analysis.rules_joint import joint_rules

    if wandb or wandb_project:
        raise ConfigError("--wandb logs one study's rules; run `vmap-sweep rules STUDY --wandb` for each study")
    _shown(lambda: joint_rules([rules_of_thumb(StudyView.load(s), size_unit) for s in study],
                               _parameter_counts(study, params)),
           plot_joint_rules, tables.joint_rules_lines, json_out, plot_file)


def _shown(compute, draw, lines, json_out: bool, plot_file: Path | None):
    """An analysis result computed, drawn where --plot asks (its suffix checked before any work) and printed."""
    if plot_file is not None:
        from vmap_sweep.present.plots import picture_file

        picture_file(plot_file)
    result = compute()
    if plot_file is not None:
        draw(result, plot_file)
    render.emit(result, json_out, lines, plot_file)
    return result


def _parameter_counts(studies: list[Path], given: str | None) -> list[float]:
    """--params as numbers, or each study's base model counted (built on the meta device: no weights in memory)."""
    if given is not None:
        try:
            counts = [float(v) for v in given.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--params {given!r}: give parameter counts, e.g. 1.2e6,4.5e7") from None
        if len(counts) != len(studies) or min(counts) <= 0:
            raise ConfigError(f"--params {given!r}: give {len(studies)} positive counts, one per study")
        return counts
    import torch

    from vmap_sweep.model.gpt import GPT
    from vmap_sweep.run.estimate import base_model_shape
    from vmap_sweep.store.study import Study

    counts = []
    for folder in studies:
        with Study.open(folder) as s:
            config, _ = base_model_shape(s.config.model)
        with torch.device("meta"):
            counts.append(float(GPT(config).num_params()))
    return counts


@app.command("early-warning")
@user_errors
def early_warning(
    study: Annotated[Path, typer.Argument(help="Study folder (finished and classified).")],
    steps: Annotated[str | None, typer.Option("--k", help="Steps seen, comma-separated (default 1,2,4,8,...).")] = None,
    precision: Annotated[float, typer.Option(help="Precision the threshold rule must reach.")] = 0.95,
    min_recall: Annotated[float, typer.Option(help="Share of failing cells the rule must catch.")] = 0.5,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Draw trajectories, AUCs (.png/.svg/.pdf).")] = None,
):
    """Early warning signs: how well the first k steps (loss ratio, its slope, gradient-norm growth and spikes,
    LR x gradient norm) predict that a cell will not converge: ROC AUC by k, and the earliest k at which a
    threshold rule reaches the precision."""
    from vmap_sweep.analysis.early_warning import early_warning as measure
    from vmap_sweep.analysis.view import StudyView
    from vmap_sweep.present.plots import plot_early_warning

    try:
        ks = None if steps is None else [int(k) for k in steps.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--k {steps!r}: give comma-separated step counts, e.g. 1,2,4,8") from None
    _shown(lambda: measure(StudyView.load(study), ks, precision=precision, min_recall=min_recall), plot_early_warning,
           tables.early_warning_lines, json_out, plot_file)


MixedCriteria = Annotated[bool, typer.Option(
    "--mixed-criteria", help="Compare studies classified by different criteria (refused otherwise: a cell may "
                             "change class by the criterion alone).")]


@app.command()
@user_errors
def compare(
    a: Annotated[Path, typer.Argument(help="Reference study folder (finished and classified).")],
    b: Annotated[Path, typer.Argument(help="Study folder over the same grid (finished and classified).")],
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot_file: Annotated[Path | None, typer.Option("--plot", help="Draw the difference map (.png/.svg/.pdf).")] = None,
    across_resolutions: Annotated[bool, typer.Option(
        "--across-resolutions", help="Set the dimensions of two grids of different resolutions side by side "
                                     "(a dimension moves with its grid; no cell is matched).")] = False,
    criterion_a: Annotated[str | None, typer.Option(help="Classify A by this criterion (ratio or last20), "
                                                         "recomputed from its trajectories; default: its stored "
                                                         "classes.")] = None,
    criterion_b: Annotated[str | None, typer.Option(
        help="The same for B (B may be A: one study, two criteria).")] = None,
    mixed_criteria: MixedCriteria = False,
):
    """Two studies over one grid: cells that changed class, converged shares, ΔD with its CI, LR_crit ratios. A
    refined study is compared at its finest level (inferred cells with their inferred class)."""
    from vmap_sweep.analysis.compare import compare_studies
    from vmap_sweep.analysis.refined import study_view
    from vmap_sweep.present.plots import plot_compare

    _shown(lambda: compare_studies(study_view(a), study_view(b), criterion_a, criterion_b,
                                   across_resolutions, mixed_criteria),
           plot_compare, tables.compare_lines, json_out, plot_file)


@app.command()
@user_errors
def report(
    study: Annotated[Path, typer.Argument(help="Study folder (finished and classified).")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Default STUDY/report.FORMAT.")] = None,
    format: Annotated[str, typer.Option(help="md (pictures in a folder beside it) or html (one file).")] = "md",
    compare: Annotated[Path | None, typer.Option(help="A study over the same grid to compare this one with.")] = None,
    mixed_criteria: MixedCriteria = False,
):
    """One report: config, maps, fractal dimension, zoom levels, rules of thumb, OOD correlation (and a comparison
    with --compare)."""
    from vmap_sweep.present.report import write_report

    _say(str(write_report(study, output or study / f"report.{format}", format, compare, mixed_criteria)))


# ------------------------------------------------------------------------------------------------ eval
@app.command("eval")
@user_errors
def eval_(
    study: Annotated[Path, typer.Argument(help="A finished, classified study folder.")],
    cells: Annotated[str, typer.Option(help="lattice: an evenly spaced NxM sub-lattice (N: NxN); boundary-quantiles: "
                                            "how many cells (N, or NxM for N·M). Only converged cells are used.")
                     ] = "10x10",
    pick: Annotated[str, typer.Option(help="lattice (even over the grid), or boundary-quantiles: converged cells "
                                           "at evenly spaced quantiles of their distance to the boundary, in grid "
                                           "steps to the nearest diverged cell (Euclidean; "
                                           "scipy.ndimage.distance_transform_edt of the converged mask), nearest "
                                           "and farthest included.")] = "lattice",
    tasks: Annotated[str, typer.Option(help="Comma-separated lm-eval tasks.")] = ",".join(DEFAULT_TASKS),
    limit: Annotated[str | None, typer.Option(help="Examples per task: N (or all) for every task, TASK=N for one, "
                                                   "e.g. hellaswag=200,piqa=100 or 100,piqa=50. Default: "
                                                   + ", ".join(f"{t} {n}" for t, n in DEFAULT_LIMITS.items())
                                                   + "; all of any other task.")] = None,
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

    def chosen(picked):
        _say(render.ood_choice_line(pick, picked))

    result = run_ood_eval(study, cells, [t.strip() for t in tasks.split(",") if t.strip()], limit, device,
                          include_path, models_per_batch, rtol=rtol, deterministic=deterministic, progress=progress,
                          pick=pick, chosen=chosen)
    _say("examples per task: " + ", ".join(f"{t} {n}" for t, n in result["samples"].items()))
    for task, s in result["spearman"].items():
        if s["rho"] is None:
            _say(f"{task}: Spearman undefined (n = {s['n']})")
        else:
            _say(f"{task}: Spearman rho {s['rho']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}], n = {s['n']}")


# ------------------------------------------------------------------------------------------------ model
@app.command("model")
@user_errors
def model_(
    study: Annotated[Path, typer.Argument(help="A study folder.")],
    cell: Annotated[str, typer.Option(help="I,J: the cell's column along x and row along y (see `export`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Folder for the model: transformers/ (Hugging Face "
                                                                "layout), vmap-sweep/ (own format), cell.json.")],
    sample: Annotated[str | None, typer.Option(help="A question to ask the fine-tuned model (chat template).")] = None,
    samples: Annotated[int, typer.Option(help="Sampled answers beside the greedy one.")] = 3,
    max_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 0.8,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    deterministic: Annotated[bool, typer.Option(help="Bitwise-reproducible kernels.")] = False,
    rtol: Annotated[float, typer.Option(help="Largest relative difference a re-trained trajectory may have.")] = 1e-6,
):
    """Re-train one cell exactly as the study did (refused unless it reproduces the stored trajectory) and write
    its fine-tuned model; --sample prints its greedy and sampled answers to a question."""
    from vmap_sweep.eval.cell_model import export_cell, parse_cell
    from vmap_sweep.model.generate import chat_answers

    if samples < 0 or max_tokens < 1 or not temperature > 0:
        raise ConfigError("--samples must be >= 0, --max-tokens >= 1 and --temperature > 0")
    i, j = parse_cell(cell)
    exported = export_cell(study, i, j, output, device, rtol, deterministic)
    render.show(render.cell_model_lines(exported))
    if sample is not None:
        r = exported.retrained
        render.show(render.answer_lines(chat_answers(r.model, r.tokenizer, sample, samples, max_tokens, temperature)))


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
    device: Annotated[str, typer.Option(help="auto (cuda where there is one), cuda or cpu (slowly).")] = "auto",
):
    """Stacked training against the best one-at-a-time loop, side by side, on random-init weights."""
    from vmap_sweep.run.bench import bench as run_bench
    from vmap_sweep.run.policy import resolve_device
    from vmap_sweep.study.config import OPTIMIZER_STATES, check_micro_batch_size

    for name, value in (("--depth", depth), ("--models-per-batch", models_per_batch),
                        ("--tokens-per-step", tokens_per_step), ("--seq-len", seq_len), ("--steps", steps)):
        if value < 1:
            raise ConfigError(f"{name} {value}: give a positive integer")
    dev = resolve_device(device)
    if tokens_per_step % seq_len:
        raise ConfigError(f"--tokens-per-step {tokens_per_step} must be a multiple of --seq-len {seq_len}")
    check_micro_batch_size(micro_batch_size, tokens_per_step // seq_len, "{rows} rows per step")
    if optimizer_state not in OPTIMIZER_STATES:
        raise ConfigError(f"--optimizer-state {optimizer_state!r}: choose {' or '.join(OPTIMIZER_STATES)}")
    r = run_bench(depth, models_per_batch, tokens_per_step, seq_len, micro_batch_size=micro_batch_size,
                  steps=steps, device=str(dev), optimizer_state_dtype=optimizer_state,
                  compile=dev.type == "cuda" if compile is None else compile,
                  checkpoint_activations=checkpoint_activations)
    render.show(render.bench_lines(r))


# ------------------------------------------------------------------------------------------------ axes
@app.command()
def axes():
    """The hyperparameters a study can sweep, and what each means."""
    from vmap_sweep.study.axes import axes_help

    render.show(render.axes_lines(axes_help()))
