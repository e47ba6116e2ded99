"""Where a stacked step's time goes: each part of a d20 step timed alone, then the top CUDA kernels of a run.

    PYTHONPATH=. python benchmarks/profile_step.py --models 4 --micro-batch-size 2 [--compile] [--checkpoint]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vmap_sweep.bench import RandomStream
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig


def timed(fn, reps: int = 3) -> float:
    """Median seconds of fn after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--state", default="float32")
    args = ap.parse_args()
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    cfg = TrainConfig(batch_size=8, seq_len=1024, micro_batch_size=args.micro_batch_size, compile=args.compile,
                      checkpoint_activations=args.checkpoint, optimizer_state_dtype=args.state)
    stream = RandomStream(65536, torch.device("cuda"))
    cells = [{"lr": 1e-5, "tokens": 3 * 8192}] * args.models
    trainer = StackedTrainer(model, cells, cfg, "cuda")
    x, y = (t.cuda() for t in stream.batch(0, 8, 1024))
    w = trainer._loss_weights(0, y)

    def forward_backward():
        for p in trainer.stacked.values():
            p.grad = None
        trainer._forward_backward(x, y, w, with_grad=True)

    parts = {"forward+backward": forward_backward}
    forward_backward()
    ones = torch.ones(args.models, dtype=torch.float64)
    parts["optimizer"] = lambda: trainer._optimizer_step(ones, ones.bool())
    parts["grad norms + finite check"] = lambda: (trainer._grad_norms().cpu(), trainer._weights_finite().cpu())
    parts["forward only (final loss)"] = lambda: trainer._forward_backward(x, y, w, with_grad=False)
    parts["base-model reference"] = lambda: trainer.model.token_losses(x, y, trainer.ce_chunk)
    print(f"{args.models} models, {'compiled' if args.compile else 'eager'}, checkpoint {args.checkpoint}")
    for name, fn in parts.items():
        print(f"  {name:28s} {timed(fn) * 1e3:8.1f} ms", flush=True)
    del trainer
    torch.cuda.empty_cache()

    StackedTrainer(model, cells, cfg, "cuda").run(stream)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    StackedTrainer(model, cells, cfg, "cuda").run(stream)
    torch.cuda.synchronize()
    print(f"a whole run of {args.models} cells: {time.perf_counter() - start:.3f} s wall")
    trainer = StackedTrainer(model, cells, cfg, "cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        trainer.run(stream)
        torch.cuda.synchronize()
        profiled_wall = time.perf_counter() - start
    # host time by operation: where the CPU waits (synchronizations) or launches slowly
    cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    print(f"profiled run {profiled_wall:.3f} s wall; host time by operation:")
    for e in cpu:
        print(f"  {e.self_cpu_time_total / 1e3:9.1f} ms n={e.count:6d}  {e.key[:90]}")
    # kernels only: an aten op's device time is the sum of its kernels, listing both would count twice
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]
    total = sum(e.self_device_time_total for e in events)
    steps = cells[0]["tokens"] // cfg.tokens_per_step
    print(f"GPU kernel time {total / 1e3:.1f} ms for {steps} steps of {args.models} models")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[: args.rows]:
        print(f"{e.self_device_time_total / total:6.1%} {e.self_device_time_total / 1e3:9.1f} ms "
              f"n={e.count:5d}  {e.key[:100]}")


if __name__ == "__main__":
    main()
