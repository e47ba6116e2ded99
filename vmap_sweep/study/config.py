"""A study's configuration: presets, validation and the hash that guards resume.

Only what changes a cell's result is part of the hash. How the work is scheduled (models per batch, device,
shard, progress) is not: a cell's result does not depend on its batch companions. The names every layer
agrees on (optimizers, schedules, parameter groups) are defined here, at the bottom, and checked once.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from functools import cached_property

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import AXES, AxisSpec, check_axis_pair, parse_axis_spec, parse_resolution
from vmap_sweep.study.sizes import SIZE_UNITS

OPTIMIZERS = ("adamw", "nanochat")  # nanochat: Muon on the block matrices, AdamW on the (un)embedding
# warmup-cosine: the plan author's (fractal-llm src/finetune.py): max(1, floor(warmup_ratio x steps)) warmup steps,
# then half a cosine to zero; "cosine" rounds the warmup and allows none
SCHEDULES = ("constant", "linear", "cosine", "warmup-cosine")
MAX_TOKENS_PER_STEP = 1 << 24  # 128x the plan's largest batch (128K tokens); more is a typo, not a study
GROUPS = ("embedding", "unembedding", "attn", "mlp")  # parameter groups, each with its own learning rate
OPTIMIZER_STATES = ("float32", "bfloat16")
MODEL_FORMATS = ("native", "transformers")  # the checkpoint layouts a Hub repo may hold both of
# Where the model and data come from beyond their names. Each is stored (and hashed) only when given, so a study
# made before they existed keeps its hash and resumes.
SOURCE_OPTIONS = ("tokenizer", "model_revision", "data_revision", "model_format")
# How the data is laid out and what a budget counts. A study made before they existed holds neither and means
# what it meant then (packed rows, budgets in tokens): each is stored (and hashed) only where it differs from that.
EARLIER_MEANING = {"packing": True, "budget_unit": "tokens"}
BUDGET_UNITS = SIZE_UNITS
# Keys a study's stored config held under an older name: rows per step was stored as `batch_size`, the name the
# batch_size axis gives tokens per step.
OLDER_KEYS = {"batch_size": "rows_per_step"}


def renamed(stored: dict, older: dict[str, str]) -> dict:
    """A stored dict with each key of `older` under its newer name (a copy; the values as they are)."""
    out = dict(stored)
    for old, new in older.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


def newer_keys(config: dict) -> dict:
    """A stored config with today's key names."""
    return renamed(config, OLDER_KEYS)


def tokens_per_step(rows: int, seq_len: int) -> int:
    """Tokens per optimizer step of `rows` rows of `seq_len` tokens: the one place the two are multiplied."""
    return rows * seq_len


def check_micro_batch_size(micro_batch_size: int | None, rows: int,
                           what: str = "batch size ({rows} rows per step)") -> None:
    """Micro-batches must split a step's rows evenly (one rule for the trainer, `run` and `bench`)."""
    if micro_batch_size is not None and (micro_batch_size < 1 or rows % micro_batch_size):
        raise ConfigError(f"--micro-batch-size {micro_batch_size}: give a divisor of the {what.format(rows=rows)}")


# Held-out tokens evaluated after every cell at most: 512x the flagship's 32,768. Each cell evaluates them all,
# so --eval-tokens 1e12 would start a run that never ends.
MAX_EVAL_TOKENS = 1 << 24
# Seeds the data order and every generator takes: torch's manual_seed accepts no more than 64 bits, and a seed
# is stored in SQLite as a signed 64-bit integer.
MAX_SEED = (1 << 63) - 1


# A cell's optimizer steps at most. The planner and the trainer do per-step work for every cell, so a budget such
# as --set tokens=1e12 would plan for hours before training anything; 1e5 steps is ~1000x the flagship study's.
MAX_STEPS_PER_CELL = 100_000


def check_fixed(key: str, value: object) -> None:
    """A fixed hyperparameter (--set KEY=VALUE) inside its axis's bounds: a finite number, whole for int axes."""
    axis = AXES[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"--set {key}={value!r}: {key} must be a number")
    if not math.isfinite(value) or (axis.positive and value <= 0) or value < 0 or (
            axis.hi_max is not None and value > axis.hi_max):
        bound = f"in [0, {axis.hi_max:g}]" if axis.hi_max is not None else ("> 0" if axis.positive else ">= 0")
        raise ConfigError(f"--set {key}={value!r}: {key} must be {bound}")
    if axis.kind == "int" and value != int(value):
        raise ConfigError(f"--set {key}={value!r}: {key} counts whole units; give a whole number")


def fixed_value(key: str, value: float) -> float | int:
    """A --set value checked, as the trainer takes it: an int for int axes."""
    check_fixed(key, value)
    return int(value) if AXES[key].kind == "int" else float(value)


def check_steps(cfg: StudyConfig, x, y) -> None:
    """The largest dataset size within MAX_STEPS_PER_CELL optimizer steps (x, y: the parsed axes)."""
    if cfg.budget_unit != "tokens":  # positions known once the data is (run/pipeline.py checks them then)
        return
    per_step = cfg.tokens_per_step()
    budgets = [(f"--{name} {axis}", axis.hi) for name, axis in (("x", x), ("y", y)) if axis.name == "tokens"]
    if "tokens" in cfg.fixed:
        budgets.append((f"--set tokens={cfg.fixed['tokens']:g}", cfg.fixed["tokens"]))
    for option, tokens in budgets:
        if tokens / per_step > MAX_STEPS_PER_CELL:
            raise ConfigError(f"{option}: {tokens:.3g} tokens are {tokens / per_step:.3g} optimizer steps of "
                              f"{per_step} tokens, more than the {MAX_STEPS_PER_CELL:,} a cell may take; "
                              "use fewer tokens or a larger --rows-per-step x --seq-len")


@dataclass(frozen=True)
class StudyConfig:
    model: str  # "tiny" (the embedded project-made model), a checkpoint folder, or a Hub repo id
    data: str  # "synthetic", a .jsonl/.parquet file, or a Hub dataset id
    x: str = "lr:1e-6:1e-3:log"
    y: str = "tokens:1e3:1e6:log"
    resolution: str = "128"
    optimizer: str = "adamw"
    # constant: Sohl-Dickstein's setting, and a dataset size is then a prefix of every larger one, so a learning
    # rate's column trains as one trajectory (study/plan.py, `trunks`); linear: nanochat's SFT decay to zero
    schedule: str = "constant"
    rows_per_step: int = 8  # rows of seq_len per optimizer step (the batch_size axis counts tokens)
    seq_len: int = 1024
    seed: int = 42
    # held-out tokens each cell's eval loss is taken on; 0: no eval pass (no criterion reads the eval loss)
    eval_tokens: int = 32768
    trainable: tuple[str, ...] = GROUPS
    divergence_ratio: float = 10.0
    optimizer_state: str = "float32"  # or bfloat16: half the optimizer memory (8 d20 copies on one 80 GB GPU)
    checkpoint_activations: bool = False  # recompute block activations in the backward: less memory
    # values of every hyperparameter that is not an axis (lr, tokens, weight_decay, warmup_ratio, ...)
    fixed: dict = field(default_factory=dict)
    tokenizer: str | None = None  # a tokenizer file for a model folder saved without one
    # the Hub revisions (branch, tag or commit) of a Hub model and dataset; `run` pins a new study's to commits
    model_revision: str | None = None
    data_revision: str | None = None
    # native or transformers, where the model's folder or Hub repo holds both layouts (None: native)
    model_format: str | None = None
    # False: one conversation per row of seq_len, truncated and padded, as nanochat's SFT and the plan author's
    # fine-tuning feed it (data/stream.py); True: conversations concatenated across rows
    packing: bool = False
    # what the `tokens` axis counts: stream positions (tokens), answer targets (supervised, the plan author's
    # budget) or conversations; a budget is the shortest prefix of the stream holding that many
    budget_unit: str = "tokens"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trainable"] = list(self.trainable)
        for name in SOURCE_OPTIONS:
            if d[name] is None:
                del d[name]
        for name, earlier in EARLIER_MEANING.items():
            if d[name] == earlier:
                del d[name]
        return d

    def __post_init__(self) -> None:
        self.validate()  # a StudyConfig is a valid one: checked once, where it is made

    @classmethod
    def from_dict(cls, d: dict, *, check: bool = True) -> StudyConfig:
        """The config a study stored. check=False reads it as it is, unchecked: a study's measures stand even
        where a later vmap-sweep would refuse to train its config (an axis it no longer sweeps, say)."""
        known = {f.name for f in fields(cls)}
        d = {**EARLIER_MEANING, **{k: v for k, v in newer_keys(d).items() if k in known}}
        d["trainable"] = tuple(d.get("trainable", GROUPS))
        if check:
            return cls(**d)
        config = object.__new__(cls)  # the dataclass's own fields and defaults, without __post_init__
        for f in fields(cls):
            value = d[f.name] if f.name in d else f.default_factory() if f.default is MISSING else f.default
            object.__setattr__(config, f.name, value)
        return config

    def with_overrides(self, **overrides) -> StudyConfig:
        """A copy with every override that is not None applied (the CLI's options over a preset)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @cached_property
    def axes(self) -> tuple[AxisSpec, AxisSpec]:
        """The x and y axes, parsed from their specs once (a ConfigError names a spec that does not parse)."""
        return parse_axis_spec(self.x), parse_axis_spec(self.y)

    def validate(self) -> None:
        """Every problem a user can cause, as one ConfigError naming the option and the fix (on construction)."""
        x, y = self.axes
        check_axis_pair(x, y)
        parse_resolution(self.resolution)
        for name in ("rows_per_step", "seq_len", "eval_tokens", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r}: give a whole number")
        for name in ("rows_per_step", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.eval_tokens < 0:
            raise ConfigError(f"--eval-tokens must be 0 (no eval pass) or more, got {self.eval_tokens}")
        if self.eval_tokens > MAX_EVAL_TOKENS:
            raise ConfigError(f"--eval-tokens {self.eval_tokens:,}: every cell evaluates them all, at most "
                              f"{MAX_EVAL_TOKENS:,}; give fewer")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed {self.seed}: give a seed in [0, 2**63 - 1]")
        if isinstance(self.divergence_ratio, bool) or not isinstance(self.divergence_ratio, int | float) \
                or not math.isfinite(self.divergence_ratio) or self.divergence_ratio <= 1:
            raise ConfigError(f"divergence ratio {self.divergence_ratio!r}: give a finite number above 1")
        if self.tokens_per_step() > MAX_TOKENS_PER_STEP:  # refused before a step's tensors are allocated
            raise ConfigError(f"--rows-per-step {self.rows_per_step} x --seq-len {self.seq_len} = "
                              f"{self.tokens_per_step():,} tokens per step, more than {MAX_TOKENS_PER_STEP:,};"
                              " use fewer rows or shorter ones")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer {self.optimizer!r}: choose {' or '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}: choose {', '.join(SCHEDULES)}")
        unknown = set(self.trainable) - set(GROUPS)
        if unknown or not self.trainable:
            raise ConfigError(f"--trainable {','.join(self.trainable)!r}: choose one or more of {', '.join(GROUPS)}")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing {self.packing!r}: give --packing or --no-packing")
        if self.budget_unit not in BUDGET_UNITS:
            raise ConfigError(f"--budget-unit {self.budget_unit!r}: choose {', '.join(BUDGET_UNITS)}")
        if self.optimizer_state not in OPTIMIZER_STATES:
            raise ConfigError(f"--optimizer-state {self.optimizer_state!r}: choose {' or '.join(OPTIMIZER_STATES)}")
        if self.model_format not in (None, *MODEL_FORMATS):
            raise ConfigError(f"--model-format {self.model_format!r}: choose {' or '.join(MODEL_FORMATS)}")
        for key, value in self.fixed.items():
            check_fixed(key, value)
        check_steps(self, x, y)
        swept = {x.name, y.name}
        self._check_batch_size(x if x.name == "batch_size" else y if y.name == "batch_size" else None)
        if "tokens" not in swept and "tokens" not in self.fixed:
            raise ConfigError("no dataset size: sweep `tokens` on an axis or fix it with --set tokens=N")
        if self.optimizer == "adamw" and "lr" not in swept and "lr" not in self.fixed:
            groups = {"embedding_lr", "unembedding_lr", "attn_lr", "mlp_lr"}
            if not (groups <= swept | set(self.fixed)):
                raise ConfigError("no learning rate: sweep `lr` on an axis or fix it with --set lr=VALUE")

    def _check_batch_size(self, spec) -> None:
        """Tokens per step are swept on an axis (whole rows of seq_len) or set by --rows-per-step, never by --set."""
        if "batch_size" in self.fixed:
            raise ConfigError(f"--set batch_size={self.fixed['batch_size']}: a study that does not sweep the batch "
                              "size sets its rows per step with --rows-per-step ROWS (tokens per step = rows × "
                              "--seq-len)")
        if spec is not None and spec.lo < self.seq_len:
            raise ConfigError(f"axis spec {str(spec)!r}: batch_size counts tokens per step in whole rows of --seq-len "
                              f"{self.seq_len} tokens; use a min >= {self.seq_len}")

    @property
    def row_len(self) -> int | None:
        """The rows layout's row length (one conversation per row); None when conversations are packed."""
        return None if self.packing else self.seq_len

    def tokens_per_step(self, hparams: dict | None = None) -> int:
        """A cell's tokens per optimizer step: its swept batch_size, else --rows-per-step rows of --seq-len."""
        if hparams is not None and "batch_size" in hparams:
            return int(hparams["batch_size"])
        return tokens_per_step(self.rows_per_step, self.seq_len)

    def cell_rows_per_step(self) -> tuple[int, ...]:
        """The distinct rows per optimizer step of the study's cells, ascending (one unless batch_size is swept)."""
        nx, ny = parse_resolution(self.resolution)
        for spec, n in zip(self.axes, (nx, ny), strict=True):
            if spec.name == "batch_size":
                return tuple(sorted({int(v) // self.seq_len for v in spec.values(n, self.seq_len)}))
        return (self.rows_per_step,)


PRESETS: dict[str, StudyConfig] = {
    # The flagship study: nanochat-d20 fine-tuned on DocVQA, LR x dataset size, AdamW at a constant LR,
    # 8 x 1024 tokens/step.
    "d20-docvqa": StudyConfig(
        model="nanochat-students/nanochat-d20",
        data="morgan/docvqa-nanochat",
        x="lr:1e-6:1e-3:log",
        y="tokens:1e3:1e6:log",
        resolution="128",
        rows_per_step=8,
        seq_len=1024,
        seed=42,
    ),
    # The embedded project-made tiny model on synthetic document QA, where its boundary is visible.
    "tiny": StudyConfig(
        model="tiny",
        data="synthetic",
        x="lr:1e-4:1:log",
        y="tokens:256:16384:log",
        resolution="32",
        rows_per_step=4,
        seq_len=64,
        seed=42,
        eval_tokens=4096,
        # 64-token rows hold no whole synthetic conversation (~190 tokens): rows would drop them all. The tiny
        # study is packed; `--no-packing --seq-len 256 --rows-per-step 1` gives nanochat's rows at the same steps.
        packing=True,
    ),
}


def preset(name: str) -> StudyConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
