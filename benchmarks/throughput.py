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

from vmap_sweep.bench import bench, matmul_peak_tflops
from vmap_sweep.train.trainer import StackedTrainer, TrainConfig

# (label, depth, n_embd, models, tokens/step, micro-batch rows, trainable groups, optimizer state dtype,
#  True to torch.compile the stacked forward or "checkpoint" to recompute activations)
ALL = ("embedding", "unembedding", "attn", "mlp")
NO_EMB = ("unembedding", "attn", "mlp")
CASES = [
    ("small 4x256, 32 stacked", 4, 256, 32, 8192, None, ALL, "float32", False),
    ("small 4x256, 32 stacked, compiled", 4, 256, 32, 8192, 1, ALL, "float32", True),
    ("d20, 1 stacked", 20, None, 1, 8192, None, ALL, "float32", False),
    ("d20, 4 stacked", 20, None, 4, 8192, 2, ALL, "float32", False),
    ("d20, 4 stacked, compiled", 20, None, 4, 8192, 2, ALL, "float32", True),
    ("d20, 4 stacked, 1024 tok/step", 20, None, 4, 1024, None, ALL, "float32", False),
    ("d20, 4 stacked, 1024 tok/step, compiled", 20, None, 4, 1024, None, ALL, "float32", True),
    ("d20, 8 stacked, frozen wte, bf16 state", 20, None, 8, 8192, 1, NO_EMB, "bfloat16", False),
    ("d20, 8 stacked, frozen wte, bf16 state, compiled", 20, None, 8, 8192, 1, NO_EMB, "bfloat16", True),
    ("d20, 4 stacked, whole batch, checkpointed", 20, None, 4, 8192, None, ALL, "float32", "checkpoint"),
    ("d20, 8 stacked, bf16 state, checkpointed", 20, None, 8, 8192, 2, ALL, "bfloat16", "checkpoint"),
]


def gpu_packing_difference(device: str = "cuda") -> float:
    """Max relative difference of one cell's losses alone vs with 3 companions (small model, GPU)."""
    from vmap_sweep.bench import RandomStream
    from vmap_sweep.model.gpt import GPT, GPTConfig

    model = GPT(GPTConfig.from_depth(4, vocab_size=65536, sequence_len=1024)).init_weights(0).to(device)
    stream = RandomStream(65536, torch.device(device))
    cfg = TrainConfig(batch_size=4, seq_len=1024)
    cell = {"lr": 3e-4, "tokens": 20 * 4096}
    alone = StackedTrainer(model, [cell], cfg, device).run(stream)[0].losses
    packed = StackedTrainer(model, [{"lr": 1e-3, "tokens": 4096}, {"lr": 1e-5, "tokens": 40960}, cell,
                                    {"lr": 1e-2, "tokens": 8192}], cfg, device).run(stream)[2].losses
    return max(abs(a - b) / abs(b) for a, b in zip(alone, packed, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="throughput.json")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, for a CPU smoke test")
    ap.add_argument("--no-packing", action="store_true", help="skip the GPU packing-invariance measurement")
    ap.add_argument("--only", default=None, help="run only the cases whose label contains this text")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor()
    env = {"torch": torch.__version__, "device": name, "python": platform.python_version()}
    results = {"env": env, "cases": []}
    if device == "cuda":
        results["matmul_peak_tflops"] = matmul_peak_tflops()
        print(f"measured bf16 matmul peak: {results['matmul_peak_tflops']:.0f} TFLOP/s", flush=True)
    cases = CASES if not args.quick else [("quick", 1, 64, 4, 256, None, ALL, "float32", False)]
    cases = [c for c in cases if args.only is None or args.only in c[0]]
    for label, depth, n_embd, k, tokens, mb, trainable, state, compiled in cases:
        start = time.time()
        try:
            vocab = 65536 if not args.quick else 512
            seq = 1024 if not args.quick else 64
            r = bench(depth, k, tokens_per_step=tokens, seq_len=seq, vocab=vocab, micro_batch_size=mb,
                      device=device, trainable=trainable, n_embd=n_embd, optimizer_state_dtype=state,
                      compile=compiled is True, checkpoint_activations=compiled == "checkpoint").to_dict()
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
    print(f"\n{'case':40s} {'base s/step':>11s} {'stack s/step':>12s} {'speedup':>8s} {'TFLOP/s':>8s} "
          f"{'MFU':>5s} {'mem GB':>7s}")
    for r in results["cases"]:
        if "error" in r:
            print(f"{r['label']:40s} {r['error'][:80]}")
            continue
        mfu = f"{r['stacked_tflops'] / peak:.0%}" if peak else "-"
        print(f"{r['label']:40s} {r['baseline_step_s']:11.4f} {r['stacked_step_s']:12.4f} {r['speedup']:7.2f}x "
              f"{r['stacked_tflops']:8.1f} {mfu:>5s} {r['peak_memory_gb']:7.1f}")
    if "gpu_packing_max_rel_diff" in results:
        print(f"GPU packing invariance: max relative loss difference {results['gpu_packing_max_rel_diff']:.2e}")


if __name__ == "__main__":
    main()
