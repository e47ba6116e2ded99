"""Optimizers on stacked tensors: every tensor has a leading model dimension K, every hyperparameter is (K,).

Each update is written out of place and committed with torch.where(active, new, old), so a model that is
frozen (finished, or diverged with NaN in its gradients) keeps its weights and optimizer state bit for bit:
multiplying by a 0/1 mask would turn NaN * 0 into NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# nanochat's Newton-Schulz quintic coefficients
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def _per_model(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(K,) -> (K, 1, 1, ...) broadcastable against a stacked tensor."""
    return x.reshape(-1, *([1] * (like.ndim - 1))).to(like.device)


@dataclass
class AdamWHparams:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class StackedAdamW:
    """torch.optim.AdamW's update, per model: its own lr and weight decay, its own step count."""

    def __init__(self, params: dict[str, torch.Tensor], hp: AdamWHparams):
        self.params, self.hp = params, hp
        self.exp_avg = {n: torch.zeros_like(p) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in params.items()}
        k = next(iter(params.values())).shape[0]
        self.steps = torch.zeros(k, dtype=torch.float64)

    @torch.no_grad()
    def step(self, lrs: dict[str, torch.Tensor], weight_decay: torch.Tensor, active: torch.Tensor) -> None:
        """lrs[name]: (K,) float64 learning rate of each model for that tensor; active: (K,) bool."""
        beta1, beta2 = self.hp.betas
        self.steps = torch.where(active, self.steps + 1, self.steps)
        t = self.steps.clamp(min=1)
        bias1 = 1 - beta1**t
        bias2_sqrt = (1 - beta2**t).sqrt()
        for name, p in self.params.items():
            g, m, v = p.grad, self.exp_avg[name], self.exp_avg_sq[name]
            lr = lrs[name]
            on = _per_model(active, p)
            decayed = p * _per_model((1 - lr * weight_decay).to(p.dtype), p)
            m_new = m.lerp(g, 1 - beta1)
            v_new = v * beta2 + g * g * (1 - beta2)
            denom = v_new.sqrt() / _per_model(bias2_sqrt.to(p.dtype), p) + self.hp.eps
            p_new = decayed - _per_model((lr / bias1).to(p.dtype), p) * (m_new / denom)
            p.copy_(torch.where(on, p_new, p))
            m.copy_(torch.where(on, m_new, m))
            v.copy_(torch.where(on, v_new, v))


def newton_schulz(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """nanochat's orthogonalization of each matrix in a stack (..., rows, cols), in bf16 as nanochat.

    Every operation is per matrix, so a stack gives bitwise the same result as a loop over its matrices.
    """
    a, b, c = NS_COEFFS
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x


class StackedMuon:
    """nanochat's Muon (Nesterov momentum, Newton-Schulz) on stacked block matrices, per-model lr."""

    def __init__(
        self,
        params: dict[str, torch.Tensor],
        momentum: float = 0.95,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        self.params, self.momentum, self.ns_steps, self.ns_dtype = params, momentum, ns_steps, ns_dtype
        self.buf = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, lrs: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        m = self.momentum
        for name, p in self.params.items():
            on = _per_model(active, p)
            buf_new = self.buf[name].lerp(p.grad, 1 - m)
            g = p.grad.lerp(buf_new, m)
            update = newton_schulz(g, self.ns_steps, self.ns_dtype).to(p.dtype)
            scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
            p_new = p - _per_model((lrs[name] * scale).to(p.dtype), p) * update
            p.copy_(torch.where(on, p_new, p))
            self.buf[name].copy_(torch.where(on, buf_new, self.buf[name]))
