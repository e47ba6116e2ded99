"""A study's configuration: presets, validation and the hash that guards resume.

Only what changes a cell's result is part of the hash. How the work is scheduled (models per batch, device,
shard, progress) is not: a cell's result does not depend on its batch companions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from vmap_sweep.errors import ConfigError
from vmap_sweep.study.axes import AXES, parse_axis_spec, parse_resolution
from vmap_sweep.train.stack import GROUPS
from vmap_sweep.train.trainer import TrainConfig

# Versions of the trainer's arithmetic, which set a cell's last bits: a study keeps the version it started with
# (stored in its run settings; studies from before versions were recorded are 1).
# 1: 512-row loss chunks, step 0 run by the whole stack. 2: loss chunks by the model's width, step 0 once per budget.
# 3: compiled loss chunks in the two-pass form. 4: attention outside vmap, on any SDPA kernel (cuDNN's on a GPU).
NUMERICS = {1: {"ce_chunk": 512, "share_first_step": False, "ce_two_pass": False, "any_attention_kernel": False},
            2: {"ce_two_pass": False, "any_attention_kernel": False}, 3: {"any_attention_kernel": False}, 4: {}}
LATEST_NUMERICS = max(NUMERICS)


def study_numerics(runtime: dict | None) -> int:
    """The numerics version of a study from its stored run settings (None: a new study, the latest)."""
    return LATEST_NUMERICS if runtime is None else int(runtime.get("numerics", 1))


@dataclass(frozen=True)
class StudyConfig:
    model: str  # "tiny" (the embedded project-made model), a checkpoint folder, or a Hub repo id
    data: str  # "synthetic", a .jsonl/.parquet file, or a Hub dataset id
    x: str = "lr:1e-6:1e-3:log"
    y: str = "tokens:1e3:1e6:log"
    resolution: str = "128"
    optimizer: str = "adamw"
    schedule: str = "linear"
    batch_size: int = 8
    seq_len: int = 1024
    seed: int = 42
    eval_tokens: int = 32768
    trainable: tuple[str, ...] = GROUPS
    divergence_ratio: float = 10.0
    optimizer_state: str = "float32"  # or bfloat16: half the optimizer memory (8 d20 copies on one 80 GB GPU)
    checkpoint_activations: bool = False  # recompute block activations in the backward: less memory
    # values of every hyperparameter that is not an axis (lr, tokens, weight_decay, warmup_ratio, ...)
    fixed: dict = field(default_factory=dict)
    # how the trainer computes (NUMERICS): a run setting taken from the study's store, not part of the config
    numerics: int = LATEST_NUMERICS

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trainable"] = list(self.trainable)
        del d["numerics"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StudyConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["trainable"] = tuple(d.get("trainable", GROUPS))
        return cls(**d)

    def with_overrides(self, **overrides) -> StudyConfig:
        """A copy with every override that is not None applied (the CLI's options over a preset)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def train_config(self, micro_batch_size: int | None = None, compile: bool = False) -> TrainConfig:
        return TrainConfig(
            compile=compile,
            optimizer=self.optimizer,
            schedule=self.schedule,
            batch_size=self.batch_size,
            seq_len=self.seq_len,
            micro_batch_size=micro_batch_size,
            trainable=self.trainable,
            divergence_ratio=self.divergence_ratio,
            optimizer_state_dtype=self.optimizer_state,
            checkpoint_activations=self.checkpoint_activations,
            **NUMERICS[self.numerics],
        )

    def validate(self) -> None:
        """Every problem a user can cause, as one ConfigError naming the option and the fix."""
        x, y = parse_axis_spec(self.x), parse_axis_spec(self.y)
        if x.name == y.name:
            raise ConfigError(f"--x and --y both sweep {x.name!r}; choose two different axes")
        parse_resolution(self.resolution)
        for name in ("batch_size", "seq_len", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        try:
            self.train_config().validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        unknown = set(self.trainable) - set(GROUPS)
        if unknown or not self.trainable:
            raise ConfigError(f"--trainable {','.join(self.trainable)!r}: choose one or more of {', '.join(GROUPS)}")
        if self.optimizer_state not in ("float32", "bfloat16"):
            raise ConfigError(f"--optimizer-state {self.optimizer_state!r}: choose float32 or bfloat16")
        for key, value in self.fixed.items():
            axis = AXES[key]
            if not math.isfinite(value) or (axis.positive and value <= 0) or value < 0 or (
                    axis.hi_max is not None and value > axis.hi_max):
                bound = f"in [0, {axis.hi_max:g}]" if axis.hi_max is not None else (
                    "> 0" if axis.positive else ">= 0")
                raise ConfigError(f"--set {key}={value!r}: {key} must be {bound}")
        swept = {x.name, y.name}
        if "tokens" not in swept and "tokens" not in self.fixed:
            raise ConfigError("no dataset size: sweep `tokens` on an axis or fix it with --set tokens=N")
        if self.optimizer == "adamw" and "lr" not in swept and "lr" not in self.fixed:
            groups = {"embedding_lr", "unembedding_lr", "attn_lr", "mlp_lr"}
            if not (groups <= swept | set(self.fixed)):
                raise ConfigError("no learning rate: sweep `lr` on an axis or fix it with --set lr=VALUE")


PRESETS: dict[str, StudyConfig] = {
    # The flagship study: nanochat-d20 fine-tuned on DocVQA, LR x dataset size, AdamW, 8 x 1024 tokens/step.
    "d20-docvqa": StudyConfig(
        model="nanochat-students/nanochat-d20",
        data="morgan/docvqa-nanochat",
        x="lr:1e-6:1e-3:log",
        y="tokens:1e3:1e6:log",
        resolution="128",
        batch_size=8,
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
        batch_size=4,
        seq_len=64,
        seed=42,
        eval_tokens=4096,
    ),
}


def preset(name: str) -> StudyConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None
