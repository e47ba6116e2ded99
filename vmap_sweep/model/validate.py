"""Checks on a model's files before anything is built from them: one place for every checkpoint format.

A config is data from a file, so every field is checked for its type and range, the sizes are checked against
each other (heads divide the width), and then against the tensor shapes the weight files declare, before a
single parameter is allocated. The shapes come from what holds the weights (a safetensors header, a mapped
state dict), so a config can't claim more than the files hold: a vocab of 10^12 or a million layers is refused
from the header in milliseconds instead of asking the allocator for terabytes.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

from vmap_sweep.errors import CheckpointError
from vmap_sweep.model.gpt import (
    ARCH_2026,
    ARCHITECTURES,
    SMEAR_CHANNELS,
    VE_GATE_CHANNELS,
    GPTConfig,
    has_value_embedding,
)

SIZES = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
MAX_WINDOW_PATTERN = 1024  # nanochat's patterns are a few characters ("SSSL"); a longer one is no real config
_LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.")


def parse_json(text: str, where: str | Path) -> object:
    """json.loads for a model file we don't control: invalid or absurdly nested JSON is one CheckpointError line,
    never a JSONDecodeError or RecursionError traceback."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: not valid JSON ({e}); is the file complete?") from None
    except RecursionError:
        raise CheckpointError(
            f"{where}: JSON nested too deeply to be a real file of this kind; the file is corrupt"
        ) from None


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is an int subclass, and a float size is a mistake, not a size


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_config(fields: Mapping[str, object], where: Path, names: Mapping[str, str] | None = None) -> GPTConfig:
    """A GPTConfig from a file's fields (GPTConfig's names; `names` maps them to the file's own spelling for the
    message), each of the right type and range and the sizes consistent with each other."""
    names = names or {}

    def refuse(field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{where}: {names.get(field, field)} {problem}; the config is corrupt")

    known = set(GPTConfig.__dataclass_fields__)
    unknown = sorted(str(k) for k in set(fields) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown model config fields {', '.join(unknown)}; the config is corrupt")
    for field in SIZES:
        if field in fields and not (_is_int(fields[field]) and fields[field] > 0):
            raise refuse(field, f"is {fields[field]!r}, not a positive integer")
    eps = fields.get("norm_eps")
    if eps is not None and not (_is_number(eps) and eps > 0):
        raise refuse("norm_eps", f"is {eps!r}, not a finite number > 0")
    for field in ("rope_base", "softcap"):
        if field in fields and not (_is_number(fields[field]) and fields[field] > 0):
            raise refuse(field, f"is {fields[field]!r}, not a finite number > 0")
    arch = fields.get("architecture", GPTConfig.architecture)
    if arch not in ARCHITECTURES:
        raise refuse("architecture", f"is {arch!r}, not one of {', '.join(ARCHITECTURES)}")
    pattern = fields.get("window_pattern", GPTConfig.window_pattern)
    if not (isinstance(pattern, str) and 0 < len(pattern) <= MAX_WINDOW_PATTERN
            and not set(pattern.upper()) - set("SL")):
        shown = pattern[:40] + "..." if isinstance(pattern, str) and len(pattern) > 40 else pattern
        raise refuse("window_pattern", f"is {shown!r}, not 1 to {MAX_WINDOW_PATTERN} letters S and L")
    if arch != ARCH_2026 and pattern.upper() != "L":
        raise refuse("window_pattern", f"is {pattern!r} but architecture is {arch!r}, which has no sliding windows")
    floats = {f: float(fields[f]) for f in ("norm_eps", "rope_base", "softcap") if fields.get(f) is not None}
    config = GPTConfig(**{**fields, **floats})
    if config.n_embd % config.n_head:
        raise refuse("n_embd", f"{config.n_embd} is not divisible by {names.get('n_head', 'n_head')} {config.n_head}")
    if config.n_head % config.n_kv_head:
        raise refuse("n_head", f"{config.n_head} is not a multiple of {names.get('n_kv_head', 'n_kv_head')} "
                               f"{config.n_kv_head}")
    if config.head_dim % 2:
        raise refuse("n_embd", f"{config.n_embd} over {config.n_head} heads gives head_dim {config.head_dim}, "
                               "which must be even for rotary embeddings")
    if config.is_2026 and config.n_embd < SMEAR_CHANNELS:
        raise refuse("n_embd", f"{config.n_embd} is below the {SMEAR_CHANNELS} channels nanochat's smear gate reads")
    return config


def expected_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of GPT(config) and its shape, computed without building the model."""
    e, hd = config.n_embd, config.head_dim
    shapes = {"transformer.wte.weight": (config.vocab_size, e), "lm_head.weight": (config.vocab_size, e)}
    for i in range(config.n_layer):
        block = f"transformer.h.{i}."
        shapes |= {
            block + "attn.c_q.weight": (config.n_head * hd, e),
            block + "attn.c_k.weight": (config.n_kv_head * hd, e),
            block + "attn.c_v.weight": (config.n_kv_head * hd, e),
            block + "attn.c_proj.weight": (e, e),
            block + "mlp.c_fc.weight": (4 * e, e),
            block + "mlp.c_proj.weight": (e, 4 * e),
        }
    if config.is_2026:
        n, kv = config.n_layer, config.n_kv_head * hd
        shapes |= {"resid_lambdas": (n,), "x0_lambdas": (n,), "smear_gate.weight": (1, SMEAR_CHANNELS),
                   "smear_lambda": (1,), "backout_lambda": (1,)}
        for i in range(n):
            if has_value_embedding(i, n):
                shapes |= {f"value_embeds.{i}.weight": (config.vocab_size, kv),
                           f"transformer.h.{i}.attn.ve_gate.weight": (config.n_kv_head, VE_GATE_CHANNELS)}
    return shapes


VOCAB_MULTIPLE = 64  # nanochat (since December 2025) pads its vocab rows up to a multiple of this


def vocab_rows(keys) -> list[str]:
    """Of a checkpoint's keys, the parameters with one row per token: what nanochat pads. From the keys the file
    holds, not from the config: a config claiming 10^12 layers must cost nothing to look at."""
    return [k for k in keys if k in ("transformer.wte.weight", "lm_head.weight")
            or (k.startswith("value_embeds.") and k.endswith(".weight"))]


def padded_vocab_rows(config: GPTConfig, shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """The padded row count when the weights hold nanochat's padded vocabulary for the config's vocab_size (every
    per-token tensor with vocab_size rounded up to a multiple of 64 rows, and more rows than vocab_size); None
    otherwise, and then check_weights judges the shapes as they are."""
    padded = -(-config.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    keys = vocab_rows(shapes)
    if padded == config.vocab_size or not keys or any(len(shapes[k]) != 2 for k in keys):
        return None
    return padded if all(shapes[k][0] == padded for k in keys) else None


def _names(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def layer_count(keys) -> int:
    """How many blocks (transformer.h.N.) a checkpoint's keys hold."""
    return len({int(m.group(1)) for k in keys if (m := _LAYER_KEY.match(k))})


def check_weights(config: GPTConfig, shapes: Mapping[str, tuple[int, ...]], weights: Path,
                  names: Mapping[str, str] | None = None) -> None:
    """The config against the shapes the weight files declare: same keys, same shapes, and nothing the config
    sizes (the rotary tables) bigger than the weights. Runs before GPT(config) allocates anything."""
    names = names or {}
    layers = layer_count(shapes)
    if config.n_layer != layers:  # first: listing the keys of a million claimed layers takes seconds
        raise CheckpointError(f"{weights}: the config's {names.get('n_layer', 'n_layer')} is {config.n_layer}, "
                              f"the weights hold {layers} layers; weights and config disagree")
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in shapes]
    extra = [k for k in shapes if k not in expected]
    if missing or extra:
        parts = ([f"missing keys {_names(missing)}"] if missing else []) + (
            [f"unexpected keys {_names(extra)}"] if extra else []
        )
        raise CheckpointError(
            f"{weights}: {'; '.join(parts)}; the weights don't match a nanochat model of this config"
        )
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(
                f"{weights}: {key} has shape {tuple(shapes[key])} but the config implies {shape}; "
                "weights and config disagree"
            )
    held = sum(math.prod(s) for s in shapes.values())
    if config.sequence_len * config.head_dim > held:
        raise CheckpointError(
            f"{weights}: the config's {names.get('sequence_len', 'sequence_len')} {config.sequence_len} needs rotary "
            f"tables bigger than the model's {held} weights; the config is corrupt"
        )
