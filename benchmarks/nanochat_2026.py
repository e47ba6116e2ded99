"""The 2026 nanochat architecture on a GPU: stacked training equals each cell alone, gradients stay finite under
vmap (its trunk runs whole under vmap, attention on SDPA's math kernel), and a step's time beside a 2025 model of
the same depth and width.

    PYTHONPATH=. python benchmarks/nanochat_2026.py --device cuda --out $OUT/nanochat_2026.json
    PYTHONPATH=. python benchmarks/nanochat_2026.py --device cpu --depth 2 --vocab 512 --seq-len 160 --models 2 \
        --steps 2   # a smoke test of this script

Random weights (scalars near nanochat's init), random tokens: what is measured does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from vmap_sweep.model.gpt import ARCH_2026, GPT, GPTConfig
from vmap_sweep.run.bench import RandomStream
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


def _model(config: GPTConfig, device: torch.device) -> GPT:
    model = GPT(config).init_weights(0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fine-tune starts from trained weights: nothing zero
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.02 if p.ndim == 2 else 0.1))
    return model.to(device)


def _timed_run(model: GPT, cells: list[dict], cfg: TrainConfig, device: torch.device) -> tuple[list, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    records = TrunkTrainer.separate(model, cells, cfg, device).run(RandomStream(model.config.vocab_size, device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return records, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    base = GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=2048)
    new = replace(base, architecture=ARCH_2026, window_pattern="SSSL", rope_base=100000.0)
    cfg = TrainConfig(optimizer="nanochat", schedule="linear", rows_per_step=args.batch_size, seq_len=args.seq_len)
    tokens = args.steps * cfg.tokens_per_step
    cells = [{"lr": 3e-4 * 3**i, "tokens": tokens} for i in range(args.models)]
    out: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                 "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}

    model = _model(new, device)
    stacked, seconds = _timed_run(model, cells, cfg, device)
    alone = [_timed_run(model, [c], cfg, device)[0][0] for c in cells]
    out["finite_losses"] = all(torch.isfinite(torch.tensor(r.losses)).all().item() for r in stacked)
    out["finite_grad_norms"] = all(torch.isfinite(torch.tensor(r.grad_norms)).all().item() for r in stacked)
    out["max_rel_diff_stacked_vs_alone"] = max(
        float(((torch.tensor(s.losses) - torch.tensor(a.losses)).abs() / torch.tensor(a.losses).abs()).max())
        for s, a in zip(stacked, alone, strict=True))
    out["unstable"] = [r.unstable for r in stacked]
    out["seconds_per_model_step_2026"] = seconds / (args.models * args.steps)
    old = _model(base, device)
    _timed_run(old, cells, cfg, device)  # warm-up of the 2025 kernels
    _, seconds = _timed_run(old, cells, cfg, device)
    out["seconds_per_model_step_2025"] = seconds / (args.models * args.steps)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
