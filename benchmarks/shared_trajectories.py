"""Shared trajectories on the GPU: the default 128 × 128 d20 study under a constant LR, projected from batches of
trunks run through `vmap-sweep run`, beside two rivals timed in the same lease:

(a) one cell at a time: a compiled single model, fused AdamW, reset to the base weights for every cell (cells of
    1, 5 and 10 steps timed, a + b (n - 1) fitted and summed over the study's cells, as study_slice.py does);
(b) the best single-model loop that reuses prefixes: one run per learning rate to the largest budget, read out
    at every budget (a budget that ends inside a step: weights and optimizer state copied into a second model,
    that step taken there on the rows the budget reaches, its final loss and eval loss; a budget that ends on a
    step: the final loss and eval loss of the run itself). One learning rate's whole column is timed and
    multiplied by 128.

    PYTHONPATH=. python benchmarks/shared_trajectories.py --part memory --out memory.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --part rivals --out rivals.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --part check --out check.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --part cli --models-per-batch 4 --out cli.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --part readouts --models-per-batch 3 --out readouts.json
    PYTHONPATH=. python benchmarks/shared_trajectories.py --device cpu --depth 1 --vocab 512 --sizes 8 \
        --models-per-batch 2 --part all   # a smoke test of this script

`--part cli` runs the flagship command on three windows of the grid's learning rates (the lowest 2K, K in the
middle, the highest K: a trunk that diverges early is cheaper, so a steady low-LR batch alone is not the study),
each a `vmap-sweep run` over exactly those grid points, and times every part of each batch on the device
(trunk steps, partial steps, their updates, final-loss passes, eval passes, branch copies) with CUDA events.
The study is projected batch by batch, interpolating between the windows, plus the first batch's compilation.
`--part memory` finds the largest K that the probe (`--models-per-batch auto`) fits for each memory option and
the peak of a batch of that K.

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
from vmap_sweep.run.bench import RandomStream, matmul_peak_tflops, time_baseline
from vmap_sweep.store.db import StudyStore
from vmap_sweep.study.config import preset
from vmap_sweep.study.plan import build_grid, plan_study, same_experiments, sharing_summary, steps_for
from vmap_sweep.train import memory
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def study_config(args):
    cfg = preset("d20-docvqa").with_overrides(schedule="constant")
    return cfg.with_overrides(resolution=str(args.sizes)) if args.sizes != 128 else cfg


class PartTimer:
    """CUDA events around every forward/backward pass, optimizer update and branch copy of a trunk batch, summed
    by the part of the study each serves; no synchronisation until `collect`. A pass's FLOPs by nanochat's
    estimate (a forward is a third of a training step's), for each part's MFU."""

    PASSES = {"_step": "trunk steps", "_branch_gradient": "partial steps", "evaluate": "eval passes",
              "_read_out_branch": "final-loss passes", "_final_losses": "final-loss passes"}

    def __init__(self, flops_per_token: float):
        self.flops_per_token = flops_per_token
        self.events: list[tuple[str, object, object, float]] = []
        self.within: list[str] = []

    def install(self) -> None:
        for cls in (StackedTrainer, TrunkTrainer):
            for name, part in self.PASSES.items():
                if name in vars(cls):
                    self._label(cls, name, part)
        self._time(StackedTrainer, "_forward_backward", None)
        self._time(StackedTrainer, "_optimizer_step", "updates ({})")
        self._time(TrunkTrainer, "_load_branch", "branch copies")

    def _label(self, cls, name: str, part: str) -> None:
        """Passes inside `name` count for `part`."""
        real = getattr(cls, name)

        def labelled(this, *args, **kwargs):
            self.within.append(part)
            try:
                return real(this, *args, **kwargs)
            finally:
                self.within.pop()

        setattr(cls, name, labelled)

    def _time(self, cls, name: str, part: str | None) -> None:
        """Events around `name`; part None: a pass, counted for the part it serves, with its FLOPs."""
        real = getattr(cls, name)

        def timed(this, *args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = real(this, *args, **kwargs)
            end.record()
            flops = 0.0
            if part is None:
                inputs, weights = args[0], args[2]
                rows = args[5] if len(args) > 5 else kwargs.get("rows")
                with_grad = args[3] if len(args) > 3 else kwargs["with_grad"]
                tokens = (inputs.shape[0] if rows is None else rows) * inputs.shape[1] * weights.shape[0]
                flops = tokens * self.flops_per_token * (1.0 if with_grad else 1 / 3)
            context = self.within[-1] if self.within else "other passes"
            label = context if part is None else part.format(context)
            self.events.append((label, start, end, flops))
            return result

        setattr(cls, name, timed)

    def collect(self) -> dict:
        torch.cuda.synchronize()
        parts: dict[str, dict] = {}
        for part, start, end, flops in self.events:
            p = parts.setdefault(part, {"seconds": 0.0, "flops": 0.0, "calls": 0})
            p["seconds"] += start.elapsed_time(end) / 1e3
            p["flops"] += flops
            p["calls"] += 1
        self.events.clear()
        return parts


def _grid_lrs(cfg) -> list[float]:
    return [c.hparams["lr"] for c in build_grid(cfg).cells() if c.j == 0]


def part_cli(args, device, result) -> None:
    """The flagship command over three windows of the grid's learning rates; each batch timed by parts."""
    work = Path(tempfile.mkdtemp(prefix="shared-"))
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=1024)).init_weights(0)
    model_dir = save_model(work / f"d{args.depth}", model, ByteTokenizer())
    cfg = study_config(args)
    k, lrs = args.models_per_batch, _grid_lrs(cfg)
    n = len(lrs)
    windows = {"low": (0, min(n, 2 * k)), "high": (n - k, n), "middle": (n // 2 - k // 2, n // 2 - k // 2 + k)}
    timer = PartTimer(model.config.flops_per_token(1024)) if device.type == "cuda" else None
    if timer:
        timer.install()
    peak = matmul_peak_tflops() if device.type == "cuda" else float("nan")
    out = {"models_per_batch": k, "matmul_peak_tflops": peak, "windows": {}}
    for name, (lo, hi) in windows.items():
        x = f"lr:{lrs[lo]!r}:{lrs[hi - 1]!r}:log"
        folder = work / name
        cmd = ["run", "--model", str(model_dir), "--data", "synthetic", "--schedule", "constant", "--x", x,
               "--resolution", f"{hi - lo}x{args.sizes}", "--models-per-batch", str(k), "--device", device.type,
               "--out", str(folder), "--quiet", *args.cli_options]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        app(cmd, standalone_mode=False)
        wall = time.perf_counter() - start
        with StudyStore.open(folder) as store:
            rows = [r for r in store.rows() if r["status"] == "done"]
        batches: dict[int, list[dict]] = {}
        for r in rows:
            batches.setdefault(r["batch_index"], []).append(r)
        seconds = [sum(r["wall_time"] for r in b) for _, b in sorted(batches.items())]
        parts = timer.collect() if timer else {}
        for p in parts.values():
            p["mfu"] = p["flops"] / p["seconds"] / 1e12 / peak if p["seconds"] and p["flops"] else None
        out["windows"][name] = {
            "command": "vmap-sweep " + " ".join(cmd), "lr_indices": [lo, hi], "cells": len(rows),
            "batch_seconds": seconds, "cli_seconds": wall, "unstable": sum(bool(r["unstable"]) for r in rows),
            "parts": parts,
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else None}
        print(json.dumps({name: out["windows"][name]}), flush=True)
    # the study batch by batch: K learning rates each, interpolated between the windows' steady batches
    w = out["windows"]
    points = [((windows["low"][0] + windows["low"][1] - 1) / 2, w["low"]["batch_seconds"][-1]),
              ((windows["middle"][0] + windows["middle"][1] - 1) / 2, w["middle"]["batch_seconds"][-1]),
              ((windows["high"][0] + windows["high"][1] - 1) / 2, w["high"]["batch_seconds"][-1])]
    centres = [(b * k + min(n, b * k + k) - 1) / 2 for b in range(-(-n // k))]
    per_batch = np.interp(centres, [p[0] for p in points], [p[1] for p in points])
    compile_extra = w["low"]["batch_seconds"][0] - w["low"]["batch_seconds"][-1]
    plan = plan_study(cfg, build_grid(cfg).cells(), k)
    out["projection"] = {"batches": len(per_batch), "steady_seconds": float(per_batch.sum()),
                         "compile_seconds": compile_extra,
                         "study_hours": (float(per_batch.sum()) + compile_extra) / 3600, "plan": sharing_summary(plan)}
    result["cli"] = out
    print(json.dumps(out["projection"]), flush=True)


def part_readouts(args, device, result) -> None:
    """What a read-out costs with and without its eval pass: the highest K learning rates of the grid (one batch of
    K trunks, read out at all the grid's budgets) run through `vmap-sweep run` three times in one process, with
    --eval-tokens 0 (compiling), with the study's eval tokens, and with --eval-tokens 0 again. The per-read-out
    difference is the eval pass that a refinement's level (which takes none by default) does not pay."""
    work = Path(tempfile.mkdtemp(prefix="readouts-"))
    timer = PartTimer(1.0) if device.type == "cuda" else None
    if timer:
        timer.install()
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=1024)).init_weights(0)
    model_dir = save_model(work / f"d{args.depth}", model, ByteTokenizer())
    cfg = study_config(args)
    k, lrs = args.models_per_batch, _grid_lrs(cfg)
    x = f"lr:{lrs[-k]!r}:{lrs[-1]!r}:log"
    runs = []
    experiments = _experiments(cfg.with_overrides(x=x, resolution=f"{k}x{args.sizes}"))
    for n, eval_tokens in enumerate(args.readout_evals or (0, cfg.eval_tokens, 0)):
        folder = work / f"run{n}"
        cmd = ["run", "--model", str(model_dir), "--data", "synthetic", "--schedule", "constant", "--x", x,
               "--resolution", f"{k}x{args.sizes}", "--models-per-batch", str(k), "--device", device.type,
               "--eval-tokens", str(eval_tokens), "--out", str(folder), "--quiet", *args.cli_options]
        start = time.perf_counter()
        app(cmd, standalone_mode=False)
        wall = time.perf_counter() - start
        with StudyStore.open(folder) as store:
            rows = [r for r in store.rows() if r["status"] == "done"]
        plan = sharing_summary(plan_study(cfg.with_overrides(x=x, resolution=f"{k}x{args.sizes}"),
                                          build_grid(cfg.with_overrides(x=x, resolution=f"{k}x{args.sizes}")).cells(),
                                          k))
        parts = {name: p["seconds"] for name, p in timer.collect().items()} if timer else {}
        trunk = parts.get("trunk steps", 0.0) + parts.get("updates (trunk steps)", 0.0)
        readouts = sum(r["wall_time"] for r in rows) - trunk
        runs.append({"parts": parts, "trunk_seconds": trunk, "experiments": experiments,
                     "readout_seconds": readouts / len(rows) if timer else None,
                     "readout_seconds_per_experiment": readouts / experiments if timer else None,
                     "command": "vmap-sweep " + " ".join(cmd), "eval_tokens": eval_tokens, "cells": len(rows),
                     "batch_seconds": sum(r["wall_time"] for r in rows), "cli_seconds": wall, "plan": plan,
                     "with_eval_loss": sum(r["eval_loss"] is not None and r["eval_loss"] == r["eval_loss"]
                                               for r in rows)})
        print(json.dumps(runs[-1]), flush=True)
    result["readouts"] = {"models_per_batch": k, "runs": runs}
    timed = runs[1:]  # the first run compiles
    with_eval = [r["batch_seconds"] for r in timed if r["eval_tokens"]]
    without = [r["batch_seconds"] for r in timed if not r["eval_tokens"]]
    if with_eval and without:
        result["readouts"] |= {"eval_seconds_per_cell": (with_eval[-1] - without[-1]) / runs[1]["cells"],
                               "batch_ratio_without_eval": without[-1] / with_eval[-1]}
    print(json.dumps({n: v for n, v in result["readouts"].items() if n != "runs"}), flush=True)


def _experiments(cfg) -> int:
    """The distinct experiments among a grid's cells: budgets holding as many answer targets of the synthetic set
    (byte tokenizer, the preset's layout) are one experiment (study/plan.py `same_experiments`)."""
    from refine_cost import stand_in_supervised

    cells = build_grid(cfg).cells()
    held = stand_in_supervised(cfg, levels=0)
    return len(cells) - len(same_experiments(cells, held, cfg.schedule, cfg.tokens_per_step()))


def part_memory(args, device, result) -> None:
    """For each memory option: the largest K the probe fits (`--models-per-batch auto`) and a batch's peak there."""
    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=1024)).init_weights(0)
    rows = []
    for ckpt, state in ((False, "float32"), (False, "bfloat16"), (True, "float32"), (True, "bfloat16")):
        cfg = TrainConfig(schedule="constant", rows_per_step=8, seq_len=1024, checkpoint_activations=ckpt,
                          optimizer_state_dtype=state)
        start = time.perf_counter()
        try:
            k = memory.probe_models_per_batch(model, cfg, device, limit=args.memory_limit)
        except Exception as e:  # noqa: BLE001 - a row of the table either way
            rows.append({"checkpoint_activations": ckpt, "optimizer_state": state, "error": str(e)})
            continue
        probe_s = time.perf_counter() - start
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            memory._fits(model, k, cfg, device)
            peak = torch.cuda.max_memory_allocated() / 1e9
        rows.append({"checkpoint_activations": ckpt, "optimizer_state": state, "models": k, "peak_gb": peak,
                     "probe_seconds": probe_s})
        print(json.dumps(rows[-1]), flush=True)
    total = torch.cuda.get_device_properties(0).total_memory / 1e9 if device.type == "cuda" else None
    result["memory"] = {"device_memory_gb": total, "rows": rows}


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
        """The mean loss over the first n positions (all: None), the full-logit path a user would write, on only
        the rows those positions reach."""
        if n is not None:
            rows = -(-n // seq_len)
            x, y = x[:rows], y[:rows]
            y = torch.where(torch.arange(y.numel(), device=y.device).view_as(y) < n, y, -1)
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
    eval_batches = cfg.eval_tokens // (cfg.rows_per_step * cfg.seq_len)
    base = {n: time_baseline(model, stream, cfg.rows_per_step, cfg.seq_len, n, device, compile=True, cells=3,
                             eval_batches=eval_batches) for n in (1, 5, 10)}
    b, a = np.polyfit(np.array(list(base)) - 1.0, np.array(list(base.values())), 1)
    steps = [steps_for(int(c.hparams["tokens"]), cfg.rows_per_step * cfg.seq_len) for c in grid.cells()]
    one_at_a_time = sum(a + b * (s - 1) for s in steps)
    budgets = sorted({int(c.hparams["tokens"]) for c in grid.cells()})
    prefix_loop(model, stream, budgets[: len(budgets) // 4], cfg.rows_per_step, cfg.seq_len, eval_batches, device)
    column = prefix_loop(model, stream, budgets, cfg.rows_per_step, cfg.seq_len, eval_batches, device)
    result["rivals"] = {"one_at_a_time_cell": {f"{n}-step": t for n, t in base.items()}, "a": a, "b": b,
                        "one_at_a_time_hours": one_at_a_time / 3600, "prefix_loop_column_seconds": column,
                        "prefix_loop_hours": column * grid.nx / 3600}
    print(json.dumps(result["rivals"]), flush=True)


def part_check(args, device, result) -> None:
    """Read-outs against cells trained alone on this device: the largest relative difference of any loss."""
    model = GPT(GPTConfig.from_depth(4, vocab_size=args.vocab, sequence_len=1024)).init_weights(0).to(device)
    stream = RandomStream(args.vocab, device)
    cfg = TrainConfig(schedule="constant", rows_per_step=8, seq_len=1024, compile=device.type == "cuda")
    budgets = [3000, 8192, 12000, 20000, 5 * 8192, 45000]
    lanes = [[{"lr": lr, "tokens": n} for n in budgets] for lr in (1e-4, 1e-3)]
    held_out = [stream.batch(10**6, 8, 1024)]
    got = TrunkTrainer(model, lanes, cfg, device).run(stream, held_out)
    worst = 0.0
    for rec, hp in zip(got, [hp for lane in lanes for hp in lane], strict=True):
        alone = TrunkTrainer.separate(model, [hp], cfg, device).run(stream, held_out)[0]
        pairs = [*zip(rec.losses, alone.losses, strict=True), (rec.eval_loss, alone.eval_loss)]
        worst = max(worst, *(abs(x - y) / abs(y) for x, y in pairs))
    result["check"] = {"cells": len(got), "max_relative_difference": worst}
    print(json.dumps(result["check"]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["memory", "cli", "rivals", "check", "readouts", "all"], default="all")
    ap.add_argument("--memory-limit", type=int, default=16, help="the largest K the memory part tries")
    ap.add_argument("--models-per-batch", type=int, default=4)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--sizes", type=int, default=128, help="grid resolution (128: the default study)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--readout-evals", type=int, nargs="+", default=None,
                    help="readouts: the --eval-tokens of each run, in order; the first compiles (default: 0, the "
                         "study's, 0)")
    ap.add_argument("--cli-options", nargs="*", default=[], help="more `vmap-sweep run` options")
    ap.add_argument("--out", default="shared_trajectories.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    result = {"env": {"torch": torch.__version__, "device": name, "python": platform.python_version()},
              "models_per_batch": args.models_per_batch, "depth": args.depth}
    for part, fn in (("memory", part_memory), ("check", part_check), ("rivals", part_rivals), ("cli", part_cli),
                     ("readouts", part_readouts)):
        if args.part in (part, "all"):
            fn(args, device, result)
            Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
