"""Checks that need a GPU: the memory probe and out-of-memory splitting on d20, determinism of reruns, and the
attention paths of the numerics versions.

    PYTHONPATH=. python benchmarks/gpu_checks.py [--only attention]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.func import functional_call, vmap
from torch.nn.attention import sdpa_kernel

import vmap_sweep.train.trainer as trainer_module
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.run.bench import RandomStream
from vmap_sweep.train.memory import probe_models_per_batch, train_splitting_on_oom
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig, set_determinism


def attention_paths(out: dict) -> None:
    """Attention outside vmap restricted to flash or math (numerics 1-3) equals the in-vmap attention those
    versions ran, bitwise with deterministic kernels, compiled and eager; with any kernel (numerics 4, cuDNN's)
    the losses stay close and finite, and a cell alone and packed differ only by rounding."""
    model = GPT(GPTConfig.from_depth(4, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    stream = RandomStream(65536, torch.device("cuda"))
    cells = [{"lr": 1e-3, "tokens": 4 * 8192}, {"lr": 3e-3, "tokens": 4 * 8192}, {"lr": 1e-4, "tokens": 2 * 8192}]
    outside = trainer_module._block_stage

    def in_vmap(halves, stacked, shared, h, cos, sin, kernels):  # the stage of numerics 1-3 as it was written
        block = model.transformer.h[0]
        stacked = {n: trainer_module._GradInOwnLayout.apply(t) if t.requires_grad else t for n, t in stacked.items()}
        with sdpa_kernel(trainer_module.FLASH_OR_MATH):
            return vmap(lambda p, x: functional_call(block, (p, shared), (x, cos, sin)))(stacked, h)

    def run(stage, any_kernel: bool, deterministic: bool, compile: bool = True, which=cells):
        trainer_module._block_stage = stage
        torch._dynamo.reset()
        torch.use_deterministic_algorithms(deterministic)
        cfg = TrainConfig(batch_size=8, seq_len=1024, compile=compile, any_attention_kernel=any_kernel)
        trainer = StackedTrainer(model, which, cfg, "cuda")
        records = trainer.run(stream, [stream.batch(10**6, 8, 1024)])
        weights = {n: p.detach().clone() for n, p in trainer.stacked.items()}
        return [(r.losses, r.grad_norms, r.eval_loss) for r in records], weights

    try:
        set_determinism(0, True)
        flash = {}
        for compile in (True, False):
            (old, old_w), (new, new_w) = run(in_vmap, False, True, compile), run(outside, False, True, compile)
            same = old == new and all(torch.equal(old_w[n], new_w[n]) for n in old_w)
            out[f"flash_outside_vmap_bitwise_compile_{compile}"] = same
            flash[compile] = new
        any_kernel, _ = run(outside, True, False)
        for compile, reference in flash.items():  # compiled: the kernels alone; eager: compiling's rounding too
            out[f"any_kernel_max_rel_loss_vs_flash_compile_{compile}"] = max(
                abs(a - b) / abs(b) for (la, _, _), (lb, _, _) in zip(any_kernel, reference, strict=True)
                for a, b in zip(la, lb, strict=True))
        alone, _ = run(outside, True, False, which=cells[:1])
        out["any_kernel_alone_vs_packed"] = max(abs(a - b) / abs(b) for a, b in
                                                zip(alone[0][0], any_kernel[0][0], strict=True))
    finally:
        trainer_module._block_stage = outside
        torch.use_deterministic_algorithms(False)
    print("attention paths:", {k: v for k, v in out.items() if "kernel" in k or "vmap" in k}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["attention"], default=None)
    args = ap.parse_args()
    out = {}
    attention_paths(out)
    if args.only == "attention":
        print(json.dumps(out))
        return
    model = GPT(GPTConfig.from_depth(20, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    stream = RandomStream(65536, torch.device("cuda"))
    cfg = TrainConfig(batch_size=8, seq_len=1024, micro_batch_size=1)

    start = time.time()
    out["probe_d20_fp32_state"] = probe_models_per_batch(model, cfg, "cuda", limit=16)
    out["probe_seconds"] = time.time() - start
    print("largest models-per-batch for d20 (fp32 state, all trainable, 8x1024 tokens):", out["probe_d20_fp32_state"])

    # Eight d20 models with fp32 state do not fit: the batch is split, and every cell is trained once.
    cells = [{"lr": 1e-5 * (i + 1), "tokens": 2 * 8192} for i in range(8)]
    calls = []

    def train(sub):
        calls.append(len(sub))
        return StackedTrainer(model, sub, cfg, "cuda").run(stream)

    records = train_splitting_on_oom(train, cells)
    out["oom_split_calls"] = calls
    out["oom_split_cells"] = len(records)
    print("out-of-memory splitting, batch sizes tried:", calls, "cells trained:", len(records))

    # --deterministic: two runs of the same cells give identical trajectories.
    set_determinism(42, True)
    small = GPT(GPTConfig.from_depth(4, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    small_cfg = TrainConfig(batch_size=4, seq_len=1024)
    cells = [{"lr": lr, "tokens": 10 * 4096} for lr in (1e-4, 1e-3, 1e-2)]
    a = StackedTrainer(small, cells, small_cfg, "cuda").run(stream)
    b = StackedTrainer(small, cells, small_cfg, "cuda").run(stream)
    out["deterministic_rerun_identical"] = all(x.losses == y.losses for x, y in zip(a, b, strict=True))
    print("deterministic rerun identical:", out["deterministic_rerun_identical"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
