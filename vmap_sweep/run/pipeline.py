"""Run a study: plan the grid into batches, train each batch stacked, store it atomically, resume.

A killed run restarts with the same command: the plan is recomputed over the whole grid (so shards and
batch indices are stable), and only the cells the store does not have are trained.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vmap_sweep.analysis.classify import CRITERION_EXTRA, classify_record, study_criterion
from vmap_sweep.data.sources import data_fingerprint, load_conversations
from vmap_sweep.data.stream import EvalSet, TokenStream, steps_for
from vmap_sweep.errors import ConfigError, StoreError
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import Tokenizer
from vmap_sweep.store.db import DB_NAME, StudyStore
from vmap_sweep.study.axes import parse_axis_spec, parse_resolution
from vmap_sweep.study.config import StudyConfig, study_numerics
from vmap_sweep.study.grid import Cell, Grid
from vmap_sweep.study.plan import Batch, plan_batches, plan_summary, shard
from vmap_sweep.train.memory import probe_models_per_batch, train_splitting_on_oom
from vmap_sweep.train.trainer import CellRecord, StackedTrainer, check_micro_batch_size, set_determinism


def build_grid(cfg: StudyConfig, x: str | None = None, y: str | None = None) -> Grid:
    nx, ny = parse_resolution(cfg.resolution)
    return Grid(parse_axis_spec(x or cfg.x), parse_axis_spec(y or cfg.y), nx, ny, dict(cfg.fixed))


def _steps_of(cfg: StudyConfig) -> Callable[[Cell], int]:
    tokens_per_step = cfg.batch_size * cfg.seq_len
    return lambda c: steps_for(int(c.hparams["tokens"]), tokens_per_step)


def plan_study(cfg: StudyConfig, grid: Grid, models_per_batch: int) -> list[Batch]:
    return plan_batches(grid.cells(), models_per_batch, _steps_of(cfg))


def shard_cells(cfg: StudyConfig, grid: Grid, k: int, n: int) -> list[Cell]:
    """The cells of shard k of n, whatever each shard's --models-per-batch: shards are dealt whole groups of
    equal step count and at most one grid row each, so the parts never depend on how a shard batches them."""
    units = plan_batches(grid.cells(), grid.nx, _steps_of(cfg))
    return [c for unit in shard(units, k, n) for c in unit.cells]


def flops_per_model_step(model_config, seq_len: int, tokens_per_step: int) -> float:
    return model_config.flops_per_token(seq_len) * tokens_per_step


def measured_flops_per_second(device: torch.device) -> float:
    """A rough rate for --dry-run: one large matmul in the training dtype, timed here."""
    n = 2048 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    (a @ a).sum().item()
    start = time.perf_counter()
    reps = 10
    for _ in range(reps):
        b = a @ a
    b.sum().item()
    return 2 * n**3 * reps / (time.perf_counter() - start)


@dataclass
class StudyData:
    model: GPT
    tokenizer: Tokenizer
    stream: TokenStream
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]]


def load_study_data(cfg: StudyConfig, device: torch.device) -> StudyData:
    """The base model, its tokenizer, the fixed training order and the held-out evaluation tokens."""
    if cfg.model == "tiny":
        from vmap_sweep.train.tiny import tiny_base_model

        loaded = tiny_base_model()
    else:
        from vmap_sweep.model.checkpoint import load_model

        loaded = load_model(cfg.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    max_len = model.config.sequence_len
    stream = TokenStream.build(load_conversations(cfg.data, "train"), tokenizer, cfg.seed, max_len, source=cfg.data)
    held_out = EvalSet.build(load_conversations(cfg.data, "validation"), tokenizer, cfg.eval_tokens,
                             max_len=max_len, source=cfg.data)
    if cfg.seq_len > model.config.sequence_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model's sequence_len "
                          f"{model.config.sequence_len}; choose --seq-len <= {model.config.sequence_len}")
    return StudyData(model, tokenizer, stream, held_out.batches(cfg.batch_size, cfg.seq_len))


class Progress:
    """What the runner reports; the CLI renders it with rich, or as log lines with --quiet."""

    def start(self, total: int, done: int, batches: int) -> None: ...

    def batch_started(self, batch: Batch, todo: int) -> None: ...

    def batch_done(self, batch: Batch, records: list[CellRecord], elapsed: float) -> None: ...

    def finish(self) -> None: ...


class Worker:
    """Trains batches of cells on one device. It holds the base model and the data, loaded once."""

    def __init__(self, cfg: StudyConfig, device: str | torch.device, micro_batch_size: int | None = None,
                 compile: str | None = None):
        """compile: a VMAP_SWEEP_COMPILE value (1, 0, auto); None reads the environment."""
        self.device = torch.device(device)
        self.data = load_study_data(cfg, self.device)
        self.train_cfg = cfg.train_config(micro_batch_size,
                                          compile=compile_on(self.device, self.data.model, compile))
        self.fits: int | None = None  # models that last fitted at once; later batches are cut to it
        self.base_cache: dict = {}  # the base model's per-token losses by step: every batch sees the same steps

    def train(self, hparams: list[dict]) -> list[CellRecord]:
        """One record per cell, in order; a batch that runs out of memory is split, no result changes."""

        def stacked(sub: list[dict]) -> list[CellRecord]:
            trainer = StackedTrainer(self.data.model, sub, self.train_cfg, self.device, self.base_cache)
            return trainer.run(self.data.stream, self.data.eval_batches)

        def fitted(n: int) -> None:
            self.fits = n

        size = min(self.fits or len(hparams), len(hparams))
        records: list[CellRecord] = []
        for start in range(0, len(hparams), size):
            records += train_splitting_on_oom(stacked, hparams[start:start + size], fitted)
        return records


Job = tuple[Batch, list[Cell]]


class LocalBackend:
    """Batches one after another in this process, on one device."""

    def __init__(self, cfg: StudyConfig, device: torch.device, micro_batch_size: int | None = None):
        self.worker = Worker(cfg, device, micro_batch_size)

    def models_per_batch(self, limit: int) -> int:
        return probe_models_per_batch(self.worker.data.model, self.worker.train_cfg, self.worker.device, limit)

    def run(self, jobs: list[Job], started: Callable[[Job], None]):
        """Yields (job, records) as each batch finishes."""
        for job in jobs:
            started(job)
            yield job, self.worker.train([c.hparams for c in job[1]])

    def close(self) -> None:
        pass


DATA_EXTRA = "data_sha256"  # the study's local data file, as it was when the study started

# Compiling takes a minute or two and pays for itself only where steps are long: d20 runs 2-3x faster compiled,
# the tiny preset's whole 16 x 16 study takes 15 s eager and 73 s compiled (benchmarks/RESULTS.md).
COMPILE_MIN_PARAMS = 100_000_000


def compile_setting(device: torch.device | None = None) -> str:
    """VMAP_SWEEP_COMPILE: 1 (always torch.compile), 0 (never) or unset: auto. With a device, auto on a CPU is
    reported as 0, what it means there: the setting a study records, and a resume must match."""
    setting = os.environ.get("VMAP_SWEEP_COMPILE", "auto")
    if setting not in ("0", "1", "auto"):
        raise ConfigError(f"VMAP_SWEEP_COMPILE={setting!r}: set 1 (compile), 0 (eager) or unset it (auto)")
    return "0" if setting == "auto" and device is not None and device.type != "cuda" else setting


def compile_on(device: torch.device, model: GPT, setting: str | None = None) -> bool:
    """Whether to compile; auto: on a GPU, for models of COMPILE_MIN_PARAMS parameters or more."""
    setting = compile_setting() if setting is None else setting
    if setting == "auto":
        return device.type == "cuda" and model.num_params() >= COMPILE_MIN_PARAMS
    return setting == "1"


def resolve_device(device: str) -> torch.device:
    """--device auto|cpu|cuda[:N] -> a torch device that exists here, or a ConfigError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r}: choose auto, cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose auto, cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this machine has no CUDA device; use --device cpu or auto")
    return dev


def run_study(
    cfg: StudyConfig,
    out: Path,
    models_per_batch: int | str = 8,
    device: str = "auto",
    micro_batch_size: int | None = None,
    shard_spec: tuple[int, int] | None = None,
    deterministic: bool = False,
    progress: Progress | None = None,
    backend_factory: Callable[..., LocalBackend] | None = None,
    criterion: dict | None = None,
) -> StudyStore:
    """Train every pending cell of the study in `out`, batch by batch; returns the (open) store.

    criterion: what a new study's classes follow (a zoom child takes its parent's); default ratio.

    Whatever the backend, this process is the only writer of the store: each finished batch is committed
    in one transaction as its results arrive.
    """
    progress = progress or Progress()
    cfg.validate()
    check_micro_batch_size(micro_batch_size, cfg.batch_size)
    compile_setting()  # a bad VMAP_SWEEP_COMPILE is refused before the study folder is touched
    dev = resolve_device(device)
    set_determinism(cfg.seed, deterministic)
    grid = build_grid(cfg)
    cells, shard_name = grid.cells(), None
    if shard_spec is not None:
        cells = shard_cells(cfg, grid, *shard_spec)
        shard_name = f"{shard_spec[0]}/{shard_spec[1]}"
        if not cells:
            raise ConfigError(f"--shard {shard_name}: that part holds no cells (the grid has {len(grid.cells())}, "
                              "dealt in whole rows); split it into fewer parts")
    out = Path(out)
    new_dir, new_db = not out.exists(), not (out / DB_NAME).exists()
    # Opening the store first checks the folder and the config before any expensive loading.
    store = StudyStore.create_or_open(out, cfg.to_dict(), grid.cells())
    backend = None
    try:
        # a study keeps the arithmetic it started with, whatever version of the trainer resumes it
        stored_runtime = store.get_extra("runtime")
        numerics = cfg.numerics if stored_runtime is None else study_numerics(stored_runtime)
        cfg = replace(cfg, numerics=numerics)
        runtime = {"device": dev.type, "micro_batch_size": micro_batch_size, "deterministic": deterministic,
                   "compile": compile_setting(dev), "numerics": numerics}
        _check_runtime(store, stored_runtime, runtime)
        data_digest = check_data_unchanged(store, cfg.data)
        backend = (backend_factory or LocalBackend)(cfg, dev, micro_batch_size)
        if isinstance(backend, LocalBackend):
            _check_smallest_budget(cfg, grid, backend.worker.data.stream)
        if store.get_extra("runtime") is None:  # written once the model and data have loaded
            store.put_extra("runtime", runtime)
        if data_digest is not None and store.get_extra(DATA_EXTRA) is None:
            store.put_extra(DATA_EXTRA, data_digest)
        # a given criterion is taken only by a study with no result yet: one study, one criterion
        if criterion is not None and store.get_extra(CRITERION_EXTRA) is None and store.done_count() == 0:
            store.put_extra(CRITERION_EXTRA, criterion)
        criterion = study_criterion(store)
        if models_per_batch == "auto":
            models_per_batch = backend.models_per_batch(grid.nx * grid.ny)
        batches = plan_batches(cells, int(models_per_batch), _steps_of(cfg))
        pending = {c.key for c in store.pending()}
        jobs = [(b, [c for c in b.cells if c.key in pending]) for b in batches]
        jobs = [(b, cells) for b, cells in jobs if cells]
        total = sum(len(b.cells) for b in batches)
        progress.start(total, total - sum(len(c) for _, c in jobs), len(batches))
        started_at: dict[int, float] = {}

        def started(job: Job) -> None:
            started_at[job[0].index] = time.perf_counter()
            progress.batch_started(job[0], len(job[1]))

        for (batch, cells), records in backend.run(jobs, started):
            store.record_batch(_labelled(cells, records, criterion), batch_index=batch.index, shard=shard_name)
            progress.batch_done(batch, records, time.perf_counter() - started_at.get(batch.index, time.perf_counter()))
        return store
    except BaseException as e:
        # A study this run created and an error (bad data, model) stopped before any result: remove it, so
        # the fixed command is not refused as "a different config" by a study that holds nothing.
        discard = new_db and isinstance(e, Exception) and _holds_nothing(store)
        store.close()
        if discard:
            _remove_empty_study(out, new_dir)
        raise
    finally:
        progress.finish()  # also on error: a live progress display would hide the cursor
        if backend is not None:
            backend.close()


def _check_runtime(store: StudyStore, stored: dict | None, runtime: dict) -> None:
    """The device type, micro-batching and determinism change a cell's last bits: one study, one regime."""
    if stored is not None:
        # studies from before these settings were recorded were trained eager, with the first numerics
        stored = {"compile": "0", "numerics": study_numerics(stored), **stored}
    if stored is not None and stored != runtime:
        diff = ", ".join(f"{k}: {stored.get(k)!r} -> {v!r}" for k, v in runtime.items() if stored.get(k) != v)
        raise StoreError(f"{store.path} was trained with other run settings ({diff}); resume with the same "
                         "--device, --micro-batch-size, --deterministic and VMAP_SWEEP_COMPILE, or use a new --out")


def check_data_unchanged(store: StudyStore, data: str) -> str | None:
    """A local data file keeps the contents the study started with (shards too: merge compares them).
    Returns the file's digest, for the store once the data has loaded."""
    digest, stored = data_fingerprint(data), store.get_extra(DATA_EXTRA)
    if digest is not None and stored is not None and stored != digest:
        raise StoreError(f"{data}: its contents changed since {store.path} was started (sha256 {stored[:12]} -> "
                         f"{digest[:12]}); restore that file, or use a new --out for the new data")
    return digest


def _check_smallest_budget(cfg: StudyConfig, grid: Grid, stream: TokenStream) -> None:
    """A cell whose budget holds no supervised token would have nothing to learn from: refuse the grid."""
    smallest = min(int(c.hparams["tokens"]) for c in grid.cells())
    _, targets = stream.window(0, smallest)
    if not bool((targets != -1).any()):
        first = int((stream.window(0, stream.num_tokens)[1] != -1).nonzero()[0]) + 1
        raise ConfigError(f"tokens={smallest}: the first {smallest} tokens of {cfg.data} hold no supervised "
                          f"(assistant) token; start the tokens range at {first} or more")


def _holds_nothing(store: StudyStore) -> bool:
    try:
        return store.done_count() == 0
    except sqlite3.Error:
        return False  # can't tell: keep it


def _remove_empty_study(out: Path, remove_dir: bool) -> None:
    for name in (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal"):
        with contextlib.suppress(OSError):
            (out / name).unlink()
    if remove_dir:
        with contextlib.suppress(OSError):
            out.rmdir()  # only if empty


def _labelled(cells: list[Cell], records: list[CellRecord], criterion: dict):
    """Each new result labelled by the study's criterion, so that its classes stay those of one `classify`."""
    for cell, rec in zip(cells, records, strict=True):
        rec.label, rec.score = classify_record(rec.losses, rec.initial_loss, rec.diverged, rec.base_losses, criterion)
        yield cell, rec


# The fraction of a bare matmul's rate that training reaches, compiled or eager, counting every model's every
# step: the default d20 study projected from measured batches on an H100 (benchmarks/RESULTS.md), 41% compiled
# (8 models, checkpointed, an earlier version; 49% with 4 whole, through the CLI), 15% eager.
TRAINING_EFFICIENCY = {True: 0.41, False: 0.15}


def describe_plan(cfg: StudyConfig, models_per_batch: int, model_config, device: torch.device) -> dict:
    """--dry-run: cells, batches, model-steps, FLOPs and a rough time on this device."""
    grid = build_grid(cfg)
    batches = plan_study(cfg, grid, models_per_batch)
    summary = plan_summary(batches, flops_per_model_step(model_config, cfg.seq_len, cfg.batch_size * cfg.seq_len))
    rate = measured_flops_per_second(device)
    with torch.device("meta"):  # the model's size decides compilation; no memory for its weights
        compiled = compile_on(device, GPT(model_config))
    summary["seconds_estimate"] = summary["flops"] / (TRAINING_EFFICIENCY[compiled] * rate)
    summary["efficiency"] = TRAINING_EFFICIENCY[compiled]
    summary["device"] = str(device)
    summary["matmul_tflops"] = rate / 1e12
    summary["steps_range"] = (min(b.steps for b in batches), max(b.steps for b in batches))
    return summary
