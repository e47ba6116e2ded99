"""Whole rows of the default d20 study through `vmap-sweep run`, timed, to project the full study from measured
batches, beside the one-at-a-time loop's cells timed in the same process.

    PYTHONPATH=. python benchmarks/study_slice.py --shards 128/128 70/128 50/128 --out study_slice.json
    PYTHONPATH=. python benchmarks/study_slice.py --device cpu --depth 1 --vocab 512 --models-per-batch 32 \
        --shards 128/128 70/128   # a smoke test of this script (2.5 minutes on 2 cores)

The default preset's grid and settings (LR 1e-6…1e-3 × 1K…1M tokens at 128², 8 × 1024 tokens per step, AdamW,
linear decay, 32,768 eval tokens) with a random-init d20 in the project's own format and the byte tokenizer on
the synthetic document-QA set: speed does not depend on the weights or the tokens' values. At 128 shards each
`--shard k/128` is one row of the grid (128 learning rates, one dataset size), the k-th costliest. Each row's
batches are timed by the trainer (stored per cell as wall_time), so a batch of n-step cells costs
a + b (n - 1) seconds, fitted over the rows run (each row's first batch left out: it may compile), and the study
is the sum of that over its batches. The
baseline trains single cells of 1, 5 and 10 steps with the same eval loss pass, compiled, fused AdamW, fitted
the same way and summed over the study's cells.
"""

from __future__ import annotations

import argparse
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
from vmap_sweep.study.plan import build_grid, parse_shard, plan_study, shard_cells, steps_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", nargs="+", default=["128/128", "70/128", "50/128"])
    ap.add_argument("--models-per-batch", type=int, default=4)
    ap.add_argument("--depth", type=int, default=20)
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--device", default="cuda", help="cuda; cpu with a small --depth is a smoke test of this script")
    ap.add_argument("--out", default="study_slice.json")
    ap.add_argument("--work", default=None, help="folder for the model and the studies (default: a temporary one)")
    args = ap.parse_args()
    k = args.models_per_batch
    work = Path(args.work or tempfile.mkdtemp(prefix="study-slice-"))
    cfg = preset("d20-docvqa")
    grid = build_grid(cfg)

    def steps_of(cell) -> int:
        return steps_for(int(cell.hparams["tokens"]), cfg.rows_per_step * cfg.seq_len)

    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    result = {"env": {"torch": torch.__version__, "device": name, "python": platform.python_version()},
              "models_per_batch": k, "rows": []}

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=2))

    model = GPT(GPTConfig.from_depth(args.depth, vocab_size=args.vocab, sequence_len=1024)).init_weights(0)
    model_dir = save_model(work / f"d{args.depth}", model, ByteTokenizer())

    batch_times: list[tuple[int, float]] = []  # (steps, seconds) of every timed batch
    for spec in args.shards:
        n_shard = parse_shard(spec)
        cells = shard_cells(cfg, grid, *n_shard)
        out = work / "study"
        start = time.perf_counter()
        app(["run", "--model", str(model_dir), "--data", "synthetic", "--models-per-batch", str(k), "--shard", spec,
             "--device", device.type, "--out", str(out), "--quiet"], standalone_mode=False)
        wall = time.perf_counter() - start
        with StudyStore.open(out / f"shard-{n_shard[0]}-of-{n_shard[1]}") as store:
            rows = [r for r in store.rows() if r["status"] == "done"]
        by_batch: dict[int, list[dict]] = {}
        for r in rows:
            by_batch.setdefault(r["batch_index"], []).append(r)
        batches = [(max(r["steps"] for r in b), sum(r["wall_time"] for r in b), len(b)) for _, b in
                   sorted(by_batch.items())]
        # a row's first batch may compile graphs it is the first to need (the process's first, every graph; the
        # first row of cells of more than one step, the whole stack's training step): not a batch's cost
        timed = batches[1:]
        batch_times += [(s, t) for s, t, n in timed if n == k]
        row = {"shard": spec, "cells": len(rows), "tokens": sorted({int(c.hparams["tokens"]) for c in cells}),
               "steps": sorted({steps_of(c) for c in cells}), "batches": len(batches), "cli_seconds": wall,
               "batch_seconds": [t for _, t, _ in batches], "first_batch_excluded": True,
               "timed_cells": sum(n for _, _, n in timed), "timed_seconds": sum(t for _, t, _ in timed),
               "unstable": sum(bool(r["unstable"]) for r in rows)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()

    steps, seconds = np.array(batch_times, dtype=float).T
    b, a = np.polyfit(steps - 1, seconds, 1)
    residual = seconds - (a + b * (steps - 1))
    result["stacked_batch_fit"] = {"a": a, "b": b, "max_relative_residual": float(np.max(np.abs(residual) / seconds))}

    # The baseline: a single compiled model, fused AdamW, the same 4 held-out batches per cell.
    stream = RandomStream(args.vocab, device)
    gpu_model = model.to(device)
    eval_batches = cfg.eval_tokens // (cfg.rows_per_step * cfg.seq_len)
    # cells of 1, 5 and 10 steps, the median of 5 each, and a least-squares line: two points alone swing the
    # slope by 10% with the noise of single cells
    base = {n: time_baseline(gpu_model, stream, cfg.rows_per_step, cfg.seq_len, n, device, compile=True, cells=5,
                             eval_batches=eval_batches) for n in (1, 5, 10)}
    base_b, base_a = np.polyfit(np.array(list(base)) - 1.0, np.array(list(base.values())), 1)
    result["baseline_cell"] = {**{f"{n}-step": t for n, t in base.items()}, "a": base_a, "b": base_b,
                               "eval_batches": eval_batches}

    study = plan_study(cfg, grid.cells(), k)
    stacked_s = sum(a + b * (batch.steps - 1) for batch in study)
    baseline_s = sum(base_a + base_b * (steps_of(c) - 1) for c in grid.cells())
    result["study"] = {"cells": len(grid.cells()), "batches": len(study), "stacked_hours": stacked_s / 3600,
                       "baseline_hours": baseline_s / 3600, "speedup": baseline_s / stacked_s}
    for row in result["rows"]:  # each row's timed cells against as many baseline cells of its step count
        (n,) = row["steps"]
        row["baseline_seconds"] = row["timed_cells"] * (base_a + base_b * (n - 1))
        row["speedup"] = row["baseline_seconds"] / row["timed_seconds"]
    save()
    print(json.dumps({key: result[key] for key in ("stacked_batch_fit", "baseline_cell", "study")}, indent=2))


if __name__ == "__main__":
    main()
