"""The hyperparameter axes a study can sweep, and parsing of axis specs like ``lr:1e-6:1e-3:log``.

Every cell's hyperparameters are a dict ``{axis_name: value}`` over this registry, so the trainer,
the store and the CLI agree on names and meaning in one place.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from vmap_sweep.errors import ConfigError

Kind = Literal["float", "int"]
Scale = Literal["log", "lin"]
SCALES: tuple[str, ...] = ("log", "lin")


@dataclass(frozen=True)
class Axis:
    """One sweepable hyperparameter. ``positive`` axes need bounds > 0; ``hi_max`` caps the range."""

    name: str
    description: str
    kind: Kind = "float"
    default_scale: Scale = "log"
    positive: bool = True
    hi_max: float | None = None
    per_row: bool = False  # counts tokens in whole rows of seq_len: values are rounded to a multiple of it


def _axes(*axes: Axis) -> dict[str, Axis]:
    return {a.name: a for a in axes}


AXES: dict[str, Axis] = _axes(
    Axis("lr", "base learning rate; applies to all parameter groups unless a more specific axis "
         "(matrix_lr, embedding_lr, unembedding_lr, attn_lr, mlp_lr) overrides it"),
    Axis("matrix_lr", "learning rate of the transformer matrices (attention + MLP weights)"),
    Axis("embedding_lr", "learning rate of the token embedding (transformer.wte)"),
    Axis("unembedding_lr", "learning rate of the output head (lm_head)"),
    Axis("attn_lr", "learning rate of the attention matrices (c_q, c_k, c_v, c_proj); overrides matrix_lr"),
    Axis("mlp_lr", "learning rate of the MLP matrices (c_fc, c_proj); overrides matrix_lr"),
    Axis("tokens", "dataset size N in tokens: the first N tokens of the fixed, seeded training order; "
         "a run takes ceil(N / tokens_per_step) steps", kind="int"),
    Axis("batch_size", "batch size in tokens per optimizer step, whole rows of seq_len tokens (each value is "
         "rounded to a multiple of --seq-len); a cell's data is still its first N tokens, in ceil(N / batch_size) "
         "steps", kind="int", per_row=True),
    Axis("warmup_ratio", "fraction of the run's steps spent in linear learning-rate warmup (0..1)",
         default_scale="lin", positive=False, hi_max=1.0),
    Axis("weight_decay", "decoupled weight decay coefficient (use a lin scale to include 0)",
         positive=False),
)


def axes_help() -> str:
    """A table of the known axes for ``--help`` and error messages."""
    width = max(len(n) for n in AXES)
    lines = ["Axes (spec NAME:MIN:MAX[:log|lin]):"]
    for a in AXES.values():
        lines.append(f"  {a.name:<{width}}  [{a.kind}, {a.default_scale}] {a.description}")
    return "\n".join(lines)


def _known() -> str:
    return ", ".join(AXES)


@dataclass(frozen=True)
class AxisSpec:
    """A range over one axis: ``values(n)`` gives the n grid coordinates (endpoints included)."""

    name: str
    lo: float
    hi: float
    scale: Scale

    def __post_init__(self) -> None:
        spec = str(self)
        if self.name not in AXES:
            raise ConfigError(f"axis spec {spec!r}: unknown axis {self.name!r}; known axes: {_known()}")
        if self.scale not in SCALES:
            raise ConfigError(f"axis spec {spec!r}: unknown scale {self.scale!r}; use 'log' or 'lin'")
        axis = AXES[self.name]
        for b in (self.lo, self.hi):
            if isinstance(b, bool) or not isinstance(b, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(b):
                raise ConfigError(f"axis spec {spec!r}: bound {b!r} is not a finite number; "
                                  "write numbers like 1e-5")
        if self.lo >= self.hi:
            raise ConfigError(f"axis spec {spec!r}: min {self.lo!r} >= max {self.hi!r}; "
                              "give the smaller bound first")
        if self.scale == "log" and self.lo <= 0:
            raise ConfigError(f"axis spec {spec!r}: a log axis needs bounds > 0; "
                              "use a positive min or the 'lin' scale")
        if axis.positive and self.lo <= 0:
            raise ConfigError(f"axis spec {spec!r}: {self.name} must be > 0; use a positive min")
        if self.lo < 0:
            raise ConfigError(f"axis spec {spec!r}: {self.name} can't be negative; use a min >= 0")
        if axis.hi_max is not None and self.hi > axis.hi_max:
            raise ConfigError(f"axis spec {spec!r}: {self.name} must lie in [0, {axis.hi_max:g}]; "
                              f"use a max <= {axis.hi_max:g}")
        object.__setattr__(self, "lo", float(self.lo))
        object.__setattr__(self, "hi", float(self.hi))

    def __str__(self) -> str:
        return f"{self.name}:{self.lo!r}:{self.hi!r}:{self.scale}"

    @property
    def axis(self) -> Axis:
        return AXES[self.name]

    def values(self, n: int, seq_len: int = 1) -> np.ndarray:
        """n float64 coordinates from lo to hi; int axes are rounded (duplicates stay separate cells), a per-row
        axis (batch_size) to whole rows of `seq_len` tokens, at least one."""
        if n < 2:
            raise ConfigError(f"axis {self.name}: resolution {n} < 2; use at least 2 points per axis")
        v = np.geomspace(self.lo, self.hi, n) if self.scale == "log" else np.linspace(self.lo, self.hi, n)
        if self.axis.kind == "int":
            row = seq_len if self.axis.per_row else 1
            v = np.maximum(np.rint(v / row), 1.0 if self.axis.positive else 0.0) * row
        return v.astype(np.float64)

    def convert(self, value: float) -> float | int:
        """A coordinate as the Python type the trainer gets: int for int axes."""
        return int(value) if self.axis.kind == "int" else float(value)

    def to_dict(self) -> dict:
        return {"name": self.name, "lo": self.lo, "hi": self.hi, "scale": self.scale}


def parse_axis_spec(spec: str) -> AxisSpec:
    """Parse ``NAME:MIN:MAX[:SCALE]``, e.g. ``lr:1e-6:1e-3:log`` or ``tokens:1e4:1e7``."""
    parts = [p.strip() for p in str(spec).split(":")]
    if len(parts) not in (3, 4) or not all(parts):
        raise ConfigError(f"axis spec {spec!r} is malformed; write NAME:MIN:MAX[:log|lin], "
                          "e.g. lr:1e-6:1e-3:log")
    name = parts[0]
    if name not in AXES:
        raise ConfigError(f"axis spec {spec!r}: unknown axis {name!r}; known axes: {_known()}")
    bounds: list[float] = []
    for text in parts[1:3]:
        try:
            b = float(text)
        except ValueError:
            raise ConfigError(f"axis spec {spec!r}: {text!r} is not a number; "
                              "write numbers like 1e-5") from None
        bounds.append(b)
    scale = parts[3].lower() if len(parts) == 4 else AXES[name].default_scale
    return AxisSpec(name, bounds[0], bounds[1], scale)  # type: ignore[arg-type]


def check_axis_pair(x: AxisSpec, y: AxisSpec) -> None:
    """The two axes of a study must differ."""
    if x.name == y.name:
        raise ConfigError(f"--x {x} and --y {y} both sweep {x.name!r}: the same axis on x and y; "
                          "choose two different axes")


# 2048^2 = 4.2M cells, far beyond what one GPU trains (128^2 d20 cells: ~6 h); planning more takes minutes
MAX_RESOLUTION = 2048
_RES = re.compile(r"^\s*(\d+)\s*(?:[x×X]\s*(\d+))?\s*$")


def parse_resolution(text: str | int) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"128x64"`` or ``"128×64"`` -> (nx, ny)."""
    m = _RES.match(str(text))
    if not m:
        raise ConfigError(f"resolution {text!r} is malformed; write N or NXxNY, e.g. 128 or 128x64")
    nx = int(m.group(1))
    ny = int(m.group(2)) if m.group(2) is not None else nx
    if nx < 2 or ny < 2:
        raise ConfigError(f"resolution {text!r}: each side must be >= 2; use e.g. 128 or 128x64")
    if max(nx, ny) > MAX_RESOLUTION:
        raise ConfigError(f"resolution {text!r}: at most {MAX_RESOLUTION} per side; zoom in (`vmap-sweep zoom`) "
                          "for finer detail")
    return nx, ny
