"""How many rows of logits the fused cross-entropy holds at once: a stacked d20 batch timed per chunk size.

    PYTHONPATH=. python benchmarks/ce_chunk.py --chunks 512 2048 --models 4 8
"""

from __future__ import annotations

import argparse
import dataclasses
import gc

import torch

from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.run.bench import time_stacked
from vmap_sweep.train.trainer import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--models", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device("cuda")
    model = GPT(GPTConfig.from_depth(20, vocab_size=65536, sequence_len=1024)).init_weights(0).to(dev)
    for k in args.models:
        # K = 8 fits with checkpointing and bf16 Adam state (benchmarks/RESULTS.md), K = 4 without
        big = k > 4
        base = TrainConfig(rows_per_step=8, seq_len=1024, compile=True, checkpoint_activations=big,
                           optimizer_state_dtype="bfloat16" if big else "float32")
        for chunk in args.chunks:
            cfg = dataclasses.replace(base, ce_chunk=chunk)
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            seconds = time_stacked(model, k, cfg, args.steps, dev)
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"K={k} ce_chunk={chunk}: {seconds / k:.4f} s/cell, {seconds:.3f} s/batch, peak {peak:.1f} GB",
                  flush=True)


if __name__ == "__main__":
    main()
