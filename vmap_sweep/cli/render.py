"""Everything the CLI shows: the two consoles, plain lines, JSON, tables, the progress of a running study
(a rich bar or log lines; Weights & Biases is wandb_log.py). Commands in app.py parse and call; this draws."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, RenderableType
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from vmap_sweep.analysis.fmt import count_of
from vmap_sweep.analysis.jsonsafe import json_safe
from vmap_sweep.present.provenance import provenance_rows
from vmap_sweep.run.eta import EtaModel, Work, batch_work
from vmap_sweep.run.pipeline import Progress as ProgressHooks
from vmap_sweep.study.criterion import DISPLAY, NOT_CONVERGED

if TYPE_CHECKING:
    from vmap_sweep.run.bench import BenchResult
    from vmap_sweep.store.db import StudyStore
    from vmap_sweep.study.plan import Batch

console = Console(stderr=True, emoji=False)  # ':x:' in a user's spec is not an emoji
out_console = Console()


# ------------------------------------------------------------------------------------------------ lines
def say(text: str) -> None:
    """Text with paths in it: never wrapped (scripts read it) and never parsed as rich markup."""
    out_console.print(text, soft_wrap=True, markup=False, highlight=False)


def error(message: str) -> None:
    """A user error as one line on stderr (the caller exits with code 2)."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def show(items: Iterable[RenderableType]) -> None:
    """Strings as plain lines (``say``); tables and other rich renderables as rich draws them."""
    for item in items:
        if isinstance(item, str):
            say(item)
        else:  # prose fills a terminal's width; in a file or a pipe a line stays one line (80 columns cut rows)
            out_console.print(item, soft_wrap=isinstance(item, Text) and not out_console.is_terminal)


def emit(result: Any, json_out: bool, lines: Callable[[Any], Iterable[RenderableType]],
         plot: Path | None = None) -> None:
    """The tail of a command with --json (and maybe --plot): one strict JSON object (a result with
    ``to_dict()`` as that dict), or ``lines(result)`` shown then where the plot was saved. The lines are
    only built without --json."""
    if json_out:
        data = result.to_dict() if hasattr(result, "to_dict") else result
        out_console.print_json(json.dumps(json_safe(data), allow_nan=False))
        return
    show(lines(result))
    if plot is not None:
        say(f"plot: {plot}")


def _prose(text: str) -> Text:
    """A sentence of numbers, not a path: wrapped to the terminal and highlighted, as rich prints a string."""
    return out_console.render_str(text)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def duration(seconds: float) -> str:
    """Seconds, minutes or hours, so a small plan's estimate is not printed as 0.00 h."""
    if seconds < 90:
        return f"{seconds:.2g} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def settings_options(settings) -> str:
    """The run settings that differ from the defaults, as the options a resume must repeat."""
    return "" if settings is None else settings.resume_options()


def interrupted_line(out: Path, done: int | None, total: int | None, shard: tuple[int, int] | None = None,
                     settings=None) -> str:
    """What a Ctrl-C'ed run prints: how far it got and the command that resumes it (with the options a resume
    must repeat: the shard, and the run settings that differ from the defaults)."""
    folder, extra = (out.parent, f" --shard {shard[0]}/{shard[1]}") if shard else (out, "")
    extra += settings_options(settings)
    if done is None:
        return f"interrupted before {out} held a study; run the same command again to start it"
    return (f"interrupted: {done} of {total} cells are stored in {out}; `vmap-sweep run --out {folder}{extra}` "
            "resumes it")


class _EtaColumn(ProgressColumn):
    """The bar's ETA, weighted by model-steps as the log lines' (rich's own counts cells)."""

    def __init__(self, progress: RichProgress):
        super().__init__()
        self.progress = progress

    def render(self, task) -> Text:
        return Text(f"ETA {self.progress.eta()}", style="progress.remaining")


class RichProgress(ProgressHooks):
    """Cells done/total, cells per minute, ETA, the current batch and how many did not converge so far: a live bar on a
    terminal; else (--quiet, or output to a file, nohup, Slurm) one timestamped log line per batch.

    The ETA is learnt from the batches this run has finished (run/eta.py): a batch's time fitted as its tokens
    (model-steps x tokens per step) and its cells (read-outs, eval) each at a rate, the first batch's start-up
    left out once others are known."""

    def __init__(self, console: Console, quiet: bool = False, where: str | Path | None = None):
        self.console, self.where = console, where  # where: the study folder, for the line of a finished one
        # a bar written to a file shows nothing for minutes, then garbage: log lines there
        self.quiet = quiet or not (console.is_terminal or console.is_jupyter) or console.is_dumb_terminal
        self.not_converged = self.done = self.trained = 0
        self.total = self.batches = 0
        self.started = self.updated = time.perf_counter()
        self.remaining: float | None = None  # seconds left, estimated at `updated`
        self.eta_model = EtaModel([])
        self.weighted = False  # whether start was given each batch's work (else model-steps and cells)
        self.bar: Progress | None = None
        self.running: dict[int, str] = {}  # batches in flight: several at once with one Ray worker per GPU

    def start(self, total: int, done: int, batches: int, *, model_steps: int = 0,
              labels: dict[str, int] | None = None, work: list[Work] | None = None) -> None:
        # one progress may serve several studies in a row (zoom levels): counts are per study
        self.total, self.done, self.batches = total, done, batches
        self.not_converged = (labels or {}).get(NOT_CONVERGED, 0)  # a resumed study's count goes on from what is stored
        self.trained = 0
        self.remaining = None
        self.weighted = work is not None
        self.eta_model = EtaModel(work if work is not None else [Work(float(model_steps), total - done)])
        self.started = self.updated = time.perf_counter()
        self.running = {}
        todo = total - done
        if not todo:
            self._log(f"all {total} cells are already stored" + (f" in {self.where}" if self.where else ""), eta=False)
            return
        plan = f"training {_count(todo, 'cell')} ({_count(model_steps, 'model-step')})"
        if done:
            self._log(f"resuming: {done}/{total} cells already stored, {self.not_converged} not converged; {plan}")
        elif self.quiet:
            self._log(f"{plan} in {_count(batches, 'batch')}")
        if not self.quiet:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("cells · {task.fields[rate]:.1f}/min · {task.fields[not_converged]} not converged"),
                TimeElapsedColumn(),
                _EtaColumn(self),
                console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("starting", total=total, completed=done, rate=0.0,
                                          not_converged=self.not_converged)

    def cells_per_minute(self) -> float:
        return 60 * self.trained / max(time.perf_counter() - self.started, 1e-9)

    def eta_seconds(self) -> float | None:
        """Seconds left, or None before the first batch is stored: counts down between batches."""
        if self.remaining is None:
            return None
        return max(self.remaining - (time.perf_counter() - self.updated), 0.0)

    def eta(self) -> str:
        left = self.eta_seconds()
        return "after the first batch" if left is None else duration(left)

    def note(self, text: str) -> None:
        self.console.print(f"note: {text}", highlight=False, markup=False, soft_wrap=True)

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

    def batch_done(self, batch: Batch, labels: list[str | None], elapsed: float) -> None:
        self.running.pop(batch.index, None)
        self._describe()
        self.done += len(labels)
        self.trained += len(labels)
        self.not_converged += labels.count(NOT_CONVERGED)
        self._estimate(batch, len(labels))
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=self.cells_per_minute(),
                            not_converged=self.not_converged)
        else:
            self._log(f"batch {batch.index + 1}/{self.batches}: {len(labels)} cells in {elapsed:.1f}s, "
                      f"{self.done}/{self.total} done, {self.not_converged} not converged, "
                      f"{self.cells_per_minute():.1f} cells/min")

    def _estimate(self, batch: Batch, cells: int) -> None:
        """Learn from the batch just finished (the wall-clock time since the last one), then re-estimate."""
        now = time.perf_counter()
        work = batch_work(batch, cells) if self.weighted else Work(float(batch.model_steps), cells)
        self.eta_model.observe(work, now - self.updated)
        self.remaining = self.eta_model.seconds_left()
        self.updated = now

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def _log(self, text: str, eta: bool = True) -> None:
        """One line, never wrapped: a timestamp (ISO, seconds), the text, the ETA."""
        stamp = datetime.now().isoformat(timespec="seconds")
        line = f"{stamp} {text}" + (f", ETA {self.eta()}" if eta else "")
        self.console.print(line, highlight=False, markup=False, soft_wrap=True)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 'es' if noun.endswith('ch') else 's'}"


def _counts_rows(store: StudyStore) -> list[tuple[str, str]]:
    rows = [("cells done", f"{store.done_count()}/{store.cell_count()}")]
    for label, n in sorted(store.label_counts().items()):
        rows.append((f"  {DISPLAY.get(label, label)}", str(n)))
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
    table.add_column()
    table.add_column(overflow="fold")  # a long path or command wraps whole, never cut short with an ellipsis
    table.add_row("model / data", escape(f"{cfg.get('model')} / {cfg.get('data')}"))
    table.add_row("grid", escape(f"{cfg.get('x')} × {cfg.get('y')} at {store.nx}×{store.ny}"))
    # a config stored without these fields was trained packed, its budgets in tokens (study/config.py)
    table.add_row("rows", "packed" if cfg.get("packing", True) else f"one conversation per row of {cfg.get('seq_len')}")
    table.add_row("budgets count", BUDGET_UNIT_WORDS[str(cfg.get("budget_unit", "tokens"))])
    table.add_row("config hash", store.config_hash[:16])
    live = store.live_run()
    table.add_row("training now", escape(live_run_line(live)) if live else "no (no process holds the study's lock)")
    for key, value in _counts_rows(store):
        table.add_row(key, value)
    for key, value in provenance_rows(store):
        table.add_row(key, escape(value[:16] + "…" if key.endswith("sha256") else value))  # in full: the report
    rows = [r for r in store.rows() if r["status"] == "done"]
    if rows:
        last = max(r["finished_at"] for r in rows)
        table.add_row("last batch stored", last)
        table.add_row("training time so far", f"{sum(r['wall_time'] or 0 for r in rows) / 60:.1f} min")
    children = store.children()
    if children:
        table.add_row("zoom children", escape(", ".join(c.child_dir for c in children)))
    from vmap_sweep.analysis.chain import begun_zooms
    from vmap_sweep.present.tables import finish_zoom_command

    for begun in begun_zooms(store.directory, children):
        table.add_row("zoom begun", escape(f"{begun.folder.name}, not finished: `{finish_zoom_command(begun)}` "
                                           "finishes it"))
    for key, value in refine_rows(store):
        table.add_row(key, escape(value))
    return table


def refine_rows(store: StudyStore) -> list[tuple[str, str]]:
    """A refined study's finished levels and what each cost; a level's own place and inferred cells."""
    from vmap_sweep.store.db import holds_schema
    from vmap_sweep.store.levels import MAX_LEVELS, REFINE, level_dir, level_info

    rows = []
    record = store.get_extra(REFINE)
    finished = {int(e["level"]): e for e in (record or {}).get("levels", [])}
    for level in range(1, MAX_LEVELS + 1):
        there = holds_schema(level_dir(store.directory, level))
        again = f"`vmap-sweep refine {store.directory} --levels {level}`"
        if level in finished:
            rows.append((f"refine level {level}", _level_cost(finished[level]) if there else
                         f"finished, but its folder {level_dir(store.directory, level).name} is gone: {again} "
                         "trains it again"))
        elif there:
            rows.append((f"refine level {level}", f"begun, not finished: {again} resumes it"))
    info = level_info(store)
    if info is not None:
        cost = info.get("cost", {})
        state = "finished" if info.get("complete") else "unfinished: `vmap-sweep refine` on its study resumes it"
        rows.append(("refinement", f"level {info['level']} of {store.directory.parent}, {state}; pending cells are "
                                   f"inferred ({cost.get('inferred', '?'):,} of {store.nx * store.ny:,})"
                     if info.get("complete") else f"level {info['level']} of {store.directory.parent}, {state}"))
    return rows


def _level_cost(e: dict) -> str:
    """One level: its grid, its new cells, which of them were trained, repeated or inferred, and what it cost."""
    def n(v: int | None) -> str:
        return "?" if v is None else f"{v:,}"

    # a finished level counts every inferred cell of its grid (those of the level below too); a plan, its new ones
    inferred = (f"{n(e['inferred'])} of its {n(e['nx'] * e['ny'])} cells inferred" if "inferred" in e
                else f"{n(e.get('inferred_new'))} new cells inferred")
    repeats = f", {n(e.get('repeats'))} repeat a trained cell's experiment (free)" if e.get("repeats") else ""
    seconds = e.get("seconds")
    traced = e.get("traced")
    rounds = (f" (with {sum(traced):,} traced along the boundary in {len(traced)} "
              f"round{'s' if len(traced) != 1 else ''})") if traced else ""
    # a target that repeats the experiment of a cell off the boundary has that cell trained (its result is copied);
    # a level recorded before that was counted apart has it by the count's identity
    off = e.get("off_boundary")
    if off is None and not traced and None not in (e.get("trained"), e.get("repeats"), e.get("targets")):
        off = e["trained"] + e["repeats"] - e["targets"]
    off = f" ({n(off)} of them off the boundary, as the experiment a boundary cell repeats)" if off else ""
    return (f"{e['nx']}×{e['ny']}: {n(e['targets'])} of {n(e['new_cells'])} new cells on the boundary, "
            f"{n(e['trained'])} trained{off}{rounds}{repeats}; {inferred}; {n(e['trunks'])} trunks, "
            f"{n(e['model_steps'])} model-steps" + (f", {duration(seconds)}" if seconds is not None else ""))


def refine_lines(study: Path, levels: list[dict], dry_run: bool = False, dimension: float | None = None,
                 earlier: set[int] = frozenset()) -> list[str]:
    """`refine`'s levels (with --dry-run: done, planned exactly, or projected; after a run: those `earlier` were
    finished before it, their cost as it was then)."""
    lines = []
    for e in levels:
        if dry_run:
            tag = " (done)" if e.get("done") else " (projected)" if e.get("projected") else " (exact)"
        else:
            tag = " (done earlier)" if int(e["level"]) in earlier else ""
        lines.append(f"level {e['level']}{tag}: {_level_cost(e)}")
    if dry_run and any(e.get("projected") for e in levels):
        lines.append(f"projected levels assume a boundary of dimension {dimension:.2f} (2^D times the cells per "
                     "level); each is planned exactly once the level before it is refined")
    if not dry_run and levels:
        last = levels[-1]["level"]
        lines.append(f"refined study in {study} (levels in {study}/refine-1"
                     + (f" … refine-{last})" if last != 1 else ")"))
    return lines


def live_run_line(live: dict) -> str:
    """The process training a study, as its lock file says: "pid 12 on host since T: batch 3/40, 24/320 cells
    stored, ETA 1.42 h (as of T)"; what it has not published yet is left out."""
    parts = []
    running, batches = live.get("batch") or [], live.get("batches")
    if running and batches:
        parts.append(f"batch {', '.join(str(b) for b in running)}/{batches}")
    elif batches:
        parts.append(f"between batches (of {batches})")
    if live.get("total") is not None:
        parts.append(f"{live.get('done')}/{live['total']} cells stored")
    if "eta_seconds" in live:
        eta = live["eta_seconds"]
        parts.append("ETA after the first batch" if eta is None else f"ETA {duration(float(eta))}"
                     + (f" (as of {live['updated']})" if live.get("updated") else ""))
    return live["holder"] + (": " + ", ".join(parts) if parts else "")


# ------------------------------------------------------------------------------------------------ commands
def classify_line(criterion: str, counts: dict[str, int], zooms: int) -> str:
    return (f"{criterion}: " + ", ".join(f"{n} {DISPLAY.get(label, label)}" for label, n in sorted(counts.items()))
            + (f"; its {zooms} zoom studies too" if zooms else ""))


def merge_line(shards: int, store: StudyStore, out: Path) -> str:
    return f"merged {count_of(shards, 'shard')}: {store.done_count()}/{store.cell_count()} cells in {out}"


def ood_choice_line(pick: str, cells: list[dict]) -> str:
    """`eval`'s chosen cells before any re-training: how many, how, and their distances to the boundary."""
    import numpy as np

    q = np.quantile([c["distance"] for c in cells], [0, 0.25, 0.5, 0.75, 1])
    return (f"evaluating {_count(len(cells), 'converged cell')} ({pick}); distance to the boundary in grid steps: "
            f"min {q[0]:.2f}, quartiles {q[1]:.2f} {q[2]:.2f} {q[3]:.2f}, max {q[4]:.2f}")


def bench_table(r: BenchResult) -> Table:
    """Stacked against one at a time: seconds per cell and per step, achieved TFLOP/s (GFLOP/s to 3 significant
    digits where both sides reach less than 1 TFLOP/s, as on a CPU, so that no rate prints as 0.0)."""
    table = Table(title=f"depth {r.depth}, {r.models} stacked, {r.tokens_per_step} tokens/step, "
                        f"cells of {r.steps} steps")
    giga = max(r.baseline_tflops, r.stacked_tflops) < 1.0
    for col in ("", "s/cell", "s/step", "GFLOP/s" if giga else "TFLOP/s"):
        table.add_column(col)

    def rate(tflops: float) -> str:
        return f"{tflops * 1e3:.3g}" if giga else f"{tflops:.1f}"

    table.add_row("one at a time (best)", f"{r.baseline_cell_s:.3f}", f"{r.baseline_step_s:.4f}",
                  rate(r.baseline_tflops))
    table.add_row(f"{r.models} stacked", f"{r.stacked_cell_s:.3f}", f"{r.stacked_step_s:.4f}",
                  rate(r.stacked_tflops))
    return table


def bench_lines(r: BenchResult) -> list[RenderableType]:
    """The table, then the speedup and the peak memory (measured by CUDA's allocator only: on a CPU, no number)."""
    peak = r.peak_memory_gb
    memory = (f"peak GPU memory of the stacked run {peak:.1f} GB" if peak is not None and peak == peak
              else "peak memory not measured (only a CUDA device reports it)")
    return [bench_table(r), f"cells per hour, stacked / one at a time: {r.speedup:.2f}x; {memory}"]


def cell_model_lines(exported) -> list[str]:
    info, out = exported.info, exported.out
    hparams = ", ".join(f"{k}={v:.4g}" for k, v in info["hparams"].items())
    label = DISPLAY.get(info["label"], info["label"]) or "unclassified"
    return [f"cell ({info['i']}, {info['j']}): {hparams}, {label}, eval loss "
            f"{_num(info['eval_loss'])}; re-trained, max relative difference to the stored trajectory "
            f"{info['retrain_max_rel_diff']:.3g}",
            f"{out / 'transformers'}  (NanoChatForCausalLM.from_pretrained: {', '.join(exported.hf_files)})"
            if exported.hf_files else "no transformers folder: transformers' NanoChat port has no 2026 architecture",
            f"{out / 'vmap-sweep'}  (vmap_sweep.model.checkpoint.load_model)"]


def answer_lines(answers: list[tuple[str, str]]) -> list[str]:
    return [f"{kind}: {json.dumps(text, ensure_ascii=False)}" for kind, text in answers]


def axes_lines(help_text: str) -> list[Text]:
    """The axes help, wrapped but never parsed as markup: '[float, log]' is each axis's type and scale."""
    return [Text(help_text)]


def repeats_line(s: dict, shown: int = 4) -> str:
    """The cells whose budget adds no supervised token to a smaller one's, by the budgets they repeat."""
    if not s["repeated_cells"]:
        return "none: every budget adds supervised tokens to the smaller ones"
    by_budget: dict[int, list[int]] = {}
    for budget, repeated in sorted(s["repeats"].items()):
        by_budget.setdefault(repeated, []).append(budget)
    pairs = [f"{', '.join(map(str, dup))} = {rep}" for rep, dup in sorted(by_budget.items())]
    more = f", … ({len(pairs) - shown} more)" if len(pairs) > shown else ""
    return (f"{s['repeated_cells']:,} cells repeat a smaller budget's experiment (the tokens between hold no "
            f"supervised token); budgets {'; '.join(pairs[:shown])}{more}; stored as their own cells, "
            "counted as one size by rules and the maps")


def _tokens_per_step(sizes: list[int]) -> str:
    if len(sizes) == 1:
        return f"{sizes[0]:,}"
    return f"{sizes[0]:,} … {sizes[-1]:,}: {len(sizes)} batch sizes, each batch of one"


BUDGET_UNIT_WORDS = {"tokens": "tokens (every position of a row)", "supervised": "supervised (answer) tokens",
                     "conversations": "conversations"}


def layout_rows(cfg, layout: dict | None) -> list[tuple[str, str]]:
    """--dry-run: how the data fills the rows (data/stream.py, TokenStream.layout)."""
    if layout is None:
        return []
    answers = f"{layout['supervised_share'] * cfg.rows_per_step * cfg.seq_len:,.0f} per step on average"
    if layout["layout"] == "packed":
        return [("rows", f"packed: conversations run across rows of {cfg.seq_len}; "
                         f"{layout['cut_share']:.1%} of answer tokens are trained without their conversation's "
                         "start in their row"),
                ("supervised tokens", answers)]
    return [("rows", f"one conversation per row of {cfg.seq_len}: {layout['rows']:,} rows, {layout['dropped']:,} "
                     f"conversations dropped (no answer token within {cfg.seq_len} tokens)"),
            ("padding", f"{layout['padding_share']:.1%} of positions"),
            ("supervised tokens", answers)]


def _cells_to_train(s: dict) -> str:
    if not s.get("stored"):
        return f"{s['cells']:,}"
    return (f"{s['to_train']:,} to train ({s['stored']:,} of the plan's {s['planned']:,} are stored); the rows below "
            f"are the batches that hold them")


def plan_table(cfg, k: int, s: dict) -> Table:
    """--dry-run's plan: what will be trained and a rough time for it."""
    table = Table(title="plan", show_header=False)
    for key, value in [
        ("model / data", f"{cfg.model} / {cfg.data}"),
        ("grid", f"{cfg.x} × {cfg.y} at {cfg.resolution}"),
        ("budgets count", BUDGET_UNIT_WORDS[cfg.budget_unit]),
        *layout_rows(cfg, s.get("layout")),
        ("cells", _cells_to_train(s)), ("batches", f"{s['batches']} of up to {k} models"),
        ("tokens per step", _tokens_per_step(s["tokens_per_step"])),
        ("steps per cell", f"{s['steps_range'][0]} … {s['steps_range'][1]}"),
        ("trunks", f"{s['trunks']:,} trained, read out at {s['read_outs']:,} cells"),
        ("model-steps", f"{s['model_steps']:,} ({s['padded_model_steps']:,} masked); every cell alone: "
                        f"{s['cell_model_steps']:,}"),
        ("repeated data", repeats_line(s)),
        ("FLOPs", f"{s['flops']:.3g}"),
        ("estimate", f"{duration(s['seconds_estimate'])} on {s['device']} "
                     f"(matmul {s['matmul_tflops']:.2f} TFLOP/s measured, {s['efficiency']:.0%} of it assumed)"),
    ]:
        table.add_row(str(key), escape(str(value)))
    return table
