"""Checks that need a GPU: the memory probe and out-of-memory splitting on d20, and determinism of reruns.

    PYTHONPATH=. python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.run.bench import RandomStream
from vmap_sweep.train.memory import probe_models_per_batch, train_splitting_on_oom
from vmap_sweep.train.trainer import TrainConfig, set_determinism
from vmap_sweep.train.trunk import TrunkTrainer


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    out = {}
    model = GPT(GPTConfig.from_depth(20, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    stream = RandomStream(65536, torch.device("cuda"))
    cfg = TrainConfig(rows_per_step=8, seq_len=1024, micro_batch_size=1)

    start = time.time()
    out["probe_d20_fp32_state"] = probe_models_per_batch(model, cfg, "cuda", limit=16)
    out["probe_seconds"] = time.time() - start
    print("largest models-per-batch for d20 (fp32 state, all trainable, 8x1024 tokens):", out["probe_d20_fp32_state"])

    # Eight d20 models with fp32 state do not fit: the batch is split, and every cell is trained once.
    cells = [{"lr": 1e-5 * (i + 1), "tokens": 2 * 8192} for i in range(8)]
    calls = []

    def train(sub):
        calls.append(len(sub))
        return TrunkTrainer.separate(model, sub, cfg, "cuda").run(stream)

    records = train_splitting_on_oom(train, cells)
    out["oom_split_calls"] = calls
    out["oom_split_cells"] = len(records)
    print("out-of-memory splitting, batch sizes tried:", calls, "cells trained:", len(records))

    # --deterministic: two runs of the same cells give identical trajectories.
    set_determinism(42, True)
    small = GPT(GPTConfig.from_depth(4, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    small_cfg = TrainConfig(rows_per_step=4, seq_len=1024)
    cells = [{"lr": lr, "tokens": 10 * 4096} for lr in (1e-4, 1e-3, 1e-2)]
    a = TrunkTrainer.separate(small, cells, small_cfg, "cuda").run(stream)
    b = TrunkTrainer.separate(small, cells, small_cfg, "cuda").run(stream)
    out["deterministic_rerun_identical"] = all(x.losses == y.losses for x, y in zip(a, b, strict=True))
    print("deterministic rerun identical:", out["deterministic_rerun_identical"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
