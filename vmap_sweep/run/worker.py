"""Training a study's batches on one device: the base model and data loaded once, batches split on OOM.

`LocalBackend` runs batches one after another in this process; run/ray_backend.py spreads them over Ray
workers. Both load lazily, so that a study folder and its config are checked before anything heavy loads.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vmap_sweep.data.sources import load_conversations
from vmap_sweep.data.stream import EvalSet, TokenStream
from vmap_sweep.errors import CheckpointError, ConfigError, TokenizerError
from vmap_sweep.model.gpt import GPT
from vmap_sweep.model.tokenizer import Tokenizer
from vmap_sweep.run.policy import compile_on
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.grid import Cell
from vmap_sweep.study.plan import Batch
from vmap_sweep.study.settings import RunSettings
from vmap_sweep.study.sizes import Budgets
from vmap_sweep.train.memory import probe_models_per_batch, train_splitting_on_oom
from vmap_sweep.train.trainer import CellRecord, TrainConfig, set_determinism, with_batch_size_of
from vmap_sweep.train.trunk import TrunkTrainer

Job = tuple[Batch, list[Cell]]  # a batch and those of its cells still to train, lane by lane


def job_lanes(job: Job) -> list[list[dict]]:
    """The hyperparameters of a job's cells, grouped by the stacked model (lane) that trains them."""
    todo = {c.key for c in job[1]}
    lanes = [[c.hparams for c in lane if c.key in todo] for lane in job[0].stacked]
    return [lane for lane in lanes if lane]


def train_config(cfg: StudyConfig, settings: RunSettings, compile: bool) -> TrainConfig:
    """The trainer's settings for a study's cells. Where the study sweeps its batch size, each stack takes its own
    rows per step (with_batch_size_of); this config holds the smallest, which the micro-batches divide too."""
    return TrainConfig(
        compile=compile,
        optimizer=cfg.optimizer,
        schedule=cfg.schedule,
        rows_per_step=cfg.cell_rows_per_step()[0],
        seq_len=cfg.seq_len,
        micro_batch_size=settings.micro_batch_size,
        trainable=cfg.trainable,
        divergence_ratio=cfg.divergence_ratio,
        optimizer_state_dtype=cfg.optimizer_state,
        checkpoint_activations=cfg.checkpoint_activations,
    )


def load_base_model(name: str, tokenizer: str | None = None, revision: str | None = None,
                    model_format: str | None = None):
    """A LoadedModel (model and tokenizer) by the name a config gives: the embedded tiny model, or any source
    model/checkpoint.py reads (`tokenizer`: a tokenizer file to use instead of its own; `revision`: a Hub id's;
    `model_format`: the layout of a folder or repo holding both).
    Training reads text, so a model without a tokenizer is refused here, naming the option that gives one."""
    if name == "tiny":
        from vmap_sweep.train.tiny import tiny_base_model

        loaded = tiny_base_model()
        if tokenizer is None and revision is None and model_format is None:
            return loaded
        raise ConfigError("--model tiny: the embedded model has its own byte tokenizer, no Hub revision and one "
                          "layout; drop --tokenizer, --model-revision and --model-format")
    from vmap_sweep.model.checkpoint import MissingTokenizerWarning, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingTokenizerWarning)  # refused below, in one line
        loaded = load_model(name, tokenizer=tokenizer, revision=revision, model_format=model_format)
    if loaded.tokenizer is None:
        raise TokenizerError(f"{name}: the model was saved without a tokenizer (no tokenizer.json); give the "
                             "base model's tokenizer with --tokenizer PATH (tokenizer.json or tokenizer.pkl)")
    return loaded


@dataclass
class StudyData:
    model: GPT
    tokenizer: Tokenizer
    stream: TokenStream
    eval_batches: list[tuple[torch.Tensor, torch.Tensor]]


def training_stream(cfg: StudyConfig, sequence_len: int, tokenizer: Tokenizer) -> TokenStream:
    """The study's fixed training order, for a model of `sequence_len` positions."""
    if cfg.seq_len > sequence_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the model's sequence_len {sequence_len}; "
                          f"choose --seq-len <= {sequence_len}")
    return TokenStream.build(load_conversations(cfg.data, "train", cfg.data_revision), tokenizer, cfg.seed,
                             sequence_len, source=cfg.data, row_len=cfg.row_len)


def load_study_data(cfg: StudyConfig, device: torch.device) -> StudyData:
    """The base model, its tokenizer, the fixed training order and the held-out evaluation tokens."""
    loaded = load_base_model(cfg.model, cfg.tokenizer, cfg.model_revision, cfg.model_format)
    model, tokenizer = loaded.model, loaded.tokenizer
    max_len = model.config.sequence_len
    stream = training_stream(cfg, model.config.sequence_len, tokenizer)
    if cfg.eval_tokens == 0:  # no eval pass: the held-out split is not read
        return StudyData(model, tokenizer, stream, [])
    held_out = EvalSet.build(load_conversations(cfg.data, "validation", cfg.data_revision), tokenizer, cfg.eval_tokens,
                             max_len=max_len, source=cfg.data, row_len=cfg.row_len)
    return StudyData(model, tokenizer, stream, held_out.batches(cfg.rows_per_step, cfg.seq_len))


def weights_name(model: str) -> str:
    """The file(s) a model's weights come from, for a message: a folder's weight files, else the name."""
    from pathlib import Path

    folder = Path(model).expanduser()
    if model == "tiny" or not folder.is_dir():
        return model
    files = sorted({*folder.glob("*.safetensors"), *folder.glob("model_*.pt")})
    return ", ".join(str(f) for f in files[:3]) if files else model


# Positions of the first training row the base model reads before any batch: enough to reach every layer, few
# enough that the logits (positions x vocabulary) stay small on any device.
_CHECK_POSITIONS = 64


def check_base_model(data: StudyData, cfg: StudyConfig) -> None:
    """Refuse base weights that can only give a non-finite loss, before the first batch trains: a tensor holding
    NaN or inf, or finite weights whose logits on the first training row overflow. Every cell would otherwise
    be recorded as diverged at step 0, a map of the weights' damage rather than of the learning rate."""
    model = data.model
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise CheckpointError(f"{weights_name(cfg.model)}: tensor {name} holds NaN or inf, so every loss would "
                                  "be non-finite; use the base model's own weights (re-download or re-export them)")
    x, _ = data.stream.batch(0, 1, min(cfg.seq_len, _CHECK_POSITIONS))
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(x.to(device))
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError(f"{weights_name(cfg.model)}: the base model's logits on the first training row are "
                              "not finite (its weights overflow), so every loss would be; use the base model's own "
                              "weights (re-download or re-export them)")


class Worker:
    """Trains batches of cells on one device. It holds the base model and the data, loaded once."""

    def __init__(self, cfg: StudyConfig, device: str | torch.device, settings: RunSettings):
        set_determinism(cfg.seed, settings.deterministic)
        self.device = torch.device(device)
        self.data = load_study_data(cfg, self.device)
        check_base_model(self.data, cfg)
        self.train_cfg = train_config(cfg, settings, compile_on(self.device, self.data.model, settings.compile))
        self.rows_per_step = cfg.cell_rows_per_step()
        # by rows per step: the models that last fitted at once; later batches of as many rows are cut to it
        self.fits: dict[int, int] = {}
        self.base_cache: dict = {}  # the base model's per-token losses by step: every batch sees the same steps

    def train(self, lanes: list[list[dict]], evaluate: bool = True) -> list[CellRecord]:
        """One record per cell of `lanes`, in order. A lane is a trunk, read out at each of its cells' budgets
        (train/trunk.py). A batch that runs out of memory is split by lanes; no result changes.
        evaluate: take each cell's eval loss (False: a study of --eval-tokens 0, such as a refinement's level)."""

        def stacked(sub: list[list[dict]]) -> list[CellRecord]:
            trainer = TrunkTrainer(self.data.model, sub, self.train_cfg, self.device, self.base_cache)
            return trainer.run(self.data.stream, self.data.eval_batches if evaluate else None)

        rows = with_batch_size_of([lane[0] for lane in lanes], self.train_cfg).rows_per_step

        def fitted(n: int) -> None:
            self.fits[rows] = n

        size = min(self.fits.get(rows, len(lanes)), len(lanes))
        records: list[CellRecord] = []
        for start in range(0, len(lanes), size):
            records += train_splitting_on_oom(stacked, lanes[start:start + size], fitted)
        return records

    def models_per_batch(self, limit: int) -> int:
        return probe_models_per_batch(self.data.model, self.train_cfg, self.device, limit, self.rows_per_step)


class LocalBackend:
    """Batches one after another in this process, on one device. The caller owns it (close it, or use `with`):
    one backend serves every study of one model and data, such as the levels of a zoom."""

    def __init__(self, cfg: StudyConfig, settings: RunSettings, device: str | torch.device | None = None):
        self.cfg, self.settings = cfg, settings
        self.device = torch.device(settings.device if device is None else device)

    @functools.cached_property
    def worker(self) -> Worker:
        return Worker(self.cfg, self.device, self.settings)

    def budgets(self, budgets: list[int], unit: str = "tokens") -> Budgets:
        return self.worker.data.stream.budgets(budgets, unit)

    def models_per_batch(self, limit: int) -> int:
        return self.worker.models_per_batch(limit)

    def run(self, jobs: list[Job], started: Callable[[Job], None],
            evaluate: bool = True) -> Iterator[tuple[Job, list[CellRecord]]]:
        """Yields (job, records) as each batch finishes."""
        for job in jobs:
            started(job)
            yield job, self.worker.train(job_lanes(job), evaluate)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
