"""How many models fit at once, and what to do when they don't: split the batch, lose nothing."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from vmap_sweep.errors import OutOfMemoryForOneModel
from vmap_sweep.model.gpt import GPT
from vmap_sweep.train.trainer import CellRecord, TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


class _RandomTokens:
    """Random tokens of the study's shape: the probe needs the memory of training, not its data."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def batch(self, step: int, batch_size: int, seq_len: int):
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.vocab, (batch_size, seq_len + 1), generator=gen)
        return x[:, :-1], x[:, 1:]


def _fits(model: GPT, k: int, cfg: TrainConfig, device: torch.device) -> bool:
    """Whether K trunks train and read out here: each lane trains two steps (the second a pass of the whole
    stack: step 0 at the base weights is one model's) and reads out a budget that ends at the last token of step
    1, a one-model branch of the whole batch beside the resident trunks, with its final loss and an eval pass.
    Those are the two peaks of a study's batch, whatever its budgets."""
    tokens = 2 * cfg.tokens_per_step
    lanes = [[{"lr": 1e-6, "tokens": tokens - 1}, {"lr": 1e-6, "tokens": tokens}] for _ in range(k)]
    stream = _RandomTokens(model.config.vocab_size)
    try:
        TrunkTrainer(model, lanes, cfg, device).run(stream, [stream.batch(2, cfg.rows_per_step, cfg.seq_len)])
        fits = True
    except torch.OutOfMemoryError:
        fits = False
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fits


def probe_models_per_batch(model: GPT, cfg: TrainConfig, device: str | torch.device, limit: int = 256,
                           rows_per_step: Sequence[int] = ()) -> int:
    """The largest K (<= limit) whose training step fits in free device memory: doubling, then bisection.

    rows_per_step: those of a study that sweeps its batch size; the probe steps its largest batch (a step's
    activations grow with its rows), so that K fits every batch of the study.

    On CPU there is no memory wall worth probing for; it returns min(limit, 8). The probe runs eager even for a
    compiled study: each K would compile anew, and the compiled step needs less memory than the eager one
    (benchmarks/RESULTS.md), so what fits eager fits compiled.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return min(limit, 8)
    cfg = replace(cfg, compile=False, rows_per_step=max(rows_per_step, default=cfg.rows_per_step))
    if not _fits(model, 1, cfg, device):
        raise OutOfMemoryForOneModel(
            f"not even one model fits in GPU memory at {cfg.tokens_per_step} tokens per step; lower "
            "--micro-batch-size, --seq-len or the batch size"
        )
    lo, hi = 1, 2
    while hi <= limit and _fits(model, hi, cfg, device):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # lo fits, hi doesn't
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(model, mid, cfg, device) else (lo, mid)
    return lo


def train_splitting_on_oom(
    train: Callable[[Sequence[dict]], list[CellRecord]],
    cells: Sequence[dict],
    fitted: Callable[[int], None] | None = None,
) -> list[CellRecord]:
    """train(cells), and on out-of-memory the two halves one after the other, recursively.

    A cell's result does not depend on its batch companions, so splitting changes no result; every cell is
    trained exactly once in the end and the records come back in the order of `cells`.
    """
    try:
        records = train(cells)
        if fitted is not None:
            fitted(len(cells))  # this many models fit: callers can cut later batches to it
        return records
    except torch.OutOfMemoryError:
        pass  # split outside the except block: its traceback still holds the failed batch's tensors
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(cells) == 1:
        raise OutOfMemoryForOneModel(
            "one model does not fit in GPU memory; lower --micro-batch-size or --seq-len, or use a smaller model"
        )
    half = len(cells) // 2
    return train_splitting_on_oom(train, cells[:half], fitted) + train_splitting_on_oom(train, cells[half:], fitted)
