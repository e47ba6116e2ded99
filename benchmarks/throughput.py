"""Stacked vs one-at-a-time on the GPU: every size of the issue in one run, a table at the end.

    PYTHONPATH=. python benchmarks/throughput.py --out results.json [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback

import torch

from vmap_sweep.run.bench import bench, matmul_peak_tflops
from vmap_sweep.train.trainer import TrainConfig
from vmap_sweep.train.trunk import TrunkTrainer

# Every case: the stacked trainer against the best one-at-a-time loop on the same model, tokens and cells.
# Defaults: d20 (n_embd None), 8 x 1024 tokens per step, cells of 5 steps, everything trainable, float32 Adam
# state, the whole batch at once, compiled (the CLI's default on a GPU).
ALL = ("embedding", "unembedding", "attn", "mlp")
NO_EMB = ("unembedding", "attn", "mlp")
DEFAULTS = dict(depth=20, n_embd=None, models=4, tokens=8192, steps=5, mb=None, trainable=ALL, state="float32",
                compile=True, checkpoint=False, ckpt_blocks=None)
CASES = [
    ("d20, K=1", dict(models=1)),
    ("d20, K=4, micro-batches of 2, eager", dict(mb=2, compile=False)),
    ("d20, K=4, micro-batches of 2", dict(mb=2)),
    ("d20, K=4, whole batch", dict()),
    ("d20, K=4, whole batch, 1-step cells", dict(steps=1)),
    ("d20, K=4, whole batch, 10-step cells", dict(steps=10)),
    ("d20, K=4, checkpointed", dict(checkpoint=True)),
    ("d20, K=8, checkpointed, bf16 state, 5-step cells", dict(models=8, state="bfloat16", checkpoint=True)),
    ("d20, K=8, 16 of 20 blocks checkpointed, bf16 state", dict(models=8, state="bfloat16", checkpoint=True,
                                                               ckpt_blocks=16)),
    ("d20, K=8, checkpointed, bf16 state, micro-batches of 4", dict(models=8, mb=4, state="bfloat16",
                                                                    checkpoint=True)),
    ("d20, K=8, checkpointed, bf16 state, 4-step cells", dict(models=8, state="bfloat16", checkpoint=True, steps=4)),
    ("d20, K=8, checkpointed, bf16 state, 10-step cells", dict(models=8, state="bfloat16", checkpoint=True,
                                                              steps=10)),
    ("d20, K=8, checkpointed, bf16 state, 1-step cells", dict(models=8, state="bfloat16", checkpoint=True, steps=1)),
    ("d20, K=8, checkpointed, bf16 state, 1024 tokens/step", dict(models=8, tokens=1024, state="bfloat16",
                                                                  checkpoint=True)),
    ("small 4x256, K=32", dict(depth=4, n_embd=256, models=32)),
    ("small 4x256, K=32, eager", dict(depth=4, n_embd=256, models=32, compile=False)),
]


def gpu_packing_difference(device: str = "cuda") -> float:
    """Max relative difference of one cell's losses alone vs with 3 companions (small model, GPU)."""
    from vmap_sweep.model.gpt import GPT, GPTConfig
    from vmap_sweep.run.bench import RandomStream

    model = GPT(GPTConfig.from_depth(4, vocab_size=65536, sequence_len=1024)).init_weights(0).to(device)
    stream = RandomStream(65536, torch.device(device))
    cfg = TrainConfig(rows_per_step=4, seq_len=1024)
    cell = {"lr": 3e-4, "tokens": 20 * 4096}
    alone = TrunkTrainer.separate(model, [cell], cfg, device).run(stream)[0].losses
    packed = TrunkTrainer.separate(model, [{"lr": 1e-3, "tokens": 4096}, {"lr": 1e-5, "tokens": 40960}, cell,
                                    {"lr": 1e-2, "tokens": 8192}], cfg, device).run(stream)[2].losses
    return max(abs(a - b) / abs(b) for a, b in zip(alone, packed, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="throughput.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a CPU smoke test")
    ap.add_argument("--no-packing", action="store_true", help="skip the GPU packing-invariance measurement")
    ap.add_argument("--only", default=None, help="run only the cases whose label contains one of A|B|...")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    env = {"torch": torch.__version__, "device": name, "python": platform.python_version()}
    results = {"env": env, "cases": []}
    if device == "cuda":
        results["matmul_peak_tflops"] = matmul_peak_tflops()
        print(f"measured bf16 matmul peak: {results['matmul_peak_tflops']:.0f} TFLOP/s", flush=True)
    cases = CASES if not args.quick else [("quick", dict(depth=1, n_embd=64, tokens=256, compile=False))]
    cases = [c for c in cases if args.only is None or any(o in c[0] for o in args.only.split("|"))]
    for label, overrides in cases:
        c = {**DEFAULTS, **overrides}
        start = time.time()
        try:
            vocab = 65536 if not args.quick else 512
            seq = 1024 if not args.quick else 64
            r = bench(c["depth"], c["models"], tokens_per_step=c["tokens"], seq_len=seq, vocab=vocab,
                      micro_batch_size=c["mb"], steps=c["steps"], device=device, trainable=c["trainable"],
                      n_embd=c["n_embd"], optimizer_state_dtype=c["state"], compile=c["compile"],
                      checkpoint_activations=c["checkpoint"], checkpoint_blocks=c["ckpt_blocks"]).to_dict()
            r["label"] = label
            results["cases"].append(r)
            print(f"{label}: {json.dumps(r)} ({time.time() - start:.0f}s)", flush=True)
        except Exception as e:  # one case that does not fit must not lose the others
            results["cases"].append({"label": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"{label}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    if device == "cuda" and not args.quick and not args.no_packing:
        results["gpu_packing_max_rel_diff"] = gpu_packing_difference()
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    peak = results.get("matmul_peak_tflops")
    print(f"\n{'case':50s} {'base s/cell':>11s} {'stack s/cell':>12s} {'speedup':>8s} {'TFLOP/s':>8s} "
          f"{'MFU':>5s} {'mem GB':>7s}")
    for r in results["cases"]:
        if "error" in r:
            print(f"{r['label']:50s} {r['error'][:80]}")
            continue
        mfu = f"{r['stacked_tflops'] / peak:.0%}" if peak else "-"
        print(f"{r['label']:50s} {r['baseline_cell_s']:11.4f} {r['stacked_cell_s']:12.4f} {r['speedup']:7.2f}x "
              f"{r['stacked_tflops']:8.1f} {mfu:>5s} {r['peak_memory_gb']:7.1f}")
    if "gpu_packing_max_rel_diff" in results:
        print(f"GPU packing invariance: max relative loss difference {results['gpu_packing_max_rel_diff']:.2e}")


if __name__ == "__main__":
    main()
