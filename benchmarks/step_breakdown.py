"""Where one stacked d20 step spends its time, part by part (synchronized wall clock), and the top aten ops
by GPU time with their input shapes.

    PYTHONPATH=. python benchmarks/step_breakdown.py --models 4
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from vmap_sweep.bench import RandomStream
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig


def timed(label: str, fn, results: dict):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    results[label] = results.get(label, 0.0) + time.perf_counter() - start
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    model = GPT(GPTConfig.from_depth(20, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    cfg = TrainConfig(batch_size=8, seq_len=1024, micro_batch_size=args.micro_batch_size)
    stream = RandomStream(65536, torch.device("cuda"))
    cells = [{"lr": 1e-5 * (i + 1), "tokens": 100 * 8192} for i in range(args.models)]
    t = StackedTrainer(model, cells, cfg, "cuda")
    active = torch.ones(args.models, dtype=torch.bool)
    parts: dict[str, float] = {}
    for step in range(args.steps + 1):
        if step == 1:
            parts.clear()  # the first step warms up
        x, y = (v.cuda() for v in stream.batch(step, 8, 1024))
        w = t._loss_weights(step, y)
        for p in t.stacked.values():
            p.grad = None
        timed("base-model reference forward", partial(t._base_losses, x, y, w), parts)
        timed("stacked forward + backward", partial(t._forward_backward, x, y, w, with_grad=True), parts)
        timed("grad norms", t._grad_norms, parts)
        timed("optimizer", partial(t._optimizer_step, step, active), parts)
        timed("finite-weights check", t._weights_finite, parts)
    for label, seconds in parts.items():
        print(f"{seconds / args.steps * 1e3:9.1f} ms/step  {label}")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], record_shapes=True) as prof:
        t._forward_backward(x, y, w, with_grad=True)
        torch.cuda.synchronize()
    table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cuda_time_total", row_limit=18,
                                                                max_name_column_width=40, max_shapes_column_width=70)
    print(table)


if __name__ == "__main__":
    main()
