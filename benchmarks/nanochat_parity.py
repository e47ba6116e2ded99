"""Logits of nanochat's own GPT (its source, from a checkout) against vmap-sweep's loader on the same checkpoint,
for the current (2026) architecture: nanochat builds and initializes a model, perturbs every weight, saves it as
its checkpoint_manager.save_checkpoint does (model_XXXXXX.pt = state_dict with padded vocab rows, meta_XXXXXX.json
with model_config = asdict(GPTConfig)), and both forwards run on the same tokens in float32 on the CPU.

    git clone https://github.com/karpathy/nanochat /tmp/nanochat
    PYTHONPATH=. python benchmarks/nanochat_parity.py --nanochat /tmp/nanochat

nanochat's package imports its Rust tokenizer (rustbpe) only through modules this script does not import.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = [  # (window_pattern, n_layer, n_head, n_kv_head, n_embd, tokens)
    ("SSSL", 4, 4, 2, 64, 300), ("SL", 3, 2, 1, 64, 200), ("L", 2, 4, 4, 64, 64), ("SSL", 5, 4, 4, 128, 257)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanochat", type=Path, required=True, help="a checkout of karpathy/nanochat")
    parser.add_argument("--vocab", type=int, default=276, help="tokens (nanochat pads the rows to a multiple of 64)")
    args = parser.parse_args()
    os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, str(args.nanochat))
    from nanochat.gpt import GPT, GPTConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import TIKTOKEN_VOCAB, write_tokenizer_pkl

    from vmap_sweep.model.checkpoint import load_model

    vocab = max(args.vocab, TIKTOKEN_VOCAB)
    results = []
    torch.manual_seed(0)
    for pattern, n_layer, n_head, n_kv_head, n_embd, T in SHAPES:
        cfg = GPTConfig(sequence_len=512, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head,
                        n_embd=n_embd, window_pattern=pattern)
        with torch.device("meta"):
            model = GPT(cfg)
        model.to_empty(device="cpu")
        model.init_weights()
        with torch.no_grad():  # trained-looking: nothing zero, scalars away from their init
            for p in model.parameters():
                p.add_(torch.randn_like(p) * (0.3 if p.ndim < 2 else 0.05))
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            torch.save(model.state_dict(), folder / "model_000100.pt")
            meta = {"step": 100, "model_config": dataclasses.asdict(cfg)}
            (folder / "meta_000100.json").write_text(json.dumps(meta))
            write_tokenizer_pkl(folder / "tokenizer.pkl")
            ours = load_model(folder).model
        ids = torch.randint(0, vocab, (2, T))
        targets = ids.roll(-1, 1)
        with torch.no_grad():
            ref, got = model(ids), ours(ids)
            ref_loss, loss = model(ids, targets).item(), ours(ids, targets).item()
        results.append({"window_pattern": pattern, "n_layer": n_layer, "n_head": n_head, "n_kv_head": n_kv_head,
                        "n_embd": n_embd, "tokens": T, "padded_rows": model.lm_head.weight.shape[0],
                        "max_abs_diff": (ref - got).abs().max().item(), "bitwise": torch.equal(ref, got),
                        "loss_nanochat": ref_loss, "loss_ours": loss})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
