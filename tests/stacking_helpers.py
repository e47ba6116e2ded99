"""Small models, a token stream and single-model reference training for the stacked-trainer tests."""

from __future__ import annotations

import copy
import math

import torch

from vmap_sweep.model.gpt import GPT, GPTConfig
from vmap_sweep.train.stack import group_of

VOCAB = 61


def tiny_model(seed: int = 0, n_kv_head: int = 2) -> GPT:
    cfg = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32)
    model = GPT(cfg).init_weights(seed)
    # nanochat's init zeroes lm_head and the output projections; a fine-tune starts from trained weights.
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


class RandomStream:
    """A fixed stream of tokens with some unsupervised targets, batched as the trainer asks."""

    def __init__(self, seed: int = 0, length: int = 20_000):
        gen = torch.Generator().manual_seed(seed)
        # a learnable pattern: next token = (token * 3 + 1) mod VOCAB, with noise
        ids = torch.randint(0, VOCAB, (length,), generator=gen)
        for i in range(1, length):
            if torch.rand((), generator=gen) < 0.8:
                ids[i] = (ids[i - 1] * 3 + 1) % VOCAB
        self.ids = ids
        self.supervised = torch.rand(length, generator=gen) < 0.7

    def batch(self, step: int, batch_size: int, seq_len: int):
        n = batch_size * seq_len
        start = step * n
        pos = (start + torch.arange(n + 1)) % (len(self.ids) - 1)
        ids, sup = self.ids[pos], self.supervised[pos]
        x = ids[:-1].view(batch_size, seq_len)
        y = torch.where(sup[1:], ids[1:], torch.full_like(ids[1:], -1)).view(batch_size, seq_len)
        return x, y


def budget_weights(step: int, tokens: int, targets: torch.Tensor) -> torch.Tensor:
    B, T = targets.shape
    position = step * B * T + torch.arange(B * T).view(B, T)
    valid = (position < tokens) & (targets != -1)
    return valid.float() / valid.sum().clamp(min=1).float()


def reference_adamw(base: GPT, stream, cell: dict, batch_size: int, seq_len: int, divergence_ratio: float,
                    betas=(0.9, 0.95), eps=1e-8, schedule="linear"):
    """One cell trained the ordinary way: its own model and torch.optim.AdamW, one step at a time."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    steps = max(1, math.ceil(cell["tokens"] / (batch_size * seq_len)))
    opt = torch.optim.AdamW(model.parameters(), lr=cell["lr"], betas=betas, eps=eps,
                            weight_decay=cell.get("weight_decay", 0.0), foreach=False)
    losses = []
    for step in range(steps):
        x, y = stream.batch(step, batch_size, seq_len)
        weights = budget_weights(step, cell["tokens"], y)
        loss = model(x, y, weights)
        losses.append(loss.item())
        with torch.no_grad():
            base_loss = base(x, y, weights).item()
        if not math.isfinite(loss.item()) or loss.item() > divergence_ratio * base_loss:
            return losses, model, True
        opt.zero_grad()
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cell["lr"] * ((1 - step / steps) if schedule == "linear" else 1.0)
        opt.step()
    with torch.no_grad():
        x, y = stream.batch(steps - 1, batch_size, seq_len)
        losses.append(model(x, y, budget_weights(steps - 1, cell["tokens"], y)).item())
    return losses, model, False


def newton_schulz_single(g: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


def reference_nanochat(base: GPT, stream, cell: dict, batch_size: int, seq_len: int, ns_dtype=torch.bfloat16):
    """nanochat's SFT optimizer for one model: Muon (a plain loop) on block matrices, AdamW elsewhere."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    steps = max(1, math.ceil(cell["tokens"] / (batch_size * seq_len)))
    s = (model.config.n_embd / 768) ** -0.5
    lr = cell["lr"]
    named = dict(model.named_parameters())
    adam_groups = [
        {"params": [named["transformer.wte.weight"]], "lr": lr * 10 * s, "initial": lr * 10 * s},
        {"params": [named["lm_head.weight"]], "lr": lr * 0.2 * s, "initial": lr * 0.2 * s},
    ]
    adam = torch.optim.AdamW(adam_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0, foreach=False)
    matrices = [p for n, p in named.items() if group_of(n) in ("attn", "mlp")]
    bufs = [torch.zeros_like(p) for p in matrices]
    losses = []
    for step in range(steps):
        x, y = stream.batch(step, batch_size, seq_len)
        loss = model(x, y, budget_weights(step, cell["tokens"], y))
        losses.append(loss.item())
        adam.zero_grad()
        for p in matrices:
            p.grad = None
        loss.backward()
        mult = 1 - step / steps
        for g in adam.param_groups:
            g["lr"] = g["initial"] * mult
        adam.step()
        with torch.no_grad():
            for p, buf in zip(matrices, bufs, strict=True):
                buf.lerp_(p.grad, 1 - 0.95)
                g = p.grad.lerp(buf, 0.95)
                scale = max(1, p.size(0) / p.size(1)) ** 0.5
                p.add_(newton_schulz_single(g, ns_dtype).float(), alpha=-lr * mult * scale)
    return losses, model
