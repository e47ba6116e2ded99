"""What a study will cost before it runs (--dry-run): cells, batches, model-steps, FLOPs and a rough time."""

from __future__ import annotations

import time
from collections.abc import Collection

import torch

from vmap_sweep.data.stream import TokenStream
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import ByteTokenizer, Tokenizer
from vmap_sweep.run.policy import compile_on, resolve_device
from vmap_sweep.run.worker import load_base_model, training_stream
from vmap_sweep.study.config import StudyConfig
from vmap_sweep.study.plan import build_grid, plan_summary, preflight, same_experiments, sharing_summary
from vmap_sweep.study.sizes import Budgets

# The fraction of a bare matmul's rate that training reaches, compiled or eager, counting every model's every
# step: the default d20 study projected from measured batches on an H100 (benchmarks/RESULTS.md), 41% compiled
# (8 models, checkpointed; 49% with 4 whole models, through the CLI), 15% eager.
TRAINING_EFFICIENCY = {True: 0.41, False: 0.15}


def base_model_shape(name: str, tokenizer: str | None = None, revision: str | None = None,
                     model_format: str | None = None) -> tuple[GPTConfig, Tokenizer]:
    """The base model's shape and tokenizer, without pretraining the embedded tiny model."""
    if name == "tiny" and tokenizer is None and revision is None and model_format is None:
        from vmap_sweep.train.tiny import TINY_CONFIG

        return TINY_CONFIG, ByteTokenizer()
    loaded = load_base_model(name, tokenizer, revision, model_format)
    return loaded.config, loaded.tokenizer


def study_stream(cfg: StudyConfig) -> tuple[GPTConfig, TokenStream]:
    """The base model's shape and the study's training order, as a run loads them, without the weights."""
    model_config, tokenizer = base_model_shape(cfg.model, cfg.tokenizer, cfg.model_revision, cfg.model_format)
    return model_config, training_stream(cfg, model_config.sequence_len, tokenizer)


def dry_run(cfg: StudyConfig, models_per_batch: int, device: str, share: bool = True,
            shard: tuple[int, int] | None = None, pending: Collection[tuple[int, int]] | None = None) -> dict:
    """--dry-run: the plan, checked against the model and the data by the run's own checks (study/plan.py, preflight),
    described (describe_plan) with the rows' layout; nothing trains. pending: the (i, j) of a study's cells still
    to train (None: all); the plan is then the batches that hold them, as a resume trains, and `stored` counts
    the plan's cells already stored."""
    dev = resolve_device(device)
    model_config, stream = study_stream(cfg)
    checked = preflight(cfg, build_grid(cfg), stream, shard)
    batches = checked.batches(cfg, models_per_batch, share)
    planned = sum(len(b.cells) for b in batches)
    if pending is not None:
        batches = [b for b in batches if any(c.key in pending for c in b.cells)]
    to_train = sum(c.key in pending for b in batches for c in b.cells) if pending is not None else planned
    if not batches:
        return {"cells": planned, "stored": planned, "to_train": 0, "batches": 0}
    summary = describe_plan(cfg, batches, model_config, dev, checked.budgets)
    summary.update(layout=stream.layout(cfg.seq_len), stored=planned - to_train, to_train=to_train,
                   planned=planned)
    return summary


def flops_per_model_step(model_config: GPTConfig, seq_len: int, tokens_per_step: int) -> float:
    return model_config.flops_per_token(seq_len) * tokens_per_step


def measured_flops_per_second(device: torch.device, rounds: int = 5) -> float:
    """A rough rate for --dry-run: one large matmul in the training dtype, timed here. The best of several rounds:
    a single round swings with whatever else the machine is doing, and so would the estimate."""
    n = 2048 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    (a @ a).sum().item()
    reps, best = 10, 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            b = a @ a
        b.sum().item()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def describe_plan(cfg: StudyConfig, batches: list, model_config: GPTConfig, device: torch.device,
                  budgets: Budgets) -> dict:
    """--dry-run: cells, batches, model-steps, FLOPs and a rough time on this device, and the cells whose
    budgets repeat a smaller one's experiment (`repeats`: {repeated budget: the budget it repeats})."""
    summary = plan_summary(batches, 0.0)
    summary.update(sharing_summary(batches))
    # A batch's step holds its own tokens per step (a study may sweep batch_size; a batch holds one), and what its
    # model-steps leave out: the read-outs off its trunks
    batch_tokens = [cfg.tokens_per_step(b.cells[0].hparams) for b in batches]
    for b, tokens in zip(batches, batch_tokens, strict=True):
        per_step = flops_per_model_step(model_config, cfg.seq_len, tokens)
        summary["flops"] += (plan_summary([b], per_step)["flops"]
                             + sharing_summary([b])["read_out_model_steps"] * per_step)
    # and each cell's eval pass: a forward (a third of a step's work) over the held-out tokens, in steps of the
    # study's --rows-per-step rows, the eval batches' size
    summary["eval_model_steps"] = summary["cells"] * cfg.eval_tokens / cfg.tokens_per_step() / 3
    summary["flops"] += summary["eval_model_steps"] * flops_per_model_step(model_config, cfg.seq_len,
                                                                           cfg.tokens_per_step())
    summary["tokens_per_step"] = sorted(set(batch_tokens))
    rate = measured_flops_per_second(device)
    with torch.device("meta"):  # the model's size decides compilation; no memory for its weights
        compiled = compile_on(device, GPT(model_config))
    summary["seconds_estimate"] = summary["flops"] / (TRAINING_EFFICIENCY[compiled] * rate)
    summary["efficiency"] = TRAINING_EFFICIENCY[compiled]
    summary["device"] = str(device)
    summary["matmul_tflops"] = rate / 1e12
    summary["steps_range"] = (min(min(b.cell_steps) for b in batches), max(max(b.cell_steps) for b in batches))
    cells = [c for b in batches for c in b.cells]  # budgets as stream positions (plan_study)
    same = same_experiments(cells, {size.tokens: size.supervised for size in budgets.sizes.values()}, cfg.schedule,
                            cfg.tokens_per_step())
    budget_of = {size.tokens: n for n, size in budgets.sizes.items()}  # back to the study's unit
    summary["repeated_cells"] = len(same)
    summary["repeats"] = {budget_of[int(c.hparams["tokens"])]: budget_of[int(same[c.key].hparams["tokens"])]
                          for c in cells if c.key in same}
    summary["budget_unit"] = cfg.budget_unit
    return summary
