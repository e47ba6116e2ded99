"""Shared trajectories on the GPU: the default 128 × 128 d20 study under a constant LR, projected from batches of
trunks run through `vmap-sweep run`, beside two rivals timed in the same process:

(a) one cell at a time: a compiled single model, fused AdamW, reset to the base weights for every cell (cells of
    1, 5 and 10 steps timed, a + b (n - 1) fitted and summed over the study's cells, as study_slice.py does);
(b) the best single-model loop that reuses prefixes: one run per learning rate to the largest budget, read out
    at every budget (a budget that ends inside a step: weights and optimizer state copied into a second model,
    that step taken there, its final loss and eval loss; a budget that ends on a step: the final loss and eval
    loss of the run itself). One learning rate's whole column is timed and multiplied by 128.

    PYTHONPATH=. python benchmarks/shared_trajectories.py --part cli --out shared_cli.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --part rivals --out shared_rivals.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --part check --out shared_check.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --device cpu --depth 1 --vocab 512 --sizes 8 \
        --part all   # a smoke test of this script

Random-init d20 in the project's own format, the byte tokenizer and the synthetic document-QA set (speed does
not depend on the weights or the tokens' values). `--part check` compares read-outs with cells trained alone
on this device (a 4-layer model): the GPU's packing tolerance.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vmap_sweep.cli import app
from vmap_sweep.model.checkpoint import save_model
from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.model.tokenizer import ByteTokenizer
from vmap_sweep.run.bench import RandomStream, time_baseline
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import preset
from vmap_sweep.study.plan import build_grid, plan_study, sharing_summary, steps_for
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def study_config(args):
    cfg = preset("d20-docvqa").with_overrides(schedule="constant")
    return cfg.with_overrides(resolution=str(args.sizes)) if args.sizes != 128 else cfg


def part_cli(args, device, result) -> None:
    """Two batches of trunks through the CLI: the first compiles, the second is the study's steady batch."""
    work = Path(tempfile.mkdtemp(prefix="shared-"))
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=1024)).init_weights(0)
    model_dir = save_model(work / f"d{args.depth}", model, ByteTokenizer())
    cfg = study_config(args)
    k, n = args.models_per_batch, args.sizes
    shards = n // (2 * k)  # a shard of 2K learning rates: two batches of K trunks
    cmd = ["run", "--model", str(model_dir), "--data", "synthetic", "--schedule", "constant", "--resolution", str(n),
           "--models-per-batch", str(k), "--shard", f"1/{shards}", "--device", device.type, "--out",
           str(work / "study"), "--quiet", *args.cli_options]
    start = time.perf_counter()
    app(cmd, standalone_mode=False)
    wall = time.perf_counter() - start
    with StudyStore.open(work / "study" / f"shard-1-of-{shards}") as store:
        rows = [r for r in store.rows() if r["status"] == "done"]
    batches: dict[int, list[dict]] = {}
    for r in rows:
        batches.setdefault(r["batch_index"], []).append(r)
    seconds = [sum(r["wall_time"] for r in b) for _, b in sorted(batches.items())]
    plan = plan_study(cfg, build_grid(cfg).cells(), k)
    result["cli"] = {"command": "vmap-sweep " + " ".join(cmd[:1] + cmd[3:]), "cells": len(rows),
                     "batch_seconds": seconds, "cli_seconds": wall, "study_batches": len(plan),
                     "plan": sharing_summary(plan), "diverged": sum(bool(r["diverged"]) for r in rows),
                     "study_hours": len(plan) * seconds[-1] / 3600}
    print(json.dumps(result["cli"]), flush=True)


def prefix_loop(model: GPT, stream, budgets: list[int], batch_size: int, seq_len: int, eval_batches: int,
                device: torch.device, lr: float = 1e-5) -> float:
    """Rival (b) for one learning rate: seconds for its whole column of budgets."""
    tps = batch_size * seq_len
    trunk, branch = copy.deepcopy(model).to(device), copy.deepcopy(model).to(device)
    for p in [*trunk.parameters(), *branch.parameters()]:
        p.requires_grad_(True)
    run, side = torch.compile(trunk), torch.compile(branch)
    opt = torch.optim.AdamW(trunk.parameters(), lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    side_opt = torch.optim.AdamW(branch.parameters(), lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    held_out = [tuple(t.to(device) for t in stream.batch(10**6 + b, batch_size, seq_len)) for b in range(eval_batches)]

    def loss_of(forward, x, y, n=None):
        """The mean loss over the first n positions (all: None), the full-logit path a user would write."""
        y = y if n is None else torch.where(torch.arange(y.numel(), device=y.device).view_as(y) < n, y, -1)
        with autocast:
            return forward(x, y)

    def read_out(forward, x, y, n=None):
        with torch.no_grad():
            loss_of(forward, x, y, n).item()
            for hx, hy in held_out:
                loss_of(forward, hx, hy).item()

    ends = {}
    for n in budgets:
        ends.setdefault(steps_for(n, tps) - 1, []).append(n - (steps_for(n, tps) - 1) * tps)
    _sync(device)
    start = time.perf_counter()
    for step in range(max(ends) + 1):
        x, y = (t.to(device) for t in stream.batch(step, batch_size, seq_len))
        for r in sorted(ends.get(step, [])):
            if r == tps:
                continue
            branch.load_state_dict(trunk.state_dict())
            side_opt.load_state_dict(opt.state_dict())
            loss_of(side, x, y, r).backward()
            side_opt.step()
            side_opt.zero_grad(set_to_none=True)
            read_out(side, x, y, r)
        loss_of(run, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if tps in ends.get(step, []):
            read_out(run, x, y)
    _sync(device)
    return time.perf_counter() - start


def part_rivals(args, device, result) -> None:
    cfg = study_config(args)
    grid = build_grid(cfg)
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=1024)).init_weights(0)
    stream = RandomStream(args.vocab, device)
    eval_batches = cfg.eval_tokens // (cfg.batch_size * cfg.seq_len)
    base = {n: time_baseline(model, stream, cfg.batch_size, cfg.seq_len, n, device, compile=True, cells=3,
                             eval_batches=eval_batches) for n in (1, 5, 10)}
    b, a = np.polyfit(np.array(list(base)) - 1.0, np.array(list(base.values())), 1)
    steps = [steps_for(int(c.hparams["tokens"]), cfg.batch_size * cfg.seq_len) for c in grid.cells()]
    one_at_a_time = sum(a + b * (s - 1) for s in steps)
    budgets = sorted({int(c.hparams["tokens"]) for c in grid.cells()})
    prefix_loop(model, stream, budgets[: len(budgets) // 4], cfg.batch_size, cfg.seq_len, eval_batches, device)
    column = prefix_loop(model, stream, budgets, cfg.batch_size, cfg.seq_len, eval_batches, device)
    result["rivals"] = {"one_at_a_time_cell": {f"{n}-step": t for n, t in base.items()}, "a": a, "b": b,
                        "one_at_a_time_hours": one_at_a_time / 3600, "prefix_loop_column_seconds": column,
                        "prefix_loop_hours": column * grid.nx / 3600}
    print(json.dumps(result["rivals"]), flush=True)


def part_check(args, device, result) -> None:
    """Read-outs against cells trained alone on this device: the largest relative difference of any loss."""
    model = GPT(GPTConfig.from_depth(4, vocab_size=args.vocab, sequence_len=1024)).init_weights(0).to(device)
    stream = RandomStream(args.vocab, device)
    cfg = TrainConfig(schedule="constant", batch_size=8, seq_len=1024, compile=device.type == "cuda")
    budgets = [3000, 8192, 12000, 20000, 5 * 8192, 45000]
    lanes = [[{"lr": lr, "tokens": n} for n in budgets] for lr in (1e-4, 1e-3)]
    held_out = [stream.batch(10**6, 8, 1024)]
    got = TrunkTrainer(model, lanes, cfg, device).run(stream, held_out)
    worst = 0.0
    for rec, hp in zip(got, [hp for lane in lanes for hp in lane], strict=True):
        alone = StackedTrainer(model, [hp], cfg, device).run(stream, held_out)[0]
        pairs = [*zip(rec.losses, alone.losses, strict=True), (rec.eval_loss, alone.eval_loss)]
        worst = max(worst, *(abs(x - y) / abs(y) for x, y in pairs))
    result["check"] = {"cells": len(got), "max_relative_difference": worst}
    print(json.dumps(result["check"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["cli", "rivals", "check", "all"], default="all")
    ap.add_argument("--models-per-batch", type=int, default=4)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--sizes", type=int, default=128, help="grid resolution (128: the default study)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--cli-options", nargs="*", default=[], help="more `vmap-sweep run` options")
    ap.add_argument("--out", default="shared_trajectories.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    result = {"env": {"torch": torch.__version__, "device": name, "python": platform.python_version()},
              "models_per_batch": args.models_per_batch, "depth": args.depth}
    for part, fn in (("cli", part_cli), ("rivals", part_rivals), ("check", part_check)):
        if args.part in (part, "all"):
            fn(args, device, result)
            Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
