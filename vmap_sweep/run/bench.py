"""Throughput of stacked training against the one-at-a-time loop, side by side in one process.

The baseline is what a nanochat or Hugging Face user would run for each cell: one model, bf16 autocast,
torch.optim.AdamW(fused=True), the plain cross-entropy over full logits, torch.compile where it is faster.
Both sides train the same random-init model of nanochat's shape on the same random tokens with the same
tokens per step, and both are timed for whole cells: setting up the weights and the optimizer, the steps,
the loss after the last update.
"""

from __future__ import annotations

import copy
import gc
import time
from dataclasses import asdict, dataclass

import torch

from vmap_sweep.errors import ConfigError
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.study.config import GROUPS
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


@dataclass
class BenchResult:
    depth: int
    n_embd: int
    params: int
    models: int
    tokens_per_step: int
    micro_batch_size: int | None
    trainable: tuple[str, ...]
    optimizer_state_dtype: str
    compile: bool
    checkpoint_activations: bool
    checkpoint_blocks: int | None
    steps: int  # steps per cell
    baseline_cell_s: float  # one whole cell one at a time: weights reset, optimizer, steps, final loss
    stacked_cell_s: float  # a whole batch of K such cells over K
    speedup: float  # cells per hour, stacked over baseline
    baseline_step_s: float  # the baseline's cell time over its steps
    stacked_step_s: float  # the stacked batch's time over its steps (all K models)
    stacked_tflops: float
    baseline_tflops: float
    peak_memory_gb: float  # CUDA's peak allocated memory of the stacked run; nan where not measured (a CPU)
    baseline_variants: dict  # seconds per cell (or why it failed) of each plain-loop variant tried

    def to_dict(self) -> dict:
        return asdict(self)


class RandomStream:
    def __init__(self, vocab: int, device: torch.device):
        self.vocab, self.device = vocab, device

    def batch(self, step: int, batch_size: int, seq_len: int):
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, self.vocab, (batch_size, seq_len + 1), generator=gen)
        return x[:, :-1], x[:, 1:]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_baseline(model: GPT, stream, batch_size: int, seq_len: int, steps: int, device: torch.device,
                  micro_batch_size: int | None = None, compile: bool = False, cells: int = 3,
                  eval_batches: int = 0) -> float:
    """Seconds per cell of the plain single-model loop, as a user fine-tunes one cell after another: reset the
    weights to the base model's, a fresh fused AdamW, `steps` steps, the loss after the last update, and the
    loss on `eval_batches` held-out batches (a study's eval loss). Median of `cells` cells after a warm-up
    cell (which compiles)."""
    m = copy.deepcopy(model).to(device)
    base_state = {n: t.clone() for n, t in m.state_dict().items()}
    for p in m.parameters():
        p.requires_grad_(True)
    forward = torch.compile(m) if compile else m
    mb = micro_batch_size or batch_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for _ in range(cells + 1):
        _sync(device)
        start = time.perf_counter()
        m.load_state_dict(base_state)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=device.type == "cuda")
        for step in range(steps):
            x, y = (t.to(device) for t in stream.batch(step, batch_size, seq_len))
            for r in range(0, batch_size, mb):
                with autocast:
                    loss = forward(x[r:r + mb], y[r:r + mb]) * (min(mb, batch_size - r) / batch_size)
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast:
            forward(x, y).item()
            for b in range(eval_batches):  # steps past any cell's, standing in for held-out tokens
                forward(*(t.to(device) for t in stream.batch(10**6 + b, batch_size, seq_len))).item()
        _sync(device)
        times.append(time.perf_counter() - start)
        del opt
    del m, forward, base_state
    _free(device)
    return sorted(times[1:])[len(times[1:]) // 2]


_BASELINES: dict[tuple, tuple[float, dict]] = {}


def best_baseline(model: GPT, stream, batch_size: int, seq_len: int, steps: int, device: torch.device,
                  micro_batch_size: int | None) -> tuple[float, dict]:
    """The fastest plain loop we can find (whole batch or micro-batches, eager or torch.compile'd), measured
    once per model shape and cell in this process."""
    key = (model.config, batch_size, seq_len, steps, device.type, micro_batch_size)
    if key in _BASELINES:
        return _BASELINES[key]
    tried = {}
    for name, mb, comp in [("eager", None, False), ("eager, micro-batches", micro_batch_size, False),
                           ("compiled", None, True)]:
        if name.endswith("micro-batches") and (mb is None or isinstance(tried.get("eager"), float)):
            continue
        try:
            tried[name] = time_baseline(model, stream, batch_size, seq_len, steps, device, mb, comp)
        except Exception as e:  # out of memory, or a compile that fails: that variant is not the best one
            tried[name] = f"{type(e).__name__}: {str(e)[:120]}"
            _free(device)
    times = [t for t in tried.values() if isinstance(t, float)]
    if not times:
        raise RuntimeError(f"no baseline variant ran: {tried}")
    _BASELINES[key] = (min(times), tried)
    return _BASELINES[key]


def time_stacked(model: GPT, k: int, cfg: TrainConfig, steps: int, device: torch.device) -> float:
    """Seconds of a whole batch of K cells of `steps` steps (stacking, training, final loss), timed on a second
    run after a warm-up run of the same shapes. Between the two, as between a study's batches, the base model's
    reference losses stay cached and so does the allocator's memory: emptying it would make the timed run pay
    for cudaMalloc of every buffer again, which neither a study nor the baseline loop does."""
    stream = RandomStream(model.config.vocab_size, device)
    cells = [{"lr": 1e-5 * (i + 1), "tokens": steps * cfg.tokens_per_step} for i in range(k)]
    elapsed, base_cache = 0.0, {}
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        trainer = TrunkTrainer.separate(model, cells, cfg, device, base_cache)
        records = trainer.run(stream)
        _sync(device)
        elapsed = time.perf_counter() - start
        # A model that diverges stops early and would make the stack look faster than it is.
        bad = [i for i, r in enumerate(records) if r.unstable or r.steps_done != steps]
        if bad:
            raise RuntimeError(f"models {bad} did not train all {steps} steps (diverged); the timing would be wrong")
        del trainer, records
        gc.collect()
    return elapsed


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# Bytes per parameter of one stacked model before any activation: float32 weights and gradients, and AdamW's two
# moments in the optimizer state's dtype.
_STATE_BYTES = {"float32": 8, "bfloat16": 4}


def memory_floor(params: int, models: int, optimizer_state_dtype: str = "float32") -> int:
    """Bytes the stacked phase needs at least: the base model's weights and, per stacked model, weights, gradients
    and optimizer state (activations come on top)."""
    return params * (4 + models * (8 + _STATE_BYTES.get(optimizer_state_dtype, 8)))


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device now (CUDA: the driver's count; CPU: the kernel's MemAvailable); None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(gcfg: GPTConfig, models: int, optimizer_state_dtype: str, device: torch.device) -> None:
    """Refuse a benchmark whose weights, gradients and optimizer state alone exceed the device's free memory,
    before anything is allocated (a d20 with 4 models needs ~36 GB: more than most laptops have)."""
    with torch.device("meta"):
        params = sum(p.numel() for p in GPT(gcfg).parameters())
    need, free = memory_floor(params, models, optimizer_state_dtype), free_memory(device)
    if free is not None and need > free:
        raise ConfigError(f"bench: {models} stacked copies of a {params / 1e6:.0f}M-parameter model (depth "
                          f"{gcfg.n_layer}) need at least {need / 2**30:.1f} GiB for weights, gradients and optimizer "
                          f"state, and the {device.type} has {free / 2**30:.1f} GiB free; use a smaller --depth or "
                          "--models-per-batch, or --optimizer-state bfloat16")


def bench(depth: int, models: int, tokens_per_step: int = 8192, seq_len: int = 1024, vocab: int = 65536,
          micro_batch_size: int | None = None, steps: int = 5, device: str = "cuda",
          trainable: tuple[str, ...] = GROUPS, n_embd: int | None = None,
          optimizer_state_dtype: str = "float32", compile: bool = False,
          checkpoint_activations: bool = False, checkpoint_blocks: int | None = None) -> BenchResult:
    dev = torch.device(device)
    overrides = {"vocab_size": vocab, "sequence_len": seq_len}
    if n_embd is not None:
        overrides.update(n_embd=n_embd, n_head=max(1, n_embd // 128), n_kv_head=max(1, n_embd // 128))
    gcfg = GPTConfig.from_depth(depth, **overrides)
    check_memory(gcfg, models, optimizer_state_dtype, dev)
    model = GPT(gcfg).init_weights(0).to(dev)
    rows = tokens_per_step // seq_len
    tcfg = TrainConfig(rows_per_step=rows, seq_len=seq_len, micro_batch_size=micro_batch_size, trainable=trainable,
                       optimizer_state_dtype=optimizer_state_dtype, compile=compile,
                       checkpoint_activations=checkpoint_activations, checkpoint_blocks=checkpoint_blocks)
    stream = RandomStream(vocab, dev)
    _free(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stacked_batch = time_stacked(model, models, tcfg, steps, dev)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else float("nan")
    base_cell, variants = best_baseline(model, stream, rows, seq_len, steps, dev, micro_batch_size)
    del model
    _free(dev)
    flops = gcfg.flops_per_token(seq_len) * tokens_per_step
    stacked_step = stacked_batch / steps
    return BenchResult(
        depth=depth, n_embd=gcfg.n_embd, params=sum(p.numel() for p in GPT(gcfg).to("meta").parameters()),
        models=models, tokens_per_step=tokens_per_step, micro_batch_size=micro_batch_size,
        trainable=tuple(trainable), optimizer_state_dtype=optimizer_state_dtype, compile=compile,
        checkpoint_activations=checkpoint_activations, checkpoint_blocks=checkpoint_blocks, steps=steps,
        baseline_cell_s=base_cell,
        stacked_cell_s=stacked_batch / models, speedup=base_cell / (stacked_batch / models),
        baseline_step_s=base_cell / steps, stacked_step_s=stacked_step,
        stacked_tflops=models * flops / stacked_step / 1e12, baseline_tflops=flops * steps / base_cell / 1e12,
        peak_memory_gb=peak, baseline_variants=variants,
    )


def matmul_peak_tflops(device: str = "cuda", n: int = 8192) -> float:
    """The measured bf16 matmul rate: the ceiling MFU is reported against."""
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(dev)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
