"""Where a stacked step's time goes: the top CUDA kernels of one d20 step (attention, matmuls, optimizer).

    PYTHONPATH=. python benchmarks/profile_step.py --models 4
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from vmap_sweep.bench import RandomStream
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    args = ap.parse_args()
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    cfg = TrainConfig(batch_size=8, seq_len=1024, micro_batch_size=args.micro_batch_size)
    stream = RandomStream(65536, torch.device("cuda"))
    cells = [{"lr": 1e-5, "tokens": 3 * 8192}] * args.models
    StackedTrainer(model, cells, cfg, "cuda").run(stream)  # warm-up
    trainer = StackedTrainer(model, cells, cfg, "cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.run(stream)
        torch.cuda.synchronize()
    # kernels only: an aten op's device time is the sum of its kernels, listing both would count twice
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    total = sum(e.self_device_time_total for e in events)
    steps = cells[0]["tokens"] // cfg.tokens_per_step
    print(f"GPU kernel time {total / 1e3:.1f} ms for {steps} steps of {args.models} models")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]:
        print(f"{e.self_device_time_total / total:6.1%} {e.self_device_time_total / 1e3:9.1f} ms  {e.key[:110]}")


if __name__ == "__main__":
    main()
