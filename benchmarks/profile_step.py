"""Where a stacked step's time goes: each part of a d20 step timed alone, then the top CUDA kernels of a run;
with --baseline, the kernels of the compiled single-model loop doing the same model-steps, by kind, beside them.

    PYTHONPATH=. python benchmarks/profile_step.py --models 4 --micro-batch-size 2 [--compile] [--checkpoint]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.run.bench import RandomStream
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


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
    ap.add_argument("--baseline", action="store_true", help="also profile the compiled single-model loop")
    args = ap.parse_args()
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=65536, sequence_len=1024)).init_weights(0).cuda()
    cfg = TrainConfig(rows_per_step=8, seq_len=1024, micro_batch_size=args.micro_batch_size, compile=args.compile,
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

    TrunkTrainer.separate(model, cells, cfg, "cuda").run(stream)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    TrunkTrainer.separate(model, cells, cfg, "cuda").run(stream)
    torch.cuda.synchronize()
    print(f"a whole run of {args.models} cells: {time.perf_counter() - start:.3f} s wall")
    trainer = TrunkTrainer.separate(model, cells, cfg, "cuda")
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
    steps = cells[0]["tokens"] // cfg.tokens_per_step
    print(f"{steps} steps of {args.models} models, top kernels:")
    print(f"GPU kernel time {_top(_kernels(prof), args.rows) / 1e3:.1f} ms")
    if args.baseline:
        del trainer, prof
        torch.cuda.empty_cache()
        stacked = profile_stacked_steps(model, stream, cfg, cells, steps, args.rows)
        torch.cuda.empty_cache()
        single = profile_single(model, stream, cfg, steps * args.models, args.rows)
        print(f"GPU kernel time by kind, ms: {steps} steps of {args.models} stacked vs {steps * args.models} "
              "single-model steps")
        for kind in sorted(set(single) | set(stacked), key=lambda k: -single.get(k, 0)):
            print(f"  {kind:22s} {stacked.get(kind, 0) / 1e3:9.1f} {single.get(kind, 0) / 1e3:9.1f}")


# Kernel kinds by name, first match wins: torch.compile's Triton kernels are named after the ops they fuse
# ("_to_copy", "reduce" ...), so they are told apart by their prefix first; attention kernels name cutlass and
# sm90 in their templates, so they come before matmuls.
KINDS = [("compiled (Triton)", ("triton_",)), ("attention", ("flash", "fmha", "sdpa")),
         ("matmul", ("gemm", "nvjet", "cutlass", "cublas")), ("optimizer", ("adam", "multi_tensor_apply")),
         ("copy or cast", ("copy",)), ("reduction", ("reduce",))]


def by_kind(events) -> dict[str, float]:
    """Kernel time (us) by kind, from the kernel's name; "other" is the rest (eager element-wise kernels)."""
    out: dict[str, float] = {}
    for e in events:
        name = e.key.lower()
        kind = next((k for k, needles in KINDS if any(name.startswith(n) if n == "triton_" else n in name
                                                      for n in needles)), "other")
        out[kind] = out.get(kind, 0.0) + e.self_device_time_total
    return out


def _kernels(prof) -> list:
    """Kernel events only: an aten op's device time is the sum of its kernels, listing both would count twice."""
    return [e for e in prof.key_averages() if e.self_device_time_total > 0 and not e.key.startswith("aten::")]


def _top(events, rows: int) -> float:
    """Prints the `rows` longest kernels; returns the total kernel time (us)."""
    total = sum(e.self_device_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        print(f"{e.self_device_time_total / total:6.1%} {e.self_device_time_total / 1e3:9.1f} ms "
              f"n={e.count:5d}  {e.key[:100]}")
    return total


def _profiled(run, steps: int, rows: int, what: str) -> dict[str, float]:
    """Kernel time by kind of run(steps), after run(2) (compiles, warms the allocator); prints the top kernels."""
    run(2)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run(steps)
        wall = time.perf_counter() - start
    events = _kernels(prof)
    print(f"{what} in {wall:.3f} s wall")
    print(f"GPU kernel time {_top(events, rows) / 1e3:.1f} ms")
    return by_kind(events)


def profile_stacked_steps(model: GPT, stream, cfg: TrainConfig, cells, steps: int, rows: int) -> dict[str, float]:
    """The stacked trainer's steady steps alone (forward and backward, the per-model statistics, the update)."""
    trainer = StackedTrainer(model, cells, cfg, "cuda")
    ones = torch.ones(len(cells), dtype=torch.float64)

    def run(n):
        for step in range(n):
            x, y = (t.cuda() for t in stream.batch(step, cfg.rows_per_step, cfg.seq_len))
            for p in trainer.stacked.values():
                p.grad = None
            trainer._forward_backward(x, y, trainer._loss_weights(step, y), with_grad=True).cpu()
            trainer._grad_norms().cpu()
            trainer._optimizer_step(ones, ones.bool())
            trainer._weights_finite().cpu()
        torch.cuda.synchronize()

    return _profiled(run, steps, rows, f"stacked steady steps: {steps} steps of {len(cells)} models")


def profile_single(model: GPT, stream, cfg: TrainConfig, steps: int, rows: int) -> dict[str, float]:
    """The baseline loop's kernels over `steps` steps: a compiled single model, bf16 autocast, fused AdamW."""
    import copy

    m = copy.deepcopy(model)
    for p in m.parameters():
        p.requires_grad_(True)
    forward = torch.compile(m)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)

    def run(n):
        for step in range(n):
            x, y = stream.batch(step, cfg.rows_per_step, cfg.seq_len)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(x.cuda(), y.cuda())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    return _profiled(run, steps, rows, f"single model, compiled: {steps} steps")


if __name__ == "__main__":
    main()
