"""Optimizers on stacked tensors: every tensor has a leading model dimension K, every hyperparameter is (K,).

When some models are frozen (finished, or diverged with NaN in their gradients) the update runs on copies and
is committed with torch.where(active, new, old), so a frozen model keeps its weights and optimizer state bit
for bit: multiplying by a 0/1 mask would turn NaN * 0 into NaN.
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
    state_dtype: torch.dtype = torch.float32


class StackedAdamW:
    """torch.optim.AdamW's update, per model: its own lr and weight decay, its own step count."""

    def __init__(self, params: dict[str, torch.Tensor], hp: AdamWHparams):
        self.params, self.hp = params, hp
        self.exp_avg = {n: torch.zeros_like(p, dtype=hp.state_dtype) for n, p in params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p, dtype=hp.state_dtype) for n, p in params.items()}
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
        all_on = bool(active.all())
        for name, p in self.params.items():
            lr = lrs[name]
            state = (p, self.exp_avg[name], self.exp_avg_sq[name])
            # In place when every model steps (the common case: no copies of the stack); otherwise the very
            # same ops on copies, then a select, so a model's numbers never depend on who else is active.
            new = state if all_on else tuple(x.clone() for x in state)
            decay = _per_model((1 - lr * weight_decay).to(p.dtype), p)
            self._update(*new, p.grad, decay, _per_model(bias2_sqrt.to(p.dtype), p),
                         _per_model((lr / bias1).to(p.dtype), p))
            if not all_on:
                on = _per_model(active, p)
                for old, upd in zip(state, new, strict=True):
                    old.copy_(torch.where(on, upd, old))

    def _update(self, p, m, v, g, decay, bias2_sqrt, step_size) -> None:
        beta1, beta2 = self.hp.betas
        g = g.to(m.dtype)
        p.mul_(decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        # the one float32 temporary of the tensor's size (v.float() would alias v itself when v is float32)
        update = (v.sqrt() if v.dtype == torch.float32 else v.float().sqrt_()).div_(bias2_sqrt).add_(self.hp.eps)
        update = torch.div(m, update, out=update) if m.dtype == torch.float32 else m.float().div_(update)
        p.sub_(update.mul_(step_size))


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
        state_dtype: torch.dtype = torch.float32,
    ):
        self.params, self.momentum, self.ns_steps, self.ns_dtype = params, momentum, ns_steps, ns_dtype
        self.buf = {n: torch.zeros_like(p, dtype=state_dtype) for n, p in params.items()}

    @torch.no_grad()
    def step(self, lrs: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        m = self.momentum
        all_on = bool(active.all())
        for name, p in self.params.items():
            state = (p, self.buf[name])
            new_p, new_buf = state if all_on else tuple(x.clone() for x in state)
            new_buf.lerp_(p.grad.to(new_buf.dtype), 1 - m)
            g = p.grad.lerp(new_buf.to(p.grad.dtype), m)
            update = newton_schulz(g, self.ns_steps, self.ns_dtype).to(p.dtype)
            scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
            new_p.sub_(update.mul_(_per_model((lrs[name] * scale).to(p.dtype), p)))
            if not all_on:
                on = _per_model(active, p)
                for old, upd in zip(state, (new_p, new_buf), strict=True):
                    old.copy_(torch.where(on, upd, old))
