"""Stacking K copies of a model's parameters along a leading model dimension, by parameter group."""

from __future__ import annotations

import torch
from torch import nn

from vmap_sweep.study.config import GROUPS

# The 2026 architecture's per-layer scalars and smear gate: nanochat tunes them with learning rates of their own,
# which no study axis sets, so a fine-tune holds them at their trained values (shared, never stacked).
HELD_2026 = ("resid_lambdas", "x0_lambdas", "smear_gate.weight", "smear_lambda", "backout_lambda")
HELD = "held"  # their group, never trainable


def group_of(name: str) -> str:
    """The parameter group of a nanochat parameter name; each group has its own per-model learning rate. The 2026
    architecture's value embeddings are embeddings, its value-embedding gates part of attention."""
    if name == "transformer.wte.weight" or (name.startswith("value_embeds.") and name.endswith(".weight")):
        return "embedding"
    if name in HELD_2026:
        return HELD
    if name == "lm_head.weight":
        return "unembedding"
    if ".attn." in name:
        return "attn"
    if ".mlp." in name:
        return "mlp"
    raise ValueError(f"parameter {name!r} belongs to no known group")


def split_params(
    model: nn.Module, k: int, trainable: tuple[str, ...], dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(stacked, frozen): trainable parameters copied K times along dim 0; frozen ones once, shared.

    Every copy starts from the same base weights. Stacked tensors are leaves that require grad.
    """
    unknown = set(trainable) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown trainable groups {sorted(unknown)}; choose from {GROUPS}")
    stacked, frozen = {}, {}
    for name, p in model.named_parameters():
        base = p.detach().to(dtype)
        if group_of(name) in trainable:
            stacked[name] = base.unsqueeze(0).repeat(k, *([1] * base.ndim)).requires_grad_(True)
        else:
            frozen[name] = base
    return stacked, frozen


def unstack(stacked: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One model's full state dict out of a stack."""
    state = {name: t[index].detach().clone() for name, t in stacked.items()}
    state.update({name: t.detach().clone() for name, t in frozen.items()})
    return state
