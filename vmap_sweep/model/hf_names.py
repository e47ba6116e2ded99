"""Parameter names in the Hugging Face transformers NanoChat layout and ours: one table, read both ways."""

from __future__ import annotations

import re

# ours <-> transformers'; {} is a layer number
_NAMES = [
    ("transformer.wte.weight", "model.embed_tokens.weight"),
    ("transformer.h.{}.attn.c_q.weight", "model.layers.{}.self_attn.q_proj.weight"),
    ("transformer.h.{}.attn.c_k.weight", "model.layers.{}.self_attn.k_proj.weight"),
    ("transformer.h.{}.attn.c_v.weight", "model.layers.{}.self_attn.v_proj.weight"),
    ("transformer.h.{}.attn.c_proj.weight", "model.layers.{}.self_attn.o_proj.weight"),
    ("transformer.h.{}.mlp.c_fc.weight", "model.layers.{}.mlp.fc1.weight"),
    ("transformer.h.{}.mlp.c_proj.weight", "model.layers.{}.mlp.fc2.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _rule(source: str, target: str) -> tuple[re.Pattern[str], str]:
    return re.compile(re.escape(source).replace(r"\{\}", r"(\d+)")), target.replace("{}", r"\1")


_TO_OURS = [_rule(hf, ours) for ours, hf in _NAMES]
_TO_HF = [_rule(ours, hf) for ours, hf in _NAMES]


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, replacement in rules:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    return None


def ours(key: str) -> str:
    """Our name for a transformers parameter name; an unknown one unchanged, so the strict load reports it as the
    file spells it."""
    return _rename(key, _TO_OURS) or key


def transformers_name(key: str) -> str | None:
    """The transformers name of one of our parameters; None for a parameter nanochat lacks."""
    return _rename(key, _TO_HF)
