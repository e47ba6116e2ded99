"""Learning-rate schedules, evaluated for many cells at once: each cell has its own step count.

They live with the plan because the plan needs them: two cells that differ only in their dataset size share
a trajectory exactly as long as their multipliers agree (study/plan.py, `trunks`).
"""

from __future__ import annotations

import math

import torch

from vmap_sweep.study.config import SCHEDULES


def lr_multiplier(step: int, total_steps: torch.Tensor, warmup_ratio: torch.Tensor, schedule: str) -> torch.Tensor:
    """Multiplier (K,) of each model's base LR at 0-based `step`, given its total steps and warmup ratio.

    Warmup is linear from 1/warmup_steps to 1 over round(warmup_ratio * total) steps; after it, "linear"
    decays to zero at the last step as nanochat's SFT (1 - step / total), "cosine" follows half a cosine.
    "warmup-cosine" is the plan author's: max(1, floor(warmup_ratio * total)) warmup steps, then half a cosine.
    float64, so that the stacked and the single-model run compute the very same numbers.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    total = total_steps.to(torch.float64)
    if schedule == "warmup-cosine":
        warmup = torch.floor(warmup_ratio.to(torch.float64) * total).clamp(min=1)
    else:
        warmup = torch.round(warmup_ratio.to(torch.float64) * total)
    s = torch.full_like(total, float(step))
    warm = torch.where(warmup > 0, torch.clamp((s + 1) / warmup.clamp(min=1), max=1.0), torch.ones_like(total))
    progress = torch.clamp((s - warmup) / (total - warmup).clamp(min=1), min=0.0, max=1.0)
    if schedule == "constant":
        decay = torch.ones_like(total)
    elif schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + torch.cos(math.pi * progress))
    return torch.where(s < warmup, warm, decay)
